"""MSN-Hard (Kubric TFDS) reader, end to end on a fixture in the exact on-disk TFDS format
(docs/datasets.md, MSN-Hard): the fixture's names against the real layout, records,
views, rays and colours checked against the raw TFDS examples, sharding, skipping, streaming
through DataLoader workers, bad input, sunds reading the fixture as the reference does, and
`train.py configs/msn_hard.yaml` + `render.py` on it."""
import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import yaml

import numpy as np
import pytest
import torch

from osrt_fast import data
from osrt_fast.config import ConfigError, DataConfig
from osrt_fast.data import BatchSpec, DataError, kubric, model_batch
from osrt_fast.data.errors import DataWarning

try:
    tf, tfds = kubric.import_tfds()          # as the reader imports them (Triton first)
except DataError as e:
    pytest.skip(str(e), allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H = W = 32
# The real splits (DATA.md): train, val, test -- no `validation`.
SPLITS = {"train": 6, "val": 3, "test": 2}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kubric"))
    kubric.write_fixture(out, SPLITS, H, W, shards=2)
    return out


def raw_examples(version_dir, split):
    """The split's examples read by TFDS directly (not through our reader), by scene id."""
    ds = tfds.builder_from_directory(version_dir).as_dataset(split=split)
    out = {}
    for ex in tfds.as_numpy(ds):
        out[int(ex["scene_name"].decode()[6:])] = ex
    return out


def _feature(node: dict) -> tuple:
    """(kind, dtype, shape) of one features.json leaf."""
    kind = node["pythonClassName"].rsplit(".", 1)[1]
    body = node.get("tensor") or node.get("image") or {}
    shape = tuple(int(d) for d in body.get("shape", {}).get("dimensions", []))
    return kind, body.get("dtype"), shape


def test_fixture_is_the_real_layout(root):
    """Folder, file names, dataset_info.json and features as DATA.md gives the real download."""
    vdir = os.path.join(root, "multi_shapenet_frames", "2.8.0")
    shards = [f"kubric_frames-{split}.tfrecord-{i:05d}-of-00002"
              for split in SPLITS for i in range(2)]
    labels = [f"cameras-camera_{i}-category_image.labels.txt" for i in range(10)]
    assert sorted(os.listdir(vdir)) == sorted(["dataset_info.json", "features.json",
                                               "metadata.json", *labels, *shards])
    with open(os.path.join(vdir, "cameras-camera_0-category_image.labels.txt")) as f:
        assert f.read().split() == ["background", "sphere", "cube", "cylinder"]
    with open(os.path.join(vdir, "dataset_info.json")) as f:
        info = json.load(f)
    assert (info["name"], info["configName"], info["version"]) == (
        "kubric_frames", "multi_shapenet_conditional", "2.8.0")
    assert info["fileFormat"] == "tfrecord" and "instance ids" in info["releaseNotes"]["2.8.0"]
    assert [s["name"] for s in info["splits"]] == ["train", "val", "test"]
    for s in info["splits"]:
        assert sum(int(x) for x in s["shardLengths"]) == SPLITS[s["name"]]
        assert len(s["shardLengths"]) == 2 and int(s["numBytes"]) > 0
        assert s["filepathTemplate"] == "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"

    with open(os.path.join(vdir, "features.json")) as f:
        feats = {k: _feature(v) for k, v in kubric._feature_paths(json.load(f)).items()}
    text = ("Text", None, ())
    expected = {"scene_name": text, "frame_name": text,
                "pose/R": ("Tensor", "float32", (3, 3)), "pose/t": ("Tensor", "float32", (3,))}
    for i in range(10):
        c = f"cameras/camera_{i}/"
        expected.update({
            c + "color_image": ("Image", "uint8", (H, W, 3)),
            c + "depth_image": ("Image", "float32", (H, W, 1)),
            c + "category_image": ("LabeledImage", "uint8", (H, W, 1)),
            c + "instance_image": ("LabeledImage", "uint8", (H, W, 1)),
            c + "intrinsics/K": ("Tensor", "float32", (3, 3)),
            c + "intrinsics/image_height": ("Tensor", "int32", ()),
            c + "intrinsics/image_width": ("Tensor", "int32", ()),
            c + "intrinsics/type": text,
            c + "intrinsics/distortion/radial": ("Tensor", "float32", (3,)),
            c + "intrinsics/distortion/tangential": ("Tensor", "float32", (2,)),
            c + "extrinsics/R": ("Tensor", "float32", (3, 3)),
            c + "extrinsics/t": ("Tensor", "float32", (3,)),
        })
    assert feats == expected

    # The version folder, its parent and the reference's data/osrt-style root all resolve.
    for p in (root, os.path.join(root, "multi_shapenet_frames"), vdir):
        assert kubric.find_version_dir(p) == vdir
    info = kubric.read_info(vdir)
    assert info["splits"] == SPLITS and info["image_shape"] == (H, W, 3)
    assert (info["name"], info["config"]) == ("kubric_frames", "multi_shapenet_conditional")
    assert [os.path.basename(p) for p in info["files"]["val"]] == [
        "kubric_frames-val.tfrecord-00000-of-00002", "kubric_frames-val.tfrecord-00001-of-00002"]


def test_fixture_examples_are_kubric_scenes(root):
    """Per split (through TFDS, not our reader): scene_0 ... scene_<n-1> (names repeat across
    splits, the scenes differ), frame_name == scene_name, PERSPECTIVE cameras with Kubric's K,
    zero distortion, identity pose."""
    vdir = os.path.join(root, "multi_shapenet_frames", "2.8.0")
    f = W * 35 / 32
    k = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]], np.float32)
    firsts = []
    for split, n in SPLITS.items():
        raw = raw_examples(vdir, split)
        assert sorted(raw) == list(range(n))
        for ex in raw.values():
            assert ex["frame_name"] == ex["scene_name"]
            np.testing.assert_array_equal(ex["pose"]["R"], np.eye(3))
            for i in range(10):
                intr = ex["cameras"][f"camera_{i}"]["intrinsics"]
                assert intr["type"] == b"PERSPECTIVE"
                assert (intr["image_height"], intr["image_width"]) == (H, W)
                np.testing.assert_allclose(intr["K"], k, rtol=1e-6)
                assert not intr["distortion"]["radial"].any()
                assert not intr["distortion"]["tangential"].any()
        firsts.append(raw[0]["cameras"]["camera_0"]["color_image"])
    assert not np.array_equal(firsts[0], firsts[1])


