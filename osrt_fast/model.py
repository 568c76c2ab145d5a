"""OSRT, eager: the definition every fast path is measured against.

Module attribute names reproduce the reference's state-dict keys (stelzner/osrt), so its
checkpoints load as they are; `Identity` stands where the reference has a zero-rate Dropout,
keeping the indices of `nn.Sequential` keys.

Shapes: B scenes, V input views of H x W pixels, R query rays, K slots, N set-latent tokens.

The model owns its structure: callers use `OSRT`'s methods (`regions`, `set_checkpointing`,
`fsdp_units`, `srt_encoder`, `slot_attention`, `set_backend`), never its children's attributes.
Two modules have a fast path beside their eager maths (`FastPath`): SlotAttention's step and the
Slot Mixer decoder on folded matrices (docs/flop_model.md, "exact rewrites"). Each runs its
eager maths, the definition, unless `OSRT.set_backend('triton')` switched it; its ops then run
through the Triton kernels or their eager twins (kernels/), op by op.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import IMPLEMENTATIONS, OPS, op as kernel_op
from .kernels.slot_attention import slot_attention_step_eager

from .config import (BACKENDS, CONV_INITS, ENCODER_ATTENTION, NUM_OCTAVES, CheckpointingConfig,
                     ConfigError, ModelConfig, OSRTEncoderConfig, RayEncodingConfig, SlotMixerConfig,
                     SpatialBroadcastConfig, SRTDecoderConfig, SRTEncoderConfig, build,
                     model_config_from_any)
from .recompute import run_checkpointed

QUERY_DIM = 4 * 3 * NUM_OCTAVES      # 180: sin and cos of 3 coordinates, for position and direction


# --------------------------------------------------------------------------------------------
# Regions: the units of activation checkpointing and torch.compile (`OSRT.regions`, parallel.py)

class Region(nn.Module):
    """A module whose work is its `region` method; `forward` runs it, checkpointed when
    `checkpointed` is set (run_checkpointed). `parallelize` may replace `region` on the
    instance by a compiled version; the state dict is unaffected by either."""

    checkpointed = False

    def forward(self, *args, **kwargs):
        return run_checkpointed(self.region, self.checkpointed, *args, **kwargs)


class FastPath:
    """A module with a fast path beside its eager maths (mixed into SlotAttention and
    SlotMixerDecoder). `backend` 'eager' (the default) runs the eager maths, the definition;
    'triton' or 'folded' the fast path, whose ops (`fast_ops`, names of kernels.OPS) each run as
    `ops` says: the Triton kernel ('triton') or its eager twin ('eager'; under 'folded', every
    op). Set by `OSRT.set_backend`."""

    fast_ops: tuple = ()
    backend = "eager"
    ops: Optional[dict] = None

    def check_backend(self, backend: str) -> None:
        """A ConfigError where this module cannot run `backend` (nothing by default)."""

    def set_backend(self, backend: str, ops: dict) -> None:
        self.check_backend(backend)
        self.backend = backend
        self.ops = {name: ops[name] for name in self.fast_ops} if backend != "eager" else None

    def kernel(self, name: str):
        """Fast op `name` as this module's `ops` choose it."""
        return kernel_op(name, self.ops[name])


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matrix products run in: autocast's where it is on, else t's."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def scatter_slots(weights: torch.Tensor, visible: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Per-ray weights [B, R, k] of the slots `visible` [k] -> [B, R, num_slots], 0 elsewhere."""
    out = weights.new_zeros(*weights.shape[:-1], num_slots)
    out[..., visible] = weights
    return out


# --------------------------------------------------------------------------------------------
# Initialisation (OSRT appendix / the reference's Linear subclasses)

