"""ObSuRF-layout loader: item shapes and contents, splits, seeded sampling, downsampling,
CLEVR3D-style folders, get_dataset, and the DataError messages for bad input."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from osrt_fast import cameras, data, scenes
from osrt_fast.config import ConfigError, DataConfig
from osrt_fast.data import BatchSpec, DataError, DataWarning, ObSuRFDataset, model_batch

N, V, H, W = 20, 3, 16, 32


def example(ds, idx, **spec):
    """The model inputs of one item (numpy), built as training builds them: record -> make_batch
    with the BatchSpec of `spec` (num_points, full_scale, downsample)."""
    b = model_batch(ds[idx], BatchSpec.for_dataset(ds, **spec))
    return {k: v[0].numpy() for k, v in b.items()}


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "procedural")
    scenes.generate_dataset(root, N, height=H, width=W, num_views=V, min_objects=1,
                            max_objects=4, seed=3, progress=False)
    return root


def load_scene(root, scene, views=V):
    imgs = np.stack([np.asarray(Image.open(os.path.join(root, "images", f"img_{scene}_{v}.png")))
                     for v in range(views)])[..., :3].astype(np.float32) / 255
    ids = np.stack([np.asarray(Image.open(os.path.join(root, "masks", f"masks_{scene}_{v}.png")))
                    for v in range(views)])
    return imgs, ids


def test_shapes_default_and_full_scale(proc):
    ds = ObSuRFDataset(proc, "train", kind="procedural", max_objects=4)
    assert ds.render_kwargs == {"min_dist": 0.035, "max_dist": 35.}
    item = example(ds, 0, num_points=100)
    o = 5
    expect = {"input_images": (1, 3, H, W), "input_camera_pos": (1, 3),
              "input_rays": (1, H, W, 3), "input_masks": (1, H, W, o),
              "target_pixels": (100, 3), "target_camera_pos": (100, 3),
              "target_rays": (100, 3), "target_masks": (100, o)}
    for k, shape in expect.items():
        assert item[k].shape == shape, k
        assert item[k].dtype == np.float32, k
    assert item["sceneid"] == 0
    full = example(ds, 1, full_scale=True)
    p = V * H * W
    for k in ("target_pixels", "target_camera_pos", "target_rays"):
        assert full[k].shape == (p, 3)
    assert full["target_masks"].shape == (p, o)


def test_items_come_from_the_right_scene_and_view(proc):
    ds = ObSuRFDataset(proc, "train", kind="procedural", max_objects=4)
    n = len(ds.idxs)
    meta = np.load(os.path.join(proc, "metadata.npz"))
    for idx in (0, n - 1, n + 2, 2 * n + 5):
        scene, view = ds.idxs[idx % n], idx // n
        item = example(ds, (idx, 7))
        imgs, ids = load_scene(proc, scene)
        cams = meta["camera_pos"][scene]
        np.testing.assert_array_equal(item["input_images"][0], imgs[view].transpose(2, 0, 1))
        np.testing.assert_array_equal(item["input_camera_pos"][0], cams[view])
        np.testing.assert_allclose(item["input_rays"][0], cameras.camera_rays(cams[view], H, W),
                                   atol=1e-6)
        np.testing.assert_array_equal(item["input_masks"][0].argmax(-1), ids[view])
        # Each target ray is some pixel's ray; that pixel's colour and id are the targets.
        rays = cameras.camera_rays(cams, H, W).reshape(-1, 3)
        cam_of = np.repeat(cams, H * W, 0)
        dist = (np.abs(item["target_rays"][:, None] - rays[None]).sum(-1)
                + np.abs(item["target_camera_pos"][:, None] - cam_of[None]).sum(-1))
        pix = dist.argmin(1)
        assert dist.min(1).max() < 1e-5
        second = np.partition(dist, 1, axis=1)[:, 1]
        assert second.min() > 1e-3          # the match is unambiguous
        np.testing.assert_array_equal(item["target_pixels"], imgs.reshape(-1, 3)[pix])
        np.testing.assert_array_equal(item["target_masks"].argmax(-1), ids.reshape(-1)[pix])
        # Targets span all views, not just the input view.
        assert len(np.unique(pix // (H * W))) == V


def test_splits_and_max_objects(proc):
    sizes = {m: len(ObSuRFDataset(proc, m, kind="procedural", max_objects=4).idxs)
             for m in ("train", "val", "test")}
    assert sizes == {"train": 18, "val": 1, "test": 1}
    ds = ObSuRFDataset(proc, "train", kind="procedural", max_objects=4)
    assert len(ds) == 18 * V
    assert len(ObSuRFDataset(proc, "train", kind="procedural", max_len=5)) == 5
    shape = np.load(os.path.join(proc, "metadata.npz"))["shape"]
    counts = (shape > 0).sum(1)
    small = ObSuRFDataset(proc, "train", kind="procedural", max_objects=2)
    np.testing.assert_array_equal(small.idxs, np.nonzero(counts[:18] <= 2)[0])
    assert 0 < len(small.idxs) < 18
    for n in (3, 4, 10, 1000):
        r = {m: data.procedural_split_range(m, n) for m in ("train", "val", "test")}
        assert r["train"][0] == 0 and r["train"][1] == r["val"][0]
        assert r["val"][1] == r["test"][0] and r["test"][1] == n
        assert all(b - a >= 1 for a, b in r.values())
    assert data.procedural_split_range("train", 1000) == (0, 900)


def test_seeded_sampling(proc):
    ds = ObSuRFDataset(proc, "train", kind="procedural", max_objects=4)
    a, b, c = (example(ds, (4, s), num_points=64) for s in (123, 123, 124))
    np.testing.assert_array_equal(a["target_rays"], b["target_rays"])
    assert not np.array_equal(a["target_rays"], c["target_rays"])
    np.random.seed(0)
    d = example(ds, 4, num_points=64)
    np.random.seed(0)
    np.testing.assert_array_equal(d["target_rays"], example(ds, 4, num_points=64)["target_rays"])
    # No repeats when there are enough pixels; repeats (with replacement) when not.
    assert len(np.unique(a["target_rays"], axis=0)) == 64
    many = example(ds, (0, 1), num_points=V * H * W + 10)
    assert many["target_rays"].shape[0] == V * H * W + 10


def test_one_hot_masks(proc):
    item = example(ObSuRFDataset(proc, "train", kind="procedural", max_objects=4), 2, num_points=500)
    for m in (item["input_masks"], item["target_masks"]):
        np.testing.assert_array_equal(m.sum(-1), 1)
        assert set(np.unique(m)) <= {0.0, 1.0}
    _, ids = load_scene(proc, 2)
    np.testing.assert_array_equal(item["input_masks"][0, ..., 0], ids[0] == 0)
    assert item["input_masks"][0, ..., 0].sum() > 0     # background exists, channel 0


def test_downsample_and_input_views(proc):
    ds = ObSuRFDataset(proc, "train", kind="procedural", max_objects=4)
    item = example(ds, 0, num_points=50, downsample=1)
    imgs, ids = load_scene(proc, ds.idxs[0])
    assert item["input_images"].shape == (1, 3, H // 2, W // 2)
    np.testing.assert_array_equal(item["input_images"][0], imgs[0, 1::2, 1::2].transpose(2, 0, 1))
    cams = np.load(os.path.join(proc, "metadata.npz"))["camera_pos"][ds.idxs[0]]
    np.testing.assert_allclose(item["input_rays"][0],
                               cameras.camera_rays(cams[0], H, W)[1::2, 1::2], atol=1e-6)
    np.testing.assert_array_equal(item["input_masks"][0].argmax(-1), ids[0, 1::2, 1::2])
    assert item["target_rays"].shape == (50, 3)
    n = len(ds.idxs)
    multi = ObSuRFDataset(proc, "train", kind="procedural", max_objects=4, num_input_views=2)
    it = example(multi, 2 * n)     # input view 2, then view 0 (cyclic)
    assert it["input_images"].shape == (2, 3, H, W)
    np.testing.assert_array_equal(it["input_camera_pos"], cams[[2, 0]])
    np.testing.assert_array_equal(it["input_images"][1], imgs[0].transpose(2, 0, 1))


def write_fake_clevr(root, n=6, views=3, o=11, h=24, w=32, rgba=True):
    """A tiny CLEVR3D-style folder: RGBA images, O = 11 shape slots, 3 views."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "masks"))
    shape = np.zeros((n, o), np.int64)
    for i in range(n):
        shape[i, 1:2 + i] = 1            # scene i has i + 1 objects
    cam = np.stack([cameras.hemisphere_cameras(rng, views) for _ in range(n)]).astype(np.float32)
    np.savez(os.path.join(root, "metadata.npz"), shape=shape, camera_pos=cam,
             **{"3d_coords": np.zeros((n, o, 3))})
    for i in range(n):
        for v in range(views):
            img = rng.integers(0, 256, (h, w, 4 if rgba else 3), dtype=np.uint8)
            Image.fromarray(img).save(os.path.join(root, "images", f"img_{i}_{v}.png"))
            mask = rng.integers(0, i + 2, (h, w), dtype=np.uint8)
            Image.fromarray(mask).save(os.path.join(root, "masks", f"masks_{i}_{v}.png"))
    return root


