"""Evaluation: the loss and metrics of a batch, their means over a split, and the CLI
`python -m osrt_fast.evaluate CONFIG [--checkpoint PATH] [--test] [--full-scale]`.

The CLI prints and writes JSON with PSNR, MSE, ARI and FG-ARI (means over scenes) on sampled
target rays or, with --full-scale, on every pixel of every view, and then SSIM too (and LPIPS
where torchvision and its weights are there).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from typing import Optional

import torch
import torch.nn.functional as F

from . import parallel, process
from .checkpoint import load_trained_model
from .data import DataError, batch_spec, get_dataset, make_batch, record_loader, to_device
from .errors import command
from .files import write_error
from .metrics import adjusted_rand_index, fg_ari, lpips_metric, psnr, ssim
from .progress import progress_bar
from .runs import output_dir_for, run_dir_for


def compute_loss(model, batch: dict, max_rays: Optional[int] = None, slot_balance: float = 0.0,
                 image_shape: Optional[tuple] = None, lpips=None):
    """Per-scene MSE [B] and metric terms ([B] each): mse; for slot models also the slot usage
    (`slot_usage`) and, with masks, ari / fg_ari; with `image_shape` (V, H, W: the batch's targets
    are every pixel of its V target views), ssim, and lpips given its function
    (`metrics.lpips_metric`). With `slot_balance` > 0 (training), terms
    also holds 'aux_loss' [B], with its graph: `slot_balance` times `slot_importance_cv2`, to be
    added to the loss.

    Runs `model(...)` (encoder and decoder), so that a sharded model's root hooks run. Under an
    autocast context the model computes in its dtype; the loss and the metrics are fp32.
    """
    pixels, extras = model(batch["input_images"], batch["input_camera_pos"], batch["input_rays"],
                           batch["target_camera_pos"], batch["target_rays"], max_rays=max_rays)
    mse = (pixels.float() - batch["target_pixels"]).square().mean((1, 2))
    terms = {"mse": mse.detach()}
    if image_shape is not None:
        terms["ssim"] = ssim(pixels.detach(), batch["target_pixels"], image_shape)
        if lpips is not None:
            terms["lpips"] = lpips(pixels.detach(), batch["target_pixels"], image_shape)
    if slot_balance > 0 and "segmentation" in extras:
        terms["aux_loss"] = slot_balance * slot_importance_cv2(extras["segmentation"].float())
    if "segmentation" in extras:
        with torch.no_grad(), torch.autocast(pixels.device.type, enabled=False):
            seg = extras["segmentation"].float()
            terms.update(slot_usage(seg, extras.get("slots")))
            if "target_masks" in batch:
                masks = batch["target_masks"].float()
                terms["ari"] = adjusted_rand_index(masks, seg).float()
                terms["fg_ari"] = fg_ari(masks, seg).float()
    return mse, terms


def slot_importance_cv2(weights: torch.Tensor) -> torch.Tensor:
    """The squared coefficient of variation of the slots' importance in each scene [B]: with
    p_k the share of all ray weights [B, R, K] that slot k holds, K * sum_k p_k^2 - 1 (0 when the
    slots share the rays evenly, K - 1 when one slot takes them all). Shazeer et al. (2017,
    "Outrageously large neural networks", the importance loss) add it to a mixture-of-experts
    router's loss against rich-get-richer collapse; here per scene, on the Slot Mixer's weights."""
    shares = weights.mean(1)
    return weights.shape[-1] * shares.square().sum(-1) - 1.0


def slot_usage(weights: torch.Tensor, slots: Optional[torch.Tensor] = None) -> dict:
    """How a scene's rays share the slots, [B] each: `slot_max_share`, the largest slot's share
    of all the scene's ray weights (1 / K when all are used alike, 1 when one slot explains every
    ray: the collapse that keeps FG-ARI at 0), and, given the slots [B, K, D],
    `slot_similarity`, the mean cosine similarity of distinct slots (1: all slots alike).
    weights [B, R, K]."""
    out = {"slot_max_share": weights.mean(1).max(-1).values}
    if slots is not None and slots.shape[1] > 1:
        unit = F.normalize(slots.float(), dim=-1)
        cos = unit @ unit.transpose(1, 2)
        k = cos.shape[-1]
        out["slot_similarity"] = (cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(-1)) / (k * (k - 1))
    return out


@torch.no_grad()
def evaluate(model, loader, device, spec, max_rays: int = 65536, progress: bool = True,
             precision: str = "fp32") -> dict:
    """Mean over scenes of psnr, mse, ari and fg_ari (per-scene PSNR, as the reference), and
    ssim and lpips where `spec.full_scale` (every pixel of the target views is rendered; lpips
    where it can be built here, see `metrics.lpips_metric`).
    The loader yields scene records; `spec` (the dataset's BatchSpec) turns them into inputs.

    With several processes, each evaluates its share of the scenes and the sums are reduced.
    All processes run the same number of forward passes (FSDP gathers parameters in each): one
    whose share is used up repeats its last batch with weight 0.
    """
    info = parallel.current()
    model = parallel.for_inference(model)
    was_training = model.training
    model.eval()
    bar = progress_bar(enabled=progress and info.is_main, desc="evaluating", leave=False)
    sums, last, batches = defaultdict(lambda: torch.zeros((), dtype=torch.float64)), None, iter(loader)
    count = 0
    lpips = lpips_metric(device) if spec.full_scale else None
    while True:
        records = next(batches, None)
        if info.distributed:
            if parallel.all_agree(records is None, device):
                break
        elif records is None:
            break
        weight = 1.0
        if records is None:
            records, weight = last, 0.0
            if records is None:
                raise DataError(f"rank {info.rank} has no evaluation scenes; evaluate on more "
                                f"scenes (--max-eval) or with fewer processes")
        last = records
        batch = make_batch(to_device(records, device), spec)
        shape = ((records["target_views"].shape[1], *records["images"].shape[2:4])
                 if spec.full_scale else None)
        with parallel.autocast(device, precision):
            _, terms = compute_loss(model, batch, max_rays=max_rays, image_shape=shape, lpips=lpips)
        terms["psnr"] = psnr(terms["mse"])
        for k, v in terms.items():
            sums[k] = sums[k] + weight * v.double().sum().cpu()
        count += int(weight) * len(terms["mse"])
        bar.update(1)
    bar.close()
    if was_training:
        model.train()
    keys = sorted(sums)
    total = parallel.all_reduce_sum(torch.tensor([sums[k].item() for k in keys] + [count],
                                                 dtype=torch.float64, device=device)).cpu()
    if total[-1].item() == 0:
        raise DataError("the evaluation split has no scenes")
    out = {k: (total[i] / total[-1]).item() for i, k in enumerate(keys)}
    out["num_scenes"] = int(total[-1].item())
    return out


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m osrt_fast.evaluate",
                                description="Evaluate an OSRT checkpoint (PSNR, ARI, FG-ARI).")
    p.add_argument("config")
    p.add_argument("--checkpoint", help="Checkpoint file (default: <run dir>/model.pt).")
    p.add_argument("--run-dir", help="Run directory (default as train.py).")
    p.add_argument("--test", action="store_true", help="Use the test split instead of val.")
    p.add_argument("--full-scale", action="store_true", help="Evaluate on full images.")
    p.add_argument("--max-eval", type=int, help="Limit the number of evaluation items.")
    p.add_argument("--batch-size", type=int, help="Scenes per batch (default: the config's eval size).")
    p.add_argument("--output", help="JSON output (default: <run dir>/eval_<split>[_full].json).")
    p.add_argument("--no-cuda", action="store_true")
    args = p.parse_args(argv)
    process.setup()
    run_dir = run_dir_for(args.config, args.run_dir)
    cfg, model, ckpt, state = load_trained_model(args.config, args.checkpoint,
                                                 "cpu" if args.no_cuda else None, run_dir)
    device = next(model.parameters()).device
    split = "test" if args.test else "val"
    dataset = get_dataset(split, cfg.data, max_len=args.max_eval)
    spec = batch_spec(cfg.data, dataset, full_scale=args.full_scale)
    bs = args.batch_size or cfg.training.eval_batch_size or max(1, cfg.training.batch_size // 8)
    loader = record_loader(dataset, bs, {"num_workers": min(cfg.training.num_workers, 4)},
                           train=False)
    result = evaluate(model, loader, device, spec,
                      max_rays=cfg.data.num_points * cfg.training.batch_size)
    result = {"split": split, "full_scale": args.full_scale, "checkpoint": ckpt,
              "it": state.get("it"), **result}
    # Printed first: a file that cannot be written loses none of what was computed.
    print(json.dumps(result, indent=2))
    out = args.output or os.path.join(output_dir_for(args.config, args.checkpoint, args.run_dir),
                                      f"eval_{split}{'_full' if args.full_scale else ''}.json")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    except OSError as e:
        raise write_error(e, out, "--output FILE") from None
    print(f"Wrote {out}")
    bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        print(f"error: the metrics {bad} are not finite: the model's outputs are NaN or infinite "
              f"on this data", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
