"""Pytree helpers and argument checks shared by the transforms, the Fisher estimator and the masks.

Leaves are named by their key path, written ``a/b/0`` (``jax.tree_util.keystr``
with ``simple=True``), in error messages, logs and saved masks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KeyPath = tuple[Any, ...]


def path_name(path: KeyPath) -> str:
  """``(DictKey('a'), SequenceKey(0))`` -> ``'a/0'``."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
  """``[(path_name, leaf), ...]`` in ``jax.tree.leaves`` order."""
  return [(path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_same_structure(tree: Any, reference: Any, name: str, reference_name: str) -> None:
  """Raises a ValueError naming the leaves that ``tree`` and ``reference`` do not share."""
  if jax.tree.structure(tree) == jax.tree.structure(reference):
    return
  names = {n for n, _ in named_leaves(tree)}
  reference_names = {n for n, _ in named_leaves(reference)}
  missing = sorted(reference_names - names)
  extra = sorted(names - reference_names)
  details = []
  if missing:
    details.append(f"missing from {name}: {_short_list(missing)}")
  if extra:
    details.append(f"in {name} but not in {reference_name}: {_short_list(extra)}")
  if not details:  # same leaf names, different node types (e.g. dict vs FrozenDict)
    details.append(f"{jax.tree.structure(tree)} vs {jax.tree.structure(reference)}")
  raise ValueError(
      f"{name} does not have the structure of {reference_name}; " + "; ".join(details) + ".")


def check_same_shapes(tree: Any, reference: Any, name: str, reference_name: str) -> None:
  """Same structure, and every leaf of ``tree`` has the shape of its ``reference`` leaf."""
  check_same_structure(tree, reference, name, reference_name)
  for (leaf_name, leaf), (_, ref) in zip(named_leaves(tree), named_leaves(reference)):
    if np.shape(leaf) != np.shape(ref):
      raise ValueError(
          f"{name} leaf '{leaf_name}' has shape {np.shape(leaf)}, but the "
          f"{reference_name} leaf has shape {np.shape(ref)}.")


def check_bool_leaves(tree: Any, name: str) -> None:
  """Raises a TypeError naming the first leaf that is not a boolean array."""
  leaves = named_leaves(tree)
  if not leaves:
    raise ValueError(f"{name} has no leaves.")
  for leaf_name, leaf in leaves:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.bool_):
      raise TypeError(
          f"{name} leaf '{leaf_name}' must be a boolean array, got "
          f"{dtype if dtype is not None else type(leaf).__name__}.")


def leaf_flags(flags: Any, tree: Any, name: str) -> list[bool]:
  """One bool per leaf of ``tree`` from a prefix pytree of bools or a callable on the key path.

  ``None`` means False everywhere; a callable is called as ``flags(path)``
  with the leaf's key path (``jax.tree_util.keystr(path)`` turns it into a
  string).
  """
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  if flags is None:
    return [False] * len(paths)
  if callable(flags):
    return [bool(flags(path)) for path in paths]
  try:
    full = jax.tree.map(lambda flag, subtree: jax.tree.map(lambda _: bool(flag), subtree),
                        flags, tree)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f"{name} must be a prefix pytree of bools of the parameters (or a callable on the "
        f"key path): {error}") from None
  return jax.tree.leaves(full)


def _short_list(names: list[str], limit: int = 5) -> str:
  shown = ", ".join(f"'{n}'" for n in names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_reserve_p(reserve_p: float) -> float:
  """``reserve_p`` as a float, or a TypeError/ValueError unless it is a number in (0, 1]."""
  if isinstance(reserve_p, bool) or not isinstance(reserve_p, (int, float, np.floating, np.integer)):
    raise TypeError(f"reserve_p must be a float in (0, 1], got {reserve_p!r}.")
  if not 0.0 < float(reserve_p) <= 1.0:
    raise ValueError(f"reserve_p must be in (0, 1], got {reserve_p}.")
  return float(reserve_p)


def canonicalize_key(key: jax.Array | int) -> jax.Array:
  """An int seed, a typed key or a raw ``uint32`` key -> a typed PRNG key."""
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key(int(key))
  if isinstance(key, (jax.Array, np.ndarray)):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      if key.shape:
        raise ValueError(f"key must be a single PRNG key, got a key array of shape {key.shape}.")
      return key
    if key.dtype == jnp.uint32 and key.ndim == 1:
      return jax.random.wrap_key_data(key)
  raise TypeError(
      "key must be an int seed, a typed key (jax.random.key) or a raw uint32 key "
      f"(jax.random.PRNGKey); got {type(key).__name__} "
      f"{getattr(key, 'dtype', '')}{getattr(key, 'shape', '')}."
  )
