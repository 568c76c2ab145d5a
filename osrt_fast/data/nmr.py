"""The NMR dataset (ShapeNet renders of Kato et al.'s Neural 3D Mesh Renderer), as SRT uses it.

Semantics follow the reference's `NMRDataset` with OSRT's settings (world coordinates, no
canonical camera transform):

- scenes are the objects of every category in metadata.yaml, category by category in file
  order, each category's objects in the order of its `softras_<split>.lst`;
- item i is scene i mod n seen from input view i div n (ViewPolicy 'cyclic', one input view),
  so a split has n * 24 items; target rays come from the other 23 views, pooled (the reference
  chooses views without randomness in every mode); sceneid is the item index;
- cameras: the reference rotates the data's y-up frame to z-up with
  rot = [[1,0,0,0], [0,0,-1,0], [0,1,0,0], [0,0,0,1]], world_mat_inv <- rot @ world_mat_inv,
  and casts the ray of grid point (x, y), x = linspace(-1, 1, W)[column],
  y = linspace(-1, 1, H)[row], along normalize((world_mat_inv @ camera_mat_inv)[:3, :3] @
  (x, y, 1)) from world_mat_inv[:3, 3]. Records express this as ray matrices
  (`cameras.nmr_ray_matrix`).

Folder layout (the DVR release `NMR_Dataset.zip`, or `write_fixture` for a tiny copy):

    <root>/metadata.yaml                       {synset: {id: synset, name: ...}, ...}
    <root>/<synset>/softras_{train,val,test}.lst   object ids, one per line
    <root>/<synset>/<object>/image/0000.png ... 0023.png   24 views, 64 x 64 RGB
    <root>/<synset>/<object>/cameras.npz      world_mat_i, world_mat_inv_i, camera_mat_i,
                                              camera_mat_inv_i (4 x 4), i = 0 .. 23
"""
from __future__ import annotations

import itertools
import os
import sys
from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from ..cameras import nmr_origin, nmr_ray_matrix
from .errors import CorruptFile, DataError, SkipCounter
from ..errors import command
from .png import read_png
from .records import SceneCache, ViewPolicy, item_and_seed

NUM_VIEWS = 24
SPLITS = ("train", "val", "test")
VIEW_POLICY = ViewPolicy(inputs="cyclic", num_input_views=1, targets="others")

LAYOUT = ("<root>/metadata.yaml ({synset: {id: synset, ...}}), "
          "<root>/<synset>/softras_{train,val,test}.lst, "
          "<root>/<synset>/<object>/image/0000.png ... 0023.png and "
          "<root>/<synset>/<object>/cameras.npz")

WHERE = ("NMR is the ShapeNet dataset of Kato et al.'s Neural 3D Mesh Renderer as distributed by "
         "the SoftRas and DVR projects: download the DVR release "
         "https://s3.eu-central-1.amazonaws.com/avg-projects/differentiable_volumetric_rendering/"
         "data/NMR_Dataset.zip and point the path at its NMR_Dataset folder. For a tiny copy in "
         "this format: `python -m osrt_fast.data.nmr --out DIR`. The built-in procedural data "
         "needs no download: set `dataset: procedural` in the config.")


