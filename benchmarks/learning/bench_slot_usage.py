"""How the Slot Mixer shares rays between slots in the first steps of training: trains a config
from scratch (Adam, linear warm-up to --lr over --warmup steps, as train.py) and records, every
--every steps on the training batch, the loss, FG-ARI, the mean over rays of the largest slot
weight, and each slot's share of all weight (sorted, largest first).

    python -m benchmarks.learning.bench_slot_usage --config CONFIG [--steps 150] [--lr 1e-3]
        [--warmup 100] [--every 25] [--set decoder_kwargs.layer_norm=true ...] [--name NAME] [--no-save]

A share near 1 for one slot in every scene is the collapse that keeps FG-ARI at 0: every ray
takes that slot, so the segmentation is one region. Results append to
benchmarks/results/slot_usage.jsonl.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import yaml

from benchmarks.common import append_result, environment


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning.bench_slot_usage",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="MODEL_KEY=VALUE",
                   help="model options, e.g. decoder_kwargs.layer_norm=true")
    p.add_argument("--name", help="label of this run (default: the config's name)")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def model_config(args) -> dict:
    from osrt_fast.config import load_config
    cfg = load_config(args.config).to_dict()
    for item in args.set:
        key, value = item.split("=", 1)
        node = cfg["model"]
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
    return cfg


def main(argv=None) -> list:
    from osrt_fast.config import config_from_dict
    from osrt_fast.data import batch_spec, get_dataset, make_batch, to_device
    from osrt_fast.data.loaders import record_loader
    from osrt_fast.evaluate import compute_loss
    from osrt_fast.model import OSRT
    args = parse(argv)
    cfg = config_from_dict(model_config(args))
    torch.manual_seed(args.seed)
    model = OSRT(cfg.model)
    dataset = get_dataset("train", cfg.data)
    spec = batch_spec(cfg.data, dataset)
    loader = record_loader(dataset, cfg.training.batch_size, {"num_workers": 1}, train=True,
                           seed=args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    name = args.name or os.path.splitext(os.path.basename(args.config))[0]
    rows, t0 = [], time.perf_counter()
    for it, records in enumerate(loader):
        if it >= args.steps:
            break
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (it + 1) / args.warmup)
        batch = make_batch(to_device(records, "cpu"), spec)
        mse, terms = compute_loss(model, batch)
        loss = mse.mean()
        if it % args.every == 0 or it == args.steps - 1:
            with torch.no_grad():
                _, extras = model(batch["input_images"], batch["input_camera_pos"],
                                  batch["input_rays"], batch["target_camera_pos"],
                                  batch["target_rays"])
                w = extras["segmentation"]
            shares = w.mean((0, 1)).sort(descending=True).values
            row = {"it": it, "loss": loss.item(), "fg_ari": terms["fg_ari"].mean().item(),
                   "max_weight": w.max(-1).values.mean().item(),
                   "slot_shares": [round(x, 4) for x in shares.tolist()],
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"{name} it {it}: loss {row['loss']:.4f}, FG-ARI {row['fg_ari']:.3f}, largest "
                  f"weight {row['max_weight']:.3f}, slot shares {row['slot_shares']}", flush=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if not args.no_save:
        append_result("slot_usage", {"bench": "slot_usage", "name": name, "config": args.config,
                                     "set": args.set, "lr": args.lr, "warmup": args.warmup,
                                     "batch_size": cfg.training.batch_size, "points": rows,
                                     **environment()})
    return rows


if __name__ == "__main__":
    main()
