"""Pytree helpers and argument checks shared by the transforms, the Fisher estimator and the masks.

Leaves are named by their key path, written ``a/b/0`` (``jax.tree_util.keystr``
with ``simple=True``), in error messages, logs and saved masks. The ``.value``
attribute of a Flax NNX variable is not part of a name, so a leaf of
``nnx.state(model)`` has the name of the same leaf of the Linen version of the
model (or of ``nnx.to_pure_dict``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KeyPath = tuple[Any, ...]


def path_name(path: KeyPath) -> str:
  """``(DictKey('a'), SequenceKey(0))`` -> ``'a/0'``; an NNX variable's trailing ``.value``
  is left out."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


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
  hint = (" Names as childtuning_jax writes them leave out NNX's '.value'; build the mask from "
          "the same parameters (nnx.state(model, nnx.Param), or its nnx.to_pure_dict).")
  raise ValueError(
      f"{name} does not have the structure of {reference_name}; " + "; ".join(details) + "."
      + (hint if missing or extra else ""))


def check_same_shapes(tree: Any, reference: Any, name: str, reference_name: str) -> None:
  """Same structure, and every leaf of ``tree`` has the shape of its ``reference`` leaf."""
  check_same_structure(tree, reference, name, reference_name)
  for (leaf_name, leaf), (_, ref) in zip(named_leaves(tree), named_leaves(reference)):
    if np.shape(leaf) != np.shape(ref):
      raise ValueError(
          f"{name} leaf '{leaf_name}' has shape {np.shape(leaf)}, but the "
          f"{reference_name} leaf has shape {np.shape(ref)}.")


def check_bool_leaves(tree: Any, name: str) -> None:
  """Raises a TypeError naming the first leaf that is neither a boolean array nor a Python
  bool (which stands for the whole leaf, as in optax's masks)."""
  leaves = named_leaves(tree)
  if not leaves:
    raise ValueError(f"{name} has no leaves.")
  for leaf_name, leaf in leaves:
    if isinstance(leaf, (bool, np.bool_)):
      continue
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.bool_):
      raise TypeError(
          f"{name} leaf '{leaf_name}' must be a boolean array or a bool, got "
          f"{dtype if dtype is not None else type(leaf).__name__}; for a 0/1 array, pass "
          "array.astype(bool).")


def is_params_placeholder(params: Any) -> bool:
  """Whether ``params`` is the stand-in ``optax.tree_utils.tree_map_params`` passes to
  ``init`` to find which state leaves are shaped like the parameters."""
  return type(params).__name__ == "_ParamsPlaceholder" and not jax.tree.leaves(params)


def like(tree: Any, reference: Any, name: str, reference_name: str) -> Any:
  """``tree`` rebuilt in the pytree structure of ``reference``, matching leaves by name.

  The same parameters come as a dict, a ``FrozenDict``, an ``nnx.State`` or its
  ``nnx.to_pure_dict``: their leaves have the same names (see :func:`path_name`) but other
  node types. A Python bool leaf of ``tree`` becomes a full array of the reference leaf's
  shape. Raises a ValueError naming the leaves that differ (or the first wrong shape).
  """
  if jax.tree.structure(tree) == jax.tree.structure(reference):
    leaves = [_expand(leaf, ref) for leaf, ref in zip(jax.tree.leaves(tree), jax.tree.leaves(reference))]
    tree = jax.tree.unflatten(jax.tree.structure(reference), leaves)
  else:
    by_name = dict(named_leaves(tree))
    reference_leaves = named_leaves(reference)
    if set(by_name) != {n for n, _ in reference_leaves}:
      check_same_structure(tree, reference, name, reference_name)  # names the difference
    tree = jax.tree.unflatten(jax.tree.structure(reference),
                              [_expand(by_name[n], ref) for n, ref in reference_leaves])
  check_same_shapes(tree, reference, name, reference_name)
  return tree


def _expand(leaf: Any, reference: Any) -> Any:
  return np.full(np.shape(reference), bool(leaf)) if isinstance(leaf, (bool, np.bool_)) else leaf


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


def check_reserve_p(reserve_p: Any) -> Any:
  """``reserve_p`` as a float checked to be in (0, 1], or a scalar floating array as it is
  (``optax.inject_hyperparams`` passes one, possibly traced: it cannot be checked here)."""
  if isinstance(reserve_p, (jax.Array, np.ndarray)) and not isinstance(reserve_p, np.generic):
    if reserve_p.shape or not jnp.issubdtype(reserve_p.dtype, jnp.floating):
      raise TypeError(f"reserve_p must be a float in (0, 1] or a scalar float array, got an "
                      f"array of {reserve_p.dtype}{list(reserve_p.shape)}.")
    return reserve_p
  if isinstance(reserve_p, bool) or not isinstance(reserve_p, (int, float, np.floating, np.integer)):
    raise TypeError(f"reserve_p must be a float in (0, 1], got {reserve_p!r}.")
  if not 0.0 < float(reserve_p) <= 1.0:
    raise ValueError(f"reserve_p must be in (0, 1], got {reserve_p}.")
  return float(reserve_p)


PMAP_RECIPE = (
    "Under jax.pmap (or with one key per device), pass one key and replicate the optimizer "
    "state (flax.jax_utils.replicate): replicas of the same parameters must draw the same "
    "masks. Under jit with sharded parameters each device draws the masks of its own shard "
    "from the one key.")


def canonicalize_key(key: jax.Array | int) -> jax.Array:
  """An int seed (or a scalar integer array, as ``optax.inject_hyperparams`` passes it), a
  typed key or a raw ``uint32`` key -> a typed PRNG key."""
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key(int(key))
  if isinstance(key, (jax.Array, np.ndarray)):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      if key.shape:
        raise ValueError(f"key must be a single PRNG key, got a key array of shape {key.shape}. "
                         + PMAP_RECIPE)
      return key
    if jnp.issubdtype(key.dtype, jnp.integer) and not key.shape:
      return jax.random.key(key)
    if key.dtype == jnp.uint32 and key.ndim == 1 and key.shape[0] == 2:
      return jax.random.wrap_key_data(key)
    if key.dtype == jnp.uint32 and key.ndim >= 2 and key.shape[-1] == 2:
      raise ValueError(f"key must be a single raw key (shape (2,)), got raw keys of shape "
                       f"{key.shape}. " + PMAP_RECIPE)
  raise TypeError(
      "key must be an int seed, a typed key (jax.random.key) or a raw uint32 key "
      f"(jax.random.PRNGKey); got {type(key).__name__} "
      f"{getattr(key, 'dtype', '')}{getattr(key, 'shape', '')}."
  )
