"""Where a checkpoint's FG-ARI is lost: object edges, the background's slot, or merged objects.

    python -m benchmarks.learning.bench_segmentation_errors [--config configs/demo.yaml]
        [--checkpoint configs/demo.pt] [--split test] [--max-eval 200] [--no-save]

On whole target images of the split (as bench_pretrained), per scene with the true masks and the
predicted segmentation's argmax:
- FG-ARI, and FG-ARI with the objects' edge pixels left out (a pixel with a 4-neighbour of
  another true label), beside the edge pixels' share of the objects' pixels: what edges cost;
- the share of object pixels that fall in the background's slot (the slot holding most
  background pixels);
- per number of objects: FG-ARI, the share of scenes where two objects share their main slot
  (merged), and the least pure object's purity (its pixels' share in its main slot).
A line appends to benchmarks/results/segmentation_errors.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import torch

from benchmarks.common import ROOT, append_result, environment
from benchmarks.learning.bench_pretrained import checkpoint_fields


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning.bench_segmentation_errors",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--checkpoint", default=os.path.join(ROOT, "configs", "demo.pt"))
    p.add_argument("--split", default="test", choices=("val", "test"))
    p.add_argument("--max-eval", type=int, default=200, help="the split's first N items")
    p.add_argument("--no-save", action="store_true", help="print only; do not append the result")
    return p.parse_args(argv)


def edge_pixels(labels: torch.Tensor) -> torch.Tensor:
    """labels [..., H, W] -> bool [..., H, W]: pixels with a 4-neighbour of another label."""
    edge = torch.zeros_like(labels, dtype=torch.bool)
    down, right = labels[..., 1:, :] != labels[..., :-1, :], labels[..., :, 1:] != labels[..., :, :-1]
    edge[..., 1:, :] |= down
    edge[..., :-1, :] |= down
    edge[..., :, 1:] |= right
    edge[..., :, :-1] |= right
    return edge


def scene_errors(masks: torch.Tensor, seg: torch.Tensor) -> list:
    """masks [B, P, T] one-hot (channel 0 the background), seg [B, P, S] -> per scene a dict of
    objects, background-slot share of object pixels, merged, least purity."""
    labels = torch.nn.functional.one_hot(seg.argmax(-1), seg.shape[-1]).double()
    table = torch.einsum("bpt,bps->bts", masks.double(), labels)            # pixels of object t in slot s
    out = []
    for scene in table:
        objects = scene[1:][scene[1:].sum(1) > 0]
        main = objects.argmax(1)
        purity = objects.max(1).values / objects.sum(1)
        out.append({"objects": len(objects),
                    "in_background_slot": (objects[:, scene[0].argmax()].sum() / objects.sum()).item(),
                    "merged": len(set(main.tolist())) < len(objects),
                    "least_purity": purity.min().item()})
    return out


def measure(config: str, checkpoint: str, split: str, max_eval: int) -> dict:
    from osrt_fast.checkpoint import load_trained_model
    from osrt_fast.data import batch_spec, get_dataset, make_batch, record_loader
    from osrt_fast.metrics import fg_ari
    torch.manual_seed(0)
    cfg, model, _, state = load_trained_model(config, checkpoint, "cpu")
    dataset = get_dataset(split, cfg.data, max_len=max_eval)
    spec = batch_spec(cfg.data, dataset, full_scale=True)
    scenes, whole, inner, edge_share = [], [], [], []
    for records in record_loader(dataset, 8, {"num_workers": 0}, train=False):
        batch = make_batch(records, spec)
        views, (h, w) = records["target_views"].shape[1], records["images"].shape[2:4]
        with torch.no_grad():
            _, extras = model(batch["input_images"], batch["input_camera_pos"], batch["input_rays"],
                              batch["target_camera_pos"], batch["target_rays"])
        seg, masks = extras["segmentation"].float(), batch["target_masks"].float()
        edge = edge_pixels(masks.argmax(-1).view(-1, views, h, w)).view(len(masks), -1)
        objects = masks[..., 1:].sum(-1) > 0
        whole += fg_ari(masks, seg).tolist()
        inner += fg_ari(masks * (~edge).unsqueeze(-1), seg).tolist()
        edge_share += ((edge & objects).sum(1) / objects.sum(1).clamp(min=1)).tolist()
        for s, f in zip(scene_errors(masks, seg), whole[-len(masks):]):
            scenes.append({**s, "fg_ari": f})
    mean = lambda xs: sum(xs) / len(xs)        # noqa: E731
    by_count = defaultdict(list)
    for s in scenes:
        by_count[s["objects"]].append(s)
    return {"it": state.get("it"), "items": len(scenes), "fg_ari": mean(whole),
            "fg_ari_without_edges": mean(inner), "edge_share_of_object_pixels": mean(edge_share),
            "object_pixels_in_background_slot": mean([s["in_background_slot"] for s in scenes]),
            "by_objects": {str(n): {"scenes": len(v), "fg_ari": mean([s["fg_ari"] for s in v]),
                                    "merged": mean([float(s["merged"]) for s in v]),
                                    "least_purity": mean([s["least_purity"] for s in v])}
                           for n, v in sorted(by_count.items())}}


def main(argv=None) -> dict:
    args = parse(argv)
    result = measure(args.config, args.checkpoint, args.split, args.max_eval)
    row = {"bench": "segmentation_errors", **checkpoint_fields(args.config, args.checkpoint),
           "split": args.split, **result, **environment()}
    if not args.no_save:
        append_result("segmentation_errors", row)
    print(json.dumps(row, indent=1))
    return row


if __name__ == "__main__":
    main()