def test_clevr3d_style_folder(tmp_path):
    root = write_fake_clevr(str(tmp_path / "clevr"))
    ranges = {"train": (0, 4), "val": (4, 5), "test": (5, 6)}
    ds = ObSuRFDataset(root, "train", kind="clevr3d", max_objects=6, split_ranges=ranges)
    assert len(ds) == 4 * 3
    item = example(ds, 5, num_points=40)        # scene 1, view 1
    assert item["input_images"].shape == (1, 3, 24, 32)
    assert item["input_masks"].shape == (1, 24, 32, 11)
    assert item["target_masks"].shape == (40, 11)
    raw = np.asarray(Image.open(os.path.join(root, "images", "img_1_1.png")))
    np.testing.assert_array_equal(item["input_images"][0],
                                  raw[..., :3].transpose(2, 0, 1).astype(np.float32) / 255)
    # max_objects filters on (shape > 0).sum(1): scene i has i + 1 objects.
    ds = ObSuRFDataset(root, "train", kind="clevr3d", max_objects=2, split_ranges=ranges)
    np.testing.assert_array_equal(ds.idxs, [0, 1])
    # The reference's ranges clip to the folder: all 6 scenes are in train (0-70000) ...
    assert len(ObSuRFDataset(root, "train", kind="clevr3d").idxs) == 6
    # ... and val (70000-75000) is empty, which is an error naming the split.
    with pytest.raises(DataError, match="val split .* is empty"):
        ObSuRFDataset(root, "val", kind="clevr3d")
    with pytest.raises(DataError, match="is empty"):
        ObSuRFDataset(root, "train", kind="obsurf_msn", max_objects=0)


