"""MSN-Hard: the Kubric TFDS dataset `kubric_frames/multi_shapenet_conditional` (version 2.8.0),
read from disk.

The reference downloads `gs://kubric-public/tfds/kubric_frames/multi_shapenet_conditional/2.8.0/`
into `data/osrt/multi_shapenet_frames/` and opens it through sunds
(`sunds.builder('multi_shapenet', data_dir='data/osrt')`, which reads the newest version folder of
`<data_dir>/multi_shapenet_frames/`). We read the same folder with tensorflow-datasets alone
(`tfds.builder_from_directory`; no download, no sunds). `path` may be the version folder itself
(the one holding `dataset_info.json`) or any folder above it, such as the reference's `data/osrt`.

On disk (TFDS layout; docs/spec DATA.md): `multi_shapenet_frames/2.8.0/` holds
`dataset_info.json` (name `kubric_frames`, config `multi_shapenet_conditional`), `features.json`,
`metadata.json`, the category `*.labels.txt` files and the record shards. The shards are named
from dataset_info's `name`, not from the folder, and counted by its `splits[].shardLengths`:
`kubric_frames-<split>.tfrecord-XXXXX-of-YYYYY`. Everything is taken from `dataset_info.json`,
never guessed. The splits are `train`, `val` and `test` (a folder with `validation` instead of
`val`, as this project's fixtures once wrote, is read too).

One example is one scene with 10 cameras. Per camera we use the colour image (PNG), the instance
image, the intrinsics K (camera type `PERSPECTIVE`, a pinhole; anything else is refused, as sunds
does) and the world-to-camera extrinsics (X_cam = R X_world + t, OpenCV axes), so the ray through
pixel (x, y) is normalize(R^T K^-1 [x + .5, y + .5, 1]) from -R^T t: unit length, world frame, as
the sunds Nerf task computes them. As in the reference:

- 5 input views chosen at random per item, target rays from the other 5 views;
- instance ids clipped to [1, 34] minus 1 give 34 mask channels, channel 0 the background
  (ids 0 and 1);
- the scene id is the number in `scene_name` (`scene_<n>`; names repeat across splits);
- streams are sharded across ranks and (unlike the reference) DataLoader workers, and may skip
  the first n scenes of a split (to render a given scene).

TensorFlow runs on the CPU only (it is hidden from every GPU before first use), and only inside
the process that iterates, so DataLoader workers are started with 'spawn'. A record or image
that does not decode is skipped with a warning and counted.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset

from ..cameras import FOCAL_LENGTH, SENSOR_WIDTH, pinhole_origin, pinhole_ray_matrix, world_to_camera
from .errors import DataError, SkipCounter
from ..errors import command
from .records import ViewPolicy

NAME = "kubric_frames"                  # dataset_info.json `name`: the shard files' prefix
CONFIG = "multi_shapenet_conditional"   # dataset_info.json `configName`
VERSION = "2.8.0"
FOLDER = "multi_shapenet_frames"        # the reference's folder (sunds: '<name>_frames')
NUM_CAMERAS = 10
NUM_INPUT_VIEWS = 5
NUM_ENTITIES = 34
CAMERA_TYPE = "PERSPECTIVE"
SPLITS = ("train", "val", "test")
# The trainer's modes and the split names they read, first found first: the real data has
# `val`; `validation` is accepted for folders written by this project's older fixture writer.
MODE_SPLITS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
# The reference reads the first 1,000,000 train / 10,000 val or test scenes.
MAX_SCENES = {"train": 1_000_000, "val": 10_000, "test": 10_000}
# TFDS's default shard file name (dataset_info.json without `filepathTemplate`, as written by
# TFDS before 4.8); the placeholders are TFDS's.
DEFAULT_FILEPATH_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
IMAGE_FEATURES = ("color_image", "instance_image", "depth_image", "category_image",
                  "normal_image", "object_coordinates_image", "segmentation_image")
REQUIRED = ("color_image", "instance_image", "intrinsics/K", "intrinsics/type", "extrinsics/R",
            "extrinsics/t")

WHERE = (f"MSN-Hard is the Kubric TFDS dataset {NAME}/{CONFIG} {VERSION}: copy "
         f"gs://kubric-public/tfds/{NAME}/{CONFIG}/{VERSION}/ (e.g. `gsutil -m cp -r ... "
         f"data/osrt/{FOLDER}/`). The public bucket has been reported to answer "
         f"AccessDenied since 2026; without it, `dataset: procedural` (built in, no download) "
         f"trains the same model, and `python -m osrt_fast.data.kubric --out DIR` writes a "
         f"small dataset in this exact format for trying the pipeline.")


def find_version_dir(path: str) -> str:
    """The folder holding dataset_info.json: `path` itself, or the newest version below it (as
    `<path>/<name>/<version>/` or `<path>/<version>/`)."""
    if not os.path.isdir(path):
        raise DataError(f"MSN-Hard dataset folder '{path}' does not exist. {WHERE}")
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        return path
    found = (glob.glob(os.path.join(path, "*", "dataset_info.json"))
             + glob.glob(os.path.join(path, "*", "*", "dataset_info.json")))
    if not found:
        raise DataError(f"'{path}' holds no TFDS dataset (no dataset_info.json in it or in its "
                        f"sub-folders <name>/<version>/). Expected e.g. "
                        f"'{path}/{FOLDER}/{VERSION}/dataset_info.json' with "
                        f"'{NAME}-train.tfrecord-*' shards beside it. {WHERE}")

    def key(p):
        version = os.path.basename(os.path.dirname(p))
        return tuple(int(x) if x.isdigit() else -1 for x in version.split(".")), p
    return os.path.dirname(max(found, key=key))


def _feature_paths(node, prefix="") -> dict:
    """Flattened {path: feature json} of a TFDS features.json tree."""
    out = {}
    if not isinstance(node, dict):
        return out
    if "featuresDict" in node:
        for k, v in node["featuresDict"]["features"].items():
            out.update(_feature_paths(v, f"{prefix}{k}/"))
        return out
    out[prefix.rstrip("/")] = node
    return out


def shard_names(name: str, split: dict, file_format: str = "tfrecord") -> list:
    """The record shard file names of one `splits` entry of dataset_info.json, as TFDS names
    them: its `filepathTemplate` (TFDS >= 4.8) or TFDS's default
    `<name>-<split>.<format>-XXXXX-of-YYYYY`, one per entry of `shardLengths` (or `numShards`,
    TFDS < 4)."""
    template = split.get("filepathTemplate") or DEFAULT_FILEPATH_TEMPLATE
    if "shardLengths" in split:
        count = len(split["shardLengths"])
    else:
        count = int(split.get("numShards", 0))
    digits = max(5, len(str(count)))
    out = []
    for i in range(count):
        index, total = f"{i:0{digits}d}", f"{count:0{digits}d}"
        try:
            out.append(template.format(DATASET=name, SPLIT=split["name"],
                                       FILEFORMAT=file_format, SHARD_INDEX=index,
                                       NUM_SHARDS=total, SHARD_X_OF_Y=f"{index}-of-{total}"))
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"dataset_info.json's filepathTemplate {template!r} of split "
                            f"{split['name']!r} has an unknown placeholder ({e}); TFDS's are "
                            f"DATASET, SPLIT, FILEFORMAT, SHARD_INDEX, NUM_SHARDS and "
                            f"SHARD_X_OF_Y") from None
    return out


def _split_size(split: dict) -> int:
    if "shardLengths" in split:
        return sum(int(x) for x in split["shardLengths"])
    stats = split.get("statistics") or {}
    return int(stats.get("numExamples", 0))


def read_info(version_dir: str) -> dict:
    """Reads a TFDS folder's JSON files (TensorFlow is not imported): returns {name, config,
    version, splits: {split: num_examples}, files: {split: [shard paths]}, missing: {split:
    [shard file names not on disk]}, features: [paths], image_shape}. Shard files are checked
    by the split that is opened (`KubricDataset`), so a folder without, say, the test shards
    still trains."""
    try:
        with open(os.path.join(version_dir, "dataset_info.json")) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"'{version_dir}/dataset_info.json' is unreadable ({e}); the download "
                        f"is incomplete. {WHERE}") from None
    if not isinstance(info, dict) or not info.get("name") or not isinstance(
            info.get("splits"), list):
        raise DataError(f"'{version_dir}/dataset_info.json' is not a TFDS dataset_info.json "
                        f"(expected a 'name' and a list of 'splits', each with 'name' and "
                        f"'shardLengths'). {WHERE}")
    name = info["name"]
    file_format = info.get("fileFormat") or "tfrecord"
    if file_format != "tfrecord":
        raise DataError(f"'{version_dir}' stores its records as {file_format!r}; MSN-Hard's "
                        f"are 'tfrecord' (dataset_info.json fileFormat). {WHERE}")
    splits, files, missing = {}, {}, {}
    for s in info["splits"]:
        if not isinstance(s, dict) or "name" not in s:
            raise DataError(f"'{version_dir}/dataset_info.json' has a split entry without a "
                            f"name: {s!r}. {WHERE}")
        names = shard_names(name, s, file_format)
        splits[s["name"]] = _split_size(s)
        files[s["name"]] = [os.path.join(version_dir, n) for n in names]
        missing[s["name"]] = [n for n in names if not os.path.isfile(os.path.join(version_dir, n))]
    features, image_shape = {}, None
    fpath = os.path.join(version_dir, "features.json")
    if os.path.isfile(fpath):
        with open(fpath) as f:
            features = _feature_paths(json.load(f))
        missing_features = [f"cameras/camera_0/{r}" for r in REQUIRED
                            if f"cameras/camera_0/{r}" not in features]
        if missing_features:
            raise DataError(f"'{fpath}' lacks feature(s) {missing_features}: this is not a "
                            f"Kubric multi-view dataset with instance masks ({CONFIG} >= 2.8.0). "
                            f"{WHERE}")
        cameras = sorted({p.split("/")[1] for p in features if p.startswith("cameras/")})
        if len(cameras) != NUM_CAMERAS:
            raise DataError(f"'{fpath}' has {len(cameras)} cameras per scene, but MSN-Hard has "
                            f"{NUM_CAMERAS} (5 input views and 5 target views). {WHERE}")
        try:
            dims = features["cameras/camera_0/color_image"]["image"]["shape"]["dimensions"]
            image_shape = tuple(int(d) for d in dims)
        except (KeyError, TypeError, ValueError):
            image_shape = None
    return {"name": name, "config": info.get("configName"), "version": info.get("version", "?"),
            "splits": splits, "files": files, "missing": missing, "features": list(features),
            "image_shape": image_shape}


def resolve_split(version_dir: str, info: dict, mode: str) -> str:
    """The split name of the trainer's mode ('train' / 'val' / 'test') in this folder; DataError
    naming what was expected and found when it has none, or when its shard files are missing."""
    candidates = MODE_SPLITS[mode]
    split = next((s for s in candidates if s in info["splits"]), None)
    if split is None:
        raise DataError(
            f"'{version_dir}' has no '{candidates[0]}' split for mode '{mode}': its "
            f"dataset_info.json lists {sorted(info['splits'])}, MSN-Hard {VERSION} has "
            f"{list(SPLITS)}. The download is incomplete or this is another dataset; copy the "
            f"whole version folder again. {WHERE}")
    expected, missing = info["files"][split], info["missing"][split]
    if not expected:
        raise DataError(f"split '{split}' of '{version_dir}/dataset_info.json' lists no record "
                        f"shards (no shardLengths). {WHERE}")
    if missing:
        name = os.path.basename
        present = sorted(name(p) for p in glob.glob(os.path.join(version_dir, f"*{split}*"))
                         if ".tfrecord" in name(p) and name(p) not in map(name, expected))
        extra = (f" Files there with other names: {present[:3]}{' ...' if len(present) > 3 else ''}"
                 f" (shards are named from dataset_info.json's name '{info['name']}', not from "
                 f"the folder; do not rename them)." if present else "")
        raise DataError(
            f"'{version_dir}' is a partial download: split '{split}' has {len(expected)} record "
            f"shards in dataset_info.json but only {len(expected) - len(missing)} of those files "
            f"on disk; missing {len(missing)}, e.g. '{missing[0]}'.{extra} Copy the missing "
            f"shards. {WHERE}")
    return split


def _hide_gpus(tf) -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:        # already initialised; tensorflow-cpu has no GPU anyway
        pass


def import_tfds():
    """(tensorflow, tensorflow_datasets), Triton imported before them when it is installed.

    TensorFlow and Triton each carry their own LLVM; with TensorFlow loaded first, importing
    Triton aborts the process ("LLVM ERROR: inconsistency in registered CommandLine options";
    seen with tensorflow-cpu 2.21.0 and triton 3.9.0), while Triton first loads both. So a
    process that reads MSN-Hard and later builds the model (kernels import Triton) survives.
    """
    try:
        import triton  # noqa: F401
    except Exception:       # not installed, or broken: it fails later where it is used, if at all
        pass
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"reading MSN-Hard needs tensorflow and tensorflow-datasets ({e}): "
                        f"pip install 'osrt-fast[tfds]'. Or convert the data once elsewhere "
                        f"(python -m osrt_fast.data.shards) and train from the shards.") from None
    _hide_gpus(tf)
    return tf, tfds


def scene_number(name) -> int:
    """The reference's scene id: int(name[6:]) of 'scene_<n>'."""
    if isinstance(name, bytes):
        name = name.decode()
    m = re.fullmatch(r"scene_(\d+)", str(name))
    if not m:
        raise ValueError(f"scene_name {name!r} is not 'scene_<number>'")
    return int(m.group(1))