def read_split(path: str, mode: str) -> list:
    """Scene folders '<synset>/<object>' of a split, in the reference's order."""
    import yaml
    meta_path = os.path.join(path, "metadata.yaml")
    if not os.path.isdir(path):
        raise DataError(f"NMR dataset folder '{path}' does not exist. Expected layout: {LAYOUT}. "
                        + WHERE)
    if not os.path.isfile(meta_path):
        raise DataError(f"'{meta_path}' is missing, so '{path}' is not an NMR dataset folder. "
                        f"Expected layout: {LAYOUT}. " + WHERE)
    with open(meta_path) as f:
        try:
            metadata = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise DataError(f"'{meta_path}' is not valid YAML ({e}); re-download it. "
                            + WHERE) from None
    entries = list(metadata.values()) if isinstance(metadata, dict) else []
    if not entries or not all(isinstance(e, dict) and "id" in e for e in entries):
        raise DataError(f"'{meta_path}' must map each category to an entry with an 'id' (its "
                        f"synset folder name), e.g. {{'02691156': {{'id': '02691156', "
                        f"'name': 'airplane'}}}}; got {str(metadata)[:200]}. Re-download it.")
    class_ids = []
    for e in entries:
        if not isinstance(e["id"], str):
            # An unquoted 8-digit id such as 04256520 reads as an octal integer in YAML.
            raise DataError(f"'{meta_path}': category id {e['id']!r} is not a string; quote it "
                            f"(id: '04256520') so YAML keeps it as the folder name.")
        class_ids.append(e["id"])

    scenes = []
    for class_id in class_ids:
        list_path = os.path.join(path, class_id, f"softras_{mode}.lst")
        if not os.path.isfile(list_path):
            raise DataError(f"the {mode} split list '{list_path}' is missing (category "
                            f"{class_id} of '{meta_path}'). Expected layout: {LAYOUT}. " + WHERE)
        with open(list_path) as f:
            lines = f.readlines()
        # As the reference: lines of length <= 1 (with their newline) are dropped; we also drop
        # whitespace-only ones, which would name the category folder itself.
        ids = [line.rstrip() for line in lines if len(line) > 1]
        scenes.extend(os.path.join(class_id, i) for i in ids if i)
    return scenes


