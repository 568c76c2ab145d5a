"""Train OSRT: `python train.py CONFIG` (the reference's flags; see docs/usage.md)."""
import sys

from osrt_fast.trainer import main

if __name__ == "__main__":
    sys.exit(main())
