"""osrt-fast: a fast, faithful implementation of the Object Scene Representation Transformer."""
from .config import Config, ConfigError, load_config  # noqa: F401

from .version import __version__  # noqa: F401


def __getattr__(name):
    # Heavier modules load on first use, so `import osrt_fast` stays cheap.
    if name == "OSRT":
        from .model import OSRT
        return OSRT
    if name in ("load_checkpoint", "save_checkpoint", "CheckpointError"):
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module 'osrt_fast' has no attribute {name!r}")
