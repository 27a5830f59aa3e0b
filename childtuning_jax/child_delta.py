"""The fine-tuned child network as a small file: what CT-D changed, against the pretrained weights.

CT-D trains only the child network, so a fine-tuned model is the pretrained one plus
the child entries that moved. :func:`save_child_delta` writes those entries (their
positions and values); :func:`apply_child_delta` puts them back into the pretrained
parameters, bit for bit. At p=0.1 the file holds about a tenth of the entries, each
as its value and a 4-byte position: about 2p times a float32 parameter file.

The file is an ``.npz``; per leaf ``<name>/positions`` (flat positions, ascending) and
``<name>/values`` (the values' bits), with a JSON record of every leaf's shape, dtype
and a CRC-32 of its pretrained bytes, so that a delta applied to other pretrained
weights is refused rather than silently wrong.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from childtuning_jax import _files, _trees

FORMAT = "childtuning_jax.child_delta/1"


def save_child_delta(path: str | os.PathLike, params: Any, pretrained: Any, mask: Any) -> dict:
  """Writes the entries of the child network (``mask``) where ``params`` differ from
  ``pretrained``.

  Entries outside the child must equal their pretrained values (CT-D keeps them so);
  one that does not is refused. Every entry whose bits changed is written, so the
  rebuild is bit-exact: also a frozen ``-0.0`` that adding CT-D's zero update turned
  into ``0.0`` (the same number). The file is
  written beside ``path`` and renamed into place: a crash leaves no partial file.

  Args:
    path: the ``.npz`` file to write.
    params: the fine-tuned parameters.
    pretrained: the parameters training started from (the same tree).
    mask: the child network (boolean leaves, or a bool per leaf), as given to
      :func:`childtuning_jax.child_tuning_driven`.

  Returns:
    ``{"entries": changed entries written, "parameters": all entries, "bytes": file size}``.

  Raises:
    ValueError: the trees differ (the message names the leaf), or an entry outside
      the child changed.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> from childtuning_jax import apply_child_delta, save_child_delta
    >>> w0 = {"w": np.zeros(4, np.float32)}
    >>> tuned = {"w": np.array([0.5, 0, 0, -1], np.float32)}
    >>> path = os.path.join(tempfile.mkdtemp(), "child.npz")
    >>> save_child_delta(path, tuned, w0, {"w": np.array([True, True, False, True])})["entries"]
    2
    >>> apply_child_delta(path, w0)["w"]
    array([ 0.5,  0. ,  0. , -1. ], dtype=float32)
  """
  _trees.check_same_structure(pretrained, params, "pretrained", "params")
  _trees.check_same_shapes(pretrained, params, "pretrained", "params")
  _trees.check_bool_leaves(mask, "mask")
  mask = _trees.like(mask, params, "mask", "params")
  arrays, leaves, entries, total = {}, {}, 0, 0
  for (name, tuned), before, keep in zip(_trees.named_leaves(params), jax.tree.leaves(pretrained),
                                         jax.tree.leaves(mask)):
    tuned, before = np.asarray(tuned), np.asarray(before)
    if tuned.dtype != before.dtype:
      raise ValueError(f"params leaf '{name}' is {tuned.dtype}, pretrained is {before.dtype}.")
    changed = _bits(tuned) != _bits(before)  # bits: -0.0 against 0.0 and NaNs count as changes
    keep = np.asarray(keep, bool)
    # Outside the child only a zero's sign may change: a frozen -0.0 plus the zero update is 0.0.
    outside = changed & ~keep & (tuned != before)
    if outside.any():
      raise ValueError(
          f"params leaf '{name}' changed at {int(outside.sum())} entries outside the child "
          "network; a child delta holds the child's entries only (was the mask the one "
          "training used, with child_tuning_driven freezing the rest?).")
    positions = np.flatnonzero(changed).astype(np.uint32 if tuned.size < 2**32 else np.uint64)
    arrays[f"{name}/positions"] = positions
    arrays[f"{name}/values"] = _bits(tuned).reshape(-1)[positions]
    leaves[name] = {"shape": list(tuned.shape), "dtype": tuned.dtype.name,
                    "pretrained_crc32": zlib.crc32(np.ascontiguousarray(before).view(np.uint8))}
    entries += positions.size
    total += tuned.size
  if len(leaves) != len(jax.tree.leaves(params)):
    raise ValueError("two leaves of params have the same path name; cannot save them by name.")
  arrays["__record__"] = np.frombuffer(json.dumps({"format": FORMAT, "leaves": leaves}).encode(),
                                       np.uint8)
  path = Path(path)

  def write(partial: Path) -> None:
    with open(partial, "wb") as file:
      np.savez(file, **arrays)
  _files.write_atomically(path, write)
  return {"entries": entries, "parameters": total, "bytes": path.stat().st_size}


def apply_child_delta(path: str | os.PathLike, pretrained: Any) -> Any:
  """The fine-tuned parameters: ``pretrained`` with the entries of a
  :func:`save_child_delta` file put back (bit-exact).

  Leaves are matched by name (a file written from a dict applies to a
  ``FrozenDict`` or an NNX state of the same parameters). ``pretrained`` is not
  changed; the result's leaves are new arrays (``jax.Array`` where ``pretrained``'s
  are).

  Raises:
    ValueError: the file is not a child delta, or its leaves, shapes, dtypes or the
      pretrained weights' checksums differ from ``pretrained`` (the message names
      the leaf).

  Examples:
    >>> import os, tempfile, jax.numpy as jnp
    >>> from childtuning_jax import apply_child_delta, save_child_delta
    >>> w0 = {"b": jnp.zeros(2), "w": jnp.ones((2, 2))}
    >>> tuned = {"b": jnp.array([0.0, 0.25]), "w": jnp.ones((2, 2))}
    >>> path = os.path.join(tempfile.mkdtemp(), "child.npz")
    >>> _ = save_child_delta(path, tuned, w0, {"b": True, "w": False})
    >>> apply_child_delta(path, w0)["b"]
    Array([0.  , 0.25], dtype=float32)
  """
  with np.load(path) as stored:
    if "__record__" not in stored.files:
      raise ValueError(f"{os.fspath(path)} is not a child delta (no record of its leaves).")
    record = json.loads(stored["__record__"].tobytes())
    if record.get("format") != FORMAT:
      raise ValueError(f"{os.fspath(path)} is a {record.get('format')!r} file; this version "
                       f"reads {FORMAT!r}.")
    leaves = record["leaves"]
    names = [name for name, _ in _trees.named_leaves(pretrained)]
    missing = [name for name in names if name not in leaves]
    extra = [name for name in leaves if name not in names]
    if missing or extra:
      raise ValueError(f"{os.fspath(path)} does not fit these parameters: missing leaves "
                       f"{missing[:5]}, unexpected leaves {extra[:5]}.")
    rebuilt = []
    for name, before in zip(names, jax.tree.leaves(pretrained)):
      want, array = leaves[name], np.asarray(before)
      if list(array.shape) != want["shape"] or array.dtype.name != want["dtype"]:
        raise ValueError(f"pretrained leaf '{name}' is {array.dtype.name}{list(array.shape)}; the "
                         f"delta was made from {want['dtype']}{want['shape']}.")
      if zlib.crc32(np.ascontiguousarray(array).view(np.uint8)) != want["pretrained_crc32"]:
        raise ValueError(
            f"pretrained leaf '{name}' is not the one the delta was made from (its checksum "
            "differs). Apply the delta to the same pretrained parameters (for a trainer run, "
            "load_pretrained(model, num_labels, seed=<the run's --seed>), whose new head "
            "depends on the seed).")
      bits = _bits(array).reshape(-1).copy()
      bits[stored[f"{name}/positions"]] = stored[f"{name}/values"]
      tuned = bits.view(array.dtype).reshape(array.shape)
      rebuilt.append(jnp.asarray(tuned) if isinstance(before, jax.Array) else tuned)
  return jax.tree.unflatten(jax.tree.structure(pretrained), rebuilt)


def _bits(array: np.ndarray) -> np.ndarray:
  """The array's bits as unsigned integers of its item size (bool as uint8)."""
  return np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")
