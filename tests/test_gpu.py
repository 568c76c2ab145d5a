"""The fast path on a GPU: the triton backend with real compiled kernels against fp64 eager, the
compiled fast path (inductor over the Triton ops, every checkpointing region) against eager,
training curves, and make_batch on the device. The GPU suite (benchmarks/gpu/suite.py) runs these.

They need CUDA. `OSRT_TEST_DEVICE=cpu` runs the same checks on the CPU, kernels through Triton's
interpreter and compile through aot_eager, at the same tiny shapes (the suite's --smoke does)."""
import os

import numpy as np
import pytest
import torch

from conftest import scene_inputs, tiny_model_config
from osrt_fast.kernels._triton import poisoned_outputs
from osrt_fast import OSRT
from osrt_fast.config import config_from_dict
from osrt_fast.data import BatchSpec, collate, make_batch, to_device
from osrt_fast.parallel import parallelize
from test_model_parity import load_case, rebuild_reference_weights, relative_error
from test_records import random_records

DEVICE = os.environ.get("OSRT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="needs a CUDA GPU (OSRT_TEST_DEVICE=cpu runs these checks on the CPU "
                           "through the Triton interpreter)")
ON_GPU = DEVICE is not None and DEVICE.startswith("cuda")
# inductor on the GPU; on the CPU aot_eager traces the same graphs without a C++ build.
COMPILE_BACKEND = "inductor" if ON_GPU else "aot_eager"
ALL_REGIONS = {"encoder_blocks": True, "slot_attention": True, "decoder_ray_chunk": 7}


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 means fp32 (the reference's setting): no TF32 in cuBLAS or cuDNN. The kernels'
    fp32 dots follow the same flag (3xTF32 when it is off)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def small_config(**overrides):
    cfg = tiny_model_config(**overrides)
    cfg["encoder_kwargs"]["num_slots"] = 5
    return cfg


def outputs_and_grads(model, data, autocast_bf16=False):
    """(latents, pixels, segmentation, every parameter gradient by name) of one loss."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(data[0].device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        latents = model.encoder(*data[:3])
        pixels, extras = model.decoder(latents, *data[3:5])
    loss = (pixels.float() - data[5]).square().mean() + 0.1 * extras["segmentation"].float()[..., 0].mean()
    loss.backward()
    outs = {"latents": latents, "pixels": pixels, "segmentation": extras["segmentation"]}
    outs = {k: v.detach().double().cpu() for k, v in outs.items()}
    grads = {n: p.grad.double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return outs, grads


def test_triton_backend_matches_fp64_eager_forward_and_every_gradient():
    """fp32 on the device, compiled kernels: as close to the fp64 eager model as the eager
    model in fp32 on the same device (3xTF32 dots are about fp32)."""
    cfg = small_config()
    ref_model = OSRT(cfg)
    state = rebuild_reference_weights(ref_model, 3)
    ref_model.load_state_dict(state)
    data = scene_inputs()
    expected = outputs_and_grads(ref_model.double(), [t.double() for t in data])
    on_device = [t.to(DEVICE) for t in data]
    eager, fast = OSRT(cfg).to(DEVICE), OSRT({**cfg, "backend": "triton"}).to(DEVICE)
    eager.load_state_dict(state)
    fast.load_state_dict(state)
    got_eager = outputs_and_grads(eager, on_device)
    with poisoned_outputs():
        got_fast = outputs_and_grads(fast, on_device)
    for part in (0, 1):
        assert set(got_fast[part]) == set(expected[part])
        for name, r in expected[part].items():
            e, f = relative_error(got_eager[part][name], r), relative_error(got_fast[part][name], r)
            assert f <= 2 * e + 1e-5, f"{name}: triton {f:.2e}, eager {e:.2e}"


def test_triton_backend_under_bf16_autocast_stays_near_fp64():
    """bf16 autocast: the outputs within bf16's tolerance of fp64, and no further from it than
    twice the eager model's error under the same autocast."""
    cfg = small_config()
    ref_model = OSRT(cfg)
    state = rebuild_reference_weights(ref_model, 3)
    ref_model.load_state_dict(state)
    data = scene_inputs()
    expected, _ = outputs_and_grads(ref_model.double(), [t.double() for t in data])
    on_device = [t.to(DEVICE) for t in data]
    eager, fast = OSRT(cfg).to(DEVICE), OSRT({**cfg, "backend": "triton"}).to(DEVICE)
    eager.load_state_dict(state)
    fast.load_state_dict(state)
    got_eager, _ = outputs_and_grads(eager, on_device, autocast_bf16=True)
    with poisoned_outputs():
        got_fast, fast_grads = outputs_and_grads(fast, on_device, autocast_bf16=True)
    for name, r in expected.items():
        e, f = relative_error(got_eager[name], r), relative_error(got_fast[name], r)
        assert f < 3e-2 and f <= 2 * e + 1e-2, f"{name}: triton {f:.2e}, eager {e:.2e}"
    assert all(torch.isfinite(g).all() for g in fast_grads.values())


def test_reference_vectors_under_the_triton_backend_on_the_device():
    for name in ("osrt_slot_mixer", "osrt_slot_mixer_3iters"):
        case = load_case(name)
        model = OSRT({**case["config"], "backend": "triton"}).eval()
        model.load_state_dict(rebuild_reference_weights(model, case["weight_seed"]))
        model.to(DEVICE)
        inp = {k: v.to(DEVICE) for k, v in case["inputs"].items()}
        with torch.no_grad(), poisoned_outputs():
            latents = model.encoder(inp["images"], inp["camera_pos"], inp["rays"])
            pixels, extras = model.decoder(latents, inp["target_camera_pos"], inp["target_rays"])
        out = case["outputs"]
        assert relative_error(latents.cpu(), out["latents"]) < 1e-5, name
        assert relative_error(pixels.cpu(), out["pixels"]) < 1e-5, name
        assert relative_error(extras["segmentation"].cpu(), out["segmentation"]) < 1e-5, name


def fast_and_eager_pair(**training):
    """The eager model and the fast path (triton backend, every region checkpointed and
    compiled, as train.py builds it) with the same weights, on the device."""
    torch.manual_seed(0)
    cfg = small_config()
    eager = OSRT(cfg).to(DEVICE)
    fast = OSRT({**cfg, "backend": "triton"}).to(DEVICE)
    fast.load_state_dict(eager.state_dict())
    t = config_from_dict({"training": {"compile": True, "activation_checkpointing": ALL_REGIONS,
                                       **training}}).training
    torch._dynamo.reset()
    fast = parallelize(fast, t, compile_kwargs={"backend": COMPILE_BACKEND})
    return eager, fast


def test_compiled_fast_path_with_checkpointing_matches_eager():
    from torch._dynamo.utils import counters
    counters.clear()
    eager, fast = fast_and_eager_pair()
    assert len(fast.regions()) == 4
    data = [t.to(DEVICE) for t in scene_inputs(rays=21)]      # 3 decoder chunks of 7
    expected = outputs_and_grads(eager, data)
    with poisoned_outputs():
        got = outputs_and_grads(fast, data)
    assert counters["stats"]["unique_graphs"] >= 4, dict(counters["stats"])
    for part in (0, 1):
        assert set(got[part]) == set(expected[part])
        for name, e in expected[part].items():
            torch.testing.assert_close(got[part][name], e, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-3), ("bf16", 5e-2)])
