"""MSN-Hard (Kubric TFDS) reader, end to end on a fixture in the exact on-disk TFDS format:
records, views, rays and colours checked against the raw TFDS examples, sharding, skipping,
streaming through DataLoader workers, and bad input."""
import glob
import os
import shutil
import struct

import numpy as np
import pytest
import torch

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from osrt_fast import data  # noqa: E402
from osrt_fast.config import ConfigError, DataConfig  # noqa: E402
from osrt_fast.data import DataError, kubric, model_batch  # noqa: E402
from osrt_fast.data.errors import DataWarning  # noqa: E402

H = W = 32
SPLITS = {"train": 6, "validation": 3, "test": 2}


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


def test_folder_layout_and_resolution(root):
    vdir = os.path.join(root, "multi_shapenet_frames", "2.8.0")
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(vdir, "*")))
    assert "dataset_info.json" in names and "features.json" in names
    assert "multi_shapenet_conditional-train.tfrecord-00000-of-00002" in names
    # The version folder, its parent and the reference's data/osrt-style root all resolve.
    for p in (root, os.path.join(root, "multi_shapenet_frames"), vdir):
        assert kubric.find_version_dir(p) == vdir
    info = kubric.read_info(vdir)
    assert info["splits"] == SPLITS and info["image_shape"] == (H, W, 3)


def test_records_match_the_raw_examples(root):
    ds = kubric.KubricDataset(root, "val", points_per_item=300)
    assert len(ds) == SPLITS["validation"] and ds.render_kwargs == {"min_dist": 0., "max_dist": 20.}
    recs = list(ds)
    raw = raw_examples(ds.version_dir, "validation")
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
    ds = kubric.KubricDataset(root, "test", points_per_item=200)
    recs = list(ds)
    batch = model_batch(recs, ds.spec)
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
    a = list(kubric.KubricDataset(root, "val", points_per_item=8))
    b = list(kubric.KubricDataset(root, "val", points_per_item=8))
    for x, y in zip(a, b):
        assert x["sceneid"] == y["sceneid"] and x["seed"] == y["seed"]
        np.testing.assert_array_equal(x["input_views"], y["input_views"])
    train = iter(kubric.KubricDataset(root, "train", points_per_item=8, shuffle_buffer=4))
    ids = [next(train)["sceneid"] for _ in range(3 * SPLITS["train"])]
    assert sorted(set(ids)) == list(range(SPLITS["train"]))      # every scene, repeatedly
    assert len(kubric.KubricDataset(root, "val", max_len=2)) == 2
    assert len(list(kubric.KubricDataset(root, "val", max_len=2))) == 2


def test_sharding_and_skipping(root):
    ds = kubric.KubricDataset(root, "val")
    order = [r["sceneid"] for r in ds.ordered_records()]
    assert sorted(order) == [6, 7, 8]
    parts = [[r["sceneid"] for r in ds.iter_records(i, 2)] for i in range(2)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(order)
    assert [r["sceneid"] for r in ds.ordered_records(1)] == order[1:]
    assert [r["sceneid"] for r in ds.skipping(2)] == order[2:]
    with pytest.raises(DataError, match="cannot skip 3"):
        ds.skipping(3)


@pytest.mark.slow
def test_dataloader_workers_share_the_stream(root):
    """Two 'spawn' workers read disjoint halves: every validation scene exactly once."""
    ds = data.get_dataset("val", DataConfig(dataset="osrt", path=root, num_points=16))
    assert isinstance(ds, kubric.KubricDataset) and ds.multiprocessing_context == "spawn"
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2,
                                         **data.loader_kwargs(ds, 2))
    seen = sorted(int(b["sceneid"]) for b in loader)
    assert seen == [6, 7, 8]


def test_msn_without_masks(root):
    ds = data.get_dataset("test", DataConfig(dataset="msn", path=root, num_points=16))
    rec = next(iter(ds))
    assert "ids" not in rec and ds.spec.num_entities == 0
    batch = model_batch(rec, ds.spec)
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
    missing = glob.glob(os.path.join(vdir, "*-train.tfrecord-00001-of-00002"))[0]
    os.remove(missing)
    with pytest.raises(DataError, match="partial download.*'train' has 2 record shards.*1 files"):
        kubric.KubricDataset(part, "train")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        kubric.KubricDataset(root, "dev")
    with pytest.raises(DataError, match="num_input_views must be between 1 and 9"):
        kubric.KubricDataset(root, "train", num_input_views=10)
    with pytest.raises(DataError, match="4x4 \\(width x height; files 32x32, downsample=3\\)"
                                        ".*multiples of 8"):
        kubric.KubricDataset(root, "train", downsample=3)
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
    path = sorted(glob.glob(os.path.join(vdir, "*-validation.tfrecord-*")))[0]
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
    assert ds.skipped.count == 1 and len(recs) == SPLITS["validation"] - 1


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
    assert evals and evals[-1]["num_scenes"] == SPLITS["validation"]
    assert 0 <= evals[-1]["fg_ari"] <= 1 or np.isnan(evals[-1]["fg_ari"])
