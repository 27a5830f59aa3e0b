"""Orbax checkpoints of the whole train state, for exact resume.

A checkpoint is ``<output_dir>/checkpoints/<step>/`` (orbax's CheckpointManager
layout) with two items: ``state`` (the train-state pytree: step, parameters,
optimizer state with the CT-F key or the CT-D mask, dropout key) and
``metadata`` (JSON: the run's flags and the step). Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint as the latest usable one.

Typed PRNG keys cannot be written as arrays (nor placed on a sharding that
spans processes); they are saved as their key data and re-wrapped on restore,
using the key type of the state restored into.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


def manager(directory: str | Path, max_to_keep: int | None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                               item_names=("state", "metadata"))


def _is_typed_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def key_data(tree: Any) -> Any:
  """``tree`` with every typed PRNG key replaced by its key data (a uint32 array)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def wrap_keys(data: Any, like: Any) -> Any:
  """Undoes :func:`key_data`: the leaves where ``like`` holds a typed key become keys again."""
  return jax.tree.map(
      lambda value, reference: (jax.random.wrap_key_data(value, impl=jax.random.key_impl(reference))
                                if _is_typed_key(reference) else value), data, like)


def place(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """``jax.device_put(tree, sharding)``, also for typed PRNG keys on a sharding that spans
  several processes (which ``device_put`` refuses for keys)."""
  return wrap_keys(jax.device_put(key_data(tree), sharding), tree)


def save(checkpoints: ocp.CheckpointManager, step: int, state: Any, metadata: dict) -> None:
  """Starts writing ``state`` at ``step`` in the background (``checkpoints.wait_until_finished()``
  blocks until it is on disk)."""
  checkpoints.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(key_data(state)), metadata=ocp.args.JsonSave(metadata)),
                   force=True)


def restore_latest(checkpoints: ocp.CheckpointManager, like: Any) -> tuple[Any, dict] | None:
  """``(state, metadata)`` of the latest complete checkpoint, placed like ``like``
  (same structure, shapes, dtypes and shardings); ``None`` if there is none."""
  step = checkpoints.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, key_data(like))
  restored = checkpoints.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore()))
  state = wrap_keys(restored["state"], like)
  logger.info("restored the checkpoint of step %d from %s", step, checkpoints.directory)
  return state, restored["metadata"]


def latest_metadata(checkpoints: ocp.CheckpointManager) -> dict | None:
  """The ``metadata`` item (flags, step) of the latest complete checkpoint, without its state."""
  step = checkpoints.latest_step()
  if step is None:
    return None
  return checkpoints.restore(step, args=ocp.args.Composite(
      metadata=ocp.args.JsonRestore()))["metadata"]


def has_checkpoint(directory: str | Path) -> bool:
  """Whether ``directory`` holds a complete checkpoint (a ``<step>/`` directory; orbax writes
  into a temporary name and renames it when done), without creating anything."""
  directory = Path(directory)
  return directory.is_dir() and any(p.is_dir() and p.name.isdigit() for p in directory.iterdir())


def latest_params(directory: str | Path) -> Any:
  """The parameters in the latest checkpoint under ``directory`` (a run's
  ``<output_dir>/checkpoints``) as numpy arrays, without building the rest of the
  train state (e.g. to probe or export a fine-tuned model)."""
  checkpoints = manager(directory, None)
  step = checkpoints.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  restored = checkpoints.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  checkpoints.close()
  return restored["state"]["params"]
