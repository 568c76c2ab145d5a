"""The NMR loader: records, the reference's item -> (scene, view) mapping and rays, bad input."""
import os

import numpy as np
import pytest
from PIL import Image

from osrt_fast.cameras import nmr_ray_matrix, ray_directions
from osrt_fast.data.errors import DataError, DataWarning
from osrt_fast.data.nmr import NMRDataset, main, write_fixture
from osrt_fast.data.records import BatchSpec, model_batch

S = 16          # fixture image size (a multiple of 8, small for speed)
V = 24
# Not sorted, so the test sees that categories come in metadata order.
CATEGORIES = ("04256520", "02691156")
PER_SPLIT = {"train": 3, "val": 1, "test": 1}
RECORD_KEYS = {"images", "origins", "ray_mats", "input_views", "target_views", "seed", "sceneid"}


@pytest.fixture(scope="module")
def nmr(tmp_path_factory):
    return write_fixture(str(tmp_path_factory.mktemp("nmr")), CATEGORIES, PER_SPLIT, size=S)


def small_copy(tmp_path, **kw):
    """A fresh one-category fixture to damage."""
    kw.setdefault("objects_per_split", {"train": 2, "val": 1, "test": 1})
    return write_fixture(str(tmp_path / "nmr"), ("02691156",), size=S, **kw)


def scene_dirs(root, mode):
    """The reference's scene order, read independently: metadata order, then list order."""
    import yaml
    with open(os.path.join(root, "metadata.yaml")) as f:
        meta = yaml.safe_load(f)
    out = []
    for entry in meta.values():
        with open(os.path.join(root, entry["id"], f"softras_{mode}.lst")) as f:
            out += [os.path.join(root, entry["id"], line.strip()) for line in f if line.strip()]
    return out


def load_images(scene_dir):
    return np.stack([np.asarray(Image.open(os.path.join(scene_dir, "image", f"{i:04d}.png")))
                     for i in range(V)])


def reference_rays(scene_dir, height, width):
    """The reference's rays [V, H, W, 3] and camera positions [V, 3], in plain numpy."""
    cams = dict(np.load(os.path.join(scene_dir, "cameras.npz")))
    rot = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], np.float64)
    xmap, ymap = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
    points = np.stack((xmap, ymap, np.ones_like(xmap)), -1)
    rays, pos = [], []
    for i in range(V):
        world_mat_inv = rot @ cams[f"world_mat_inv_{i}"]
        m = (world_mat_inv @ cams[f"camera_mat_inv_{i}"])[:3, :3]
        r = points @ m.T
        rays.append(r / np.linalg.norm(r, axis=-1, keepdims=True))
        pos.append(world_mat_inv[:3, 3])
    return np.stack(rays), np.stack(pos)


def test_record_format(nmr):
    ds = NMRDataset(nmr, "train")
    assert (ds.num_views, ds.height, ds.width, ds.num_entities) == (V, S, S, 0)
    assert ds.render_kwargs == {"min_dist": 2., "max_dist": 4.}
    assert BatchSpec.for_dataset(ds, num_points=100) == BatchSpec(100, False, None, 0)
    rec = ds[(0, 5)]
    assert set(rec) == RECORD_KEYS          # no 'ids': NMR has no instance masks
    assert rec["images"].dtype == np.uint8 and rec["images"].shape == (V, S, S, 3)
    assert rec["origins"].dtype == np.float32 and rec["origins"].shape == (V, 3)
    assert rec["ray_mats"].dtype == np.float32 and rec["ray_mats"].shape == (V, 3, 3)
    assert rec["input_views"].dtype == np.int64 and rec["input_views"].shape == (1,)
    assert rec["target_views"].dtype == np.int64 and rec["target_views"].shape == (V - 1,)
    assert rec["seed"] == 5 and rec["sceneid"] == 0
    assert isinstance(ds[1]["seed"], int)