class NMRDataset(SceneCache, Dataset):
    """The NMR dataset as SRT uses it (see the module docstring for layout and semantics).

    Args:
        path: the NMR_Dataset folder.
        mode: 'train', 'val' or 'test' (the softras_<mode>.lst lists).
        max_len: if given, the dataset's length (as the reference).

    Items are scene records (`records.py`) without 'ids' (NMR has no instance masks): all 24
    views, input view i div n, target views the other 23. `__getitem__((index, seed))` fixes
    the target-ray draw; `make_batch(records, spec)` on the device gives the model inputs
    (`BatchSpec.for_dataset`).
    A scene with a missing, damaged (`png.read_png` checks every chunk's CRC) or wrong-size
    image, or a missing or damaged cameras.npz, is replaced by the next readable scene, with a
    counted DataWarning naming the file and the reason; MAX_SKIPS + 1 unreadable scenes in a row
    raise DataError. `check_scene` reads one scene without substitution.
    """

    MAX_SKIPS = 16

    def __init__(self, path: str, mode: str, max_len: Optional[int] = None):
        if mode not in SPLITS:
            raise DataError(f"unknown split {mode!r}; valid splits are: {', '.join(SPLITS)}")
        self.path, self.mode = path, mode
        self.max_len = max_len
        self.num_views = NUM_VIEWS
        self.num_entities = 0                       # no instance masks
        self.render_kwargs = {"min_dist": 2., "max_dist": 4.}
        self.skipped = SkipCounter("NMR scene")

        self.scene_paths = read_split(path, mode)
        self.num_scenes = len(self.scene_paths)
        self.policy = VIEW_POLICY
        if self.num_scenes == 0:
            raise DataError(f"the {mode} split of '{path}' is empty: every category's "
                            f"softras_{mode}.lst lists no objects. Use a complete NMR folder. "
                            + WHERE)

        try:
            self._check_files(0)
            self.height, self.width = read_png(self._image_path(0, 0), "RGB").shape[:2]
        except CorruptFile as e:
            raise DataError(f"the first scene of the {mode} split sets the image size but "
                            f"cannot be read: {e}. Re-download the dataset. " + WHERE) from None

    def __len__(self) -> int:
        if self.max_len is not None:
            return self.max_len
        return self.num_scenes * self.num_views

    def _scene_dir(self, scene: int) -> str:
        return os.path.join(self.path, self.scene_paths[scene])

    def _image_path(self, scene: int, view: int) -> str:
        return os.path.join(self._scene_dir(scene), "image", f"{view:04d}.png")

    def _check_files(self, scene: int) -> None:
        """CorruptFile naming the missing files of a scene folder."""
        folder = self._scene_dir(scene)
        need = [self._image_path(scene, v) for v in range(self.num_views)]
        need.append(os.path.join(folder, "cameras.npz"))
        missing = [os.path.relpath(p, folder) for p in need if not os.path.isfile(p)]
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more"
                                             if len(missing) > 6 else "")
            raise CorruptFile(f"scene folder '{folder}' is incomplete: {shown} missing (each "
                              f"object needs image/0000.png ... image/"
                              f"{self.num_views - 1:04d}.png and cameras.npz)")

    def _load_cameras(self, scene: int) -> dict:
        cam_path = os.path.join(self._scene_dir(scene), "cameras.npz")
        try:
            with np.load(cam_path) as f:
                cams = {k: f[k] for k in f.files}
        except Exception as e:      # zipfile / pickle / OSError: a damaged archive
            raise CorruptFile(f"'{cam_path}': {type(e).__name__}: {e}") from None
        keys = [f"{k}_{i}" for k in ("world_mat_inv", "camera_mat_inv")
                for i in range(self.num_views)]
        missing = [k for k in keys if k not in cams]
        if missing:
            raise CorruptFile(f"'{cam_path}' lacks {len(missing)} camera matrices, e.g. "
                              f"{missing[:4]}; it needs world_mat_inv_i and camera_mat_inv_i "
                              f"(4 x 4) for i = 0 .. {self.num_views - 1}")
        bad = [k for k in keys if cams[k].shape != (4, 4) or not np.isfinite(cams[k]).all()]
        if bad:
            raise CorruptFile(f"'{cam_path}': {bad[0]} is not a finite 4 x 4 matrix (shape "
                              f"{cams[bad[0]].shape})")
        return {k: np.stack([cams[f"{k}_{i}"] for i in range(self.num_views)])
                for k in ("world_mat_inv", "camera_mat_inv")}

    def split_scenes(self) -> list:
        return list(range(min(self.num_scenes, len(self))))

    def _read_scene(self, scene: int):
        self._check_files(scene)
        cams = self._load_cameras(scene)
        images = []
        for v in range(self.num_views):
            img = read_png(self._image_path(scene, v), "RGB")
            if img.shape[:2] != (self.height, self.width):
                raise CorruptFile(f"'{self._image_path(scene, v)}' is {img.shape[1]}x"
                                  f"{img.shape[0]} (width x height) but the split's images are "
                                  f"{self.width}x{self.height} (from '{self._image_path(0, 0)}')")
            images.append(img)
        return np.stack(images), cams

    def check_scene(self, k: int) -> None:
        """Reads scene k of the split as training does; CorruptFile names the first problem."""
        self._read_scene(k)

    def __getitem__(self, idx):
        idx, seed = item_and_seed(idx)
        scene, inputs, targets = self.policy.choose(idx, self.num_scenes, self.num_views)
        _, (images, cams) = self.skipped.first_readable(
            self._load_scene, ((scene + a) % self.num_scenes for a in itertools.count()),
            self.MAX_SKIPS + 1,
            f"{self.MAX_SKIPS + 1} scenes in a row from item {idx} of '{self.path}' could not be "
            f"read, so the folder is badly damaged: re-download it")
        return {
            "images": images,
            "origins": nmr_origin(cams["world_mat_inv"]),
            "ray_mats": nmr_ray_matrix(cams["world_mat_inv"], cams["camera_mat_inv"],
                                       self.height, self.width),
            "input_views": inputs,
            "target_views": targets,
            "seed": seed,
            "sceneid": idx,
        }


# ----------------------------------------------------------------------------------------------
# A tiny dataset in NMR's format

FIXTURE_CATEGORY_NAMES = {"02691156": "airplane", "02828884": "bench", "02933112": "cabinet",
                          "02958343": "car", "03001627": "chair", "03211117": "display",
                          "03636649": "lamp", "03691459": "loudspeaker", "04090263": "rifle",
                          "04256520": "sofa", "04379243": "table", "04401088": "telephone",
                          "04530566": "watercraft"}


