"""Triton kernels and the blocks built on them, against their eager twins and torch.compile.

    python -m benchmarks.speed.bench_kernels [--only op block render encoder] [--dtype fp32 bf16]
                                             [--repeat 10] [--no-save] [--smoke]

Four groups of rows, each for fp32 (TF32 off: the reference's precision) and bf16:
  op      the public kernels (slot_attention_step, slot_cross_attention, slot_mix_render) at
          MSN-Hard shapes: forward (with autograd recording), backward alone, forward+backward;
          paths "triton", "eager" (the twin) and "compile" (torch.compile of the twin).
  block   the Slot Mixer decoder fwd+bwd at 32 scenes x 8192 rays, K = 32, paper widths
          (eager / triton backend / torch.compile of the eager decoder), and the SlotAttention
          module fwd+bwd on [32, 1280, 768] inputs, K = 32.
  render  one 128x128 frame (16384 rays) from 32 slots: decoder forward under no_grad, frames/s.
  encoder the encoder's 5-block transformer on [32, 1280, 768], fwd+bwd, bf16 only, with
          encoder_attention sdpa vs xformers.
bf16 means bf16 inputs for the ops, and torch.autocast(bfloat16) with bf16 slots / inputs for the
model pieces (camera positions and rays stay fp32, as the data loader gives them).

Times: median and 20/80th percentiles over --repeat calls after warm-up, CUDA events, rotating
among 3 random input sets. Memory: torch.cuda.max_memory_allocated after
reset_peak_memory_stats, minus what was allocated before the timed region (for the blocks
"saved" is also reported: memory held between the end of forward and backward). "x eager" is
the eager path's median / this path's median, measured in the same process.

--smoke runs every group on the CPU at tiny shapes (Triton through its interpreter), one call
each, timed with time.perf_counter; it checks that the script works, its numbers mean nothing.
Rows are appended to benchmarks/results/kernels.jsonl unless --no-save (never with --smoke).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import itertools
import os
import sys
import time
from typing import Any, Callable, Optional

import torch

from benchmarks.common import MSN_HARD_MODEL, TINY_MODEL, append_result, environment, quantiles

# kernels/ and osrt_fast.model are imported in main(), after --smoke has set TRITON_INTERPRET:
# Triton reads it when a kernel is decorated, i.e. when the kernel module is imported.

GROUPS = ("op", "block", "render", "encoder")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
N_INPUT_SETS = 3        # inputs rotate among this many random sets, so no call finds them in L2


# Shapes. B scenes, K slots, N encoder tokens, D slot width, R rays per scene, C = 180 ray
# features, H heads, F render MLP width, L encoder latent width.
# op_D is D for the ops alone (no model to match there).
FULL = dict(B=32, K=32, N=1280, D=1536, R=8192, C=180, H=12, F=1536, L=768, frame_rays=128 * 128,
            op_D=1536)
SMOKE = dict(B=2, K=5, N=37, D=32, R=37, C=180, H=2, F=32, L=32, frame_rays=8 * 8, op_D=24)


# ----------------------------------------------------------------------------------------------
# Timing and memory. One helper per device, kept apart: the CPU one is only for --smoke.

def time_cpu(fn: Callable[[Any], Any], setup: Callable[[], Any], warmup: int = 0,
             repeat: int = 1) -> list[float]:
    """Milliseconds per call of fn(setup()), wall clock; setup is not timed."""
    times = []
    for i in range(warmup + repeat):
        state = setup()
        start = time.perf_counter()
        fn(state)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def time_gpu(fn: Callable[[Any], Any], setup: Callable[[], Any], warmup: int = 3,
             repeat: int = 10) -> list[float]:
    """Milliseconds per call of fn(setup()), CUDA events around fn only (setup's work is queued
    before the start event, so it is not counted)."""
    for _ in range(warmup):
        fn(setup())
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        state = setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(state)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def memory_gpu(forward, backward, setup, mode: str) -> dict:
    """Peak GiB of one call above what was allocated before it, and for fwdbwd the GiB held
    between forward and backward (saved activations + outputs)."""
    state = setup()
    torch.cuda.synchronize()
    if mode == "bwd":
        state = forward(state)          # the forward is not part of the measured region
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    saved = None
    if mode == "bwd":
        backward(state)
    else:
        out = forward(state)
        saved = (torch.cuda.memory_allocated() - before) / 2 ** 30
        if mode == "fwdbwd":
            backward(out)
        del out
    torch.cuda.synchronize()
    rec = {"peak_mem_gib": (torch.cuda.max_memory_allocated() - before) / 2 ** 30}
    if mode == "fwdbwd":
        rec["saved_gib"] = saved
    return rec


# ----------------------------------------------------------------------------------------------
# Cases: one measured thing (group, name, path, dtype, mode)

@dataclasses.dataclass
class Case:
    bench: str                       # op | block | render | encoder
    name: str                        # the op or block
    path: str                        # triton | eager | compile | sdpa | xformers
    dtype: str
    shapes: dict
    setup: Callable[[], Any]         # the next input set (untimed)
    forward: Callable[[Any], Any]    # inputs -> whatever backward needs
    backward: Optional[Callable[[Any], Any]] = None
    modes: tuple = ("fwdbwd",)
    skip: Optional[str] = None       # reason the case is not run


def run_case(case: Case, mode: str, args, device: torch.device) -> dict:
    row = {"bench": case.bench, "name": case.name, "path": case.path, "dtype": case.dtype,
           "mode": mode, "shapes": case.shapes}
    if case.skip:
        return {**row, "skipped": case.skip}
    fn = {"fwd": case.forward, "bwd": case.backward,
          "fwdbwd": lambda state: case.backward(case.forward(state))}[mode]
    # For "bwd" the forward belongs to the untimed setup.
    setup = (lambda: case.forward(case.setup())) if mode == "bwd" else case.setup
    try:
        if args.smoke:
            times = time_cpu(fn, setup, warmup=0, repeat=1)
        else:
            times = time_gpu(fn, setup, warmup=args.warmup, repeat=args.repeat)
        row.update(quantiles(times))
        if device.type == "cuda":
            row.update(memory_gpu(case.forward, case.backward, case.setup, mode))
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as e:         # a failing path (often compile) is a result, not a crash
        first_line = (str(e).strip().splitlines() or [""])[0]
        row["error"] = f"{type(e).__name__}: {first_line}"[:300]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def rotating(make: Callable[[int], Any], n: int = N_INPUT_SETS) -> Callable[[], Any]:
    """A setup function cycling through n input sets made by make(seed)."""
    sets = itertools.cycle([make(seed) for seed in range(n)])
    return lambda: next(sets)


def autocast_for(dtype: str, device: torch.device):
    return (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
            else contextlib.nullcontext())


def shape_str(shapes: dict) -> str:
    return " ".join(f"{k}{v}" for k, v in shapes.items())


def compile_skip(args) -> Optional[str]:
    return "--smoke runs no torch.compile" if args.smoke else None


# ----------------------------------------------------------------------------------------------
# (a) The ops

def primary(out):
    """The output a loss would flow back through: h of slot_mix_render (its weights are the
    segmentation, outside the loss), the only output otherwise."""
    return out[0] if isinstance(out, tuple) else out


def op_specs(S: dict, device) -> list[dict]:
    """Per op: its name, shapes, paths (triton op, eager twin) and a maker of random inputs
    (tensors, static arguments, gradient of the primary output)."""
    from osrt_fast.kernels.slot_attention import slot_attention_step, slot_attention_step_eager
    from osrt_fast.kernels.slot_mixer import (slot_cross_attention, slot_cross_attention_eager, slot_mix_render,
                                    slot_mix_render_eager)
    B, K, N, R, C, H, F, D = (S[k] for k in ("B", "K", "N", "R", "C", "H", "F", "op_D"))

    def randn(g, dtype, *shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype).requires_grad_()

    def attention_inputs(seed, dtype):
        g = torch.Generator(device).manual_seed(seed)
        q, k, v = randn(g, dtype, B, K, D), randn(g, dtype, B, N, D), randn(g, dtype, B, N, D)
        return (q, k, v), (), torch.randn(B, K, D, generator=g, device=device).to(dtype)

    def cross_inputs(seed, dtype):
        g = torch.Generator(device).manual_seed(seed)
        # scales keep logits and outputs of unit order, as with trained weights
        t = (randn(g, dtype, B, R, C), 1 + randn(g, dtype, C, std=0.1), randn(g, dtype, C, std=0.1),
             randn(g, dtype, B, C, H * K, std=C ** -0.5), randn(g, dtype, B, H * K, C, std=(H * K) ** -0.5),
             randn(g, dtype, C, std=0.1))
        return t, (H,), torch.randn(B, R, C, generator=g, device=device).to(dtype)

    def mix_inputs(seed, dtype):
        g = torch.Generator(device).manual_seed(seed)
        t = (randn(g, dtype, B, R, C), randn(g, dtype, B, R, C), randn(g, dtype, B, C, K, std=C ** -0.5),
             randn(g, dtype, B, K, F), randn(g, dtype, F, C, std=C ** -0.5), randn(g, dtype, F, std=0.1))
        return t, (), torch.randn(B, R, F, generator=g, device=device).to(dtype)

    return [
        dict(name="slot_attention_step", shapes=dict(B=B, K=K, N=N, D=D), make=attention_inputs,
             triton=slot_attention_step,
             # the twin also returns the attention, which the model's step discards
             eager=lambda q, k, v: slot_attention_step_eager(q, k, v)[0]),
        dict(name="slot_cross_attention", shapes=dict(B=B, R=R, C=C, H=H, K=K), make=cross_inputs,
             triton=slot_cross_attention, eager=slot_cross_attention_eager),
        dict(name="slot_mix_render", shapes=dict(B=B, R=R, C=C, K=K, F=F), make=mix_inputs,
             triton=slot_mix_render, eager=slot_mix_render_eager),
    ]


def op_cases(S, dtype: str, args, device):
    """Yields the cases op by op, so that only one op's input sets are alive at a time."""
    for spec in op_specs(S, device):
        setup = rotating(lambda seed: spec["make"](seed, DTYPES[dtype]))
        compiled = None if args.smoke else torch.compile(spec["eager"])
        for path, fn in (("triton", spec["triton"]), ("eager", spec["eager"]), ("compile", compiled)):
            def forward(inputs, fn=fn):
                tensors, static, dout = inputs
                return fn(*tensors, *static), tensors, dout

            def backward(res):
                out, tensors, dout = res
                # autograd.grad, not .backward(): nothing accumulates into .grad between calls
                return torch.autograd.grad(primary(out), tensors, dout)

            yield Case("op", spec["name"], path, dtype, spec["shapes"], setup, forward, backward,
                       modes=("fwd", "bwd", "fwdbwd"),
                       skip=compile_skip(args) if path == "compile" else None)


