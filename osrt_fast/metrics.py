"""Image metrics: PSNR, and ARI / FG-ARI of a predicted segmentation (the reference's definition)."""
from __future__ import annotations

import math

import torch


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1] from their mean squared error."""
    return -10.0 * torch.log10(mse)


def adjusted_rand_index(true_masks: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """ARI per scene of the argmax labels of `pred_masks` against `true_masks`.

    true_masks [B, P, T] one-hot (a point whose mask is all zero is ignored);
    pred_masks [B, P, S] soft assignments (argmax taken). Returns [B] float64.
    Computed from the contingency table in float64; where both labelings of the counted points
    are a single cluster, the score is 1 (the formula is 0/0 there).
    """
    if true_masks.dim() != 3 or pred_masks.dim() != 3 or true_masks.shape[:2] != pred_masks.shape[:2]:
        raise ValueError(f"expected true_masks [B, P, T] and pred_masks [B, P, S], got "
                         f"{tuple(true_masks.shape)} and {tuple(pred_masks.shape)}")
    true = true_masks.double()
    pred = torch.nn.functional.one_hot(pred_masks.argmax(-1), pred_masks.shape[-1]).double()
    table = torch.einsum("bpt,bps->bts", true, pred)          # n_ij
    n = table.sum((1, 2))
    a, b = table.sum(2), table.sum(1)
    rand = (table * (table - 1)).sum((1, 2))
    a_pairs = (a * (a - 1)).sum(1)
    b_pairs = (b * (b - 1)).sum(1)
    expected = a_pairs * b_pairs / (n * (n - 1))
    maximum = (a_pairs + b_pairs) / 2
    ari = (rand - expected) / (maximum - expected)
    single = ((a > 0).sum(1) <= 1) & ((b > 0).sum(1) <= 1)
    return torch.where(single, torch.ones_like(ari), ari)


def fg_ari(true_masks: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """ARI over foreground points: true channel 0 (the background) is dropped. Returns [B]."""
    return adjusted_rand_index(true_masks[..., 1:], pred_masks)


def mse_to_psnr(mse: float) -> float:
    return -10.0 * math.log10(mse) if mse > 0 else float("inf")