def fixture_cameras(num_views: int = NUM_VIEWS, radius: float = 2.732,
                    elevation_deg: float = 30.0, focal: float = 2.1875) -> dict:
    """Cameras in NMR's file format: num_views cameras on a ring around the origin of the data's
    y-up frame (azimuth 360 / num_views degrees apart, at `elevation_deg`, `radius` away),
    looking at the origin.

    world_mat is the world-to-camera extrinsic [[R, t], [0, 1]] whose camera axes are x right,
    y down (image rows), z forward; camera_mat is diag(focal, focal, 1, 1), so the grid point
    (x, y) in [-1, 1]^2 sees camera direction (x / focal, y / focal, 1): a field of view of
    2 atan(1 / focal) ~ 49 degrees. The inverses are exact matrix inverses.
    """
    out = {}
    elev = np.deg2rad(elevation_deg)
    for i in range(num_views):
        az = 2 * np.pi * i / num_views
        centre = radius * np.array([np.cos(elev) * np.sin(az), np.sin(elev),
                                    np.cos(elev) * np.cos(az)])
        forward = -centre / np.linalg.norm(centre)
        right = np.cross(forward, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        rot = np.stack([right, down, forward])                       # world -> camera
        world = np.eye(4)
        world[:3, :3], world[:3, 3] = rot, -rot @ centre
        camera = np.diag([focal, focal, 1.0, 1.0])
        out[f"world_mat_{i}"] = world
        out[f"world_mat_inv_{i}"] = np.linalg.inv(world)
        out[f"camera_mat_{i}"] = camera
        out[f"camera_mat_inv_{i}"] = np.linalg.inv(camera)
    return out


def write_fixture(root: str, categories=("02691156", "04256520"),
                  objects_per_split=None, size: int = 64, seed: int = 0) -> str:
    """Writes a tiny dataset in NMR's exact layout under `root` and returns `root`.

    Each category gets objects_per_split[mode] objects per split (default train 3, val 1,
    test 1) with 32-hex-digit ids; each object has 24 size x size RGB PNGs of seeded random
    colours (smooth blobs plus per-pixel noise, so every pixel is identifiable) and the
    cameras of `fixture_cameras`.
    """
    from PIL import Image
    import yaml
    if objects_per_split is None:
        objects_per_split = {"train": 3, "val": 1, "test": 1}
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    metadata = {c: {"id": c, "name": FIXTURE_CATEGORY_NAMES.get(c, f"category_{c}")}
                for c in categories}
    with open(os.path.join(root, "metadata.yaml"), "w") as f:
        yaml.safe_dump(metadata, f, sort_keys=False)
    cams = fixture_cameras()
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    for c in categories:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for mode in SPLITS:
            ids = ["".join(rng.choice(list("0123456789abcdef"), 32))
                   for _ in range(objects_per_split.get(mode, 0))]
            with open(os.path.join(root, c, f"softras_{mode}.lst"), "w") as f:
                f.writelines(i + "\n" for i in ids)
            for obj in ids:
                folder = os.path.join(root, c, obj)
                os.makedirs(os.path.join(folder, "image"), exist_ok=True)
                np.savez(os.path.join(folder, "cameras.npz"), **cams)
                for v in range(NUM_VIEWS):
                    phase = rng.uniform(0, 2 * np.pi, 3)
                    freq = rng.uniform(1, 4, (3, 2))
                    smooth = 0.5 + 0.35 * np.sin(2 * np.pi * (freq[:, :1, None] * xx
                                                              + freq[:, 1:, None] * yy)
                                                 + phase[:, None, None])
                    img = smooth.transpose(1, 2, 0) * 255 + rng.integers(-25, 26, (size, size, 3))
                    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                        os.path.join(folder, "image", f"{v:04d}.png"))
    return root


@command
def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m osrt_fast.data.nmr",
                                description="Write a tiny dataset in NMR's exact format "
                                            "(metadata.yaml, softras_*.lst, 24 PNGs and "
                                            "cameras.npz per object).")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--categories", nargs="+", default=["02691156", "04256520"],
                   help="ShapeNet synset ids")
    p.add_argument("--train", type=int, default=3, help="objects per category")
    p.add_argument("--val", type=int, default=1)
    p.add_argument("--test", type=int, default=1)
    p.add_argument("--size", type=int, default=64, help="image height and width")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = write_fixture(a.out, tuple(a.categories),
                         {"train": a.train, "val": a.val, "test": a.test}, a.size, a.seed)
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