def test_len_and_item_mapping(nmr):
    ds = NMRDataset(nmr, "train")
    dirs = scene_dirs(nmr, "train")
    n = len(dirs)
    assert n == 2 * PER_SPLIT["train"] and ds.num_scenes == n and len(ds) == n * V
    assert [os.path.join(nmr, p) for p in ds.scene_paths] == dirs
    assert ds.scene_paths[0].startswith(CATEGORIES[0])
    assert len(NMRDataset(nmr, "train", max_len=7)) == 7
    assert len(NMRDataset(nmr, "val")) == 2 * V
    for idx in (0, n - 1, n, 5 * n + 2, V * n - 1):
        rec = ds[(idx, 0)]
        np.testing.assert_array_equal(rec["images"], load_images(dirs[idx % n]))
        assert rec["input_views"].tolist() == [idx // n]
        assert rec["target_views"].tolist() == [v for v in range(V) if v != idx // n]
        assert rec["sceneid"] == idx
    assert ds.split_scenes() == list(range(n))                 # what data.cache fills
    assert NMRDataset(nmr, "train", max_len=3).split_scenes() == [0, 1, 2]


def test_rays_match_the_reference(nmr):
    ds = NMRDataset(nmr, "train")
    dirs = scene_dirs(nmr, "train")
    rec = ds[(4, 0)]
    want_rays, want_pos = reference_rays(dirs[4], S, S)
    np.testing.assert_allclose(ray_directions(rec["ray_mats"], S, S), want_rays, atol=1e-6)
    np.testing.assert_allclose(rec["origins"], want_pos, atol=1e-6)
    # Cameras sit around the origin, z up after the reference's rotation.
    assert np.allclose(np.linalg.norm(rec["origins"], axis=-1), 2.732, atol=1e-4)
    assert (rec["origins"][:, 2] > 0).all()


def test_ray_matrix_general_cameras_and_sizes():
    """M @ (col + .5, row + .5, 1) matches the linspace grid for non-square images and any
    (invertible, affine) camera."""
    rng = np.random.default_rng(0)
    h, w = 6, 11
    wmi = np.tile(np.eye(4), (2, 1, 1))
    cmi = np.tile(np.eye(4), (2, 1, 1))
    wmi[:, :3] = rng.normal(size=(2, 3, 4))
    cmi[:, :3, :3] = rng.normal(size=(2, 3, 3))
    rot = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], np.float64)
    xmap, ymap = np.meshgrid(np.linspace(-1, 1, w), np.linspace(-1, 1, h))
    points = np.stack((xmap, ymap, np.ones_like(xmap)), -1)
    for i in range(2):
        r = points @ (rot @ wmi[i] @ cmi[i])[:3, :3].T
        r /= np.linalg.norm(r, axis=-1, keepdims=True)
        got = ray_directions(nmr_ray_matrix(wmi[i], cmi[i], h, w), h, w)
        np.testing.assert_allclose(got, r, atol=1e-5)


