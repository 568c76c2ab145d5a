"""Procedural scene generator: determinism, exact geometry (checked against independent signed
distance functions), resolution consistency, and the dataset writer's layout and resume."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from osrt_fast import cameras, scenes


def sdf(points, scene):
    """Exact signed distances [..., n] of points [..., 3] to each object (written
    independently of the tracer: distance functions instead of ray intersections)."""
    out = []
    for shape, c, r, rot in zip(scene.shape, scene.position, scene.size, scene.rotation):
        p = points - c
        if shape == scenes.SPHERE:
            d = np.linalg.norm(p, axis=-1) - r
        elif shape == scenes.CUBE:
            co, si = np.cos(rot), np.sin(rot)
            pl = np.stack((co * p[..., 0] + si * p[..., 1], -si * p[..., 0] + co * p[..., 1],
                           p[..., 2]), -1)
            q = np.abs(pl) - r
            d = np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(-1), 0)
        else:
            q = np.stack((np.linalg.norm(p[..., :2], axis=-1) - r, np.abs(p[..., 2]) - r), -1)
            d = np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(-1), 0)
        out.append(d)
    return np.stack(out, -1)


def render(seed, h=40, w=40, views=3):
    scene = scenes.sample_scene(seed)
    cams = scenes.sample_cameras(seed, views)
    return scene, cams, scenes.render_views(scene, cams, h, w)


def test_determinism():
    a, b = scenes.sample_scene((0, 5)), scenes.sample_scene((0, 5))
    for f in ("shape", "position", "size", "rotation", "color"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    np.testing.assert_array_equal(scenes.sample_cameras(7, 4), scenes.sample_cameras(7, 4))
    c = scenes.sample_scene((0, 6))
    assert not np.array_equal(a.position[:1], c.position[:1])
    assert not np.array_equal(scenes.sample_cameras(7, 4), scenes.sample_cameras(8, 4))
    _, _, r1 = render(3, 16, 16, 2)
    _, _, r2 = render(3, 16, 16, 2)
    for k in r1:
        np.testing.assert_array_equal(r1[k], r2[k])


def test_scene_sampling_constraints():
    seen = set()
    for i in range(40):
        s = scenes.sample_scene(i, min_objects=2, max_objects=6)
        assert 2 <= s.num_objects <= 6
        seen |= set(s.shape.tolist())
        np.testing.assert_allclose(s.position[:, 2], s.size)          # resting on the ground
        assert np.all(np.linalg.norm(s.position[:, :2], axis=1) <= scenes.SCENE_RADIUS + 1e-9)
        assert np.all((s.color >= 0) & (s.color <= 1))
        # No interpenetration: sample points inside each object, none inside another.
        rng = np.random.default_rng(i)
        for k in range(s.num_objects):
            pts = s.position[k] + rng.uniform(-1, 1, (2000, 3)) * s.size[k]
            d = sdf(pts, s)
            inside_k = d[:, k] < 0
            others = np.delete(d, k, axis=1)[inside_k]
            assert np.all(others > 0)
    assert seen == {1, 2, 3}


@pytest.mark.parametrize("seed", [1, 2, 4])
def test_geometry_exact(seed):
    scene, cams, out = render(seed)
    v, h, w = out["instances"].shape
    assert out["rgb"].shape == (v, h, w, 3) and out["rgb"].dtype == np.float32
    assert out["depth"].dtype == np.float32 and out["instances"].dtype == np.int64
    assert out["rgb"].min() >= 0 and out["rgb"].max() <= 1
    rays = cameras.camera_rays(cams, h, w).astype(np.float64)             # [V, H, W, 3]
    depth = out["depth"].astype(np.float64)
    points = cams[:, None, None, :] + depth[..., None] * rays
    ids = out["instances"]
    assert set(np.unique(ids)) - {0} <= set(range(1, scene.num_objects + 1))
    assert (ids > 0).sum() > 50

    d = sdf(points, scene)                                                  # [V, H, W, n]
    obj = ids > 0
    on_surface = np.take_along_axis(d, (ids - 1).clip(0)[..., None], -1)[..., 0]
    assert np.abs(on_surface[obj]).max() < 1e-4
    ground = (~obj) & (out["depth"] < scenes.MAX_DEPTH - 1e-3)
    assert ground.sum() > 0
    assert np.abs(points[ground][:, 2]).max() < 1e-4

    # Brute force along each ray: nothing (no object, not the ground) is hit before `depth`.
    ts = np.linspace(0, 1, 300)[:, None, None, None] * (depth - 1e-3)
    samples = cams[None, :, None, None, :] + ts[..., None] * rays[None]     # [S, V, H, W, 3]
    assert sdf(samples, scene).min() > -1e-7
    assert samples[..., 2].min() > -1e-7
    # Rays with id 0 hit no object at all before the ground (or anywhere, for the sky).
    far = np.linspace(0, 30, 600)[:, None]
    sky = out["depth"] >= scenes.MAX_DEPTH
    if sky.any():
        sky_pts = cams[np.nonzero(sky)[0]][None] + far[..., None] * rays[sky][None]
        assert sdf(sky_pts, scene).min() > 0


def test_render_resolution_consistent():
    scene = scenes.sample_scene(11)
    cams = scenes.sample_cameras(11, 2)
    lo = scenes.render_views(scene, cams, 12, 16)
    hi = scenes.render_views(scene, cams, 36, 48)
    # With a factor of 3, low-res pixel i's centre is high-res pixel 3i+1's centre.
    sub = {k: v[:, 1::3, 1::3] for k, v in hi.items()}
    np.testing.assert_array_equal(lo["instances"], sub["instances"])
    np.testing.assert_allclose(lo["depth"], sub["depth"], atol=1e-4)
    np.testing.assert_allclose(lo["rgb"], sub["rgb"], atol=1e-4)


def test_batch_equals_single():
    ss = [scenes.sample_scene(i, 2, 6) for i in range(3)]
    cams = np.stack([scenes.sample_cameras(i, 2) for i in range(3)])
    batch = scenes.render_batch(ss, cams, 16, 16)
    for i in range(3):
        single = scenes.render_views(ss[i], cams[i], 16, 16)
        for k in single:
            np.testing.assert_allclose(batch[k][i], single[k], atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    ss = [scenes.sample_scene(i) for i in range(4)]
    cams = np.stack([scenes.sample_cameras(i, 3) for i in range(4)])
    cpu = scenes.render_batch(ss, cams, 32, 32, device="cpu")
    gpu = scenes.render_batch(ss, cams, 32, 32, device="cuda")
    assert (cpu["instances"] != gpu["instances"]).mean() < 1e-3   # only exact ties may differ
    same = cpu["instances"] == gpu["instances"]
    np.testing.assert_allclose(cpu["depth"][same], gpu["depth"][same], atol=1e-4)
    np.testing.assert_allclose(cpu["rgb"][same], gpu["rgb"][same], atol=1e-3)


def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im)


def test_generate_dataset_layout_and_resume(tmp_path):
    root = str(tmp_path / "proc")
    n, v, h, w = 4, 2, 16, 24
    scenes.generate_dataset(root, n, height=h, width=w, num_views=v, min_objects=2,
                            max_objects=3, seed=5, progress=False)
    meta = dict(np.load(os.path.join(root, "metadata.npz")))
    assert meta["camera_pos"].shape == (n, v, 3) and meta["camera_pos"].dtype == np.float32
    assert meta["shape"].shape == (n, 4) and np.all(meta["shape"][:, 0] == 0)
    assert meta["3d_coords"].shape == (n, 4, 3) and meta["color"].shape == (n, 4, 3)
    assert meta["size"].shape == (n, 4) and meta["rotation"].shape == (n, 4)
    for i in range(n):
        s = scenes.sample_scene(scenes.scene_seed(5, i), 2, 3)
        np.testing.assert_array_equal(meta["shape"][i, 1:s.num_objects + 1], s.shape)
        assert np.all(meta["shape"][i, s.num_objects + 1:] == 0)
        for j in range(v):
            img = read_png(os.path.join(root, "images", f"img_{i}_{j}.png"))
            mask = read_png(os.path.join(root, "masks", f"masks_{i}_{j}.png"))
            dep = read_png(os.path.join(root, "depths", f"depths_{i}_{j}.png"))
            assert img.shape == (h, w, 3) and img.dtype == np.uint8
            assert mask.shape == (h, w) and mask.dtype == np.uint8
            assert dep.shape == (h, w) and dep.dtype == np.uint16    # 16-bit round trip
            assert mask.max() <= s.num_objects
        out = scenes.render_views(s, meta["camera_pos"][i].astype(np.float64), h, w)
        np.testing.assert_array_equal(read_png(os.path.join(root, "masks", f"masks_{i}_0.png")),
                                      out["instances"][0])
        dep = read_png(os.path.join(root, "depths", f"depths_{i}_0.png"))
        np.testing.assert_allclose(scenes.decode_depth(dep), out["depth"][0],
                                   atol=scenes.MAX_DEPTH / 65536)
    assert not [f for f in os.listdir(root) if "tmp" in f]

    # Resume: only missing files are rewritten; the result is identical.
    kept = os.path.join(root, "images", "img_0_0.png")
    before = os.stat(kept).st_mtime_ns
    removed = os.path.join(root, "masks", "masks_2_1.png")
    want = read_png(removed)
    os.remove(removed)
    os.remove(os.path.join(root, "metadata.npz"))
    scenes.generate_dataset(root, n, height=h, width=w, num_views=v, min_objects=2,
                            max_objects=3, seed=5, progress=False)
    np.testing.assert_array_equal(read_png(removed), want)
    assert os.stat(kept).st_mtime_ns == before
    meta2 = dict(np.load(os.path.join(root, "metadata.npz")))
    for k in meta:
        np.testing.assert_array_equal(meta[k], meta2[k])
    # Other settings into the same folder are refused rather than mixed.
    with pytest.raises(ValueError, match="other settings"):
        scenes.generate_dataset(root, n, height=h, width=w, num_views=v, seed=6, progress=False)


def test_cli(tmp_path):
    out = str(tmp_path / "cli")
    scenes.main(["--out", out, "--num-scenes", "2", "--height", "8", "--width", "8",
                 "--num-views", "2", "--max-objects", "3"])
    assert os.path.isfile(os.path.join(out, "metadata.npz"))
    assert os.path.isfile(os.path.join(out, "depths", "depths_1_1.png"))


def test_zoom_brings_the_cameras_closer_and_is_part_of_the_settings(tmp_path):
    """zoom 2: cameras at half the distance, objects cover more pixels; a folder written at one
    zoom is refused for a config that names another (data.kwargs.zoom), and zoom 1 leaves
    generator.json as it was before the option existed."""
    from osrt_fast.config import config_from_dict
    from osrt_fast.data import DataError, get_dataset
    near = np.linalg.norm(scenes.sample_cameras(5, 4, zoom=2.0), axis=-1)
    far = np.linalg.norm(scenes.sample_cameras(5, 4), axis=-1)
    np.testing.assert_allclose(near * 2, far, rtol=1e-12)
    covered = {}
    for zoom in (1.0, 2.0):
        root = str(tmp_path / f"zoom{zoom}")
        scenes.generate_dataset(root, 3, 24, 24, num_views=2, seed=4, progress=False, zoom=zoom)
        masks = [np.asarray(Image.open(os.path.join(root, "masks", f"masks_{s}_{v}.png")))
                 for s in range(3) for v in range(2)]
        covered[zoom] = np.mean([(m > 0).mean() for m in masks])
        settings = scenes.read_settings(root)
        assert ("zoom" in settings) == (zoom != 1.0)
    assert covered[2.0] > 2 * covered[1.0], covered
    data = {"dataset": "procedural", "path": str(tmp_path / "zoom2.0"), "num_points": 16,
            "kwargs": {"num_scenes": 3, "height": 24, "width": 24, "num_views": 2, "seed": 4,
                       "zoom": 1.0}}
    with pytest.raises(DataError, match="zoom"):
        get_dataset("train", config_from_dict({"data": data}).data)
    data["kwargs"]["zoom"] = 2.0
    assert len(get_dataset("train", config_from_dict({"data": data}).data)) > 0
    with pytest.raises(DataError, match="zoom must be between"):
        scenes.generate_dataset(str(tmp_path / "bad"), 3, 24, 24, zoom=9.0)


def test_plain_background_paints_every_non_object_pixel_one_colour(tmp_path):
    """background 'plain': object pixels are exactly those of the default rendering, every other
    pixel is PLAIN_COLOR; masks and depths are unchanged (the ground is still traced). The
    setting is recorded only when not the default, checked against the config, and validated."""
    from osrt_fast.config import config_from_dict
    from osrt_fast.data import DataError, get_dataset
    scene = scenes.sample_scene(3, 3, 3)
    cams = scenes.sample_cameras(3, 3, zoom=1.5)
    ground = scenes.render_views(scene, cams, 20, 24)
    plain = scenes.render_views(scene, cams, 20, 24, background="plain")
    obj = ground["instances"] > 0
    assert 0.02 < obj.mean() < 0.9
    np.testing.assert_array_equal(plain["instances"], ground["instances"])
    np.testing.assert_array_equal(plain["depth"], ground["depth"])
    np.testing.assert_array_equal(plain["rgb"][obj], ground["rgb"][obj])
    np.testing.assert_allclose(plain["rgb"][~obj], np.broadcast_to(scenes.PLAIN_COLOR,
                                                                   plain["rgb"][~obj].shape),
                               atol=1e-7)
    assert np.ptp(ground["rgb"][~obj], axis=0).max() > 0.2     # ground, shadows and sky differ

    root = str(tmp_path / "plain")
    assert scenes.main(["--out", root, "--num-scenes", "2", "--height", "8", "--width", "8",
                        "--num-views", "2", "--background", "plain"]) == 0
    assert scenes.read_settings(root)["background"] == "plain"
    data = {"dataset": "procedural", "path": root, "num_points": 16,
            "kwargs": {"num_scenes": 2, "height": 8, "width": 8, "num_views": 2}}
    data["kwargs"]["background"] = "ground"
    with pytest.raises(DataError, match="background"):
        get_dataset("train", config_from_dict({"data": data}).data)
    data["kwargs"]["background"] = "plain"
    assert len(get_dataset("train", config_from_dict({"data": data}).data)) > 0
    with pytest.raises(DataError, match="background must be one of ground, plain"):
        scenes.generate_dataset(str(tmp_path / "bad"), 3, 8, 8, background="sky")
