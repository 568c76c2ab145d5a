"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit is imported."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

REFERENCE_VECTORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_vectors")


def require_reference_vectors(name: str) -> str:
    """Path of a reference-vector file (tests/reference_vectors, see its README)."""
    path = os.path.join(REFERENCE_VECTORS, name)
    assert os.path.exists(path), f"reference vectors missing from the repository: {path}"
    return path


def tiny_data_section(path):
    """`data:` of the built-in scenes, tiny (40 scenes, 3 views of 16x16), at `path`."""
    return {"dataset": "procedural", "path": path, "num_points": 64,
            "kwargs": {"num_scenes": 40, "height": 16, "width": 16, "num_views": 3,
                       "min_objects": 1, "max_objects": 3, "seed": 1}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """tiny_data_section's scenes, generated once per test module."""
    from osrt_fast.config import config_from_dict
    from osrt_fast.data import get_dataset
    path = str(tmp_path_factory.mktemp("data") / "procedural")
    get_dataset("train", config_from_dict({"data": tiny_data_section(path)}).data)
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _threads_as_they_are(monkeypatch):
    """Commands called in this process keep the suite's threads (process.setup would take the
    cores left idle, measured for 0.25 s): one test's runs then compute alike, whatever else the
    machine does. Commands in subprocesses choose theirs as they do for users;
    tests/test_process.py checks the choice itself."""
    from osrt_fast import process
    monkeypatch.setattr(process, "auto_threads", torch.get_num_threads)
    yield


def tiny_model_config(**overrides):
    """A small OSRT (Slot Mixer) for fast CPU tests."""
    cfg = {
        "encoder": "osrt",
        "encoder_kwargs": {"pos_start_octave": -5, "num_slots": 3, "slot_dim": 32,
                           "num_conv_blocks": 3, "num_att_blocks": 1, "conv_dim": 8,
                           "latent_dim": 32, "num_heads": 2, "head_dim": 16, "mlp_dim": 64},
        "decoder": "slot_mixer",
        "decoder_kwargs": {"pos_start_octave": -5, "slot_dim": 32, "num_att_blocks": 1,
                           "render_hidden_dim": 32, "num_heads": 2},
    }
    cfg.update(overrides)
    return cfg


def scene_inputs(batch=2, views=2, size=16, rays=37, seed=0):
    """Random model inputs and targets of odd sizes: images [B, V, 3, S, S], camera positions,
    unit rays, target camera positions and rays [B, R, 3], target pixels [B, R, 3]."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, 3, generator=g), dim=-1)  # noqa: E731
    return (torch.rand(batch, views, 3, size, size, generator=g), unit(batch, views) * 3,
            unit(batch, views, size, size), unit(batch, rays) * 3, unit(batch, rays),
            torch.rand(batch, rays, 3, generator=g))


def train_tiny(tmp_path, data: dict, steps: int = 2, **training) -> list:
    """train.py's main on the tiny model for `steps` steps on CPU with the data section `data`,
    in tmp_path/run (training options override the defaults below); returns log.jsonl's records."""
    import json

    import yaml

    from osrt_fast.trainer import main as train_main
    opts = {"batch_size": 2, "num_workers": 0, "print_every": 1, "validate_every": 100,
            "visualize_every": 100, "checkpoint_every": 100, "device": "cpu", "vis_scenes": 1}
    opts.update(training)
    path = tmp_path / "run" / "config.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"data": data, "model": tiny_model_config(),
                                    "training": opts}))
    assert train_main([str(path), "--exit-after", str(steps)]) == 0
    return [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run trained for 2 steps on the tiny built-in data: (config path, data section)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    data = tiny_data_section(str(tmp / "data"))
    train_tiny(tmp, data, steps=2)
    return str(tmp / "run" / "config.yaml"), data