# ----------------------------------------------------------------------------------------------
# (b), (c), (d): model pieces

def unit_vectors(g, *shape, device):
    return torch.nn.functional.normalize(torch.randn(*shape, 3, generator=g, device=device), dim=-1)


def set_backend(model, backend: str) -> Optional[str]:
    """Switches the model's backend; returns why it cannot, or None."""
    try:
        model.set_backend(backend)
    except Exception as e:
        return f"set_backend({backend!r}) failed: {type(e).__name__}: {e}"[:300]
    return None


def model_step_case(bench, name, path, dtype, shapes, setup, module_fn, model, device,
                    skip=None) -> Case:
    """fwd+bwd of a model piece: module_fn(inputs) -> output tensor; loss = mean square error
    against a random target. Gradients are dropped before each call (as zero_grad(set_to_none))
    so every backward allocates them afresh."""

    def fresh():
        model.zero_grad(set_to_none=True)
        return setup()

    def forward(inputs):
        with autocast_for(dtype, device):
            out = module_fn(inputs)
        return (out.float() - inputs["target"]).square().mean()

    return Case(bench, name, path, dtype, shapes, fresh, forward, lambda loss: loss.backward(),
                skip=skip)


def decoder_cases(model, S, dtype, args, device) -> list[tuple[str, Case]]:
    """The Slot Mixer decoder, fwd+bwd, B scenes x R rays from K slots."""
    B, R, K, D = S["B"], S["R"], S["K"], S["D"]
    low = DTYPES[dtype]

    def make(seed):
        g = torch.Generator(device).manual_seed(seed)
        return dict(slots=torch.randn(B, K, D, generator=g, device=device).to(low).requires_grad_(),
                    camera_pos=unit_vectors(g, B, R, device=device) * 10,
                    rays=unit_vectors(g, B, R, device=device),
                    target=torch.rand(B, R, 3, generator=g, device=device))

    setup = rotating(make)
    shapes = dict(B=B, R=R, K=K, D=D)

    def decode(decoder):
        return lambda x: decoder(x["slots"], x["camera_pos"], x["rays"])[0]

    compiled = None if args.smoke else torch.compile(model.decoder)
    return [
        ("eager", model_step_case("block", "decoder", "eager", dtype, shapes, setup,
                                  decode(model.decoder), model, device)),
        ("compile", model_step_case("block", "decoder", "compile", dtype, shapes, setup,
                                    decode(compiled), model, device, skip=compile_skip(args))),
        ("triton", model_step_case("block", "decoder", "triton", dtype, shapes, setup,
                                   decode(model.decoder), model, device)),
    ]


