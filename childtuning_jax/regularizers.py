"""The fine-tuning methods the paper compares Child-Tuning with (§4.1, Appendix C).

Each is a small piece that composes with the Child-Tuning transforms:

- :func:`decay_to_pretrained`: weight decay toward the pretrained weights,
  the gradient of ``λ‖w − w0‖²`` (not AdamW's decay toward zero).
- :func:`recadam`: RecAdam's annealing from the pretrained weights to the task,
  ``λ(t)·L + (1 − λ(t))·‖w − w0‖²`` (the quadratic term decoupled from Adam).
- :func:`top_layers_mask`: Top-K tuning, a fixed mask for
  :func:`~childtuning_jax.child_tuning_driven`.
- :func:`mixout`: replace parameters by their pretrained values at random,
  inside the loss.
- :func:`r3f_noise` and :func:`symmetric_kl`: R3F's penalty between outputs on
  clean and noise-perturbed input embeddings, inside the loss.

The pulls toward ``w0`` keep their own copy of it in the optimizer state, or,
with ``pretrained=None``, take it from each update's extra argument
(``tx.update(grads, state, params, pretrained=w0)``, which ``optax.chain``
passes on): then one copy of ``w0`` serves every method of a run.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from childtuning_jax import _trees


def _check_pretrained(pretrained: Any, params: Any) -> None:
  _trees.check_same_structure(pretrained, params, "pretrained", "params")
  _trees.check_same_shapes(pretrained, params, "pretrained", "params")


class PretrainedState(NamedTuple):
  # w0, kept in the state so that checkpoints carry it and jit does not bake it in; None when
  # each update brings it (the ``pretrained`` extra argument).
  pretrained: Any
  count: jax.Array  # int32: updates so far (RecAdam's t)


def _toward_pretrained(name, pretrained, where, combine) -> optax.GradientTransformationExtraArgs:
  """A transform ``u ← combine(u, w − w0, t)`` on the leaves ``where`` selects; ``w0`` is
  ``pretrained`` or, if that is None, each update's ``pretrained`` extra argument."""

  def init_fn(params):
    if pretrained is None:
      return PretrainedState(pretrained=None, count=jnp.zeros((), jnp.int32))
    if _trees.is_params_placeholder(params):  # tree_map_params: w0 is shaped as params
      return PretrainedState(pretrained=params, count=jnp.zeros((), jnp.int32))
    _check_pretrained(pretrained, params)
    # A copy: params and the state may both be donated to a jitted step; one buffer
    # cannot be donated twice.
    return PretrainedState(pretrained=jax.tree.map(jnp.array, pretrained),
                           count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{name} needs params: call update(updates, state, params).")
    w0 = state.pretrained
    if w0 is None:
      w0 = extra_args.get("pretrained")
      if w0 is None:
        raise ValueError(f"{name} was made with pretrained=None: pass the pretrained weights to "
                         "each update, update(updates, state, params, pretrained=w0).")
      _check_pretrained(w0, params)

    def one(path, u, w, w0):
      if where is not None and not where(_trees.path_name(path)):
        return u
      return combine(u, (w - w0).astype(u.dtype), state.count).astype(u.dtype)

    updates = jax.tree_util.tree_map_with_path(one, updates, params, w0)
    return updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def decay_to_pretrained(strength: float, pretrained: Any = None, *,
                        where: Callable[[str], bool] | None = None
                        ) -> optax.GradientTransformationExtraArgs:
  """Adds the gradient of ``strength · ‖w − w0‖²``: ``2 · strength · (w − w0)``.

  Chain it before the optimizer, as a loss term would be:
  ``optax.chain(decay_to_pretrained(0.01, params0), optax.adamw(2e-5))``.

  Args:
    strength: ``λ_WD``; the paper searches {10, 1, 0.1, 0.01, 1e-3, 1e-4}.
    pretrained: the pretrained parameters ``w0`` (a pytree like the params),
      kept in the optimizer state; ``None``: each update's ``pretrained``
      extra argument.
    where: a callable on the leaf's path name (``"a/b/c"``) choosing the
      leaves to pull; default all. (A newly initialised head has no
      pretrained value to be pulled toward.)

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from childtuning_jax.regularizers import decay_to_pretrained
    >>> tx = decay_to_pretrained(0.5, {"w": jnp.zeros(2)})
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> tx.update({"w": jnp.zeros(2)}, tx.init(params), params)[0]["w"]
    Array([ 1., -2.], dtype=float32)
    >>> shared = decay_to_pretrained(0.5)  # w0 from each update: one copy for several methods
    >>> shared.update({"w": jnp.zeros(2)}, shared.init(params), params,
    ...               pretrained={"w": jnp.zeros(2)})[0]["w"]
    Array([ 1., -2.], dtype=float32)

  References:
    Daumé III, "Frustratingly Easy Domain Adaptation", ACL 2007; Xu et al.
    2021, Appendix C.
  """
  if strength < 0:
    raise ValueError(f"strength must be >= 0, got {strength}.")
  return _toward_pretrained("decay_to_pretrained", pretrained, where,
                            lambda g, offset, t: g + 2 * strength * offset)


def recadam(pretrained: Any, learning_rate: optax.ScalarOrSchedule, *, k: float, t0: int,
            strength: float = 5000.0,
            where: Callable[[str], bool] | None = None) -> optax.GradientTransformationExtraArgs:
  """RecAdam: anneal from recalling the pretrained weights to learning the task.

  The objective is ``λ(t)·L + (1 − λ(t))·‖w − w0‖²`` with
  ``λ(t) = 1 / (1 + exp(−k·(t − t0)))``. As in the RecAdam code (which the
  paper uses), the quadratic term is applied outside Adam's moments: chained
  **after** the optimizer, this turns its update ``u`` into
  ``λ(t)·u − lr(t)·(1 − λ(t))·strength·(w − w0)``. Had the quadratic term's
  gradient gone through Adam, its early, large values would inflate Adam's
  second moment and stall learning for hundreds of steps::

    optax.chain(optax.adamw(lr), recadam(params0, lr, k=0.5, t0=250))

  Args:
    pretrained: the pretrained parameters ``w0``, kept in the optimizer state;
      ``None``: each update's ``pretrained`` extra argument.
    learning_rate: the optimizer's learning rate or schedule (the pull is
      scaled by it, as a decoupled weight decay is).
    k: the annealing rate; the paper searches {0.05, 0.1, 0.2, 0.5, 1}.
    t0: the step where ``λ = 1/2``; the paper searches {50, 100, 250, 500}.
    strength: the coefficient of the pull (RecAdam's ``pretrain_cof``; its
      released setting is 5000).
    where: as in :func:`decay_to_pretrained`; leaves it leaves out keep
      their update unchanged.

  Examples:
    >>> import jax.numpy as jnp
    >>> from childtuning_jax.regularizers import recadam
    >>> tx = recadam({"w": jnp.zeros(1)}, 0.1, k=1.0, t0=0, strength=2.0)
    >>> params = {"w": jnp.ones(1)}
    >>> tx.update({"w": jnp.full(1, -4.0)}, tx.init(params), params)[0]["w"]  # λ(0) = 1/2
    Array([-2.1], dtype=float32)

  References:
    Chen et al., "Recall and Learn: Fine-tuning Deep Pretrained Language
    Models with Less Forgetting", EMNLP 2020; Xu et al. 2021, Appendix C.
  """
  if k <= 0 or strength < 0:
    raise ValueError(f"need k > 0 and strength >= 0, got k={k}, strength={strength}.")
  schedule = learning_rate if callable(learning_rate) else (lambda t: learning_rate)

  def combine(u, offset, t):
    task_weight = jax.nn.sigmoid(k * (t.astype(jnp.float32) - t0))
    return task_weight * u - schedule(t) * (1 - task_weight) * strength * offset

  return _toward_pretrained("recadam", pretrained, where, combine)


_LAYER = re.compile(r"(?:^|/)layer_(\d+)(?:/|$)")


def top_layers_mask(params: Any, k: int, *,
                    always_trainable: Callable[[str], bool] | None = None) -> Any:
  """Top-K tuning: ``True`` for the top ``k`` encoder layers and the head, ``False`` elsewhere.

  Encoder layers are the leaves under a ``layer_<i>`` path part (the
  library's encoders, Flax ``nn.scan``-free stacks); the top ``k`` have the
  largest ``i``. Everything above the encoder (pooler, classifier) is
  trained; embeddings and the lower layers are frozen. Use the result with
  :func:`~childtuning_jax.child_tuning_driven`.

  Args:
    params: the parameters.
    k: layers to train, from the top; 0 trains the head only. The paper
      searches {0, 3, 6, 12} for 24-layer models.
    always_trainable: a callable on the leaf's path name (``"a/b/c"``) for
      leaves to train whatever ``k`` is; default: every leaf that is neither
      in an encoder layer nor an embedding (``"embeddings"`` in its path).

  Examples:
    >>> import numpy as np
    >>> from childtuning_jax import keep_fractions
    >>> from childtuning_jax.regularizers import top_layers_mask
    >>> params = {"bert": {"embeddings": np.zeros(2), "encoder": {
    ...     "layer_0": np.zeros(2), "layer_1": np.zeros(2)}}, "classifier": np.zeros(2)}
    >>> keep_fractions(top_layers_mask(params, 1))
    {'bert/embeddings': 0.0, 'bert/encoder/layer_0': 0.0, 'bert/encoder/layer_1': 1.0, 'classifier': 1.0}
  """
  names = [name for name, _ in _trees.named_leaves(params)]
  layers = {name: int(m.group(1)) for name in names if (m := _LAYER.search(name))}
  if not layers:
    raise ValueError("top_layers_mask found no leaf under a 'layer_<i>' path part.")
  num_layers = max(layers.values()) + 1
  if not 0 <= k <= num_layers:
    raise ValueError(f"k must be in [0, {num_layers}] (the model's layers), got {k}.")
  if always_trainable is None:
    always_trainable = lambda name: "embeddings" not in name.split("/")

  def trainable(path, leaf):
    name = _trees.path_name(path)
    keep = layers[name] >= num_layers - k if name in layers else always_trainable(name)
    return jnp.full(jnp.shape(leaf), keep, bool)

  return jax.tree_util.tree_map_with_path(trainable, params)


def mixout(params: Any, pretrained: Any, rate: float, key: jax.Array, *,
           where: Callable[[str], bool] | None = None) -> Any:
  """Mixout: each entry is replaced by its pretrained value with probability ``rate``,
  corrected so that the expectation is the current weight.

  ``w̃ = (M·w0 + (1 − M)·w − rate·w0) / (1 − rate)`` with ``M ~ Bernoulli(rate)``
  per entry; use ``w̃`` in the training forward pass (gradients flow to
  ``w`` through the kept entries) and ``w`` at evaluation.

  Args:
    params: the current parameters ``w``.
    pretrained: ``w0``.
    rate: ``p`` in [0, 1); the paper searches 0.1-0.8.
    key: a PRNG key, new for every step.
    where: a callable on the leaf's path name selecting the leaves to mix;
      default: weight matrices (``kernel`` leaves), where Lee et al. apply it.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from childtuning_jax.regularizers import mixout
    >>> mixed = mixout({"kernel": jnp.ones(4)}, {"kernel": jnp.zeros(4)}, 0.5, jax.random.key(0))
    >>> sorted(set(mixed["kernel"].tolist())) <= [0.0, 2.0]  # dropped to w0 = 0, or kept × 2
    True

  References:
    Lee et al., "Mixout: Effective Regularization to Finetune Large-scale
    Pretrained Language Models", ICLR 2020.
  """
  if not 0 <= rate < 1:
    raise ValueError(f"rate must be in [0, 1), got {rate}.")
  _check_pretrained(pretrained, params)
  if rate == 0:
    return params
  where = where or (lambda name: name.split("/")[-1] == "kernel")
  leaves = _trees.named_leaves(params)
  keys = dict(zip((name for name, _ in leaves), jax.random.split(key, len(leaves))))

  def mix(path, w, w0):
    name = _trees.path_name(path)
    if not where(name):
      return w
    replace = jax.random.bernoulli(keys[name], rate, jnp.shape(w))
    w0 = w0.astype(w.dtype)
    return (jnp.where(replace, w0, w) - rate * w0) / (1 - rate)

  return jax.tree_util.tree_map_with_path(mix, params, pretrained)


def r3f_noise(key: jax.Array, shape: tuple[int, ...], sigma: float,
              kind: Literal["normal", "uniform"] = "normal", dtype=jnp.float32) -> jax.Array:
  """R3F's input-embedding noise ``z``: ``N(0, σ²)`` or ``U(−σ, σ)`` per entry.

  Examples:
    >>> import jax
    >>> from childtuning_jax.regularizers import r3f_noise
    >>> z = r3f_noise(jax.random.key(0), (4, 8, 16), 0.5, "uniform")
    >>> z.shape, bool(abs(z).max() <= 0.5)
    ((4, 8, 16), True)
  """
  if sigma <= 0:
    raise ValueError(f"sigma must be > 0, got {sigma}.")
  if kind == "normal":
    return sigma * jax.random.normal(key, shape, dtype)
  if kind == "uniform":
    return jax.random.uniform(key, shape, dtype, -sigma, sigma)
  raise ValueError(f"kind must be 'normal' or 'uniform', got {kind!r}.")


def symmetric_kl(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
  """``KL(p‖q) + KL(q‖p)`` between the softmax distributions of two ``[batch, classes]``
  logits, averaged over the batch: R3F's penalty ``KL_S(f(x)‖f(x + z))``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from childtuning_jax.regularizers import symmetric_kl
    >>> float(symmetric_kl(jnp.array([[0.0, 0.0]]), jnp.array([[0.0, 0.0]])))
    0.0

  References:
    Aghajanyan et al., "Better Fine-Tuning by Reducing Representational
    Collapse", ICLR 2021; Xu et al. 2021, Appendix C.
  """
  log_p = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum((jnp.exp(log_p) - jnp.exp(log_q)) * (log_p - log_q), axis=-1))
