"""How much of a scene reaches the decoder at initialisation: for a config, on one batch of its
training data, with freshly initialised weights (no training), measures

- `token_spread`: the encoder's stem tokens (conv blocks and per-patch linear), their spread
  about the scene's mean token over the mean token's norm (near 0: every token alike);
- `image_share`: how much of that spread the images cause (the tokens' change when the images
  are replaced by their mean colour, over the tokens' spread);
- `slot_scene_share` (slot models): how much the slots differ between scenes, over their norm
  (near 0: the slots are the learned initial slots, whatever the scene);
- `slot_similarity`, `top_slot_share`: the slots' mean cosine similarity, and the largest slot's
  share of the Slot Mixer's weights.

    python -m benchmarks.learning.bench_init_signal [--config configs/demo.yaml]
        [--set KEY=VALUE ...] [--name NAME] [--scenes 8] [--seeds 3] [--no-save]

--set takes model options as dotted paths from the model section
(`encoder_kwargs.conv_init=default`). Results, the mean over --seeds initialisations, append to
benchmarks/results/init_signal.jsonl.
"""
from __future__ import annotations

import argparse
import os

import torch
import yaml

from benchmarks.common import ROOT, append_result, environment, recorded_path


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning.bench_init_signal",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", help="label (default: the config's name and the --set options)")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def spread(x: torch.Tensor) -> torch.Tensor:
    """[B, N, D] -> mean over scenes of |x - mean over N| / |mean over N|."""
    mean = x.mean(1, keepdim=True)
    return ((x - mean).norm(dim=-1).mean(1) / mean.norm(dim=-1).squeeze(1)).mean()


@torch.no_grad()
def measure(model, batch) -> dict:
    from osrt_fast.evaluate import slot_usage
    encoder = model.srt_encoder
    images, cam, rays = batch["input_images"], batch["input_camera_pos"], batch["input_rays"]
    tokens = encoder.stem(images, cam, rays)
    flat = images.mean((3, 4), keepdim=True).expand_as(images)        # each view its mean colour
    tokens_flat = encoder.stem(flat, cam, rays)
    out = {"token_spread": spread(tokens).item(),
           "image_share": ((tokens - tokens_flat).norm(dim=-1).mean()
                           / (tokens - tokens.mean(1, keepdim=True)).norm(dim=-1).mean()).item()}
    if model.slot_attention is not None:
        slots = model.encoder(images, cam, rays)
        out["slot_scene_share"] = ((slots - slots.mean(0)).norm(dim=-1).mean() / slots.norm(dim=-1).mean()).item()
        _, extras = model.decoder(slots, batch["target_camera_pos"], batch["target_rays"])
        usage = slot_usage(extras["segmentation"], slots)
        out["slot_similarity"] = usage["slot_similarity"].mean().item()
        out["top_slot_share"] = usage["slot_max_share"].mean().item()
    return out


def main(argv=None) -> dict:
    from osrt_fast.config import load_config
    from osrt_fast.data import batch_spec, get_dataset, model_batch
    from osrt_fast.data.records import collate
    from osrt_fast.model import OSRT
    args = parse(argv)
    cfg = load_config(args.config)
    model_cfg = cfg.to_dict()["model"]
    for item in args.set:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = model_cfg
        for k in path:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
    dataset = get_dataset("train", cfg.data)
    batch = model_batch(collate([dataset[(i, i)] for i in range(args.scenes)]),
                        batch_spec(cfg.data, dataset))
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        rows.append(measure(OSRT(model_cfg).eval(), batch))
    result = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    name = args.name or " ".join([os.path.splitext(os.path.basename(args.config))[0], *args.set])
    print(name + ": " + ", ".join(f"{k} {v:.3g}" for k, v in result.items()))
    if not args.no_save:
        append_result("init_signal", {"bench": "init_signal", "name": name,
                                      "config": recorded_path(args.config), "set": args.set, "seeds": args.seeds, "scenes": args.scenes,
                                      **result, **environment()})
    return result


if __name__ == "__main__":
    main()
