"""The fast path beside the eager model: model.py's function, computed differently.

- Slot Attention's step runs as one kernel (kernels/slot_attention.py).
- The Slot Mixer decoder runs on per-scene folded matrices (docs/PERFORMANCE.md, "exact
  rewrites"): each allocation-transformer attention sub-block is one op on [C x H*K] and
  [H*K x C] matrices folded from the slots, and the mixing softmax with the render MLP's first
  layer is another on a [C x K] matrix, so no ray is projected to the slots' width and no mixed
  slot is formed (`folded_slot_mixer`).

Each of the three ops (`OPS`) is chosen on its own: "triton", the fused kernel, or "eager", the
kernel's eager twin (kernels/). With every op "eager" the folded maths runs in plain PyTorch on
any device and dtype, which is how the tests check it against model.py in fp64; the kernels are
checked against their twins separately (tests/test_kernels.py).

`set_backend(model, backend, ops)` moves a model's SlotAttention and SlotMixerDecoder modules
between their eager classes (model.py) and subclasses that add the fast path (made here, on
first use, from the eager class and a mixin below), keeping their parameters; `OSRT.set_backend`
calls it. Switch before `parallel.parallelize` (compiled regions and FSDP keep the class they
were built with).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .recompute import run_checkpointed

OPS = ("slot_attention", "cross_attention", "mix_render")
IMPLEMENTATIONS = ("triton", "eager")


def op(name: str, implementation: str):
    """The function computing op `name`: the Triton kernel or its eager twin."""
    from kernels import slot_attention, slot_mixer
    table = {("slot_attention", "triton"): slot_attention.slot_attention_step,
             ("slot_attention", "eager"): lambda *a, **k: slot_attention.slot_attention_step_eager(*a, **k)[0],
             ("cross_attention", "triton"): slot_mixer.slot_cross_attention,
             ("cross_attention", "eager"): slot_mixer.slot_cross_attention_eager,
             ("mix_render", "triton"): slot_mixer.slot_mix_render,
             ("mix_render", "eager"): slot_mixer.slot_mix_render_eager}
    return table[name, implementation]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matrix products run in here: autocast's where it is on, else t's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


# ----------------------------------------------------------------------------------------------
# Slot Attention

class FastSlotAttention:
    """Mixin for model.SlotAttention: the attention step through `ops['slot_attention']`."""

    fast_ops: dict

    def updates(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(q)
        step = op("slot_attention", self.fast_ops["slot_attention"])
        return step(q.to(dtype), k.to(dtype), v.to(dtype), scale=self.slot_dim ** -0.5, eps=self.eps)


# ----------------------------------------------------------------------------------------------
# The Slot Mixer decoder, folded

def fold_cross_attention(attn, slots: torch.Tensor, dtype: torch.dtype):
    """Per-scene matrices of a ray-to-slot cross-attention (model.Attention; heads h, slots k,
    ray features c): mq [B, C, H*K] = W_q,h^T k_h^T / sqrt(d), mv [B, H*K, C] = v_h W_o,h^T."""
    heads = attn.heads
    k, v = attn.to_kv(slots).to(dtype).chunk(2, dim=-1)                   # [B, K, H*d]
    batch, num_slots, inner = k.shape
    d = inner // heads
    wq = attn.to_q.weight.to(dtype).view(heads, d, -1)                     # [H, d, C]
    wo = attn.to_out[0].weight.to(dtype).view(-1, heads, d)                # [C, H, d]
    mq = torch.einsum("hdc,bkhd->bchk", wq, k.view(batch, num_slots, heads, d)) * d ** -0.5
    mv = torch.einsum("bkhd,chd->bhkc", v.view(batch, num_slots, heads, d), wo)
    return mq.reshape(batch, -1, heads * num_slots), mv.reshape(batch, heads * num_slots, -1)


def _residual(block, x):
    return block(x) + x


def scatter_slots(weights: torch.Tensor, visible: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Per-ray weights [B, R, k] of the slots `visible` [k] -> [B, R, num_slots], 0 elsewhere."""
    out = weights.new_zeros(*weights.shape[:-1], num_slots)
    out[..., visible] = weights
    return out


