"""Child-Tuning as optax gradient transformations.

Child-Tuning (Xu et al., 2021) runs the forward and backward pass on the
whole network but updates only a *child network*: the gradient is multiplied
by a 0/1 mask before the optimizer sees it (paper Eq. 3, Algorithm 1 lines
5-7). Two ways of choosing the child are provided:

* :func:`child_tuning_free` (CT-F): a fresh Bernoulli(``reserve_p``) mask at
  every step, kept entries rescaled by ``1 / reserve_p`` (Eq. 4-5).
* :func:`child_tuning_driven` (CT-D): a fixed mask chosen once from the
  Fisher information (see :mod:`childtuning_jax.fisher` and
  :func:`childtuning_jax.select_child_network`).

:func:`child_tuning_adamw` chains either of them with ``optax.adamw``.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from childtuning_jax import _random, _trees


class ChildTuningFreeState(NamedTuple):
  """State of :func:`child_tuning_free`: the PRNG key, split at every update."""

  rng_key: jax.Array


class ChildTuningDrivenState(NamedTuple):
  """State of :func:`child_tuning_driven`: the fixed child-network mask."""

  mask: Any


def child_tuning_free(reserve_p: float, key: jax.Array | int = 0) -> optax.GradientTransformation:
  """Child-Tuning-F: keep a random fraction of every gradient, rescaled.

  At every update, each entry of each leaf is kept with probability
  ``reserve_p`` (independently across entries, leaves and steps) and
  multiplied by ``1 / reserve_p``; the other entries become zero. The mask is
  drawn from the key held in the state, which is split at every update, so
  the same key gives the same masks and replicas holding the same state (for
  instance under ``jax.pmap``) draw the same masks.

  Put it before the optimizer, as in the paper's Algorithm 1 (the mask acts on
  the gradient before Adam's moment estimates)::

    optax.chain(child_tuning_free(0.3), optax.adamw(2e-5))

  Each decision compares 32 random bits (Threefry-2x32 of the entry's
  position, fused into the consumer's loop) with ``round(reserve_p * 2**32)``,
  so the keep probability is within ``2**-33`` of ``reserve_p``. Kept entries
  are multiplied by ``1 / reserve_p`` rounded to the update's dtype, and the
  dtype is kept.

  Args:
    reserve_p: probability of keeping a gradient entry, in ``(0, 1]``. The
      paper uses 0.2-0.4; ``1.0`` is vanilla fine-tuning (the updates pass
      through unchanged).
    key: an int seed, a typed key (``jax.random.key``) or a raw key
      (``jax.random.PRNGKey``).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ChildTuningFreeState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from childtuning_jax import child_tuning_free
    >>> tx = child_tuning_free(0.5, key=0)
    >>> grads = {"w": jnp.ones((2, 4))}
    >>> updates, state = tx.update(grads, tx.init(grads))
    >>> sorted(set(updates["w"].ravel().tolist())) # each entry is 0 or 1 / 0.5
    [0.0, 2.0]
    >>> opt = optax.chain(child_tuning_free(0.3), optax.adamw(2e-5))

  References:
    Xu et al., "Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning", EMNLP 2021, Eq. 3-5 and Algorithm 1.
  """
  reserve_p = _trees.check_reserve_p(reserve_p)
  _random.keep_threshold(reserve_p, "reserve_p")  # a reserve_p below 2**-32 fails here, not in jit
  canonical_key = _trees.canonicalize_key(key)

  def init_fn(params):
    del params
    return ChildTuningFreeState(rng_key=canonical_key)

  def update_fn(updates, state, params=None):
    del params
    next_key, mask_key = jax.random.split(state.rng_key)
    if reserve_p == 1.0:
      return updates, ChildTuningFreeState(rng_key=next_key)

    def mask_leaf(leaf_key, update):
      # Eq. 4-5: M ~ Bernoulli(p), g <- g * M / p.
      keep = _random.bernoulli(leaf_key, reserve_p, update.shape, "reserve_p")
      scale = jnp.asarray(1.0 / reserve_p, update.dtype)
      return jnp.where(keep, update * scale, jnp.zeros((), update.dtype))

    leaf_keys = optax.tree_utils.tree_split_key_like(mask_key, updates)
    updates = jax.tree.map(mask_leaf, leaf_keys, updates)
    return updates, ChildTuningFreeState(rng_key=next_key)

  return optax.GradientTransformation(init_fn, update_fn)


def child_tuning_driven(mask: Any) -> optax.GradientTransformation:
  """Child-Tuning-D: update only a fixed child network.

  Every update entry outside the child (``mask`` false) is set to exactly
  zero; entries inside pass through unchanged. The paper applies the mask to
  the gradient, before the optimizer. Because this transform zeros whatever
  it receives, it can also stand *after* the optimizer, which is what keeps
  the non-child weights at their pretrained values under decoupled weight
  decay (the published code lets AdamW's decay shrink them)::

    optax.chain(child_tuning_driven(mask),
                optax.adamw(2e-5, weight_decay=0.01),
                child_tuning_driven(mask))

  :func:`child_tuning_adamw` builds that chain. The mask is checked against
  the parameters at ``init`` and kept in the state, so it is saved with the
  optimizer state in checkpoints.

  Args:
    mask: a pytree of boolean arrays with the structure and shapes of the
      parameters, ``True`` for entries in the child network. Usually the
      output of :func:`childtuning_jax.select_child_network`.

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`ChildTuningDrivenState`.

  Raises:
    TypeError: at construction if a leaf of ``mask`` is not boolean.
    ValueError: at ``init`` if the mask's structure or a leaf's shape does
      not match the parameters; the message names the leaf.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from childtuning_jax import child_tuning_driven
    >>> params = {"w": jnp.ones(3)}
    >>> tx = child_tuning_driven({"w": jnp.array([True, False, True])})
    >>> updates, _ = tx.update({"w": jnp.full(3, 5.0)}, tx.init(params))
    >>> updates["w"]
    Array([5., 0., 5.], dtype=float32)

  References:
    Xu et al., "Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning", EMNLP 2021, §2.3 and Algorithm 1.
  """
  _trees.check_bool_leaves(mask, "mask")

  def init_fn(params):
    _trees.check_same_shapes(mask, params, "mask", "params")
    # A copy: the sandwich holds two of these states, and a jitted step that donates its
    # state cannot donate one buffer twice.
    return ChildTuningDrivenState(mask=jax.tree.map(jnp.array, mask))

  def update_fn(updates, state, params=None):
    del params
    _trees.check_same_structure(state.mask, updates, "mask", "updates")
    updates = jax.tree.map(
        lambda keep, u: jnp.where(keep, u, jnp.zeros((), u.dtype)), state.mask, updates)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def child_tuning_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    reserve_p: float | None = None,
    mode: Literal["free", "driven"] = "free",
    mask: Any = None,
    key: jax.Array | int = 0,
    weight_decay: float = 0.0,
    eps: float = 1e-6,
    **adamw_kwargs,
) -> optax.GradientTransformation:
  """AdamW with Child-Tuning, as in the paper's Algorithm 1.

  * ``mode="free"``: ``chain(child_tuning_free(reserve_p, key), adamw(...))``.
  * ``mode="driven"``: ``chain(child_tuning_driven(mask), adamw(...),
    child_tuning_driven(mask))``. The second mask removes the weight-decay
    term from non-child entries, so they stay bit-identical to their
    pretrained values, as the paper states (the published code lets them
    decay).

  ``eps`` defaults to the paper's ``1e-6`` (Appendix B); optax's ``adamw``
  default is ``1e-8``.

  Args:
    learning_rate: a float or an optax schedule.
    reserve_p: the CT-F keep probability; required for ``mode="free"``. In
      driven mode the child network is fixed by ``mask``, and giving
      ``reserve_p`` too is refused.
    mode: ``"free"`` (CT-F) or ``"driven"`` (CT-D).
    mask: the CT-D child network (a boolean pytree); required for
      ``mode="driven"``.
    key: seed or PRNG key of the CT-F masks.
    weight_decay: AdamW's decoupled weight decay.
    eps: Adam's epsilon.
    **adamw_kwargs: passed on to ``optax.adamw`` (``b1``, ``b2``, ``mask``
      is not accepted here -- use ``weight_decay_mask``).

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from childtuning_jax import child_tuning_adamw
    >>> params = {"w": jnp.ones(3)}
    >>> tx = child_tuning_adamw(1e-3, reserve_p=0.3)
    >>> state = tx.init(params)
    >>> mask = {"w": jnp.array([True, False, False])}
    >>> tx = child_tuning_adamw(1e-1, mode="driven", mask=mask, weight_decay=0.1)
    >>> updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([0.89, 1.  , 1.  ], dtype=float32)

  References:
    Xu et al., "Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning", EMNLP 2021, Algorithm 1 and Appendix B.
  """
  if "mask" in adamw_kwargs:
    raise TypeError("pass the weight-decay mask as weight_decay_mask=...")
  weight_decay_mask = adamw_kwargs.pop("weight_decay_mask", None)
  adamw = optax.adamw(
      learning_rate, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask, **adamw_kwargs)
  if mode == "free":
    if mask is not None:
      raise ValueError("mask= is for mode='driven'; mode='free' draws a new mask every step.")
    if reserve_p is None:
      raise ValueError("mode='free' needs reserve_p (the paper uses 0.2-0.4).")
    return optax.chain(child_tuning_free(reserve_p, key), adamw)
  if mode == "driven":
    if mask is None:
      raise ValueError("mode='driven' needs mask= (see select_child_network).")
    if reserve_p is not None:
      raise ValueError(
          "reserve_p is only used by mode='free'; in mode='driven' the child network is "
          "fixed by mask= (choose its size in select_child_network).")
    return optax.chain(child_tuning_driven(mask), adamw, child_tuning_driven(mask))
  raise ValueError(f"mode must be 'free' or 'driven', got {mode!r}.")
