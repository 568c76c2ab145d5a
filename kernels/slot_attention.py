"""Slot Attention's attention step, fused: softmax over the slots, + eps, renormalised over the
inputs, times the values, in one pass over the inputs and without the [B, K, N] attention in
memory.

Notation: q [B, K, D] slot queries, k and v [B, N, D] input keys and values, s = scale.
    S = softmax over K of s * q k^T          [B, K, N]
    P = S + eps,  r = sum over N of P         [B, K]
    U = (P v) / r                             [B, K, D]   (the updates)
Forward: each program takes one block of inputs, computes its logits, S and P on chip, and
writes P's partial row sums and partial P v (fp32) for its block; a second kernel sums the
partials and divides. The reduction over N is deterministic (no atomics).
Backward, with A = P / r and c = sum over D of dU * U:
    dv = A^T dU,  dP = (dU v^T - c) / r,  dL = S * (dP - sum over K of S dP),
    dq = s * dL k,  dk = s * dL^T q
in one pass over the inputs per block, recomputing S; dq is reduced over blocks like U.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._triton import (check_dtypes, check_launchable, dot_settings, launch, new_tensor, pow2_at_least,
                      tl, triton)

EPS = 1e-8


# ----------------------------------------------------------------------------------------------
# Eager twin: the definition

def slot_attention_step_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              scale: Optional[float] = None, eps: float = EPS):
    """q [B, K, D], k and v [B, N, D] -> (updates [B, K, D], attention [B, K, N])."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (torch.bmm(q, k.transpose(1, 2)) * scale).softmax(dim=1) + eps
    attn = attn / attn.sum(dim=-1, keepdim=True)
    return torch.bmm(attn, v), attn


# ----------------------------------------------------------------------------------------------
# Kernels

