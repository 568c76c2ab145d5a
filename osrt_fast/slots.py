"""Slots as data: encode scenes into slot latents, save and load them, edit them, and render any
view of a scene from them.

OSRT's encoder turns a scene's input views into K slot vectors; its Slot Mixer decoder renders a
ray from them, mixing the slots with per-ray weights (the segmentation). Here:

- `encode_scenes(model, dataset, spec, ids)` -> `SlotSet`: the slots of scenes, with what is needed to
  show and re-render them without the dataset (input images and camera poses, scene ids, the
  model config); `save_slots` / `load_slots` write and read it as safetensors
  (`python -m osrt_fast.encode` on the command line);
- `visible_slots(K, hide=..., solo=...)` and `swap_slots(...)`: the paper's slot editing. A hidden
  slot takes no part in the mixing, so each ray's pixel comes from the remaining slots (object
  removal); solo k hides all others; swapping exchanges a slot between two scenes;
- `render_view(model, slots, camera_pos, rot, fov_y, height, width, ...)`: an image and the
  per-pixel slot weights of a pinhole camera anywhere (the viewer's renderer).

Camera poses are camera-to-world rotations in the OpenCV convention (columns: image right, image
down, viewing direction) with a vertical field of view in radians; `cameras.pose_from_rays` reads
them off a dataset's per-pixel ray directions and `cameras.pinhole_rays` makes rays from them.

The safetensors file (format 'osrt_fast.slots/1'), S scenes of V input views of H x W, K slots of
width D:

    slots             float32 [S, K, D]     the encoder's output
    scene_ids         int64   [S]           index of each scene in its split
    input_camera_pos  float32 [S, V, 3]     input camera positions (the model's world frame)
    input_camera_rot  float32 [S, V, 3, 3]  their camera-to-world rotations (OpenCV axes)
    input_fov         float32 [S, V]        their vertical fields of view, radians
    input_images      uint8   [S, V, H, W, 3]
    metadata (strings): format, config (the run's config as JSON: model and data), split,
        checkpoint (its path), iteration.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Tuple

import torch

from .cameras import pinhole_rays, pose_from_rays
from .errors import UserError
from .files import write_atomic

FORMAT = "osrt_fast.slots/1"
TENSORS = ("slots", "scene_ids", "input_camera_pos", "input_camera_rot", "input_fov",
           "input_images")


class SlotsError(UserError, ValueError):
    """A slots file or a slot edit that cannot be used; the message names the problem."""


# ----------------------------------------------------------------------------------------------
# Slot editing

def visible_slots(num_slots: int, hide: Iterable[int] = (), solo: Optional[int] = None
                  ) -> Optional[torch.Tensor]:
    """Indices [k] of the slots a render mixes from, or None for all of them.

    hide: slots to leave out; solo: show this slot alone (with `hide`, an error). SlotsError for
    a slot out of range or when nothing would be left."""
    hide = sorted({int(k) for k in hide})
    named = hide + ([int(solo)] if solo is not None else [])
    bad = [k for k in named if not 0 <= k < num_slots]
    if bad:
        raise SlotsError(f"slot {bad[0]} does not exist: the model has {num_slots} slots "
                         f"(0-{num_slots - 1})")
    if solo is not None:
        if hide:
            raise SlotsError("give either solo or hide, not both")
        return torch.tensor([int(solo)])
    if not hide:
        return None
    if len(hide) == num_slots:
        raise SlotsError(f"all {num_slots} slots hidden: nothing is left to render")
    return torch.tensor([k for k in range(num_slots) if k not in hide])


def swap_slots(slots_a: torch.Tensor, slots_b: torch.Tensor, k_a: int, k_b: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scene A's slot k_a and scene B's slot k_b exchanged: new tensors [K, D] (inputs kept)."""
    for name, s, k in (("a", slots_a, k_a), ("b", slots_b, k_b)):
        if s.dim() != 2 or not 0 <= k < s.shape[0]:
            raise SlotsError(f"scene {name}: need slots [K, D] and 0 <= k < K, got "
                             f"{tuple(s.shape)} and k = {k}")
    if slots_a.shape[1] != slots_b.shape[1]:
        raise SlotsError(f"slot widths differ: {slots_a.shape[1]} and {slots_b.shape[1]}")
    a, b = slots_a.clone(), slots_b.clone()
    a[k_a], b[k_b] = slots_b[k_b], slots_a[k_a]
    return a, b


@torch.no_grad()
def render_view(model, slots: torch.Tensor, camera_pos, rot, fov_y: float, height: int,
                width: int, hide: Iterable[int] = (), solo: Optional[int] = None,
                max_rays: int = 16384) -> Tuple[torch.Tensor, torch.Tensor]:
    """One view of a scene from its slots [K, D]: (rgb [H, W, 3] in [0, 1], slot weights
    [H, W, K]; a hidden slot's weight is 0), as float32 on the model's device.

    camera_pos [3], rot [3, 3] (camera-to-world, OpenCV axes) and fov_y (radians) place a pinhole
    camera; hide / solo as in `visible_slots`. The decoder must mix slots (Slot Mixer or spatial
    broadcast); both backends work."""
    from .rendering import render_image
    device = slots.device
    num_slots = slots.shape[0]
    visible = visible_slots(num_slots, hide, solo)
    rays = pinhole_rays(rot, fov_y, height, width).to(device)[None]
    pos = torch.as_tensor(camera_pos, dtype=torch.float32, device=device).reshape(1, 3)

    def decode(latents, cam, r, max_rays):
        if visible is None:
            return model.decoder(latents, cam, r, max_rays=max_rays)
        return model.decoder(latents, cam, r, max_rays=max_rays, visible=visible.to(device))

    img, extras = render_image(decode, slots[None], pos, rays, max_rays)
    weights = extras.get("segmentation")
    if weights is None:
        raise SlotsError("this model's decoder does not mix slots (decoder 'srt'): it has no "
                         "slots to show or edit")
    return img[0].float().clamp(0, 1), weights[0].float()


