"""Choosing the Child-Tuning-D child network, and small tools around masks.

A mask is a pytree of boolean arrays with the parameters' structure: ``True``
marks entries in the child network (updated), ``False`` entries that keep
their pretrained values.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from childtuning_jax import _trees

GroupBy = int | Callable[[str], str] | None


def select_child_network(fisher: Any, reserve_p: float, *, always_trainable: Any = None) -> Any:
  """The CT-D child network: the ``reserve_p`` fraction of entries with the largest Fisher.

  One global threshold over all selectable entries of all leaves (paper
  §2.3): exactly ``round(reserve_p * N)`` of the ``N`` selectable entries are
  kept, those with the highest score. Ties are broken deterministically, in
  favour of the entry that comes first in ``jax.tree.leaves`` order and then
  in row-major order. (The published code thresholds at
  ``np.percentile(..., (1 - p) * 100)`` with ``>=``, which keeps an arbitrary
  number of extra entries when scores tie, e.g. when many are zero.)

  Args:
    fisher: a pytree of arrays of scores, usually from
      :func:`childtuning_jax.estimate_fisher`. Any finite values are allowed,
      so ``-fisher`` selects the lowest-Fisher child (an ablation of the
      paper's Table 5).
    reserve_p: fraction of the selectable entries to keep, in ``(0, 1]``. The
      paper uses 0.1-0.3.
    always_trainable: leaves that are always trained in full and do not
      compete for the budget, e.g. a freshly initialised classifier head.
      Either a prefix pytree of bools (``{"params": {"classifier": True,
      "bert": False}}``) or a callable ``f(path) -> bool`` on each leaf's key
      path, e.g. ``lambda path: "classifier" in jax.tree_util.keystr(path)``.
      The published code's choice (only encoder layers are masked) is
      ``lambda path: "layer" not in jax.tree_util.keystr(path)``.

  Returns:
    A pytree of boolean arrays (``jax.Array``) with the structure and shapes
    of ``fisher``. The selection runs where the Fisher is, with its shardings
    (an exact threshold search: no host copy of the scores).

  Raises:
    ValueError: if ``reserve_p`` is outside ``(0, 1]``, a score is NaN or
      infinite (the message names the leaf), or ``always_trainable`` does not
      fit the tree.

  Examples:
    >>> import numpy as np
    >>> from childtuning_jax import select_child_network
    >>> fisher = {"a": np.array([0.1, 0.9, 0.5]), "head": np.array([0.0, 0.0])}
    >>> mask = select_child_network(fisher, 2 / 3, always_trainable={"a": False, "head": True})
    >>> mask["a"].tolist(), mask["head"].tolist()
    ([False, True, True], [True, True])

  References:
    Xu et al., "Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning", EMNLP 2021, §2.3, Eq. 10.
  """
  reserve_p = _trees.check_reserve_p(reserve_p)
  named = _trees.named_leaves(fisher)
  if not named:
    raise ValueError("fisher has no leaves.")
  always = _trees.leaf_flags(always_trainable, fisher, "always_trainable")
  competing = [jnp.asarray(leaf, jnp.float32) for (_, leaf), dense in zip(named, always)
               if not dense]
  finite = np.asarray(_all_finite(competing)) if competing else np.ones(0, bool)
  names = [name for (name, _), dense in zip(named, always) if not dense]
  for name, ok in zip(names, finite):
    if not ok:
      raise ValueError(f"fisher leaf '{name}' contains NaN or infinite values.")
  size = sum(int(np.prod(np.shape(leaf), dtype=np.int64)) for leaf in competing)
  chosen = iter(_top_k_stable(competing, round(reserve_p * size), size))
  masks = [jnp.ones(np.shape(leaf), bool) if dense else next(chosen)
           for (_, leaf), dense in zip(named, always)]
  return jax.tree.unflatten(jax.tree.structure(fisher), masks)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def _order_keys(values: jax.Array) -> jax.Array:
  """uint32 keys in the order of the float32 ``values`` (-0.0 and 0.0 one key, as they
  compare equal)."""
  bits = jax.lax.bitcast_convert_type(jnp.where(values == 0, 0.0, values), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


@jax.jit
def _counts_from(leaves: list[jax.Array], key: jax.Array) -> jax.Array:
  """Per leaf, how many of its entries have an order key of at least ``key`` (int32: a
  leaf has fewer than 2**31 entries; the totals are summed on the host)."""
  return jnp.stack([jnp.sum(_order_keys(leaf) >= key, dtype=jnp.int32) for leaf in leaves])


@jax.jit
def _keep(leaves: list[jax.Array], threshold: jax.Array, ties: jax.Array) -> list[jax.Array]:
  """Each leaf's entries above ``threshold``, and its first ``ties[i]`` entries equal to it."""
  masks = []
  for leaf, take in zip(leaves, ties):
    keys = _order_keys(leaf)
    tie = keys == threshold
    rank = jnp.cumsum(tie.reshape(-1), dtype=jnp.int32).reshape(leaf.shape)
    masks.append((keys > threshold) | (tie & (rank <= take)))
  return masks


def _top_k_stable(leaves: list[jax.Array], k: int, size: int) -> list[jax.Array]:
  """Boolean masks of the ``k`` largest of all the leaves' entries; among equal values the
  entry of the earlier leaf, then the lower row-major index, wins.

  On the leaves' devices, with their shardings: the ``k``-th largest value is found by a
  binary search over the 32 bits of an order-preserving key (32 counting passes), so no
  host copy of the scores is needed, however many there are.
  """
  if k <= 0 or k >= size:
    return [jnp.full(leaf.shape, k > 0) for leaf in leaves]
  total = lambda key: int(np.asarray(_counts_from(leaves, jnp.uint32(key)), np.int64).sum())
  threshold = 0
  for bit in reversed(range(32)):  # the largest key with at least k entries at or above it
    if total(threshold | 1 << bit) >= k:
      threshold |= 1 << bit
  at_least = np.asarray(_counts_from(leaves, jnp.uint32(threshold)), np.int64)
  above = (np.asarray(_counts_from(leaves, jnp.uint32(threshold + 1)), np.int64)
           if threshold < (1 << 32) - 1 else np.zeros(len(leaves), np.int64))
  ties = at_least - above
  needed = k - int(above.sum())  # ties to take, in leaf order
  before = np.concatenate([[0], np.cumsum(ties)[:-1]])
  take = np.clip(needed - before, 0, ties)
  return _keep(leaves, jnp.uint32(threshold), jnp.asarray(take, jnp.int32))


def keep_fractions(mask: Any, group_by: GroupBy = None) -> dict[str, float]:
  """Fraction of entries kept, per leaf or per group of leaves.

  Args:
    mask: a boolean pytree.
    group_by: ``None`` for one entry per leaf; an int ``d`` to group leaves
      by the first ``d`` parts of their path (``"params/encoder/layer_3"``
      for ``d=3``); or a callable from the leaf's path name (``"a/b/c"``) to
      a group name. Groups are weighted by their number of entries.

  Returns:
    ``{name: fraction}`` in leaf order.

  Examples:
    >>> import numpy as np
    >>> from childtuning_jax import keep_fractions
    >>> mask = {"layer_0": {"w": np.array([True, False]), "b": np.array([True])},
    ...         "layer_1": {"w": np.array([False, False])}}
    >>> keep_fractions(mask)
    {'layer_0/b': 1.0, 'layer_0/w': 0.5, 'layer_1/w': 0.0}
    >>> keep_fractions(mask, group_by=1)
    {'layer_0': 0.666..., 'layer_1': 0.0}
    >>> keep_fractions(mask, group_by=lambda name: "all")
    {'all': 0.4}
  """
  if group_by is None:
    group_of = lambda name: name
  elif isinstance(group_by, int) and not isinstance(group_by, bool):
    group_of = lambda name: "/".join(name.split("/")[:group_by])
  elif callable(group_by):
    group_of = group_by
  else:
    raise TypeError(f"group_by must be None, an int or a callable, got {group_by!r}.")
  kept: dict[str, int] = defaultdict(int)
  total: dict[str, int] = defaultdict(int)
  for name, leaf in _trees.named_leaves(mask):
    leaf = np.asarray(leaf)
    group = group_of(name)
    kept[group] += int(np.count_nonzero(leaf))
    total[group] += leaf.size
  return {group: kept[group] / total[group] if total[group] else 0.0 for group in total}


def mask_jaccard(mask_a: Any, mask_b: Any) -> float:
  """Jaccard overlap |A ∩ B| / |A ∪ B| of two masks of the same shapes (paper §4.5).

  Two empty masks have overlap 1.

  Examples:
    >>> import numpy as np
    >>> from childtuning_jax import mask_jaccard
    >>> mask_jaccard({"w": np.array([True, True, False])}, {"w": np.array([True, False, True])})
    0.333...
  """
  _trees.check_same_shapes(mask_a, mask_b, "mask_a", "mask_b")
  intersection = union = 0
  for a, b in zip(jax.tree.leaves(mask_a), jax.tree.leaves(mask_b)):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    intersection += int(np.count_nonzero(a & b))
    union += int(np.count_nonzero(a | b))
  return intersection / union if union else 1.0


def save_mask(path: str | os.PathLike, mask: Any) -> None:
  """Writes a boolean mask to a ``.npz`` file keyed by leaf path (``"params/bert/..."``).

  Examples:
    >>> import os, tempfile, numpy as np
    >>> from childtuning_jax import save_mask, load_mask
    >>> mask = {"w": np.array([True, False])}
    >>> path = os.path.join(tempfile.mkdtemp(), "mask.npz")
    >>> save_mask(path, mask)
    >>> load_mask(path, like=mask)["w"]
    array([ True, False])
  """
  _trees.check_bool_leaves(mask, "mask")
  arrays = dict((name, np.asarray(leaf)) for name, leaf in _trees.named_leaves(mask))
  if len(arrays) != len(jax.tree.leaves(mask)):
    raise ValueError("two leaves of the mask have the same path name; cannot save it by name.")
  with open(path, "wb") as file:
    np.savez_compressed(file, **arrays)


def load_mask(path: str | os.PathLike, like: Any) -> Any:
  """Reads a mask written by :func:`save_mask` into the structure of ``like`` (e.g. the params).

  Leaves are matched by name, and names leave out Flax NNX's ``.value``: a mask saved from
  the Linen version of a model loads into ``nnx.state(model, nnx.Param)`` of its NNX
  version, and the other way round.

  Raises:
    ValueError: if the file lacks a leaf of ``like``, has leaves ``like``
      does not, or a leaf's shape differs; the message names the leaf.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> from childtuning_jax import save_mask, load_mask
    >>> path = os.path.join(tempfile.mkdtemp(), "mask.npz")
    >>> save_mask(path, {"w": np.array([True, False])})
    >>> load_mask(path, like={"w": np.zeros(2)})["w"]
    array([ True, False])
    >>> load_mask(path, like={"w": np.zeros(3)})
    Traceback (most recent call last):
    ...
    ValueError: ...
  """
  with np.load(path) as data:
    stored = {name: data[name] for name in data.files}
  names = [name for name, _ in _trees.named_leaves(like)]
  missing = [name for name in names if name not in stored]
  extra = sorted(set(stored) - set(names))
  if missing or extra:
    raise ValueError(
        f"mask file {os.fspath(path)} does not fit: missing leaves {missing[:5]}, "
        f"unexpected leaves {extra[:5]}.")
  shapes = dict((name, np.shape(leaf)) for name, leaf in _trees.named_leaves(like))
  leaves = [np.full(shapes[name], bool(stored[name])) if stored[name].ndim == 0 and shapes[name]
            else stored[name] for name in names]  # a bool saved for a whole leaf
  mask = jax.tree.unflatten(jax.tree.structure(like), leaves)
  _trees.check_same_shapes(mask, like, f"mask file {os.fspath(path)}", "like")
  _trees.check_bool_leaves(mask, f"mask file {os.fspath(path)}")
  return mask

