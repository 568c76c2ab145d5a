"""Your own posed scenes: one folder per scene in the camera format most tools write, the
`transforms.json` of instant-ngp and nerfstudio (NeRF's synthetic scenes use it too).

Layout (`data.dataset: posed`, `data.path: <root>`):

    <root>/{train,val,test}/<scene>/transforms.json     scenes in the order of their names
    <root>/<split>/<scene>/<file_path>                  each frame's image (PNG, RGB(A))
    <root>/<split>/<scene>/<mask_path>                  optional: 8-bit instance ids, 0 = background

transforms.json holds the intrinsics at its top level or in each frame: `fl_x` and `fl_y` (focal
lengths in pixels; `fl_y` defaults to `fl_x`), `cx` and `cy` (default: the image's centre), `w`
and `h` (default: the first image's size), or NeRF's `camera_angle_x` (fl_x = w / 2 /
tan(camera_angle_x / 2)); and `frames`, each with `file_path` (relative to the scene's folder;
without an extension, `.png`, as in NeRF's synthetic scenes), `transform_matrix` (4 x 4
camera-to-world, OpenGL axes: x right, y up, the camera looking along -z) and, optionally,
`mask_path`. Lens distortion is not modelled: a scene with nonzero `k1`, `k2`, `p1` or `p2` is
refused. Masks give the instance ids that ARI and FG-ARI compare with; `num_entities` (the
ids' count, background included) comes from the file's top-level key of that name, else
data.kwargs `num_entities`, else the largest id of the split's masks, read once.

Every scene of a split needs the same number of frames and image size (the model takes a fixed
number of views). Items are as in the ObSuRF layout: item i is scene i mod n seen from input
frames (i div n + j) mod V, targets from every frame. A model renders well only scenes like those
it was trained on (the built-in scenes: z up, objects near the origin, cameras around them).

`export_folder` writes an ObSuRF-layout folder (the built-in scenes) in this layout, the same
scenes, cameras and splits: `python -m osrt_fast.data.posed --from data/demo_scenes --out DIR`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from ..cameras import camera_axes
from ..errors import command
from .errors import CorruptFile, DataError, SkipCounter
from .png import read_png, read_rgb
from .records import SceneCache, ViewPolicy, item_and_seed

LAYOUT = ("<root>/{train,val,test}/<scene>/transforms.json (instant-ngp / nerfstudio: intrinsics "
          "fl_x, fl_y, cx, cy, w, h or camera_angle_x; frames with file_path, transform_matrix "
          "and optionally mask_path)")
SPLITS = ("train", "val", "test")
DISTORTION = ("k1", "k2", "k3", "k4", "p1", "p2")
# OpenGL camera axes (x right, y up, looking along -z) from pixel (column + .5, row + .5, 1).


def opengl_ray_matrix(c2w: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """The ray matrix (records' form: ray = normalize(M @ [x + .5, y + .5, 1])) of a camera with
    camera-to-world `c2w` [4, 4] in OpenGL axes and pinhole intrinsics in pixels."""
    to_camera = np.array([[1 / fx, 0.0, -cx / fx], [0.0, -1 / fy, cy / fy], [0.0, 0.0, -1.0]])
    return (np.asarray(c2w, np.float64)[:3, :3] @ to_camera).astype(np.float32)


def _number(value, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"'{where}': {what} must be a finite number, got {value!r}")
    return float(value)


class PosedScene:
    """One scene folder's transforms.json, read and checked: frames' files, cameras and size."""

    def __init__(self, folder: str):
        self.folder = folder
        path = os.path.join(folder, "transforms.json")
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"'{path}' cannot be read as JSON ({e}). Expected: {LAYOUT}") from None
        frames = meta.get("frames") if isinstance(meta, dict) else None
        if not isinstance(frames, list) or not frames:
            raise DataError(f"'{path}' has no 'frames' list. Expected: {LAYOUT}")
        self.num_entities = meta.get("num_entities")
        self.images, self.masks, self.c2w, intrinsics = [], [], [], []
        for i, frame in enumerate(frames):
            where = f"{path}, frame {i}"
            if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
                raise DataError(f"'{where}' needs file_path and transform_matrix. Expected: {LAYOUT}")
            c2w = np.asarray(frame["transform_matrix"], dtype=np.float64)
            if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
                raise DataError(f"'{where}': transform_matrix must be a finite 4 x 4 matrix")
            file = frame["file_path"]
            if not os.path.splitext(file)[1]:
                file += ".png"
            self.images.append(os.path.normpath(os.path.join(folder, file)))
            mask = frame.get("mask_path")
            self.masks.append(None if mask is None else os.path.normpath(os.path.join(folder, mask)))
            self.c2w.append(c2w)
            merged = {**meta, **frame}
            bad = [k for k in DISTORTION if merged.get(k, 0)]
            if bad:
                raise DataError(f"'{where}' has lens distortion ({', '.join(bad)}), which is not "
                                f"modelled: undistort the images first (e.g. COLMAP's "
                                f"image_undistorter) and write their pinhole intrinsics")
            intrinsics.append(merged)
        if len({m is None for m in self.masks}) > 1:
            raise DataError(f"'{path}': some frames have a mask_path and some do not")
        self.has_masks = self.masks[0] is not None
        self._intrinsics = intrinsics

    def size(self) -> tuple:
        """(height, width) the file declares (w, h), else its first image's."""
        first = self._intrinsics[0]
        if "w" in first and "h" in first:
            return int(first["h"]), int(first["w"])
        try:
            return read_png(self.images[0]).shape[:2]
        except CorruptFile as e:
            raise DataError(f"the image size of '{self.folder}' is neither in its transforms.json "
                            f"(w, h) nor readable from its first image ({e})") from None

    def cameras(self, height: int, width: int) -> tuple:
        """(origins [V, 3], ray matrices [V, 3, 3]) float32, for images of height x width."""
        where = os.path.join(self.folder, "transforms.json")
        mats = []
        for c2w, k in zip(self.c2w, self._intrinsics):
            if "fl_x" in k:
                fx = _number(k["fl_x"], "fl_x", where)
            elif "camera_angle_x" in k:
                fx = width / 2 / math.tan(_number(k["camera_angle_x"], "camera_angle_x", where) / 2)
            else:
                raise DataError(f"'{where}' gives no focal length: fl_x (pixels) or camera_angle_x "
                                f"(radians)")
            fy = _number(k.get("fl_y", fx), "fl_y", where)
            cx = _number(k.get("cx", width / 2), "cx", where)
            cy = _number(k.get("cy", height / 2), "cy", where)
            mats.append(opengl_ray_matrix(c2w, fx, fy, cx, cy))
        origins = np.stack([c[:3, 3] for c in self.c2w]).astype(np.float32)
        return origins, np.stack(mats)


class PosedDataset(SceneCache, Dataset):
    """Scene folders with transforms.json (see the module docstring): records as the ObSuRF
    reader's, with instance ids where the frames have masks.

    Args:
        path: the root folder, or with `mode` None one scene's folder (a one-scene dataset).
        mode: 'train', 'val' or 'test'.
        max_len: if given, the dataset's length.
        num_input_views: input views per item: the item's view and the next ones, cyclically.
        num_entities: instance ids the masks hold, background included (see the docstring).

    A scene whose image or mask is missing, damaged or of another size is replaced by the next
    readable scene, with a counted DataWarning; MAX_SKIPS + 1 in a row raise DataError.
    """

    MAX_SKIPS = 16

    def __init__(self, path: str, mode: Optional[str] = "train", max_len: Optional[int] = None,
                 num_input_views: int = 1, num_entities: Optional[int] = None):
        if mode is not None and mode not in SPLITS:
            raise DataError(f"unknown split {mode!r}; valid splits are: {', '.join(SPLITS)}")
        self.path, self.mode, self.max_len = path, mode, max_len
        self.num_input_views = int(num_input_views)
        self.policy = ViewPolicy("cyclic", self.num_input_views, "all")
        self.skipped = SkipCounter("scene")
        self.render_kwargs = {"min_dist": 0.035, "max_dist": 35.}
        folders = [path] if mode is None else self._scene_folders(path, mode)
        self.scenes = [PosedScene(f) for f in folders]
        first = self.scenes[0]
        self.num_views = len(first.images)
        self.height, self.width = first.size()
        for scene in self.scenes[1:]:
            if len(scene.images) != self.num_views or scene.has_masks != first.has_masks:
                raise DataError(f"'{scene.folder}' has {len(scene.images)} frames"
                                f"{' with masks' if scene.has_masks else ''}, but "
                                f"'{first.folder}' has {self.num_views}"
                                f"{' with masks' if first.has_masks else ''}: every scene of a "
                                f"split needs the same number of frames, all with masks or none")
            if scene.size() != (self.height, self.width):
                raise DataError(f"'{scene.folder}' has {scene.size()[1]}x{scene.size()[0]} images, "
                                f"'{first.folder}' {self.width}x{self.height}: every scene of a "
                                f"split needs one image size")
        if not 1 <= self.num_input_views <= self.num_views:
            raise DataError(f"num_input_views must be between 1 and the {self.num_views} frames "
                            f"per scene, got {self.num_input_views}")
        cams = [s.cameras(self.height, self.width) for s in self.scenes]
        self.origins = np.stack([c[0] for c in cams])
        self.ray_mats = np.stack([c[1] for c in cams])
        self.has_masks = first.has_masks
        self.num_entities = self._count_entities(num_entities) if self.has_masks else 0

    @staticmethod
    def _scene_folders(path: str, mode: str) -> list:
        split = os.path.join(path, mode)
        if not os.path.isdir(split):
            raise DataError(f"'{split}' does not exist: a posed dataset has a folder per split, "
                            f"each with a folder per scene. Expected: {LAYOUT}")
        folders = sorted(os.path.join(split, n) for n in os.listdir(split)
                         if os.path.isfile(os.path.join(split, n, "transforms.json")))
        if not folders:
            raise DataError(f"'{split}' has no scene folders with a transforms.json. Expected: "
                            f"{LAYOUT}")
        return folders

    def _count_entities(self, given: Optional[int]) -> int:
        declared = {s.num_entities for s in self.scenes} - {None}
        if given is None and declared:
            given = max(int(d) for d in declared)
        if given is not None:
            return int(given)
        top = 0
        for scene in self.scenes:
            for mask_path in scene.masks:
                try:
                    top = max(top, int(self._read_mask(mask_path).max()))
                except CorruptFile:
                    pass            # read again, and skipped, when its scene is
        return top + 1

    @property
    def num_scenes(self) -> int:
        return len(self.scenes)

    def __len__(self) -> int:
        if self.max_len is not None:
            return self.max_len
        return len(self.scenes) * self.num_views

    def split_scenes(self) -> list:
        return list(range(min(len(self.scenes), len(self))))

    def _check_size(self, path: str, array: np.ndarray) -> None:
        if array.shape[:2] != (self.height, self.width):
            raise CorruptFile(f"'{path}' is {array.shape[1]}x{array.shape[0]} (width x height), "
                              f"but the split's images are {self.width}x{self.height}")

    @staticmethod
    def _read_mask(path: str) -> np.ndarray:
        mask = read_png(path)
        return mask[..., 0] if mask.ndim == 3 else mask

    def _read_scene(self, scene: int) -> tuple:
        """(images [V, H, W, 3], ids [V, H, W] or None) uint8; CorruptFile names a bad file."""
        s = self.scenes[scene]
        images = []
        for path in s.images:
            img = read_rgb(path)
            self._check_size(path, img)
            images.append(img)
        if not self.has_masks:
            return np.stack(images), None
        masks = []
        for path in s.masks:
            mask = self._read_mask(path)
            self._check_size(path, mask)
            if mask.max() >= self.num_entities:
                raise CorruptFile(f"'{path}' has instance id {mask.max()}, but the split has "
                                  f"{self.num_entities} ids (0-{self.num_entities - 1}); set "
                                  f"num_entities in transforms.json or data.kwargs")
            masks.append(mask.astype(np.uint8))
        return np.stack(images), np.stack(masks)

    def check_scene(self, k: int) -> None:
        """Reads scene k without substitution; CorruptFile names the first problem."""
        self._read_scene(k)

    def __getitem__(self, idx):
        idx, seed = item_and_seed(idx)
        n = len(self.scenes)
        scene, (images, ids) = self.skipped.first_readable(
            self._load_scene, ((idx + a) % n for a in itertools.count()), self.MAX_SKIPS + 1,
            f"{self.MAX_SKIPS + 1} scenes in a row from item {idx} of '{self.path}' could not be "
            f"read, so the folder is badly damaged")
        _, in_views, tgt_views = self.policy.choose(idx, n, self.num_views)
        record = {"images": images, "origins": self.origins[scene], "ray_mats": self.ray_mats[scene],
                  "input_views": in_views, "target_views": tgt_views,
                  "seed": seed, "sceneid": idx}
        if ids is not None:
            record["ids"] = ids
        return record


# ----------------------------------------------------------------------------------------------
# The built-in scenes in this layout

def export_folder(src: str, out: str, kind: str = "procedural", max_objects: int = 6) -> dict:
    """Writes the ObSuRF-layout folder `src` (e.g. the built-in scenes) into `out` in the posed
    layout: per split the same scenes in the same order (folders 000000, 000001, ...), their
    images and masks copied, and their cameras as transforms.json (OpenGL camera-to-world,
    intrinsics in pixels; `num_entities` the metadata's). Returns {split: scenes written}."""
    from ..cameras import FOCAL_LENGTH, SENSOR_WIDTH
    from .obsurf import ObSuRFDataset
    written = {}
    for split in SPLITS:
        try:
            ds = ObSuRFDataset(src, split, kind=kind, max_objects=max_objects)
        except DataError:
            continue                        # an empty split
        h, w = ds.height, ds.width
        fl = w * FOCAL_LENGTH / SENSOR_WIDTH        # the CLEVR3D camera: square pixels
        for k, scene in enumerate(ds.idxs):
            folder = os.path.join(out, split, f"{k:06d}")
            os.makedirs(os.path.join(folder, "images"), exist_ok=True)
            os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
            pos = ds.metadata["camera_pos"][scene].astype(np.float32).astype(np.float64)
            view, horizontal, vertical = camera_axes(pos)
            frames = []
            for v in range(ds.num_views):
                c2w = np.eye(4)
                # OpenGL axes: x right (horizontal), y up (-vertical, which points down the
                # image), z back (-view).
                c2w[:3, :3] = np.stack((horizontal[v], -vertical[v], -view[v]), -1)
                c2w[:3, 3] = pos[v]
                shutil.copyfile(ds._image_path(scene, v), os.path.join(folder, "images", f"{v}.png"))
                shutil.copyfile(ds._mask_path(scene, v), os.path.join(folder, "masks", f"{v}.png"))
                frames.append({"file_path": f"images/{v}.png", "mask_path": f"masks/{v}.png",
                               "transform_matrix": c2w.tolist()})
            meta = {"fl_x": fl, "fl_y": fl, "cx": w / 2, "cy": h / 2, "w": w, "h": h,
                    "num_entities": int(ds.num_entities), "frames": frames}
            with open(os.path.join(folder, "transforms.json"), "w") as f:
                json.dump(meta, f, indent=1)
        written[split] = len(ds.idxs)
    return written


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m osrt_fast.data.posed",
                                description="Write a dataset folder of the ObSuRF layout (e.g. the "
                                            "built-in scenes) as posed scene folders with "
                                            "transforms.json.")
    p.add_argument("--from", dest="src", required=True, help="the ObSuRF-layout folder")
    p.add_argument("--out", required=True, help="the posed dataset's root")
    p.add_argument("--kind", default="procedural", choices=("procedural", "clevr3d", "obsurf_msn"))
    p.add_argument("--max-objects", type=int, default=6, help="skip scenes with more objects")
    args = p.parse_args(argv)
    written = export_folder(args.src, args.out, args.kind, args.max_objects)
    print(f"Wrote {', '.join(f'{n} {s} scenes' for s, n in written.items())} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