@pytest.mark.parametrize("downsample", [None, 1])
def test_model_batch_targets_come_from_the_right_pixels(nmr, downsample):
    ds = NMRDataset(nmr, "train")
    dirs = scene_dirs(nmr, "train")
    n = len(dirs)
    items = [(3, 1), (n + 1, 2), (7 * n + 5, 3)]
    batch = model_batch([ds[i] for i in items],
                        BatchSpec.for_dataset(ds, num_points=300, downsample=downsample))
    h = w = S if downsample is None else S // 2
    assert batch["input_images"].shape == (3, 1, 3, h, w)
    assert batch["input_rays"].shape == (3, 1, h, w, 3)
    assert batch["input_camera_pos"].shape == (3, 1, 3)
    for k in ("target_pixels", "target_rays", "target_camera_pos"):
        assert batch[k].shape == (3, 300, 3)
    assert "input_masks" not in batch and "target_masks" not in batch
    for k in ("input_images", "target_pixels"):
        assert 0 <= batch[k].min() and batch[k].max() <= 1
    for k in ("input_rays", "target_rays"):
        np.testing.assert_allclose(batch[k].norm(dim=-1).numpy(), 1, atol=1e-5)
    assert batch["sceneid"].tolist() == [i for i, _ in items]

    for b, (idx, _) in enumerate(items):
        scene, view = idx % n, idx // n
        imgs = load_images(dirs[scene])
        rays, pos = reference_rays(dirs[scene], S, S)
        sl = slice(None) if downsample is None else slice(1, None, 2)
        np.testing.assert_array_equal(batch["input_images"][b, 0].numpy(),
                                      imgs[view, sl, sl].transpose(2, 0, 1) / np.float32(255))
        np.testing.assert_allclose(batch["input_rays"][b, 0].numpy(), rays[view, sl, sl],
                                   atol=1e-6)
        np.testing.assert_allclose(batch["input_camera_pos"][b, 0].numpy(), pos[view], atol=1e-6)
        # Each target ray is exactly one pixel's reference ray; its colour is that pixel's.
        all_rays = rays.reshape(-1, 3)
        all_pos = np.repeat(pos, S * S, 0)
        t_rays = batch["target_rays"][b].numpy()
        t_pos = batch["target_camera_pos"][b].numpy()
        dist = (np.abs(t_rays[:, None] - all_rays[None]).sum(-1)
                + np.abs(t_pos[:, None] - all_pos[None]).sum(-1))
        pix = dist.argmin(1)
        assert dist.min(1).max() < 1e-5
        assert np.sort(dist, 1)[:, 1].min() > 1e-2       # and no other pixel is close
        np.testing.assert_array_equal(batch["target_pixels"][b].numpy(),
                                      imgs.reshape(-1, 3)[pix] / np.float32(255))
        views = pix // (S * S)
        assert view not in views and len(np.unique(views)) > 10


def test_seeded_sampling_and_full_scale(nmr):
    ds = NMRDataset(nmr, "test")
    spec = BatchSpec.for_dataset(ds, num_points=64)
    a, b, c = (model_batch(ds[(4, s)], spec) for s in (123, 123, 124))
    np.testing.assert_array_equal(a["target_rays"], b["target_rays"])
    np.testing.assert_array_equal(a["target_pixels"], b["target_pixels"])
    assert not np.array_equal(a["target_rays"], c["target_rays"])
    batch = model_batch(ds[(4, 0)], BatchSpec.for_dataset(ds, full_scale=True))
    assert batch["target_pixels"].shape == (1, (V - 1) * S * S, 3)


def test_split_lists_drop_short_lines(tmp_path):
    root = small_copy(tmp_path)
    lst = os.path.join(root, "02691156", "softras_train.lst")
    with open(lst) as f:
        ids = f.read().split()
    with open(lst, "w", newline="") as f:
        f.write(f"\n{ids[0]}\r\n\n{ids[1]}\n\n")
    ds = NMRDataset(root, "train")
    assert ds.scene_paths == [os.path.join("02691156", i) for i in ids]


