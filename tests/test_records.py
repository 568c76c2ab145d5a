"""Scene records -> model inputs on the device: make_batch against a per-item numpy twin on
random records of odd shapes, the counter-based ray sampler, and the view policies."""
import numpy as np
import pytest
import torch

from osrt_fast.cameras import camera_ray_matrix, hemisphere_cameras, ray_directions
from osrt_fast.data import BatchSpec, DataError, ViewPolicy, collate, make_batch
from osrt_fast.data.records import hash64, sample_pixels


def random_records(rng, b=3, v=4, h=12, w=20, o=5, vin=2, masks=True):
    recs = []
    for i in range(b):
        cams = hemisphere_cameras(rng, v).astype(np.float32)
        inputs = rng.choice(v, vin, replace=False)
        rec = {"images": rng.integers(0, 256, (v, h, w, 3), dtype=np.uint8),
               "origins": cams, "ray_mats": camera_ray_matrix(cams, h, w),
               "input_views": inputs.astype(np.int64),
               "target_views": np.setdiff1d(np.arange(v), inputs).astype(np.int64),
               "seed": int(rng.integers(2 ** 62)), "sceneid": i}
        if masks:
            rec["ids"] = rng.integers(0, o, (v, h, w), dtype=np.uint8)
        recs.append(rec)
    return recs


def numpy_twin(rec, spec, idx):
    """What one item's model inputs must be, computed per item in numpy from the record and the
    sampled pixel indices `idx` (into the target views' pixels, view-major)."""
    v, h, w, _ = rec["images"].shape
    s = 2 ** spec.downsample if spec.downsample else 1
    rows, cols = np.arange(h)[s // 2::s], np.arange(w)[s // 2::s]
    iv, tv = rec["input_views"], rec["target_views"]
    out = {"input_images": rec["images"][iv][:, rows][:, :, cols].transpose(0, 3, 1, 2) / 255,
           "input_camera_pos": rec["origins"][iv],
           "input_rays": ray_directions(rec["ray_mats"][iv], h, w, rows, cols)}
    view, pix = tv[idx // (h * w)], idx % (h * w)
    y, x = pix // w, pix % w
    out["target_pixels"] = rec["images"][view, y, x] / 255
    out["target_camera_pos"] = rec["origins"][view]
    d = np.einsum("pij,pj->pi", rec["ray_mats"][view].astype(np.float64),
                  np.stack([x + .5, y + .5, np.ones_like(x, dtype=float)], -1))
    out["target_rays"] = d / np.linalg.norm(d, axis=-1, keepdims=True)
    if "ids" in rec:
        eye = np.eye(spec.num_entities)
        out["input_masks"] = eye[rec["ids"][iv][:, rows][:, :, cols]]
        out["target_masks"] = eye[rec["ids"][view, y, x]]
    return out


@pytest.mark.parametrize("downsample", [None, 1, 2])
@pytest.mark.parametrize("masks", [True, False])
def test_make_batch_matches_the_numpy_twin(downsample, masks):
    rng = np.random.default_rng(7)
    recs = random_records(rng, masks=masks)
    spec = BatchSpec(num_points=37, downsample=downsample, num_entities=5 if masks else 0)
    batch = make_batch(collate(recs), spec)
    p = 37
    cand = 2 * 12 * 20
    idx = sample_pixels(torch.tensor([r["seed"] for r in recs]), cand, p).numpy()
    for b, rec in enumerate(recs):
        want = numpy_twin(rec, spec, idx[b])
        for k, v in want.items():
            got = batch[k][b].numpy()
            assert got.dtype == np.float32, k
            np.testing.assert_allclose(got, v, atol=2e-6, err_msg=k)
    assert ("target_masks" in batch) == masks
    assert batch["sceneid"].tolist() == [0, 1, 2]


def test_full_scale_and_oversampling():
    rng = np.random.default_rng(1)
    recs = random_records(rng, b=2, v=3, h=8, w=8, vin=1)
    full = make_batch(collate(recs), BatchSpec(full_scale=True, num_entities=5))
    assert full["target_pixels"].shape == (2, 2 * 64, 3)
    np.testing.assert_array_equal(full["target_pixels"][0].numpy() * 255,
                                  recs[0]["images"][recs[0]["target_views"]].reshape(-1, 3))
    many = make_batch(collate(recs), BatchSpec(num_points=200, num_entities=5))
    assert many["target_pixels"].shape == (2, 200, 3)      # more rays than pixels: repeats


def test_sampler_is_per_item_uniform_and_device_independent():
    seeds = torch.tensor([3, 5, 3, -7])
    idx = sample_pixels(seeds, 1000, 100)
    assert idx.shape == (4, 100) and idx.dtype == torch.int64
    for row in idx:
        assert len(set(row.tolist())) == 100 and 0 <= row.min() and row.max() < 1000
    assert set(idx[0].tolist()) == set(idx[2].tolist())          # same seed, same draw
    assert set(idx[0].tolist()) != set(idx[1].tolist())
    # One item's draw does not depend on its batch.
    alone = sample_pixels(seeds[1:2], 1000, 100)
    assert set(alone[0].tolist()) == set(idx[1].tolist())
    # Roughly uniform: each pixel's frequency over many seeds.
    counts = torch.bincount(sample_pixels(torch.arange(2000), 50, 10).flatten(), minlength=50)
    assert counts.min() > 250 and counts.max() < 550             # mean 400
    # with replacement when asked for more than there are
    rep = sample_pixels(seeds, 10, 30)
    assert rep.shape == (4, 30) and rep.max() < 10 and rep.min() >= 0
    # The hash is splitmix64's finaliser (a published constant check).
    assert hash64(torch.tensor([0])).item() == -2152535657050944081   # 0xE220A8397B1DCDAF


def test_view_policies():
    cyc = ViewPolicy("cyclic", 2, "all")
    assert cyc.items_per_scene(3) == 3
    scene, iv, tv = cyc.choose(7, 5, 3)
    assert scene == 2 and iv.tolist() == [1, 2] and tv.tolist() == [0, 1, 2]
    scene, iv, tv = ViewPolicy("cyclic", 1, "others").choose(4, 2, 4)
    assert scene == 0 and iv.tolist() == [2] and tv.tolist() == [0, 1, 3]
    rnd = ViewPolicy("random", 5, "others")
    a = rnd.choose(3, 10, 10, np.random.default_rng(1))
    b = rnd.choose(3, 10, 10, np.random.default_rng(1))
    assert a[0] == 3 and a[1].tolist() == b[1].tolist() and len(set(a[1])) == 5
    assert sorted(a[1].tolist() + a[2].tolist()) == list(range(10))
    with pytest.raises(DataError, match="num_input_views=10 does not fit 10 views"):
        rnd.__class__("random", 10, "others").choose(0, 1, 10)
    with pytest.raises(DataError, match="unknown view policy"):
        ViewPolicy("shuffled")
