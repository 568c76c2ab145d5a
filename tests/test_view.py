"""The live viewer (osrt_fast/view.py): what it shows for each mode and slot edit, its scenes
from a split or a slots file, its errors, and an end-to-end run in a real headless browser."""
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from osrt_fast.slots import SlotsError, render_view
from osrt_fast.view import MODES, ViewSettings, Viewer, compose, main as view_main
from osrt_fast.visualize import segmentation_colors
from browser import ViewerProcess, click_button, find_browser, open_page


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
    assert "no checkpoint at" in capsys.readouterr().err
    assert view_main([config, "--slots", str(tmp_path / "none.safetensors")]) == 2
    assert "no slots file at" in capsys.readouterr().err


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
    assert view_main([config, "--no-cuda"]) == 3
    assert "pip install -e '.[viewer]'" in capsys.readouterr().err
