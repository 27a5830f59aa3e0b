"""Child-Tuning in a few lines on a small Flax model: vanilla vs CT-F vs CT-D.

A two-layer MLP is "pre-trained" on a synthetic 4-class task, then a new
classifier head is fine-tuned on 48 labelled examples of a related task, with
vanilla AdamW, Child-Tuning-F and Child-Tuning-D (Fisher -> child network ->
masked AdamW). It runs in about a minute on a laptop CPU and prints the test
accuracy of each mode and where Fisher put the CT-D child network.

The data are synthetic, so the numbers show the API working end to end, not
the paper's results; the trainer in train/ fine-tunes real pretrained encoders.

Run: python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from childtuning_jax import (
    child_tuning_adamw,
    estimate_fisher,
    keep_fractions,
    select_child_network,
)

DIM, CLASSES = 32, 4


class MLP(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(128, name="layer_0")(x))
    x = nn.gelu(nn.Dense(128, name="layer_1")(x))
    return nn.Dense(self.num_classes, name="classifier")(x)


def make_task(rng, centres, n, noise=1.6):
  labels = rng.integers(0, len(centres), n)
  x = centres[labels] + noise * rng.normal(size=(n, DIM))
  return {"x": x.astype(np.float32), "labels": labels.astype(np.int32)}


def loss_fn(params, batch, model):
  logits = model.apply({"params": params}, batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def train(params, tx, data, model, steps, batch_size, seed):
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch, model)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(seed)
  n = len(data["labels"])
  for _ in range(steps):
    index = rng.choice(n, batch_size, replace=False)
    params, state = step(params, state, jax.tree.map(lambda x: x[index], data))
  return params


def accuracy(params, data, model):
  logits = model.apply({"params": params}, data["x"])
  return float(jnp.mean(jnp.argmax(logits, -1) == data["labels"]))


def main():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(CLASSES, DIM))
  model = MLP(CLASSES)

  # "Pre-training" on plenty of data.
  pretrain = make_task(rng, centres, 4000)
  init = model.init(jax.random.key(0), pretrain["x"][:1])["params"]
  pretrained = train(init, optax.adamw(1e-3), pretrain, model, 600, 64, seed=0)

  # The downstream task: shifted class centres, 48 labelled examples, a fresh head.
  shifted = centres + 0.8 * rng.normal(size=centres.shape)
  small_train = make_task(rng, shifted, 48)
  test = make_task(rng, shifted, 4000)
  print(f"pre-trained model on the new task, before fine-tuning: "
        f"{accuracy(pretrained, test, model):.3f} accuracy")

  results = {}
  for seed in range(5):
    head = model.init(jax.random.key(100 + seed), small_train["x"][:1])["params"]["classifier"]
    start = {**pretrained, "classifier": head}
    # CT-D: per-example Fisher over the training set -> top 30% of entries (Eq. 10, §2.3).
    fisher = estimate_fisher(lambda p, b: loss_fn(p, b, model), start, [small_train], chunk_size=16)
    mask = select_child_network(fisher, 0.3, always_trainable={
        "layer_0": False, "layer_1": False, "classifier": True})
    optimizers = {
        "vanilla": optax.adamw(5e-4, eps=1e-6, weight_decay=0.01),
        "CT-F p=0.3": child_tuning_adamw(5e-4, reserve_p=0.3, key=seed, weight_decay=0.01),
        "CT-D p=0.3": child_tuning_adamw(5e-4, mode="driven", mask=mask, weight_decay=0.01),
    }
    for name, tx in optimizers.items():
      tuned = train(start, tx, small_train, model, 150, 16, seed)
      results.setdefault(name, []).append(accuracy(tuned, test, model))

  print(f"\nTest accuracy after fine-tuning on {len(small_train['labels'])} examples "
        "(mean, min-max over 5 seeds):")
  for name, scores in results.items():
    print(f"  {name:<11} {np.mean(scores):.3f}  ({min(scores):.3f}-{max(scores):.3f})")

  print("\nCT-D child network, fraction of each layer kept (last seed):")
  for layer, fraction in keep_fractions(mask, group_by=1).items():
    print(f"  {layer:<11} {fraction:6.1%} {'#' * round(40 * fraction)}")


if __name__ == "__main__":
  main()
