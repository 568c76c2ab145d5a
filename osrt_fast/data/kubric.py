"""MSN-Hard: the Kubric `multi_shapenet_conditional` TFDS dataset (version 2.8.0), read from disk.

The reference downloads `gs://kubric-public/tfds/kubric_frames/multi_shapenet_conditional/2.8.0/`
into `data/osrt/multi_shapenet_frames/` and opens it through sunds. We read the same folder with
tensorflow-datasets alone (`tfds.builder_from_directory`; no download, no sunds). `path` may be
the version folder itself (the one holding `dataset_info.json`) or any folder above it, such as
the reference's `data/osrt`.

One example is one scene with 10 cameras. Per camera we use the colour image (PNG), the instance
image, the intrinsics K and the world-to-camera extrinsics (X_cam = R X_world + t, OpenCV axes),
so the ray through pixel (x, y) is normalize(R^T K^-1 [x + .5, y + .5, 1]) from -R^T t: unit
length, world frame, as the sunds Nerf task computes them. As in the reference:

- 5 input views chosen at random per item, target rays from the other 5 views;
- instance ids clipped to [1, 34] minus 1 give 34 mask channels, channel 0 the background
  (ids 0 and 1);
- the scene id is the number in `scene_name` (`scene_<n>`);
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
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset

from .errors import DataError, SkipCounter
from .records import BatchSpec, ViewPolicy, pinhole_origin, pinhole_ray_matrix

NAME = "multi_shapenet_conditional"
VERSION = "2.8.0"
NUM_CAMERAS = 10
NUM_INPUT_VIEWS = 5
NUM_ENTITIES = 34
NUM_CATEGORIES = 4      # fixture only: background + the generator's three shapes
SPLITS = ("train", "validation", "test")
# The reference's split names and sizes: first 1,000,000 train / 10,000 val or test scenes.
MODE_SPLIT = {"train": "train", "val": "validation", "test": "test"}
MAX_SCENES = {"train": 1_000_000, "val": 10_000, "test": 10_000}
IMAGE_FEATURES = ("color_image", "instance_image", "depth_image", "category_image",
                  "normal_image", "object_coordinates_image", "segmentation_image")
REQUIRED = ("color_image", "instance_image", "intrinsics/K", "extrinsics/R", "extrinsics/t")

WHERE = (f"MSN-Hard is the Kubric TFDS dataset {NAME} {VERSION}: copy "
         f"gs://kubric-public/tfds/kubric_frames/{NAME}/{VERSION}/ (e.g. `gsutil -m cp -r ... "
         f"data/osrt/multi_shapenet_frames/`). The public bucket has been reported to answer "
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
                        f"'{path}/multi_shapenet_frames/{VERSION}/dataset_info.json' with "
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


def read_info(version_dir: str) -> dict:
    """Validates a TFDS folder from its JSON files alone (TensorFlow is not imported):
    returns {name, version, splits: {name: num_examples}, features: [paths], shards: [files]}."""
    try:
        with open(os.path.join(version_dir, "dataset_info.json")) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"'{version_dir}/dataset_info.json' is unreadable ({e}); the download "
                        f"is incomplete. {WHERE}") from None
    name = info.get("name", "?")
    splits = {}
    for s in info.get("splits", []):
        lengths = s.get("shardLengths", [])
        splits[s["name"]] = sum(int(x) for x in lengths)
        prefix = os.path.join(version_dir, f"{name}-{s['name']}.")
        files = glob.glob(prefix + "*")
        if lengths and len(files) < len(lengths):
            raise DataError(f"'{version_dir}' is a partial download: split '{s['name']}' has "
                            f"{len(lengths)} record shards in dataset_info.json but "
                            f"{len(files)} files named '{name}-{s['name']}.*' on disk. Copy "
                            f"the missing shards. {WHERE}")
    features, image_shape = {}, None
    fpath = os.path.join(version_dir, "features.json")
    if os.path.isfile(fpath):
        with open(fpath) as f:
            features = _feature_paths(json.load(f))
        missing = [f"cameras/camera_0/{r}" for r in REQUIRED
                   if f"cameras/camera_0/{r}" not in features]
        if missing:
            raise DataError(f"'{fpath}' lacks feature(s) {missing}: this is not a Kubric "
                            f"multi-view dataset with instance masks ({NAME} >= 2.8.0). {WHERE}")
        cameras = sorted({p.split("/")[1] for p in features if p.startswith("cameras/")})
        if len(cameras) != NUM_CAMERAS:
            raise DataError(f"'{fpath}' has {len(cameras)} cameras per scene, but MSN-Hard has "
                            f"{NUM_CAMERAS} (5 input views and 5 target views). {WHERE}")
        try:
            dims = features["cameras/camera_0/color_image"]["image"]["shape"]["dimensions"]
            image_shape = tuple(int(d) for d in dims)
        except (KeyError, TypeError, ValueError):
            image_shape = None
    return {"name": name, "version": info.get("version", "?"), "splits": splits,
            "features": list(features), "image_shape": image_shape}


def _hide_gpus(tf) -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:        # already initialised; tensorflow-cpu has no GPU anyway
        pass


def import_tfds():
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


def example_to_record(ex: dict, num_cameras: int = NUM_CAMERAS, masks: bool = True) -> dict:
    """A scene record (without views or seed) from a decoded TFDS example (numpy)."""
    cams = [ex["cameras"][f"camera_{i}"] for i in range(num_cameras)]
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
        points_per_item, full_scale, downsample: as the other loaders (`BatchSpec`).
        max_len: at most this many scenes (of this process's share, per pass).
        skip: skip the first `skip` scenes of the split (before sharding).
        num_input_views: input views per scene (reference: 5); targets come from the others.
        shuffle_buffer: examples in the training shuffle buffer.
        seed: base of the view choice and ray-sampling seeds (val/test are fixed per scene).
        masks: read instance masks (dataset 'osrt'); without ('msn'), records have no ids.
    """

    multiprocessing_context = "spawn"     # TensorFlow must not be forked

    def __init__(self, path: str, mode: str, points_per_item: int = 2048,
                 max_len: Optional[int] = None, full_scale: bool = False,
                 downsample: Optional[int] = None, skip: int = 0,
                 num_input_views: int = NUM_INPUT_VIEWS, shuffle_buffer: int = 256,
                 seed: int = 0, masks: bool = True):
        if mode not in MODE_SPLIT:
            raise DataError(f"unknown split {mode!r}; valid splits are: train, val, test")
        self.path, self.mode = path, mode
        self.version_dir = find_version_dir(path)
        self.info = read_info(self.version_dir)
        self.split = MODE_SPLIT[mode]
        if self.split not in self.info["splits"]:
            raise DataError(f"'{self.version_dir}' has no '{self.split}' split (it has "
                            f"{sorted(self.info['splits'])}). {WHERE}")
        self.points_per_item, self.full_scale = int(points_per_item), full_scale
        self.downsample, self.skip, self.max_len = downsample, int(skip), max_len
        if not 1 <= num_input_views < NUM_CAMERAS:
            raise DataError(f"num_input_views must be between 1 and {NUM_CAMERAS - 1} (the rest "
                            f"are targets), got {num_input_views}")
        self.num_input_views = int(num_input_views)
        shape = self.info["image_shape"]
        if shape is not None:
            from .obsurf import check_input_size
            check_input_size(shape[0], shape[1], downsample,
                             "MSN-Hard's 128x128 works with downsample None, 1, 2 or 3")
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

    @property
    def spec(self) -> BatchSpec:
        return BatchSpec(self.points_per_item, self.full_scale, self.downsample,
                         self.num_entities)

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
                yield example_to_record(ex, masks=self.masks)
            except (KeyError, ValueError) as e:
                self.skipped.note(f"{type(e).__name__}: {e}")

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


