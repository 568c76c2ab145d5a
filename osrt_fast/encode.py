"""Export the slots of scenes: python -m osrt_fast.encode CONFIG [--split val] [--scenes A:B]
[--checkpoint P] [--out FILE] [--no-cuda]

Encodes each scene's input views with the run's model and writes the slots, the input views'
images and camera poses, the scene ids and the config to one safetensors file (layout in
osrt_fast/slots.py), by default the run folder's slots.safetensors. render.py and the viewer
(`python -m osrt_fast.view --slots FILE`) render from it without the dataset. Exit code 0 when written, 2 for bad arguments, config, checkpoint
or data.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence


from . import process
from .checkpoint import load_trained_model
from .data import batch_spec, get_dataset, scenes_and_views
from .errors import UsageError, command
from .files import write_error
from .runs import output_dir_for
from .slots import encode_scenes, save_slots


def parse_range(text: str) -> tuple:
    """'A:B' -> (A, B), 'A' -> (A, A + 1); UsageError naming the form."""
    try:
        if ":" in text:
            a, b = text.split(":")
            start, stop = int(a or 0), int(b)
        else:
            start = int(text)
            stop = start + 1
    except ValueError:
        raise UsageError(f"--scenes takes A:B (scenes A to B-1) or one scene id, got {text!r}") \
            from None
    if start < 0 or stop <= start:
        raise UsageError(f"--scenes {text}: need 0 <= A < B")
    return start, stop


@command
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m osrt_fast.encode",
                                description="Write scenes' slots to a safetensors file.")
    p.add_argument("config", help="the run's config (its folder, or runs/<name>, holds model.pt)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--scenes", default="0:8", help="A:B, scenes A to B-1 of the split (default 0:8)")
    p.add_argument("--checkpoint", help="checkpoint file (default <run dir>/model.pt)")
    p.add_argument("--out", help="the slots file (default <run dir>/slots.safetensors, "
                                 "e.g. runs/demo/slots.safetensors)")
    p.add_argument("--no-cuda", action="store_true")
    args = p.parse_args(argv)
    process.setup()
    start, stop = parse_range(args.scenes)
    cfg, model, ckpt, state = load_trained_model(args.config, args.checkpoint,
                                                 "cpu" if args.no_cuda else None)
    device = next(model.parameters()).device
    dataset = get_dataset(args.split, cfg.data)
    spec = batch_spec(cfg.data, dataset)
    if stop > len(dataset):
        raise UsageError(f"--scenes {args.scenes}: the {args.split} split has {len(dataset)} "
                         f"items (0-{len(dataset) - 1}){scenes_and_views(dataset)}")
    t0 = time.perf_counter()
    slot_set = encode_scenes(model, dataset, spec, range(start, stop), cfg.to_dict(), device,
                             args.split, ckpt, state.get("it"))
    out = args.out or os.path.join(output_dir_for(args.config, args.checkpoint), "slots.safetensors")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_slots(out, slot_set)
    except OSError as e:
        raise write_error(e, out, "--out FILE") from None
    k, d = slot_set.slots.shape[1:]
    print(f"wrote {len(slot_set)} scenes x {k} slots of width {d} ({args.split} {start}:{stop}, "
          f"iteration {state.get('it')}) to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
