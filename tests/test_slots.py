"""Slots as data (osrt_fast/slots.py, osrt_fast/encode.py): slot editing on both backends, the
safetensors export and rendering from it."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from osrt_fast.kernels._triton import poisoned_outputs
from osrt_fast import OSRT
from osrt_fast.cameras import look_at_rotation, pinhole_rays
from osrt_fast.drawing import segmentation_colors
from osrt_fast.slots import (SlotsError, check_model_matches, load_slots, render_view, swap_slots,
                             visible_slots)
from conftest import tiny_model_config
from test_model_parity import rebuild_reference_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_visible_slots_and_swap_check_their_arguments():
    assert visible_slots(4) is None
    assert visible_slots(4, hide=[2, 0]).tolist() == [1, 3]
    assert visible_slots(4, solo=2).tolist() == [2]
    with pytest.raises(SlotsError, match="slot 4 does not exist: the model has 4 slots"):
        visible_slots(4, hide=[4])
    with pytest.raises(SlotsError, match="nothing is left"):
        visible_slots(2, hide=[0, 1])
    with pytest.raises(SlotsError, match="either solo or hide"):
        visible_slots(3, hide=[0], solo=1)
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    a2, b2 = swap_slots(a, b, 0, 2)
    assert torch.equal(a2[0], b[2]) and torch.equal(b2[2], a[0])
    assert torch.equal(a2[1:], a[1:]) and torch.equal(b2[:2], b[:2])
    with pytest.raises(SlotsError, match="widths differ"):
        swap_slots(a, torch.randn(3, 6), 0, 0)


def sharp_model(backend="eager", num_slots=4):
    """The tiny OSRT with unit-scale weights and a sharpened Slot Mixer, so that most rays give
    almost all their weight to one slot (as a trained model does)."""
    cfg = tiny_model_config(backend=backend)
    cfg["encoder_kwargs"]["num_slots"] = num_slots
    torch.manual_seed(1)
    model = OSRT(cfg)
    model.load_state_dict(rebuild_reference_weights(model, 5))
    with torch.no_grad():
        model.decoder.mixing_block.to_q.weight.mul_(20.0)
    return model.eval()


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_hiding_a_slot_changes_only_the_pixels_where_it_had_weight(backend):
    """render_view: all slots visible is the plain decoder's render; hiding slot k leaves the
    pixels where k had (almost) no weight as they were and changes those it explained; its
    weight is 0 everywhere after; solo k gives k all the weight. On the triton backend (the
    interpreted kernels, outputs poisoned with NaN before each run) as on the eager one."""
    model = sharp_model(backend)
    # Slots of unit scale and a wide view (2.4 rad): rays then differ enough to pick different
    # slots in this untrained model.
    slots = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([5.0, -6.0, 4.5])
    rot = look_at_rotation(pos)
    fov = 2.4
    with poisoned_outputs():
        rgb, weights = render_view(model, slots, pos, rot, fov, 13, 17)
    rays = pinhole_rays(rot, fov, 13, 17).reshape(1, -1, 3)
    with torch.no_grad():
        plain, extras = model.decoder(slots[None], pos.expand(1, 13 * 17, 3), rays)
    torch.testing.assert_close(rgb.reshape(-1, 3), plain[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(weights.reshape(-1, 4), extras["segmentation"][0], atol=1e-6, rtol=0)
    # A slot that explains some pixels and has no weight at some others.
    none, some = weights < 1e-4, weights > 0.5
    k = int(torch.minimum(none.sum((0, 1)), some.sum((0, 1))).argmax())
    none, some = none[..., k], some[..., k]
    assert none.sum() >= 10 and some.sum() >= 10, (none.sum(), some.sum())
    with poisoned_outputs():
        hidden, w_hidden = render_view(model, slots, pos, rot, fov, 13, 17, hide=[k])
    change = (hidden - rgb).abs().amax(-1)
    assert change[none].max() < 1e-3
    assert change[some].max() > 1e-2
    assert torch.all(w_hidden[..., k] == 0)
    torch.testing.assert_close(w_hidden.sum(-1), torch.ones(13, 17), atol=1e-5, rtol=0)
    with poisoned_outputs():
        _, w_solo = render_view(model, slots, pos, rot, fov, 13, 17, solo=k)
    torch.testing.assert_close(w_solo[..., k], torch.ones(13, 17), atol=1e-6, rtol=0)


def test_the_fast_path_hides_slots_as_the_eager_one():
    """The folded Slot Mixer (its kernels' eager twins, fp64) with a slot hidden equals the eager
    decoder with it hidden: pixels, weights, and the gradients of every parameter and of the
    slots (odd shapes: 2 scenes, 9 x 11 rays, 4 slots, slot 1 hidden)."""
    from test_backend import TWINS
    eager = sharp_model().double()
    folded = sharp_model().set_backend("triton", ops=TWINS).double()
    slots = torch.randn(2, 4, 32, dtype=torch.float64)
    pos = torch.tensor([4.0, 6.0, 5.0])
    rays = pinhole_rays(look_at_rotation(pos), 2.4, 9, 11).double().reshape(1, -1, 3).expand(2, -1, -1)
    visible = torch.tensor([0, 2, 3])

    def run(model):
        model.zero_grad()
        z = slots.clone().requires_grad_(True)
        pixels, extras = model.decoder(z, pos.double().expand(2, 99, 3), rays, visible=visible)
        ((pixels - 0.5).square().mean() + 0.1 * extras["segmentation"][..., 2].mean()).backward()
        grads = [p.grad for _, p in sorted(model.decoder.named_parameters())]
        return [pixels.detach(), extras["segmentation"].detach(), z.grad] + grads

    e, f = run(eager), run(folded)
    assert (e[1][..., 1] == 0).all() and (f[1][..., 1] == 0).all()
    names = ["pixels", "segmentation", "slots.grad"] + [n for n, _ in sorted(eager.decoder.named_parameters())]
    for name, a, b in zip(names, e, f):
        assert a is not None and b is not None, name
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_encode_writes_the_slots_file_and_it_renders_as_the_model_does(tiny_run, tmp_path):
    """python -m osrt_fast.encode: the file holds each scene's slots as the model encodes them,
    the input views and poses and the config; render_view from the loaded file equals rendering
    from freshly encoded slots; a model of another shape is refused by name."""
    from osrt_fast.config import load_config
    from osrt_fast.data import batch_spec, get_dataset, model_batch
    from osrt_fast.encode import main
    from osrt_fast.checkpoint import load_trained_model
    config, _ = tiny_run
    out = str(tmp_path / "slots.safetensors")
    assert main([config, "--split", "val", "--scenes", "1:4", "--out", out, "--no-cuda"]) == 0
    s = load_slots(out)
    assert len(s) == 3 and s.scene_ids.tolist() == [1, 2, 3]
    assert s.slots.shape == (3, 3, 32) and s.input_images.dtype == torch.uint8
    views = s.input_camera_pos.shape[1]
    assert s.input_images.shape == (3, views, 16, 16, 3)
    assert s.input_camera_rot.shape == (3, views, 3, 3) and s.input_fov.shape == (3, views)
    assert s.info["split"] == "val" and s.info["iteration"] == "2"
    assert s.model_config() == json.loads(s.info["config"])["model"]
    _, model, _, _ = load_trained_model(config, device="cpu")
    cfg = load_config(config)
    dataset = get_dataset("val", cfg.data)
    item = model_batch(dataset[2], batch_spec(cfg.data, dataset))
    with torch.no_grad():
        fresh = model.encoder(item["input_images"], item["input_camera_pos"], item["input_rays"])
    torch.testing.assert_close(s.slots[1], fresh[0])
    torch.testing.assert_close(s.input_camera_pos[1], item["input_camera_pos"][0])
    pos = s.input_camera_pos[1, 0]
    a = render_view(model, s.slots[1], pos, s.input_camera_rot[1, 0], float(s.input_fov[1, 0]),
                    16, 16)
    rays = item["input_rays"][0, 0]
    b = model.decoder(fresh, pos.expand(1, 256, 3), rays.reshape(1, -1, 3))
    # The pose's rays equal the loader's float32 rays to ~1e-6; the ray encoding's top octave
    # amplifies that (9e-5 measured).
    torch.testing.assert_close(a[0].reshape(-1, 3), b[0][0], atol=5e-4, rtol=0)
    other = OSRT(tiny_model_config(encoder_kwargs={**tiny_model_config()["encoder_kwargs"],
                                                   "num_slots": 5}))
    with pytest.raises(SlotsError, match="holds 3 slots of width 32, but the model makes 5"):
        check_model_matches(s, other)


def test_bad_slots_files_and_arguments_are_named(tiny_run, tmp_path, capsys):
    from osrt_fast.encode import main
    config, _ = tiny_run
    with pytest.raises(SlotsError, match="no slots file at"):
        load_slots(str(tmp_path / "none.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(SlotsError, match="not a readable safetensors file"):
        load_slots(str(junk))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SlotsError, match="not an osrt_fast slots file"):
        load_slots(str(tmp_path / "other.safetensors"))
    assert main([config, "--scenes", "3:1", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "need 0 <= A < B" in capsys.readouterr().err
    assert main([config, "--scenes", "0:999", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "the val split has" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_render_py_renders_from_a_slots_file_with_slots_hidden(tiny_run, tmp_path, capsys):
    """render.py --slots: the frames from the file equal those from the dataset (same slots, same
    cameras); --hide changes them and gives the hidden slot no pixel; errors are named."""
    import importlib.util
    from osrt_fast.encode import main as encode_main
    spec = importlib.util.spec_from_file_location("render_py", os.path.join(ROOT, "render.py"))
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    config, _ = tiny_run
    run = os.path.dirname(config)
    out = str(tmp_path / "s.safetensors")
    assert encode_main([config, "--scenes", "1:3", "--out", out, "--no-cuda"]) == 0
    common = [config, "--sceneid", "2", "--num-frames", "2", "--novideo", "--no-cuda"]
    assert render.main(common + ["--name", "data"]) == 0
    assert render.main(common + ["--name", "file", "--slots", out]) == 0
    assert render.main(common + ["--name", "hidden", "--slots", out, "--hide", "0"]) == 0

    def frames(name, kind="renders"):
        d = os.path.join(run, "render", name, "2", kind)
        return [np.asarray(Image.open(os.path.join(d, f"{i}.png"))).astype(int) for i in range(2)]
    for a, b in zip(frames("data"), frames("file")):
        assert np.abs(a - b).max() <= 1
    assert any(np.abs(a - b).max() > 0 for a, b in zip(frames("data"), frames("hidden")))
    colour0 = segmentation_colors(3)[0]
    for seg in frames("hidden", "segmentations"):
        assert not np.all(seg == colour0, axis=-1).any()
    assert render.main(common + ["--slots", out, "--hide", "5"]) == 2
    assert "slot 5 does not exist" in capsys.readouterr().err
    assert render.main([config, "--sceneid", "7", "--novideo", "--slots", out]) == 2
    assert "scene 7 is not in this slots file" in capsys.readouterr().err


def test_encode_and_the_viewer_write_into_the_run_folder_by_default(tiny_run, tmp_path, monkeypatch):
    """Not into the current folder (often a clone's root, where nothing ignores them)."""
    import os

    from osrt_fast.encode import main
    from osrt_fast.view import build_parser, save_dir_of
    config, _ = tiny_run
    monkeypatch.chdir(tmp_path)
    assert main([config, "--split", "val", "--scenes", "0:1", "--no-cuda"]) == 0
    run_dir = os.path.dirname(config)             # the tiny run's config.yaml lives in its folder
    assert os.path.isfile(os.path.join(run_dir, "slots.safetensors")) and not os.listdir(tmp_path)
    assert save_dir_of(build_parser().parse_args([config])) == os.path.join(run_dir, "views")
    assert save_dir_of(build_parser().parse_args(["configs/demo.yaml"])) == os.path.join("runs", "demo", "views")
    assert save_dir_of(build_parser().parse_args([config, "--save-dir", "x"])) == "x"
