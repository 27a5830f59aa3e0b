"""Orbax checkpoints of the whole train state, for exact resume: writing them (finite states
only, a full disk said plainly) and resuming them (refused when the flags that shape the
state differ).

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

import contextlib
import errno
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from train import loop

logger = logging.getLogger(__name__)


def manager(directory: str | Path, max_to_keep: int | None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                               item_names=("state", "metadata"))


def is_typed_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def key_data(tree: Any) -> Any:
  """``tree`` with every typed PRNG key replaced by its key data (a uint32 array)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_typed_key(x) else x, tree)


def wrap_keys(data: Any, like: Any) -> Any:
  """Undoes :func:`key_data`: the leaves where ``like`` holds a typed key become keys again."""
  return jax.tree.map(
      lambda value, reference: (jax.random.wrap_key_data(value, impl=jax.random.key_impl(reference))
                                if is_typed_key(reference) else value), data, like)


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


# Flags that change what the train state holds: a checkpoint of another value cannot be resumed.
STATE_FLAGS = ("model_name_or_path", "task_name", "train_file", "mode", "top_k_layers",
               "mixout_p", "recadam_k", "decay_to_pretrained", "max_grad_norm", "weight_decay",
               "sparse_optimizer_state")
# Flags that do not change the result of a resumed run.
IGNORED_ON_RESUME = ("resume", "overwrite_output_dir", "output_dir", "disable_tqdm", "eval_steps",
                     "save_steps", "save_total_limit", "num_devices", "jax_distributed",
                     "coordinator_address", "num_processes", "process_id",
                     "heartbeat_timeout_seconds")
PATH_FLAGS = ("model_name_or_path", "train_file", "validation_file", "extra_eval_files")


def normalized_flags(flags: dict) -> dict:
  """Paths that exist as absolute real paths, so that one file spelled two ways compares equal."""
  def real(value):
    return str(Path(value).resolve()) if isinstance(value, str) and Path(value).exists() else value
  return {name: ([real(v) for v in value] if isinstance(value, list) else real(value))
          if name in PATH_FLAGS else value for name, value in flags.items()}


class Saver:
  """Writes checkpoints of finite states only, and says plainly when writing fails."""

  def __init__(self, manager, flags: dict, batch_size: int):
    self.manager = manager
    self.metadata = {"flags": normalized_flags(flags), "batch_size": batch_size}
    self.last_step = manager.latest_step()

  def save(self, state) -> None:
    step = int(state.step)
    if step == self.last_step:
      return
    if not bool(_all_finite(state.params)):
      raise loop.Diverged(f"after step {step} a parameter is NaN or infinite; it is not saved. "
                     + self.kept())
    # Refused here, a full disk gets one clear message instead of orbax's failing writer threads.
    needed = sum(x.nbytes for x in jax.tree.leaves(key_data(state)))
    free = free_bytes(self.manager.directory)
    if free < 1.1 * needed + 2**16:
      raise OSError(errno.ENOSPC, f"the checkpoint of step {step} needs about "
                    f"{needed / 2**20:.1f} MiB, but {self.manager.directory} has "
                    f"{free / 2**20:.1f} MiB free. {self.kept()} Free space (a lower "
                    "--save_total_limit keeps fewer checkpoints), then continue with --resume")
    with self._errors(step):
      save(self.manager, step, state, {"step": step, **self.metadata})
    self.last_step = step

  def kept(self) -> str:
    return (f"The last checkpoint, of step {self.last_step}, is kept." if self.last_step is not None
            else "No checkpoint was written.")

  def close(self) -> None:
    """Waits for the checkpoint being written in the background, then releases the manager,
    also when that write failed (orbax's writer threads must not outlive the run)."""
    try:
      with self._errors(self.last_step):
        self.manager.wait_until_finished()
    except BaseException:
      with contextlib.suppress(Exception):  # the write's own error is the one to report
        self.manager.close()
      raise
    self.manager.close()

  @contextlib.contextmanager
  def _errors(self, step):
    try:
      yield
    except Exception as error:
      # Orbax (and tensorstore under it) wrap a file system's error (a full disk, a permission)
      # in their own exception types; tensorstore marks it with "os_error_code".
      chain = [error]
      while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
      cause = next((e for e in reversed(chain)
                    if isinstance(e, OSError) or "os_error_code" in str(e)), None)
      if cause is None:
        raise
      raise OSError(f"could not write the checkpoint of step {step} to {self.manager.directory}: "
                    f"{str(cause).splitlines()[0]}. Free space (a lower --save_total_limit keeps "
                    "fewer checkpoints), then continue with --resume (the last complete checkpoint "
                    "is used).") from None


def free_bytes(directory: Path) -> int:
  return shutil.disk_usage(directory).free


@jax.jit
def _all_finite(params) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))


def check_resumable(checkpoints, flags: dict, batch_size: int) -> None:
  """Refuses to resume a checkpoint written with other flags that shape the train state (its
  restore could not work, or would mix two runs); warns about other differences."""
  metadata = latest_metadata(checkpoints) or {}
  saved, current = normalized_flags(metadata.get("flags", {})), normalized_flags(flags)
  changed = {name: (saved[name], current.get(name)) for name in saved
             if name not in IGNORED_ON_RESUME and saved[name] != current.get(name)}
  described = ", ".join(f"--{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())
  blocking = [name for name in changed if name in STATE_FLAGS]
  if blocking:
    raise ValueError(
        f"--resume: the checkpoint in {checkpoints.directory} (step {checkpoints.latest_step()}) "
        f"was written by a run with other flags: {described}. Resume with that run's flags, or "
        "start afresh with --overwrite_output_dir.")
  if "batch_size" in metadata and metadata["batch_size"] != batch_size:
    changed["global batch size"] = (metadata["batch_size"], batch_size)
    described = ", ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changed.items())
  if changed:
    logger.warning("resuming with flags that differ from the checkpoint's run, so the result will "
                   "differ from an uninterrupted run: %s", described)


def restore(checkpoints, state):
  """The latest checkpoint, placed as ``state``; a clear error if it does not fit."""
  try:
    restored, _ = restore_latest(checkpoints, state)
  except Exception as error:  # orbax's message names its internals, not the cause
    raise ValueError(
        f"--resume: the checkpoint of step {checkpoints.latest_step()} in {checkpoints.directory} "
        "does not fit this run's model and optimizer (another model, number of labels or "
        "method, or an optimizer state of another childtuning_jax version?): "
        f"{type(error).__name__}: {str(error).splitlines()[0][:300]}. Resume with the "
        "checkpoint's own model and flags, or start afresh with --overwrite_output_dir.") from None
  return restored