def test_reader_reads_train_val_and_test(root):
    """The trainer's modes map onto the real split names; every scene of each split is read."""
    for mode, n in SPLITS.items():
        ds = kubric.KubricDataset(root, mode)
        assert ds.split == mode and len(ds) == n
        assert sorted(r["sceneid"] for r in ds.ordered_records()) == list(range(n))


def test_records_match_the_raw_examples(root):
    ds = kubric.KubricDataset(root, "val")
    assert len(ds) == SPLITS["val"] and ds.render_kwargs == {"min_dist": 0., "max_dist": 20.}
    recs = list(ds)
    raw = raw_examples(ds.version_dir, "val")
    assert sorted(r["sceneid"] for r in recs) == sorted(raw)
    for rec in recs:
        ex = raw[rec["sceneid"]]
        cams = [ex["cameras"][f"camera_{i}"] for i in range(10)]
        assert rec["images"].shape == (10, H, W, 3) and rec["images"].dtype == np.uint8
        np.testing.assert_array_equal(rec["images"], np.stack([c["color_image"] for c in cams]))
        inst = np.stack([c["instance_image"][..., 0] for c in cams])
        np.testing.assert_array_equal(rec["ids"], np.clip(inst, 1, 34) - 1)
        # 5 random input views, targets the other 5.
        assert len(set(rec["input_views"])) == 5 and len(rec["target_views"]) == 5
        assert not set(rec["input_views"]) & set(rec["target_views"])
        assert sorted([*rec["input_views"], *rec["target_views"]]) == list(range(10))
    # The fixture puts Kubric's rare id 0 into the first scene: it is background like id 1.
    zero = [r for r in recs if r["sceneid"] == min(raw)][0]
    assert (np.stack([raw[min(raw)]["cameras"][f"camera_{i}"]["instance_image"]
                      for i in range(10)]) == 0).any()
    assert zero["ids"].max() < 34 and zero["ids"].min() == 0


def reference_rays(cam, height, width):
    """sunds' rays: origin -R^T t, direction normalize(R^T K^-1 [u + .5, v + .5, 1])."""
    k, r, t = cam["intrinsics"]["K"], cam["extrinsics"]["R"], cam["extrinsics"]["t"]
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pix = np.stack([u, v, np.ones_like(u)], -1).astype(np.float64)
    d = pix @ np.linalg.inv(k).T @ r      # (R^T K^-1 p)^T = p^T K^-T R
    return -r.T @ t, d / np.linalg.norm(d, axis=-1, keepdims=True)


