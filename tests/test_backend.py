"""The model's backends: 'triton' computes the eager model's function (reference vectors, random
weights, every parameter gradient) and trains like it; encoder attention backends; errors.

The fast path's maths (model.py's `FastPath` modules: the folded Slot Mixer, the slot-attention
step) is
checked through the kernels' eager twins (`ops` all 'eager'), in fp64 and without the Triton
interpreter; the kernels themselves are checked against their twins in tests/test_kernels.py,
and one small test here runs the whole model through the interpreted kernels (the wiring)."""
import os
import subprocess
import sys
import types

import pytest
import torch

from osrt_fast.kernels._triton import poisoned_outputs
from osrt_fast.kernels import OPS
from osrt_fast import OSRT
from osrt_fast.config import ConfigError, config_from_dict
from conftest import tiny_model_config
from test_model import tiny_inputs
from test_model_parity import load_case, rebuild_reference_weights, relative_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TWINS = dict.fromkeys(OPS, "eager")     # every fast op through its kernel's eager twin


@pytest.mark.slow
@pytest.mark.parametrize("name", ["osrt_slot_mixer", "osrt_slot_mixer_3iters"])
def test_reference_vectors_under_the_fast_path(name):
    case = load_case(name)
    model = OSRT(case["config"]).set_backend("triton", ops=TWINS).eval()
    state = rebuild_reference_weights(model, case["weight_seed"])
    model.encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
    model.decoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("decoder.")})
    inp, out = case["inputs"], case["outputs"]
    with torch.no_grad():
        latents = model.encoder(inp["images"], inp["camera_pos"], inp["rays"])
        pixels, extras = model.decoder(latents, inp["target_camera_pos"], inp["target_rays"])
    # Folding reassociates sums: measured 5e-7..3e-6 (eager: 1e-7..2e-6).
    assert relative_error(latents, out["latents"]) < 1e-5
    assert relative_error(pixels, out["pixels"]) < 1e-5
    assert relative_error(extras["segmentation"], out["segmentation"]) < 1e-5


def folded_and_eager_fp64():
    """(eager model, fast path through the twins) with the same weights, in fp64."""
    cfg = tiny_model_config()
    cfg["encoder_kwargs"]["num_slots"] = 5
    cfg["encoder_kwargs"]["slot_iters"] = 2
    eager = OSRT(cfg)
    eager.load_state_dict(rebuild_reference_weights(eager, 3))
    folded = OSRT(cfg).set_backend("triton", ops=TWINS)
    folded.load_state_dict(eager.state_dict())
    return eager.double(), folded.double()


def outputs_and_grads(model, dtype=torch.float64):
    images, cam, dirs, tcam, tdirs = tiny_inputs(batch=2, rays=37)
    model.zero_grad()
    latents = model.encoder(images.to(dtype), cam.to(dtype), dirs.to(dtype))
    pixels, extras = model.decoder(latents, tcam.to(dtype), tdirs.to(dtype))
    ((pixels - 0.5).square().mean() + 0.1 * extras["segmentation"][..., 0].mean()).backward()
    return ([t.detach() for t in (latents, pixels, extras["segmentation"])]
            + [p.grad for _, p in sorted(model.named_parameters())])


