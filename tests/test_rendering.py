"""Rendering: chunked decoding, video and grid writing, render.py end to end and its errors."""
import errno
import importlib
import importlib.util
import math
import os
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from osrt_fast import cameras, drawing, rendering
from osrt_fast.model import RayDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyDecoder(RayDecoder):
    """Per-ray MLP with a per-scene latent, and a softmax 'segmentation' over 3 slots; a
    RayDecoder, so `max_rays` chunks its calls of `region`."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6 + 4, 16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 6))
        self.calls = 0

    def region(self, latents, camera_pos, rays):
        self.calls += 1
        x = torch.cat([camera_pos, rays, latents[:, None].expand(-1, rays.shape[1], -1)], -1)
        out = self.net(x)
        return torch.sigmoid(out[..., :3]), {"segmentation": out[..., 3:].softmax(-1)}


def test_render_image_chunked_equals_unchunked():
    dec = TinyDecoder()
    latents = torch.randn(2, 4)
    pos = torch.randn(2, 3)
    rays = torch.nn.functional.normalize(torch.randn(2, 5, 7, 3), dim=-1)
    with torch.no_grad():
        full, ex_full = rendering.render_image(dec, latents, pos, rays, max_rays=10_000)
        assert dec.calls == 1
        part, ex_part = rendering.render_image(dec, latents, pos, rays, max_rays=6)  # 3 per scene
    assert dec.calls == 1 + math.ceil(35 / 3)
    assert full.shape == (2, 5, 7, 3) and ex_full["segmentation"].shape == (2, 5, 7, 3)
    torch.testing.assert_close(part, full)
    torch.testing.assert_close(ex_part["segmentation"], ex_full["segmentation"])
    # Pixel (i, j) of scene b is the decoder's answer for exactly that ray.
    px, _ = dec(latents[1:], pos[1:, None], rays[1:, 2, 4][:, None])
    torch.testing.assert_close(full[1, 2, 4], px[0, 0])


def test_render_image_keeps_gradients():
    dec = TinyDecoder()
    img, _ = rendering.render_image(dec, torch.randn(1, 4), torch.randn(1, 3),
                                    torch.randn(1, 3, 3, 3), max_rays=4)
    img.sum().backward()
    assert dec.net[0].weight.grad is not None


def test_write_video_frames_and_size(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (31, 45, 3), dtype=np.uint8) for _ in range(7)]
    path = str(tmp_path / "v.mp4")
    assert rendering.write_video(iter(frames), path, fps=30) == 7
    assert not any(p.name.endswith(".partial.mp4") for p in tmp_path.iterdir())
    n, _ = imageio_ffmpeg.count_frames_and_secs(path)
    assert n == 7
    reader = imageio_ffmpeg.read_frames(path)
    meta = reader.__next__()
    assert tuple(meta["size"]) == (46, 32)          # odd sizes padded to even
    assert meta["fps"] == pytest.approx(30)
    decoded = [np.frombuffer(f, np.uint8).reshape(32, 46, 3) for f in reader]
    assert len(decoded) == 7


def test_write_video_rejects_mismatched_frames(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    frames = [np.zeros((8, 8, 3), np.uint8), np.zeros((10, 8, 3), np.uint8)]
    with pytest.raises(ValueError, match="size"):
        rendering.write_video(frames, str(tmp_path / "bad.mp4"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no frames"):
        rendering.write_video([], str(tmp_path / "none.mp4"))


def test_segmentation_palette():
    c = drawing.segmentation_colors(40)
    assert c.shape == (40, 3) and c.dtype == np.uint8
    assert len({tuple(x) for x in c}) == 40
    np.testing.assert_array_equal(drawing.segmentation_colors(5), c[:5])
    img = drawing.colorize_segmentation(np.array([[[0, 1], [2, 0]]]))
    assert img.shape == (1, 2, 2, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[0, 0, 0], c[0])
    assert not np.array_equal(c[0], c[1])


def test_to_uint8():
    out = drawing.to_uint8(np.array([-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]))
    np.testing.assert_array_equal(out, [0, 0, 128, 255, 255, 0])
    assert drawing.to_uint8(torch.ones(2, 2)).dtype == np.uint8


def test_grid_png(tmp_path):
    b, h, w = 3, 12, 20
    images = np.random.default_rng(0).random((b, h, w, 3)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 5, (b, h, w))
    columns = [("input", images, "image"), ("render 60°", images, "image"),
               ("pred seg", labels, "clustering"), ("depth", images[..., :1], "image")]
    path = drawing.draw_visualization_grid(columns, str(tmp_path / "renders-val"),
                                           row_labels=None, scale=2)
    assert path.endswith("renders-val.png")
    pad, head = drawing.GRID_PAD, drawing.GRID_HEADER_H
    with Image.open(path) as im:
        assert im.size == (pad + 4 * (2 * w + pad), pad + head + b * (2 * h + pad))
        arr = np.asarray(im.convert("RGB"))
    # The first cell holds the first image, upscaled.
    cell = arr[pad + head:pad + head + 2 * h, pad:pad + 2 * w]
    np.testing.assert_array_equal(cell[::2, ::2], drawing.to_uint8(images[0]))

    labelled = drawing.draw_visualization_grid(
        columns, str(tmp_path / "with_labels.png"), row_labels=["a=1", "b=22", "c=333"])
    with Image.open(labelled) as im:
        scale = math.ceil(drawing.GRID_MIN_CELL / h)
        assert im.size[1] == pad + head + b * (h * scale + pad)
        assert im.size[0] > pad + 4 * (w * scale + pad)      # room for the labels


# ----------------------------------------------------------------------------- with the model

def _tiny_model_cfg():
    from conftest import tiny_model_config
    return tiny_model_config()


def _synthetic_item(v=2, h=16, w=16, seed=0):
    rng = np.random.default_rng(seed)
    pos = cameras.hemisphere_cameras(rng, v).astype(np.float32)
    return {"input_images": rng.random((v, 3, h, w)).astype(np.float32),
            "input_camera_pos": pos,
            "input_rays": cameras.camera_rays(pos, h, w)}


def test_render_scene_frames_layout(tmp_path):
    from osrt_fast.model import OSRT
    # Frames are checked everywhere; the videos where imageio-ffmpeg is installed.
    have_ffmpeg = importlib.util.find_spec("imageio_ffmpeg") is not None
    model = OSRT(_tiny_model_cfg())
    out = str(tmp_path / "scene")
    res = rendering.render_scene_frames(model, _synthetic_item(), out, "rotate_and_closeup",
                                        num_frames=4, height=9, width=14, fade=True,
                                        progress=False, max_rays=50, video=have_ffmpeg)
    assert res["segmentation"]
    for i in range(2):
        assert os.path.isfile(os.path.join(out, f"input_{i}.png"))
    for f in range(4):
        with Image.open(os.path.join(out, "renders", f"{f}.png")) as im:
            assert im.size == (14, 9)
        with Image.open(os.path.join(out, "segmentations", f"{f}.png")) as im:
            assert im.size == (14, 9)
    # strip.png: input 0 (16x16 scaled to 9 rows: 9 wide), then the 4 frames with 2-pixel gaps;
    # renders above their segmentations, the second row led by black.
    strip = np.asarray(Image.open(res["strip"]))
    assert strip.shape == (18, 9 + 4 * (2 + 14), 3)
    frame_2 = np.asarray(Image.open(os.path.join(out, "renders", "2.png")))
    np.testing.assert_array_equal(strip[:9, 9 + 2 * 16 + 2:9 + 3 * 16], frame_2)
    seg_3 = np.asarray(Image.open(os.path.join(out, "segmentations", "3.png")))
    np.testing.assert_array_equal(strip[9:, 9 + 3 * 16 + 2:], seg_3)
    assert strip[9:, :9].max() == 0
    if not have_ffmpeg:
        assert res["video"] is None
        return
    import imageio_ffmpeg
    assert imageio_ffmpeg.count_frames_and_secs(res["renders_video"])[0] == 4
    reader = imageio_ffmpeg.read_frames(res["video"])
    meta = next(reader)
    # input (16x16 scaled to 9 rows -> 9 wide) | render 14 | seg 14 = 37 -> padded to 38 x 10
    assert tuple(meta["size"]) == (38, 10)
    reader.close()


def test_render_scene_frames_rejects_unknown_motion(tmp_path):
    with pytest.raises(ValueError, match="valid motions"):
        rendering.render_scene_frames(torch.nn.Linear(1, 1), _synthetic_item(), str(tmp_path),
                                      "wobble", 2)


def _import_render_main():
    sys.path.insert(0, ROOT)
    try:
        return importlib.import_module("render").main
    finally:
        sys.path.remove(ROOT)


def test_render_py_missing_checkpoint_message(tmp_path, capsys):
    main = _import_render_main()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"model": _tiny_model_cfg()}))
    assert main([str(cfg), "--no-cuda", "--novideo"]) != 0
    err = capsys.readouterr().err
    assert "model.pt" in err and "python train.py" in err
    assert main([str(cfg), "--motion", "spin"]) != 0
    assert "valid motions" in capsys.readouterr().err
    assert main([str(cfg), "--sceneid", "-1", "--novideo"]) == 2
    assert "--sceneid must be a scene id >= 0, got -1" in capsys.readouterr().err
    assert main([str(cfg), "--it", "5", "--checkpoint", "x.pt", "--novideo"]) == 2
    assert "--it and --checkpoint both name a checkpoint" in capsys.readouterr().err


def test_render_py_end_to_end(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("osrt_fast.data")
    pytest.importorskip("osrt_fast.checkpoint")
    from osrt_fast.model import OSRT

    run = tmp_path / "run"
    run.mkdir()
    data_kwargs = {"num_scenes": 3, "height": 16, "width": 16, "num_views": 3,
                   "num_input_views": 2}
    cfg = {"data": {"dataset": "procedural", "path": str(tmp_path / "data"),
                    "num_points": 64, "kwargs": data_kwargs},
           "model": _tiny_model_cfg()}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    model = OSRT(cfg["model"])
    # The reference's checkpoint format, which load_checkpoint must read.
    torch.save({"encoder": model.encoder.state_dict(), "decoder": model.decoder.state_dict(),
                "it": 7, "epoch_it": 0, "t": 0.0, "loss_val_best": 0.0}, run / "model.pt")

    main = _import_render_main()
    rc = main([str(run / "config.yaml"), "--sceneid", "1", "--motion", "rotate",
               "--num-frames", "3", "--no-cuda"])
    assert rc == 0
    out = run / "render" / "rotate" / "1"
    assert sorted(os.listdir(out / "renders")) == ["0.png", "1.png", "2.png"]
    assert len(os.listdir(out / "segmentations")) == 3
    assert (out / "renders.mp4").is_file() and (out / "video.mp4").is_file()

    # Rendering again into the same folder replaces it whole: 2 frames, no video, nothing left
    # of the 3-frame run.
    rc = main([str(run / "config.yaml"), "--sceneid", "1", "--motion", "rotate", "--num-frames", "2",
               "--no-cuda", "--novideo"])
    assert rc == 0
    assert sorted(os.listdir(out / "renders")) == ["0.png", "1.png"]
    assert len(os.listdir(out / "segmentations")) == 2
    assert not (out / "renders.mp4").exists() and not (out / "video.mp4").exists()

    rc = main([str(run / "config.yaml"), "--sceneid-start", "0", "--sceneid-stop", "2",
               "--motion", "eyeroll", "--name", "eye", "--num-frames", "2", "--novideo",
               "--no-cuda", "--height", "8", "--width", "12"])
    assert rc == 0
    for s in (0, 1):
        d = run / "render" / "eye" / str(s)
        with Image.open(d / "renders" / "1.png") as im:
            assert im.size == (12, 8)
        assert not (d / "video.mp4").exists()


def test_render_py_own_checkpoint_and_mismatch(tmp_path, capsys):
    checkpoint = pytest.importorskip("osrt_fast.checkpoint")
    pytest.importorskip("osrt_fast.data")
    from osrt_fast.model import OSRT

    run = tmp_path / "run"
    run.mkdir()
    cfg = {"data": {"dataset": "procedural", "path": str(tmp_path / "data"), "num_points": 64,
                    "kwargs": {"num_scenes": 3, "height": 16, "width": 16, "num_views": 2,
                               "num_input_views": 1}},
           "model": _tiny_model_cfg()}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    main = _import_render_main()
    # Our own format, chosen with --it.
    checkpoint.save_checkpoint(str(run / "model_5.pt"), OSRT(cfg["model"]), it=5)
    assert main([str(run / "config.yaml"), "--it", "5", "--motion", "zoom", "--num-frames", "2",
                 "--novideo", "--no-cuda"]) == 0
    assert len(os.listdir(run / "render" / "zoom" / "0" / "renders")) == 2
    # A checkpoint of another model: a clean error, no traceback.
    other = _tiny_model_cfg()
    other["decoder_kwargs"] = dict(other["decoder_kwargs"], render_hidden_dim=48)
    wrong = tmp_path / "wrong.pt"
    checkpoint.save_checkpoint(str(wrong), OSRT(other), it=1)
    capsys.readouterr()
    assert main([str(run / "config.yaml"), "--checkpoint", str(wrong), "--novideo",
                 "--no-cuda"]) != 0
    assert "does not fit this model" in capsys.readouterr().err


def test_render_py_finds_train_py_run_dir_for_a_named_config(tmp_path, monkeypatch):
    """configs/<name>.yaml trains in runs/<name>/; render.py must look there too."""
    checkpoint = pytest.importorskip("osrt_fast.checkpoint")
    from osrt_fast.model import OSRT

    monkeypatch.chdir(tmp_path)
    cfg = {"data": {"dataset": "procedural", "path": str(tmp_path / "data"), "num_points": 64,
                    "kwargs": {"num_scenes": 3, "height": 16, "width": 16, "num_views": 2}},
           "model": _tiny_model_cfg()}
    (tmp_path / "mydemo.yaml").write_text(yaml.safe_dump(cfg))
    checkpoint.save_checkpoint(str(tmp_path / "runs" / "mydemo" / "model.pt"), OSRT(cfg["model"]), it=3)
    main = _import_render_main()
    assert main(["mydemo.yaml", "--num-frames", "2", "--novideo", "--no-cuda"]) == 0
    assert len(os.listdir(tmp_path / "runs" / "mydemo" / "render" / "rotate" / "0" / "renders")) == 2


# ----------------------------------------------------------------------------- the command's errors

def _run_folder(tmp_path, **sections) -> str:
    """A run folder with the tiny model's config.yaml (plus `sections`) and a model.pt; returns
    the config's path."""
    from osrt_fast.checkpoint import save_checkpoint
    from osrt_fast.model import OSRT
    run = tmp_path / "run"
    run.mkdir(parents=True)
    cfg = {"model": _tiny_model_cfg(), **sections}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    save_checkpoint(str(run / "model.pt"), OSRT(cfg["model"]), it=1)
    return str(run / "config.yaml")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_render_data_errors_are_one_line(tmp_path, capsys, data_dir):
    """A dataset folder that is not there (and not one the generator makes), and scene ids past
    the split's end: one line on stderr and exit code 2, not a traceback."""
    from conftest import tiny_data_section
    from osrt_fast.render import main
    missing = str(tmp_path / "no_clevr")
    config = _run_folder(tmp_path / "a", data={"dataset": "clevr3d", "path": missing})
    assert main([config, "--no-cuda", "--novideo"]) == 2
    assert missing in _one_error_line(capsys)
    config = _run_folder(tmp_path / "b", data=tiny_data_section(data_dir))
    assert main([config, "--no-cuda", "--novideo", "--sceneid", "1000"]) == 2
    assert "out of range" in _one_error_line(capsys)