def test_cli_writes_a_loadable_fixture(tmp_path, capsys):
    out = str(tmp_path / "cli")
    main(["--out", out, "--size", "8", "--categories", "03001627", "--train", "1",
          "--val", "0", "--test", "0"])
    assert "Wrote" in capsys.readouterr().out
    ds = NMRDataset(out, "train")
    assert (len(ds), ds.height, ds.width) == (V, 8, 8)
    cams = np.load(os.path.join(out, "03001627", ds.scene_paths[0].split(os.sep)[1],
                                "cameras.npz"))
    assert len(cams.files) == 4 * V
    np.testing.assert_allclose(cams["world_mat_0"] @ cams["world_mat_inv_0"], np.eye(4),
                               atol=1e-12)
    np.testing.assert_allclose(cams["camera_mat_5"] @ cams["camera_mat_inv_5"], np.eye(4),
                               atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_missing_folder_and_metadata(tmp_path):
    with pytest.raises(DataError, match="does not exist.*NMR_Dataset.zip.*procedural"):
        NMRDataset(str(tmp_path / "nope"), "train")
    with pytest.raises(DataError, match="metadata.yaml' is missing"):
        NMRDataset(str(tmp_path), "train")
    with pytest.raises(DataError, match="unknown split"):
        NMRDataset(str(tmp_path), "training")
    root = small_copy(tmp_path)
    meta = os.path.join(root, "metadata.yaml")
    with open(meta, "w") as f:
        f.write("02691156: {name: airplane}\n")
    with pytest.raises(DataError, match="'id'"):
        NMRDataset(root, "train")
    with open(meta, "w") as f:
        f.write("04256520: {id: 04256520, name: sofa}\n")      # unquoted: YAML reads octal
    with pytest.raises(DataError, match="not a string; quote it"):
        NMRDataset(root, "train")


def test_missing_split_list_and_empty_split(tmp_path):
    root = small_copy(tmp_path, objects_per_split={"train": 2, "val": 1, "test": 0})
    with pytest.raises(DataError, match="test split of .* is empty"):
        NMRDataset(root, "test")
    os.remove(os.path.join(root, "02691156", "softras_val.lst"))
    with pytest.raises(DataError, match=r"02691156[/\\]softras_val\.lst' is missing"):
        NMRDataset(root, "val")


def test_incomplete_scene_folders(tmp_path):
    root = small_copy(tmp_path)
    ds = NMRDataset(root, "train")
    scene = os.path.join(root, ds.scene_paths[1])
    os.remove(os.path.join(scene, "image", "0005.png"))
    os.remove(os.path.join(scene, "image", "0017.png"))
    # An incomplete scene is replaced by the next one, with a warning (test_data_faults.py).
    with pytest.warns(DataWarning, match=r"image[/\\]0005\.png, image[/\\]0017\.png missing"):
        ds[1]
    ds[0]                                       # other scenes still load
    os.remove(os.path.join(root, ds.scene_paths[0], "cameras.npz"))
    with pytest.warns(DataWarning, match="missing"):
        with pytest.raises(DataError, match="could not be read.*missing"):
            ds[0]                               # both scenes of the split are damaged now
    with pytest.raises(DataError, match="cameras.npz missing"):
        NMRDataset(root, "train")               # the first scene is checked up front


def test_missing_camera_matrices(tmp_path):
    root = small_copy(tmp_path)
    ds = NMRDataset(root, "train")
    path = os.path.join(root, ds.scene_paths[0], "cameras.npz")
    cams = dict(np.load(path))
    del cams["camera_mat_inv_3"]
    np.savez(path, **cams)
    with pytest.warns(DataWarning, match="lacks 1 camera matrices.*camera_mat_inv_3"):
        ds[0]


def test_image_size_mismatch_and_encoder_multiple(tmp_path):
    root = small_copy(tmp_path)
    ds = NMRDataset(root, "train")
    bad = os.path.join(root, ds.scene_paths[1], "image", "0002.png")
    Image.fromarray(np.zeros((S, S + 8, 3), np.uint8)).save(bad)
    with pytest.warns(DataWarning, match=r"0002\.png' is 24x16 .* images are 16x16"):
        ds[1]
    halved = model_batch(ds[0], BatchSpec.for_dataset(ds, downsample=1))
    assert halved["input_images"].shape[-2:] == (8, 8)
    with pytest.raises(DataError, match=r"multiples of 8.*16x16 images work with downsample "
                                        r"None, 1\)"):
        BatchSpec.for_dataset(ds, downsample=2)


def test_corrupt_png_is_skipped_with_a_warning(tmp_path):
    root = small_copy(tmp_path)
    ds = NMRDataset(root, "train")
    with open(os.path.join(root, ds.scene_paths[0], "image", "0003.png"), "wb") as f:
        f.write(b"this is not a png" * 10)
    with pytest.warns(DataWarning, match="skipping a corrupt NMR scene"):
        rec = ds[(0, 1)]
    assert ds.skipped.count == 1
    np.testing.assert_array_equal(rec["images"], load_images(os.path.join(root,
                                                                          ds.scene_paths[1])))
    assert rec["sceneid"] == 0 and rec["input_views"].tolist() == [0]
    # Nothing decodable left: a DataError after a bounded number of skips.
    with open(os.path.join(root, ds.scene_paths[1], "cameras.npz"), "wb") as f:
        f.write(b"garbage")
    with pytest.warns(DataWarning):
        with pytest.raises(DataError, match="could not be read"):
            ds[0]
