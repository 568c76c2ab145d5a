"""The render command: videos of scenes from a trained model, like the reference's render.py.

    python render.py CONFIG --sceneid 0 --motion rotate [--fade] [--num-frames 360]
        [--slots slots.safetensors] [--hide K ...] [--solo K]
    (or python -m osrt_fast.render ...)

This is the command line; osrt_fast/rendering.py is the library it drives (frames, videos and
their layout). The run directory is train.py's: a `config.yaml`'s folder (the reference's
convention), else runs/<config name>; the model is read from <run>/model.pt (or model_<it>.pt
with --it, or --checkpoint PATH), on the config's training.device unless --no-cuda, and frames
and videos go to <run>/render/<name or motion>/<sceneid>/. --slots renders the scenes of a slots
file (`python -m osrt_fast.encode`) instead of encoding the dataset's; --hide / --solo edit the
slots (the Slot Mixer mixes each pixel from the others / from that one alone; see
osrt_fast/slots.py). Exit code 0 when rendered, 2 (one line on stderr) for bad arguments, config,
checkpoint, data or slots, or an output folder that cannot be written.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Iterator, Optional, Sequence, Tuple

import torch

from .cameras import MOTIONS
from . import process
from .checkpoint import CheckpointError, load_trained_model
from .config import similar_file
from .data import (batch_spec, get_dataset, is_stream, model_batch, scene_records,
                   scenes_and_views)
from .errors import UsageError, command
from .files import WriteError, explain_write_error
from .rendering import check_video_support, render_scene_frames
from .runs import output_dir_for, run_dir_for
from .slots import SlotsError, check_model_matches, load_slots, visible_slots

# What a render into an unwritable run folder can do instead: it has no output flag.
ELSEWHERE = ("render.py writes in the run folder: copy the run folder to a writable place and "
             "render its config.yaml")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m osrt_fast.render",
                                description="Render a video of a scene along a camera motion.")
    p.add_argument("config", type=str, help="Path to the run's config file (its folder is the "
                                            "run directory).")
    p.add_argument("--no-cuda", action="store_true",
                   help="Run on the CPU (default: the config's training.device).")
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
    p.add_argument("--scene", type=str, metavar="DIR",
                   help="Encode this one scene folder (your own posed images, with a "
                        "transforms.json: docs/datasets.md) and render new views of it, instead "
                        "of the dataset's scenes.")
    p.add_argument("--hide", type=int, nargs="+", default=[], metavar="K",
                   help="Slots to leave out of the mixing (object removal).")
    p.add_argument("--solo", type=int, metavar="K", help="Render from this slot alone.")
    p.add_argument("--max-rays", type=int, default=16384,
                   help="Rays per decoder call (lower it if rendering runs out of memory).")
    return p


def check_args(args) -> Tuple[int, int]:
    """UsageError for flags that cannot work together; else the scene ids [start, stop)."""
    if args.motion not in MOTIONS:
        raise UsageError(f"unknown motion {args.motion!r}; valid motions are: "
                         f"{', '.join(MOTIONS)}")
    if args.num_frames < 1:
        raise UsageError(f"--num-frames must be positive, got {args.num_frames}")
    if args.it is not None and args.checkpoint is not None:
        raise UsageError("--it and --checkpoint both name a checkpoint; give one of them")
    if args.scene is not None and args.slots is not None:
        raise UsageError("--scene and --slots both name what to render; give one of them")
    for flag in ("sceneid", "sceneid_start", "sceneid_stop"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be a scene id >= 0, got {value}")
    if not args.novideo:
        try:
            check_video_support()
        except RuntimeError as e:
            raise UsageError(str(e)) from None
    if args.sceneid_start is None:
        return args.sceneid, args.sceneid + 1
    start = args.sceneid_start
    stop = args.sceneid_stop if args.sceneid_stop is not None else start + 1
    if stop <= start:
        raise UsageError(f"empty scene range [{start}, {stop})")
    return start, stop


def checkpoint_of(args, run_dir: str) -> Optional[str]:
    """The checkpoint --checkpoint or --it names (CheckpointError if it is not there), or None
    for the run's model.pt."""
    if args.checkpoint is None and args.it is None:
        return None
    path = args.checkpoint or os.path.join(run_dir, f"model_{args.it}.pt")
    if args.checkpoint and not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file '{path}' (--checkpoint) does not exist"
                              f"{similar_file(path)}")
    if not os.path.isfile(path):
        saved = sorted(n for n in os.listdir(run_dir) if n.startswith("model_") and n.endswith(".pt")) \
            if os.path.isdir(run_dir) else []
        raise CheckpointError(f"no checkpoint at {path} (--it {args.it}); the run folder holds "
                              + (", ".join(saved) if saved else "no model_<it>.pt backups"))
    return path


