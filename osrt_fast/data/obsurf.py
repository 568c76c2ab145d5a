"""Datasets in the ObSuRF / CLEVR3D folder layout: CLEVR3D, ObSuRF-MSN and the built-in data.

Semantics follow the reference's `Clevr3dDataset` with OSRT's settings (world coordinates, no
canonical camera transform):

- a split is an index range of the N scenes, then only scenes with at most `max_objects`
  objects are kept;
- item i is scene idxs[i mod n] seen from input view i div n, so a split has n * V items;
- target rays are sampled from all pixels of all V views (with replacement only if there are
  fewer pixels than asked), or all of them with `full_scale`.

Folder layout (read by `ObSuRFDataset`, written by `osrt_fast.scenes.generate_dataset`):

    <root>/metadata.npz                  camera_pos [N, V, 3], shape [N, O], ...
    <root>/images/img_{scene}_{view}.png   RGB(A), first 3 channels used
    <root>/masks/masks_{scene}_{view}.png  8-bit instance ids, 0 = background
"""
from __future__ import annotations

import itertools
import os
from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from ..cameras import camera_ray_matrix
from .errors import CorruptFile, DataError, SkipCounter
from .png import read_png, read_rgb
from .records import SceneCache, ViewPolicy, item_and_seed

GENERATE_HINT = ("The built-in procedural data needs no download: set `dataset: procedural` in "
                 "the config (it is generated on first use), or generate it with "
                 "`python -m osrt_fast.scenes --out data/procedural --num-scenes 1000 "
                 "--height 64 --width 64 --num-views 4`.")

LAYOUT = ("<root>/metadata.npz (camera_pos [N, V, 3], shape [N, O]), "
          "<root>/images/img_{scene}_{view}.png, <root>/masks/masks_{scene}_{view}.png")

# The reference's split index ranges.
SPLIT_RANGES = {
    "clevr3d": {"train": (0, 70000), "val": (70000, 75000), "test": (85000, 100000)},
    "obsurf_msn": {"train": (0, 80000), "val": (80000, 80500), "test": (90000, 100000)},
}
PROCEDURAL_FRACTIONS = {"train": (0.0, 0.9), "val": (0.9, 0.95), "test": (0.95, 1.0)}
KINDS = ("clevr3d", "obsurf_msn", "procedural")


def procedural_split_range(mode: str, n: int) -> tuple:
    """[start, end) of a split of n procedural scenes: 90 / 5 / 5 %, at least one scene in
    each split when n >= 3."""
    if n >= 3:
        n_val = max(1, int(round(0.05 * n)))
        n_test = max(1, n - int(round(0.95 * n)))
        n_train = n - n_val - n_test
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
                  "test": (n_train + n_val, n)}
    else:
        bounds = {k: (int(a * n), int(b * n)) for k, (a, b) in PROCEDURAL_FRACTIONS.items()}
    return bounds[mode]


def repair_hint(kind: str, path: str) -> str:
    """How to replace damaged files of a dataset folder of this kind."""
    if kind == "procedural":
        return (f"Delete the folder '{path}': the built-in data is generated again on first use "
                f"(or with `python -m osrt_fast.scenes --out {path}` and the same settings).")
    return f"Re-download the {kind} dataset into '{path}'."


def load_metadata(meta_path: str, hint: str) -> dict:
    """The arrays of metadata.npz, checked: camera_pos [N, V, 3] finite numbers and shape
    [N, O] numbers. DataError naming the file, the damage and the fix (`hint`) otherwise."""
    def damaged(reason):
        return DataError(f"'{meta_path}' is damaged: {reason}. {hint}")
    try:
        with np.load(meta_path) as f:
            meta = {k: f[k] for k in f.files}
    except Exception as e:   # zipfile / pickle / OSError / EOFError: not a readable archive
        # (numpy's own message would suggest allow_pickle, which is not the fix)
        raise damaged(f"not a readable .npz archive ({type(e).__name__})") from None
    missing = [k for k in ("camera_pos", "shape") if k not in meta]
    if missing:
        raise damaged(f"it lacks key(s) {missing} (has {sorted(meta)}); it needs camera_pos "
                      f"[N, V, 3] and shape [N, O]")
    cam, shape = meta["camera_pos"], meta["shape"]
    if cam.ndim != 3 or cam.shape[-1] != 3 or shape.ndim != 2 or shape.shape[0] != cam.shape[0]:
        raise damaged(f"camera_pos must be [N, V, 3] and shape [N, O] with the same N, got "
                      f"{cam.shape} and {shape.shape}")
    if cam.dtype.kind not in "iuf" or shape.dtype.kind not in "biuf":
        raise damaged(f"camera_pos and shape must hold numbers, got {cam.dtype} and "
                      f"{shape.dtype}")
    if not np.isfinite(cam).all():
        raise damaged("camera_pos holds NaN or infinite values")
    return meta


