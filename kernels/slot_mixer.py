"""The Slot Mixer decoder's ray-to-slot attention, fused, on per-scene folded matrices.

With only K slots as keys, a ray's attention over the slots is a product with a few per-scene
matrices (docs/flop_model.md, "exact rewrites"); the caller folds them once per scene:

- `slot_cross_attention`: one allocation-transformer attention sub-block,
      y = x + softmax_per_head(LayerNorm(x) @ mq) @ mv + out_bias
  with mq [B, C, H*K] = per head W_q,h^T k_h^T * scale and mv [B, H*K, C] = per head v_h W_o,h^T
  (C ray features: 180 with the reference's octaves, fewer with narrower bands; H heads, K slots;
  columns h*K..h*K+K-1 belong to head h).
- `slot_mix_render`: the mixing block and the render MLP's first layer,
      weights = softmax(x @ mm),  h = leaky_relu(weights @ g + q0 @ w1b^T + b1)
  with mm [B, C, K] = W_q^T k^T * scale and g [B, K, F] = slots W_1a^T (the first layer's
  weights on the mixed slot), w1b [F, C] its weights on the query features q0.

Each kernel takes a tile of rays of one scene and keeps their LayerNorm, logits, softmaxes and
slot weights on chip; nothing per ray is saved for backward beyond the op's inputs and outputs.
The backward kernels recompute what they need per tile and write the per-ray terms whose
reductions over rays are large matrix products (dmq = xn^T dl, dmv = a^T dy, dg = w^T dpre,
dw1b = dpre^T q0), which then run in cuBLAS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import (check_dtypes, check_launchable, dot_settings, launch, new_tensor, pow2_at_least,
                      tl, triton)
from .slot_attention import _dot

LEAKY_SLOPE = 0.01


# ----------------------------------------------------------------------------------------------
# Eager twins: the definitions

class ShortSoftmax(torch.autograd.Function):
    """softmax over the last dim, for a short one (a few slots): torch.softmax's CPU kernel,
    vectorised along the reduced dim, takes 3-4x longer there than these few whole-tensor ops.
    Backward: dx = y * (dy - sum(dy * y))."""

    @staticmethod
    def forward(ctx, x):
        e = (x - x.amax(-1, keepdim=True)).exp_()
        y = e.div_(e.sum(-1, keepdim=True))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return y * (dy - (dy * y).sum(-1, keepdim=True))


def short_softmax(x: torch.Tensor) -> torch.Tensor:
    """x.softmax(-1), computed as `ShortSoftmax` where the last dim is short."""
    return ShortSoftmax.apply(x) if x.shape[-1] <= 16 else x.softmax(-1)


def slot_cross_attention_eager(x, ln_weight, ln_bias, mq, mv, out_bias, num_heads: int,
                               ln_eps: float = 1e-5):
    """x [B, R, C], mq [B, C, H*K], mv [B, H*K, C], ln_weight/ln_bias/out_bias [C] -> [B, R, C]."""
    xn = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, ln_eps)
    attn = short_softmax(torch.bmm(xn, mq).unflatten(-1, (num_heads, -1))).flatten(-2)
    return x + torch.bmm(attn, mv) + out_bias


def slot_mix_render_eager(x, q0, mm, g, w1b, b1, negative_slope: float = LEAKY_SLOPE):
    """x and q0 [B, R, C], mm [B, C, K], g [B, K, F], w1b [F, C], b1 [F] ->
    (h [B, R, F], weights [B, R, K] in fp32, or fp64 for fp64 inputs)."""
    weights = short_softmax(torch.bmm(x, mm).to(torch.promote_types(x.dtype, torch.float32)))
    pre = torch.bmm(weights.to(g.dtype), g) + F.linear(q0, w1b, b1)
    return F.leaky_relu(pre, negative_slope), weights


# ----------------------------------------------------------------------------------------------
# Kernels

@triton.jit
def _layer_norm_rows(x, w, b, mask_c, C, eps):
    """(xn, xhat, rstd) of rows x [BLOCK_R, BLOCK_C] fp32; zero in padding columns."""
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask_c[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    xhat = xc * rstd[:, None]
    return xhat * w[None, :] + b[None, :], xhat, rstd


@triton.jit
def _head_softmax(logits, mask_k):
    logits = tl.where(mask_k[None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _cross_attention_fwd_kernel(
        x_ptr, lnw_ptr, lnb_ptr, mq_ptr, mv_ptr, bias_ptr, y_ptr,
        R, C, K, H, ln_eps,
        stride_xb, stride_xr, stride_mqb, stride_mqc, stride_mvb, stride_mvk, stride_yb, stride_yr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
        LOWP: tl.constexpr, PRECISION: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    DTYPE = x_ptr.dtype.element_ty
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r, mask_c, mask_k = offs_r < R, offs_c < C, offs_k < K
    mask_rc = mask_r[:, None] & mask_c[None, :]
    x_ptrs = x_ptr + pid_b * stride_xb + offs_r[:, None] * stride_xr + offs_c[None, :]
    x = tl.load(x_ptrs, mask=mask_rc, other=0.0).to(tl.float32)
    w = tl.load(lnw_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(lnb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    xn, _, _ = _layer_norm_rows(x, w, b, mask_c, C, ln_eps)
    if LOWP:     # the dot operand, once, in the input dtype (halves what stays live in the loop)
        xn = xn.to(DTYPE)
    mq_base = mq_ptr + pid_b * stride_mqb
    mv_base = mv_ptr + pid_b * stride_mvb
    mask_ck = mask_c[:, None] & mask_k[None, :]
    mask_kc = mask_k[:, None] & mask_c[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for h in range(0, H):
        cols = h * K + offs_k
        mq = tl.load(mq_base + offs_c[:, None] * stride_mqc + cols[None, :], mask=mask_ck, other=0.0)
        logits = _dot(xn, mq, tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), LOWP, PRECISION, DTYPE)
        a = _head_softmax(logits, mask_k)
        mv = tl.load(mv_base + cols[:, None] * stride_mvk + offs_c[None, :], mask=mask_kc, other=0.0)
        acc = _dot(a, mv, acc, LOWP, PRECISION, DTYPE)
    bias = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    x = tl.load(x_ptrs, mask=mask_rc, other=0.0).to(tl.float32)
    y = x + acc + bias[None, :]
    tl.store(y_ptr + pid_b * stride_yb + offs_r[:, None] * stride_yr + offs_c[None, :],
             y.to(y_ptr.dtype.element_ty), mask=mask_rc)


@triton.jit
def _cross_attention_bwd_kernel(
        x_ptr, dy_ptr, lnw_ptr, lnb_ptr, mq_ptr, mv_ptr,
        dx_ptr, xn_ptr, a_ptr, dl_ptr, dlnw_part_ptr, dlnb_part_ptr,
        R, C, K, H, HK, ln_eps, RB,
        stride_xb, stride_xr, stride_dyb, stride_dyr, stride_mqb, stride_mqc, stride_mvb, stride_mvk,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
        LOWP: tl.constexpr, PRECISION: tl.constexpr):
    """dx, and per ray xn, a, dl (for the cuBLAS reductions dmq = xn^T dl, dmv = a^T dy);
    per tile partial sums of the LayerNorm's parameter gradients."""
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    DTYPE = x_ptr.dtype.element_ty
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r, mask_c, mask_k = offs_r < R, offs_c < C, offs_k < K
    mask_rc = mask_r[:, None] & mask_c[None, :]
    mask_rk = mask_r[:, None] & mask_k[None, :]
    x = tl.load(x_ptr + pid_b * stride_xb + offs_r[:, None] * stride_xr + offs_c[None, :],
                mask=mask_rc, other=0.0).to(tl.float32)
    w = tl.load(lnw_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(lnb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    xn, _, rstd = _layer_norm_rows(x, w, b, mask_c, C, ln_eps)
    out = (pid_b * R + offs_r[:, None]) * C + offs_c[None, :]
    tl.store(xn_ptr + out, xn.to(xn_ptr.dtype.element_ty), mask=mask_rc)
    if LOWP:     # the dot operand, once, in the input dtype (halves what stays live in the loop)
        xn = xn.to(DTYPE)
    dy = tl.load(dy_ptr + pid_b * stride_dyb + offs_r[:, None] * stride_dyr + offs_c[None, :],
                 mask=mask_rc, other=0.0)
    mq_base = mq_ptr + pid_b * stride_mqb
    mv_base = mv_ptr + pid_b * stride_mvb
    mask_ck = mask_c[:, None] & mask_k[None, :]
    mask_kc = mask_k[:, None] & mask_c[None, :]
    row = (pid_b * R + offs_r) * HK
    dxn = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for h in range(0, H):
        cols = h * K + offs_k
        mq = tl.load(mq_base + offs_c[:, None] * stride_mqc + cols[None, :], mask=mask_ck, other=0.0)
        logits = _dot(xn, mq, tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), LOWP, PRECISION, DTYPE)
        a = _head_softmax(logits, mask_k)
        mv = tl.load(mv_base + cols[:, None] * stride_mvk + offs_c[None, :], mask=mask_kc, other=0.0)
        da = _dot(dy, tl.trans(mv), tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), LOWP, PRECISION, DTYPE)
        dl = a * (da - tl.sum(a * da, axis=1)[:, None])
        dl = tl.where(mask_rk, dl, 0.0)
        tl.store(a_ptr + row[:, None] + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=mask_rk)
        tl.store(dl_ptr + row[:, None] + cols[None, :], dl.to(dl_ptr.dtype.element_ty), mask=mask_rk)
        dxn = _dot(dl, tl.trans(mq), dxn, LOWP, PRECISION, DTYPE)
    # LayerNorm backward, with xhat recomputed from x rather than kept through the loop
    x = tl.load(x_ptr + pid_b * stride_xb + offs_r[:, None] * stride_xr + offs_c[None, :],
                mask=mask_rc, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xhat = tl.where(mask_c[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
    tl.store(dlnw_part_ptr + (pid_b * RB + pid_r) * C + offs_c, tl.sum(dxn * xhat, axis=0), mask=mask_c)
    tl.store(dlnb_part_ptr + (pid_b * RB + pid_r) * C + offs_c, tl.sum(dxn, axis=0), mask=mask_c)
    dxhat = dxn * w[None, :]
    dx = dy.to(tl.float32) + rstd[:, None] * (
        dxhat - (tl.sum(dxhat, axis=1) / C)[:, None] - xhat * (tl.sum(dxhat * xhat, axis=1) / C)[:, None])
    tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=mask_rc)


@triton.jit
def _mix_render_fwd_kernel(
        x_ptr, q0_ptr, mm_ptr, g_ptr, w1b_ptr, b1_ptr, h_ptr, wts_ptr,
        R, C, K, F, slope,
        stride_xb, stride_xr, stride_qb, stride_qr, stride_mmb, stride_mmc, stride_gb, stride_gk,
        stride_w1b,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
        LOWP: tl.constexpr, PRECISION: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    DTYPE = x_ptr.dtype.element_ty
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    offs_f = tl.arange(0, BLOCK_F)
    mask_r, mask_c, mask_k = offs_r < R, offs_c < C, offs_k < K
    mask_rc = mask_r[:, None] & mask_c[None, :]
    x = tl.load(x_ptr + pid_b * stride_xb + offs_r[:, None] * stride_xr + offs_c[None, :],
                mask=mask_rc, other=0.0)
    mm = tl.load(mm_ptr + pid_b * stride_mmb + offs_c[:, None] * stride_mmc + offs_k[None, :],
                 mask=mask_c[:, None] & mask_k[None, :], other=0.0)
    wts = _head_softmax(_dot(x, mm, tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32), LOWP, PRECISION, DTYPE),
                        mask_k)
    wts = tl.where(mask_k[None, :], wts, 0.0)
    tl.store(wts_ptr + (pid_b * R + offs_r[:, None]) * K + offs_k[None, :], wts,
             mask=mask_r[:, None] & mask_k[None, :])
    q0 = tl.load(q0_ptr + pid_b * stride_qb + offs_r[:, None] * stride_qr + offs_c[None, :],
                 mask=mask_rc, other=0.0)
    g_base = g_ptr + pid_b * stride_gb
    for f0 in range(0, F, BLOCK_F):
        ff = f0 + offs_f
        mf = ff < F
        g = tl.load(g_base + offs_k[:, None] * stride_gk + ff[None, :],
                    mask=mask_k[:, None] & mf[None, :], other=0.0)
        w1b = tl.load(w1b_ptr + ff[:, None] * stride_w1b + offs_c[None, :],
                      mask=mf[:, None] & mask_c[None, :], other=0.0)
        acc = _dot(wts, g, tl.zeros((BLOCK_R, BLOCK_F), dtype=tl.float32), LOWP, PRECISION, DTYPE)
        acc = _dot(q0, tl.trans(w1b), acc, LOWP, PRECISION, DTYPE)
        acc += tl.load(b1_ptr + ff, mask=mf, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(acc > 0, acc, acc * slope)
        tl.store(h_ptr + (pid_b * R + offs_r[:, None]) * F + ff[None, :], acc.to(h_ptr.dtype.element_ty),
                 mask=mask_r[:, None] & mf[None, :])


@triton.jit
def _mix_render_bwd_kernel(
        dh_ptr, h_ptr, wts_ptr, dwts_ptr, g_ptr, mm_ptr, dpre_ptr, dl_ptr, dx_ptr,
        R, C, K, F, slope,
        stride_dhb, stride_dhr, stride_gb, stride_gk, stride_mmb, stride_mmc,
        HAS_DWTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_F: tl.constexpr, LOWP: tl.constexpr, PRECISION: tl.constexpr):
    """dpre = dh * leaky_relu'(h) (h's sign is the pre-activation's), the weights' gradient
    dpre g^T accumulated on chip, the softmax backward dl, and dx = dl mm^T."""
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    DTYPE = dh_ptr.dtype.element_ty
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    offs_f = tl.arange(0, BLOCK_F)
    mask_r, mask_c, mask_k = offs_r < R, offs_c < C, offs_k < K
    mask_rk = mask_r[:, None] & mask_k[None, :]
    g_base = g_ptr + pid_b * stride_gb
    dw = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        ff = f0 + offs_f
        mf = ff < F
        mrf = mask_r[:, None] & mf[None, :]
        dh = tl.load(dh_ptr + pid_b * stride_dhb + offs_r[:, None] * stride_dhr + ff[None, :],
                     mask=mrf, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + (pid_b * R + offs_r[:, None]) * F + ff[None, :], mask=mrf, other=0.0)
        dpre = tl.where(h > 0, dh, dh * slope)
        tl.store(dpre_ptr + (pid_b * R + offs_r[:, None]) * F + ff[None, :],
                 dpre.to(dpre_ptr.dtype.element_ty), mask=mrf)
        g = tl.load(g_base + offs_k[:, None] * stride_gk + ff[None, :],
                    mask=mask_k[:, None] & mf[None, :], other=0.0)
        dw = _dot(dpre, tl.trans(g), dw, LOWP, PRECISION, DTYPE)
    wk = (pid_b * R + offs_r[:, None]) * K + offs_k[None, :]
    if HAS_DWTS:
        dw += tl.load(dwts_ptr + wk, mask=mask_rk, other=0.0).to(tl.float32)
    wts = tl.load(wts_ptr + wk, mask=mask_rk, other=0.0)
    dl = wts * (dw - tl.sum(wts * dw, axis=1)[:, None])
    tl.store(dl_ptr + wk, dl.to(dl_ptr.dtype.element_ty), mask=mask_rk)
    mm = tl.load(mm_ptr + pid_b * stride_mmb + offs_c[:, None] * stride_mmc + offs_k[None, :],
                 mask=mask_c[:, None] & mask_k[None, :], other=0.0)
    dx = _dot(dl, tl.trans(mm), tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32), LOWP, PRECISION, DTYPE)
    tl.store(dx_ptr + (pid_b * R + offs_r[:, None]) * C + offs_c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_c[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers

def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# Launch configurations per kernel and dtype class ("lowp": bf16/fp16, "fp32": 3xTF32 dots need
# about twice the registers and shared memory). Chosen from the ahead-of-time compile report
# (python -m osrt_fast.kernels.aot, sm_90, paper shapes; spills noted where no tried shape avoids them):
# shared memory within Hopper's 227 KB, with the ray feature dimension C padded to 256.
CONFIGS = {
    ("cross_fwd", "lowp"): dict(BLOCK_R=64, num_warps=8, num_stages=2),     # 241 regs, no spill
    ("cross_fwd", "fp32"): dict(BLOCK_R=16, num_warps=8, num_stages=1),     # 136 B spill
    ("cross_bwd", "lowp"): dict(BLOCK_R=32, num_warps=8, num_stages=1),     # 264 B spill
    ("cross_bwd", "fp32"): dict(BLOCK_R=16, num_warps=8, num_stages=1),     # 480 B spill
    ("mix_fwd", "lowp"): dict(BLOCK_R=64, BLOCK_F=64, num_warps=8, num_stages=2),   # no spill
    ("mix_fwd", "fp32"): dict(BLOCK_R=16, BLOCK_F=32, num_warps=4, num_stages=1),   # 80 B spill
    ("mix_bwd", "lowp"): dict(BLOCK_R=64, BLOCK_F=64, num_warps=8, num_stages=2),   # no spill
    ("mix_bwd", "fp32"): dict(BLOCK_R=32, BLOCK_F=32, num_warps=8, num_stages=1),   # no spill
}


def _config(kernel: str, dtype: torch.dtype) -> dict:
    return dict(CONFIGS[(kernel, "fp32" if dtype == torch.float32 else "lowp")])


def cross_attention_fwd_launch(x, ln_weight, ln_bias, mq, mv, out_bias, num_heads: int, ln_eps: float):
    check_launchable(x, ln_weight, ln_bias, mq, mv, out_bias)
    dtype = check_dtypes(x, mq, mv)
    x, mq, mv = map(_rows_contiguous, (x, mq, mv))
    B, R, C = x.shape
    HK = mq.shape[-1]
    K = HK // num_heads
    y = new_tensor(x.shape, x.device, x.dtype)
    cfg = _config("cross_fwd", dtype)
    launch(_cross_attention_fwd_kernel, (triton.cdiv(R, cfg["BLOCK_R"]), B),
           x, ln_weight.contiguous(), ln_bias.contiguous(), mq, mv, out_bias.contiguous(), y,
           R, C, K, num_heads, ln_eps,
           x.stride(0), x.stride(1), mq.stride(0), mq.stride(1), mv.stride(0), mv.stride(1),
           y.stride(0), y.stride(1),
           BLOCK_C=pow2_at_least(C), BLOCK_K=pow2_at_least(K), **cfg, **dot_settings(dtype))
    return y


def cross_attention_bwd_launch(dy, x, ln_weight, ln_bias, mq, mv, num_heads: int, ln_eps: float):
    """(dx, dln_weight, dln_bias, dmq, dmv, dout_bias)."""
    check_launchable(dy, x, mq, mv)
    dtype = check_dtypes(x, mq, mv)
    x, mq, mv = map(_rows_contiguous, (x, mq, mv))
    dy = _rows_contiguous(dy.to(dtype))
    B, R, C = x.shape
    HK = mq.shape[-1]
    K = HK // num_heads
    cfg = _config("cross_bwd", dtype)
    RB = triton.cdiv(R, cfg["BLOCK_R"])
    dx, xn = new_tensor(x.shape, x.device, x.dtype), new_tensor(x.shape, x.device, x.dtype)
    a = new_tensor((B, R, HK), x.device, dtype)
    dl = new_tensor((B, R, HK), x.device, dtype)
    dlnw_part = new_tensor((B * RB, C), x.device, torch.float32)
    dlnb_part = new_tensor((B * RB, C), x.device, torch.float32)
    launch(_cross_attention_bwd_kernel, (RB, B),
           x, dy, ln_weight.contiguous(), ln_bias.contiguous(), mq, mv,
           dx, xn, a, dl, dlnw_part, dlnb_part, R, C, K, num_heads, HK, ln_eps, RB,
           x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), mq.stride(0), mq.stride(1),
           mv.stride(0), mv.stride(1),
           BLOCK_C=pow2_at_least(C), BLOCK_K=pow2_at_least(K), **cfg, **dot_settings(dtype))
    dmq = torch.bmm(xn.transpose(1, 2), dl)
    dmv = torch.bmm(a.transpose(1, 2), dy)
    dbias = dy.sum((0, 1), dtype=torch.float32)
    return (dx, dlnw_part.sum(0).to(ln_weight.dtype), dlnb_part.sum(0).to(ln_bias.dtype), dmq, dmv,
            dbias)


def mix_render_fwd_launch(x, q0, mm, g, w1b, b1, negative_slope: float):
    check_launchable(x, q0, mm, g, w1b, b1)
    dtype = check_dtypes(x, q0, mm, g, w1b)
    x, q0, mm, g, w1b = map(_rows_contiguous, (x, q0, mm, g, w1b))
    B, R, C = x.shape
    K, Fdim = g.shape[1], g.shape[2]
    h = new_tensor((B, R, Fdim), x.device, dtype)
    weights = new_tensor((B, R, K), x.device, torch.float32)
    cfg = _config("mix_fwd", dtype)
    launch(_mix_render_fwd_kernel, (triton.cdiv(R, cfg["BLOCK_R"]), B),
           x, q0, mm, g, w1b, b1.contiguous(), h, weights, R, C, K, Fdim, negative_slope,
           x.stride(0), x.stride(1), q0.stride(0), q0.stride(1), mm.stride(0), mm.stride(1),
           g.stride(0), g.stride(1), w1b.stride(0),
           BLOCK_C=pow2_at_least(C), BLOCK_K=pow2_at_least(K), **cfg, **dot_settings(dtype))
    return h, weights


def mix_render_bwd_launch(dh, dweights, x, q0, mm, g, w1b, h, weights, negative_slope: float):
    """(dx, dq0, dmm, dg, dw1b, db1); dweights may be None."""
    check_launchable(dh, x, q0, mm, g, w1b, h)
    dtype = check_dtypes(x, q0, mm, g, w1b, h)
    dh = _rows_contiguous(dh.to(dtype))
    x, q0, mm, g, w1b = map(_rows_contiguous, (x, q0, mm, g, w1b))
    B, R, C = x.shape
    K, Fdim = g.shape[1], g.shape[2]
    dpre = new_tensor((B, R, Fdim), x.device, dtype)
    dl = new_tensor((B, R, K), x.device, dtype)
    dx = new_tensor(x.shape, x.device, x.dtype)
    has_dw = dweights is not None
    dweights = dweights.float().contiguous() if has_dw else weights
    cfg = _config("mix_bwd", dtype)
    launch(_mix_render_bwd_kernel, (triton.cdiv(R, cfg["BLOCK_R"]), B),
           dh, h, weights, dweights, g, mm, dpre, dl, dx, R, C, K, Fdim, negative_slope,
           dh.stride(0), dh.stride(1), g.stride(0), g.stride(1), mm.stride(0), mm.stride(1),
           HAS_DWTS=has_dw, BLOCK_C=pow2_at_least(C), BLOCK_K=pow2_at_least(K), **cfg,
           **dot_settings(dtype))
    flat = dpre.flatten(0, 1)
    dq0 = torch.mm(flat, w1b).view(B, R, C)
    dw1b = torch.mm(flat.t(), q0.flatten(0, 1))
    db1 = flat.sum(0, dtype=torch.float32)
    dg = torch.bmm(weights.to(dtype).transpose(1, 2), dpre)
    dmm = torch.bmm(x.transpose(1, 2), dl)
    return dx, dq0, dmm, dg, dw1b, db1


# ----------------------------------------------------------------------------------------------
# Custom ops (so torch.compile(fullgraph=True) traces through) and the autograd.Functions

@torch.library.custom_op("osrt_fast::slot_cross_attention_fwd", mutates_args=())
def _cross_attention_fwd_op(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                            mq: torch.Tensor, mv: torch.Tensor, out_bias: torch.Tensor,
                            num_heads: int, ln_eps: float) -> torch.Tensor:
    return cross_attention_fwd_launch(x, ln_weight, ln_bias, mq, mv, out_bias, num_heads, ln_eps)


# Fakes describe the real outputs: new, contiguous tensors whatever the inputs' strides (a
# compiled graph plans its views on these strides).
@_cross_attention_fwd_op.register_fake
def _(x, ln_weight, ln_bias, mq, mv, out_bias, num_heads, ln_eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("osrt_fast::slot_cross_attention_bwd", mutates_args=())
def _cross_attention_bwd_op(dy: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor,
                            ln_bias: torch.Tensor, mq: torch.Tensor, mv: torch.Tensor,
                            num_heads: int, ln_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor, torch.Tensor]:
    return cross_attention_bwd_launch(dy, x, ln_weight, ln_bias, mq, mv, num_heads, ln_eps)


@_cross_attention_bwd_op.register_fake
def _(dy, x, ln_weight, ln_bias, mq, mv, num_heads, ln_eps):
    return (x.new_empty(x.shape), ln_weight.new_empty(ln_weight.shape), ln_bias.new_empty(ln_bias.shape),
            mq.new_empty(mq.shape), mv.new_empty(mv.shape), ln_weight.new_empty(x.shape[-1], dtype=torch.float32))


class SlotCrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, mq, mv, out_bias, num_heads, ln_eps):
        ctx.save_for_backward(x, ln_weight, ln_bias, mq, mv)
        ctx.num_heads, ctx.ln_eps, ctx.bias_dtype = num_heads, ln_eps, out_bias.dtype
        return _cross_attention_fwd_op(x, ln_weight, ln_bias, mq, mv, out_bias, num_heads, ln_eps)

    @staticmethod
    def backward(ctx, dy):
        x, ln_weight, ln_bias, mq, mv = ctx.saved_tensors
        dx, dlnw, dlnb, dmq, dmv, dbias = _cross_attention_bwd_op(
            dy, x, ln_weight, ln_bias, mq, mv, ctx.num_heads, ctx.ln_eps)
        return dx, dlnw, dlnb, dmq, dmv, dbias.to(ctx.bias_dtype), None, None


@torch.library.custom_op("osrt_fast::slot_mix_render_fwd", mutates_args=())
def _mix_render_fwd_op(x: torch.Tensor, q0: torch.Tensor, mm: torch.Tensor, g: torch.Tensor,
                       w1b: torch.Tensor, b1: torch.Tensor,
                       negative_slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    return mix_render_fwd_launch(x, q0, mm, g, w1b, b1, negative_slope)


@_mix_render_fwd_op.register_fake
def _(x, q0, mm, g, w1b, b1, negative_slope):
    B, R, _ = x.shape
    return x.new_empty(B, R, g.shape[2]), x.new_empty(B, R, g.shape[1], dtype=torch.float32)


@torch.library.custom_op("osrt_fast::slot_mix_render_bwd", mutates_args=())
def _mix_render_bwd_op(dh: torch.Tensor, dweights: torch.Tensor | None, x: torch.Tensor,
                       q0: torch.Tensor, mm: torch.Tensor, g: torch.Tensor, w1b: torch.Tensor,
                       h: torch.Tensor, weights: torch.Tensor, negative_slope: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return mix_render_bwd_launch(dh, dweights, x, q0, mm, g, w1b, h, weights, negative_slope)


@_mix_render_bwd_op.register_fake
def _(dh, dweights, x, q0, mm, g, w1b, h, weights, negative_slope):
    return (x.new_empty(x.shape), q0.new_empty(q0.shape), mm.new_empty(mm.shape), g.new_empty(g.shape),
            w1b.new_empty(w1b.shape), w1b.new_empty(w1b.shape[0], dtype=torch.float32))


class SlotMixRender(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q0, mm, g, w1b, b1, negative_slope):
        h, weights = _mix_render_fwd_op(x, q0, mm, g, w1b, b1, negative_slope)
        ctx.save_for_backward(x, q0, mm, g, w1b, h, weights)
        ctx.negative_slope, ctx.bias_dtype = negative_slope, b1.dtype
        return h, weights

    @staticmethod
    def backward(ctx, dh, dweights):
        x, q0, mm, g, w1b, h, weights = ctx.saved_tensors
        if dh is None:
            dh = torch.zeros_like(h)
        dx, dq0, dmm, dg, dw1b, db1 = _mix_render_bwd_op(dh, dweights, x, q0, mm, g, w1b, h, weights,
                                                         ctx.negative_slope)
        return dx, dq0, dmm, dg, dw1b, db1.to(ctx.bias_dtype), None


# ----------------------------------------------------------------------------------------------
# Public ops

def slot_cross_attention(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                         mq: torch.Tensor, mv: torch.Tensor, out_bias: torch.Tensor,
                         num_heads: int, ln_eps: float = 1e-5) -> torch.Tensor:
    """One allocation-transformer attention sub-block of the Slot Mixer decoder (Triton):
    y = x + softmax_per_head(LayerNorm(x) @ mq) @ mv + out_bias.

    x [B, R, C] ray features; mq [B, C, H*K] and mv [B, H*K, C] per-scene folded matrices
    (columns/rows h*K..h*K+K-1 belong to head h; the attention scale is folded into mq);
    ln_weight, ln_bias, out_bias [C] (any float dtype, e.g. fp32 parameters under autocast).
    x, mq and mv share one dtype (fp32, bf16, fp16), which y has. Differentiable in all tensors.
    Same function as `slot_cross_attention_eager`.
    """
    B, R, C = x.shape
    if mq.shape[:2] != (B, C) or mq.shape[2] % num_heads or mv.shape != (B, mq.shape[2], C):
        raise ValueError(f"expected mq [B, C, H*K] = [{B}, {C}, {num_heads}*K] and mv [B, H*K, C]; "
                         f"got mq {tuple(mq.shape)}, mv {tuple(mv.shape)}")
    return SlotCrossAttention.apply(x, ln_weight, ln_bias, mq, mv, out_bias, int(num_heads), float(ln_eps))


def slot_mix_render(x: torch.Tensor, q0: torch.Tensor, mm: torch.Tensor, g: torch.Tensor,
                    w1b: torch.Tensor, b1: torch.Tensor, negative_slope: float = LEAKY_SLOPE):
    """The Slot Mixer's mixing block and its render MLP's first layer (Triton):
    weights = softmax over slots of x @ mm; h = leaky_relu(weights @ g + q0 @ w1b^T + b1).

    x and q0 [B, R, C] (allocation-transformer output and query features), mm [B, C, K]
    (W_q^T k^T * scale), g [B, K, F] (slots @ W_1a^T), w1b [F, C], b1 [F]. x, q0, mm, g and w1b
    share one dtype (fp32, bf16, fp16). Returns h [B, R, F] in that dtype and the slot weights
    [B, R, K] in fp32 (the segmentation). Differentiable in all tensors (the weights too).
    Same function as `slot_mix_render_eager`.
    """
    B, R, C = x.shape
    if q0.shape != x.shape or mm.shape[:2] != (B, C) or g.shape[:2] != (B, mm.shape[2]) \
            or w1b.shape != (g.shape[2], C) or b1.shape != (g.shape[2],):
        raise ValueError(f"inconsistent shapes: x {tuple(x.shape)}, q0 {tuple(q0.shape)}, "
                         f"mm {tuple(mm.shape)}, g {tuple(g.shape)}, w1b {tuple(w1b.shape)}, "
                         f"b1 {tuple(b1.shape)}")
    return SlotMixRender.apply(x, q0, mm, g, w1b, b1, float(negative_slope))
