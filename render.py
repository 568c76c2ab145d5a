"""Render videos of scenes from a trained model, like the reference's render.py.

    python render.py runs/demo/config.yaml --sceneid 0 --motion rotate [--fade] [--num-frames 360]
        [--slots slots.safetensors] [--hide K ...] [--solo K]

The run directory is train.py's: a `config.yaml`'s folder (the reference's convention), else
runs/<config name>; the model is read
from <run>/model.pt (or model_<it>.pt with --it, or --checkpoint PATH) and frames and videos go to
<run>/render/<name or motion>/<sceneid>/ (see osrt_fast/rendering.py for the layout).
--slots renders the scenes of a slots file (`python -m osrt_fast.encode`) instead of encoding the
dataset's; --hide / --solo edit the slots (the Slot Mixer mixes each pixel from the others /
from that one alone; see osrt_fast/slots.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Optional, Sequence

import torch

from osrt_fast.config import ConfigError, load_config
from osrt_fast.cameras import MOTIONS
from osrt_fast.rendering import check_video_support, render_scene_frames


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Render a video of a scene along a camera motion.")
    p.add_argument("config", type=str, help="Path to the run's config file (its folder is the "
                                            "run directory).")
    p.add_argument("--no-cuda", action="store_true", help="Do not use CUDA.")
    p.add_argument("--num-frames", type=int, default=360, help="Number of frames to render.")
    p.add_argument("--sceneid", type=int, default=0, help="Id of the scene to render.")
    p.add_argument("--sceneid-start", type=int, help="First scene id of a range to render.")
    p.add_argument("--sceneid-stop", type=int, help="End (exclusive) of a range of scene ids.")
    p.add_argument("--height", type=int, help="Rendered height in pixels (default: input height).")
    p.add_argument("--width", type=int, help="Rendered width in pixels (default: input width).")
    p.add_argument("--name", type=str, help="Name of this sequence (default: the motion).")
    p.add_argument("--motion", type=str, default="rotate",
                   help=f"Camera motion, one of: {', '.join(MOTIONS)}.")
    p.add_argument("--train", action="store_true", help="Use training data.")
    p.add_argument("--fade", action="store_true", help="Ease the motion in and out.")
    p.add_argument("--it", type=int, help="Load model_<it>.pt instead of model.pt.")
    p.add_argument("--checkpoint", type=str, help="Load this checkpoint file instead.")
    p.add_argument("--novideo", action="store_true",
                   help="Don't compile the rendered frames into videos.")
    p.add_argument("--fps", type=float, default=30, help="Video frame rate.")
    p.add_argument("--slots", type=str, help="Render the scenes of this slots file (python -m "
                                             "osrt_fast.encode) instead of the dataset's.")
    p.add_argument("--hide", type=int, nargs="+", default=[], metavar="K",
                   help="Slots to leave out of the mixing (object removal).")
    p.add_argument("--solo", type=int, metavar="K", help="Render from this slot alone.")
    p.add_argument("--max-rays", type=int, default=16384,
                   help="Rays per decoder call (lower it if rendering runs out of memory).")
    return p


def _fail(msg: str) -> int:
    print(f"render.py: error: {msg}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.motion not in MOTIONS:
        return _fail(f"unknown motion {args.motion!r}; valid motions are: {', '.join(MOTIONS)}")
    if args.num_frames < 1:
        return _fail(f"--num-frames must be positive, got {args.num_frames}")
    if args.it is not None and args.checkpoint is not None:
        return _fail("--it and --checkpoint both name a checkpoint; give one of them")
    for flag in ("sceneid", "sceneid_start", "sceneid_stop"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            return _fail(f"--{flag.replace('_', '-')} must be a scene id >= 0, got {value}")
    if not args.novideo:
        try:
            check_video_support()
        except RuntimeError as e:
            return _fail(str(e))
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        return _fail(str(e))

    # The same run directory as train.py: a config.yaml's folder, else runs/<config name>.
    from osrt_fast.runs import run_dir_for
    run_dir = os.path.abspath(run_dir_for(args.config))
    name = args.name or args.motion
    if args.checkpoint is not None:
        ckpt_path = args.checkpoint
    else:
        ckpt_path = os.path.join(run_dir, f"model_{args.it}.pt" if args.it is not None
                                 else "model.pt")
    if not os.path.isfile(ckpt_path):
        hint = (f"train first: python train.py {args.config}" if args.checkpoint is None
                and args.it is None else "check the path / iteration (--it) given")
        return _fail(f"no checkpoint at {ckpt_path}; {hint}")

    if args.sceneid_start is None:
        start, stop = args.sceneid, args.sceneid + 1
    else:
        start = args.sceneid_start
        stop = args.sceneid_stop if args.sceneid_stop is not None else start + 1
    if stop <= start:
        return _fail(f"empty scene range [{start}, {stop})")

    use_cuda = torch.cuda.is_available() and not args.no_cuda
    device = torch.device("cuda" if use_cuda else "cpu")

    # Imported here so that argument and config errors come back fast.
    from osrt_fast.checkpoint import CheckpointError, load_trained_model
    from osrt_fast.data import batch_spec, get_dataset, is_stream, model_batch, scene_records

    try:
        _, model, _, state = load_trained_model(args.config, ckpt_path, device)
    except ConfigError as e:
        return _fail(f"{args.config}: {e}")
    except CheckpointError as e:
        return _fail(str(e))
    it = state.get("it") if isinstance(state, dict) else None
    print(f"Loaded {ckpt_path}" + (f" (iteration {it})" if it is not None else "")
          + f" on {device}")

    from osrt_fast.slots import SlotsError, check_model_matches, load_slots, visible_slots
    try:
        visible = None
        if args.hide or args.solo is not None:
            if model.slot_attention is None:
                raise SlotsError("--hide / --solo edit slots, and this model has none (encoder "
                                 f"{cfg.model.encoder!r})")
            visible = visible_slots(model.slot_attention.num_slots, args.hide, args.solo)
        slot_set = load_slots(args.slots) if args.slots else None
        if slot_set is not None:
            check_model_matches(slot_set, model, args.slots)
            indices = [slot_set.index(i) for i in range(start, stop)]
    except SlotsError as e:
        return _fail(str(e))
    if slot_set is not None:
        for sceneid, i in zip(range(start, stop), indices):
            item = {"input_images": slot_set.input_images[i].permute(0, 3, 1, 2).float() / 255,
                    "input_camera_pos": slot_set.input_camera_pos[i]}
            _render_one(args, model, item, run_dir, name, sceneid, device, slot_set.slots[i],
                        visible)
        return 0

    split = "train" if args.train else "val"
    dataset = get_dataset(split, cfg.data)
    spec = batch_spec(cfg.data, dataset)
    if not is_stream(dataset) and stop > len(dataset):
        return _fail(f"scene ids [{start}, {stop}) out of range: the {split} set has "
                     f"{len(dataset)} scenes")
    # A stream can't be indexed: it is skipped to the first scene, as the reference does (the
    # Kubric reader skips whole records without decoding them).
    for sceneid, item in zip(range(start, stop), scene_records(dataset, range(start, stop))):
        _render_one(args, model, model_batch(item, spec), run_dir, name, sceneid,
                    device, None, visible)
    return 0


def _render_one(args, model, item: dict, run_dir: str, name: str, sceneid: int, device,
                slots, visible) -> None:
    out_dir = os.path.join(run_dir, "render", name, str(sceneid))
    if os.path.isdir(out_dir):
        # A new rendering replaces the old one whole: no frames or videos of an earlier
        # run (say, with more frames) are left beside the new ones.
        print(f"note: replacing the earlier rendering in {out_dir}")
        shutil.rmtree(out_dir)
    result = render_scene_frames(
        model, item, out_dir, args.motion, args.num_frames,
        height=args.height, width=args.width, fade=args.fade, device=device,
        fps=args.fps, video=not args.novideo, max_rays=args.max_rays, slots=slots,
        visible=visible)
    fps = result["num_frames"] / max(result["seconds"], 1e-9)
    print(f"Scene {sceneid}: {result['num_frames']} frames ({fps:.1f} frames/s) written to "
          f"{out_dir}")
    if result["video"] is not None:
        print(f"  videos: {result['renders_video']}, {result['video']}")


if __name__ == "__main__":
    sys.exit(main())