def test_fast_path_training_follows_eager(precision, tolerance):
    """Adam steps from one seed on a fixed stream of random scenes: the fast path's loss curve
    is the eager one's within `tolerance` (relative, per step)."""
    steps = 20 if ON_GPU else 3
    eager, fast = fast_and_eager_pair(precision=precision)
    curves = []
    for model in (eager, fast):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses = []
        for i in range(steps):
            data = [t.to(DEVICE) for t in scene_inputs(rays=21, seed=100 + i)]
            with torch.autocast(data[0].device.type, dtype=torch.bfloat16,
                                enabled=precision == "bf16"):
                pixels, _ = model(*data[:5])
            loss = (pixels.float() - data[5]).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    eager_curve, fast_curve = curves
    assert torch.isfinite(fast_curve).all()
    assert ((fast_curve - eager_curve).abs() / eager_curve).max() < tolerance, (eager_curve, fast_curve)


def test_make_batch_on_the_device_equals_the_cpu():
    """Rays, colours, one-hot masks and the sampled pixels do not depend on the device."""
    records = collate(random_records(np.random.default_rng(0), b=3, v=5, h=12, w=20, o=7, vin=2))
    spec = BatchSpec(num_points=53, num_entities=7, downsample=1)
    on_cpu = make_batch(records, spec)
    on_device = make_batch(to_device(records, DEVICE), spec)
    assert set(on_cpu) == set(on_device)
    for key, value in on_cpu.items():
        got = on_device[key].cpu()
        if value.is_floating_point():
            torch.testing.assert_close(got, value, rtol=1e-6, atol=1e-6, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(got, value), key