def _features(tfds, tf, height: int, width: int, num_cameras: int):
    f = tfds.features
    camera = {
        "color_image": f.Image(shape=(height, width, 3)),
        # As sunds' Kubric builder: float depth as a PNG-encoded Image, labelled images.
        "depth_image": f.Image(shape=(height, width, 1), dtype=tf.float32),
        "category_image": f.LabeledImage(shape=(height, width, 1), labels=NUM_CATEGORIES),
        "instance_image": f.LabeledImage(shape=(height, width, 1), labels=NUM_ENTITIES + 1),
        "intrinsics": {
            "K": f.Tensor(shape=(3, 3), dtype=tf.float32),
            "image_height": f.Tensor(shape=(), dtype=tf.int32),
            "image_width": f.Tensor(shape=(), dtype=tf.int32),
            "type": f.Text(),
            "distortion": {"radial": f.Tensor(shape=(3,), dtype=tf.float32),
                           "tangential": f.Tensor(shape=(2,), dtype=tf.float32)},
        },
        "extrinsics": {"R": f.Tensor(shape=(3, 3), dtype=tf.float32),
                       "t": f.Tensor(shape=(3,), dtype=tf.float32)},
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
    from osrt_fast import geometry
    f = width * geometry.FOCAL_LENGTH / geometry.SENSOR_WIDTH
    k = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]])
    w2c = geometry.world_to_camera(camera_pos)
    return (np.broadcast_to(k, w2c.shape[:-2] + (3, 3)).astype(np.float32),
            w2c[..., :3, :3].astype(np.float32), w2c[..., :3, 3].astype(np.float32))


