"""Every Triton op against its eager twin: forward and every gradient, odd shapes, NaN-poisoned
outputs. On CPU the kernels run through TRITON_INTERPRET=1 (conftest.py) in fp32 against the
twin in fp64; on a GPU the same tests also run compiled, in fp32 and bf16."""
import pytest
import torch

from osrt_fast.kernels import _triton
from osrt_fast.kernels._triton import TritonUnavailable, poisoned_outputs
from osrt_fast.kernels.slot_attention import slot_attention_step, slot_attention_step_eager
from osrt_fast.kernels.slot_mixer import (slot_cross_attention, slot_cross_attention_eager, slot_mix_render,
                                slot_mix_render_eager)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (dtype, relative tolerance against the fp64 twin). fp32 in the interpreter is exact fp32
# (measured ~3e-7); on a GPU, 3xTF32 dots land near 1e-6; bf16 operands near 1e-3..1e-2.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def cases() -> list:
    """(device, dtype) params; a list, as parametrize needs (pytest 9 deprecates generators)."""
    return [pytest.param(device, dtype, id=f"{device}-{str(dtype)[6:]}") for device in DEVICES
            for dtype in ([torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16])]


# Many blocks of rays and a ragged last one: 8191 rays on a GPU; 1031 in the CPU interpreter,
# which takes about a minute for 8191 (1031 is still 64 blocks of the fp32 kernels' 16 rays, or
# 32 of 32, with a ragged last block).
LONG_RAYS = {"cpu": 1031, "cuda": 8191}


def ray_cases(shapes) -> list:
    """(device, dtype, *shape) for every case of `cases()` and shape; R = None is LONG_RAYS."""
    params = []
    for case in cases():
        device, dtype = case.values
        for shape in shapes:
            shape = tuple(LONG_RAYS[device] if v is None else v for v in shape)
            params.append(pytest.param(device, dtype, *shape, id=f"{case.id}-{'-'.join(map(str, shape))}"))
    return params


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(actual).any(), "NaN in a kernel output: an element was not written"
    diff = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    # Gradients that are exactly zero (e.g. of the logits with a single slot) must come out ~0.
    return diff / scale if scale > 1e-12 else diff


