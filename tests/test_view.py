"""The live viewer (osrt_fast/view.py): what it shows for each mode and slot edit, its scenes
from a split or a slots file, its errors, the live front end's start, stop and frame scheduling,
and an end-to-end run in a real headless browser."""
import os
import socket
import threading
import time
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from osrt_fast.slots import SlotsError, render_view
from osrt_fast.view import LiveView, MODES, ViewSettings, Viewer, compose, main as view_main
from osrt_fast.drawing import segmentation_colors
from browser import ViewerProcess, click_button, find_browser, free_port, open_page


def test_compose_shows_each_mode():
    rgb = torch.rand(5, 6, 3)
    weights = torch.softmax(torch.randn(5, 6, 4) * 3, -1)
    assert np.array_equal(compose(rgb, weights, ViewSettings("render")),
                          (rgb.numpy() * 255).round().astype(np.uint8))
    seg = compose(rgb, weights, ViewSettings("segmentation"))
    assert np.array_equal(seg, segmentation_colors(4)[weights.argmax(-1).numpy()])
    blend = compose(rgb, weights, ViewSettings("blend")).astype(int)
    expected = (rgb.numpy() * 127.5 + seg / 2).round()
    assert np.abs(blend - expected).max() <= 1
    w2 = compose(rgb, weights, ViewSettings("slot weight", weight_slot=2))
    assert np.array_equal(w2[..., 0], (weights[..., 2].numpy() * 255).round().astype(np.uint8))
    with pytest.raises(SlotsError, match="slot 4 does not exist"):
        compose(rgb, weights, ViewSettings("slot weight", weight_slot=4))
    with pytest.raises(ValueError, match="unknown mode"):
        compose(rgb, weights, ViewSettings("depth"))
    assert MODES == ("render", "segmentation", "blend", "slot weight")


def test_viewer_renders_what_render_view_gives_from_a_split_or_a_slots_file(tiny_run, tmp_path):
    """Viewer.render of a scene encoded from the split equals render_view of its slots (with a
    slot hidden too), and equals the same scene taken from an encode file."""
    from osrt_fast.config import load_config
    from osrt_fast.data import batch_spec, get_dataset
    from osrt_fast.encode import main as encode_main
    from osrt_fast.checkpoint import load_trained_model
    from osrt_fast.slots import load_slots
    config, _ = tiny_run
    cfg, model, _, _ = load_trained_model(config, device="cpu")
    dataset = get_dataset("val", load_config(config).data)
    with pytest.raises(ValueError, match="needs the BatchSpec of its run"):
        Viewer(model, dataset, cfg.to_dict())
    viewer = Viewer(model, dataset, cfg.to_dict(), spec=batch_spec(cfg.data, dataset))
    viewer.load_scene(3)
    pos, rot, fov = viewer.home_camera(back=1.3)
    settings = ViewSettings("blend", hidden=frozenset({1}))
    shown = viewer.render(pos, rot, fov, 12, 19, settings)
    rgb, weights = render_view(model, viewer.scene.slots[0], pos, rot, fov, 12, 19, hide=[1])
    assert shown.shape == (12, 19, 3) and np.array_equal(shown, compose(rgb, weights, settings))
    out = str(tmp_path / "s.safetensors")
    assert encode_main([config, "--scenes", "2:5", "--out", out, "--no-cuda"]) == 0
    from_file = Viewer(model, load_slots(out))
    assert from_file.scene_ids() == [2, 3, 4]
    from_file.load_scene(3)
    assert np.abs(from_file.render(pos, rot, fov, 12, 19, settings).astype(int)
                  - shown.astype(int)).max() <= 1
    with pytest.raises(SlotsError, match="scene 7 is not in this slots file"):
        from_file.load_scene(7)
    with pytest.raises(SlotsError, match="not in the split"):
        viewer.load_scene(10_000)