def test_bad_inputs(tmp_path, proc):
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError, match="does not exist.*metadata.npz.*python -m osrt_fast.scenes"):
        ObSuRFDataset(missing, "train")

    no_meta = str(tmp_path / "no_meta")
    os.makedirs(no_meta)
    with pytest.raises(DataError, match="metadata.npz' is missing"):
        ObSuRFDataset(no_meta, "train")

    bad_meta = str(tmp_path / "bad_meta")
    os.makedirs(bad_meta)
    np.savez(os.path.join(bad_meta, "metadata.npz"), shape=np.zeros((3, 4)))
    with pytest.raises(DataError, match="lacks key.*camera_pos"):
        ObSuRFDataset(bad_meta, "train")

    holes = str(tmp_path / "holes")
    shutil.copytree(proc, holes)
    os.remove(os.path.join(holes, "images", "img_3_1.png"))
    ds = ObSuRFDataset(holes, "train", kind="procedural", max_objects=4)
    with pytest.warns(DataWarning, match="img_3_1.png': file is missing"):
        ds[3]                                   # replaced by the next scene (test_data_faults)
    os.remove(os.path.join(holes, "images", "img_0_0.png"))
    with pytest.raises(DataError, match="img_0_0.png' is missing"):
        ObSuRFDataset(holes, "train", kind="procedural", max_objects=4)

    # Views the encoder cannot take are refused when a batch spec is made for them.
    odd = ObSuRFDataset(write_fake_clevr(str(tmp_path / "odd"), n=2, h=12, w=20, rgba=False),
                        "train", kind="clevr3d")
    with pytest.raises(DataError, match="20x12.*multiples of 8.*24x16.*no downsample makes"):
        BatchSpec.for_dataset(odd)
    # 24x16 files are fine, but downsampled to 12x8 they are not.
    ok = ObSuRFDataset(write_fake_clevr(str(tmp_path / "ds"), n=2, h=16, w=24), "train",
                       kind="clevr3d")
    assert BatchSpec.for_dataset(ok) == BatchSpec(2048, False, None, 11)
    with pytest.raises(DataError, match=r"12x8.*downsample=1.*multiples of 8.*"
                                        r"24x16 images work with downsample None\)"):
        BatchSpec.for_dataset(ok, downsample=1)


