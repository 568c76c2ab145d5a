"""What every kernel file needs: Triton (or a stand-in when it is not installed), and the launch
policy shared by the launchers (where kernels may run, the precision of fp32 dot products,
block sizes).

Kernel files import `triton` and `tl` from here, so that their eager twins stay importable on a
machine without Triton; launching a kernel there raises `TritonUnavailable` with the fix.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:          # the [triton] extra is not installed
    HAVE_TRITON = False

    class _MissingJit:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise TritonUnavailable(triton_missing_message())

    class _TritonStub:
        @staticmethod
        def jit(fn=None, **_):
            return _MissingJit(fn) if fn is not None else _MissingJit

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(0, int(n) - 1).bit_length()

    class _LanguageStub:
        constexpr = None

    triton = _TritonStub()       # type: ignore[assignment]
    tl = _LanguageStub()         # type: ignore[assignment]


class TritonUnavailable(RuntimeError):
    """A Triton kernel was asked for where it cannot run; the message says what to do instead."""


def triton_missing_message() -> str:
    return ("the Triton kernels need the triton package, which is not installed: "
            "pip install 'osrt-fast[triton]' (Linux), or use model.backend: eager")


def interpreting() -> bool:
    """True when kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raises TritonUnavailable unless the kernels can run on these tensors."""
    if not HAVE_TRITON:
        raise TritonUnavailable(triton_missing_message())
    if _recording is not None:
        return
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return
    raise TritonUnavailable(
        f"the Triton kernels run on CUDA GPUs, but the tensors are on {device}; use "
        "model.backend: eager there (TRITON_INTERPRET=1 runs the kernels on the CPU, "
        "for testing only: it is very slow)")


# Dtypes the kernels accept; they compute in fp32 and store in the input dtype.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtypes(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors:
        if t.dtype != dtype:
            raise TypeError(f"all inputs must have one dtype, got {t.dtype} and {dtype}")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    return dtype


def dot_settings(dtype: torch.dtype) -> dict:
    """Constexprs for the `tl.dot`s of a launch.

    LOWP: operands go to the tensor cores in the input dtype (bf16/fp16), accumulating in fp32.
    In the interpreter they are upcast to fp32 instead (its bf16 arithmetic is not faithful).
    PRECISION: fp32 operands use 3xTF32 (about fp32 accuracy) unless the user allowed TF32 for
    matrix products (`torch.backends.cuda.matmul.allow_tf32`), as cuBLAS does for the eager path.
    """
    if interpreting():
        return {"LOWP": False, "PRECISION": "ieee"}
    if dtype == torch.float32:
        return {"LOWP": False, "PRECISION": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"}
    return {"LOWP": True, "PRECISION": "tf32"}


def pow2_at_least(n: int, floor: int = 16) -> int:
    """The block size covering n: a power of two, at least `floor` (tl.dot needs 16)."""
    return max(floor, triton.next_power_of_2(int(n)))


# ----------------------------------------------------------------------------------------------
# Outputs: launchers allocate every output and workspace through `new_tensor`, so that tests can
# fill them with NaN first and see any element a kernel failed to write.

_poison = False


def new_tensor(shape, device, dtype) -> torch.Tensor:
    if _poison:
        return torch.full(tuple(shape), float("nan"), device=device, dtype=dtype)
    return torch.empty(tuple(shape), device=device, dtype=dtype)


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    """Within it, kernel outputs and workspaces start as NaN instead of uninitialised memory."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


# ----------------------------------------------------------------------------------------------
# Launching, and recording launches for ahead-of-time compilation (kernels/aot.py)

_recording = None


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), or, inside `recording_launches()`, only noted down."""
    if _recording is not None:
        _recording.append((kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording_launches():
    """Within it, launchers run on any tensors (CPU ones too) but launch nothing: each launch is
    appended to the yielded list as (kernel, grid, args, kwargs). Outputs stay uninitialised."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous
