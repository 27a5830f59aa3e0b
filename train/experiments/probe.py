"""The probe of the task-generalisation figure (paper Figure 2), as an evaluator of its own: a
linear model trained on the frozen features of an encoder, for tasks it was not fine-tuned on.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from train.experiments import cells, report

logger = logging.getLogger("experiments")

# Target tasks of the linear probe: file under data_dir -> label. 1,000 examples train the
# probe, the next 1,000 test it (the files are in a fixed shuffled order).
PROBE_TASKS = {"vader/amazon_binary.csv": "Amazon", "vader/nyt_binary.csv": "NYT",
               "vader/tweets_binary.csv": "Tweets", "vader/tweets_regression.csv": "Tweets (rating)"}
PROBE_EXAMPLES = 1000


@functools.lru_cache
def _jitted_encoder(config):
  """One compiled encoder per config, shared by every (encoder, task) pair of the probe."""
  import jax

  from childtuning_jax.models.encoder import EncoderModel

  encoder = EncoderModel(config)
  return jax.jit(lambda p, ids, mask, types: encoder.apply(
      {"params": p}, ids, mask, types, deterministic=True))


def encoder_features(model, params, arrays: dict[str, np.ndarray], batch_size: int = 128) -> np.ndarray:
  """The representation the classification head reads: BERT's pooled output, or the first
  token's hidden state for models without a pooler."""
  apply = _jitted_encoder(model.config)
  outputs = []
  for start in range(0, len(arrays["input_ids"]), batch_size):
    batch = [arrays[k][start:start + batch_size] for k in ("input_ids", "attention_mask",
                                                           "token_type_ids")]
    sequence, pooled = apply(params[model.config.model_type], *batch)
    outputs.append(np.asarray(pooled if pooled is not None else sequence[:, 0]))
  return np.concatenate(outputs)


def linear_probe(train_x, train_y, test_x, test_y, *, regression: bool) -> float:
  """Score (x100) of a linear model on frozen features: L2-regularised logistic regression
  (accuracy) or ridge regression (Pearson correlation), on standardised features."""
  mean, scale = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mean) / scale, (test_x - mean) / scale
  train_x = np.concatenate([train_x, np.ones((len(train_x), 1))], 1)
  test_x = np.concatenate([test_x, np.ones((len(test_x), 1))], 1)
  if regression:
    weights = np.linalg.solve(train_x.T @ train_x + np.eye(train_x.shape[1]), train_x.T @ train_y)
    return 100 * float(np.corrcoef(test_x @ weights, test_y)[0, 1])
  import jax
  import jax.numpy as jnp
  import optax

  classes = int(train_y.max()) + 1
  def loss(w):
    logits = jnp.asarray(train_x) @ w
    return (optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(train_y)).mean()
            + 1e-3 * jnp.sum(w[:-1] ** 2))
  solver = optax.lbfgs()
  w = jnp.zeros((train_x.shape[1], classes))
  state = solver.init(w)
  value_and_grad = optax.value_and_grad_from_state(loss)

  @jax.jit
  def step(w, state):
    value, grad = value_and_grad(w, state=state)
    updates, state = solver.update(grad, state, w, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(w, updates), state

  for _ in range(200):
    w, state = step(w, state)
  return 100 * float(np.mean(np.argmax(test_x @ np.asarray(w), 1) == test_y))


def probe_scores(setting: cells.Setting) -> dict[str, dict[str, dict[int, float]]]:
  """``{task: {encoder: {seed: score}}}`` for the pretrained encoder and the fine-tuned ones."""
  from transformers import AutoTokenizer

  from childtuning_jax.models import embedded_model_path, load_pretrained, resolve_checkpoint
  from train import checkpoints as checkpoints_lib
  from train import text_datasets

  model_path = resolve_checkpoint(setting.model_name_or_path or embedded_model_path())
  tokenizer = AutoTokenizer.from_pretrained(model_path)
  model, pretrained = load_pretrained(model_path, 2)
  encoders = {"Pretrained (no fine-tuning)": {0: pretrained}}
  for name in cells.EXPERIMENT_CELLS["probe"]:
    encoders[cells.CELLS[name].label] = {
        seed: lambda seed=seed, name=name: checkpoints_lib.latest_params(
            setting.run_dir(name, seed) / "checkpoints")
        for seed in report.results_of(setting, name)
        if (setting.run_dir(name, seed) / "checkpoints").is_dir()}
  tasks = {}
  for relative, label in PROBE_TASKS.items():
    dataset = text_datasets.load_local(setting.data(relative))
    if len(dataset) < 2 * PROBE_EXAMPLES:
      raise ValueError(f"{relative}: {len(dataset)} examples, the probe needs {2 * PROBE_EXAMPLES}.")
    arrays = text_datasets.encode(dataset.subset(range(2 * PROBE_EXAMPLES)), tokenizer,
                                  setting.max_seq_length)
    labels = np.asarray(dataset.labels[:2 * PROBE_EXAMPLES])
    tasks[label] = (arrays, labels, dataset.is_regression)
  scores = {label: {encoder: {} for encoder in encoders} for label in tasks}
  for encoder, seeds in encoders.items():
    for seed, params in seeds.items():
      params = params() if callable(params) else params
      for label, (arrays, labels, regression) in tasks.items():
        features = encoder_features(model, params, arrays)
        n = PROBE_EXAMPLES
        scores[label][encoder][seed] = linear_probe(features[:n], labels[:n], features[n:],
                                                    labels[n:], regression=regression)
      logger.info("probe of %s, seed %d: %s", encoder, seed,
                  {label: round(scores[label][encoder][seed], 2) for label in tasks})
  return scores