def test_batches_point_rays_at_their_pixels(root):
    ds = kubric.KubricDataset(root, "test")
    recs = list(ds)
    batch = model_batch(recs, BatchSpec.for_dataset(ds, num_points=200))
    raw = raw_examples(ds.version_dir, "test")
    assert batch["input_masks"].shape == (len(recs), 5, H, W, 34)
    assert batch["target_masks"].shape == (len(recs), 200, 34)
    for b, rec in enumerate(recs):
        ex = raw[rec["sceneid"]]
        origins, dirs = zip(*(reference_rays(ex["cameras"][f"camera_{i}"], H, W)
                              for i in range(10)))
        for j, v in enumerate(rec["input_views"]):
            np.testing.assert_allclose(batch["input_rays"][b, j], dirs[v], atol=2e-6)
            np.testing.assert_allclose(batch["input_camera_pos"][b, j], origins[v], atol=2e-5)
            np.testing.assert_array_equal(batch["input_images"][b, j].permute(1, 2, 0) * 255,
                                          ex["cameras"][f"camera_{v}"]["color_image"])
        # Each target ray is the ray of exactly one pixel of a target view; its colour and mask
        # are that pixel's.
        tv = rec["target_views"]
        all_dirs = np.stack([dirs[v] for v in tv]).reshape(-1, 3)
        all_org = np.repeat(np.stack([origins[v] for v in tv]), H * W, 0)
        dist = (np.abs(batch["target_rays"][b].numpy()[:, None] - all_dirs[None]).sum(-1)
                + np.abs(batch["target_camera_pos"][b].numpy()[:, None] - all_org[None]).sum(-1))
        pix = dist.argmin(1)
        assert dist.min(1).max() < 1e-4
        assert np.partition(dist, 1, axis=1)[:, 1].min() > 1e-3
        colours = np.stack([ex["cameras"][f"camera_{v}"]["color_image"] for v in tv])
        np.testing.assert_array_equal(batch["target_pixels"][b].numpy() * 255,
                                      colours.reshape(-1, 3)[pix])
        np.testing.assert_array_equal(batch["target_masks"][b].argmax(-1).numpy(),
                                      rec["ids"][tv].reshape(-1)[pix])
        assert len(np.unique(pix)) == 200                 # drawn without replacement
    for k in ("input_images", "target_pixels"):
        assert 0 <= batch[k].min() and batch[k].max() <= 1
    torch.testing.assert_close(batch["target_rays"].norm(dim=-1),
                               torch.ones(batch["target_rays"].shape[:2]))


@pytest.mark.slow
def test_evaluation_is_reproducible_and_training_is_endless(root):
    a = list(kubric.KubricDataset(root, "val"))
    b = list(kubric.KubricDataset(root, "val"))
    for x, y in zip(a, b):
        assert x["sceneid"] == y["sceneid"] and x["seed"] == y["seed"]
        np.testing.assert_array_equal(x["input_views"], y["input_views"])
    train = iter(kubric.KubricDataset(root, "train", shuffle_buffer=4))
    ids = [next(train)["sceneid"] for _ in range(3 * SPLITS["train"])]
    assert sorted(set(ids)) == list(range(SPLITS["train"]))      # every scene, repeatedly
    assert len(kubric.KubricDataset(root, "val", max_len=2)) == 2
    assert len(list(kubric.KubricDataset(root, "val", max_len=2))) == 2


def test_sharding_and_skipping(root):
    ds = kubric.KubricDataset(root, "val")
    order = [r["sceneid"] for r in ds.ordered_records()]
    assert sorted(order) == [0, 1, 2]
    parts = [[r["sceneid"] for r in ds.iter_records(i, 2)] for i in range(2)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(order)
    assert [r["sceneid"] for r in ds.ordered_records(1)] == order[1:]
    assert [r["sceneid"] for r in ds.skipping(2)] == order[2:]
    with pytest.raises(DataError, match="cannot skip 3"):
        ds.skipping(3)


@pytest.mark.slow
def test_dataloader_workers_share_the_stream(root):
    """Two 'spawn' workers read disjoint halves: every val scene exactly once."""
    ds = data.get_dataset("val", DataConfig(dataset="osrt", path=root, num_points=16))
    assert isinstance(ds, kubric.KubricDataset) and ds.multiprocessing_context == "spawn"
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2,
                                         **data.loader_kwargs(ds, 2))
    seen = sorted(int(b["sceneid"]) for b in loader)
    assert seen == [0, 1, 2]


