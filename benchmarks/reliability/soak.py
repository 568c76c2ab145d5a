"""A soak under torchrun: a small run interrupted at random moments, by SIGKILL of a random
worker (torchrun restarts the workers) or SIGTERM of the whole job (as a scheduler pre-empts; the
job is started again), resumed every time, against the same run left alone.

    python -m benchmarks.reliability.soak [--interruptions 20] [--steps 200] [--seed 0]
    python -m benchmarks.reliability.soak --table     # docs/reliability.md's table from the results

2 processes, gloo on the CPU, FSDP2 (`--parallel ddp` for DDP), a small OSRT on 40 built-in
scenes, a checkpoint every 5 steps. Reports the interruptions of each kind, the restarts and
resumes seen, the runs that did not come back, and the largest difference between the final
weights of the soaked run and of the run left alone (0.0: bit for bit); appends them, with the
machine and commit, to benchmarks/results/reliability.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import yaml

from benchmarks.common import RESULTS_DIR, ROOT, append_result, environment, write_between_markers
from benchmarks.speed.bench_cpu import machine

RESULTS = os.path.join(RESULTS_DIR, "reliability.jsonl")
TABLE_BEGIN = "<!-- soak-table:begin (written by python -m benchmarks.reliability.soak --table; do not edit) -->"
TABLE_END = "<!-- soak-table:end -->"
MODEL = {"encoder": "osrt", "decoder": "slot_mixer",
         "encoder_kwargs": {"pos_start_octave": -5, "num_slots": 3, "slot_dim": 32,
                            "num_conv_blocks": 3, "num_att_blocks": 1, "conv_dim": 8,
                            "latent_dim": 32, "num_heads": 2, "head_dim": 16, "mlp_dim": 64},
         "decoder_kwargs": {"pos_start_octave": -5, "slot_dim": 32, "num_att_blocks": 1,
                            "render_hidden_dim": 32, "num_heads": 2}}


def write_config(folder: str, data: str, steps: int, parallel: str) -> str:
    os.makedirs(folder, exist_ok=True)
    cfg = {"data": {"dataset": "procedural", "path": data, "num_points": 64,
                    "kwargs": {"num_scenes": 40, "height": 16, "width": 16, "num_views": 3,
                               "min_objects": 1, "max_objects": 3, "seed": 1}},
           "model": MODEL,
           "training": {"batch_size": 4, "num_workers": 0, "print_every": 1, "visualize_every": 0,
                        "validate_every": 0, "checkpoint_every": 5, "backup_every": 0,
                        "max_it": steps, "lr_warmup": 0, "peak_lr": 1e-3, "device": "cpu",
                        "seed": 3, "parallel": parallel, "eval_batch_size": 2, "vis_scenes": 2}}
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def env() -> dict:
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    return out


def start(config: str, nproc: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "--max-restarts", "100", os.path.join(ROOT, "train.py"), config]
    return subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def last_it(folder: str) -> int:
    path = os.path.join(folder, "log.jsonl")
    if not os.path.exists(path):
        return 0
    its = [json.loads(x).get("it", 0) for x in open(path) if x.strip()]
    return max(its, default=0)


def workers(config: str) -> list:
    """pids of the train.py workers of `config`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            environ = open(f"/proc/{pid}/environ", "rb").read()
        except OSError:
            continue
        if "train.py" in cmdline and config in cmdline and b"LOCAL_RANK=" in environ:
            found.append(int(pid))
    return found


