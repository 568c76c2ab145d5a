"""Throughput: model FLOPs per scene, counted as docs/flop_model.md defines them, and the
measured peaks MFU is reported against."""
from __future__ import annotations

import time
from typing import Optional

import torch

from .config import model_config_from_any
from .model import OSRT


# Dense bf16 matrix-product peaks measured on the lent machines, random data (H100:
# docs/flop_model.md; H200 likewise, 8192^3 products on random data); MFU is reported
# against these whatever dtype the step runs in, so numbers stay comparable.
PEAK_FLOPS = {"H100": 798e12, "H200": 788e12}


def model_flops_per_scene(model_cfg, batch: dict) -> Optional[float]:
    """Model FLOPs of one training step per scene (forward x 3: backward ~ 2x forward), counted
    as docs/flop_model.md defines them: on the eager reference architecture, whatever fast path runs
    (recomputation and exact rewrites do not change it). Counted on a copy of the model on the
    meta device, so no memory, no collectives and no compiled code are involved. None where the
    counter fails."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
        cfg = model_config_from_any(model_cfg)          # a checked copy: ours to change
        cfg.backend, cfg.encoder_attention = "eager", "sdpa"
        with torch.device("meta"):
            model = OSRT(cfg)
        one = {k: torch.empty(v[:1].shape, dtype=torch.float32, device="meta")
               for k, v in batch.items() if torch.is_tensor(v) and v.is_floating_point()}
        # Not under no_grad: the counter's module tracker needs autograd (torch 2.x).
        with FlopCounterMode(display=False) as counter:
            model(one["input_images"], one["input_camera_pos"], one["input_rays"],
                  one["target_camera_pos"], one["target_rays"])
        return 3.0 * counter.get_total_flops()
    except Exception:       # a counter failure must never stop training
        return None


def peak_flops(device, override_tflops: Optional[float] = None) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s: the config's override, else a known GPU's."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class Throughput:
    """Training rates between readings: scenes/s and rays/s (global: `batch_size` scenes of
    `rays` rays per step), model TFLOP/s and MFU (against the peak of all `world_size` devices)."""

    def __init__(self, it: int, batch_size: int, rays: int, peak: Optional[float], world_size: int):
        self.batch_size, self.rays, self.peak, self.world_size = batch_size, rays, peak, world_size
        self.last_t, self.last_it = time.perf_counter(), it
        self.flops_per_scene = None

    def count_flops(self, model_cfg, batch: dict) -> None:
        """Counts the model FLOPs once, on the first batch."""
        if self.flops_per_scene is None:
            self.flops_per_scene = model_flops_per_scene(model_cfg, batch) or 0.0

    def read(self, it: int) -> dict:
        now = time.perf_counter()
        steps_per_s = (it - self.last_it) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_it = now, it
        rec = {"scenes_per_s": steps_per_s * self.batch_size,
               "rays_per_s": steps_per_s * self.batch_size * self.rays}
        if self.flops_per_scene:
            rec["tflops_per_s"] = rec["scenes_per_s"] * self.flops_per_scene / 1e12
            if self.peak:
                rec["mfu"] = rec["tflops_per_s"] * 1e12 / (self.peak * self.world_size)
        return rec