def dataset_scenes(cfg, train: bool, start: int, stop: int) -> Iterator[tuple]:
    """(scene id, model inputs, None) of the split's scenes [start, stop)."""
    split = "train" if train else "val"
    dataset = get_dataset(split, cfg.data)
    spec = batch_spec(cfg.data, dataset)
    if not is_stream(dataset) and stop > len(dataset):
        raise UsageError(f"scene ids [{start}, {stop}) out of range: the {split} set has "
                         f"{len(dataset)} items{scenes_and_views(dataset)}, so --sceneid takes 0 "
                         f"to {len(dataset) - 1}")
    # A stream can't be indexed: it is skipped to the first scene, as the reference does (the
    # Kubric reader skips whole records without decoding them).
    for sceneid, record in zip(range(start, stop), scene_records(dataset, range(start, stop))):
        yield sceneid, model_batch(record, spec), None


def folder_scene(cfg, folder: str) -> Iterator[tuple]:
    """(the folder's name, model inputs, None) of one posed scene folder (data/posed.py), its
    input views the config's data.kwargs num_input_views (default 1) first frames."""
    from .data.posed import PosedDataset
    if not os.path.isfile(os.path.join(folder, "transforms.json")):
        raise UsageError(f"--scene {folder}: no transforms.json there; a scene folder holds its "
                         f"images and a transforms.json (docs/datasets.md, 'Your own scenes')")
    views = int((cfg.data.kwargs or {}).get("num_input_views") or 1)
    dataset = PosedDataset(folder, None, num_input_views=views)
    spec = batch_spec(cfg.data, dataset)
    yield os.path.basename(os.path.normpath(folder)), model_batch(dataset[(0, 0)], spec), None


def slots_file_scenes(path: str, model, start: int, stop: int) -> Iterator[tuple]:
    """(scene id, input views and cameras, slots [K, D]) of the file's scenes [start, stop);
    SlotsError before the first if the file does not fit the model or lacks one of them."""
    slot_set = load_slots(path)
    check_model_matches(slot_set, model, path)
    indices = [slot_set.index(i) for i in range(start, stop)]
    for sceneid, i in zip(range(start, stop), indices):
        inputs = {"input_images": slot_set.input_images[i].permute(0, 3, 1, 2).float() / 255,
                  "input_camera_pos": slot_set.input_camera_pos[i]}
        yield sceneid, inputs, slot_set.slots[i]


def visible_of(args, model, cfg) -> Optional[torch.Tensor]:
    """The slots --hide / --solo leave visible (None: all); SlotsError for a model without."""
    if not args.hide and args.solo is None:
        return None
    if model.slot_attention is None:
        raise SlotsError("--hide / --solo edit slots, and this model has none (encoder "
                         f"{cfg.model.encoder!r})")
    return visible_slots(model.slot_attention.num_slots, args.hide, args.solo)


def render_one(args, model, item: dict, out_dir: str, device, slots, visible) -> dict:
    """One scene into `out_dir`, replacing an earlier rendering there (`render_scene_frames`'s
    result); WriteError naming the cause when the folder cannot be written."""
    try:
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
    except OSError as e:
        path = e.filename or out_dir
        raise WriteError(explain_write_error(e, path, elsewhere=ELSEWHERE, kept=None)
                         or f"cannot write {path}: {e.strerror or e}") from None
    return result


@command
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    process.setup()
    start, stop = check_args(args)
    # The same run directory as train.py: a config.yaml's folder, else runs/<config name>.
    run_dir = os.path.abspath(run_dir_for(args.config))
    cfg, model, ckpt_path, state = load_trained_model(
        args.config, checkpoint_of(args, run_dir), "cpu" if args.no_cuda else None, run_dir)
    device = next(model.parameters()).device
    it = state.get("it") if isinstance(state, dict) else None
    print(f"Loaded {ckpt_path}" + (f" (iteration {it})" if it is not None else "")
          + f" on {device}")

    visible = visible_of(args, model, cfg)
    scenes = (slots_file_scenes(args.slots, model, start, stop) if args.slots
              else folder_scene(cfg, args.scene) if args.scene
              else dataset_scenes(cfg, args.train, start, stop))
    name = args.name or args.motion
    out_root = output_dir_for(args.config, ckpt_path)
    for sceneid, item, slots in scenes:
        out_dir = os.path.join(out_root, "render", name, str(sceneid))
        result = render_one(args, model, item, out_dir, device, slots, visible)
        fps = result["num_frames"] / max(result["seconds"], 1e-9)
        print(f"Scene {sceneid}: {result['num_frames']} frames ({fps:.1f} frames/s) written to "
              f"{out_dir}")
        if result["video"] is not None:
            print(f"  videos: {result['renders_video']}, {result['video']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