def init_attention_linear(layer: nn.Linear) -> None:
    """Truncated normal, std sqrt(1/fan_in), cut at 2 std; zero bias (JAX's default)."""
    std = math.sqrt(1.0 / layer.weight.shape[1])
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_vit_linear(layer: nn.Linear) -> None:
    """Xavier uniform, bias N(0, 1e-6) (ViT's MLP layers)."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.normal_(layer.bias, std=1e-6)


def init_decoder_linear(layer: nn.Linear) -> None:
    """Xavier uniform, zero bias (SRT's decoder layers)."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def linear(in_dim: int, out_dim: int, init, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    layer.paper_init = init          # applied by OSRT.reset_parameters unless use_default_init
    return layer


# --------------------------------------------------------------------------------------------
# Ray encoding

def sinusoidal_encoding(x: torch.Tensor, start_octave: float, num_octaves: int = NUM_OCTAVES):
    """[..., D] -> [..., 2 * D * num_octaves]: all sines, then all cosines, coordinate-major."""
    octaves = torch.arange(start_octave, start_octave + num_octaves, dtype=x.dtype, device=x.device)
    scaled = (x.unsqueeze(-1) * (2.0 ** octaves * math.pi)).flatten(-2)
    return torch.cat((torch.sin(scaled), torch.cos(scaled)), -1)


def write_sinusoids(out: torch.Tensor, x: torch.Tensor, start_octave: float, num_octaves: int):
    """sinusoidal_encoding(x, ...) written into `out` [..., 2 * D * num_octaves] (x [..., D]
    broadcasts over out's leading dims): the same values, with no concatenated temporaries."""
    octaves = torch.arange(start_octave, start_octave + num_octaves, dtype=x.dtype, device=x.device)
    scaled = (x.unsqueeze(-1) * (2.0 ** octaves * math.pi)).flatten(-2)
    k = scaled.shape[-1]
    out[..., :k].copy_(torch.sin(scaled))
    out[..., k:].copy_(torch.cos(scaled))


def ray_encoding(camera_pos: torch.Tensor, rays: torch.Tensor, pos_start_octave: float = 0.0,
                 pos_octaves: int = NUM_OCTAVES, ray_start_octave: float = 0.0,
                 ray_octaves: int = NUM_OCTAVES):
    """The query features of rays: encoding of the camera position, then of the direction.

    camera_pos [..., 3] and rays [..., 3] -> [..., 6 * (pos_octaves + ray_octaves)]; with the
    defaults (the reference's) 180 features, direction octaves 0-14.
    """
    pos = sinusoidal_encoding(camera_pos, pos_start_octave, pos_octaves)
    direction = sinusoidal_encoding(rays, ray_start_octave, ray_octaves)
    return torch.cat((pos.expand(*direction.shape[:-1], pos.shape[-1]), direction), -1)


class RayEncoder(nn.Module):
    """Holds the encoding's settings (a config.RayEncodingConfig); no parameters (as the
    reference, nothing in the state dict).

    The reference encodes the camera position (15 octaves from `pos_start_octave`) and the ray
    direction (15 octaves from 0). Options, each defaulting to the reference:
    - `ray_param` 'plucker': encode the ray's moment, camera position x direction, in place of
      the camera position: with the direction, the Pluecker coordinates of the ray's line
      (Sitzmann et al. 2021, "Light field networks"; the ray maps of large reconstruction
      models). It is the same for every point of the line, and a point p lies on the line
      exactly when p x direction = moment: given p, a linear relation in what is encoded, where
      the camera position leaves the whole of each ray's geometry to be learned.
    - `pos_octaves`, `ray_start_octave`, `ray_octaves`: the bands, and so the feature count
      `dim`. Octaves far above the image's resolution alias (at 32x32 pixels, octave 5 and up
      of the direction change by more than a radian from one pixel to the next): a per-pixel
      hash a small model memorises its training scenes by.
    """

    def __init__(self, cfg: Optional[RayEncodingConfig] = None):
        super().__init__()
        self.cfg = cfg = cfg or RayEncodingConfig()
        self.dim = cfg.dim

    def encode(self, camera_pos: torch.Tensor, rays: torch.Tensor,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`ray_encoding` of the rays [..., 3] from camera_pos (broadcast to them), written into
        `out` [..., dim] (a new tensor by default; a slice of a larger one, e.g. the encoder's
        stem input, saves a copy): the same values, without ray_encoding's concatenations."""
        cfg = self.cfg
        if cfg.ray_param == "plucker":
            camera_pos = torch.linalg.cross(camera_pos.expand(rays.shape), rays)
        if out is None:
            out = rays.new_empty(*rays.shape[:-1], self.dim)
        split = 6 * cfg.pos_octaves
        write_sinusoids(out[..., :split], camera_pos, cfg.pos_start_octave, cfg.pos_octaves)
        write_sinusoids(out[..., split:], rays, cfg.ray_start_octave, cfg.ray_octaves)
        return out

    def forward(self, camera_pos: torch.Tensor, rays: torch.Tensor) -> torch.Tensor:
        """camera_pos [B, 3], rays [B, H, W, 3] -> [B, dim, H, W]; or [B, R, 3] each -> [B, R, dim]."""
        if rays.dim() == 4:
            return self.encode(camera_pos[:, None, None, :], rays).permute(0, 3, 1, 2)
        return self.encode(camera_pos, rays)


# --------------------------------------------------------------------------------------------
# Transformer (pre-LayerNorm, ViT style)

class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(linear(dim, hidden_dim, init_vit_linear), nn.GELU(), nn.Identity(),
                                 linear(hidden_dim, dim, init_vit_linear))

    def forward(self, x):
        return self.net(x)


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa"):
    """Softmax attention, q [B, Nq, H, d], k and v [B, Nk, H, d] -> [B, Nq, H, d].

    'sdpa': PyTorch's scaled_dot_product_attention (flash / memory-efficient / math, by device).
    'xformers': xformers' memory-efficient attention (CUDA; the optional [xformers] extra).
    Both scale the logits by d ** -0.5.
    """
    if backend == "xformers":
        return xformers_attention()(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def xformers_attention():
    """xformers.ops.memory_efficient_attention, or a ConfigError that says how to get it."""
    try:
        from xformers.ops import memory_efficient_attention
    except ImportError as e:
        raise ConfigError("model.encoder_attention 'xformers' needs the xformers package "
                          "(pip install 'osrt-fast[xformers]', CUDA only); or use "
                          f"encoder_attention: sdpa ({e})") from None
    return memory_efficient_attention


class Attention(nn.Module):
    """Multi-head self-attention (`to_qkv`) or cross-attention (`to_q`, `to_kv`).

    `attention_backend` ('sdpa' | 'xformers') picks the attention kernel; see multihead_attention.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, selfatt: bool = True,
                 kv_dim: Optional[int] = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.attention_backend = "sdpa"
        if selfatt:
            self.to_qkv = linear(dim, 3 * inner, init_attention_linear, bias=False)
        else:
            self.to_q = linear(dim, inner, init_attention_linear, bias=False)
            self.to_kv = linear(kv_dim, 2 * inner, init_attention_linear, bias=False)
        self.to_out = nn.Sequential(linear(inner, dim, init_attention_linear), nn.Identity())

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, N, dim] attends to itself, or to z [B, M, kv_dim] when given."""
        if z is None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            q = self.to_q(x)
            k, v = self.to_kv(z).chunk(2, dim=-1)
        split = lambda t: t.unflatten(-1, (self.heads, -1))  # noqa: E731
        out = multihead_attention(split(q), split(k), split(v), self.attention_backend)
        return self.to_out(out.flatten(2))

    def folded(self, z: torch.Tensor, dtype: torch.dtype):
        """This cross-attention as per-scene matrices of the keys and values z [B, K, kv_dim]
        (heads h, ray features c): mq [B, C, H*K] = W_q,h^T k_h^T / sqrt(d) and mv [B, H*K, C] =
        v_h W_o,h^T, so that attention from rays x is softmax_h(x mq) mv + b_o
        (kernels.slot_mixer.slot_cross_attention)."""
        heads = self.heads
        k, v = self.to_kv(z).to(dtype).chunk(2, dim=-1)                       # [B, K, H*d]
        batch, num_keys, inner = k.shape
        d = inner // heads
        wq = self.to_q.weight.to(dtype).view(heads, d, -1)                     # [H, d, C]
        wo = self.to_out[0].weight.to(dtype).view(-1, heads, d)                # [C, H, d]
        mq = torch.einsum("hdc,bkhd->bchk", wq, k.view(batch, num_keys, heads, d)) * d ** -0.5
        mv = torch.einsum("bkhd,chd->bhkc", v.view(batch, num_keys, heads, d), wo)
        return mq.reshape(batch, -1, heads * num_keys), mv.reshape(batch, heads * num_keys, -1)


class TransformerBlock(Region, nn.ModuleList):
    """[attention, feed-forward] with residuals; a list, so its state-dict keys are the
    reference's (`layers.<i>.0...`, `layers.<i>.1...`)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, selfatt: bool = True,
                 kv_dim: Optional[int] = None):
        super().__init__([PreNorm(dim, Attention(dim, heads, dim_head, selfatt=selfatt, kv_dim=kv_dim)),
                          PreNorm(dim, FeedForward(dim, mlp_dim))])

    def region(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        attn, ff = self
        x = attn(x, z=z) + x
        return ff(x) + x


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int,
                 selfatt: bool = True, kv_dim: Optional[int] = None):
        super().__init__()
        self.layers = nn.ModuleList([TransformerBlock(dim, heads, dim_head, mlp_dim, selfatt, kv_dim)
                                     for _ in range(depth)])

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.layers:
            x = block(x, z) if z is not None else block(x)
        return x


# --------------------------------------------------------------------------------------------
# Encoders

class SRTConvBlock(nn.Module):
    """3x3 conv, ReLU, 3x3 conv with stride 2, ReLU; no biases."""

    def __init__(self, idim: int, hdim: int, odim: int):
        super().__init__()
        conv = dict(kernel_size=3, padding=1, bias=False)
        self.layers = nn.Sequential(nn.Conv2d(idim, hdim, stride=1, **conv), nn.ReLU(),
                                    nn.Conv2d(hdim, odim, stride=2, **conv), nn.ReLU())

    def forward(self, x):
        return self.layers(x)


def init_conv_stem(blocks: nn.Module, kind: str) -> None:
    """'default': PyTorch's (the reference's); 'he': He-normal (fan-in, ReLU gain; He et al. 2015).

    PyTorch's default conv init scales each ReLU conv's output by about 1/sqrt(6), so after the
    six convs of three blocks the patch tokens are ~1e-3 of the per-patch linear's bias: every
    token alike and the image nearly invisible to the decoder at the start of training. He init
    keeps the signal's scale through the stem.
    """
    if kind not in CONV_INITS:
        raise ConfigError(f"conv_init must be one of {', '.join(CONV_INITS)}, got {kind!r}")
    if kind == "he":
        for module in blocks.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")


class ImprovedSRTEncoder(nn.Module):
    """SRT encoder with OSRT's improvements (appendix A.4): images + rays -> set-latents.

    Defaults (config.SRTEncoderConfig) are the paper's; widths are configurable for small
    experiments.
    """

    def __init__(self, cfg: Optional[SRTEncoderConfig] = None):
        super().__init__()
        cfg = cfg or SRTEncoderConfig()
        self.ray_encoder = RayEncoder(cfg.rays)
        self.downsample = 2 ** cfg.num_conv_blocks
        width = 2 * cfg.conv_dim
        blocks = [SRTConvBlock(3 + self.ray_encoder.dim, cfg.conv_dim, width)]
        for _ in range(1, cfg.num_conv_blocks):
            blocks.append(SRTConvBlock(width, width, 2 * width))
            width *= 2
        self.conv_blocks = nn.Sequential(*blocks)
        self.per_patch_linear = nn.Conv2d(width, cfg.latent_dim, kernel_size=1)
        self.transformer = Transformer(cfg.latent_dim, cfg.num_att_blocks, cfg.num_heads,
                                       cfg.head_dim, cfg.mlp_dim)
        self.latent_dim = cfg.latent_dim
        self.stem_checkpointed = False
        # Images enter as (x - image_mean) / image_std (the reference: [0, 1] as they are). Beside
        # 180 ray-encoding channels of unit scale, raw pixels are a small part of the stem's input.
        self.image_mean, self.image_std = float(cfg.image_mean), float(cfg.image_std)
        init_conv_stem(self.conv_blocks, cfg.conv_init)

    def forward(self, images: torch.Tensor, camera_pos: torch.Tensor, rays: torch.Tensor):
        """images [B, V, 3, H, W], camera_pos [B, V, 3], rays [B, V, H, W, 3] -> [B, V*h*w, latent]."""
        check_encoder_inputs(images, camera_pos, rays, self.downsample)
        return self.transformer(self.stem(images, camera_pos, rays))

    def stem_region(self, images: torch.Tensor, camera_pos: torch.Tensor, rays: torch.Tensor):
        """Ray encoding, the conv blocks and the per-patch linear: -> tokens [B, V*h*w, latent]."""
        batch, views, _, height, width = images.shape
        if self.image_mean != 0.0 or self.image_std != 1.0:
            images = (images - self.image_mean) / self.image_std
        # The conv blocks' input, channels last (the ray encoding's own layout, written in place:
        # no concatenation): the image's 3 channels, then the encoding of each pixel's ray.
        x = images.new_empty(batch * views, height, width, 3 + self.ray_encoder.dim)
        # (The images transposed first: a copy from a permuted view into a strided slice is slow.)
        x[..., :3].copy_(images.flatten(0, 1).permute(0, 2, 3, 1).contiguous())
        self.ray_encoder.encode(camera_pos.flatten(0, 1)[:, None, None, :], rays.flatten(0, 1),
                                out=x[..., 3:])
        x = self.per_patch_linear(self.conv_blocks(x.permute(0, 3, 1, 2)))    # [B*V, latent, h, w]
        return x.permute(0, 2, 3, 1).reshape(batch, -1, x.shape[1])

    def stem(self, images, camera_pos, rays):
        """The stem region, checkpointed when `stem_checkpointed`."""
        return run_checkpointed(self.stem_region, self.stem_checkpointed, images, camera_pos, rays)


def check_encoder_inputs(images, camera_pos, rays, multiple: int) -> None:
    if images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"images must be [B, V, 3, H, W], got {tuple(images.shape)}")
    b, v, _, h, w = images.shape
    if h % multiple or w % multiple:
        raise ValueError(
            f"input images are {h}x{w} pixels, but the encoder's {int(math.log2(multiple))} "
            f"stride-2 conv blocks need height and width divisible by {multiple}; resize or crop "
            f"the images (e.g. to {h - h % multiple or multiple}x{w - w % multiple or multiple}) "
            "or change data.kwargs.downsample")
    if tuple(camera_pos.shape) != (b, v, 3):
        raise ValueError(f"camera_pos must be [B, V, 3] = {(b, v, 3)}, got {tuple(camera_pos.shape)}")
    if tuple(rays.shape) != (b, v, h, w, 3):
        raise ValueError(f"rays must be [B, V, H, W, 3] = {(b, v, h, w, 3)}, got {tuple(rays.shape)}")


class SlotAttention(Region, FastPath):
    """Slot Attention (Locatello et al.) with learned initial slots, as in OSRT.

    Softmax over the slots, + eps, renormalised over the inputs; GRU update; residual MLP. Its
    fast path runs the attention step as one kernel (op 'slot_attention').
    """

    fast_ops = ("slot_attention",)

    def __init__(self, num_slots: int, input_dim: int = 768, slot_dim: int = 1536,
                 hidden_dim: int = 3072, iters: int = 1, eps: float = 1e-8):
        super().__init__()
        self.num_slots, self.slot_dim, self.iters, self.eps = num_slots, slot_dim, iters, eps
        self.initial_slots = nn.Parameter(torch.randn(num_slots, slot_dim))
        self.to_q = linear(slot_dim, slot_dim, init_attention_linear, bias=False)
        self.to_k = linear(input_dim, slot_dim, init_attention_linear, bias=False)
        self.to_v = linear(input_dim, slot_dim, init_attention_linear, bias=False)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp = nn.Sequential(linear(slot_dim, hidden_dim, init_attention_linear), nn.ReLU(),
                                 linear(hidden_dim, slot_dim, init_attention_linear))
        self.norm_input = nn.LayerNorm(input_dim)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.norm_pre_mlp = nn.LayerNorm(slot_dim)

    def updates(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, K, D], k and v [B, N, D] -> the attention step's updates [B, K, D]: logits
        q k^T / sqrt(D), softmax over the slots, + eps, renormalised over the inputs, times v
        (kernels/slot_attention.py's eager twin, the definition its kernel is tested against).
        The fast path runs it in autocast's dtype, as the kernel computes."""
        scale = self.slot_dim ** -0.5
        if self.backend == "eager":
            return slot_attention_step_eager(q, k, v, scale=scale, eps=self.eps)[0]
        dtype = compute_dtype(q)
        return self.kernel("slot_attention")(q.to(dtype), k.to(dtype), v.to(dtype), scale=scale,
                                             eps=self.eps)

    def region(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [B, N, input_dim] -> slots [B, K, slot_dim]."""
        batch = inputs.shape[0]
        inputs = self.norm_input(inputs)
        k, v = self.to_k(inputs), self.to_v(inputs)
        slots = self.initial_slots.unsqueeze(0).expand(batch, -1, -1)
        for _ in range(self.iters):
            updates = self.updates(self.to_q(self.norm_slots(slots)), k, v)
            slots = self.gru(updates.flatten(0, 1), slots.flatten(0, 1)).view_as(updates)
            slots = slots + self.mlp(self.norm_pre_mlp(slots))
        return slots


class OSRTEncoder(nn.Module):
    """Improved SRT encoder followed by Slot Attention: images -> slots [B, K, slot_dim]."""

    def __init__(self, cfg: Optional[OSRTEncoderConfig] = None):
        super().__init__()
        cfg = cfg or OSRTEncoderConfig()
        self.srt_encoder = ImprovedSRTEncoder(cfg)
        self.slot_attention = SlotAttention(cfg.num_slots, input_dim=cfg.latent_dim,
                                            slot_dim=cfg.slot_dim,
                                            hidden_dim=cfg.slot_mlp_dim or 2 * cfg.slot_dim,
                                            iters=cfg.slot_iters)

    def forward(self, images, camera_pos, rays):
        """images [B, V, 3, H, W], camera_pos [B, V, 3], rays [B, V, H, W, 3] -> [B, K, slot_dim]."""
        return self.slot_attention(self.srt_encoder(images, camera_pos, rays))


# --------------------------------------------------------------------------------------------
# Decoders

class RayPredictor(nn.Module):
    """Query MLP over the ray encoding, then cross-attention blocks to the latents.

    Called `allocation_transformer` in the decoders. Heads are z/12 wide, the MLP 2z.
    """

    def __init__(self, num_att_blocks: int = 2, z_dim: int = 1536, num_heads: int = 12,
                 rays: Optional[RayEncodingConfig] = None):
        super().__init__()
        self.query_encoder = RayEncoder(rays)
        c = self.query_dim = self.query_encoder.dim
        self.input_mlp = nn.Sequential(linear(c, 2 * c, init_decoder_linear), nn.ReLU(),
                                       linear(2 * c, c, init_decoder_linear))
        self.transformer = Transformer(c, num_att_blocks, num_heads, z_dim // num_heads,
                                       2 * z_dim, selfatt=False, kv_dim=z_dim)

    def forward(self, z, camera_pos, rays):
        """z [B, N, z_dim], camera_pos and rays [B, R, 3] -> (features [B, R, C], queries [B, R, C]),
        C = query_dim (180 with the reference's octaves)."""
        queries = self.input_mlp(self.query_encoder(camera_pos, rays))
        return self.transformer(queries, z), queries


class MixingBlock(nn.Module):
    """Per ray, softmax weights over the slots (the segmentation) and the weighted slot mean."""

    def __init__(self, input_dim: int = QUERY_DIM, slot_dim: int = 1536, att_dim: int = 1536,
                 layer_norm: bool = False):
        super().__init__()
        self.to_q = linear(input_dim, att_dim, init_decoder_linear, bias=False)
        self.to_k = linear(slot_dim, att_dim, init_decoder_linear, bias=False)
        self.layer_norm = layer_norm
        if layer_norm:
            self.norm1 = nn.LayerNorm(input_dim)
            self.norm2 = nn.LayerNorm(slot_dim)
        self.scale = att_dim ** -0.5

    def forward(self, x, slots):
        """x [B, R, input_dim], slots [B, K, slot_dim] -> (mixed [B, R, slot_dim], weights [B, R, K])."""
        if self.layer_norm:
            x = self.norm1(x)
        logits = torch.bmm(self.to_q(x), self.to_k(slots).transpose(1, 2)) * self.scale
        weights = logits.softmax(dim=-1)
        mixed = torch.bmm(weights, slots)        # never a [B, R, K, D] broadcast
        if self.layer_norm:
            mixed = self.norm2(mixed)
        return mixed, weights


def render_mlp_layers(input_dim: int, hidden_dim: int, out_dim: int, num_hidden: int = 4):
    """Linear, LeakyReLU(0.01) pairs, then a Linear to out_dim (indices 0, 2, ... as the reference)."""
    layers, width = [], input_dim
    for _ in range(num_hidden):
        layers += [linear(width, hidden_dim, init_decoder_linear), nn.LeakyReLU()]
        width = hidden_dim
    layers.append(linear(width, out_dim, init_decoder_linear))
    return layers


class RenderMLP(nn.Module):
    def __init__(self, input_dim: int = 1536 + QUERY_DIM, hidden_dim: int = 1536):
        super().__init__()
        self.net = nn.Sequential(*render_mlp_layers(input_dim, hidden_dim, 3), nn.Sigmoid())

    def forward(self, x):
        return self.net(x)


class RayDecoder(nn.Module):
    """A decoder of rays: `forward(latents, camera_pos [B, R, 3], rays [B, R, 3])` runs `region`.

    With `ray_chunk` > 0 and autograd recording, the rays are decoded in chunks of `ray_chunk`
    rays per scene, each under activation checkpointing: only a chunk's inputs and outputs are
    kept, and backward recomputes one chunk at a time. `max_rays` (any mode) bounds the rays
    decoded at once, in all scenes together, to bound memory when rendering whole images.
    """

    ray_chunk = 0

    def forward(self, latents, camera_pos, rays, max_rays: Optional[int] = None,
                visible: Optional[torch.Tensor] = None, **kwargs):
        """`visible` (slot decoders only): indices [k] of the slots the pixels are mixed from
        (see `SlotMixerDecoder.region`); None, all of them."""
        region = self.region if visible is None else functools.partial(self.region, visible=visible)
        num_rays = rays.shape[1]
        step, checkpointed = num_rays, False
        if self.ray_chunk and torch.is_grad_enabled():
            step, checkpointed = self.ray_chunk, True
        if max_rays:
            step = min(step, max(1, max_rays // rays.shape[0]))
        if step >= num_rays:
            return run_checkpointed(region, checkpointed, latents, camera_pos, rays)
        pixels, extras = [], defaultdict(list)
        for i in range(0, num_rays, step):
            p, e = run_checkpointed(region, checkpointed, latents, camera_pos[:, i:i + step],
                                    rays[:, i:i + step])
            pixels.append(p)
            for k, v in e.items():
                extras[k].append(v)
        return torch.cat(pixels, 1), {k: torch.cat(v, 1) for k, v in extras.items()}


class SlotMixerDecoder(RayDecoder, FastPath):
    """OSRT's Slot Mixer decoder: slots + query rays -> pixels and per-ray slot weights.

    Its fast path (`folded_region`) computes the same function on per-scene folded matrices:
    each allocation-transformer attention block is one op on [C x H*K] and [H*K x C] matrices
    folded from the slots ('cross_attention'), and the mixing softmax with the render MLP's first
    layer another on a [C x K] matrix ('mix_render'), so no ray is projected to the slots' width
    and no mixed slot is formed.
    """

    fast_ops = ("cross_attention", "mix_render")

    def __init__(self, cfg: Optional[SlotMixerConfig] = None):
        super().__init__()
        cfg = cfg or SlotMixerConfig()
        self.allocation_transformer = RayPredictor(cfg.num_att_blocks, z_dim=cfg.slot_dim,
                                                   num_heads=cfg.num_heads, rays=cfg.rays)
        c = self.allocation_transformer.query_dim
        self.mixing_block = MixingBlock(input_dim=c, slot_dim=cfg.slot_dim,
                                        att_dim=cfg.att_dim or cfg.slot_dim, layer_norm=cfg.layer_norm)
        self.render_mlp = RenderMLP(cfg.slot_dim + c, cfg.render_hidden_dim or cfg.slot_dim)

    def check_backend(self, backend: str) -> None:
        if backend != "eager" and self.mixing_block.layer_norm:
            raise ConfigError(f"model.backend {backend!r}: the Slot Mixer's fast path has no folded "
                              f"form for a mixing block with LayerNorms (model.decoder_kwargs."
                              f"layer_norm: true); use model.backend: eager, or layer_norm: false")

    def region(self, slot_latents, camera_pos, rays, visible: Optional[torch.Tensor] = None):
        """slots [B, K, D], camera_pos and rays [B, R, 3] -> (pixels [B, R, 3], {'segmentation': [B, R, K]}).

        visible: indices [k] of slots; the Slot Mixer then mixes each ray's pixel from those
        slots alone (the others' weights are 0: object removal by slot editing), while the
        allocation transformer still attends to all. None: all slots (OSRT's decoder)."""
        if self.backend != "eager":
            return self.folded_region(slot_latents, camera_pos, rays, visible)
        x, queries = self.allocation_transformer(slot_latents, camera_pos, rays)
        if visible is None:
            mixed, weights = self.mixing_block(x, slot_latents)
        else:
            mixed, some = self.mixing_block(x, slot_latents[:, visible])
            weights = scatter_slots(some, visible, slot_latents.shape[1])
        pixels = self.render_mlp(torch.cat((mixed, queries), -1))
        return pixels, {"segmentation": weights}

    def folded_region(self, slots, camera_pos, rays, visible: Optional[torch.Tensor] = None):
        """`region`'s function (without the mixing block's LayerNorms) on folded matrices, each
        op through `self.ops`.

        What autograd keeps per ray: the residual stream of C ray features (180 by default) at
        each block, the allocation MLP's input (its 3072-d hidden layer is recomputed in
        backward), the slot weights, and one activation per render layer (LeakyReLU in place;
        its gradient needs only the output's sign).
        """
        cross_attention, mix_render = self.kernel("cross_attention"), self.kernel("mix_render")
        dtype = compute_dtype(slots)
        slots_c = slots.to(dtype)
        at = self.allocation_transformer
        queries = at.input_mlp(at.query_encoder(camera_pos, rays)).to(dtype)
        x = queries
        for attn_block, ff_block in at.transformer.layers:
            attn = attn_block.fn
            mq, mv = attn.folded(slots_c, dtype)
            x = cross_attention(x, attn_block.norm.weight, attn_block.norm.bias, mq, mv,
                                attn.to_out[0].bias, attn.heads, attn_block.norm.eps)
            # Under 'triton' (GPU memory at paper scale) the MLP's hidden layer is recomputed in
            # backward; 'folded' keeps it (on a CPU, time is what is short).
            x = run_checkpointed(_residual, self.backend == "triton", ff_block, x)
        mix, render = self.mixing_block, list(self.render_mlp.net)
        first, slot_dim, num_slots = render[0], slots.shape[-1], slots.shape[1]
        if visible is not None:
            slots_c = slots_c[:, visible]
        mm = torch.einsum("ac,bka->bck", mix.to_q.weight.to(dtype), mix.to_k(slots_c).to(dtype)) * mix.scale
        g = F.linear(slots_c, first.weight[:, :slot_dim].to(dtype)).to(dtype)          # [B, K, F]
        h, weights = mix_render(x.to(dtype), queries, mm.to(dtype), g,
                                first.weight[:, slot_dim:].to(dtype), first.bias,
                                render[1].negative_slope)
        # The render MLP after its first layer: (Linear, LeakyReLU) pairs, then Linear, Sigmoid.
        for layer, act in zip(render[2:-2:2], render[3:-2:2]):
            h = F.leaky_relu(layer(h), act.negative_slope, inplace=True)
        if visible is not None:
            weights = scatter_slots(weights, visible, num_slots)
        return torch.sigmoid(render[-2](h)), {"segmentation": weights}


def _residual(block, x):
    return block(x) + x


class ImprovedSRTDecoder(RayDecoder):
    """The improved SRT decoder: allocation transformer over set-latents, then the render MLP."""

    def __init__(self, cfg: Optional[SRTDecoderConfig] = None):
        super().__init__()
        cfg = cfg or SRTDecoderConfig()
        self.allocation_transformer = RayPredictor(cfg.num_att_blocks, z_dim=cfg.latent_dim,
                                                   num_heads=cfg.num_heads, rays=cfg.rays)
        self.render_mlp = RenderMLP(self.allocation_transformer.query_dim, cfg.render_hidden_dim)

    def region(self, set_latents, camera_pos, rays):
        """set_latents [B, N, latent], camera_pos and rays [B, R, 3] -> (pixels [B, R, 3], {})."""
        x, _ = self.allocation_transformer(set_latents, camera_pos, rays)
        return self.render_mlp(x), {}


class SpatialBroadcastDecoder(RayDecoder):
    """Each slot decoded independently per ray to a logit and a colour; softmax over slots mixes.

    Inherently [B, R, K, ...]: about 23x Slot Mixer's decoder cost at K = 32.
    """

    def __init__(self, cfg: Optional[SpatialBroadcastConfig] = None):
        super().__init__()
        cfg = cfg or SpatialBroadcastConfig()
        self.query_encoder = RayEncoder(cfg.rays)
        self.render_mlp = nn.Sequential(*render_mlp_layers(cfg.slot_dim + self.query_encoder.dim,
                                                           cfg.hidden_dim, 4))

    def region(self, slot_latents, camera_pos, rays, visible: Optional[torch.Tensor] = None):
        """slots [B, K, D], camera_pos and rays [B, R, 3] -> (pixels [B, R, 3], {'segmentation': [B, R, K]});
        `visible` as in `SlotMixerDecoder.region` (the softmax runs over those slots)."""
        if visible is not None:
            pixels, weights = self.region(slot_latents[:, visible], camera_pos, rays)
            return pixels, {"segmentation": scatter_slots(weights["segmentation"], visible,
                                                          slot_latents.shape[1])}
        queries = self.query_encoder(camera_pos, rays)
        num_rays, num_slots = queries.shape[1], slot_latents.shape[1]
        x = torch.cat((queries.unsqueeze(2).expand(-1, -1, num_slots, -1),
                       slot_latents.unsqueeze(1).expand(-1, num_rays, -1, -1)), -1)
        out = self.render_mlp(x)
        weights = out[..., 0].softmax(dim=2)
        pixels = (torch.sigmoid(out[..., 1:]) * weights.unsqueeze(-1)).sum(2)
        return pixels, {"segmentation": weights}


# --------------------------------------------------------------------------------------------

# The modules of each config.ModelConfig part kind (config.ENCODER_CONFIGS / DECODER_CONFIGS).
ENCODERS = {"osrt": OSRTEncoder, "srt": ImprovedSRTEncoder}
DECODERS = {"slot_mixer": SlotMixerDecoder, "spatial_broadcast": SpatialBroadcastDecoder,
            "srt": ImprovedSRTDecoder}


class OSRT(nn.Module):
    """OSRT (or SRT) from the reference's `model:` config section.

    `model.encoder(images, camera_pos, rays)` and `model.decoder(latents, camera_pos, rays)` have
    the reference's signatures; `model(...)` runs both. The methods below are the model's
    structure as the rest of the package uses it (checkpointing, compile, sharding, the fast
    path, slots).
    """

    def __init__(self, cfg):
        super().__init__()
        cfg: ModelConfig = model_config_from_any(cfg)        # a checked copy: ours to change
        self.cfg = cfg
        self.encoder = ENCODERS[cfg.encoder](cfg.encoder_config())
        self.decoder = DECODERS[cfg.decoder](cfg.decoder_config())
        if not cfg.use_default_init:
            self.reset_parameters()
        self.set_backend(cfg.backend)
        self.set_encoder_attention(cfg.encoder_attention)

    # -- structure ----------------------------------------------------------------------------

    @property
    def srt_encoder(self) -> ImprovedSRTEncoder:
        """The SRT encoder (images -> set-latents): the encoder itself, or OSRT's first part."""
        return self.encoder.srt_encoder if isinstance(self.encoder, OSRTEncoder) else self.encoder

    @property
    def slot_attention(self) -> Optional[SlotAttention]:
        """The encoder's Slot Attention; None for an SRT encoder (no slots)."""
        return self.encoder.slot_attention if isinstance(self.encoder, OSRTEncoder) else None

    def regions(self) -> list:
        """(module, method name) of every region, the units torch.compile compiles (in place, on
        the instance; parallel.apply_compile): the encoder's stem, each encoder transformer
        block, Slot Attention, the decoder."""
        srt = self.srt_encoder
        out = [(srt, "stem_region")] + [(block, "region") for block in srt.transformer.layers]
        if self.slot_attention is not None:
            out.append((self.slot_attention, "region"))
        return out + [(self.decoder, "region")]

    def set_checkpointing(self, regions) -> None:
        """Which regions recompute their activations in backward instead of keeping them:
        `regions` is a config.CheckpointingConfig or a mapping of its keys."""
        regions = build(CheckpointingConfig, regions, "training.activation_checkpointing")
        srt = self.srt_encoder
        srt.stem_checkpointed = regions.encoder_blocks
        for block in srt.transformer.layers:
            block.checkpointed = regions.encoder_blocks
        if self.slot_attention is not None:
            self.slot_attention.checkpointed = regions.slot_attention
        self.decoder.ray_chunk = regions.decoder_ray_chunk    # its own blocks run inside its chunks

    def fsdp_units(self) -> list:
        """The modules FSDP2 shards separately, innermost first (the root comes last)."""
        units = list(self.srt_encoder.transformer.layers)
        if self.slot_attention is not None:
            units.append(self.slot_attention)
        return units + [self.encoder, self.decoder]

    def parameter_counts(self) -> tuple:
        """(encoder, decoder) parameter counts."""
        return (sum(p.numel() for p in self.encoder.parameters()),
                sum(p.numel() for p in self.decoder.parameters()))

    def summary(self) -> str:
        """The modules, then every parameter's name, shape and size (train.py --print-model)."""
        rows = [f"{name:80}{str(list(p.shape)):20}{p.numel():10d}" for name, p in self.named_parameters()]
        return "\n".join([str(self)] + rows)

    # -- how it computes ------------------------------------------------------------------------

    def set_backend(self, backend: str, ops: Optional[dict] = None) -> "OSRT":
        """How the modules with fast paths (`FastPath`: SlotAttention, SlotMixerDecoder; the
        others always run eager) compute: 'eager', their eager maths; 'triton', their fast
        path with each op the Triton kernel or, as `ops` chooses per op, its eager twin;
        'folded', their fast path with every op's eager twin (plain PyTorch, any device).
        Parameters and outputs stay the same. A backend that cannot apply is a ConfigError, and
        the model is left as it was."""
        if backend not in BACKENDS:
            raise ConfigError(f"model.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if ops and backend != "triton":
            raise ValueError(f"ops choose kernel or twin under backend 'triton'; {backend!r} has "
                             f"no kernels")
        chosen = dict.fromkeys(OPS, "eager" if backend == "folded" else "triton")
        for name, implementation in (ops or {}).items():
            if name not in OPS or implementation not in IMPLEMENTATIONS:
                raise ValueError(f"ops: {name!r}: {implementation!r}; expected ops {OPS} with values "
                                 f"{IMPLEMENTATIONS}")
            chosen[name] = implementation
        modules = [m for m in self.modules() if isinstance(m, FastPath)]
        if backend == "triton":
            from .kernels._triton import HAVE_TRITON, triton_missing_message
            if not HAVE_TRITON and "triton" in chosen.values():
                raise ConfigError(f"model.backend 'triton': {triton_missing_message()}")
        if backend != "eager" and not modules:
            raise ConfigError(f"model.backend {backend!r} speeds up Slot Attention and the Slot "
                              f"Mixer decoder, and this model (encoder {self.cfg.encoder!r}, "
                              f"decoder {self.cfg.decoder!r}) has neither; use backend: eager")
        for module in modules:
            module.check_backend(backend)
        for module in modules:
            module.set_backend(backend, chosen)
        self.cfg.backend = backend
        return self

    @property
    def backend(self) -> str:
        return self.cfg.backend

    def set_encoder_attention(self, kind: str) -> "OSRT":
        """'sdpa' or 'xformers' for the encoder's self-attention."""
        if kind not in ENCODER_ATTENTION:
            raise ConfigError(f"model.encoder_attention must be one of {', '.join(ENCODER_ATTENTION)}, "
                              f"got {kind!r}")
        if kind == "xformers":
            xformers_attention()
        for module in self.srt_encoder.modules():
            if isinstance(module, Attention):
                module.attention_backend = kind
        self.cfg.encoder_attention = kind
        return self

    def check_device(self, device: torch.device) -> None:
        """A ConfigError, before any work, where the configured kernels cannot run on device."""
        from .kernels._triton import interpreting
        if self.cfg.backend == "triton" and device.type != "cuda" and not interpreting():
            raise ConfigError(f"model.backend 'triton' runs on CUDA GPUs, but the device is {device}; "
                              "use backend: eager (TRITON_INTERPRET=1 runs the kernels on the CPU for "
                              "testing, very slowly)")
        if self.cfg.encoder_attention == "xformers" and device.type != "cuda":
            raise ConfigError(f"model.encoder_attention 'xformers' runs on CUDA GPUs, but the device "
                              f"is {device}; use encoder_attention: sdpa")

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's initialisation; convs, GRU and LayerNorms keep PyTorch's defaults."""
        for module in self.modules():
            init = getattr(module, "paper_init", None)
            if init is not None:
                init(module)

    def forward(self, images, camera_pos, rays, target_camera_pos, target_rays,
                max_rays: Optional[int] = None):
        """Encoder then decoder: -> (pixels [B, R, 3], extras; for slot decoders also the slots
        [B, K, D] as extras['slots']). `max_rays` bounds the rays decoded
        at once (all scenes together). Training and evaluation call the model this way, so
        that under FSDP the root module's hooks run."""
        latents = self.encoder(images, camera_pos, rays)
        pixels, extras = self.decoder(latents, target_camera_pos, target_rays, max_rays=max_rays)
        if "segmentation" in extras:
            extras = {**extras, "slots": latents}
        return pixels, extras


def model_of_config_file(model_cfg, config_path: str) -> OSRT:
    """OSRT(model_cfg) of the config file `config_path`; a ConfigError names that file, as one
    from reading the file does."""
    try:
        return OSRT(model_cfg)
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None