def check_camera_type(value, camera: str = "camera_0", scene=None) -> None:
    """DataError unless a camera's `intrinsics/type` is 'PERSPECTIVE' (a pinhole without
    distortion, the only model the rays here and sunds' Nerf task are computed for)."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    if text != CAMERA_TYPE:
        if isinstance(scene, bytes):
            scene = scene.decode(errors="replace")
        raise DataError(f"{camera} of {scene or 'a scene'} has intrinsics/type {text!r}, but only "
                        f"{CAMERA_TYPE!r} (pinhole) cameras are supported: MSN-Hard's are all "
                        f"{CAMERA_TYPE!r}, and sunds asserts the same. A folder written by an "
                        f"older `python -m osrt_fast.data.kubric` (type 'PERSP') must be written "
                        f"again. {WHERE}")


def example_to_record(ex: dict, num_cameras: int = NUM_CAMERAS, masks: bool = True) -> dict:
    """A scene record (without views or seed) from a decoded TFDS example (numpy)."""
    cams = [ex["cameras"][f"camera_{i}"] for i in range(num_cameras)]
    for i, c in enumerate(cams):
        check_camera_type(c["intrinsics"]["type"], f"camera_{i}", ex.get("scene_name"))
    images = np.stack([c["color_image"] for c in cams])                 # [V, H, W, 3] uint8
    k = np.stack([c["intrinsics"]["K"] for c in cams])
    r = np.stack([c["extrinsics"]["R"] for c in cams])
    t = np.stack([c["extrinsics"]["t"] for c in cams])
    rec = {"images": np.ascontiguousarray(images[..., :3], dtype=np.uint8),
           "origins": pinhole_origin(r, t), "ray_mats": pinhole_ray_matrix(k, r),
           "sceneid": scene_number(ex["scene_name"])}
    if masks:
        inst = np.stack([c["instance_image"] for c in cams])[..., 0]     # [V, H, W]
        rec["ids"] = (np.clip(inst, 1, NUM_ENTITIES) - 1).astype(np.uint8)
    return rec


def pipeline_position():
    """(index, count) of this data pipeline among all ranks x DataLoader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = torch.utils.data.get_worker_info()
    wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + wid, world * workers