def test_reading_msn_hard_then_building_the_model_survives():
    """TensorFlow first, then Triton (the kernels) aborts a process; the reader imports Triton
    before TensorFlow, so reading MSN-Hard and then building the model works in a fresh
    interpreter (as a script that opens the data before importing the trainer does)."""
    pytest.importorskip("triton")
    code = ("from osrt_fast.data import kubric; kubric.import_tfds(); "
            "import osrt_fast.model, osrt_fast.kernels.slot_attention; print('alive')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "alive" in out.stdout, out.stderr[-2000:]


def test_msn_without_masks(root):
    cfg = DataConfig(dataset="msn", path=root, num_points=16)
    ds = data.get_dataset("test", cfg)
    rec = next(iter(ds))
    spec = data.batch_spec(cfg, ds)
    assert "ids" not in rec and spec == BatchSpec(16, False, None, 0)
    batch = model_batch(rec, spec)
    assert "target_masks" not in batch and batch["target_pixels"].shape == (1, 16, 3)


def test_bad_inputs(root, tmp_path):
    with pytest.raises(DataError, match="does not exist.*gs://kubric-public.*AccessDenied.*"
                                        "procedural"):
        kubric.KubricDataset(str(tmp_path / "nope"), "train")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="no dataset_info.json.*multi_shapenet_frames/2.8.0"):
        kubric.KubricDataset(str(tmp_path / "empty"), "train")
    # A partial download: one train record shard missing.
    part = str(tmp_path / "partial")
    shutil.copytree(root, part)
    vdir = os.path.join(part, "multi_shapenet_frames", "2.8.0")
    missing = os.path.join(vdir, "kubric_frames-train.tfrecord-00001-of-00002")
    os.remove(missing)
    with pytest.raises(DataError, match="partial download: split 'train' has 2 record shards in "
                                        "dataset_info.json but only 1 of those files on disk; "
                                        "missing 1, e.g. 'kubric_frames-train.tfrecord-00001-"
                                        "of-00002'.*Copy the missing shards"):
        kubric.KubricDataset(part, "train")
    kubric.KubricDataset(part, "val")       # only the split that is opened must be complete
    with pytest.raises(DataError, match="unknown split 'dev'"):
        kubric.KubricDataset(root, "dev")
    with pytest.raises(DataError, match="num_input_views must be between 1 and 9"):
        kubric.KubricDataset(root, "train", num_input_views=10)
    with pytest.raises(DataError, match="4x4 \\(width x height; files 32x32, downsample=3\\)"
                                        ".*multiples of 8.*32x32 images work with downsample "
                                        "None, 1, 2\\)"):
        BatchSpec.for_dataset(kubric.KubricDataset(root, "train"), downsample=3)
    shutil.copy(os.path.join(root, "multi_shapenet_frames", "2.8.0", os.path.basename(missing)),
                missing)
    kubric.KubricDataset(part, "train")
    # features.json without instance images: not MSN-Hard >= 2.8.0.
    import json
    fj = os.path.join(vdir, "features.json")
    with open(fj) as f:
        feats = json.load(f)
    cam0 = feats["featuresDict"]["features"]["cameras"]["featuresDict"]["features"]["camera_0"]
    del cam0["featuresDict"]["features"]["instance_image"]
    with open(fj, "w") as f:
        json.dump(feats, f)
    with pytest.raises(DataError, match="lacks feature.*instance_image"):
        kubric.KubricDataset(part, "val")
    with pytest.raises(ConfigError, match="unknown data.kwargs key.*.max_objects."):
        data.get_dataset("train", DataConfig(dataset="osrt", path=root,
                                             kwargs={"max_objects": 3}))


