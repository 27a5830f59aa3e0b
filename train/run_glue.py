"""Fine-tune a pretrained encoder with vanilla fine-tuning, Child-Tuning-F or Child-Tuning-D.

Hugging Face run_glue's flags, plus the published Child-Tuning code's
``--mode`` and ``--reserve_p``::

  python -m train.run_glue --output_dir runs/demo                 # embedded model and data
  python -m train.run_glue --task_name rte --mode ChildTuning-D --reserve_p 0.3 \\
      --model_name_or_path bert-large-cased --output_dir runs/rte  # needs the Hub

``python -m train.run_glue --help`` lists every flag.
"""

import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/run_glue.py`
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from childtuning_jax.cpu import restart_keeping_freed_memory  # noqa: E402
from train import arguments, distributed, loop, trainer  # noqa: E402


def main(argv=None) -> dict:
  logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S", level=logging.INFO, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
  model_args, data_args, training_args = arguments.parse(argv)
  results = trainer.train_and_evaluate(model_args, data_args, training_args)
  for key, value in results.items():
    logging.info("  %s = %s", key, value)
  return results


def cli(argv=None) -> int:
  """:func:`main` as a command: the exit status, 0 for a finished run. A stop on a signal
  exits with 128 + its number (143 for SIGTERM) after one line, as shells report signals;
  an error exits with 1 after its traceback, whose last line names the cause."""
  try:
    main(argv)
    code = 0
  except loop.Stopped as stop:
    logging.warning("%s", stop)
    code = 128 + stop.signum
  except Exception:
    logging.exception("run_glue failed")
    code = 1
  if jax.process_count() > 1 and code:
    # The other processes may be gone already: skip JAX's shutdown barrier, which waits for them.
    distributed.exit_now(code)
  return code


if __name__ == "__main__":
  # Restarts this command with glibc malloc settings under which, on CPU, every step reuses
  # XLA's temporaries instead of page-faulting them in afresh (childtuning_jax/cpu.py).
  restart_keeping_freed_memory()
  sys.exit(cli())