def test_viewer_cli_names_bad_input(tiny_run, tmp_path, capsys):
    config, _ = tiny_run
    assert view_main([config, "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "(--checkpoint) does not exist" in capsys.readouterr().err
    assert view_main([config, "--slots", str(tmp_path / "none.safetensors")]) == 2
    assert "no slots file at" in capsys.readouterr().err



@pytest.fixture(scope="module")
def tiny_viewer(tiny_run):
    """The tiny run's Viewer on the CPU, val scene 0 loaded."""
    from osrt_fast.checkpoint import load_trained_model
    from osrt_fast.data import batch_spec, get_dataset
    config, _ = tiny_run
    cfg, model, _, _ = load_trained_model(config, device="cpu")
    dataset = get_dataset("val", cfg.data)
    viewer = Viewer(model, dataset, cfg.to_dict(), spec=batch_spec(cfg.data, dataset))
    viewer.load_scene(0)
    return viewer


def test_next_job_gives_a_moving_camera_a_quick_frame_and_a_resting_one_its_full_frame():
    from osrt_fast.view import CameraState, Shown, next_job

    def camera(moved_at, aspect=1.5):
        return CameraState(np.zeros(3, np.float32), np.eye(3, dtype=np.float32), 0.8, aspect,
                           moved_at)

    moving = camera(10.0)
    assert next_job({1: moving}, {}, 64, 0.25, now=10.1) == (1, moving, 32)
    assert next_job({1: moving}, {1: Shown(moving, 32)}, 64, 0.25, now=10.1) is None
    assert next_job({1: moving}, {1: Shown(moving, 32)}, 64, 0.25, now=10.3) == (1, moving, 64)
    assert next_job({1: moving}, {1: Shown(moving, 64)}, 64, 0.25, now=11.0) is None
    # A new update is a new camera, even at the same pose and time.
    again = camera(10.0)
    assert next_job({1: again}, {1: Shown(moving, 64)}, 64, 0.25, now=11.0) == (1, again, 64)
    # The quick frame is never below 16 pixels; a client up to date is passed over.
    assert next_job({1: moving, 2: again}, {1: Shown(moving, 32)}, 20, 0.25,
                    now=10.1) == (2, again, 16)
    assert moving.width(32) == 48 and camera(0.0, aspect=0.01).width(16) == 1


def test_live_view_starts_nothing_before_start_and_joins_its_thread_on_stop(tiny_viewer):
    before = set(threading.enumerate())
    port = free_port()
    live = LiveView(tiny_viewer, host="127.0.0.1", port=port, height=16)
    assert set(threading.enumerate()) == before
    with socket.socket() as s:          # the port is still free: no server listens on it
        s.bind(("127.0.0.1", port))
    with pytest.raises(RuntimeError, match="call start"):
        live.url
    live.stop()                         # nothing started, nothing to stop
    with live:
        assert live.thread.is_alive() and live.thread not in before
        assert live.url == f"http://localhost:{port}"
        with urllib.request.urlopen(live.url, timeout=30) as page:
            assert page.status == 200
    assert not live.thread.is_alive()
    live.stop()
    with pytest.raises(RuntimeError, match="starts once"):
        live.start()


def test_live_view_renders_a_frame_with_the_settings_it_began_with_then_again(tiny_viewer,
                                                                             monkeypatch):
    """A settings change while a frame renders: that frame keeps the settings it began with,
    and the view is rendered again with the new ones (not taken for up to date). stop() waits
    for a frame in flight."""
    from osrt_fast.view import CameraState
    rendered, began, release = [], threading.Event(), threading.Event()
    render, slow_s = tiny_viewer.render, [0.0]

    def held_render(position, rot, fov_y, height, width, settings):
        rendered.append((settings.mode, height, width))
        began.set()
        release.wait(30)
        time.sleep(slow_s[0])
        return render(position, rot, fov_y, height, width, settings)

    monkeypatch.setattr(tiny_viewer, "render", held_render)
    sent = []
    client = SimpleNamespace(scene=SimpleNamespace(
        set_background_image=lambda img, format: sent.append(img.shape)))
    with LiveView(tiny_viewer, host="127.0.0.1", port=free_port(), height=16) as live:
        monkeypatch.setattr(live.server, "get_clients", lambda: {7: client})
        pos, rot, fov = tiny_viewer.home_camera(back=1.3)
        resting = CameraState(pos.numpy(), rot.numpy(), fov, 1.5, time.monotonic() - 10)
        with live.wake:
            live.cameras[7] = resting
            live.wake.notify()
        assert began.wait(30)
        live.mode_box.value = "segmentation"
        release.set()
        end = time.monotonic() + 30
        while len(sent) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.3)                 # time for a frame too many, were one rendered
        assert rendered == [("render", 16, 24), ("segmentation", 16, 24)]
        assert sent == [(16, 24, 3)] * 2
        began.clear()
        slow_s[0] = 1.0
        with live.wake:
            live.cameras[7] = CameraState(pos.numpy(), rot.numpy(), fov, 1.5, time.monotonic())
            live.wake.notify()
        assert began.wait(30)
    assert not live.thread.is_alive() and sent[2:] == [(16, 24, 3)]


@pytest.mark.slow
def test_the_viewer_shows_its_render_in_a_real_browser(tiny_run, tmp_path):
    """End to end: the viewer's server, opened in headless chromium (selenium), renders a frame
    for the page's camera and the page shows it: the screenshot's dominant colour is the
    rendered segmentation's. 'save view as PNG', clicked in the page, writes that view. With
    OSRT_VIEWER_SCREENSHOT=PATH the screenshot is kept there."""
    browser, driver_path = find_browser()
    if browser is None:
        pytest.skip(driver_path)
    config, _ = tiny_run
    viewer = ViewerProcess([config, "--no-cuda", "--mode", "segmentation", "--height", "64",
                            "--save-dir", str(tmp_path / "saved")])
    try:
        viewer.wait_for(r"open (http://\S+)", 120)
        driver = open_page(f"http://localhost:{viewer.port}", driver_path)
        try:
            viewer.wait_for(r"first full frame, (\d+)x(\d+)", 120)
            click_button(driver, "save view as PNG")
            saved = viewer.wait_for(r"saved (\S+\.png)", 60).group(1)
            time.sleep(2)
            shot_path = str(tmp_path / "page.png")
            driver.save_screenshot(shot_path)
        finally:
            driver.quit()
        time.sleep(2)           # the browser gone: the viewer goes on without a warning
        assert not [x for x in viewer.output if "Warning" in x], "".join(viewer.output)
    finally:
        viewer.stop()
    frame = np.asarray(Image.open(saved).convert("RGB"))
    shot = np.asarray(Image.open(shot_path).convert("RGB"))
    keep = os.environ.get("OSRT_VIEWER_SCREENSHOT")
    if keep:
        Image.fromarray(shot).save(keep)
    colors, counts = np.unique(frame.reshape(-1, 3), axis=0, return_counts=True)
    main_color = colors[counts.argmax()].astype(int)
    assert counts.max() > 0.3 * frame.shape[0] * frame.shape[1]
    # The page: the render fills the canvas; the panel is on the right, a notice top left.
    h, w = shot.shape[:2]
    canvas = shot[int(0.3 * h):int(0.95 * h), int(0.02 * w):int(0.6 * w)].reshape(-1, 3).astype(int)
    near = np.abs(canvas - main_color).max(-1) <= 12
    assert near.mean() > 0.2, (main_color, near.mean())
    # Not the page's own background: that is not the rendered colour.
    assert np.abs(main_color - 255).max() > 12


def test_without_viser_the_viewer_names_the_extra(tiny_run, monkeypatch, capsys):
    import sys
    config, _ = tiny_run
    monkeypatch.setitem(sys.modules, "viser", None)
    assert view_main([config, "--no-cuda"]) == 2
    assert "pip install -e '.[viewer]'" in capsys.readouterr().err
