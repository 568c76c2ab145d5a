"""The shipped checkpoints, configs/demo.pt and configs/full.pt (configs/demo.yaml and
configs/full.yaml trained on the 2-core CPU; docs/learning.md): each loads into its config's
model, reconstructs and segments held-out built-in scenes above a floor, and render.py, evaluate
and encode take it with --checkpoint."""
import json
import os

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "configs", "demo.pt")
# family: (checkpoint, PSNR floor, FG-ARI floor) on 16 held-out scenes (generator seed 7).
# demo.pt at step 40000 (sha256 fa6a93a844e0) measured PSNR 24.62, FG-ARI 0.89 there (the
# checkpoints it replaced: 24.47, 0.88 and 23.96, 0.82). The floors leave room for other CPUs'
# rounding, and stay far above what an untrained or collapsed model gives (the mean image is
# about 19 dB; one slot, FG-ARI 0).
# full.pt (10 slots) at step 58000 (sha256 7da1aef327c8) measured PSNR 23.48, FG-ARI 0.87 there
# (the 7-slot checkpoint it replaced: 22.66, 0.88; its mean image is about 16.5 dB).
FAMILIES = {"demo": (CHECKPOINT, 23.5, 0.75),
            "full": (os.path.join(ROOT, "configs", "full.pt"), 20.5, 0.7)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def held_out(request, tmp_path_factory):
    """(family, the config's path): configs/<family>.yaml on 20 scenes its checkpoint never saw
    (generator seed 7, not 0)."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"held_out_{family}")
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", f"{family}.yaml")))
    cfg["data"]["path"] = str(tmp / "data")
    cfg["data"]["kwargs"].update(num_scenes=20, seed=7)
    cfg["training"].update(device="cpu", num_workers=0)
    path = tmp / f"{family}_held_out.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return family, str(path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_checkpoint_is_small_and_its_configs(family):
    from osrt_fast.checkpoint import load_checkpoint
    from osrt_fast.config import load_config
    from osrt_fast.model import OSRT
    checkpoint = FAMILIES[family][0]
    assert os.path.getsize(checkpoint) <= 20 * 2 ** 20
    model = OSRT(load_config(os.path.join(ROOT, "configs", f"{family}.yaml")).model)
    state = load_checkpoint(checkpoint, model, map_location="cpu")
    assert state["it"] > 0


def test_the_checkpoint_reconstructs_and_segments_held_out_scenes(held_out):
    from osrt_fast.checkpoint import load_trained_model
    from osrt_fast.data import batch_spec, get_dataset, record_loader
    from osrt_fast.evaluate import evaluate
    family, config = held_out
    checkpoint, psnr_floor, fg_ari_floor = FAMILIES[family]
    torch.manual_seed(0)
    cfg, model, _, _ = load_trained_model(config, checkpoint, "cpu")
    dataset = get_dataset("train", cfg.data, max_len=16)
    result = evaluate(model, record_loader(dataset, 8, {"num_workers": 0}, train=False),
                      torch.device("cpu"), batch_spec(cfg.data, dataset), progress=False)
    assert result["num_scenes"] == 16
    assert result["psnr"] >= psnr_floor, result
    assert result["fg_ari"] >= fg_ari_floor, result


def test_commands_take_the_checkpoint(held_out, tmp_path, monkeypatch, capsys):
    """render.py, python -m osrt_fast.evaluate and python -m osrt_fast.encode, each with
    --checkpoint configs/<family>.pt (the README's commands, on the held-out scenes)."""
    import importlib.util

    from osrt_fast.config import load_config
    from osrt_fast.encode import main as encode_main
    from osrt_fast.evaluate import main as evaluate_main
    from osrt_fast.slots import load_slots
    family, config = held_out
    checkpoint = FAMILIES[family][0]
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("render_py", os.path.join(ROOT, "render.py"))
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert render.main([config, "--checkpoint", checkpoint, "--num-frames", "2", "--novideo",
                        "--no-cuda"]) == 0
    frames = tmp_path / "runs" / f"checkpoint-{family}" / "render" / "rotate" / "0" / "segmentations"
    assert len(os.listdir(frames)) == 2
    out = tmp_path / "eval.json"
    assert evaluate_main([config, "--checkpoint", checkpoint, "--max-eval", "4", "--no-cuda",
                          "--output", str(out)]) == 0
    assert json.load(open(out))["num_scenes"] == 4
    assert encode_main([config, "--checkpoint", checkpoint, "--split", "train", "--scenes", "0:2",
                        "--out", str(tmp_path / "slots.safetensors"), "--no-cuda"]) == 0
    enc = load_config(config).model.encoder_kwargs
    assert load_slots(str(tmp_path / "slots.safetensors")).slots.shape == (2, enc["num_slots"], enc["slot_dim"])
