"""Your own posed scenes (data/posed.py): folders with the transforms.json of instant-ngp and
nerfstudio. The built-in scenes written in that layout give the same records and batches as the
built-in reader; NeRF-style files (camera_angle_x, paths without extension, no masks) read; bad
files are named; every command trains, evaluates and renders with it, and render --scene DIR
encodes one folder and renders new views of it."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from osrt_fast import scenes
from osrt_fast.config import DataConfig
from osrt_fast.data import (BatchSpec, DataError, ObSuRFDataset, batch_spec, collate, get_dataset,
                            make_batch)
from osrt_fast.data.posed import PosedDataset, export_folder, main as posed_main
from conftest import tiny_data_section, tiny_model_config, train_tiny

N, V, H, W = 24, 3, 16, 24


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(the built-in scenes in the ObSuRF layout, the same written in the posed layout)."""
    root = tmp_path_factory.mktemp("posed")
    proc = str(root / "procedural")
    scenes.generate_dataset(proc, N, height=H, width=W, num_views=V, min_objects=1,
                            max_objects=3, seed=5, progress=False)
    posed = str(root / "posed")
    assert posed_main(["--from", proc, "--out", posed]) == 0
    return proc, posed


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_the_built_in_scenes_give_the_same_records_and_batches(folders, split):
    proc, posed = folders
    a = ObSuRFDataset(proc, split, kind="procedural", num_input_views=2)
    b = PosedDataset(posed, split, num_input_views=2)
    assert (len(a), a.num_scenes, a.num_views, a.height, a.width, a.num_entities) == \
        (len(b), b.num_scenes, b.num_views, b.height, b.width, b.num_entities)
    items = [(i, 1000 + i) for i in range(len(a))]
    for i in items:
        ra, rb = a[i], b[i]
        assert ra.keys() == rb.keys()
        for k in ("images", "ids", "input_views", "target_views", "seed", "sceneid"):
            assert np.array_equal(ra[k], rb[k]), k
        assert np.array_equal(ra["origins"], rb["origins"])
    for full_scale in (False, True):
        spec = BatchSpec.for_dataset(a, 40, full_scale)
        assert spec == BatchSpec.for_dataset(b, 40, full_scale)
        ba = make_batch(collate([a[i] for i in items[:5]]), spec)
        bb = make_batch(collate([b[i] for i in items[:5]]), spec)
        assert ba.keys() == bb.keys()
        for k in ba:
            torch.testing.assert_close(bb[k], ba[k], rtol=0, atol=2e-6, msg=k)


def write_nerf_scene(folder, frames=3, size=(16, 8), angle=0.9):
    """A NeRF-synthetic-style scene: camera_angle_x, file paths without extension, no masks."""
    os.makedirs(os.path.join(folder, "rgb"))
    out = {"camera_angle_x": angle, "frames": []}
    rng = np.random.default_rng(0)
    for f in range(frames):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)).save(
            os.path.join(folder, "rgb", f"r_{f}.png"))
        c2w = np.eye(4)
        c2w[:3, 3] = (f, 0.5, 4.0)
        out["frames"].append({"file_path": f"./rgb/r_{f}", "transform_matrix": c2w.tolist()})
    with open(os.path.join(folder, "transforms.json"), "w") as fh:
        json.dump(out, fh)