def test_get_dataset(tmp_path, capsys):
    path = str(tmp_path / "auto")
    cfg = DataConfig(dataset="procedural", path=path, num_points=32,
                     kwargs=dict(num_scenes=4, height=8, width=8, num_views=2, max_objects=3))
    ds = data.get_dataset("train", cfg)
    assert "generating the procedural dataset" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(path, "metadata.npz"))
    assert data.batch_spec(cfg, ds) == BatchSpec(32, False, None, 4)
    first = example(ds, 0, num_points=32)
    assert first["target_rays"].shape == (32, 3) and first["input_masks"].shape[-1] == 4
    assert len(data.get_dataset("val", cfg).idxs) == 1
    test = data.get_dataset("test", cfg)
    assert data.batch_spec(cfg, test, full_scale=True) == BatchSpec(32, True, None, 4)
    assert example(test, 0, full_scale=True)["target_rays"].shape == (2 * 8 * 8, 3)
    assert len(data.get_dataset("train", cfg, max_len=3)) == 3
    capsys.readouterr()
    data.get_dataset("train", cfg)                    # reused, not regenerated
    assert "generating" not in capsys.readouterr().out
    # data.kwargs.downsample is the batch spec's: the reader takes the data, the spec refuses
    # input views the encoder cannot take (8x8 halved).
    halved = DataConfig(dataset="procedural", path=path, num_points=32,
                        kwargs=dict(cfg.kwargs, downsample=1))
    with pytest.raises(DataError, match="4x4.*downsample=1.*multiples of 8"):
        data.batch_spec(halved, data.get_dataset("train", halved))
    with pytest.raises(DataError, match="other settings"):
        data.get_dataset("train", DataConfig(dataset="procedural", path=path,
                                             kwargs=dict(num_scenes=5)))

    for name in ("osrt", "msn", "nmr", "shards"):
        with pytest.raises(DataError, match="does not exist"):
            data.get_dataset("train", DataConfig(dataset=name, path=str(tmp_path / "none")))
    # A hand-made DataConfig is checked as a loaded one is (ConfigError).
    with pytest.raises(ConfigError, match="data.dataset = 'foo'.*procedural, clevr3d"):
        data.get_dataset("train", DataConfig(dataset="foo"))
    with pytest.raises(ConfigError, match="unknown data.kwargs key.*'bogus'.*downsample"):
        data.get_dataset("train", DataConfig(dataset="clevr3d", kwargs=dict(bogus=1)))
    with pytest.raises(ConfigError, match="unknown data.kwargs key.*num_scenes"):
        data.get_dataset("train", DataConfig(dataset="clevr3d", kwargs=dict(num_scenes=1)))
    with pytest.raises(DataError, match="does not exist"):
        data.get_dataset("train", DataConfig(dataset="clevr3d", path=str(tmp_path / "x"),
                                             kwargs=dict(downsample=1, max_views=3)))