def check(fast_fn, eager_fn, inputs, device, dtype, out_grads=None):
    """Runs both on the same inputs: fp64 twin on CPU, fast op in `dtype` on `device`, with
    outputs poisoned; compares outputs and the gradients of every input."""
    ref_inputs = [t.double().requires_grad_() if torch.is_tensor(t) else t for t in inputs]
    ref = eager_fn(*ref_inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    if out_grads is None:
        out_grads = [torch.randn_like(r) for r in ref]
    float_inputs = [t for t in ref_inputs if torch.is_tensor(t) and t.requires_grad]
    ref_grads = torch.autograd.grad(ref, float_inputs, out_grads)

    fast_inputs = [t.detach().to(device, dtype).requires_grad_() if torch.is_tensor(t) else t
                   for t in ref_inputs]
    with poisoned_outputs():
        out = fast_fn(*fast_inputs)
        out = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(out, [t for t in fast_inputs if torch.is_tensor(t)],
                                    [g.to(device, o.dtype) for g, o in zip(out_grads, out)])
    tol = TOLERANCES[dtype]
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.shape == r.shape
        assert relative_error(o.cpu(), r) < tol, f"output {i}"
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.shape == r.shape and g.dtype == fast_inputs[i].dtype
        assert relative_error(g.cpu(), r) < tol, f"gradient of input {i}"


# ----------------------------------------------------------------------------------------------
# Slot attention step

@pytest.mark.parametrize("device,dtype", cases())
@pytest.mark.parametrize("B,K,N,D", [(2, 1, 37, 24), (2, 5, 130, 40), (1, 7, 37, 72), (1, 32, 70, 40)])
def test_slot_attention_step(device, dtype, B, K, N, D):
    g = torch.Generator().manual_seed(K * 1000 + N)
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, K, D), (B, N, D), (B, N, D)))

    def eager(q, k, v):
        return slot_attention_step_eager(q, k, v)[0]

    check(slot_attention_step, eager, [q, k, v], device, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_slot_attention_returns_the_attention(device):
    q, k, v = torch.randn(2, 5, 24), torch.randn(2, 45, 24), torch.randn(2, 45, 24)
    ref_out, ref_attn = slot_attention_step_eager(q.double(), k.double(), v.double(), eps=1e-8)
    with poisoned_outputs():
        out, attn = slot_attention_step(q.to(device), k.to(device), v.to(device), return_attention=True)
    assert attn.dtype == torch.float32 and attn.shape == (2, 5, 45)
    assert relative_error(attn.cpu(), ref_attn) < 1e-5
    assert relative_error(out.cpu(), ref_out) < 1e-5


# ----------------------------------------------------------------------------------------------
# Slot Mixer: cross-attention sub-block and mixing + render layer 1

@pytest.mark.parametrize("device,dtype,B,R,C,H,K", ray_cases(
    [(2, 37, 20, 3, 5), (1, 37, 180, 2, 1), (2, 65, 33, 1, 7), (1, 37, 24, 12, 32), (1, None, 12, 2, 7)]))
def test_slot_cross_attention(device, dtype, B, R, C, H, K):
    g = torch.Generator().manual_seed(R + K)
    inputs = [torch.randn(B, R, C, generator=g), 1 + 0.1 * torch.randn(C, generator=g),
              0.1 * torch.randn(C, generator=g), torch.randn(B, C, H * K, generator=g) / 3,
              torch.randn(B, H * K, C, generator=g), torch.randn(C, generator=g), H]
    check(slot_cross_attention, slot_cross_attention_eager, inputs, device, dtype)


@pytest.mark.parametrize("device,dtype,B,R,C,K,F", ray_cases(
    [(2, 37, 20, 5, 24), (1, 70, 180, 1, 100), (2, 130, 33, 7, 64), (1, 37, 16, 32, 40), (1, None, 12, 5, 8)]))
def test_slot_mix_render(device, dtype, B, R, C, K, F):
    g = torch.Generator().manual_seed(R + K + F)
    inputs = [torch.randn(B, R, C, generator=g), torch.randn(B, R, C, generator=g),
              torch.randn(B, C, K, generator=g) / 3, torch.randn(B, K, F, generator=g),
              torch.randn(F, C, generator=g) / 5, torch.randn(F, generator=g)]
    # Gradients flow into both outputs: h and the slot weights (the segmentation).
    check(slot_mix_render, slot_mix_render_eager, inputs, device, dtype)


def test_slot_mix_render_without_gradient_on_the_weights():
    x, q0 = torch.randn(1, 37, 20, requires_grad=True), torch.randn(1, 37, 20)
    mm, gm = torch.randn(1, 20, 5), torch.randn(1, 5, 24)
    w1b, b1 = torch.randn(24, 20), torch.randn(24)
    h, _ = slot_mix_render(x, q0, mm, gm, w1b, b1)
    h.square().sum().backward()
    x2 = x.detach().double().requires_grad_()
    h2, _ = slot_mix_render_eager(x2, q0.double(), mm.double(), gm.double(), w1b.double(), b1.double())
    h2.square().sum().backward()
    assert relative_error(x.grad, x2.grad) < 1e-5


# ----------------------------------------------------------------------------------------------
# torch.compile traces through the custom ops; clear errors

@pytest.mark.slow
def test_ops_trace_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = (torch.randn(*s, requires_grad=True) for s in ((2, 5, 24), (2, 37, 24), (2, 37, 24)))
    x = torch.randn(2, 37, 20, requires_grad=True)
    lnw, lnb, ob = torch.ones(20), torch.zeros(20), torch.randn(20)
    mq, mv = torch.randn(2, 20, 15, requires_grad=True), torch.randn(2, 15, 20)
    mm, gm, w1b, b1 = torch.randn(2, 20, 5), torch.randn(2, 5, 24), torch.randn(24, 20), torch.randn(24)

    def f(q, k, v, x, mq):
        u = slot_attention_step(q, k, v)
        y = slot_cross_attention(x, lnw, lnb, mq, mv, ob, 3)
        h, w = slot_mix_render(y, x, mm, gm, w1b, b1)
        return u.square().sum() + h.square().sum() + w.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (q, k, v, x, mq)
    expected = f(*args)
    expected_grads = torch.autograd.grad(expected, args)
    got = compiled(*args)
    grads = torch.autograd.grad(got, args)
    torch.testing.assert_close(got, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(TritonUnavailable, match="CUDA GPUs.*backend: eager"):
        slot_attention_step(torch.randn(1, 2, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8))


def test_missing_triton_is_explained(monkeypatch):
    monkeypatch.setattr(_triton, "HAVE_TRITON", False)
    with pytest.raises(TritonUnavailable, match=r"pip install 'osrt-fast\[triton\]'"):
        slot_attention_step(torch.randn(1, 2, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8))


def test_bad_shapes_and_dtypes_are_named():
    with pytest.raises(ValueError, match="q \\[B, K, D\\]"):
        slot_attention_step(torch.randn(1, 2, 8), torch.randn(1, 3, 9), torch.randn(1, 3, 9))
    with pytest.raises(TypeError, match="one dtype"):
        slot_attention_step(torch.randn(1, 2, 8), torch.randn(1, 3, 8).double(), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="mq \\[B, C, H\\*K\\]"):
        slot_cross_attention(torch.randn(1, 4, 6), torch.ones(6), torch.zeros(6), torch.randn(1, 6, 7),
                             torch.randn(1, 7, 6), torch.zeros(6), 2)