def write_fixture(out: str, splits=None, height: int = 128, width: int = 128,
                  num_cameras: int = NUM_CAMERAS, seed: int = 0, min_objects: int = 2,
                  max_objects: int = 6, shards: int = 2, background_zero: bool = True) -> str:
    """Writes a small MSN-Hard-format TFDS dataset of built-in procedural scenes to
    `<out>/multi_shapenet_frames/2.8.0/` (the reference's layout) and returns that folder.

    splits: {split name: number of scenes}, default {'train': 8, 'validation': 2, 'test': 2}.
    Instance ids follow Kubric: 1 for the background, k + 1 for object k; with background_zero,
    a few background pixels of the first view carry id 0 (Kubric's rare rendering errors).
    Needs tensorflow and tensorflow-datasets (the [tfds] extra).
    """
    import shutil
    import tempfile

    from osrt_fast import scenes

    tf, tfds = import_tfds()
    tfds.disable_progress_bar()
    splits = dict(splits or {"train": 8, "validation": 2, "test": 2})
    offsets, total = {}, 0
    for name, n in splits.items():
        offsets[name], total = total, total + n

    def generate(split):
        base = offsets[split]
        for i in range(splits[split]):
            sid = base + i
            scene = scenes.sample_scene(scenes.scene_seed(seed, sid), min_objects, max_objects)
            cam_pos = scenes.sample_cameras(scenes.scene_seed(seed, sid), num_cameras)
            cam_pos = cam_pos.astype(np.float32)
            views = scenes.render_views(scene, cam_pos.astype(np.float64), height, width)
            k, r, t = fixture_cameras(cam_pos.astype(np.float64), height, width)
            inst = views["instances"] + 1
            shape_of = np.concatenate([[0], scene.shape])        # id -> shape (0 = ground)
            cat = shape_of[views["instances"]]
            if background_zero and i == 0:
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
                                   "image_width": np.int32(width), "type": "PERSP",
                                   "distortion": {"radial": np.zeros(3, np.float32),
                                                  "tangential": np.zeros(2, np.float32)}},
                    "extrinsics": {"R": r[v], "t": t[v]},
                }
            yield f"scene_{sid}", {
                "scene_name": f"scene_{sid}", "frame_name": "frame_0",
                "pose": {"R": np.eye(3, dtype=np.float32), "t": np.zeros(3, np.float32)},
                "cameras": cams}

    class MultiShapenetConditional(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=_features(
                tfds, tf, height, width, num_cameras))

        def _split_generators(self, dl_manager):
            return {name: generate(name) for name in splits}

        def _generate_examples(self, **kwargs):     # unused: splits are generators above
            raise NotImplementedError

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)    # (the temp folder's home)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out)) or None) as tmp:
        builder = MultiShapenetConditional(data_dir=tmp)
        # One shard count for all splits (TFDS); no split may have fewer scenes than shards.
        config = tfds.download.DownloadConfig(num_shards=max(1, min(shards, *splits.values())))
        builder.download_and_prepare(download_config=config)
        target = os.path.join(out, "multi_shapenet_frames", VERSION)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target):
            shutil.rmtree(target)
        shutil.move(os.path.join(tmp, NAME, VERSION), target)
    return target


def main(argv=None) -> None:
    import argparse
    p = argparse.ArgumentParser(description="Write a small dataset in MSN-Hard's exact TFDS "
                                            "format from the built-in scene generator.")
    p.add_argument("--out", required=True, help="folder; the data goes to "
                                                "<out>/multi_shapenet_frames/2.8.0/")
    p.add_argument("--train", type=int, default=8)
    p.add_argument("--val", type=int, default=2)
    p.add_argument("--test", type=int, default=2)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = write_fixture(a.out, {"train": a.train, "validation": a.val, "test": a.test},
                         a.height, a.width, seed=a.seed)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
