"""The eager model reproduces the reference implementation's outputs (tests/reference_vectors)."""
import math

import pytest
import torch

from osrt_fast.model import OSRT
from conftest import require_reference_vectors

CASES = ["osrt_slot_mixer", "osrt_slot_mixer_3iters", "srt_srt", "osrt_spatial_broadcast"]


def rebuild_reference_weights(model: OSRT, seed: int) -> dict:
    """Weights from the vectors' README recipe, for the keys and shapes of `model` (reference naming)."""
    shapes = {f"encoder.{k}": v.shape for k, v in model.encoder.state_dict().items()}
    shapes.update({f"decoder.{k}": v.shape for k, v in model.decoder.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) >= 2:
            w = noise / math.sqrt(math.prod(shape[1:]))
        elif "norm" in key and key.endswith(".weight"):
            w = 1 + 0.1 * noise
        else:
            w = 0.1 * noise
        state[key] = w.float()
    return state


def load_case(name):
    return torch.load(require_reference_vectors(f"{name}.pt"), weights_only=False)


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", CASES)
def test_reference_vectors(name):
    case = load_case(name)
    model = OSRT(case["config"]).eval()
    state = rebuild_reference_weights(model, case["weight_seed"])
    # Our key set is the reference's, and the rebuilt weights are the ones it used.
    assert set(state) == set(case["weight_sums"])
    for key, total in case["weight_sums"].items():
        assert state[key].double().sum().item() == pytest.approx(total, rel=1e-5, abs=1e-4), key
    model.encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
    model.decoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("decoder.")})

    inp, out = case["inputs"], case["outputs"]
    with torch.no_grad():
        latents = model.encoder(inp["images"], inp["camera_pos"], inp["rays"])
        pixels, extras = model.decoder(latents, inp["target_camera_pos"], inp["target_rays"])
    assert latents.shape == out["latents"].shape
    assert relative_error(latents, out["latents"]) < 1e-5
    assert relative_error(pixels, out["pixels"]) < 1e-5
    if "segmentation" in out:
        assert relative_error(extras["segmentation"], out["segmentation"]) < 1e-5
    else:
        assert "segmentation" not in extras