def test_render_runs_on_the_configs_device_unless_no_cuda(tmp_path, capsys, data_dir):
    """As evaluate, encode and view: training.device, or the CPU with --no-cuda."""
    from conftest import tiny_data_section
    from osrt_fast.render import main
    flags = ["--num-frames", "1", "--novideo"]
    config = _run_folder(tmp_path / "cpu", data=tiny_data_section(data_dir),
                         training={"device": "cpu"})
    assert main([config] + flags) == 0
    assert " on cpu" in capsys.readouterr().out
    config = _run_folder(tmp_path / "cuda", data=tiny_data_section(data_dir),
                         training={"device": "cuda"})
    if torch.cuda.is_available():
        assert main([config] + flags) == 0
        assert " on cuda" in capsys.readouterr().out
    else:
        # The config's device is taken at its word: no CUDA is an error, not a quiet fallback.
        assert main([config] + flags) == 2
        assert "CUDA is not available" in _one_error_line(capsys)
    assert main([config, "--no-cuda"] + flags) == 0
    assert " on cpu" in capsys.readouterr().out


def test_render_into_a_folder_it_cannot_write_is_one_line(tmp_path, capsys, monkeypatch,
                                                           data_dir):
    """A read-only file system names the cause and what to do; any other failed write names the
    path. (Simulated: tests may run as root, whom a read-only mode does not stop.)"""
    from conftest import tiny_data_section
    from osrt_fast import render
    config = _run_folder(tmp_path, data=tiny_data_section(data_dir))
    flags = ["--no-cuda", "--novideo", "--num-frames", "1"]
    # 'render' a file where the folder should be.
    (tmp_path / "run" / "render").write_text("")
    assert render.main([config] + flags) == 2
    assert "cannot write" in _one_error_line(capsys)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run" / "render"))
    monkeypatch.setattr(render, "render_scene_frames", read_only)
    assert render.main([config] + flags) == 2
    err = _one_error_line(capsys)
    assert "the file system is read-only" in err and "copy the run folder" in err