def slot_attention_cases(model, S, dtype, args, device) -> list[tuple[str, Case]]:
    """The SlotAttention module, fwd+bwd on [B, N, L] inputs, K slots."""
    B, N, L = S["B"], S["N"], S["L"]
    low = DTYPES[dtype]

    def make(seed):
        g = torch.Generator(device).manual_seed(seed)
        return dict(inputs=torch.randn(B, N, L, generator=g, device=device).to(low).requires_grad_(),
                    target=torch.rand(B, S["K"], S["D"], generator=g, device=device))

    setup = rotating(make)
    shapes = dict(B=B, N=N, L=L, K=S["K"], D=S["D"])
    module = model.slot_attention
    compiled = None if args.smoke else torch.compile(module)
    return [
        ("eager", model_step_case("block", "slot_attention", "eager", dtype, shapes, setup,
                                  lambda x: module(x["inputs"]), model, device)),
        ("compile", model_step_case("block", "slot_attention", "compile", dtype, shapes, setup,
                                    lambda x: compiled(x["inputs"]), model, device,
                                    skip=compile_skip(args))),
        ("triton", model_step_case("block", "slot_attention", "triton", dtype, shapes, setup,
                                   lambda x: module(x["inputs"]), model, device)),
    ]


def render_cases(model, S, dtype, args, device) -> list[tuple[str, Case]]:
    """One frame: decoder forward under no_grad, 1 scene x frame_rays rays from K slots."""
    R, K, D = S["frame_rays"], S["K"], S["D"]
    low = DTYPES[dtype]

    def make(seed):
        g = torch.Generator(device).manual_seed(seed)
        return dict(slots=torch.randn(1, K, D, generator=g, device=device).to(low),
                    camera_pos=(unit_vectors(g, 1, 1, device=device) * 10).expand(1, R, 3),
                    rays=unit_vectors(g, 1, R, device=device))

    setup = rotating(make)

    @torch.no_grad()
    def frame(x):
        with autocast_for(dtype, device):
            return model.decoder(x["slots"], x["camera_pos"], x["rays"])[0]

    shapes = dict(B=1, R=R, K=K, D=D)
    return [(path, Case("render", "frame", path, dtype, shapes, setup, frame, modes=("fwd",)))
            for path in ("eager", "triton")]


