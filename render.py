"""Render videos of scenes: `python render.py CONFIG --sceneid N --motion rotate` (the reference's
flags; see docs/usage.md and osrt_fast/render.py)."""
import sys

from osrt_fast.render import main

if __name__ == "__main__":
    sys.exit(main())