def test_folded_maths_is_the_eager_function_in_fp64():
    """The folded Slot Mixer and the fast slot-attention step, through the eager twins in fp64:
    every output and parameter gradient equals the eager model's up to fp64 rounding (folding
    only reassociates sums; a LayerNorm bias whose true gradient is exactly zero has rounding
    alone, hence the absolute floor)."""
    eager, folded = folded_and_eager_fp64()
    assert folded.decoder.backend == "triton" and folded.decoder.ops == {k: TWINS[k] for k in
                                                                        folded.decoder.fast_ops}
    names = ["latents", "pixels", "segmentation"] + [n for n, _ in sorted(eager.named_parameters())]
    for name, e, f in zip(names, outputs_and_grads(eager), outputs_and_grads(folded)):
        assert f is not None and e is not None, name
        torch.testing.assert_close(f, e, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def fast_path_runs(cfg: dict, make_fast) -> list:
    """(name, fp32 eager, fp32 fast, fp64 eager) for the outputs (latents, pixels, segmentation)
    and every parameter gradient of one loss over the pixels and the segmentation; the fast model
    is `make_fast(cfg)`, run with its kernels' outputs poisoned. Weights: the reference vectors'
    recipe, unit-scale activations, so that every gradient is well above fp32 rounding (the
    paper init of so small a model leaves some near 1e-10)."""
    reference = OSRT(cfg)
    state = rebuild_reference_weights(reference, 3)
    reference.load_state_dict(state)
    reference.double()
    images, cam, dirs, tcam, tdirs = tiny_inputs(batch=2, rays=37)

    def run(model, dtype):
        model.zero_grad()
        latents = model.encoder(images.to(dtype), cam.to(dtype), dirs.to(dtype))
        pixels, extras = model.decoder(latents, tcam.to(dtype), tdirs.to(dtype))
        ((pixels - 0.5).square().mean() + 0.1 * extras["segmentation"][..., 0].mean()).backward()
        outputs = [t.detach() for t in (latents, pixels, extras["segmentation"])]
        return outputs + [p.grad for _, p in sorted(model.named_parameters())]

    expected = run(reference, torch.float64)
    eager, fast_model = OSRT(cfg), make_fast(cfg)
    eager.load_state_dict(state)
    fast_model.load_state_dict(state)
    eager_values = run(eager, torch.float32)
    with poisoned_outputs():
        fast_values = run(fast_model, torch.float32)
    names = ["latents", "pixels", "segmentation"] + [n for n, _ in sorted(fast_model.named_parameters())]
    return list(zip(names, eager_values, fast_values, expected))


def test_triton_backend_matches_eager_forward_and_every_gradient():
    """The wiring: the model through the interpreted kernels (all ops 'triton', the default), in
    fp32, against the eager model in fp64, is as accurate as the eager model in fp32 (one
    LayerNorm bias has an exactly-zero true gradient: only rounding is left there, for both)."""
    cfg = tiny_model_config()
    cfg["encoder_kwargs"]["num_slots"] = 5
    cfg["encoder_kwargs"]["slot_iters"] = 2
    for name, e, f, r in fast_path_runs(cfg, lambda c: OSRT({**c, "backend": "triton"})):
        assert f is not None, name
        if r.abs().max() < 1e-15:
            # An exactly-zero true gradient (that LayerNorm bias): both have fp32 rounding alone,
            # whose size depends on the summation order (e.g. the number of threads).
            assert f.abs().max() < 1e-9 and e.abs().max() < 1e-9, name
            continue
        assert relative_error(f, r) <= 2 * relative_error(e, r) + 1e-6, name


def test_set_backend_switches_and_keeps_parameters():
    from osrt_fast.model import SlotAttention, SlotMixerDecoder
    model = OSRT(tiny_model_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_backend("triton")
    assert model.slot_attention.backend == "triton" and model.slot_attention.ops == {"slot_attention": "triton"}
    assert model.decoder.backend == "triton" and model.cfg.backend == model.backend == "triton"
    assert model.decoder.ops == {"cross_attention": "triton", "mix_render": "triton"}
    assert type(model.decoder) is SlotMixerDecoder and type(model.slot_attention) is SlotAttention
    model.set_backend("eager")
    assert model.decoder.backend == model.slot_attention.backend == model.backend == "eager"
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="eager, triton"):
        model.set_backend("cuda")
    with pytest.raises(ValueError, match="mix_render"):
        model.set_backend("triton", ops={"mix_render": "cuda"})


def test_backend_errors_are_clear(monkeypatch):
    from osrt_fast.kernels import _triton
    monkeypatch.setattr(_triton, "HAVE_TRITON", False)
    with pytest.raises(ConfigError, match=r"osrt-fast\[triton\]"):
        OSRT({**tiny_model_config(), "backend": "triton"})
    monkeypatch.setattr(_triton, "HAVE_TRITON", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = OSRT({**tiny_model_config(), "backend": "triton"})
    with pytest.raises(ConfigError, match="CUDA GPUs.*backend: eager"):
        model.check_device(torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.encoder_attention = .flash.: expected one of sdpa, xformers"):
        config_from_dict({"model": {"encoder_attention": "flash"}})


def test_xformers_missing_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(ConfigError, match=r"osrt-fast\[xformers\]"):
        OSRT({**tiny_model_config(), "encoder_attention": "xformers"})


def test_xformers_layout(monkeypatch):
    """Our call into xformers ([B, N, H, d] in and out) gives SDPA's result. xformers' kernel
    needs CUDA, so this stands in an eager memory_efficient_attention with its documented layout."""
    def memory_efficient_attention(q, k, v):
        assert q.dim() == 4 and q.shape[2] == 2        # [B, N, H, d], H = 2 heads
        w = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        return torch.einsum("bhqk,bkhd->bqhd", w.softmax(-1), v)

    fake = types.ModuleType("xformers")
    fake.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    model = OSRT(tiny_model_config()).eval()
    images, cam, dirs, _, _ = tiny_inputs()
    with torch.no_grad():
        expected = model.encoder(images, cam, dirs)
        model.set_encoder_attention("xformers")
        got = model.encoder(images, cam, dirs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def train_losses(backend: str, dtype: torch.dtype, steps: int = 30) -> list:
    """Losses of a tiny OSRT trained from seed 0 on a fixed stream of random scenes ('folded':
    the fast path through the kernels' eager twins)."""
    torch.manual_seed(0)
    cfg = tiny_model_config()
    cfg["encoder_kwargs"]["num_slots"] = 4
    model = OSRT(cfg)
    if backend == "folded":
        model.set_backend("triton", ops=TWINS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        images, cam, dirs, tcam, tdirs = tiny_inputs(batch=2, rays=37)
        target = torch.rand(2, 37, 3, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            pixels, _ = model(images, cam, dirs, tcam, tdirs)
        loss = (pixels.float() - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_training_on_the_fast_path_follows_eager(dtype, tolerance):
    """30 Adam steps from one seed: the loss curves agree within `tolerance` on average and at
    every step (relative). bf16: both run under CPU autocast; the folded path computes its
    products in bf16 in another order, and the difference compounds over the steps, so a single
    step may drift as far as twice eager bf16's own drift from eager fp32 (measured here: up to
    5.7% against 3.2%; a wrong fast path is off by far more)."""
    eager = torch.tensor(train_losses("eager", dtype))
    folded = torch.tensor(train_losses("folded", dtype))
    assert eager[-5:].mean() < eager[:5].mean()          # it learns at all
    step_error = (folded - eager).abs() / eager
    own_drift = 0.0
    if dtype != torch.float32:
        fp32 = torch.tensor(train_losses("eager", torch.float32))
        own_drift = ((eager - fp32).abs() / fp32).max().item()
    assert step_error.mean() < tolerance / 2, step_error
    assert step_error.max() < max(tolerance, 2 * own_drift), (step_error, own_drift)


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path):
    """Every kernel, as its launcher launches it at MSN-Hard and odd small shapes, compiles for
    sm_90 with Triton's bundled ptxas, within Hopper's shared memory (kernels/aot.py)."""
    import json
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "aot.jsonl"
    proc = subprocess.run([sys.executable, "-m", "osrt_fast.kernels.aot", "--shapes", "paper", "small",
                           "--json", str(report)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    kernels = {r["kernel"] for r in rows}
    assert {"_slot_attention_fwd_kernel", "_slot_attention_bwd_kernel", "_cross_attention_fwd_kernel",
            "_cross_attention_bwd_kernel", "_mix_render_fwd_kernel", "_mix_render_bwd_kernel"} <= kernels
    for r in rows:
        assert r["ok"] and 0 <= r["shared_bytes"] <= 227 * 1024, r
    # The bf16 slot-attention kernels use Hopper's warpgroup matrix instructions.
    assert all(r["wgmma"] for r in rows if r["dtype"] == "bf16" and r["kernel"].startswith("_slot_attention_"))


def test_the_folded_backend_is_the_fast_path_through_the_twins_on_any_device():
    """model.backend 'folded': the fast path with every op's eager twin, on the CPU without
    Triton's interpreter; the same outputs as backend 'triton' with ops all 'eager'. It takes
    no `ops`, and a model it cannot apply to is refused, as under 'triton'."""
    cfg = tiny_model_config()
    folded = OSRT({**cfg, "backend": "folded"})
    assert folded.backend == "folded" and folded.decoder.ops == {"cross_attention": "eager",
                                                                 "mix_render": "eager"}
    folded.check_device(torch.device("cpu"))
    twins = OSRT(cfg).set_backend("triton", ops=TWINS)
    twins.load_state_dict(folded.state_dict())
    images, cam, dirs, tcam, tdirs = tiny_inputs(batch=2, rays=19)
    with torch.no_grad():
        a = folded(images, cam, dirs, tcam, tdirs)
        b = twins(images, cam, dirs, tcam, tdirs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["segmentation"], b[1]["segmentation"])
    with pytest.raises(ValueError, match="ops choose kernel or twin under backend 'triton'"):
        folded.set_backend("folded", ops=TWINS)
    layer_norm = {**cfg, "decoder_kwargs": {**cfg["decoder_kwargs"], "layer_norm": True}}
    with pytest.raises(ConfigError, match="'folded'.*no folded form.*layer_norm: true"):
        OSRT({**layer_norm, "backend": "folded"})
    with pytest.raises(ConfigError, match="'folded' speeds up.*has neither"):
        OSRT({"encoder": "srt", "decoder": "srt", "backend": "folded"})