# ----------------------------------------------------------------------------------------------
# Encoded scenes

@dataclass
class SlotSet:
    """Encoded scenes (see the module docstring for the tensors); `info`: the file metadata."""
    slots: torch.Tensor
    scene_ids: torch.Tensor
    input_camera_pos: torch.Tensor
    input_camera_rot: torch.Tensor
    input_fov: torch.Tensor
    input_images: torch.Tensor
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.slots.shape[0])

    def index(self, scene_id: int) -> int:
        """Position in this set of the scene with id `scene_id`; SlotsError if absent."""
        hits = (self.scene_ids == int(scene_id)).nonzero()
        if not len(hits):
            ids = self.scene_ids.tolist()
            shown = ", ".join(map(str, ids[:10])) + (" ..." if len(ids) > 10 else "")
            raise SlotsError(f"scene {scene_id} is not in this slots file (it holds scenes "
                             f"{shown})")
        return int(hits[0, 0])

    def model_config(self) -> dict:
        return json.loads(self.info["config"])["model"]

    def select(self, i: int) -> "SlotSet":
        """The set of the one scene at position `i`."""
        return SlotSet(**{k: getattr(self, k)[i:i + 1] for k in TENSORS}, info=self.info)


@torch.no_grad()
def encode_scenes(model, dataset, spec, scene_ids: Sequence[int], config: dict, device=None,
                  split: str = "val", checkpoint: str = "", iteration=None) -> SlotSet:
    """Encodes the dataset's scenes `scene_ids` (indices in the split) with `model`, their input
    views as `spec` (a `BatchSpec`: `data.batch_spec(cfg.data, dataset)`) makes them; `config`:
    the run's config as a plain dict (kept in the file so it can be rendered without the YAML)."""
    device = torch.device(device or next(model.parameters()).device)
    model.eval()
    out = {k: [] for k in TENSORS}
    from .data import model_batch, scene_records
    for sid, record in zip(scene_ids, scene_records(dataset, scene_ids)):
        item = model_batch(record, spec)
        images = item["input_images"].to(device)
        cam = item["input_camera_pos"].to(device)
        rays = item["input_rays"].to(device)
        out["slots"].append(model.encoder(images, cam, rays)[0].float().cpu())
        rot, fov = pose_from_rays(rays[0].cpu())
        out["scene_ids"].append(torch.tensor(int(sid)))
        out["input_camera_pos"].append(cam[0].float().cpu())
        out["input_camera_rot"].append(rot)
        out["input_fov"].append(fov)
        out["input_images"].append((images[0].permute(0, 2, 3, 1).clamp(0, 1) * 255)
                                   .round().to(torch.uint8).cpu())
    if not scene_ids:
        raise SlotsError("no scenes to encode")
    info = {"format": FORMAT, "config": json.dumps(config), "split": split,
            "checkpoint": str(checkpoint), "iteration": "" if iteration is None else str(iteration)}
    return SlotSet(**{k: torch.stack(v) for k, v in out.items()}, info=info)


def save_slots(path: str, slot_set: SlotSet) -> None:
    """Writes `slot_set` to `path` (safetensors) atomically: an existing file is replaced only by
    a complete one."""
    from safetensors.torch import save
    tensors = {k: getattr(slot_set, k).contiguous() for k in TENSORS}
    data = save(tensors, metadata={k: str(v) for k, v in slot_set.info.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: f.write(data))


def load_slots(path: str) -> SlotSet:
    """Reads a file written by `save_slots`; SlotsError naming the problem otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open
    if not os.path.isfile(path):
        raise SlotsError(f"no slots file at {path}: write one with python -m osrt_fast.encode "
                         f"CONFIG --out {path}")
    try:
        with safe_open(path, framework="pt") as f:
            info = dict(f.metadata() or {})
            names = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in TENSORS if k in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise SlotsError(f"{path} is not a readable safetensors file ({e}); write it again with "
                         f"python -m osrt_fast.encode") from None
    if info.get("format") != FORMAT:
        raise SlotsError(f"{path} is not an osrt_fast slots file (metadata format "
                         f"{info.get('format')!r}, expected {FORMAT!r})")
    missing = [k for k in TENSORS if k not in tensors]
    if missing or "config" not in info:
        raise SlotsError(f"{path} lacks {', '.join(missing or ['its config'])}: it is damaged "
                         f"or was not written by python -m osrt_fast.encode")
    return SlotSet(**tensors, info=info)


def check_model_matches(slot_set: SlotSet, model, path: str = "the slots file") -> None:
    """SlotsError unless `model` decodes slots of the file's shape."""
    num_slots, width = slot_set.slots.shape[1:]
    attention = model.slot_attention
    if attention is None:
        raise SlotsError("this model has no slots (encoder 'srt'); use an OSRT config")
    if (attention.num_slots, attention.slot_dim) != (num_slots, width):
        raise SlotsError(f"{path} holds {num_slots} slots of width {width}, but the model makes "
                         f"{attention.num_slots} of width {attention.slot_dim}: use the config "
                         f"and checkpoint the file was encoded with (its metadata names "
                         f"{slot_set.info.get('checkpoint') or 'none'})")
