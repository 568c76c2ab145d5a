"""The GPU suite: correctness on CUDA, the training step at MSN-Hard shapes beside the published
reference, the kernels, data loading and a profile, in one process and one time budget.

    python -m benchmarks.gpu.suite [--reference DIR] [--results-dir DIR] [--budget-s 450]
                                   [--only SECTION ...] [--commit SHA]
    python -m benchmarks.gpu.suite --smoke [--reference DIR] [--results-dir DIR]

How to prepare a GPU machine and the exact command to run there: docs/GPU.md.

Sections, most needed first (when the budget runs short, the last ones are skipped and say so):
  correctness  pytest with the real compiled kernels (TRITON_INTERPRET=0): the CUDA cases of
               tests/test_kernels.py (fp32 and bf16, every gradient) and tests/test_gpu.py (the
               triton backend against fp64 eager, the compiled fast path with checkpointing
               against eager, training curves, make_batch on the device)
  train_step   bench_train_step's step at MSN-Hard shapes (5 input views of 128x128, K = 32,
               8192 target rays): eager-fp32, eager-bf16, fast, fast-ckpt at equal work (32
               scenes) with scenes/s, MFU, peak memory; one optimizer step of 256 x 8192
               (fast-ckpt); the profile of the fast step (its top costs), saved beside the results
  reference    the published stelzner/osrt code imported from --reference (a checkout of it;
               never copied into this project): its own SRTTrainer.train_step, fp32 (TF32 off),
               at the same shapes; 32 scenes, then the largest batch it fits
  kernels      the slot-attention step, the Slot Mixer decoder fwd+bwd at 32 x 8192, one 128x128
               frame from 32 slots: triton vs eager vs torch.compile(eager), fp32 and bf16
  data         make_batch at 256 x 8192 on the device; the training loader's scenes/s from raw and
               png shards of built-in scenes (8 and 16 workers), next to the fast step's
  viewer       the live viewer's frames/s (benchmarks/speed/bench_viewer.py): 128x128 from 32
               slots of the MSN-Hard model, eager and triton, fp32

Every row is appended to <results-dir>/suite_<device>.jsonl as soon as it is measured (run id,
section, device, commit, date, torch, triton, CUDA), so a run cut short keeps what it measured.
At the end the summary <results-dir>/suite_<device>.md and the profile
suite_<device>_profile.txt are written; benchmarks/gpu/suite_report.py imports them into
benchmarks/results/ and regenerates the README's table.

--smoke runs every section at tiny shapes on the CPU (Triton interpreter; compile through
aot_eager; the correctness tests on the CPU) into .scratch/suite_smoke/: it checks the suite,
not the speed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
import xml.etree.ElementTree as ET
from types import SimpleNamespace

from benchmarks.common import ROOT

SECTIONS = ("correctness", "train_step", "reference", "kernels", "data", "viewer")
# Seconds each section is expected to take on one H100 with cold compile caches; a section starts
# only if this much of the budget is left. (Estimates: correct them from the recorded "seconds"
# of a real run.)
ESTIMATE_S = {"correctness": 120, "train_step": 200, "reference": 60, "kernels": 90, "data": 45,
              "viewer": 30}
TRAIN_PATHS = ("eager-fp32", "eager-bf16", "fast", "fast-ckpt")
EQUAL_WORK_SCENES = 32
PAPER_BATCH = 256


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


class Recorder:
    """Rows of one run: each appended to the device's JSON-lines file as it comes."""

    def __init__(self, results_dir: str, env: dict, smoke: bool):
        os.makedirs(results_dir, exist_ok=True)
        self.env, self.smoke = env, smoke
        self.run = f"{env['date']}-{uuid.uuid4().hex[:6]}"
        stem = os.path.join(results_dir, f"suite_{device_slug(env['device'])}")
        self.jsonl, self.summary, self.profile = stem + ".jsonl", stem + ".md", stem + "_profile.txt"
        self.rows: list[dict] = []

    def add(self, section: str, row: dict) -> dict:
        row = {**row, **self.env, "suite_run": self.run, "section": section, "smoke": self.smoke}
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(f"[{section}] {one_line(row)}", flush=True)
        return row


def one_line(r: dict) -> str:
    name = " ".join(str(r[k]) for k in ("bench", "name", "path", "dtype", "mode") if r.get(k))
    if r.get("skipped"):
        return f"{name}: skipped: {r['skipped']}"
    if r.get("error"):
        return f"{name}: error: {r['error']}"
    if r.get("oom"):
        return f"{name} at {r.get('scenes')} scenes: out of memory"
    parts = [f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}"
             for k in ("scenes", "largest_scenes", "median_ms", "scenes_per_s", "mfu", "peak_mem_gib",
                       "speedup", "passed", "failed", "errors", "seconds") if r.get(k) is not None]
    return f"{name}: {' '.join(parts)}"


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ----------------------------------------------------------------------------------------------
# correctness