def test_corrupt_image_is_skipped_and_counted(root, tmp_path):
    """A PNG damaged inside a record: that scene is skipped with a warning, the rest read."""
    bad = str(tmp_path / "bad")
    shutil.copytree(root, bad)
    vdir = os.path.join(bad, "multi_shapenet_frames", "2.8.0")
    path = sorted(glob.glob(os.path.join(vdir, "kubric_frames-val.tfrecord-*")))[0]
    blob = bytearray(open(path, "rb").read())
    # The pixel data of the first record's camera_0 colour image (the Example's map entries
    # are key then value, in no fixed order: find the key first).
    key = blob.find(b"cameras/camera_0/color_image")
    start = blob.find(b"IDAT", key)
    assert 0 < key < start < struct.unpack("<Q", blob[:8])[0]
    blob[start + 8:start + 40] = bytes(32)
    # TFRecord framing carries a CRC of the record: fix it up so only the PNG is damaged,
    # as when a file was written from corrupt images.
    length = struct.unpack("<Q", blob[:8])[0]
    payload = bytes(blob[12:12 + length])
    blob[12 + length:16 + length] = struct.pack("<I", _masked_crc(payload))
    open(path, "wb").write(bytes(blob))
    ds = kubric.KubricDataset(bad, "val")
    with pytest.warns(DataWarning, match="skipping a corrupt MSN-Hard record"):
        recs = list(ds)
    assert ds.skipped.count == 1 and len(recs) == SPLITS["val"] - 1


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32-C."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_training_and_evaluation_on_msn_hard_format(root, tmp_path):
    """train.py on the TFDS folder: a stream (no exact resume), evaluation with fixed views."""
    from conftest import train_tiny
    log = train_tiny(tmp_path, {"dataset": "osrt", "path": root, "num_points": 32},
                     validate_every=2)
    evals = [r for r in log if r.get("split") == "val"]
    assert evals and evals[-1]["num_scenes"] == SPLITS["val"]
    assert 0 <= evals[-1]["fg_ari"] <= 1 or np.isnan(evals[-1]["fg_ari"])


def _copy_version_dir(root, tmp_path, name):
    """A copy of the fixture's data root; returns (root copy, its version folder)."""
    out = str(tmp_path / name)
    shutil.copytree(root, out)
    return out, os.path.join(out, "multi_shapenet_frames", "2.8.0")


def _edit_info(vdir, edit):
    path = os.path.join(vdir, "dataset_info.json")
    with open(path) as f:
        info = json.load(f)
    edit(info)
    with open(path, "w") as f:
        json.dump(info, f)


def test_missing_split_and_misnamed_shards(root, tmp_path):
    # dataset_info.json without the val split: the message names expected and found splits.
    nosplit, vdir = _copy_version_dir(root, tmp_path, "nosplit")
    _edit_info(vdir, lambda i: i.update(splits=[s for s in i["splits"] if s["name"] != "val"]))
    with pytest.raises(DataError, match=r"no 'val' split for mode 'val': its dataset_info.json "
                                        r"lists \['test', 'train'\], MSN-Hard 2.8.0 has "
                                        r"\['train', 'val', 'test'\].*copy the whole version"):
        kubric.KubricDataset(nosplit, "val")
    kubric.KubricDataset(nosplit, "train")
    # Shards renamed after the folder (the name must come from dataset_info.json): all missing,
    # and the message shows the files found and says where the names come from.
    renamed, vdir = _copy_version_dir(root, tmp_path, "renamed")
    for p in glob.glob(os.path.join(vdir, "kubric_frames-test.*")):
        os.rename(p, p.replace("kubric_frames-", "multi_shapenet_frames-"))
    with pytest.raises(DataError, match="split 'test' has 2 record shards.*only 0 of those.*"
                                        "e.g. 'kubric_frames-test.tfrecord-00000-of-00002'.*"
                                        "other names: \\['multi_shapenet_frames-test.tfrecord-"
                                        "00000-of-00002'.*from dataset_info.json's name "
                                        "'kubric_frames'"):
        kubric.KubricDataset(renamed, "test")


def test_older_layouts_are_read(root, tmp_path):
    """dataset_info.json without filepathTemplate (TFDS < 4.8 wrote none), and a `validation`
    split (this project's earlier fixtures) for mode 'val'."""
    old, vdir = _copy_version_dir(root, tmp_path, "old")

    def edit(info):
        for s in info["splits"]:
            del s["filepathTemplate"]
            if s["name"] == "val":
                s["name"] = "validation"
    _edit_info(vdir, edit)
    for p in glob.glob(os.path.join(vdir, "kubric_frames-val.*")):
        os.rename(p, p.replace("-val.", "-validation."))
    ds = kubric.KubricDataset(old, "val")
    assert ds.split == "validation"
    assert sorted(r["sceneid"] for r in ds) == list(range(SPLITS["val"]))
    assert sorted(r["sceneid"] for r in kubric.KubricDataset(old, "test")) == [0, 1]