def run_model_cases(model, pairs, args, device) -> list[dict]:
    """Runs (backend, case) pairs, switching the model's backend before each."""
    rows = []
    for backend, case in pairs:
        reason = set_backend(model, "eager" if backend == "compile" else backend)
        if reason and not case.skip:
            case.skip = reason
        for mode in case.modes:
            rows.append(run_case(case, mode, args, device))
    set_backend(model, "eager")
    return rows


def encoder_rows(model, S, args, device) -> list[dict]:
    """The encoder's transformer (5 blocks at paper widths) on [B, N, L] tokens, fwd+bwd, bf16,
    with encoder_attention sdpa vs xformers (same weights: the model is switched in place)."""
    B, N, L = S["B"], S["N"], S["L"]
    shapes = dict(B=B, N=N, L=L)
    transformer = model.srt_encoder.transformer

    def make(seed):
        g = torch.Generator(device).manual_seed(seed)
        return dict(x=torch.randn(B, N, L, generator=g, device=device).to(torch.bfloat16).requires_grad_(),
                    target=torch.rand(B, N, L, generator=g, device=device))

    setup = rotating(make)
    rows = []
    for attention in ("sdpa", "xformers"):
        skip = None
        if attention == "xformers":
            if args.smoke:
                skip = "--smoke runs no xformers"
            elif importlib.util.find_spec("xformers") is None:
                skip = "xformers is not installed"
        if skip is None and hasattr(model, "set_encoder_attention"):
            try:
                model.set_encoder_attention(attention)
            except Exception as e:
                skip = f"set_encoder_attention({attention!r}) failed: {type(e).__name__}: {e}"[:300]
        elif skip is None and attention != "sdpa":
            skip = "osrt_fast.model.OSRT has no set_encoder_attention() (SDPA only)"
        case = model_step_case("encoder", "transformer", attention, "bf16", shapes, setup,
                               lambda x: transformer(x["x"]), model, device, skip=skip)
        rows.append(run_case(case, "fwdbwd", args, device))
    if hasattr(model, "set_encoder_attention"):
        model.set_encoder_attention("sdpa")
    return rows


