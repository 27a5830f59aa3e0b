"""Several processes (hosts) as one run: start-up, and every process stopping when one does.

``--jax_distributed`` starts JAX's distributed runtime: detected on TPU pods and
under SLURM, or given by ``--coordinator_address``/``--num_processes``/``--process_id``.
The processes then meet in every training step's collectives, so a process
that stops alone would leave the others waiting in a collective for ever.
Two things prevent that:

* a process that fails (an exception, or a signal outside the training loop)
  writes why into the runtime's key-value store before it exits;
* every process runs a watchdog thread that, once a second, counts up a
  heartbeat key of its own and reads the failure key and the others'
  heartbeats; on a failure, or a process whose heartbeat has not moved for
  ``--heartbeat_timeout_seconds``, it logs which process and why, and ends its
  own process at once. (JAX's own heartbeat check, which aborts the process
  with a C++ stack trace, is the backstop: it gets four times that plus 10 s,
  because it was seen to fire half its timeout after a process died.)

A signal inside the training loop needs neither: the processes agree in the
step itself and stop together after the same step (``trainer.train_loop``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import jax

logger = logging.getLogger(__name__)

FAILED_KEY = "childtuning_jax/failed"
ALIVE_KEY = "childtuning_jax/alive/"  # + process index: a counter each process's watchdog bumps
POLL_SECONDS = 1.0
# This process has finished, or failed and said so: its watchdog stands down (the runtime
# may go away now, as process 0's does when it exits).
_standing_down = threading.Event()


def initialize(args) -> None:
  """``jax.distributed.initialize`` with the flags' settings, then the watchdog; nothing for a
  single process."""
  if not args.jax_distributed:
    return
  # JAX's coordination service declared a killed process dead 5 s after the kill with a
  # 10 s timeout, aborting this process before the watchdog (5 s) spoke: its timeout must
  # be well over twice the watchdog's.
  settings = {"heartbeat_timeout_seconds": 4 * args.heartbeat_timeout_seconds + 10}
  if args.coordinator_address is not None:
    settings.update(coordinator_address=args.coordinator_address,
                    num_processes=args.num_processes, process_id=args.process_id)
  try:
    jax.distributed.initialize(**settings)
  except (RuntimeError, ValueError) as error:
    raise RuntimeError(
        f"--jax_distributed could not start: {error}. Where JAX does not detect the cluster "
        "(TPU pods and SLURM are detected), pass --coordinator_address HOST:PORT (process 0's "
        "address), --num_processes N and --process_id I, and start the same command on every "
        "host.") from None
  logger.info("process %d of %d, %d of %d devices local", jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count())
  client = _client()
  if client is not None and jax.process_count() > 1:
    threading.Thread(target=_watch, args=(client, args.heartbeat_timeout_seconds),
                     name="childtuning-watchdog", daemon=True).start()


def report_failure(error: BaseException) -> None:
  """Tells the other processes that this one stops (they end theirs at once)."""
  client = _client()
  if client is None or jax.process_count() == 1:
    return
  reason = f"process {jax.process_index()} stopped: {type(error).__name__}: {error}"
  _standing_down.set()
  try:
    client.key_value_set(FAILED_KEY, reason)
  except Exception:  # the runtime is already gone: the others see the missing heartbeat
    pass


def finished() -> None:
  """The run is over on this process: the watchdog no longer treats an unreachable runtime
  as a failure."""
  _standing_down.set()


def exit_now(code: int) -> None:
  """Ends a process of a multi-process run without JAX's shutdown barrier, which waits for
  processes that may already be gone."""
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _client():
  """The distributed runtime's client, or None (single process, or a JAX without it)."""
  try:
    from jax._src import distributed as jax_distributed
  except ImportError:
    return None
  return getattr(jax_distributed.global_state, "client", None)


def _watch(client, timeout: float) -> None:
  me, count = jax.process_index(), jax.process_count()
  beats = 0
  last_seen = {index: (None, time.monotonic()) for index in range(count) if index != me}
  while not _standing_down.is_set():
    beats += 1
    reason = None
    try:
      client.key_value_set(f"{ALIVE_KEY}{me}", str(beats), allow_overwrite=True)
      try:
        reason = client.key_value_try_get(FAILED_KEY)
      except Exception:  # NOT_FOUND: nobody has failed
        pass
      alive = dict(client.key_value_dir_get(ALIVE_KEY))
    except Exception as error:  # process 0, which holds the store, is gone
      reason = reason or f"the distributed runtime on process 0 is unreachable ({error})"
    else:
      now = time.monotonic()
      for index, (beat, since) in last_seen.items():
        value = alive.get(f"{ALIVE_KEY}{index}")
        if value != beat:
          last_seen[index] = (value, now)
        elif now - since > timeout:
          reason = reason or (f"process {index} has sent no heartbeat for {timeout:g} s (killed, "
                              "crashed or unreachable)")
    if reason is not None and not _standing_down.is_set():
      logger.error("%s. Process %d stops too; to continue, start the same command with --resume "
                   "on every host (it restarts from the last checkpoint).", reason, me)
      exit_now(1)
    time.sleep(POLL_SECONDS)
