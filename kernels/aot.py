"""Compile the kernels for a GPU ahead of time, on a machine without one.

The launchers are run inside `recording_launches()` (on CPU tensors; nothing executes), and each
recorded launch is compiled for the target architecture with the same specialisation Triton's
JIT gives it at run time (constexprs, 16-divisible integers and aligned pointers), through the
ptxas bundled with Triton. The report says, per kernel, whether it compiled, its registers,
spill stack, shared memory, and whether Hopper's wgmma instructions are in it.

    python -m osrt_fast.kernels.aot [--arch 90] [--dtype bf16 fp32] [--shapes paper small] [--json FILE]

Not usable under TRITON_INTERPRET=1 (the interpreter replaces the compiler); the tests run it in
a subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

from ._triton import HAVE_TRITON, interpreting, recording_launches

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
           torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


@dataclass
class CompileReport:
    kernel: str
    dtype: str
    constexprs: dict
    num_warps: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    wgmma: bool
    ok: bool
    error: str = ""


def _signature(kernel, args, kwargs):
    """Triton signature, constexprs and divisibility attributes of one recorded launch."""
    fn = kernel.fn if hasattr(kernel, "fn") and not hasattr(kernel, "arg_names") else kernel
    names = fn.arg_names
    params = {p.name: p for p in fn.params}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in params})
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = values[name]
        if params[name].is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif torch.is_tensor(value):
            signature[name] = "*" + _DTYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0 and value != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    options = {k: v for k, v in kwargs.items() if k not in params}
    return fn, signature, constexprs, attrs, options


def _resources(cubin: bytes) -> dict:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in fields.items()}


def compile_launch(kernel, args, kwargs, arch: int = 90) -> CompileReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs, options = _signature(kernel, args, kwargs)
    dtype = next((s[1:] for s in signature.values() if s.startswith("*") and "f" in s), "-")
    shown = {k: (str(v) if not isinstance(v, (int, float, bool, str)) else v) for k, v in constexprs.items()}
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        res = _resources(compiled.asm["cubin"])
        return CompileReport(fn.__name__, dtype, shown, options.get("num_warps", 4), res.get("REG", -1),
                             res.get("STACK", -1), res.get("LOCAL", -1),
                             max(res.get("SHARED", 0), compiled.metadata.shared),
                             "wgmma" in compiled.asm["ptx"], True)
    except Exception as e:     # a report, not a crash: the caller decides what fails
        return CompileReport(fn.__name__, dtype, shown, options.get("num_warps", 4), -1, -1, -1, -1,
                             False, False, f"{type(e).__name__}: {e}"[:2000])


def record(fn, *args, **kwargs) -> list:
    """The launches made by fn(*args, **kwargs) (forward, and backward where outputs need grad)."""
    with recording_launches() as launches:
        out = fn(*args, **kwargs)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
                if torch.is_tensor(o) and o.requires_grad]
        if outs:
            torch.autograd.backward(outs, [torch.zeros_like(o) for o in outs])
    return launches


def compile_all(launches, arch: int = 90) -> list[CompileReport]:
    seen, reports = set(), []
    for kernel, _grid, args, kwargs in launches:
        fn, signature, constexprs, attrs, options = _signature(kernel, args, kwargs)
        key = (fn.__name__, tuple(signature.items()), tuple(map(str, constexprs.items())),
               tuple(sorted(attrs)), tuple(sorted(options.items())))
        if key not in seen:
            seen.add(key)
            reports.append(compile_launch(kernel, args, kwargs, arch))
    return reports


def op_cases(dtype: torch.dtype, shapes: str):
    """(name, fn, args) for every public op at MSN-Hard ('paper') or odd small ('small') shapes."""
    from . import slot_attention, slot_mixer
    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)

    if shapes == "paper":
        B, K, N, D, R, C, H, F = 2, 32, 1280, 1536, 8192, 180, 12, 1536
    else:
        B, K, N, D, R, C, H, F = 2, 7, 37, 40, 75, 20, 3, 24
    pdt = torch.float32       # parameters (LayerNorm, biases) stay fp32 under autocast
    ln_w, ln_b = t(C).to(pdt).detach().requires_grad_(), t(C).to(pdt).detach().requires_grad_()
    return [
        ("slot_attention_step", slot_attention.slot_attention_step, (t(B, K, D), t(B, N, D), t(B, N, D))),
        ("slot_cross_attention", slot_mixer.slot_cross_attention,
         (t(B, R, C), ln_w, ln_b, t(B, C, H * K), t(B, H * K, C), t(C), H)),
        ("slot_mix_render", slot_mixer.slot_mix_render,
         (t(B, R, C), t(B, R, C), t(B, C, K), t(B, K, F), t(F, C), t(F))),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m osrt_fast.kernels.aot",
                                description="Compile every kernel for a GPU architecture, ahead of time.")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32", "fp16"])
    p.add_argument("--shapes", nargs="+", default=["paper"], choices=["paper", "small"])
    p.add_argument("--json", help="write the reports here as JSON lines")
    args = p.parse_args(argv)
    if not HAVE_TRITON:
        sys.exit("osrt_fast.kernels.aot needs the triton package (pip install 'osrt-fast[triton]')")
    if interpreting():
        sys.exit("osrt_fast.kernels.aot compiles kernels; unset TRITON_INTERPRET")
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
    reports = []
    for shapes in args.shapes:
        for name in args.dtype:
            for op, fn, op_args in op_cases(dtypes[name], shapes):
                for r in compile_all(record(fn, *op_args), args.arch):
                    reports.append({"op": op, "shapes": shapes, **asdict(r)})
    print(f"{'op':22} {'kernel':36} {'dtype':5} {'shapes':6} {'ok':3} {'regs':>4} {'stack':>5} "
          f"{'smem':>6} {'wgmma':5}")
    for r in reports:
        print(f"{r['op']:22} {r['kernel']:36} {r['dtype']:5} {r['shapes']:6} {'yes' if r['ok'] else 'NO':3} "
              f"{r['registers']:>4} {r['stack_bytes']:>5} {r['shared_bytes']:>6} {str(r['wgmma']):5}"
              + (f"  {r['error'][:200]}" if not r["ok"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            for r in reports:
                f.write(json.dumps(r) + "\n")
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
