"""The shipped checkpoint's quality: PSNR, SSIM, ARI and FG-ARI of a checkpoint on a split it was neither
trained nor selected on (by default configs/demo.pt on the demo's test split, 250 scenes of 2-3
objects, whole target images), beside the mean image's PSNR on the same scenes.

    python -m benchmarks.learning.bench_pretrained [--config configs/demo.yaml]
        [--checkpoint configs/demo.pt] [--split test] [--max-eval N] [--no-save]

It runs `python -m osrt_fast.evaluate CONFIG --checkpoint P --full-scale [--test]` in-process and
appends a line to benchmarks/results/pretrained.jsonl (with the checkpoint's step and the first
12 hex digits of its SHA-256, so a README number names the file it came from).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile

from benchmarks.common import ROOT, append_result, environment, recorded_path
from benchmarks.learning.bench_learning import mean_image_psnr


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning.bench_pretrained",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--checkpoint", default=os.path.join(ROOT, "configs", "demo.pt"))
    p.add_argument("--split", default="test", choices=("val", "test"))
    p.add_argument("--max-eval", type=int, help="the split's first N scenes (default: all)")
    p.add_argument("--no-save", action="store_true", help="print only; do not append the result")
    return p.parse_args(argv)


def sha256_prefix(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def checkpoint_fields(config: str, checkpoint: str) -> dict:
    """What names a checkpoint's result: its config and file (as recorded_path gives them) and
    the first 12 hex digits of the file's SHA-256."""
    return {"config": recorded_path(config), "checkpoint": recorded_path(checkpoint),
            "sha256": sha256_prefix(checkpoint)}


def main(argv=None) -> dict:
    from osrt_fast import evaluate
    args = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "eval.json")
        cmd = [args.config, "--checkpoint", args.checkpoint, "--full-scale", "--no-cuda", "--output", out]
        cmd += ["--test"] if args.split == "test" else []
        cmd += ["--max-eval", str(args.max_eval)] if args.max_eval else []
        if evaluate.main(cmd) != 0:
            raise SystemExit("evaluation failed; its error is above")
        result = json.load(open(out))
    row = {"bench": "pretrained", **checkpoint_fields(args.config, args.checkpoint),
           "it": result["it"], "split": args.split,
           "scenes": result["num_scenes"], "psnr": result["psnr"], "ssim": result.get("ssim"),
           "ari": result["ari"],
           "fg_ari": result["fg_ari"],
           "mean_image_psnr": mean_image_psnr(args.config, args.max_eval, split=args.split),
           **environment()}
    if not args.no_save:
        append_result("pretrained", row)
    print(json.dumps(row, indent=1))
    return row


if __name__ == "__main__":
    main()
