"""Image metrics: PSNR, SSIM (torchmetrics'), and ARI / FG-ARI of a predicted segmentation (the
reference's definition)."""
from __future__ import annotations

import math
import sys

import torch


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1] from their mean squared error."""
    return -10.0 * torch.log10(mse)


def _views(rays: torch.Tensor, image_shape: tuple) -> torch.Tensor:
    """[B, V*H*W, 3] rays of whole views (row-major) as [B*V, 3, H, W] images in [0, 1]."""
    v, h, w = image_shape
    return rays.float().reshape(rays.shape[0] * v, h, w, 3).permute(0, 3, 1, 2).clamp(0, 1)


def ssim(pred: torch.Tensor, target: torch.Tensor, image_shape: tuple) -> torch.Tensor:
    """Mean SSIM per scene [B] of rendered target views against the true ones: pred and target
    [B, V*H*W, 3] in [0, 1], every pixel of V views of H x W in row-major order (full-scale
    evaluation), image_shape (V, H, W). torchmetrics' SSIM (Wang et al. 2004: Gaussian window
    11, sigma 1.5, data range 1), as other SRT / OSRT code bases report it."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    v, h, w = image_shape
    b = pred.shape[0]
    if pred.shape[1] != v * h * w:
        raise ValueError(f"SSIM needs every pixel of the {v} target views of {h}x{w} "
                         f"({v * h * w} rays), got {pred.shape[1]}: evaluate with --full-scale")
    per_image = structural_similarity_index_measure(_views(pred, image_shape),
                                                    _views(target, image_shape),
                                                    data_range=1.0, reduction="none")
    return per_image.reshape(b, v).mean(1)


_LPIPS_NOTED = False


def lpips_metric(device):
    """LPIPS (Zhang et al. 2018, AlexNet features, torchmetrics') as fn(pred, target, image_shape)
    -> [B] like `ssim`, or None where it cannot be built here: it needs torchvision and the
    pretrained network weights, which are downloaded on first use and cannot be where there is
    no network. Then it says so once per process, and evaluation reports the other metrics."""
    global _LPIPS_NOTED
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        net = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="mean",
                                                   normalize=True).to(device).eval()
    except Exception as e:      # missing torchvision, weights not downloadable: any reason
        if not _LPIPS_NOTED:
            _LPIPS_NOTED = True
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"note: LPIPS is not reported: {reason} (it needs torchvision and its "
                  f"pretrained weights, pip install 'torchmetrics[image]' where a network is)",
                  file=sys.stderr)
        return None

    def lpips(pred, target, image_shape):
        p, t = _views(pred, image_shape), _views(target, image_shape)
        per_image = torch.stack([net(p[i:i + 1], t[i:i + 1]) for i in range(len(p))])
        return per_image.reshape(pred.shape[0], image_shape[0]).mean(1)
    return lpips


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
