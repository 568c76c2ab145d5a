"""Triton kernels, each with its eager twin: the ops OSRT's fast path is made of.

Kernels know nothing of OSRT modules: they take tensors and return tensors. `op(name,
implementation)` gives an op as the Triton kernel or as its twin (plain PyTorch, any device and
dtype): the modules with a fast path (model.SlotAttention, model.SlotMixerDecoder) call their
ops through it, so each op can run either way on its own.
"""
from __future__ import annotations

OPS = ("slot_attention", "cross_attention", "mix_render")
IMPLEMENTATIONS = ("triton", "eager")


def op(name: str, implementation: str):
    """The function computing op `name` (one of OPS): the Triton kernel ('triton') or its eager
    twin ('eager'), with the kernel's signature and outputs."""
    from . import slot_attention, slot_mixer
    table = {("slot_attention", "triton"): slot_attention.slot_attention_step,
             ("slot_attention", "eager"): lambda *a, **k: slot_attention.slot_attention_step_eager(*a, **k)[0],
             ("cross_attention", "triton"): slot_mixer.slot_cross_attention,
             ("cross_attention", "eager"): slot_mixer.slot_cross_attention_eager,
             ("mix_render", "triton"): slot_mixer.slot_mix_render,
             ("mix_render", "eager"): slot_mixer.slot_mix_render_eager}
    if (name, implementation) not in table:
        raise ValueError(f"op {name!r} as {implementation!r}: expected an op of {OPS} as one of "
                         f"{IMPLEMENTATIONS}")
    return table[name, implementation]
