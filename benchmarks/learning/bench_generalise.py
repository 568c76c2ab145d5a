"""What a shipped checkpoint generalises to: PSNR (beside the mean image's), ARI and FG-ARI of one
checkpoint on scenes unlike its training split, one row per condition.

    python -m benchmarks.learning.bench_generalise [--config configs/demo.yaml]
        [--checkpoint configs/demo.pt] [--items 200] [--only CONDITION ...] [--no-save]
    python -m benchmarks.learning.bench_generalise --table | --write | --check

Conditions (each generated with the built-in generator into data/generalise/<config>-<condition>
where it needs new scenes, `--items` evaluation items, whole target images):
- `test split`: the config's own test split, as trained;
- `unseen seed`: the config's scenes from generator seed 7 (no run has seen it);
- `zoom Z`: the cameras nearer or farther than trained (objects larger or smaller);
- `N input views`: 1, 2 or 3 of the 4 views as inputs (the others the targets), test split;
- `N objects`: every scene with exactly N objects, from the most trained up to beyond K - 1
  (K slots hold N objects and the background only while N < K).
Rows append to benchmarks/results/generalise.jsonl; `--write` puts the latest row of each
(config, condition) into docs/learning.md between its generalise-table markers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import yaml

from benchmarks.common import RESULTS_DIR, ROOT, append_result, environment, write_between_markers
from benchmarks.learning.bench_learning import mean_image_psnr
from benchmarks.learning.bench_pretrained import checkpoint_fields

DEMO = os.path.join(ROOT, "configs", "demo.yaml")
GENERATED = os.path.join(ROOT, "data", "generalise")      # where conditions' own scenes are generated
RESULTS = os.path.join(RESULTS_DIR, "generalise.jsonl")
DOC = os.path.join(ROOT, "docs", "learning.md")
MARKERS = ("<!-- generalise-table:begin (written by python -m benchmarks.learning.bench_generalise "
           "--write) -->", "<!-- generalise-table:end -->")
SCENES = 400            # scenes generated per condition that needs its own (its train split, 90%, is evaluated)


def conditions(data: dict, num_slots: int) -> dict:
    """name: (data kwargs to change, folder name or None for the config's own data, split)."""
    kw = data["kwargs"]
    zoom, most = kw.get("zoom", 1.0), kw.get("max_objects", 6)
    new = {"num_scenes": SCENES}
    out = {"test split": ({}, None, "test"),
           "unseen seed": ({**new, "seed": 7}, "seed7", "train")}
    for z in (round(zoom * 0.7, 2), round(zoom * 1.3, 2)):
        out[f"zoom {z:g}"] = ({**new, "seed": 7, "zoom": z}, f"zoom{z:g}", "train")
    for v in (1, 2, 3):
        out[f"{v} input view{'s' if v > 1 else ''}"] = ({"num_input_views": v}, None, "test")
    for n in range(most, max(most + 2, num_slots) + 1):
        out[f"{n} objects"] = ({**new, "seed": 7, "min_objects": n, "max_objects": n}, f"objects{n}", "train")
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning.bench_generalise",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEMO)
    p.add_argument("--checkpoint", help="default: the config's shipped checkpoint (configs/<name>.pt)")
    p.add_argument("--items", type=int, default=200, help="evaluation items per condition")
    p.add_argument("--only", nargs="*", help="these conditions only (default: all)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--table", action="store_true", help="print the committed results as a table")
    p.add_argument("--write", action="store_true", help="write that table into docs/learning.md")
    p.add_argument("--check", action="store_true", help="exit 1 if docs/learning.md's table is stale")
    return p.parse_args(argv)


def evaluate_condition(config: str, checkpoint: str, name: str, change: tuple, items: int) -> dict:
    """The checkpoint on the first `items` items of the condition's split, whole target images
    (as bench_pretrained; new scenes: their training split, which no run has seen)."""
    import torch

    from osrt_fast.checkpoint import load_trained_model
    from osrt_fast.data import batch_spec, get_dataset, record_loader
    from osrt_fast.evaluate import evaluate
    kwargs, folder, split = change
    cfg = yaml.safe_load(open(config))
    base = os.path.splitext(os.path.basename(config))[0]
    cfg["data"]["kwargs"].update(kwargs)
    cfg["data"]["path"] = (os.path.join(GENERATED, f"{base}-{folder}") if folder
                           else os.path.join(ROOT, cfg["data"]["path"]))
    cfg["training"].update(device="cpu", num_workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{base}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        torch.manual_seed(0)
        run_cfg, model, _, state = load_trained_model(path, checkpoint, "cpu")
        dataset = get_dataset(split, run_cfg.data, max_len=items)
        result = evaluate(model, record_loader(dataset, 8, {"num_workers": 0}, train=False),
                          torch.device("cpu"), batch_spec(run_cfg.data, dataset, full_scale=True),
                          progress=False, precision=run_cfg.training.precision)
        baseline = mean_image_psnr(path, items, split=split)
    return {"bench": "generalise", **checkpoint_fields(config, checkpoint), "it": state.get("it"), "condition": name, "split": split,
            "items": result["num_scenes"], "psnr": result["psnr"], "mean_image_psnr": baseline,
            "ari": result["ari"], "fg_ari": result["fg_ari"], "data": kwargs, **environment()}


def latest_rows() -> list:
    rows = {}
    if os.path.exists(RESULTS):
        for line in open(RESULTS):
            r = json.loads(line)
            rows[(r["config"], r["condition"])] = r
    return list(rows.values())


def table() -> str:
    lines = ["| checkpoint | condition | items | PSNR (mean image) | ARI | FG-ARI |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in latest_rows():
        lines.append(f"| `{r['checkpoint']}` (step {r['it']}) | {r['condition']} | {r['items']} | "
                     f"{r['psnr']:.2f} ({r['mean_image_psnr']:.2f}) | {r['ari']:.2f} | {r['fg_ari']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    if args.table or args.write or args.check:
        if args.table:
            print(table())
            return 0
        current = write_between_markers(DOC, *MARKERS, table(), DOC, check=args.check)
        if args.check and not current:
            print(f"{DOC}'s generalise table is stale: python -m "
                  "benchmarks.learning.bench_generalise --write", file=sys.stderr)
            return 1
        return 0
    from osrt_fast.config import load_config
    checkpoint = args.checkpoint or os.path.splitext(args.config)[0] + ".pt"
    cfg = yaml.safe_load(open(args.config))
    todo = conditions(cfg["data"], load_config(args.config).model.encoder_kwargs["num_slots"])
    names = args.only or list(todo)
    unknown = [n for n in names if n not in todo]
    if unknown:
        print(f"unknown condition(s) {unknown}; known: {', '.join(todo)}", file=sys.stderr)
        return 2
    for name in names:
        row = evaluate_condition(args.config, checkpoint, name, todo[name], args.items)
        print(f"{name}: PSNR {row['psnr']:.2f} (mean image {row['mean_image_psnr']:.2f}), "
              f"ARI {row['ari']:.3f}, FG-ARI {row['fg_ari']:.3f} on {row['items']} items", flush=True)
        if not args.no_save:
            append_result("generalise", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
