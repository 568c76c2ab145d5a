"""The shipped checkpoint, configs/demo.pt (configs/demo.yaml trained on the 2-core CPU;
docs/learning.md): it loads into the demo's model, reconstructs and segments held-out built-in scenes
above a floor, and render.py, evaluate and encode take it with --checkpoint."""
import json
import os

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "configs", "demo.pt")
# Measured on these 16 scenes with demo.pt at step 40000 (sha256 d7d3462f9008): PSNR 23.96,
# FG-ARI 0.82 (at step 24129: 23.75, 0.78). The floors leave room for other CPUs' rounding, and
# stay far above what an untrained or collapsed model gives (the mean image is about 19 dB; one
# slot, FG-ARI 0).
PSNR_FLOOR, FG_ARI_FLOOR = 23.0, 0.7


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """configs/demo.yaml on 20 scenes the checkpoint never saw (generator seed 7, not 0): the
    config's path and the data section."""
    tmp = tmp_path_factory.mktemp("held_out")
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "demo.yaml")))
    cfg["data"]["path"] = str(tmp / "data")
    cfg["data"]["kwargs"].update(num_scenes=20, seed=7)
    cfg["training"].update(device="cpu", num_workers=0)
    path = tmp / "demo_held_out.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_the_checkpoint_is_small_and_the_demos():
    from osrt_fast.checkpoint import load_checkpoint
    from osrt_fast.config import load_config
    from osrt_fast.model import OSRT
    assert os.path.getsize(CHECKPOINT) <= 20 * 2 ** 20
    model = OSRT(load_config(os.path.join(ROOT, "configs", "demo.yaml")).model)
    state = load_checkpoint(CHECKPOINT, model, map_location="cpu")
    assert state["it"] > 0


def test_the_checkpoint_reconstructs_and_segments_held_out_scenes(held_out):
    from osrt_fast.checkpoint import load_trained_model
    from osrt_fast.data import batch_spec, get_dataset, record_loader
    from osrt_fast.evaluate import evaluate
    torch.manual_seed(0)
    cfg, model, _, _ = load_trained_model(held_out, CHECKPOINT, "cpu")
    dataset = get_dataset("train", cfg.data, max_len=16)
    result = evaluate(model, record_loader(dataset, 8, {"num_workers": 0}, train=False),
                      torch.device("cpu"), batch_spec(cfg.data, dataset), progress=False)
    assert result["num_scenes"] == 16
    assert result["psnr"] >= PSNR_FLOOR, result
    assert result["fg_ari"] >= FG_ARI_FLOOR, result


def test_commands_take_the_checkpoint(held_out, tmp_path, monkeypatch, capsys):
    """render.py, python -m osrt_fast.evaluate and python -m osrt_fast.encode, each with
    --checkpoint configs/demo.pt (the README's commands, on the held-out scenes)."""
    import importlib.util

    from osrt_fast.encode import main as encode_main
    from osrt_fast.evaluate import main as evaluate_main
    from osrt_fast.slots import load_slots
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("render_py", os.path.join(ROOT, "render.py"))
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert render.main([held_out, "--checkpoint", CHECKPOINT, "--num-frames", "2", "--novideo",
                        "--no-cuda"]) == 0
    frames = tmp_path / "runs" / "checkpoint-demo" / "render" / "rotate" / "0" / "segmentations"
    assert len(os.listdir(frames)) == 2
    out = tmp_path / "eval.json"
    assert evaluate_main([held_out, "--checkpoint", CHECKPOINT, "--max-eval", "4", "--no-cuda",
                          "--output", str(out)]) == 0
    assert json.load(open(out))["num_scenes"] == 4
    assert encode_main([held_out, "--checkpoint", CHECKPOINT, "--split", "train", "--scenes", "0:2",
                        "--out", str(tmp_path / "slots.safetensors"), "--no-cuda"]) == 0
    assert load_slots(str(tmp_path / "slots.safetensors")).slots.shape == (2, 4, 64)