def test_worker_init_fn():
    data.worker_init_fn(0)
    a = np.random.rand()
    data.worker_init_fn(1)
    assert np.random.rand() != a


def test_the_scene_cache_gives_the_same_records_and_reads_each_scene_once(proc, monkeypatch):
    """data.cache: records equal the uncached reader's, and each scene's files are read once."""
    cached, plain = ObSuRFDataset(proc, "train"), ObSuRFDataset(proc, "train")
    assert plain.cache is None
    assert data.cached(cached, DataConfig(cache=True)).cache == {}      # as get_dataset sets it
    reads, real = [], cached._read_scene
    monkeypatch.setattr(cached, "_read_scene", lambda s: reads.append(s) or real(s))
    for item in [(0, 5), (3, 7), (0, 5), (len(plain.idxs) + 3, 2)]:    # the last: scene 3 again
        a, b = cached[item], plain[item]
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), k
    assert reads == [int(cached.idxs[0]), int(cached.idxs[3])]
    # Every camera's ray matrix is the metadata's, as camera_ray_matrix gives it per scene.
    scene = int(plain.idxs[4])
    cam = plain.metadata["camera_pos"][scene].astype(np.float32)
    assert np.array_equal(plain[4]["ray_mats"], cameras.camera_ray_matrix(cam, H, W))


def test_the_cache_is_for_folder_datasets_only():
    from osrt_fast.config import config_from_dict
    for name in ("shards", "osrt", "msn"):
        with pytest.raises(ConfigError, match="data.cache keeps decoded scenes.*data.cache: false"):
            config_from_dict({"data": {"dataset": name, "cache": True}})
    assert config_from_dict({"data": {"dataset": "nmr", "cache": True}}).data.cache


def test_fill_cache_decodes_every_scene_of_the_split_once_and_leaves_out_damaged_ones(
        proc, tmp_path, monkeypatch):
    """The training set's cache filled before the first step: every scene an item can read, each
    decoded once; a damaged scene is left for the reader's skip, as without the cache."""
    root = str(tmp_path / "copy")
    shutil.copytree(proc, root)
    ds = data.cached(ObSuRFDataset(root, "train"), DataConfig(cache=True))
    scenes = ds.split_scenes()
    assert scenes == [int(s) for s in ds.idxs]
    assert sorted({ds.policy.choose(i, len(ds.idxs), ds.num_views)[0] for i in range(len(ds))}) \
        == list(range(len(ds.idxs)))                                   # positions, all read
    bad = scenes[2]
    with open(os.path.join(root, "images", f"img_{bad}_1.png"), "wb") as f:
        f.write(b"not a png")

    class Bar:
        n = 0

        def update(self, k):
            self.n += k
    bar = Bar()
    assert ds.fill_cache(bar) == len(scenes) - 1 and bar.n == len(scenes)
    assert bad not in ds.cache and set(ds.cache) == set(scenes) - {bad}
    reads, real = [], ds._read_scene
    monkeypatch.setattr(ds, "_read_scene", lambda s: reads.append(s) or real(s))
    for i in (0, 1, 3):
        ds[i]
    assert reads == []
    with pytest.warns(DataWarning, match="skipping a corrupt"):
        assert np.array_equal(ds[2]["images"], ds[3]["images"])      # its substitute: the next
    assert reads == [bad]
    # A few items only (max_len): the scenes they read.
    few = data.cached(ObSuRFDataset(root, "train", max_len=3), DataConfig(cache=True))
    assert few.split_scenes() == scenes[:3]
    with pytest.raises(ValueError, match="data.cache"):
        ObSuRFDataset(root, "train").fill_cache()
