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

import warnings
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from childtuning_jax import _random, _trees


class ChildTuningFreeState(NamedTuple):
  """State of :func:`child_tuning_free`: the PRNG key, split at every update, and per leaf
  its row among the leaves of its shape (constants: held here, as inputs of a jitted
  update, so that the leaves of one shape share compiled kernels; see
  :func:`childtuning_jax._random.bernoulli_per_shape`)."""

  rng_key: jax.Array
  rows: tuple | int = ()


class ChildTuningDrivenState(NamedTuple):
  """State of :func:`child_tuning_driven`: the fixed child-network mask (one copy), and the
  state of the optimizer it wraps (``None`` without one)."""

  mask: Any
  inner_state: Any = None


class ChildTuningSparseState(NamedTuple):
  """State of ``child_tuning_adamw(..., mode="driven", sparse_state=True)``: per leaf, the
  sorted flat positions of its child entries (``int32``; a leaf with none holds one
  position past its end, which reads as 0 and is never written), and AdamW's state over
  those entries only (each leaf's moments a vector of its child's size)."""

  indices: Any
  inner_state: Any


def child_tuning_free(reserve_p: float | jax.Array,
                      key: jax.Array | int | None = None) -> optax.GradientTransformation:
  """Child-Tuning-F: keep a random fraction of every gradient, rescaled.

  At every update, each entry of each leaf is kept with probability
  ``reserve_p`` (independently across entries, leaves and steps) and
  multiplied by ``1 / reserve_p``; the other entries become zero. The mask is
  drawn from the key held in the state, which is split at every update, so
  the same key gives the same masks and replicas holding the same state (for
  instance under ``jax.pmap``) draw the same masks.

  Put it before the optimizer, as in the paper's Algorithm 1 (the mask acts on
  the gradient before Adam's moment estimates)::

    optax.chain(child_tuning_free(0.3, key=0), optax.adamw(2e-5))

  Each decision compares 32 random bits (Threefry-2x32 of the entry's
  position; the leaves of one shape drawn in one loop) with ``round(reserve_p * 2**32)``,
  so the keep probability is within ``2**-33`` of ``reserve_p``. Kept entries
  are multiplied by ``1 / reserve_p`` rounded to the update's dtype, and the
  dtype is kept.

  Args:
    reserve_p: probability of keeping a gradient entry, in ``(0, 1]``. The
      paper uses 0.2-0.4; ``1.0`` is vanilla fine-tuning (the updates pass
      through unchanged). A scalar array is accepted too, unchecked, as
      ``optax.inject_hyperparams(child_tuning_free)(reserve_p=0.3)`` passes
      it (to change it between steps); ``1.0`` then keeps each entry with
      probability ``1 - 2**-32``.
    key: an int seed, a typed key (``jax.random.key``) or a raw key
      (``jax.random.PRNGKey``): one key, also under ``jax.pmap`` (replicate
      the state). Without it, a warning, and seed 0: every run that forgets
      it draws the same masks (as ``optax.add_noise``).

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
    >>> opt = optax.chain(child_tuning_free(0.3, key=1), optax.adamw(2e-5))
    >>> opt = optax.inject_hyperparams(child_tuning_free)(reserve_p=0.3, key=1)
    >>> state = opt.init(grads)
    >>> state.hyperparams["reserve_p"] = 0.2  # from the next update on

  References:
    Xu et al., "Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning", EMNLP 2021, Eq. 3-5 and Algorithm 1.
  """
  reserve_p = _trees.check_reserve_p(reserve_p)
  static_p = isinstance(reserve_p, float)
  if static_p:
    _random.keep_threshold(reserve_p, "reserve_p")  # a reserve_p below 2**-32 fails here, not in jit
  if key is None:
    warnings.warn("child_tuning_free: no key given, so seed 0: every run draws the same masks. "
                  "Pass key= (an int seed or a jax.random.key).", stacklevel=2)
    key = 0
  canonical_key = _trees.canonicalize_key(key)

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    if not leaves:  # also optax.tree_map_params's placeholder: a leaf, a prefix of any rows
      return ChildTuningFreeState(rng_key=canonical_key, rows=0)
    rows = _random.rows_per_shape([jnp.shape(leaf) for leaf in leaves])
    return ChildTuningFreeState(rng_key=canonical_key,
                                rows=tuple(jnp.asarray(row, jnp.int32) for row in rows))

  def update_fn(updates, state, params=None):
    del params
    next_key, mask_key = jax.random.split(state.rng_key)
    if static_p and reserve_p == 1.0:
      return updates, state._replace(rng_key=next_key)

    # Eq. 4-5: M ~ Bernoulli(p), g <- g * M / p, each leaf under its own key split from
    # mask_key (optax.tree_utils.tree_split_key_like's keys).
    leaves, treedef = jax.tree.flatten(updates)
    rows = state.rows  # None where they do not match (a hand-made state): rows as constants
    rows = rows if isinstance(rows, tuple) and len(rows) == len(leaves) else None
    keeps = _random.bernoulli_per_shape(mask_key, reserve_p, [jnp.shape(u) for u in leaves],
                                        "reserve_p", rows=rows)
    scale = 1.0 / reserve_p if static_p else 1.0 / reserve_p.astype(jnp.float32)
    updates = jax.tree.unflatten(treedef, [
        jnp.where(keep, u * jnp.asarray(scale, u.dtype), jnp.zeros((), u.dtype))
        for keep, u in zip(keeps, leaves)])
    return updates, state._replace(rng_key=next_key)

  return optax.GradientTransformation(init_fn, update_fn)


