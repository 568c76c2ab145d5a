"""Pre-decoded shards: conversion of each loader's data (raw and png), items identical to the
source's, resumable conversion, the CLI, training from shards, and bad input."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
import yaml

from osrt_fast import scenes
from osrt_fast.data import BatchSpec, DataError, ObSuRFDataset, model_batch, nmr, shards
from osrt_fast.data.errors import DataWarning

from conftest import train_tiny


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("proc") / "procedural")
    scenes.generate_dataset(root, 12, height=16, width=16, num_views=3, max_objects=3,
                            progress=False)
    return root


def same_records(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_obsurf_items_survive_conversion(proc, tmp_path, encoding):
    src = ObSuRFDataset(proc, "train", kind="procedural", max_objects=3)
    shards.convert(src, str(tmp_path / "train"), encoding, shard_size=4, progress=False)
    ds = shards.ShardDataset(str(tmp_path), "train")
    assert len(ds) == len(src) and ds.render_kwargs == src.render_kwargs
    assert (ds.height, ds.width, ds.num_entities) == (src.height, src.width, src.num_entities)
    for i in (0, 5, len(src) - 1):
        same_records(src[(i, 11)], ds[(i, 11)])
    index = json.load(open(tmp_path / "train" / "index.json"))
    assert index["shards"] == [4, 4, 2] and index["encoding"] == encoding
    raw = np.load(tmp_path / "train" / "shard_00001.images.npy") if encoding == "raw" else None
    if raw is not None:
        assert raw.dtype == np.uint8 and raw.shape == (4, 3, 16, 16, 3)


def test_nmr_conversion(tmp_path):
    root = nmr.write_fixture(str(tmp_path / "nmr"), objects_per_split={"train": 2, "val": 1,
                                                                        "test": 1}, size=16)
    src = nmr.NMRDataset(root, "train")
    shards.convert(src, str(tmp_path / "sh" / "train"), "png", shard_size=3, progress=False)
    ds = shards.ShardDataset(str(tmp_path / "sh"), "train")
    assert ds.num_entities == 0 and len(ds) == len(src)
    same_records(src[(30, 2)], ds[(30, 2)])
    assert "ids" not in ds[0]


def test_kubric_conversion_and_random_views(tmp_path):
    pytest.importorskip("tensorflow_datasets",
                        reason="tensorflow-datasets is not installed: pip install 'osrt-fast[tfds]'")
    from osrt_fast.data import kubric
    root = str(tmp_path / "k")
    kubric.write_fixture(root, {"train": 5, "validation": 1, "test": 1}, 16, 16, shards=1)
    src = kubric.KubricDataset(root, "train")
    shards.convert(src, str(tmp_path / "sh" / "train"), "raw", shard_size=2, progress=False)
    ds = shards.ShardDataset(str(tmp_path / "sh"), "train")
    assert len(ds) == 5 and ds.num_entities == 34
    stored = {r["sceneid"]: r for r in src.ordered_records()}
    for i in range(5):
        rec = ds[(i, 100 + i)]
        for k in ("images", "ids", "origins", "ray_mats"):
            np.testing.assert_array_equal(rec[k], stored[rec["sceneid"]][k])
        assert len(rec["input_views"]) == 5 and not set(rec["input_views"]) & set(
            rec["target_views"])
    a, b = ds[(2, 9)], ds[(2, 9)]
    np.testing.assert_array_equal(a["input_views"], b["input_views"])     # seeded
    assert ds.index["sceneid"] == "stored"


class Interrupted(Exception):
    pass


def test_conversion_resumes(proc, tmp_path):
    src = ObSuRFDataset(proc, "train", kind="procedural", max_objects=3)
    whole = str(tmp_path / "whole")
    shards.convert(src, whole, "raw", shard_size=3, progress=False)

    class Flaky:
        """The source dies after 7 scenes, as a killed conversion would."""
        def __init__(self, ds, limit):
            self.ds, self.limit, self.calls = ds, limit, 0
            self.num_scenes, self.policy = ds.num_scenes, ds.policy
            self.num_entities, self.render_kwargs = ds.num_entities, ds.render_kwargs

        def __getitem__(self, i):
            self.calls += 1
            if self.calls > self.limit:
                raise Interrupted
            return self.ds[i]

    part = str(tmp_path / "part")
    with pytest.raises(Interrupted):
        shards.convert(Flaky(src, 7), part, "raw", shard_size=3, progress=False)
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(part, "shard_*.json"))) \
        == ["shard_00000.json", "shard_00001.json"]
    assert not os.path.exists(os.path.join(part, "index.json"))
    with pytest.raises(DataError, match="partial conversion.*resumes"):
        shards.ShardDataset(str(tmp_path), "part")
    resumed = Flaky(src, 100)
    shards.convert(resumed, part, "raw", shard_size=3, progress=False)
    assert resumed.calls == src.num_scenes - 6          # only the missing scenes were read
    for name in sorted(os.listdir(whole)):
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(os.path.join(whole, name)),
                                          np.load(os.path.join(part, name)), err_msg=name)
    with pytest.raises(DataError, match="other settings"):
        shards.convert(src, part, "png", shard_size=3, progress=False)


def test_cli_and_training_from_shards(proc, tmp_path):
    cfg = {"data": {"dataset": "procedural", "path": proc, "num_points": 32,
                    "kwargs": {"num_scenes": 12, "height": 16, "width": 16, "num_views": 3,
                               "max_objects": 3}}}
    src_cfg = tmp_path / "src.yaml"
    src_cfg.write_text(yaml.safe_dump(cfg))
    out = str(tmp_path / "shards")
    assert shards.main([str(src_cfg), "--out", out, "--shard-size", "5"]) == 0
    assert sorted(os.listdir(out)) == ["test", "train", "val"]

    log = train_tiny(tmp_path, {"dataset": "shards", "path": out, "num_points": 32})
    assert os.path.exists(tmp_path / "run" / "model.pt")
    assert any("loss" in r or "mse" in r for r in log)


def test_bad_inputs(proc, tmp_path):
    with pytest.raises(DataError, match="does not exist.*python -m osrt_fast.data.shards"):
        shards.ShardDataset(str(tmp_path / "none"), "train")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="index.json' is missing.*Converted splits here: none"):
        shards.ShardDataset(str(tmp_path / "empty"), "val")
    src = ObSuRFDataset(proc, "train", kind="procedural", max_objects=3)
    good = str(tmp_path / "good")
    shards.convert(src, os.path.join(good, "train"), "png", shard_size=4, progress=False)
    with pytest.raises(DataError, match="Converted splits here: \\['train'\\]"):
        shards.ShardDataset(good, "val")
    with pytest.raises(DataError, match="unknown shard encoding 'jpeg'"):
        shards.convert(src, str(tmp_path / "j"), "jpeg")
    # A shard lost when copying.
    lost = str(tmp_path / "lost")
    shutil.copytree(good, lost)
    os.remove(os.path.join(lost, "train", "shard_00001.json"))
    with pytest.raises(DataError, match="damaged or was copied in part"):
        shards.ShardDataset(lost, "train")
    with pytest.raises(DataError, match="num_input_views=4 does not fit 3 views"):
        shards.ShardDataset(good, "train", num_input_views=4)
    with pytest.raises(DataError, match="4x4.*downsample=2.*multiples of 8"):
        BatchSpec.for_dataset(shards.ShardDataset(good, "train"), downsample=2)


def test_corrupt_png_in_a_shard_is_skipped(proc, tmp_path):
    src = ObSuRFDataset(proc, "train", kind="procedural", max_objects=3)
    out = str(tmp_path / "train")
    shards.convert(src, out, "png", shard_size=4, progress=False)
    offsets = np.load(os.path.join(out, "shard_00000.images.offsets.npy"))
    blob = bytearray(open(os.path.join(out, "shard_00000.images.bin"), "rb").read())
    a = int(offsets[3])                  # scene 1, view 0
    blob[a + 40:a + 80] = bytes(40)
    open(os.path.join(out, "shard_00000.images.bin"), "wb").write(bytes(blob))
    ds = shards.ShardDataset(str(tmp_path), "train")
    with pytest.warns(DataWarning, match="skipping a corrupt shard scene"):
        rec = ds[(1, 0)]
    assert ds.skipped.count == 1
    same_records({k: v for k, v in rec.items() if k != "sceneid"},
                 {k: v for k, v in src[(2, 0)].items() if k not in ("sceneid", "input_views")}
                 | {"input_views": rec["input_views"]})
    batch = model_batch(rec, BatchSpec.for_dataset(ds))
    assert batch["target_pixels"].shape == (1, 2048, 3)
