"""Evaluate a checkpoint: `python -m osrt_fast.evaluate CONFIG [--checkpoint PATH] [--test] [--full-scale]`.

Prints and writes JSON with PSNR, MSE, ARI and FG-ARI (means over scenes) on sampled target rays
or, with --full-scale, on every pixel of every view.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, load_config
from .data import DataError, get_dataset
from .model import OSRT
from .trainer import evaluate, record_loader, resolve_device, run_dir_for


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Evaluate an OSRT checkpoint (PSNR, ARI, FG-ARI).")
    p.add_argument("config")
    p.add_argument("--checkpoint", help="Checkpoint file (default: <run dir>/model.pt).")
    p.add_argument("--run-dir", help="Run directory (default as train.py).")
    p.add_argument("--test", action="store_true", help="Use the test split instead of val.")
    p.add_argument("--full-scale", action="store_true", help="Evaluate on full images.")
    p.add_argument("--max-eval", type=int, help="Limit the number of evaluation items.")
    p.add_argument("--batch-size", type=int, help="Scenes per batch (default: the config's eval size).")
    p.add_argument("--output", help="JSON output (default: <run dir>/eval_<split>[_full].json).")
    p.add_argument("--no-cuda", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
        run_dir = run_dir_for(args.config, args.run_dir)
        ckpt = args.checkpoint or os.path.join(run_dir, "model.pt")
        if not os.path.exists(ckpt):
            raise CheckpointError(f"no checkpoint at '{ckpt}': train first (python train.py "
                                  f"{args.config}) or pass --checkpoint PATH")
        device = torch.device("cpu") if args.no_cuda else resolve_device(cfg.training.device)
        split = "test" if args.test else "val"
        dataset = get_dataset(split, cfg.data, max_len=args.max_eval, full_scale=args.full_scale)
        model = OSRT(cfg.model).to(device)
        model.check_device(device)
        state = load_checkpoint(ckpt, model, map_location=device)
        bs = args.batch_size or cfg.training.eval_batch_size or max(1, cfg.training.batch_size // 8)
        loader = record_loader(dataset, bs, {"num_workers": min(cfg.training.num_workers, 4)},
                               train=False)
        result = evaluate(model, loader, device, dataset.spec,
                          max_rays=cfg.data.num_points * cfg.training.batch_size)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"split": split, "full_scale": args.full_scale, "checkpoint": ckpt,
              "it": state.get("it"), **result}
    out = args.output or os.path.join(run_dir, f"eval_{split}{'_full' if args.full_scale else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