def child_tuning_driven(mask: Any, inner: optax.GradientTransformation | None = None
                        ) -> optax.GradientTransformationExtraArgs:
  """Child-Tuning-D: update only a fixed child network.

  Every update entry outside the child (``mask`` false) is set to exactly
  zero; entries inside pass through unchanged. The paper applies the mask to
  the gradient, before the optimizer::

    optax.chain(child_tuning_driven(mask), optax.adamw(2e-5))

  With ``inner``, the mask is applied before *and after* the inner optimizer,
  from one copy of it. That keeps the non-child weights bit-identical to their
  pretrained values under decoupled weight decay, as the paper states (the
  published code lets AdamW's decay shrink them)::

    child_tuning_driven(mask, optax.adamw(2e-5, weight_decay=0.01))

  :func:`child_tuning_adamw` builds that. The mask is checked against the
  parameters at ``init`` and kept in the state (``optax.tree_utils.tree_get(
  state, "mask")`` finds it), so it is saved with the optimizer state.

  Args:
    mask: a pytree of booleans with the parameters' leaves, ``True`` for
      entries in the child network (usually the output of
      :func:`childtuning_jax.select_child_network`): arrays of the leaves'
      shapes, or a Python bool for a whole leaf. Its leaves are matched to
      the parameters' by name, so a mask built from a dict fits a
      ``FrozenDict``, an ``nnx.State`` or its ``nnx.to_pure_dict`` of the same
      parameters. Or, as optax's ``mask=``, a callable ``params -> mask``.
    inner: an optimizer to wrap (its updates masked before and after).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra arguments of
    ``update`` go to ``inner``) with state :class:`ChildTuningDrivenState`.

  Raises:
    TypeError: if a leaf of ``mask`` is neither boolean nor a bool (at
      construction, or at ``init`` for a callable).
    ValueError: at ``init`` if the mask's leaves or a leaf's shape do not
      match the parameters; the message names the leaf.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from childtuning_jax import child_tuning_driven
    >>> params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    >>> tx = child_tuning_driven({"w": jnp.array([True, False, True]), "b": False})
    >>> updates, _ = tx.update({"w": jnp.full(3, 5.0), "b": jnp.ones(2)}, tx.init(params))
    >>> updates["w"], updates["b"]
    (Array([5., 0., 5.], dtype=float32), Array([0., 0.], dtype=float32))
    >>> frozen = child_tuning_driven(lambda p: {"w": p["w"] > 0, "b": True},
    ...                              optax.adamw(1e-2, weight_decay=0.1))

  References:
    Xu et al., "Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning", EMNLP 2021, §2.3 and Algorithm 1.
  """
  _check_mask(mask)
  wrapped = None if inner is None else optax.with_extra_args_support(inner)

  def init_fn(params):
    if _trees.is_params_placeholder(params):  # tree_map_params: the mask is shaped as params
      return ChildTuningDrivenState(mask=params,
                                    inner_state=None if wrapped is None else wrapped.init(params))
    # jnp.array copies: a jitted step that donates its state must not find the buffers of a
    # mask the caller still holds.
    aligned = jax.tree.map(lambda m: jnp.array(m, bool), _mask_for(mask, params))
    return ChildTuningDrivenState(mask=aligned,
                                  inner_state=None if wrapped is None else wrapped.init(params))

  def apply(mask_tree, updates):
    return jax.tree.map(lambda keep, u: jnp.where(keep, u, jnp.zeros((), u.dtype)),
                        mask_tree, updates)

  def update_fn(updates, state, params=None, **extra_args):
    _trees.check_same_structure(state.mask, updates, "mask", "updates")
    updates = apply(state.mask, updates)
    if wrapped is None:
      return updates, state
    updates, inner_state = wrapped.update(updates, state.inner_state, params, **extra_args)
    return apply(state.mask, updates), state._replace(inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def child_tuning_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    reserve_p: float | jax.Array | None = None,
    mode: Literal["free", "driven"] = "free",
    mask: Any = None,
    key: jax.Array | int | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    nesterov: bool = False,
    sparse_state: bool = False,
) -> optax.GradientTransformation:
  """AdamW with Child-Tuning, as in the paper's Algorithm 1.

  * ``mode="free"``: ``chain(child_tuning_free(reserve_p, key), adamw(...))``.
  * ``mode="driven"``: ``child_tuning_driven(mask, adamw(...))``: the mask
    before and after AdamW, from one copy of it. The second mask removes the
    weight-decay term from non-child entries, so they stay bit-identical to
    their pretrained values, as the paper states (the published code lets
    them decay).

  The AdamW arguments are ``optax.adamw``'s, with ``eps`` defaulting to the
  paper's ``1e-6`` (Appendix B; optax's default is ``1e-8``) and optax's
  ``mask=`` (which leaves weight decay applies to) named ``weight_decay_mask``,
  since ``mask`` is the child network here. Numeric arguments can be injected:
  ``optax.inject_hyperparams(child_tuning_adamw)(learning_rate=1e-3,
  reserve_p=0.3, key=0)``.

  Args:
    learning_rate: a float or an optax schedule.
    reserve_p: the CT-F keep probability; required for ``mode="free"``. In
      driven mode the child network is fixed by ``mask``, and giving
      ``reserve_p`` too is refused.
    mode: ``"free"`` (CT-F) or ``"driven"`` (CT-D).
    mask: the CT-D child network (see :func:`child_tuning_driven`); required
      for ``mode="driven"``.
    key: seed or PRNG key of the CT-F masks (a warning without it).
    b1, b2, eps, eps_root, mu_dtype, nesterov: as in ``optax.adamw``.
    weight_decay: AdamW's decoupled weight decay.
    weight_decay_mask: ``optax.adamw``'s ``mask``: a pytree of bools or a
      callable ``params -> pytree``, the leaves weight decay applies to.
    sparse_state: driven mode only. Keep Adam's moments for the child's
      entries alone (a vector per leaf, with the entries' positions), not
      for every parameter: optimizer state memory in proportion to the
      child's size (an int32 position and two float32 moments, 12 bytes, per
      child entry; the dense state holds 8 bytes of moments and a mask byte
      per parameter; BENCHMARKS.md measures both). The updates equal the dense ones to float
      rounding; the frozen entries' updates are exactly zero. The mask's
      values must be known when the state is built (not traced).

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from childtuning_jax import child_tuning_adamw
    >>> params = {"w": jnp.ones(3)}
    >>> tx = child_tuning_adamw(1e-3, reserve_p=0.3, key=0)
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
  adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                      weight_decay=weight_decay, mask=weight_decay_mask, nesterov=nesterov)
  if mode == "free":
    if sparse_state:
      raise ValueError("sparse_state=True keeps the moments of CT-D's fixed child network "
                       "(mode='driven'); CT-F's mask changes every step.")
    if mask is not None:
      raise ValueError(
          "mask= is CT-D's child network (mode='driven'); mode='free' draws a new mask every "
          "step. For AdamW's weight-decay mask (optax.adamw's mask=), pass weight_decay_mask=.")
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
    if sparse_state:
      return _sparse_driven_adamw(
          mask, optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                                    nesterov=nesterov),
          weight_decay, weight_decay_mask, optax.scale_by_learning_rate(learning_rate))
    return child_tuning_driven(mask, adamw)
  raise ValueError(f"mode must be 'free' or 'driven', got {mode!r}.")


def _sparse_driven_adamw(mask: Any, adam: optax.GradientTransformation, weight_decay: Any,
                         weight_decay_mask: Any, rate: optax.GradientTransformation
                         ) -> optax.GradientTransformation:
  """``optax.adamw`` (``adam``, then decoupled weight decay, then ``rate``) run on the child
  entries of each leaf, gathered into a vector; the result scattered back into zeros.

  Elementwise, the same arithmetic as the dense driven AdamW, whose frozen entries have
  zero gradients, zero moments and a zero update."""
  _check_mask(mask)
  decays = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

  def init_fn(params):
    placeholder = _trees.is_params_placeholder(params)  # tree_map_params: no leaf is params-like
    if placeholder and callable(mask):
      raise ValueError("sparse_state=True with a callable mask: tree_map_params cannot tell "
                       "the state's leaves without the parameters; pass the mask as arrays.")
    aligned = mask if placeholder else _mask_for(mask, params)

    def positions(name, leaf):
      try:
        flat = np.flatnonzero(np.asarray(leaf))
      except jax.errors.TracerArrayConversionError:
        raise ValueError(
            f"sparse_state=True needs the mask's values when the state is built, but mask leaf "
            f"'{name}' is traced here (a callable mask inside jit?). Pass the mask as arrays, "
            "or call init outside jit.") from None
      if np.size(leaf) > np.iinfo(np.int32).max:
        raise ValueError(f"sparse_state=True: leaf '{name}' has {np.size(leaf)} entries, more "
                         "than int32 positions address.")
      if not flat.size:  # one position past the end: no zero-size arrays (orbax refuses them)
        flat = np.array([np.size(leaf)])
      return jnp.asarray(flat, jnp.int32)

    indices = jax.tree_util.tree_map_with_path(
        lambda path, leaf: positions(_trees.path_name(path), leaf), aligned)
    child = (jax.tree.map(lambda where: jnp.zeros(where.shape), indices) if placeholder
             else _gather(params, indices))
    return ChildTuningSparseState(indices=indices,
                                  inner_state=(adam.init(child), rate.init(child)))

  def update_fn(updates, state, params=None):
    _trees.check_same_structure(state.indices, updates, "the child's positions", "updates")
    adam_state, rate_state = state.inner_state
    child, adam_state = adam.update(_gather(updates, state.indices), adam_state)
    if decays:
      if params is None:
        raise ValueError("child_tuning_adamw with weight_decay needs the params: "
                         "tx.update(updates, state, params).")
      flags = _decay_flags(weight_decay_mask, params)
      child = jax.tree.map(lambda u, p, flag: u + weight_decay * p if flag else u,
                           child, _gather(params, state.indices), flags)
    child, rate_state = rate.update(child, rate_state)
    dense = jax.tree.map(
        lambda u, where, like: jnp.zeros(like.size, u.dtype).at[where].set(
            u, indices_are_sorted=True, unique_indices=True, mode="drop").reshape(like.shape),
        child, state.indices, updates)
    return dense, ChildTuningSparseState(indices=state.indices,
                                         inner_state=(adam_state, rate_state))

  return optax.GradientTransformation(init_fn, update_fn)


def _check_mask(mask: Any) -> None:
  """A mask given as a tree is checked at construction; a callable's result at ``init``."""
  if not callable(mask):
    _trees.check_bool_leaves(mask, "mask")