class ObSuRFDataset(SceneCache, Dataset):
    """CLEVR3D, ObSuRF-MSN or built-in procedural scenes in the ObSuRF layout.

    Args:
        path: dataset folder (see the module docstring for its layout).
        mode: 'train', 'val' or 'test'.
        max_len: if given, the dataset's length (as the reference).
        max_objects: keep only scenes with at most this many objects.
        kind: 'clevr3d', 'obsurf_msn' (the reference's split ranges) or 'procedural' (90/5/5 %).
        num_input_views: input views per item: the item's view and the next ones, cyclically.
        split_ranges: optional {mode: (start, end)} overriding the split index ranges.

    Items are scene records (`records.py`): all V views of the item's scene, input views the
    item's view and the next ones, target views all V; sceneid is the item index.
    `__getitem__((index, seed))` fixes the target-ray draw; `make_batch(records, spec)` on the
    device gives the model inputs (`BatchSpec.for_dataset`: target rays, downsampling);
    input_masks / target_masks have O = shape.shape[1] channels (`num_entities`), 0 = background.

    A scene whose files are missing, damaged (`png.read_png` checks every chunk's CRC), of
    another size than the split's first image, or with mask ids beyond O - 1, is replaced by the
    next readable scene of the split, with a counted DataWarning naming the file and the reason;
    MAX_SKIPS + 1 unreadable scenes in a row raise DataError. `check_scene` reads one scene
    without substitution (`python -m osrt_fast.data.check`).
    """

    MAX_SKIPS = 16

    def __init__(self, path: str, mode: str, max_len: Optional[int] = None, max_objects: int = 6,
                 kind: str = "clevr3d", num_input_views: int = 1,
                 split_ranges: Optional[dict] = None):
        if kind not in KINDS:
            raise DataError(f"unknown dataset kind {kind!r}; valid kinds are: {', '.join(KINDS)}")
        if mode not in ("train", "val", "test"):
            raise DataError(f"unknown split {mode!r}; valid splits are: train, val, test")
        self.path, self.mode, self.kind = path, mode, kind
        self.max_len = max_len
        self.max_objects = max_objects
        self.num_input_views = int(num_input_views)
        self.policy = ViewPolicy("cyclic", self.num_input_views, "all")
        self.render_kwargs = {"min_dist": 0.035, "max_dist": 35.}
        self.skipped = SkipCounter("scene")

        meta_path = os.path.join(path, "metadata.npz")
        if not os.path.isdir(path):
            raise DataError(f"dataset folder '{path}' does not exist. Expected layout: {LAYOUT}. "
                            + GENERATE_HINT)
        if not os.path.isfile(meta_path):
            raise DataError(f"'{meta_path}' is missing, so '{path}' is not a complete dataset "
                            f"folder. Expected layout: {LAYOUT}. For built-in data, re-run the "
                            f"generator on that folder: it resumes and writes metadata.npz last. "
                            + GENERATE_HINT)
        self.metadata = load_metadata(meta_path, repair_hint(kind, path))
        cam, shape = self.metadata["camera_pos"], self.metadata["shape"]
        self.folder_scenes, self.num_views = cam.shape[:2]
        self.num_entities = shape.shape[1]
        if not 1 <= self.num_input_views <= self.num_views:
            raise DataError(f"num_input_views must be between 1 and the {self.num_views} views "
                            f"per scene, got {self.num_input_views}")

        if split_ranges is not None:
            start, end = split_ranges[mode]
        elif kind == "procedural":
            start, end = procedural_split_range(mode, self.folder_scenes)
        else:
            start, end = SPLIT_RANGES[kind][mode]
        start, end = min(start, self.folder_scenes), min(end, self.folder_scenes)
        num_objs = (shape[start:end] > 0).sum(1)
        self.idxs = np.arange(start, end)[num_objs <= max_objects]
        if len(self.idxs) == 0:
            raise DataError(
                f"the {mode} split of '{path}' is empty: {kind} takes scenes [{start}, {end}) of "
                f"the folder's {self.folder_scenes}, and {end - start} of them have at most "
                f"max_objects={max_objects} objects. Use a folder with more scenes (the "
                f"{kind} split ranges are {self._ranges_text()}) or raise max_objects.")

        self.height, self.width = self._first_image_size()
        # Every camera's ray matrix at once: a function of the metadata alone, not of an item.
        self.ray_mats = camera_ray_matrix(cam.astype(np.float32), self.height, self.width)

    @property
    def num_scenes(self) -> int:
        """Scenes in this split (after the max_objects filter)."""
        return len(self.idxs)

    def _ranges_text(self) -> str:
        if self.kind == "procedural":
            return "90 / 5 / 5 % of the scenes"
        return ", ".join(f"{k} {a}-{b}" for k, (a, b) in SPLIT_RANGES[self.kind].items())

    def _image_path(self, scene: int, view: int) -> str:
        return os.path.join(self.path, "images", f"img_{scene}_{view}.png")

    def _mask_path(self, scene: int, view: int) -> str:
        return os.path.join(self.path, "masks", f"masks_{scene}_{view}.png")

    def __len__(self) -> int:
        if self.max_len is not None:
            return self.max_len
        return len(self.idxs) * self.num_views

    def _first_image_size(self) -> tuple:
        """(height, width) of the split's first image, which all views must share; DataError if
        it is missing or damaged (then the size is unknown)."""
        first = self._image_path(self.idxs[0], 0)
        if not os.path.isfile(first):
            raise DataError(f"image file '{first}' is missing: the dataset folder is incomplete. "
                            f"Expected layout: {LAYOUT}. Re-download the dataset, or for the "
                            f"built-in data re-run the generator (it resumes and fills the gaps).")
        try:
            return read_png(first).shape[:2]
        except CorruptFile as e:
            raise DataError(f"the first image of the {self.mode} split sets the image size but "
                            f"cannot be read ({e}). {repair_hint(self.kind, self.path)}") from None

    def _check_size(self, path: str, array: np.ndarray) -> None:
        if array.shape[:2] != (self.height, self.width):
            raise CorruptFile(f"'{path}' is {array.shape[1]}x{array.shape[0]} (width x height), "
                              f"but the split's images are {self.width}x{self.height} (from "
                              f"'{self._image_path(self.idxs[0], 0)}')")

    def _load_view(self, scene: int, view: int) -> tuple:
        """(RGB [H, W, 3], ids [H, W]) uint8 of one view; CorruptFile if a file is missing or
        damaged, of the wrong size or channel count, or has an id beyond the O - 1 slots."""
        img_path, mask_path = self._image_path(scene, view), self._mask_path(scene, view)
        img = read_rgb(img_path)
        self._check_size(img_path, img)
        mask = read_png(mask_path)
        if mask.ndim == 3:
            mask = mask[..., 0]
        self._check_size(mask_path, mask)
        if mask.max() >= self.num_entities:
            raise CorruptFile(f"'{mask_path}' has instance id {mask.max()}, but metadata 'shape' "
                              f"has only {self.num_entities} slots (ids 0-"
                              f"{self.num_entities - 1})")
        return img, mask.astype(np.uint8)

    def split_scenes(self) -> list:
        n = len(self.idxs)
        return [int(self.idxs[k]) for k in range(min(n, len(self)))]

    def _read_scene(self, scene: int) -> list:
        return [self._load_view(scene, v) for v in range(self.num_views)]

    def check_scene(self, k: int) -> None:
        """Reads scene k of the split (0 <= k < num_scenes) as training does; CorruptFile names
        the first problem."""
        self._read_scene(int(self.idxs[k]))

    def __getitem__(self, idx):
        idx, seed = item_and_seed(idx)
        n = len(self.idxs)
        scene, loaded = self.skipped.first_readable(
            self._load_scene, (int(self.idxs[(idx + a) % n]) for a in itertools.count()),
            self.MAX_SKIPS + 1,
            f"{self.MAX_SKIPS + 1} scenes in a row from item {idx} of '{self.path}' could not be "
            f"read, so the folder is badly damaged. {repair_hint(self.kind, self.path)}")
        _, in_views, tgt_views = self.policy.choose(idx, n, self.num_views)
        camera_pos = self.metadata["camera_pos"][scene].astype(np.float32)   # [V, 3]
        return {
            "images": np.stack([a for a, _ in loaded]),
            "ids": np.stack([b for _, b in loaded]),
            "origins": camera_pos,
            "ray_mats": self.ray_mats[scene],
            "input_views": in_views,
            "target_views": tgt_views,
            "seed": seed,
            "sceneid": idx,
        }