# ----------------------------------------------------------------------------------------------

def add_speedups(rows: list[dict]) -> None:
    """speedup = median of the baseline path (eager; sdpa for the encoder) / this median."""
    base = {}
    for r in rows:
        if r["path"] in ("eager", "sdpa") and "median_ms" in r:
            base[(r["bench"], r["name"], r["dtype"], r["mode"])] = r["median_ms"]
    for r in rows:
        b = base.get((r["bench"], r["name"], r["dtype"], r["mode"]))
        if b is not None and r.get("median_ms"):
            r["speedup"] = b / r["median_ms"]
        if r["bench"] == "render" and r.get("median_ms"):
            r["fps"] = 1e3 / r["median_ms"]


def print_table(rows: list[dict]) -> None:
    def num(v, width, digits=3):
        return f"{v:{width}.{digits}f}" if v is not None else f"{'-':>{width}}"

    print(f"{'bench':7} {'name':20} {'path':8} {'dtype':5} {'mode':6} {'median ms':>10} {'p20':>9} "
          f"{'p80':>9} {'peak GiB':>9} {'x eager':>8}  shapes / note")
    for r in rows:
        if "skipped" in r:
            note = f"skipped: {r['skipped']}"
        elif "error" in r:
            note = f"error: {r['error']}"
        else:
            note = shape_str(r["shapes"])
            if r.get("saved_gib") is not None:
                note += f"  saved {r['saved_gib']:.2f} GiB"
            if r.get("fps"):
                note += f"  {r['fps']:.1f} frames/s"
            if r.get("note"):
                note += f"  {r['note']}"
        print(f"{r['bench']:7} {r['name']:20} {r['path']:8} {r['dtype']:5} {r['mode']:6} "
              f"{num(r.get('median_ms'), 10)} {num(r.get('p20_ms'), 9)} {num(r.get('p80_ms'), 9)} "
              f"{num(r.get('peak_mem_gib'), 9)} {num(r.get('speedup'), 8, 2)}  {note}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.bench_kernels",
                                description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS))
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU (Triton interpreter), one call each, never saved")
    args = p.parse_args(argv)
    if args.smoke:
        # Before any kernel module is imported (below): Triton decides at decoration time.
        os.environ["TRITON_INTERPRET"] = "1"
        device, S, cfg = torch.device("cpu"), SMOKE, TINY_MODEL
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_kernels needs a CUDA GPU (or --smoke for a CPU check of the script)")
        device, S, cfg = torch.device("cuda"), FULL, MSN_HARD_MODEL
    torch.backends.cuda.matmul.allow_tf32 = False      # the reference's fp32 (and the kernels'
    torch.backends.cudnn.allow_tf32 = False            # 3xTF32 dots follow this flag)
    from osrt_fast.model import OSRT

    env = environment()
    rows = []
    model = OSRT(cfg).to(device) if set(args.only) - {"op"} else None
    for dtype in args.dtype:
        if "op" in args.only:
            for case in op_cases(S, dtype, args, device):
                rows += [run_case(case, mode, args, device) for mode in case.modes]
        if "block" in args.only:
            rows += run_model_cases(model, decoder_cases(model, S, dtype, args, device), args, device)
            rows += run_model_cases(model, slot_attention_cases(model, S, dtype, args, device), args, device)
        if "render" in args.only:
            rows += run_model_cases(model, render_cases(model, S, dtype, args, device), args, device)
    if "encoder" in args.only and "bf16" in args.dtype:
        rows += encoder_rows(model, S, args, device)
    add_speedups(rows)
    if not (args.no_save or args.smoke):
        for r in rows:
            append_result("kernels", {**r, **env})
    print_table(rows)


if __name__ == "__main__":
    main()
