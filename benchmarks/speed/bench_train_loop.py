"""The real training loop (train.py) at paper size on the built-in data, for N steps.

Unlike bench_train_step (a synthetic step), this includes data loading, logging and
checkpoints: it checks the whole CUDA path and reports the loop's scenes/s from log.jsonl.

    python -m benchmarks.speed.bench_train_loop --steps 40 --batch 32 --scenes 800
        --root /tmp/osrt_loop [--set precision=bf16 compile=true ...]
    python -m benchmarks.speed.bench_train_loop --config configs/demo.yaml --steps 300 --device cpu

With --config, that config runs as it is (its data generated under --root/data; --batch,
--scenes and --workers then leave it alone); the record gives the steady rate (the mean of the
logged rates after the first log) and its conditions (machine load before and after).
"""
import argparse
import json
import os
import sys
import time

import yaml

from benchmarks.common import ROOT, append_result, environment, recorded_path
from osrt_fast.trainer import main as train_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.bench_train_loop")
    p.add_argument("--config", help="run this config as it is (default: configs/procedural.yaml "
                   "at --batch / --scenes / --workers)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--scenes", type=int, default=800)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--root", default="/tmp/osrt_loop")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more training options, YAML values, e.g. precision=bf16 compile=true "
                        "'activation_checkpointing={encoder_blocks: true}'")
    args = p.parse_args(argv)
    config = args.config or os.path.join(ROOT, "configs", "procedural.yaml")
    with open(config) as f:
        cfg = yaml.safe_load(f)
    cfg["data"]["path"] = os.path.join(args.root, "data")
    cfg["training"].update(print_every=5 if args.config is None else 10, validate_every=args.steps,
                           visualize_every=args.steps, checkpoint_every=args.steps,
                           max_it=args.steps, device=args.device)
    if args.config is None:
        cfg["data"]["kwargs"].update(num_scenes=args.scenes, device=args.device)
        cfg["training"].update(batch_size=args.batch, num_workers=args.workers, eval_batch_size=8)
    for item in args.set:
        key, _, value = item.partition("=")
        cfg["training"][key] = yaml.safe_load(value)
    run = os.path.join(args.root, "run")
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    rc = train_main([os.path.join(run, "config.yaml"), "--max-eval", "32"])
    wall = time.perf_counter() - start
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    steps = [r for r in log if "loss" in r]
    rate = steps[-1]["scenes_per_s"] if steps else None
    steady = [r["scenes_per_s"] for r in steps[1:]]
    t, kw = cfg["training"], cfg["data"]["kwargs"]
    rec = {"bench": "train_loop", "config": recorded_path(config),
           "path": cfg["model"].get("backend", "eager"),
           "dtype": t.get("precision", "fp32"), "training_options": args.set,
           "scenes": t["batch_size"], "rays": cfg["data"]["num_points"],
           "views_in": kw.get("num_input_views", 1), "image": kw.get("height"),
           "slots": cfg["model"]["encoder_kwargs"].get("num_slots"),
           "steps": args.steps, "scenes_per_s_last": rate,
           "scenes_per_s_steady": sum(steady) / len(steady) if steady else None,
           "steps_per_s_steady": sum(steady) / len(steady) / t["batch_size"] if steady else None,
           "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0],
           "cpu_count": os.cpu_count(),
           "mfu_last": steps[-1].get("mfu") if steps else None, "wall_s_incl_data_gen": wall,
           "eval": [r for r in log if "split" in r], "rc": rc, **environment()}
    append_result("train_loop", rec)
    print(json.dumps(rec, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