def soak(args, config: str, folder: str) -> dict:
    rng = random.Random(args.seed)
    kinds = {"worker SIGKILL": 0, "job SIGTERM": 0}
    outputs, stopped_with = [], []
    proc = start(config, args.nproc)
    while sum(kinds.values()) < args.interruptions and last_it(folder) < args.steps - 15:
        target = last_it(folder) + rng.randint(3, 12)
        deadline = time.monotonic() + 300
        while last_it(folder) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is not None or time.monotonic() >= deadline:
            break
        if rng.random() < 0.5:
            pids = workers(config)
            if not pids:
                continue
            os.kill(rng.choice(pids), signal.SIGKILL)
            kinds["worker SIGKILL"] += 1
        else:
            os.kill(proc.pid, signal.SIGTERM)
            kinds["job SIGTERM"] += 1
            out, _ = proc.communicate(timeout=300)
            outputs.append(out)
            stopped_with.append(proc.returncode)
            proc = start(config, args.nproc)
    out, _ = proc.communicate(timeout=900)
    outputs.append(out)
    text = "".join(outputs)
    return {"interruptions": kinds, "resumes": len(re.findall(r"Resumed from", text)),
            "restarts": text.count("failed (exitcode: -9)"), "final_exit": proc.returncode,
            "sigterm_exit_codes": stopped_with, "reached": last_it(folder)}


def difference(a: str, b: str) -> float:
    import torch

    from osrt_fast import OSRT
    from osrt_fast.checkpoint import load_checkpoint
    ma, mb = OSRT(MODEL), OSRT(MODEL)
    load_checkpoint(a, ma)
    load_checkpoint(b, mb)
    sa, sb = ma.state_dict(), mb.state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa) if all(
        torch.isfinite(v).all() for v in sb.values()) else float("inf")


def table_text(records: list) -> str:
    soaks = [r for r in records if r.get("bench") == "soak"]
    if not soaks:
        return "No soak is recorded yet (`python -m benchmarks.reliability.soak`)."
    lines = ["| parallel | interruptions (worker SIGKILL / job SIGTERM) | resumes | runs that did not "
             "come back | final weights vs left alone | steps | commit, date |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in soaks[-4:]:
        k = r["interruptions"]
        diff = "identical (0.0)" if r["max_abs_difference"] == 0 else f"max {r['max_abs_difference']:.3g}"
        lines.append(f"| {r['parallel']} | {sum(k.values())} ({k['worker SIGKILL']} / {k['job SIGTERM']}) "
                     f"| {r['resumes']} | {int(r['final_exit'] != 0 or r['reached'] < r['steps'])} "
                     f"| {diff} | {r['steps']} | `{r['commit']}`, {r['date'][:10]} |")
    head = soaks[-1]
    return (f"The soak (`python -m benchmarks.reliability.soak`, `benchmarks/results/reliability.jsonl`): "
            f"{head['nproc']} processes on {head['cpu']} ({head['cpu_count']} cores), gloo, a small "
            f"OSRT, a checkpoint every 5 steps, interrupted at random moments:\n\n" + "\n".join(lines))


def write_table(path: str = os.path.join(ROOT, "docs", "reliability.md")) -> None:
    records = [json.loads(x) for x in open(RESULTS)] if os.path.exists(RESULTS) else []
    write_between_markers(path, TABLE_BEGIN, TABLE_END, table_text(records),
                          "docs/reliability.md (the soak table)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interruptions", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--parallel", default="fsdp", choices=("fsdp", "ddp"))
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    if args.table:
        write_table()
        return 0
    scratch = os.path.join(ROOT, ".scratch")
    os.makedirs(scratch, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="soak-", dir=scratch)
    data = os.path.join(tmp, "data")
    t0 = time.perf_counter()
    alone = write_config(os.path.join(tmp, "alone"), data, args.steps, args.parallel)
    proc = start(alone, args.nproc)
    out, _ = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"the run left alone failed (exit {proc.returncode}):\n{out[-3000:]}")
    soaked_dir = os.path.join(tmp, "soaked")
    soaked = write_config(soaked_dir, data, args.steps, args.parallel)
    result = soak(args, soaked, soaked_dir)
    result["max_abs_difference"] = difference(os.path.join(tmp, "alone", "model.pt"),
                                              os.path.join(soaked_dir, "model.pt"))
    record = {"bench": "soak", "parallel": args.parallel, "nproc": args.nproc, "steps": args.steps,
              "seed": args.seed, **result, "wall_s": time.perf_counter() - t0,
              **machine(), **environment()}
    print(json.dumps({k: v for k, v in record.items() if k not in ("torch", "python")}, indent=1))
    if not args.no_save:
        append_result("reliability", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