def _mask_for(mask: Any, params: Any) -> Any:
  """The mask (a tree, or a callable of the params) in the params' structure, Python-bool
  leaves expanded; a mask that does not fit is refused naming the leaves."""
  if callable(mask):
    mask = mask(params)
    _trees.check_bool_leaves(mask, "mask(params)")
  return _trees.like(mask, params, "mask", "params")


def _gather(tree: Any, indices: Any) -> Any:
  """Each leaf's entries at ``indices``; a position past the end reads 0."""
  return jax.tree.map(lambda leaf, where: jnp.asarray(leaf).reshape(-1).at[where].get(
      indices_are_sorted=True, unique_indices=True, mode="fill", fill_value=0), tree, indices)


def _decay_flags(weight_decay_mask: Any, params: Any) -> Any:
  """``optax.adamw``'s ``mask`` as one Python bool per leaf of ``params`` (a mask may be a
  prefix of the parameters' tree, or a callable of them)."""
  if weight_decay_mask is None:
    return jax.tree.map(lambda _: True, params)
  given = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask
  full = jax.tree.map(lambda flag, subtree: jax.tree.map(lambda _: flag, subtree), given, params)

  def flag(name, value):
    if np.ndim(value) or isinstance(value, jax.core.Tracer):
      raise TypeError(f"weight_decay_mask leaf '{name}' must be a bool (one per parameter "
                      "leaf) with sparse_state=True.")
    return bool(value)
  return jax.tree.unflatten(jax.tree.structure(params),
                            [flag(name, value) for name, value in _trees.named_leaves(full)])
