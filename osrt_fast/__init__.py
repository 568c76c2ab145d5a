"""osrt-fast: a fast, faithful implementation of the Object Scene Representation Transformer.

The Triton kernels are the subpackage `osrt_fast.kernels`. The repository keeps them in `kernels/`
at its top, beside `osrt_fast/`; an install puts them at `osrt_fast/kernels` (pyproject.toml's
package-dir), so no top-level `kernels` package is installed to clash with another distribution's.
In a clone run without installing, `_kernels_beside` gives the folder that name.
"""
import importlib.util as _util
import os as _os
import sys as _sys

from .config import Config, ConfigError, load_config  # noqa: F401

from .version import __version__  # noqa: F401


def _kernels_beside() -> None:
    """Registers the clone's kernels/ as osrt_fast.kernels where osrt_fast/kernels is absent."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    folder = _os.path.join(_os.path.dirname(here), "kernels")
    init = _os.path.join(folder, "__init__.py")
    if _os.path.isdir(_os.path.join(here, "kernels")) or not _os.path.isfile(init):
        return
    spec = _util.spec_from_file_location(f"{__name__}.kernels", init,
                                         submodule_search_locations=[folder])
    module = _util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_kernels_beside()


def __getattr__(name):
    # Heavier modules load on first use, so `import osrt_fast` stays cheap.
    if name == "OSRT":
        from .model import OSRT
        return OSRT
    if name in ("load_checkpoint", "save_checkpoint", "CheckpointError"):
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module 'osrt_fast' has no attribute {name!r}")