def folded_slot_mixer(decoder, slots: torch.Tensor, camera_pos: torch.Tensor, rays: torch.Tensor,
                      ops: dict, visible: Optional[torch.Tensor] = None):
    """model.SlotMixerDecoder's function (without the mixing block's LayerNorm), on folded
    matrices: slots [B, K, D], camera_pos and rays [B, R, 3] -> (pixels [B, R, 3],
    {'segmentation': [B, R, K]}). visible: as in `model.SlotMixerDecoder.region`.

    What autograd keeps per ray: the residual stream of C ray features (180 by default) at each
    block, the allocation MLP's input (its 3072-d hidden layer is recomputed in backward), the
    slot weights, and one activation per render layer (LeakyReLU in place; its gradient needs
    only the output's sign).
    """
    cross_attention, mix_render = op("cross_attention", ops["cross_attention"]), op("mix_render", ops["mix_render"])
    dtype = compute_dtype(slots)
    slots_c = slots.to(dtype)
    at = decoder.allocation_transformer
    queries = at.input_mlp(at.query_encoder(camera_pos, rays)).to(dtype)
    x = queries
    for attn_block, ff_block in at.transformer.layers:
        attn = attn_block.fn
        mq, mv = fold_cross_attention(attn, slots_c, dtype)
        x = cross_attention(x, attn_block.norm.weight, attn_block.norm.bias, mq, mv, attn.to_out[0].bias,
                            attn.heads, attn_block.norm.eps)
        x = run_checkpointed(_residual, True, ff_block, x)
    mix, render = decoder.mixing_block, list(decoder.render_mlp.net)
    first, slot_dim = render[0], slots.shape[-1]
    num_slots = slots.shape[1]
    if visible is not None:
        slots_c = slots_c[:, visible]
    mm = torch.einsum("ac,bka->bck", mix.to_q.weight.to(dtype), mix.to_k(slots_c).to(dtype)) * mix.scale
    g = F.linear(slots_c, first.weight[:, :slot_dim].to(dtype)).to(dtype)          # [B, K, F]
    h, weights = mix_render(x.to(dtype), queries, mm.to(dtype), g, first.weight[:, slot_dim:].to(dtype),
                            first.bias, render[1].negative_slope)
    # The render MLP after its first layer: (Linear, LeakyReLU) pairs, then Linear, Sigmoid.
    for layer, act in zip(render[2:-2:2], render[3:-2:2]):
        h = F.leaky_relu(layer(h), act.negative_slope, inplace=True)
    if visible is not None:
        weights = scatter_slots(weights, visible, num_slots)
    return torch.sigmoid(render[-2](h)), {"segmentation": weights}


class FoldedSlotMixerDecoder:
    """Mixin for model.SlotMixerDecoder: its region through `folded_slot_mixer` (the variant
    with a LayerNorm in the mixing block has no folded form and stays eager)."""

    fast_ops: dict

    def region(self, slot_latents, camera_pos, rays, visible=None):
        if self.mixing_block.layer_norm:
            return super().region(slot_latents, camera_pos, rays, visible)
        return folded_slot_mixer(self, slot_latents, camera_pos, rays, self.fast_ops, visible)


# ----------------------------------------------------------------------------------------------
# Switching

MIXINS = {"SlotAttention": FastSlotAttention, "SlotMixerDecoder": FoldedSlotMixerDecoder}
_fast_classes: dict = {}


def _eager_class(cls: type) -> Optional[type]:
    """The model.py class among cls's bases that has a fast variant, or None."""
    return next((c for c in cls.__mro__ if c.__name__ in MIXINS and c.__module__ == "osrt_fast.model"), None)


def _fast_class(eager: type) -> type:
    if eager not in _fast_classes:
        mixin = MIXINS[eager.__name__]
        _fast_classes[eager] = type(f"Fast{eager.__name__}", (mixin, eager), {"__module__": __name__})
    return _fast_classes[eager]


def set_backend(model: torch.nn.Module, backend: str, ops: Optional[dict] = None) -> None:
    """Every module of `model` with a fast path runs `backend`: 'eager' (model.py) or 'triton'
    (this module, each op as `ops` says: default all 'triton'; {'mix_render': 'eager'} runs that
    op through its twin)."""
    chosen = dict.fromkeys(OPS, "triton")
    for name, implementation in (ops or {}).items():
        if name not in OPS or implementation not in IMPLEMENTATIONS:
            raise ValueError(f"ops: {name!r}: {implementation!r}; expected ops {OPS} with values "
                             f"{IMPLEMENTATIONS}")
        chosen[name] = implementation
    for module in model.modules():
        eager = _eager_class(type(module))
        if eager is None:
            continue
        module.__class__ = eager if backend == "eager" else _fast_class(eager)
        if backend != "eager":
            module.fast_ops = chosen


def backend_of(module: torch.nn.Module) -> str:
    """'triton' for a module switched to its fast path, else 'eager'."""
    return "triton" if isinstance(module, (FastSlotAttention, FoldedSlotMixerDecoder)) else "eager"
