"""The demo's training step on the CPU: scenes/s of ways to run it, side by side in one run, where
the time goes, and what a busy machine does to it.

    python -m benchmarks.speed.bench_cpu [--variants base folded ...] [--steps 400] [--repeats 3]
        [--baseline COMMIT] [--busy] [--profile VARIANT] [--config configs/demo.yaml] [--no-save]
    python -m benchmarks.speed.bench_cpu --reference PATH [--ref-shape 4 2 32 512 4]
    python -m benchmarks.speed.bench_cpu --viewer --baseline COMMIT
    python -m benchmarks.speed.bench_cpu --table     # the README's CPU table from the results

Each variant is the config with a few options changed (`VARIANTS`), trained by train.py itself
(`--exit-after --steps`; evaluation, pictures and checkpoints off, so what is timed is the loop:
loading, the step, logging) in a fresh process, and its rate is the median of the scenes/s that
train.py logs after the first `--warmup` steps. Variants run round-robin, `--repeats` times, so
a slow spell of the machine touches all alike; a variant's figure is the median of its repeats,
its ratio to the baseline the median of the ratios within a repeat (runs next to each other).
`--baseline COMMIT` adds that commit's train.py on the same config and data (a git worktree under
.scratch/), the reference every ratio is taken against. `--busy` runs each variant again beside
one CPU-bound process (a pure-Python loop), as on a laptop doing other work. `--profile VARIANT`
times the phases of its step (data, forward, backward, optimizer) in-process and writes a
torch.profiler table of the largest ops. `--reference PATH` (a checkout of stelzner/osrt, imported
from that path, never copied) times the reference's own training step (SRTTrainer.train_step,
fp32) beside osrt-fast's paths for the same architecture (the reference's: paper widths), the
same weights and the same batch, in one process, step for step in turn. `--viewer` times the
live viewer's 64x64 frames of configs/demo.pt (benchmarks/speed/bench_viewer.py, segmentation
mode) beside the --baseline commit's, process for process in turn. Results append to benchmarks/results/cpu.jsonl, with the
CPU model, threads, versions and commit; `--table` writes the README's table from them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

from benchmarks.common import (RESULTS_DIR, ROOT, append_result, environment,
                               recorded_path, set_option, write_between_markers)

# name -> (what it is, options as --set takes them, train.py flags); each the config with
# those options changed (for configs/demo.yaml: cache, one process, folded, precision auto).
VARIANTS = {
    "demo": ("the config as it is", [], []),
    "batch_16": ("16 scenes per step, as the demo trained before its batch was 32", ["training.batch_size=16"], []),
    "fp32": ("fp32, not bf16", ["training.precision=fp32"], []),
    "eager": ("the eager decoder and slot attention, not the folded algebra",
              ["model.backend=eager"], []),
    "loader_worker": ("scenes decoded from their files by a loader process each time",
                      ["data.cache=false", "training.num_workers=1"], []),
    "before": ("as the demo ran before: eager, fp32, a loader process, no cache",
               ["model.backend=eager", "training.precision=fp32", "data.cache=false",
                "training.num_workers=1"], []),
    "threads_1": ("one intra-op thread", [], ["--threads", "1"]),
    "threads_2": ("two intra-op threads, whatever else runs", [], ["--threads", "2"]),
    "compile": ("torch.compile of each region (inductor's C++)", ["training.compile=true"], []),
}
BUSY_LOOP = "while True: pass"
TABLE_BEGIN = "<!-- cpu-table:begin (written by python -m benchmarks.speed.bench_cpu --table; do not edit) -->"
TABLE_END = "<!-- cpu-table:end -->"
RESULTS = os.path.join(RESULTS_DIR, "cpu.jsonl")


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.bench_cpu",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--variants", nargs="+", default=["demo", "before"], choices=sorted(VARIANTS))
    p.add_argument("--steps", type=int, default=400, help="training steps per run")
    p.add_argument("--warmup", type=int, default=100, help="steps whose rates are left out")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant, round-robin")
    p.add_argument("--baseline", metavar="COMMIT", help="also run this commit's train.py")
    p.add_argument("--busy", nargs="*", metavar="VARIANT",
                   help="these variants ('baseline': the --baseline run; none named: all) again "
                        "beside a CPU-bound process")
    p.add_argument("--profile", metavar="VARIANT", choices=sorted(VARIANTS),
                   help="phases and largest ops of this variant's step (no rate runs)")
    p.add_argument("--reference", metavar="PATH", help="time the reference's step beside ours")
    p.add_argument("--ref-shape", nargs=5, type=int, default=[4, 2, 32, 512, 4],
                   metavar=("SCENES", "VIEWS", "SIZE", "RAYS", "SLOTS"),
                   help="the reference comparison's batch: scenes, input views, image size, "
                        "target rays per scene, slots")
    p.add_argument("--viewer", action="store_true", help="the viewer's frames/s beside --baseline's")
    p.add_argument("--table", action="store_true", help="write the README's CPU table and exit")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/cpu.jsonl")
    return p.parse_args(argv)


def machine() -> dict:
    """The CPU as lscpu names it, its cores, and the load before a run."""
    model = platform.processor() or "cpu"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]}


def variant_config(config: str, name: str, folder: str) -> str:
    """The config of variant `name` with evaluation, pictures and checkpoints off and the data
    path absolute (this checkout's: one dataset for every run), written into `folder`."""
    with open(config) as f:
        cfg = yaml.safe_load(f)
    data = cfg.setdefault("data", {})
    if data.get("path") and not os.path.isabs(data["path"]):
        data["path"] = os.path.join(ROOT, data["path"])
    cfg["training"].update(validate_every=0, visualize_every=0, checkpoint_every=0, backup_every=0,
                           print_every=10)
    for item in VARIANTS[name][1]:
        key, _, value = item.partition("=")
        set_option(cfg, key, yaml.safe_load(value))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def run_once(args, name: str, code_root: str, busy: bool, scratch: str) -> dict:
    """One train.py run of variant `name` from the checkout at `code_root` (the baseline's: its
    own copy of the config, as that commit had it): its steady rate."""
    folder = tempfile.mkdtemp(prefix=f"{name}-", dir=scratch)
    source = os.path.join(code_root, os.path.relpath(os.path.abspath(args.config), ROOT))
    config = variant_config(source, name, folder)
    cmd = [sys.executable, os.path.join(code_root, "train.py"), config, "--exit-after",
           str(args.steps)] + VARIANTS[name][2]
    other = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=code_root, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    finally:
        if other is not None:
            other.kill()
            other.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: train.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    logs = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
    rates = [r["scenes_per_s"] for r in logs if "scenes_per_s" in r and r["it"] > args.warmup]
    # What the run chose, from its announce line (a baseline commit may not name them).
    threads = re.search(r"\((\d+) threads\)", proc.stdout)
    precision = re.search(r"micro-batches of \d+ scenes; (\w+)", proc.stdout)
    return {"scenes_per_s": statistics.median(rates), "wall_s": wall,
            "threads": int(threads.group(1)) if threads else None,
            "precision": precision.group(1) if precision else None}


def baseline_checkout(commit: str, scratch: str) -> str:
    """A worktree of `commit` under scratch (made once), whose train.py the baseline runs."""
    path = os.path.join(scratch, f"baseline-{commit}")
    if not os.path.isdir(path):
        subprocess.run(["git", "worktree", "add", "--detach", path, commit], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def measure(args) -> list:
    """Round-robin runs of every variant (and the baseline), idle and, with --busy, beside a busy
    process; one record per variant and condition."""
    scratch = os.path.join(ROOT, ".scratch", "bench_cpu")
    os.makedirs(scratch, exist_ok=True)
    runs = [(name, ROOT) for name in args.variants]
    if args.baseline:
        runs.insert(0, (f"main@{args.baseline}", baseline_checkout(args.baseline, scratch)))
    busy_labels = set(args.busy or []) or {label for label, _ in runs}
    busy_labels = {label for label, _ in runs
                   if label in busy_labels or (label.startswith("main@") and "baseline" in busy_labels)}
    found = {}
    for repeat in range(args.repeats):
        for busy in ([False, True] if args.busy is not None else [False]):
            for label, code_root in runs:
                if busy and label not in busy_labels:
                    continue
                name = label if label in VARIANTS else "demo"
                result = run_once(args, name, code_root, busy, scratch)
                found.setdefault((label, busy), []).append(result)
                print(f"repeat {repeat + 1}, {label}{' (busy)' if busy else ''}: "
                      f"{result['scenes_per_s']:.1f} scenes/s", flush=True)
    env, box = environment(), machine()
    base = runs[0][0]
    records = []
    for (label, busy), results in found.items():
        name = label if label in VARIANTS else "demo"
        what = VARIANTS[name][0] if label in VARIANTS else f"the code and config of commit {args.baseline}"
        rates = [r["scenes_per_s"] for r in results]
        # Ratios of runs next to each other in time (one repeat), then their median: the machine's
        # speed was seen to shift by 25% for tens of seconds, which a ratio of medians takes in.
        paired = [a / b for a, b in zip(rates, rates_of(found, base, busy))]
        slowdown = ([a / b for a, b in zip(rates_of(found, label, False), rates)] if busy else [])
        records.append({"bench": "cpu_train", "variant": label, "what": what,
                        "set": VARIANTS[name][1], "flags": VARIANTS[name][2], "busy": busy,
                        "config": recorded_path(args.config), "steps": args.steps,
                        "warmup": args.warmup, "scenes_per_s": statistics.median(rates),
                        "scenes_per_s_runs": rates, "baseline": base,
                        "vs_baseline": statistics.median(paired) if paired else None,
                        "vs_baseline_runs": paired,
                        "busy_slowdown": statistics.median(slowdown) if slowdown else None,
                        "threads": [r["threads"] for r in results],
                        "precision": results[-1]["precision"],
                        **box, **env})
    return records


def rates_of(found: dict, label: str, busy: bool) -> list:
    return [r["scenes_per_s"] for r in found.get((label, busy), [])]


def summarise(records: list) -> None:
    """Each variant's rate, its ratio to the baseline (idle) and its busy / idle slowdown."""
    busy = {r["variant"]: r for r in records if r["busy"]}
    for r in records:
        if r["busy"]:
            continue
        parts = [f"{r['variant']:24s} {r['scenes_per_s']:7.1f} scenes/s",
                 f"{r['vs_baseline']:5.2f}x {r['baseline']}"]
        other = busy.get(r["variant"])
        if other:
            parts.append(f"busy {other['scenes_per_s']:6.1f} scenes/s ({other['busy_slowdown']:.2f}x "
                         f"slower)")
        print("  ".join(parts))


def profile(args) -> dict:
    """In-process: the variant's step timed phase by phase (as Trainer.step runs it), and the
    profiler's table of the largest ops."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from osrt_fast import parallel, process
    from osrt_fast.config import load_config
    from osrt_fast.data import make_batch, to_device
    from osrt_fast.evaluate import compute_loss
    from osrt_fast.runs import TrainOptions
    from osrt_fast.schedule import slot_balance_at
    from osrt_fast.trainer import Trainer

    name = args.profile
    folder = tempfile.mkdtemp(prefix=f"profile-{name}-", dir=os.path.join(ROOT, ".scratch"))
    cfg = load_config(variant_config(args.config, name, folder))
    flags = VARIANTS[name][2]
    process.setup(int(flags[flags.index("--threads") + 1]) if "--threads" in flags else None)
    trainer = Trainer(cfg, folder, TrainOptions())
    t, model = cfg.training, trainer.model
    model.train()
    batches = iter(trainer.train_loader)
    phases = dict.fromkeys(("data", "forward", "backward", "optimizer"), 0.0)

    def step(timed: bool):
        marks = [time.perf_counter()]
        batch = make_batch(to_device(next(batches), trainer.device), trainer.train_spec)
        marks.append(time.perf_counter())
        trainer.optimizer.zero_grad(set_to_none=True)
        with parallel.autocast(trainer.device, t.precision):
            mse, terms = compute_loss(model, batch, slot_balance=slot_balance_at(t, 0))
        aux = terms.pop("aux_loss", None)
        loss = mse.mean() + (aux.mean() if aux is not None else 0.0)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        parallel.grad_norm_and_clip(trainer.params, t.grad_clip).item()
        trainer.optimizer.step()
        marks.append(time.perf_counter())
        if timed:
            for phase, a, b in zip(phases, marks, marks[1:]):
                phases[phase] += b - a

    for _ in range(args.warmup):
        step(False)
    n = max(1, args.steps // 2)
    t0 = time.perf_counter()
    for _ in range(n):
        step(True)
    total = time.perf_counter() - t0
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            step(False)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    path = os.path.join(RESULTS_DIR, f"cpu_profile_{name}.txt")
    with open(path, "w") as f:
        f.write(f"# {name}: {VARIANTS[name][0]}; {recorded_path(args.config)}, the step as "
                f"Trainer.step runs it, 20 steps\n{table}\n")
    record = {"bench": "cpu_profile", "variant": name, "config": recorded_path(args.config),
              "scenes_per_s": n * t.batch_size / total, "threads": torch.get_num_threads(),
              "ms_per_step": {k: 1000 * v / n for k, v in phases.items()},
              "share": {k: v / total for k, v in phases.items()}, "table": recorded_path(path),
              **machine(), **environment()}
    print(table)
    print(json.dumps({k: record[k] for k in ("variant", "scenes_per_s", "threads", "ms_per_step",
                                             "share")}, indent=1))
    return record


REFERENCE_PATHS = ("eager-fp32", "folded-fp32", "folded-bf16")


def reference(args) -> list:
    """The reference's training step and ours (REFERENCE_PATHS) on its architecture, one process:
    after a warm-up, each takes one step in turn, `--repeats` x 4 rounds; a path's rate is its
    median, its ratio the median of the per-round ratios to the reference's step."""
    import torch

    from benchmarks.gpu.suite import import_reference, reference_batch, reference_model_config
    from benchmarks.speed.bench_train_step import Step
    from osrt_fast import process

    process.setup()                     # as train.py sets up its process (both steps alike)

    scenes, views, size, rays, slots = args.ref_shape
    ReferenceOSRT, SRTTrainer = import_reference(args.reference)
    model_cfg = reference_model_config(slots)
    cpu = torch.device("cpu")
    batch = reference_batch(scenes, (views, size, rays), slots, cpu)
    torch.manual_seed(0)
    ref_model = ReferenceOSRT(model_cfg)
    ref_trainer = SRTTrainer(ref_model, torch.optim.Adam(ref_model.parameters(), lr=1e-5),
                             {"training": {}}, cpu, None, {})
    steps = {"reference": lambda: ref_trainer.train_step(batch, 0)}
    for path in REFERENCE_PATHS:
        step = Step(path, model_cfg, cpu)
        step.model.load_state_dict(ref_model.state_dict())        # the same weights
        steps[path] = (lambda s: lambda: s(batch))(step)
    for fn in steps.values():
        fn()
    times = {name: [] for name in steps}
    for _ in range(4 * args.repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    env, box = environment(), machine()
    records = []
    for name, ts in times.items():
        ratio = statistics.median(r / t for r, t in zip(times["reference"], ts))
        records.append({"bench": "cpu_reference", "path": name, "scenes": scenes, "views": views,
                        "image": size, "rays": rays, "slots": slots,
                        "scenes_per_s": scenes / statistics.median(ts), "vs_reference": ratio,
                        "threads": torch.get_num_threads(), **box, **env})
        print(f"{name:12s} {scenes / statistics.median(ts):7.2f} scenes/s  {ratio:5.2f}x the reference")
    return records


def viewer(args) -> list:
    """The viewer's 64x64 frames/s of configs/demo.pt, this checkout's bench_viewer and the
    baseline's (its own script and config), alternating, `--repeats` x 2 each."""
    scratch = os.path.join(ROOT, ".scratch", "bench_cpu")
    os.makedirs(scratch, exist_ok=True)
    flags = ["--checkpoint", os.path.join(ROOT, "configs", "demo.pt"), "--height", "64", "--width",
             "64", "--frames", "60", "--warmup", "10", "--mode", "segmentation", "--no-save"]
    old = baseline_checkout(args.baseline, scratch)
    old_script = next(p for p in ("benchmarks/bench_viewer.py", "benchmarks/speed/bench_viewer.py")
                      if os.path.exists(os.path.join(old, p)))
    runs = {f"main@{args.baseline}": ([sys.executable, old_script], old),
            "this commit": ([sys.executable, "-m", "benchmarks.speed.bench_viewer"], ROOT)}
    fps = {name: [] for name in runs}
    for _ in range(2 * args.repeats):
        for name, (cmd, cwd) in runs.items():
            out = subprocess.run(cmd + flags, cwd=cwd, capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=cwd)).stdout
            fps[name].append(float(out.split(" frames/s")[0].rsplit(" ", 1)[1]))
            print(f"{name}: {fps[name][-1]:.1f} frames/s", flush=True)
    env, box, ref = environment(), machine(), statistics.median(fps[f"main@{args.baseline}"])
    return [{"bench": "cpu_viewer", "variant": name, "checkpoint": "configs/demo.pt", "size": 64,
             "mode": "segmentation", "fps": statistics.median(v), "fps_runs": v,
             "vs_baseline": statistics.median(v) / ref, **box, **env} for name, v in fps.items()]


def table_text(records: list) -> str:
    """The README's CPU table: the latest run's variants, idle and busy, with the baseline."""
    runs = [r for r in records if r.get("bench") == "cpu_train"]
    if not runs:
        return "No CPU run is recorded yet (`python -m benchmarks.speed.bench_cpu`)."
    last = [r for r in runs if r["date"] == runs[-1]["date"]]
    idle = {r["variant"]: r for r in last if not r["busy"]}
    busy = {r["variant"]: r for r in last if r["busy"]}
    ref = next((r for v, r in idle.items() if v.startswith("main@")), None)
    head = last[0]
    lines = [f"The demo's training loop (`{head['config']}`, train.py as it runs, evaluation and "
             f"pictures off) on {head['cpu']} ({head['cpu_count']} cores), torch {head['torch']}, "
             f"commit {head['commit']}, {head['date'][:10]}; medians of "
             f"{len(head['scenes_per_s_runs'])} runs, each ratio the median of ratios between runs "
             f"next to each other (`benchmarks/results/cpu.jsonl`). Busy: beside one CPU-bound "
             f"process.", "",
             "| variant | what | dtype | threads | scenes/s | vs " + (ref["variant"] if ref else "demo") +
             " | beside a busy process (threads) |", "| --- | --- | --- | --- | --- | --- | --- |"]

    def threads(r):
        return "/".join(sorted({str(n) for n in r["threads"] if n is not None})) or "2 (torch's)"
    for name, r in idle.items():
        other = busy.get(name)
        slow = (f"{other['scenes_per_s']:.0f} scenes/s, {other['busy_slowdown']:.1f}x slower "
                f"({threads(other)})" if other else "")
        lines.append(f"| {name} | {r['what']} | {r['precision'] or 'fp32'} | {threads(r)} | "
                     f"{r['scenes_per_s']:.0f} | {r['vs_baseline']:.2f}x | {slow} |")
    return "\n".join(lines)


def write_table(readme: str = os.path.join(ROOT, "README.md")) -> None:
    records = [json.loads(line) for line in open(RESULTS)] if os.path.exists(RESULTS) else []
    write_between_markers(readme, TABLE_BEGIN, TABLE_END, table_text(records), "README.md (the CPU table)")


def main(argv=None) -> int:
    args = parse(argv)
    if args.table:
        write_table()
        return 0
    if args.profile or args.reference or args.viewer:
        records = ([profile(args)] if args.profile else reference(args) if args.reference
                   else viewer(args))
        if not args.no_save:
            for record in records:
                append_result("cpu", record)
        return 0
    records = measure(args)
    summarise(records)
    if not args.no_save:
        for record in records:
            append_result("cpu", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