class KubricDataset(IterableDataset):
    """MSN-Hard scenes as scene records (`records.py`), streamed from the TFDS folder.

    Args:
        path: the dataset folder (see the module docstring).
        mode: 'train' (endless, shuffled files and examples), 'val' or 'test' (one pass, in order).
        max_len: at most this many scenes (of this process's share, per pass).
        skip: skip the first `skip` scenes of the split (before sharding).
        num_input_views: input views per scene (reference: 5); targets come from the others.
        shuffle_buffer: examples in the training shuffle buffer.
        seed: base of the view choice and ray-sampling seeds (val/test are fixed per scene).
        masks: read instance masks (dataset 'osrt'); without ('msn'), records have no ids.
    """

    multiprocessing_context = "spawn"     # TensorFlow must not be forked

    def __init__(self, path: str, mode: str, max_len: Optional[int] = None, skip: int = 0,
                 num_input_views: int = NUM_INPUT_VIEWS, shuffle_buffer: int = 256,
                 seed: int = 0, masks: bool = True):
        if mode not in MODE_SPLITS:
            raise DataError(f"unknown split {mode!r}; valid splits are: train, val, test")
        self.path, self.mode = path, mode
        self.version_dir = find_version_dir(path)
        self.info = read_info(self.version_dir)
        self.split = resolve_split(self.version_dir, self.info, mode)
        self.skip, self.max_len = int(skip), max_len
        if not 1 <= num_input_views < NUM_CAMERAS:
            raise DataError(f"num_input_views must be between 1 and {NUM_CAMERAS - 1} (the rest "
                            f"are targets), got {num_input_views}")
        self.num_input_views = int(num_input_views)
        shape = self.info["image_shape"]
        self.height, self.width = (shape[0], shape[1]) if shape is not None else (None, None)
        self.policy = ViewPolicy("random", self.num_input_views, "others")
        self.masks = masks
        self.shuffle_buffer, self.seed = int(shuffle_buffer), int(seed)
        self.num_entities = NUM_ENTITIES if masks else 0
        self.render_kwargs = {"min_dist": 0.0, "max_dist": 20.0}
        self.skipped = SkipCounter("MSN-Hard record")
        n = min(self.info["splits"][self.split], MAX_SCENES[mode])
        self.num_scenes = max(0, n - self.skip)
        if self.num_scenes == 0:
            raise DataError(f"the '{self.split}' split of '{self.version_dir}' has no scenes "
                            f"after skipping {self.skip}")
        self.epoch = 0

    def skipping(self, n: int) -> "KubricDataset":
        """This dataset without its first n scenes (in split order; for rendering scene n)."""
        import copy
        out = copy.copy(self)
        out.skip, out.num_scenes = self.skip + int(n), self.num_scenes - int(n)
        if out.num_scenes <= 0:
            raise DataError(f"cannot skip {n} scenes: the '{self.split}' split has "
                            f"{self.num_scenes}")
        return out

    def __len__(self) -> int:
        return self.num_scenes if self.max_len is None else min(self.max_len, self.num_scenes)

    def _tf_dataset(self, index: int, count: int, epoch: int, shuffle: bool):
        tf, tfds = import_tfds()
        builder = tfds.builder_from_directory(self.version_dir)
        last = self.skip + self.num_scenes
        split = f"{self.split}[{self.skip}:{last}]"
        if count > 1:
            split = tfds.even_splits(split, n=count, drop_remainder=False)[index]
        # Only colour (and instance) images are decoded; the rest stay encoded bytes.
        keep = ("color_image", "instance_image") if self.masks else ("color_image",)
        cams = {f"camera_{i}": {k: tfds.decode.SkipDecoding() for k in IMAGE_FEATURES
                                if k not in keep
                                and f"cameras/camera_{i}/{k}" in self.info["features"]}
                for i in range(NUM_CAMERAS)}
        read_config = tfds.ReadConfig(shuffle_seed=self.seed + epoch, try_autocache=False,
                                      add_tfds_id=False)
        ds = builder.as_dataset(split=split, shuffle_files=shuffle, read_config=read_config,
                                decoders={"cameras": cams} if self.info["features"] else None)
        if shuffle:
            ds = ds.shuffle(self.shuffle_buffer, seed=self.seed + epoch)
        return tf, ds.prefetch(tf.data.AUTOTUNE)

    def _examples(self, index: int, count: int, epoch: int, shuffle: bool):
        """Decoded records (no views, no seed) of one pass; corrupt ones skipped and counted."""
        tf, ds = self._tf_dataset(index, count, epoch, shuffle)
        it = iter(ds)
        failures = 0
        while True:
            try:
                ex = next(it)
            except StopIteration:
                return
            except tf.errors.OpError as e:
                self.skipped.note(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                failures += 1
                if failures > 16:
                    raise DataError(f"more than 16 records in a row of '{self.version_dir}' "
                                    f"failed to decode; the download is damaged. "
                                    f"{WHERE}") from None
                if isinstance(e, tf.errors.DataLossError):
                    return      # a broken record file cannot be read past the damage
                continue
            failures = 0
            ex = tf.nest.map_structure(lambda x: x.numpy(), ex)
            try:
                rec = example_to_record(ex, masks=self.masks)
            except DataError:       # a wrong format, not a corrupt record: stop, say why
                raise
            except (KeyError, ValueError) as e:
                self.skipped.note(f"{type(e).__name__}: {e}")
                continue
            yield rec

    def ordered_records(self, start: int = 0) -> Iterator[dict]:
        """Every scene of the split once, in file order, from scene `start` (for conversion)."""
        src = self.skipping(start) if start else self
        return src._examples(0, 1, 0, shuffle=False)

    def iter_records(self, index: int = 0, count: int = 1) -> Iterator[dict]:
        """This pipeline's share of the records (pipeline `index` of `count`)."""
        seeds = np.random.SeedSequence([self.seed, index, count])
        epoch = 0
        train = self.mode == "train"
        while True:
            rng = np.random.default_rng(seeds.spawn(1)[0])
            for rec in self._examples(index, count, epoch, shuffle=train):
                if train:
                    item_rng = rng
                else:     # fixed per scene, so evaluation is reproducible
                    item_rng = np.random.default_rng([self.seed, rec["sceneid"]])
                _, rec["input_views"], rec["target_views"] = self.policy.choose(
                    0, 1, NUM_CAMERAS, item_rng)
                rec["seed"] = int(item_rng.integers(2 ** 62))
                yield rec
            if not train:
                return
            epoch += 1

    def __iter__(self):
        index, count = pipeline_position()
        limit = self.max_len
        if limit is not None and count > 1:     # max_len counts scenes of the whole split
            limit = len(range(index, limit, count))
            if limit == 0:
                return iter(())
        return _limited(self.iter_records(index, count), limit)


def _limited(it, limit):
    for i, x in enumerate(it):
        if limit is not None and i >= limit:
            return
        yield x


# ----------------------------------------------------------------------------------------------
# Fixture writer: tiny datasets in the exact on-disk format, from the built-in scene generator


# The fixture's category labels (category_image values; 0 is the background): the built-in
# generator's three shapes, in its shape codes' order.
FIXTURE_CATEGORIES = ("background", "sphere", "cube", "cylinder")
# TFDS metadata of Kubric's builder (sunds/datasets/kubric), as its dataset_info.json holds them.
RELEASE_NOTES = {
    "1.0.0": "Initial version",
    "2.0.0": "Migrated to MultiShapenet",
    "2.1.0": "Also populate camera information.",
    "2.1.1": "Fix camera information.",
    "2.2.0": "Do not bake rays.",
    "2.2.1": "128x128 resolution for multishapenet conditional.",
    "2.3.0": "Fix semantic maps.",
    "2.4.0": "Added depth maps.",
    "2.5.0": "Populate labels.",
    "2.6.0": "Position cameras at least 2 units above ground.",
    "2.7.0": "Move camera back.",
    "2.7.1": "Fix splits.",
    "2.8.0": "Export instance ids for objects (panoptic segmentation).",
}
HOMEPAGE = "https://srt-paper.github.io/"
CITATION = (
    "@article{srt22,\n"
    "  title={{Scene Representation Transformer: Geometry-Free Novel View Synthesis Through "
    "Set-Latent Scene Representations}},\n"
    "  author={Mehdi S. M. Sajjadi and Henning Meyer and Etienne Pot and Urs Bergmann and Klaus "
    "Greff and Noha Radwan and Suhani Vora and Mario Lucic and Daniel Duckworth and Alexey "
    "Dosovitskiy and Jakob Uszkoreit and Thomas Funkhouser and Andrea Tagliasacchi},\n"
    "  journal={{CVPR}},\n"
    "  year={2022},\n"
    "  url={https://srt-paper.github.io/}\n"
    "}")


def _features(tfds, tf, height: int, width: int, num_cameras: int, categories=FIXTURE_CATEGORIES):
    """sunds' frame spec for Kubric's conditional frames (sunds.specs.frame_spec without
    `timestamp`, camera_spec with colour, depth, category and instance images): the names,
    dtypes and shapes of the real features.json."""
    f = tfds.features
    camera = {
        "intrinsics": {
            "image_width": f.Tensor(shape=(), dtype=tf.int32),
            "image_height": f.Tensor(shape=(), dtype=tf.int32),
            "K": f.Tensor(shape=(3, 3), dtype=tf.float32),
            "type": f.Text(),
            "distortion": {"radial": f.Tensor(shape=(3,), dtype=tf.float32),
                           "tangential": f.Tensor(shape=(2,), dtype=tf.float32)},
        },
        "extrinsics": {"R": f.Tensor(shape=(3, 3), dtype=tf.float32),
                       "t": f.Tensor(shape=(3,), dtype=tf.float32)},
        "color_image": f.Image(shape=(height, width, 3)),
        "category_image": f.LabeledImage(labels=list(categories), shape=(height, width, 1)),
        "instance_image": f.LabeledImage(labels=None, shape=(height, width, 1)),
        # A float32 image: TFDS stores it as a 4-channel uint8 PNG of the float's bytes.
        "depth_image": f.Image(shape=(height, width, 1), dtype=tf.float32),
    }
    return f.FeaturesDict({
        "scene_name": f.Text(),
        "frame_name": f.Text(),
        "pose": {"R": f.Tensor(shape=(3, 3), dtype=tf.float32),
                 "t": f.Tensor(shape=(3,), dtype=tf.float32)},
        "cameras": {f"camera_{i}": camera for i in range(num_cameras)},
    })


def fixture_cameras(camera_pos: np.ndarray, height: int, width: int):
    """OpenCV K [V, 3, 3], R [V, 3, 3], t [V, 3] of the built-in generator's cameras: the
    35 mm lens on a 32 mm sensor, principal point at the image centre (Kubric's camera)."""
    f = width * FOCAL_LENGTH / SENSOR_WIDTH
    k = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]])
    w2c = world_to_camera(camera_pos)
    return (np.broadcast_to(k, w2c.shape[:-2] + (3, 3)).astype(np.float32),
            w2c[..., :3, :3].astype(np.float32), w2c[..., :3, 3].astype(np.float32))


