"""The real training loop (train.py) at paper size on the built-in data, for N steps.

Unlike bench_eager.py (a synthetic step), this includes data loading, logging and checkpoints:
it checks the whole CUDA path and reports the loop's scenes/s from log.jsonl.

    python benchmarks/bench_train_loop.py --steps 40 --batch 32 --scenes 800 --root /tmp/osrt_loop
        [--set precision=bf16 compile=true ...]
"""
import argparse
import json
import os
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import append_result, environment  # noqa: E402
from osrt_fast.trainer import main as train_main  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
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
    with open(os.path.join(os.path.dirname(__file__), "..", "configs", "procedural.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["data"]["path"] = os.path.join(args.root, "data")
    cfg["data"]["kwargs"].update(num_scenes=args.scenes, device=args.device)
    cfg["training"].update(batch_size=args.batch, num_workers=args.workers, print_every=5,
                           validate_every=args.steps, visualize_every=args.steps,
                           checkpoint_every=args.steps, max_it=args.steps, eval_batch_size=8,
                           device=args.device)
    for item in args.set:
        key, _, value = item.partition("=")
        cfg["training"][key] = yaml.safe_load(value)
    run = os.path.join(args.root, "run")
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    start = time.perf_counter()
    rc = train_main([os.path.join(run, "config.yaml"), "--max-eval", "32"])
    wall = time.perf_counter() - start
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    steps = [r for r in log if "loss" in r]
    rate = steps[-1]["scenes_per_s"] if steps else None
    t = cfg["training"]
    rec = {"bench": "train_loop", "path": cfg["model"].get("backend", "eager"),
           "dtype": t.get("precision", "fp32"), "training_options": args.set, "scenes": args.batch,
           "rays": cfg["data"]["num_points"], "views_in": 3, "image": 128, "slots": 7,
           "steps": args.steps, "scenes_per_s_last": rate,
           "mfu_last": steps[-1].get("mfu") if steps else None, "wall_s_incl_data_gen": wall,
           "eval": [r for r in log if "split" in r], "rc": rc, **environment()}
    append_result("train_loop", rec)
    print(json.dumps(rec, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
