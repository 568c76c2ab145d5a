"""Activation checkpointing, torch.compile and bf16: what `parallelize` applies changes no number
beyond tolerance, and checkpointing does cut what autograd keeps."""
import pytest
import torch

from conftest import scene_inputs, tiny_model_config
from osrt_fast import OSRT
from osrt_fast.config import config_from_dict
from osrt_fast.parallel import apply_activation_checkpointing, apply_compile, parallelize

ALL_REGIONS = {"encoder_blocks": True, "slot_attention": True, "decoder_ray_chunk": 7}


def loss_and_grads(model, data):
    for p in model.parameters():
        p.grad = None
    pixels, extras = model(*data[:5])
    loss = (pixels - data[5]).square().mean() + extras["segmentation"].square().mean()
    loss.backward()
    return pixels.detach(), extras["segmentation"].detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol, atol):
    pa, sa, ga = a
    pb, sb, gb = b
    torch.testing.assert_close(pb, pa, rtol=rtol, atol=atol)
    torch.testing.assert_close(sb, sa, rtol=rtol, atol=atol)
    assert set(ga) == set(gb)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def model_pair(backend="eager", **cfg):
    torch.manual_seed(0)
    a = OSRT(tiny_model_config(backend=backend, **cfg))
    b = OSRT(tiny_model_config(backend=backend, **cfg))
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_activation_checkpointing_changes_no_gradient(backend):
    plain, ckpt = model_pair(backend)
    apply_activation_checkpointing(ckpt, ALL_REGIONS)
    assert ckpt.decoder.ray_chunk == 7 and ckpt.slot_attention.checkpointed
    data = scene_inputs(rays=37)        # 37 rays: chunks of 7 with a short last one
    assert_same(loss_and_grads(plain, data), loss_and_grads(ckpt, data), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoder", ["slot_mixer", "spatial_broadcast"])
def test_checkpointed_decoder_keeps_only_chunk_inputs_and_outputs(decoder):
    """Bytes autograd keeps grow with the rays by a few floats per ray under chunked
    checkpointing (the ray inputs, pixels and slot weights), against kilobytes without."""
    def saved_bytes(model, rays):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        data = scene_inputs(batch=1, rays=rays)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pixels, extras = model(*data[:5])
        return total

    kwargs = {} if decoder == "slot_mixer" else {"decoder_kwargs": {"pos_start_octave": -5, "slot_dim": 32, "hidden_dim": 32}}
    plain, ckpt = model_pair(decoder=decoder, **kwargs)
    apply_activation_checkpointing(ckpt, {"decoder_ray_chunk": 64})
    per_ray_plain = (saved_bytes(plain, 1024) - saved_bytes(plain, 512)) / 512
    per_ray_ckpt = (saved_bytes(ckpt, 1024) - saved_bytes(ckpt, 512)) / 512
    assert per_ray_plain > 1000
    assert per_ray_ckpt <= 4 * (3 + 3 + 3 + 3), per_ray_ckpt   # rays, positions, pixels, weights (K = 3)


@pytest.mark.slow
def test_compile_with_checkpointing_changes_no_gradient():
    """Each region compiled (fullgraph: a graph break fails), under checkpointing: the same
    outputs and gradients as eager, and compiled code did run."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    plain, fast = model_pair()
    cfg = config_from_dict({"training": {"compile": True, "activation_checkpointing": ALL_REGIONS}})
    assert parallelize(fast, cfg.training) is fast
    assert len(fast.regions()) == 4      # stem, 1 transformer block, slot attention, decoder
    data = scene_inputs(rays=21)                       # 3 chunks of 7: one compiled shape
    assert_same(loss_and_grads(plain, data), loss_and_grads(fast, data), rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] >= 4, dict(counters["stats"])
    # The state dict (parameter names) is unchanged by compile and checkpointing.
    assert list(fast.state_dict()) == list(plain.state_dict())


@pytest.mark.slow
def test_compile_traces_the_triton_kernels_without_graph_breaks():
    """The fused kernels are custom ops: the Slot Mixer and slot attention regions compile whole
    (fullgraph=True) on the triton backend and match the eager backend."""
    torch._dynamo.reset()
    plain, fast = model_pair("triton")
    plain.set_backend("eager")
    apply_compile(fast, backend="aot_eager")     # tracing is the point; inductor adds only time
    data = scene_inputs(rays=9)
    assert_same(loss_and_grads(plain, data), loss_and_grads(fast, data), rtol=1e-4, atol=1e-5)


def test_bf16_training_keeps_fp32_master_weights_and_adam_state(tmp_path):
    from conftest import train_tiny
    from osrt_fast.checkpoint import read_checkpoint
    data = {"dataset": "procedural", "path": str(tmp_path / "data"), "num_points": 32,
            "kwargs": {"num_scenes": 8, "height": 16, "width": 16, "num_views": 2, "seed": 1}}
    records = train_tiny(tmp_path, data, steps=2, precision="bf16", grad_clip=0.5, lr_warmup=0,
                         peak_tflops=1.0)
    step = [r for r in records if "loss" in r][-1]
    assert 0 < step["loss"] < 1 and step["grad_norm"] > 0
    assert 0 < step["mfu"] and step["tflops_per_s"] > 0      # against the configured peak
    state = read_checkpoint(str(tmp_path / "run" / "model.pt"))
    assert all(v.dtype == torch.float32 for v in state["encoder"].values() if v.is_floating_point())
    adam = state["optimizer"]["state"]
    assert adam and all(s["exp_avg"].dtype == torch.float32 for s in adam.values())


def test_bf16_autocast_model_is_close_to_fp32():
    model = OSRT(tiny_model_config())
    data = scene_inputs()
    with torch.no_grad():
        ref, _ = model(*data[:5])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, extras = model(*data[:5])
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05


def test_flop_count_is_the_eager_models():
    from torch.utils.flop_counter import FlopCounterMode

    from osrt_fast.throughput import model_flops_per_scene
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = OSRT(tiny_model_config())
    data = scene_inputs(batch=1)
    # (The math backend: the counter has no formula for the CPU flash kernel and would miss
    # the attention products, which the count on the meta device includes.)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(*data[:5])
    batch = dict(zip(["input_images", "input_camera_pos", "input_rays", "target_camera_pos",
                      "target_rays"], data))
    assert model_flops_per_scene(tiny_model_config(backend="triton"), batch) == 3 * counter.get_total_flops()


def test_scale_options_are_checked():
    from osrt_fast.config import ConfigError
    for bad, message in [({"precision": "fp16"}, "precision"),
                         ({"parallel": "zero3"}, "parallel"),
                         ({"grad_clip": -1.0}, "grad_clip"),
                         ({"activation_checkpointing": {"decoder": True}}, "valid keys"),
                         ({"activation_checkpointing": {"decoder_ray_chunk": True}}, "rays per scene"),
                         ({"activation_checkpointing": {"slot_attention": 1}}, "true or false")]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"training": bad})
