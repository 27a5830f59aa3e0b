"""``python -m train.experiments``; see the package's docstring."""

import sys

from train.experiments.cli import main

if __name__ == "__main__":
  try:
    main()
  except KeyboardInterrupt:  # after the running trainers saved and stopped (launcher.py)
    sys.exit(130)