@triton.jit
def _dot(a, b, acc, LOWP: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """acc + a @ b, with operands in the input dtype (LOWP) or fp32."""
    if LOWP:
        return tl.dot(a.to(DTYPE), b.to(DTYPE), acc)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit
def _slot_softmax_t(q_base, k_base, stride_qk, stride_kn, offs_k, offs_n, offs_d, mask_k, mask_n,
                    D, scale, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    LOWP: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """S^T [BLOCK_N, BLOCK_K] for one block of inputs: softmax over the slots (axis 1) of
    s * k q^T; zero in padding slots. Inputs are the rows, so the dots have M = BLOCK_N."""
    logits = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        md = dd < D
        kt = tl.load(k_base + offs_n[:, None] * stride_kn + dd[None, :],
                     mask=mask_n[:, None] & md[None, :], other=0.0)
        qt = tl.load(q_base + offs_k[:, None] * stride_qk + dd[None, :],
                     mask=mask_k[:, None] & md[None, :], other=0.0)
        logits = _dot(kt, tl.trans(qt), logits, LOWP, PRECISION, DTYPE)
    logits = tl.where(mask_k[None, :], logits * scale, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _slot_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, part_ptr, rpart_ptr, attn_ptr,
        K, N, D, NB, scale, eps,
        stride_qb, stride_qk, stride_kb, stride_kn, stride_vb, stride_vn,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        STORE_ATTN: tl.constexpr, LOWP: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    DTYPE = q_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k, mask_n = offs_k < K, offs_n < N
    s = _slot_softmax_t(q_ptr + pid_b * stride_qb, k_ptr + pid_b * stride_kb, stride_qk, stride_kn,
                        offs_k, offs_n, offs_d, mask_k, mask_n, D, scale,
                        BLOCK_K, BLOCK_N, BLOCK_D, LOWP, PRECISION, DTYPE)
    p = tl.where(mask_n[:, None] & mask_k[None, :], s + eps, 0.0)       # P^T [BLOCK_N, BLOCK_K]
    part = (pid_b * NB + pid_n) * BLOCK_K          # this block's rows in the [B, NB, BLOCK_K] partials
    tl.store(rpart_ptr + part + offs_k, tl.sum(p, axis=0))
    if STORE_ATTN:   # unnormalised; the launcher divides by the row sums
        tl.store(attn_ptr + (pid_b * K + offs_k[None, :]) * N + offs_n[:, None], p,
                 mask=mask_n[:, None] & mask_k[None, :])
    v_base = v_ptr + pid_b * stride_vb
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        md = dd < D
        vt = tl.load(v_base + offs_n[:, None] * stride_vn + dd[None, :],
                     mask=mask_n[:, None] & md[None, :], other=0.0)
        # (P v)^T for these columns: [BLOCK_D, BLOCK_K]
        pv = _dot(tl.trans(vt), p, tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32), LOWP, PRECISION, DTYPE)
        tl.store(part_ptr + (part + offs_k[None, :]) * D + dd[:, None], pv, mask=md[:, None])


@triton.jit
def _reduce_partials_kernel(part_ptr, rpart_ptr, out_ptr, rsum_ptr, K, D, NB,
                            stride_ob, stride_ok,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DIVIDE: tl.constexpr):
    """out[b, :K] = sum over blocks of part[b] (divided by the summed row sums if DIVIDE)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = dd < D
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    r = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for nb in range(0, NB):
        rows = (pid_b * NB + nb) * BLOCK_K + offs_k
        acc += tl.load(part_ptr + rows[:, None] * D + dd[None, :], mask=md[None, :], other=0.0)
        if DIVIDE:
            r += tl.load(rpart_ptr + rows)
    mask_k = offs_k < K
    if DIVIDE:
        acc = acc / tl.where(mask_k, r, 1.0)[:, None]
        if pid_d == 0:
            tl.store(rsum_ptr + pid_b * K + offs_k, r, mask=mask_k)
    tl.store(out_ptr + pid_b * stride_ob + offs_k[:, None] * stride_ok + dd[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & md[None, :])


@triton.jit
def _slot_attention_bwd_kernel(
        q_ptr, k_ptr, v_ptr, du_ptr, rsum_ptr, c_ptr,
        dq_part_ptr, dk_ptr, dv_ptr,
        K, N, D, NB, scale, eps,
        stride_qb, stride_qk, stride_kb, stride_kn, stride_vb, stride_vn,
        stride_dub, stride_duk, stride_dkb, stride_dkn, stride_dvb, stride_dvn,
        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        LOWP: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    DTYPE = q_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_k, mask_n = offs_k < K, offs_n < N
    valid = mask_n[:, None] & mask_k[None, :]
    q_base, k_base = q_ptr + pid_b * stride_qb, k_ptr + pid_b * stride_kb
    v_base, du_base = v_ptr + pid_b * stride_vb, du_ptr + pid_b * stride_dub
    s = _slot_softmax_t(q_base, k_base, stride_qk, stride_kn, offs_k, offs_n, offs_d, mask_k, mask_n,
                        D, scale, BLOCK_K, BLOCK_N, BLOCK_D, LOWP, PRECISION, DTYPE)
    r = tl.load(rsum_ptr + pid_b * K + offs_k, mask=mask_k, other=1.0)
    c = tl.load(c_ptr + pid_b * K + offs_k, mask=mask_k, other=0.0)
    a = tl.where(valid, (s + eps) / r[None, :], 0.0)                    # A^T [BLOCK_N, BLOCK_K]
    # (dU v^T)^T for this block of inputs
    da = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        md = dd < D
        vt = tl.load(v_base + offs_n[:, None] * stride_vn + dd[None, :],
                     mask=mask_n[:, None] & md[None, :], other=0.0)
        dut = tl.load(du_base + offs_k[:, None] * stride_duk + dd[None, :],
                      mask=mask_k[:, None] & md[None, :], other=0.0)
        da = _dot(vt, tl.trans(dut), da, LOWP, PRECISION, DTYPE)
    dp = (da - c[None, :]) / r[None, :]
    dl = s * (dp - tl.sum(s * dp, axis=1)[:, None])
    dl = tl.where(valid, dl * scale, 0.0)                               # dL^T, scaled
    part = (pid_b * NB + pid_n) * BLOCK_K
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        md = dd < D
        mkd = mask_k[:, None] & md[None, :]
        mnd = mask_n[:, None] & md[None, :]
        dut = tl.load(du_base + offs_k[:, None] * stride_duk + dd[None, :], mask=mkd, other=0.0)
        dv = _dot(a, dut, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), LOWP, PRECISION, DTYPE)
        tl.store(dv_ptr + pid_b * stride_dvb + offs_n[:, None] * stride_dvn + dd[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=mnd)
        qt = tl.load(q_base + offs_k[:, None] * stride_qk + dd[None, :], mask=mkd, other=0.0)
        dk = _dot(dl, qt, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), LOWP, PRECISION, DTYPE)
        tl.store(dk_ptr + pid_b * stride_dkb + offs_n[:, None] * stride_dkn + dd[None, :],
                 dk.to(dk_ptr.dtype.element_ty), mask=mnd)
        kt = tl.load(k_base + offs_n[:, None] * stride_kn + dd[None, :], mask=mnd, other=0.0)
        # (dL k)^T for these columns: [BLOCK_D, BLOCK_K]
        dq = _dot(tl.trans(kt), dl, tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32), LOWP, PRECISION, DTYPE)
        tl.store(dq_part_ptr + (part + offs_k[None, :]) * D + dd[:, None], dq, mask=md[:, None])


# ----------------------------------------------------------------------------------------------
# Launchers

def _blocks(num_slots: int, dtype: torch.dtype):
    """(BLOCK_K, BLOCK_N, BLOCK_D). Larger input blocks mean fewer fp32 partials to reduce;
    fp32 (3xTF32) dots need about twice the registers, so they take half the block."""
    block_k = pow2_at_least(num_slots)
    block_n = 128 if block_k <= 32 else 64
    if dtype == torch.float32:
        return block_k, block_n // 2, 32
    return block_k, block_n, 64


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _reduce(part, rpart, out, rsum, num_slots, D, NB, block_k, divide):
    B = out.shape[0]
    block_d = 64
    launch(_reduce_partials_kernel, (triton.cdiv(D, block_d), B),
           part, rpart, out, rsum, num_slots, D, NB, out.stride(0), out.stride(1),
        BLOCK_K=block_k, BLOCK_D=block_d, DIVIDE=divide)


def slot_attention_fwd_launch(q, k, v, scale: float, eps: float, need_attn: bool):
    """Launches the forward kernels: (updates [B, K, D], row sums r [B, K] fp32,
    attention [B, K, N] fp32, or an empty tensor unless need_attn)."""
    check_launchable(q, k, v)
    dtype = check_dtypes(q, k, v)
    q, k, v = map(_last_dim_contiguous, (q, k, v))
    B, K, D = q.shape
    N = k.shape[1]
    block_k, block_n, block_d = _blocks(K, dtype)
    NB = triton.cdiv(N, block_n)
    part = new_tensor((B, NB, block_k, D), q.device, torch.float32)
    rpart = new_tensor((B, NB, block_k), q.device, torch.float32)
    attn = new_tensor((B, K, N) if need_attn else (0,), q.device, torch.float32)
    launch(_slot_attention_fwd_kernel, (NB, B),
        q, k, v, part, rpart, attn, K, N, D, NB, scale, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_D=block_d, STORE_ATTN=need_attn,
        num_warps=4, **dot_settings(dtype))
    out = new_tensor((B, K, D), q.device, dtype)
    rsum = new_tensor((B, K), q.device, torch.float32)
    _reduce(part, rpart, out, rsum, K, D, NB, block_k, divide=True)
    if need_attn:
        attn = attn / rsum[..., None]
    return out, rsum, attn


def slot_attention_bwd_launch(grad_out, q, k, v, out, rsum, scale: float, eps: float):
    """Launches the backward kernels: (dq, dk, dv) in the input dtype."""
    check_launchable(grad_out, q, k, v)
    dtype = check_dtypes(q, k, v)
    q, k, v = map(_last_dim_contiguous, (q, k, v))
    grad_out = _last_dim_contiguous(grad_out.to(dtype))
    B, K, D = q.shape
    N = k.shape[1]
    block_k, block_n, block_d = _blocks(K, dtype)
    NB = triton.cdiv(N, block_n)
    c = (grad_out.float() * out.float()).sum(-1).contiguous()      # [B, K]
    dq_part = new_tensor((B, NB, block_k, D), q.device, torch.float32)
    dk, dv = new_tensor(k.shape, k.device, k.dtype), new_tensor(v.shape, v.device, v.dtype)
    launch(_slot_attention_bwd_kernel, (NB, B),
        q, k, v, grad_out, rsum, c, dq_part, dk, dv, K, N, D, NB, scale, eps,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1), dk.stride(0), dk.stride(1),
        dv.stride(0), dv.stride(1),
        BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=8, **dot_settings(dtype))
    dq = new_tensor(q.shape, q.device, q.dtype)
    _reduce(dq_part, dq_part, dq, dq_part, K, D, NB, block_k, divide=False)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom ops (so torch.compile(fullgraph=True) traces through) and the autograd.Function

@torch.library.custom_op("osrt_fast::slot_attention_fwd", mutates_args=())
def _slot_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           eps: float, need_attn: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return slot_attention_fwd_launch(q, k, v, scale, eps, need_attn)


@_slot_attention_fwd_op.register_fake
def _(q, k, v, scale, eps, need_attn):
    B, K, D = q.shape
    attn_shape = (B, K, k.shape[1]) if need_attn else (0,)
    return (q.new_empty(B, K, D), q.new_empty(B, K, dtype=torch.float32),
            q.new_empty(attn_shape, dtype=torch.float32))


@torch.library.custom_op("osrt_fast::slot_attention_bwd", mutates_args=())
def _slot_attention_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, rsum: torch.Tensor, scale: float,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return slot_attention_bwd_launch(grad_out, q, k, v, out, rsum, scale, eps)


# Fakes describe the real outputs: new, contiguous tensors whatever the inputs' strides (a
# compiled graph plans its views on these strides).
@_slot_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, rsum, scale, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class SlotAttentionStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, eps, need_attn):
        out, rsum, attn = _slot_attention_fwd_op(q, k, v, scale, eps, need_attn)
        ctx.save_for_backward(q, k, v, out, rsum)
        ctx.scale, ctx.eps = scale, eps
        ctx.mark_non_differentiable(rsum, attn)
        return out, rsum, attn

    @staticmethod
    def backward(ctx, grad_out, _grad_rsum, _grad_attn):
        q, k, v, out, rsum = ctx.saved_tensors
        dq, dk, dv = _slot_attention_bwd_op(grad_out, q, k, v, out, rsum, ctx.scale, ctx.eps)
        return dq, dk, dv, None, None, None


def slot_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: Optional[float] = None, eps: float = EPS,
                        return_attention: bool = False):
    """Slot Attention's attention step (Triton): softmax over the slots, + eps, renormalised over
    the inputs, applied to the values.

    q [B, K, D] (slot queries), k and v [B, N, D] (input keys and values), one dtype among fp32,
    bf16 and fp16, on a CUDA device (or the CPU under TRITON_INTERPRET=1). `scale` defaults to
    D ** -0.5. Returns updates [B, K, D] in the input dtype, and with `return_attention` also the
    attention [B, K, N] (fp32, rows summing to 1 over N; for visualisation, not differentiable).
    Differentiable in q, k and v. Same function as `slot_attention_step_eager`.
    """
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[0] != k.shape[0] \
            or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [B, K, D] and k, v [B, N, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _, attn = SlotAttentionStep.apply(q, k, v, scale, float(eps), return_attention)
    return (out, attn) if return_attention else out
