"""Eager baseline on a GPU: a training step at MSN-Hard shapes, and one rendered frame.

The eager path is the definition; later fast paths report their speed-up over these numbers.

    python benchmarks/bench_eager.py [--dtype fp32 bf16] [--batches 1 2 4 8 16 32] [--rays 8192]

Training step = encoder (5 views of 128x128) + Slot Mixer decoder on `rays` target rays per
scene + MSE backward + Adam step, K = 32, the paper's widths. Scenes/s, rays/s and MFU use the
model-FLOP count of docs/PERFORMANCE.md. Appends JSON lines to results/eager.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (DECODER_FLOPS_PER_RAY, ENCODER_FLOPS_PER_SCENE, append_result,  # noqa: E402
                               environment, peak_flops, quantiles, time_cuda)
from osrt_fast.model import OSRT  # noqa: E402

MSN_HARD = {"encoder": "osrt", "encoder_kwargs": {"pos_start_octave": -5, "num_slots": 32},
            "decoder": "slot_mixer", "decoder_kwargs": {"pos_start_octave": -5}}


def random_batch(batch, views, size, rays, device):
    g = torch.Generator(device=device).manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, 3, device=device, generator=g), dim=-1)  # noqa
    return dict(images=torch.rand(batch, views, 3, size, size, device=device, generator=g),
                camera_pos=unit(batch, views) * 10, rays=unit(batch, views, size, size),
                target_camera_pos=unit(batch, rays) * 10, target_rays=unit(batch, rays),
                target_pixels=torch.rand(batch, rays, 3, device=device, generator=g))


def bench_train_step(model, optimizer, batch, rays, dtype, env, args):
    data = random_batch(batch, 5, 128, rays, "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            latents = model.encoder(data["images"], data["camera_pos"], data["rays"])
            pixels, _ = model.decoder(latents, data["target_camera_pos"], data["target_rays"])
            loss = (pixels.float() - data["target_pixels"]).square().mean()
        loss.backward()
        optimizer.step()

    torch.cuda.reset_peak_memory_stats()
    times = time_cuda(step, warmup=2, repeat=args.repeat)
    q = quantiles(times)
    flops = 3 * (ENCODER_FLOPS_PER_SCENE + DECODER_FLOPS_PER_RAY * rays) * batch
    peak = peak_flops(env["device"])
    rec = {"bench": "train_step", "path": "eager", "dtype": dtype, "scenes": batch, "rays": rays,
           "views": 5, "image": 128, "slots": 32, **q,
           "scenes_per_s": batch / q["median_ms"] * 1e3,
           "rays_per_s": batch * rays / q["median_ms"] * 1e3,
           "mfu": flops / (q["median_ms"] * 1e-3) / peak if peak else None,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30, **env}
    return rec


@torch.no_grad()
def bench_render_frame(model, dtype, env, args):
    data = random_batch(1, 5, 128, 128 * 128, "cuda")
    latents = model.encoder(data["images"], data["camera_pos"], data["rays"])
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())

    def frame():
        with autocast:
            model.decoder(latents, data["target_camera_pos"], data["target_rays"])

    torch.cuda.reset_peak_memory_stats()
    q = quantiles(time_cuda(frame, warmup=3, repeat=args.repeat * 2))
    return {"bench": "render_frame", "path": "eager", "dtype": dtype, "rays": 128 * 128,
            "slots": 32, **q, "fps": 1e3 / q["median_ms"],
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30, **env}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--rays", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_eager needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False      # the reference's fp32
    torch.backends.cudnn.allow_tf32 = False
    env = environment()
    model = OSRT(MSN_HARD).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    rows = []
    for dtype in args.dtype:
        rows.append(bench_render_frame(model, dtype, env, args))
        for batch in args.batches:
            try:
                rows.append(bench_train_step(model, optimizer, batch, args.rays, dtype, env, args))
            except torch.OutOfMemoryError:
                rows.append({"bench": "train_step", "path": "eager", "dtype": dtype, "scenes": batch,
                             "rays": args.rays, "oom": True, **env})
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                break
    print(f"{'bench':13} {'dtype':5} {'scenes':>6} {'rays':>6} {'median ms':>10} {'scenes/s':>9} "
          f"{'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        if not args.no_save:
            append_result("eager", r)
        if r.get("oom"):
            print(f"{r['bench']:13} {r['dtype']:5} {r['scenes']:>6} {r['rays']:>6}  out of memory")
            continue
        sps = r.get("scenes_per_s", r.get("fps", 0))
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        print(f"{r['bench']:13} {r['dtype']:5} {r.get('scenes', 1):>6} {r['rays']:>6} "
              f"{r['median_ms']:>10.2f} {sps:>9.1f} {mfu:>6} {r['peak_mem_gib']:>9.2f}")


if __name__ == "__main__":
    main()