def junit_counts(path: str) -> dict:
    """passed / failed / errors / skipped and the failing tests (first line of each message)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for s in suites:
        counts["tests"] += int(s.get("tests", 0))
        counts["failed"] += int(s.get("failures", 0))
        counts["errors"] += int(s.get("errors", 0))
        counts["skipped"] += int(s.get("skipped", 0))
        for case in s.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                message = (bad.get("message") or "").strip().splitlines()
                failures.append(f"{case.get('classname')}::{case.get('name')}: "
                                f"{message[0][:200] if message else ''}")
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    counts["failures"] = failures
    return counts


def section_correctness(ctx) -> None:
    env = dict(os.environ)
    if ctx.smoke:
        # The same pytest run on the CPU, on a few quick tests of each file: the wiring (the
        # whole of both files runs in the test suite anyway).
        env.update(TRITON_INTERPRET="1", OSRT_TEST_DEVICE="cpu")
        selection = ["tests/test_kernels.py::test_slot_attention_step", "tests/test_gpu.py",
                     "-k", "(cpu and 2-1-37-24) or make_batch or bf16_autocast"]
    else:
        env["TRITON_INTERPRET"] = "0"
        selection = ["tests/test_kernels.py", "tests/test_gpu.py", "-k", "cuda or test_gpu"]
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *selection]
        if not ctx.smoke and ctx.have_xdist:
            cmd += ["-n", "4"]           # Triton compiles the many kernel variants in parallel
        timeout = max(60.0, ctx.budget.left() - 60) if not ctx.smoke else 900
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            ctx.rec.add("correctness", {"bench": "correctness", "error": f"pytest ran past {timeout:.0f} s",
                                        "output_tail": str(e.stdout or "")[-2000:]})
            return
        row = {"bench": "correctness", "returncode": proc.returncode,
               "seconds": time.monotonic() - t0, "selection": " ".join(selection)}
        if os.path.exists(junit):
            row.update(junit_counts(junit))
        else:
            row["error"] = "pytest wrote no report"
        if proc.returncode != 0:
            row["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        ctx.rec.add("correctness", row)


# ----------------------------------------------------------------------------------------------
# train_step (and the profile of the fast step)

def train_args(ctx, **overrides) -> SimpleNamespace:
    """The namespace bench_train_step's measure() reads, for this run's device and scale."""
    from osrt_fast.throughput import peak_flops
    if ctx.smoke:
        a = dict(compile_backend="aot_eager", warmup=1, repeat=1)
    else:
        a = dict(compile_backend=None, warmup=3, repeat=5)
    a.update(model=ctx.model, slots=ctx.model["encoder_kwargs"]["num_slots"],
             flops_per_scene=ctx.flops_per_scene, peak=peak_flops(ctx.device), **overrides)
    return SimpleNamespace(**a)


def section_train_step(ctx) -> None:
    from benchmarks.speed import bench_train_step as bts
    scenes = 2 if ctx.smoke else EQUAL_WORK_SCENES
    args = train_args(ctx)
    base = None

    def profile_fast(step, batch):
        table = bts.profile_step(step, batch, ctx.device, rows=25)
        with open(ctx.rec.profile, "w") as f:
            f.write(f"{json.dumps(ctx.env)}\nfast path, {scenes} scenes x {ctx.shape[2]} rays, "
                    f"one training step (torch.profiler, top costs)\n{table}\n")

    for path in TRAIN_PATHS:
        if ctx.budget.left() < (0 if ctx.smoke else 30):
            ctx.rec.add("train_step", {"bench": "train_step", "path": path, "skipped": "budget"})
            continue
        try:
            rec = bts.measure(path, scenes, args, {}, ctx.shape, ctx.device,
                              after=profile_fast if path == "fast" else None)
        except Exception as e:      # a failing path (often compile) is a result; the others run
            ctx.rec.add("train_step", {"bench": "train_step", "path": path, "scenes": scenes,
                                       "error": f"{type(e).__name__}: {e}"[:500]})
            bts.free(ctx.device)
            continue
        if path == "eager-fp32" and not rec.get("oom"):
            base = rec["scenes_per_s"]
        if base and not rec.get("oom"):
            rec["speedup_vs_eager_fp32"] = rec["scenes_per_s"] / base
        ctx.rec.add("train_step", rec)

    # The paper's batch in one optimizer step, with every checkpointing region.
    big = 4 if ctx.smoke else PAPER_BATCH
    if ctx.budget.left() < (0 if ctx.smoke else 60):
        ctx.rec.add("train_step", {"bench": "train_step_paper_batch", "path": "fast-ckpt",
                                   "scenes": big, "skipped": "budget"})
        return
    rec = bts.measure("fast-ckpt", big, train_args(ctx, warmup=1, repeat=3), {}, ctx.shape, ctx.device)
    ctx.rec.add("train_step", dict(rec, bench="train_step_paper_batch"))


# ----------------------------------------------------------------------------------------------
# reference

def import_reference(path: str):
    """(OSRT, SRTTrainer) of the reference checkout at `path` (its `osrt` package)."""
    if not os.path.isdir(os.path.join(path, "osrt")):
        raise FileNotFoundError(f"no reference checkout at {path} (expected its osrt/ package "
                                f"there; see docs/GPU.md for preparing it)")
    sys.path.insert(0, os.path.abspath(path))
    from osrt.model import OSRT as ReferenceOSRT
    from osrt.trainer import SRTTrainer
    return ReferenceOSRT, SRTTrainer


def reference_model_config(num_slots: int) -> dict:
    """The reference's OSRT config with its own keys only (it has no width options: the paper's
    widths), `num_slots` slots and pos_start_octave -5 (as its CLEVR3D and MSN configs set)."""
    return {"encoder": "osrt", "encoder_kwargs": {"pos_start_octave": -5, "num_slots": num_slots},
            "decoder": "slot_mixer", "decoder_kwargs": {"pos_start_octave": -5}}


def reference_batch(scenes: int, shape, slots: int, device) -> dict:
    """bench_train_step's random batch plus one-hot target masks (34 channels, as MSN-Hard):
    the reference computes ARI and FG-ARI of every training batch from them."""
    import torch

    from benchmarks.speed.bench_train_step import random_batch
    views, size, rays = shape
    batch = random_batch(scenes, views, size, rays, device)
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, slots, (scenes, rays), device=device, generator=g)
    batch["target_masks"] = torch.nn.functional.one_hot(ids, 34).float()
    return batch


def section_reference(ctx) -> None:
    import torch

    from benchmarks import common
    from benchmarks.speed import bench_train_step as bts
    if not ctx.reference:
        ctx.rec.add("reference", {"bench": "reference", "skipped": "no --reference given (a checkout "
                                  "of stelzner/osrt; docs/GPU.md)"})
        return
    ReferenceOSRT, SRTTrainer = import_reference(ctx.reference)
    args = train_args(ctx, warmup=2, repeat=3)

    def build(scenes: int):
        """The reference's own training step (SRTTrainer.train_step: loss, backward, Adam, and
        the ARI of the batch, as it runs every step) on a batch with target masks."""
        torch.manual_seed(0)
        # The reference's own config keys only (it has no width options): paper widths.
        model = ReferenceOSRT({**common.MSN_HARD_MODEL, "encoder_kwargs": {
            "pos_start_octave": -5, "num_slots": args.slots}}).to(ctx.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
        trainer = SRTTrainer(model, optimizer, {"training": {}}, ctx.device, None, {})
        return (lambda b: trainer.train_step(b, 0)), reference_batch(scenes, ctx.shape, args.slots, ctx.device)

    def measure(scenes: int) -> dict:
        return dict(bts.measure("reference", scenes, args, {}, ctx.shape, ctx.device, build=build),
                    precision="fp32")

    equal = 2 if ctx.smoke else EQUAL_WORK_SCENES
    first = measure(equal)
    ctx.rec.add("reference", first)
    if not first.get("oom"):
        ctx.rec.add("reference", dict(first, bench="train_step_largest", largest_scenes=equal,
                                      note="fits the equal-work batch; not searched above it"))
        return
    # The largest batch it fits: doubling from 1 scene, then bisection.
    good, bad, best = 0, equal, None
    n = 1
    while n < bad and ctx.budget.left() > (0 if ctx.smoke else 20):
        row = measure(n)
        if row.get("oom"):
            bad = n
            break
        good, best, n = n, row, n * 2
    while bad - good > 1 and ctx.budget.left() > (0 if ctx.smoke else 20):
        mid = (good + bad) // 2
        row = measure(mid)
        if row.get("oom"):
            bad = mid
        else:
            good, best = mid, row
    if best is None:
        ctx.rec.add("reference", {"bench": "train_step_largest", "path": "reference",
                                  "error": "not even one scene fits"})
    else:
        ctx.rec.add("reference", dict(best, bench="train_step_largest", largest_scenes=good))


# ----------------------------------------------------------------------------------------------
# kernels

def section_kernels(ctx) -> None:
    from benchmarks.speed import bench_kernels as bk
    from osrt_fast.model import OSRT
    S = bk.SMOKE if ctx.smoke else bk.FULL
    args = SimpleNamespace(smoke=ctx.smoke, warmup=3, repeat=10)
    cfg = train_args(ctx).model
    model = OSRT(cfg).to(ctx.device)
    rows = []
    for dtype in ("fp32", "bf16"):
        if ctx.budget.left() < (0 if ctx.smoke else 15):
            ctx.rec.add("kernels", {"bench": "kernels", "dtype": dtype, "skipped": "budget"})
            continue
        for case in bk.op_cases(S, dtype, args, ctx.device):
            if case.name != "slot_attention_step":
                break           # the first op; the generator makes each op's inputs lazily
            rows.append(bk.run_case(case, "fwdbwd", args, ctx.device))
        rows += bk.run_model_cases(model, bk.decoder_cases(model, S, dtype, args, ctx.device),
                                   args, ctx.device)
        rows += bk.run_model_cases(model, bk.render_cases(model, S, dtype, args, ctx.device),
                                   args, ctx.device)
    bk.add_speedups(rows)
    for r in rows:
        ctx.rec.add("kernels", r)


# ----------------------------------------------------------------------------------------------
# data

def synthetic_records(scenes: int, views: int, size: int, input_views: int, device) -> dict:
    """Collated scene records of MSN-Hard's shapes: random colours and ids (34 entities),
    cameras on a hemisphere, built on `device`."""
    import numpy as np
    import torch

    from osrt_fast import cameras
    rng = np.random.default_rng(0)
    cams = cameras.hemisphere_cameras(rng, scenes * views).astype(np.float32)
    mats = cameras.camera_ray_matrix(cams, size, size).reshape(scenes, views, 3, 3)
    order = np.argsort(rng.random((scenes, views)), axis=1)
    g = torch.Generator(device=device).manual_seed(0)
    return {"images": torch.randint(0, 256, (scenes, views, size, size, 3), dtype=torch.uint8,
                                    device=device, generator=g),
            "ids": torch.randint(0, 34, (scenes, views, size, size), dtype=torch.uint8,
                                 device=device, generator=g),
            "origins": torch.as_tensor(cams.reshape(scenes, views, 3), device=device),
            "ray_mats": torch.as_tensor(mats, device=device),
            "input_views": torch.as_tensor(order[:, :input_views], device=device),
            "target_views": torch.as_tensor(order[:, input_views:], device=device),
            "seed": torch.arange(scenes, device=device) * 7919 + 1,
            "sceneid": torch.arange(scenes, device=device)}


def section_data(ctx) -> None:
    import statistics


    from benchmarks.speed import bench_loader as bl
    from osrt_fast.data import make_batch
    from osrt_fast.data.records import BatchSpec
    views, size, rays = 10, (16 if ctx.smoke else 128), ctx.shape[2]
    scenes = 4 if ctx.smoke else PAPER_BATCH
    spec = BatchSpec(num_points=rays, num_entities=34)
    records = synthetic_records(scenes, views, size, 5, ctx.device)
    times = []
    for i in range(2 + (1 if ctx.smoke else 10)):
        bl.sync(ctx.device)
        t0 = time.perf_counter()
        out = make_batch(records, spec)
        bl.sync(ctx.device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
        del out
    median = statistics.median(times)
    ctx.rec.add("data", {"bench": "make_batch", "scenes": scenes, "rays": rays, "views": views,
                         "image": size, "median_ms": median * 1e3, "scenes_per_s": scenes / median})
    del records

    # The training loader over shards of built-in scenes (generated here, on the device).
    args = SimpleNamespace(
        data_dir=os.path.join(ctx.scratch, "loader"), height=size, width=size, points=rays,
        scenes=8 if ctx.smoke else 64, quiet=True, generate_device=ctx.device.type,
        batch_size=4 if ctx.smoke else 32, batches=2 if ctx.smoke else 20, warmup=None,
        make_batch_repeat=1 if ctx.smoke else 3)
    paths = ("shards_raw", "shards_png")
    data = bl.prepare_data(args, paths)
    loader_spec = BatchSpec(num_points=rays, num_entities=bl.NUM_ENTITIES)
    make_batch_times = {}       # per path, shared by its worker counts
    for path in paths:
        for workers in ((0, 1) if ctx.smoke else (8, 16)):
            if ctx.budget.left() < (0 if ctx.smoke else 8):
                ctx.rec.add("data", {"bench": "loader", "path": path, "workers": workers,
                                     "skipped": "budget"})
                continue
            row = bl.run_path(path, workers, data, args, ctx.device, loader_spec, {},
                              make_batch_times)
            ctx.rec.add("data", row)


# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# viewer

def section_viewer(ctx) -> None:
    from benchmarks.speed import bench_viewer
    size = ["--height", "16", "--width", "16", "--frames", "2"] if ctx.smoke else \
        ["--height", "128", "--width", "128", "--frames", "30"]
    model = [] if ctx.smoke else ["--msn-hard"]
    for backend in ("eager", "triton"):
        row = bench_viewer.main([*model, *size, "--backend", backend, "--device",
                                 ctx.device.type, "--no-save"])
        ctx.rec.add("viewer", {k: v for k, v in row.items()
                               if k not in ("date", "commit", "torch", "python", "cuda", "triton")})


SECTION_FUNCS = {"viewer": section_viewer,
                 "correctness": section_correctness, "train_step": section_train_step,
                 "reference": section_reference, "kernels": section_kernels, "data": section_data}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.suite",
                                description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--reference", help="a checkout of stelzner/osrt (the folder holding osrt/)")
    p.add_argument("--results-dir", help="where the JSON lines, summary and profile go "
                   "(default benchmarks/results; --smoke: .scratch/suite_smoke)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="wall-time budget; a section that would not fit is skipped (default 450)")
    p.add_argument("--commit", help="the commit measured (default: git's, else .gpu/COMMIT)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the suite")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Before anything imports kernels/: Triton reads this when a kernel is decorated.
    os.environ["TRITON_INTERPRET"] = "1" if args.smoke else "0"
    import importlib.util

    import torch

    from benchmarks import common
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks.gpu.suite needs a CUDA GPU (or --smoke for a CPU check of the suite)")
    start = time.monotonic()
    budget = Budget(1e9 if args.smoke else args.budget_s)
    env = common.environment()
    if args.commit:
        env["commit"] = args.commit
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False      # fp32 is fp32: the reference's setting
        torch.backends.cudnn.allow_tf32 = False
        torch._dynamo.config.cache_size_limit = 64
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    results_dir = args.results_dir or os.path.join(
        ROOT, *((".scratch", "suite_smoke") if args.smoke else ("benchmarks", "results")))
    rec = Recorder(results_dir, env, args.smoke)
    ctx = SimpleNamespace(smoke=args.smoke, device=device, env=env, rec=rec, budget=budget,
                          reference=args.reference,
                          model=common.TINY_MODEL if args.smoke else common.MSN_HARD_MODEL,
                          shape=(2, 16, 32) if args.smoke else (5, 128, 8192),
                          have_xdist=importlib.util.find_spec("xdist") is not None,
                          scratch=os.path.join(tempfile.gettempdir(), "osrt_suite"))
    from benchmarks.speed.bench_train_step import step_flops_per_scene
    ctx.flops_per_scene = step_flops_per_scene(ctx.model, ctx.shape)    # the count training logs
    print(f"suite run {rec.run} on {env['device']}, commit {env['commit']}, torch {env['torch']}, "
          f"triton {env['triton']}; rows -> {rec.jsonl}", flush=True)

    for name in SECTIONS:
        if name not in args.only:
            continue
        need = 0 if args.smoke else ESTIMATE_S[name]
        if budget.left() < need:
            rec.add(name, {"bench": "section", "name": name,
                           "skipped": f"budget: {budget.left():.0f} s left, about {need} s needed; "
                                      f"rerun with --only {name}"})
            continue
        t0 = time.monotonic()
        try:
            SECTION_FUNCS[name](ctx)
        except Exception as e:      # one broken section must not cost the others' results
            rec.add(name, {"bench": "section", "name": name,
                           "error": f"{type(e).__name__}: {e}"[:500],
                           "traceback": traceback.format_exc()[-3000:]})
        rec.add(name, {"bench": "section", "name": name, "seconds": time.monotonic() - t0})
        if device.type == "cuda":
            torch.cuda.empty_cache()

    from benchmarks.gpu import suite_report
    summary = suite_report.markdown(rec.rows)
    with open(rec.summary, "w") as f:
        f.write(summary)
    print(f"\n{summary}\nsuite run {rec.run}: {time.monotonic() - start:.0f} s; rows in {rec.jsonl}, "
          f"summary {rec.summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