def fixture_example(i: int, split: str, seed: int, height: int, width: int, num_cameras: int,
                    min_objects: int, max_objects: int, background_zero: bool,
                    camera_type: str) -> dict:
    """Scene `i` of `split` as a Kubric example (sunds' features; see `write_fixture`)."""
    import binascii

    from osrt_fast import scenes

    # As Kubric's builder: scene i of each split from seed crc32('<i>_<split>').
    sseed = scenes.scene_seed(seed, binascii.crc32(f"{i}_{split}".encode()))
    scene = scenes.sample_scene(sseed, min_objects, max_objects)
    cam_pos = scenes.sample_cameras(sseed, num_cameras).astype(np.float32)
    views = scenes.render_views(scene, cam_pos.astype(np.float64), height, width)
    k, r, t = fixture_cameras(cam_pos.astype(np.float64), height, width)
    inst = views["instances"] + 1
    shape_of = np.concatenate([[0], scene.shape])        # id -> shape (0 = ground)
    cat = shape_of[views["instances"]]
    if background_zero:
        bg = np.argwhere(inst[0] == 1)[:5]
        inst[0][bg[:, 0], bg[:, 1]] = 0
    cams = {}
    for v in range(num_cameras):
        cams[f"camera_{v}"] = {
            "color_image": np.round(views["rgb"][v] * 255).astype(np.uint8),
            "depth_image": views["depth"][v][..., None].astype(np.float32),
            "category_image": cat[v][..., None].astype(np.uint8),
            "instance_image": inst[v][..., None].astype(np.uint8),
            "intrinsics": {"K": k[v], "image_height": np.int32(height),
                           "image_width": np.int32(width), "type": camera_type,
                           "distortion": {"radial": np.zeros(3, np.float32),
                                          "tangential": np.zeros(2, np.float32)}},
            "extrinsics": {"R": r[v], "t": t[v]},
        }
    name = f"scene_{i}"
    return {"scene_name": name, "frame_name": name,
            "pose": {"R": np.eye(3, dtype=np.float32), "t": np.zeros(3, np.float32)},
            "cameras": cams}