def test_unknown_camera_type_is_a_clear_error(tmp_path):
    assert kubric.check_camera_type(b"PERSPECTIVE") is None
    with pytest.raises(DataError, match="camera_3 of scene_7 has intrinsics/type 'FISHEYE'"):
        kubric.check_camera_type(b"FISHEYE", "camera_3", b"scene_7")
    # Through the stream: the first record stops the read with the reason (not a skipped
    # 'corrupt record'), e.g. on a folder of the old fixture writer's 'PERSP'.
    out = str(tmp_path / "persp")
    kubric.write_fixture(out, {"train": 1, "val": 1, "test": 1}, 16, 16, shards=1,
                         camera_type="PERSP")
    ds = kubric.KubricDataset(out, "val")
    with pytest.raises(DataError, match="camera_0 of scene_0 has intrinsics/type 'PERSP', but "
                                        "only 'PERSPECTIVE' \\(pinhole\\) cameras are supported"):
        list(ds)
    assert ds.skipped.count == 0


def test_sunds_reads_the_fixture_as_the_reference_does(root):
    """The reference's MultishapenetDataset: sunds.builder('multi_shapenet', data_dir=<root>)
    and the stacked Nerf task with instance images, for each of its splits."""
    sunds = pytest.importorskip("sunds", reason="sunds is not installed (pip install "
                                                "sunds==0.4.1): the reference's reader of this "
                                                "folder is not checked")
    builder = sunds.builder("multi_shapenet", data_dir=root)
    vdir = os.path.join(root, "multi_shapenet_frames", "2.8.0")
    for split, n in SPLITS.items():
        ds = builder.as_dataset(split=split, task=sunds.tasks.Nerf(
            yield_mode="stacked", additional_camera_specs={"instance_image"}))
        items = list(ds.as_numpy_iterator())
        assert len(items) == n
        raw = raw_examples(vdir, split)
        for ex in items:
            assert ex["color_image"].shape == (10, H, W, 3) and ex["color_image"].dtype == np.uint8
            assert ex["instance_image"].shape == (10, H, W, 1)
            assert ex["ray_directions"].shape == ex["ray_origins"].shape == (10, H, W, 3)
            sid = int(ex["scene_name"][6:])        # the reference's scene id
            cams = [raw[sid]["cameras"][f"camera_{i}"] for i in range(10)]
            np.testing.assert_array_equal(ex["color_image"],
                                          np.stack([c["color_image"] for c in cams]))
            origin, dirs = reference_rays(cams[4], H, W)
            np.testing.assert_allclose(ex["ray_directions"][4], dirs, atol=2e-5)
            np.testing.assert_allclose(ex["ray_origins"][4, 0, 0], origin, atol=2e-4)


@pytest.mark.slow
def test_train_py_msn_hard_config_and_render_py(root, tmp_path):
    """`python3 train.py configs/msn_hard.yaml` on the real layout, as a user runs it (a copy of
    the config with data.path at the fixture and a tiny model and batch): trains, evaluates on
    val, writes the render grids; then `python3 render.py` renders a val scene of that run."""
    from conftest import tiny_model_config
    with open(os.path.join(ROOT, "configs", "msn_hard.yaml")) as f:
        cfg = yaml.safe_load(f)
    assert cfg["data"]["dataset"] == "osrt"
    cfg["data"].update(path=root, num_points=64)
    cfg["model"] = tiny_model_config()
    t = cfg["training"]
    t.pop("activation_checkpointing")
    t.update(batch_size=2, eval_batch_size=2, num_workers=0, print_every=1, validate_every=2,
             visualize_every=2, checkpoint_every=100, backup_every=0, lr_warmup=10,
             precision="fp32", device="cpu", vis_scenes=1)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "msn_hard.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")

    def run(*args):
        proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    proc = run(os.path.join(ROOT, "train.py"), "configs/msn_hard.yaml", "--exit-after", "2")
    run_dir = tmp_path / "runs" / "msn_hard"
    assert "Reached iteration 2" in proc.stdout
    assert (run_dir / "model.pt").is_file() and (run_dir / "config.yaml").is_file()
    log = [json.loads(x) for x in open(run_dir / "log.jsonl")]
    evals = [r for r in log if r.get("split") == "val"]
    assert evals and evals[-1]["num_scenes"] == SPLITS["val"]
    assert np.isfinite(evals[-1]["psnr"])
    for name in ("renders-val.png", "renders-train.png"):
        assert (run_dir / name).stat().st_size > 0

    run(os.path.join(ROOT, "render.py"), "runs/msn_hard/config.yaml", "--sceneid", "1",
        "--num-frames", "2", "--novideo", "--no-cuda")
    out = run_dir / "render" / "rotate" / "1"
    assert sorted(os.listdir(out / "renders")) == ["0.png", "1.png"]
    assert len(os.listdir(out / "segmentations")) == 2