def test_a_nerf_style_scene_reads_with_its_cameras(tmp_path):
    folder = str(tmp_path / "lego")
    write_nerf_scene(folder)
    ds = PosedDataset(folder, None, num_input_views=1)
    assert (len(ds), ds.num_views, ds.height, ds.width, ds.num_entities) == (3, 3, 8, 16, 0)
    rec = ds[(1, 7)]
    assert "ids" not in rec and rec["images"].shape == (3, 8, 16, 3)
    assert np.allclose(rec["origins"][2], (2, 0.5, 4))
    # The pixel at the principal point looks along -z; a pixel right of it, towards +x, at the
    # angle the field of view gives.
    fx = 16 / 2 / math.tan(0.9 / 2)
    m = rec["ray_mats"][0].astype(np.float64)
    centre = m @ (8.0, 4.0, 1.0)
    assert np.allclose(centre / np.linalg.norm(centre), (0, 0, -1), atol=1e-6)
    edge = m @ (16.0, 4.0, 1.0)                 # the image's right edge: half the field of view
    assert math.isclose(math.atan2(edge[0], -edge[2]), 0.45, rel_tol=1e-6)
    below = m @ (8.0, 8.0, 1.0)                 # the bottom edge: down is -y (OpenGL's y is up)
    assert below[1] < 0 and math.isclose(-below[1] / -below[2], 4 / fx, rel_tol=1e-6)
    batch = make_batch(collate([rec]), BatchSpec.for_dataset(ds, 10))
    assert "target_masks" not in batch and batch["target_rays"].shape == (1, 10, 3)


def test_bad_scene_files_are_named(tmp_path):
    folder = str(tmp_path / "root" / "train" / "a")
    write_nerf_scene(folder)
    with pytest.raises(DataError, match=r"'.*val' does not exist: a posed dataset has a folder per split"):
        PosedDataset(str(tmp_path / "root"), "val")
    meta = json.load(open(os.path.join(folder, "transforms.json")))

    def rewrite(**changes):
        with open(os.path.join(folder, "transforms.json"), "w") as fh:
            json.dump({**meta, **changes}, fh)
    rewrite(k1=0.1)
    with pytest.raises(DataError, match="lens distortion \\(k1\\).*undistort the images first"):
        PosedDataset(folder, None)
    rewrite(camera_angle_x=None)
    with pytest.raises(DataError, match="camera_angle_x must be a finite number, got None"):
        PosedDataset(folder, None)
    rewrite(frames=[{"file_path": "rgb/r_0"}])
    with pytest.raises(DataError, match="needs file_path and transform_matrix"):
        PosedDataset(folder, None)
    rewrite()
    other = str(tmp_path / "root" / "train" / "b")
    write_nerf_scene(other, frames=2)
    with pytest.raises(DataError, match="has 2 frames, but .* has 3: every scene of a split"):
        PosedDataset(str(tmp_path / "root"), "train")
    with open(os.path.join(other, "transforms.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(DataError, match="cannot be read as JSON"):
        PosedDataset(str(tmp_path / "root"), "train")


def test_every_command_runs_on_posed_scenes(folders, tmp_path, monkeypatch):
    """train.py (with data.cache), evaluation with FG-ARI from the masks, and render.py --scene
    on one scene folder with the model trained on the built-in layout."""
    from osrt_fast.evaluate import main as evaluate_main
    from osrt_fast.render import main as render_main
    _, posed = folders
    data = {"dataset": "posed", "path": posed, "num_points": 64, "cache": True,
            "kwargs": {"num_input_views": 2}}
    log = train_tiny(tmp_path, data, steps=2, validate_every=2)
    val = [r for r in log if r.get("split") == "val"]
    assert val and "ari" in val[-1]
    config = str(tmp_path / "run" / "config.yaml")
    assert evaluate_main([config, "--no-cuda", "--full-scale"]) == 0     # every pixel: FG-ARI
    scene = os.path.join(posed, "test", "000000")
    assert render_main([config, "--no-cuda", "--novideo", "--scene", scene, "--num-frames", "2",
                        "--motion", "rotate"]) == 0
    out = tmp_path / "run" / "render" / "rotate" / "000000"
    assert sorted(os.listdir(out / "renders")) == ["0.png", "1.png"]


def test_render_scene_needs_a_transforms_json(tiny_run, tmp_path, capsys):
    from osrt_fast.render import main as render_main
    config, _ = tiny_run
    assert render_main([config, "--no-cuda", "--novideo", "--scene", str(tmp_path)]) == 2
    assert "no transforms.json there" in capsys.readouterr().err