def write_fixture(out: str, splits=None, height: int = 128, width: int = 128,
                  num_cameras: int = NUM_CAMERAS, seed: int = 0, min_objects: int = 2,
                  max_objects: int = 6, shards: int = 2, background_zero: bool = True,
                  camera_type: str = CAMERA_TYPE) -> str:
    """Writes a small MSN-Hard-format TFDS dataset of built-in procedural scenes to
    `<out>/multi_shapenet_frames/2.8.0/` (the reference's layout) and returns that folder.

    The folder is what TFDS writes for Kubric's builder (`kubric_frames`, config
    `multi_shapenet_conditional`, version 2.8.0, sunds' feature spec): dataset_info.json,
    features.json, metadata.json, the category labels file and shards
    `kubric_frames-<split>.tfrecord-XXXXX-of-YYYYY`. Cameras are 'PERSPECTIVE' with OpenCV
    extrinsics, `frame_name == scene_name`, and scene names restart at `scene_0` in each split
    (each split's scenes are different, from its own seeds).

    splits: {split name: number of scenes}, default {'train': 8, 'val': 2, 'test': 2}.
    shards: record shards per split (at most the smallest split's scene count).
    Instance ids follow Kubric: 1 for the background, k + 1 for object k; with background_zero,
    a few background pixels of the first view carry id 0 (Kubric's rare rendering errors).
    camera_type: `intrinsics/type` of every camera (another value than 'PERSPECTIVE' only
    to test the reader's check).
    Needs tensorflow and tensorflow-datasets (the [tfds] extra).
    """
    import shutil
    import tempfile

    tf, tfds = import_tfds()
    tfds.disable_progress_bar()
    splits = dict(splits or {"train": 8, "val": 2, "test": 2})

    def generate(split):
        for i in range(splits[split]):
            yield str(i), fixture_example(i, split, seed, height, width, num_cameras, min_objects,
                                          max_objects, background_zero and i == 0, camera_type)

    class KubricFrames(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Kubric Frames dataset.

        Dataset from synthetic object.
        """
        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = RELEASE_NOTES
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(
            name=CONFIG, description="MultiShapenet, 10 conditional cameras per scene "
                                     f"({height}x{width}; this project's fixture).")]

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=_features(tfds, tf, height, width, num_cameras),
                metadata=tfds.core.MetadataDict(), homepage=HOMEPAGE, citation=CITATION)

        def _split_generators(self, dl_manager):
            return {name: generate(name) for name in splits}

        def _generate_examples(self, **kwargs):     # unused: splits are generators above
            raise NotImplementedError

    assert KubricFrames.name == NAME
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)    # (the temp folder's home)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out)) or None) as tmp:
        builder = KubricFrames(config=CONFIG, data_dir=tmp)
        # One shard count for all splits (TFDS); no split may have fewer scenes than shards.
        config = tfds.download.DownloadConfig(num_shards=max(1, min(shards, *splits.values())))
        builder.download_and_prepare(download_config=config)
        target = os.path.join(out, FOLDER, VERSION)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target):
            shutil.rmtree(target)
        # TFDS writes <data_dir>/kubric_frames/multi_shapenet_conditional/2.8.0/; the reference
        # copies that version folder into data/osrt/multi_shapenet_frames/.
        shutil.move(os.path.join(tmp, NAME, CONFIG, VERSION), target)
    return target


@command
def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m osrt_fast.data.kubric",
                                description="Write a small dataset in MSN-Hard's exact TFDS "
                                            "format from the built-in scene generator.")
    p.add_argument("--out", required=True, help=f"folder; the data goes to "
                                                f"<out>/{FOLDER}/{VERSION}/")
    p.add_argument("--train", type=int, default=8)
    p.add_argument("--val", type=int, default=2)
    p.add_argument("--test", type=int, default=2)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = write_fixture(a.out, {"train": a.train, "val": a.val, "test": a.test},
                         a.height, a.width, seed=a.seed)
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
