"""Frame rate of the live viewer's renderer: frames/s of `osrt_fast.view.Viewer.render` (decode
every pixel from the slots, compose the shown image) plus the PNG encoding the page receives, for
a camera orbiting the scene, one frame after the other (as the viewer's render loop does).

    python -m benchmarks.speed.bench_viewer [--config configs/demo.yaml] [--checkpoint P]
        [--height 64 --width 64] [--frames 30] [--mode render] [--backend eager|triton|folded]
        [--device cpu|cuda] [--msn-hard] [--no-save]

Speed does not depend on the weights, so without --checkpoint the config's model is used with its
initial weights, and the scene's slots are random (no data is needed). --msn-hard measures the
paper's MSN-Hard model (K = 32 slots of 1536). Results append to benchmarks/results/viewer.jsonl.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import time

import torch

from benchmarks.common import MSN_HARD_MODEL, ROOT, append_result, environment
from osrt_fast.config import BACKENDS


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.bench_viewer",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--checkpoint")
    p.add_argument("--msn-hard", action="store_true", help="the paper's MSN-Hard model (K = 32)")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mode", default="render")
    p.add_argument("--backend", choices=BACKENDS, help="default: the config's (MSN-Hard: eager)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def build_viewer(args):
    from osrt_fast.config import load_config
    from osrt_fast.model import OSRT
    from osrt_fast.cameras import look_at_rotation
    from osrt_fast.slots import SlotSet
    from osrt_fast.view import Viewer
    device = torch.device(args.device)
    if args.msn_hard:
        model_cfg, label = {**MSN_HARD_MODEL, "backend": args.backend or "eager"}, "msn_hard"
    else:
        cfg = load_config(args.config).to_dict()
        model_cfg = {**cfg["model"], "backend": args.backend or cfg["model"]["backend"]}
        label = os.path.splitext(os.path.basename(args.config))[0]
    model = OSRT(model_cfg).to(device)
    if args.checkpoint:
        from osrt_fast.checkpoint import load_checkpoint
        load_checkpoint(args.checkpoint, model, map_location=device)
    attention = model.slot_attention
    # A scene without data: random slots of the model's shape.
    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([[[8.0, -6.0, 6.0]]])
    scene = SlotSet(slots=torch.randn(1, attention.num_slots, attention.slot_dim, generator=g),
                    scene_ids=torch.tensor([0]), input_camera_pos=pos,
                    input_camera_rot=look_at_rotation(pos[0, 0])[None, None],
                    input_fov=torch.tensor([[0.8]]),
                    input_images=torch.zeros(1, 1, 8, 8, 3, dtype=torch.uint8),
                    info={"format": "osrt_fast.slots/1", "config": "{}"})
    viewer = Viewer(model, scene)
    viewer.load_scene(0)
    return viewer, label, attention.num_slots


def measure(viewer, height: int, width: int, frames: int, warmup: int, mode: str) -> dict:
    """Frames/s over `frames` frames of a camera orbiting the origin (after `warmup`)."""
    from PIL import Image

    from osrt_fast.cameras import look_at_rotation
    from osrt_fast.view import ViewSettings
    settings = ViewSettings(mode=mode)
    cuda = viewer.device.type == "cuda"

    def frame(i):
        a = 2 * math.pi * i / 90
        pos = torch.tensor([10 * math.cos(a), 10 * math.sin(a), 6.0])
        img = viewer.render(pos, look_at_rotation(pos), 0.8, height, width, settings)
        Image.fromarray(img).save(io.BytesIO(), format="PNG")   # what the page is sent

    for i in range(warmup):
        frame(i)
    if cuda:
        torch.cuda.synchronize()
    times = []
    for i in range(frames):
        t0 = time.perf_counter()
        frame(warmup + i)
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {"frames": frames, "median_ms": 1e3 * median, "fps": 1.0 / median,
            "mean_fps": frames / sum(times)}


def main(argv=None) -> dict:
    args = parse(argv)
    from osrt_fast import process
    threads = process.setup()          # as the viewer's command sets up its process
    viewer, label, num_slots = build_viewer(args)
    result = measure(viewer, args.height, args.width, args.frames, args.warmup, args.mode)
    row = {"bench": "viewer", "model": label, "slots": num_slots, "height": args.height,
           "width": args.width, "mode": args.mode, "backend": viewer.model.backend,
           "threads": threads if args.device == "cpu" else None, **result, **environment()}
    print(f"viewer {label} K={num_slots} {args.height}x{args.width} {viewer.model.backend} on "
          f"{row['device']}: {result['fps']:.1f} frames/s (median {result['median_ms']:.1f} ms)")
    if not args.no_save:
        append_result("viewer", row)
    return row


if __name__ == "__main__":
    main()
