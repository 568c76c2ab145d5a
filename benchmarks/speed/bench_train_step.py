"""Training step at the paper's scale: speed, MFU, peak memory, and the largest batch that fits.

    python -m benchmarks.speed.bench_train_step [--paths eager-fp32 eager-bf16 fast fast-ckpt]
        [--scenes 32] [--rays 8192] [--max-scenes 512] [--profile] [--no-save]
    python -m benchmarks.speed.bench_train_step --smoke    # tiny model, CPU: checks the script

MSN-Hard settings: 5 input views of 128x128, K = 32 slots, the paper's widths, `--rays` target
rays per scene. One step is what train.py runs: `parallel.parallelize` (activation
checkpointing, torch.compile), the forward pass under the path's precision, MSE, backward, the
global gradient norm (the non-finite check), fused Adam. Paths:

    eager-fp32   eager backend, fp32, TF32 off              (the reference's setting)
    eager-bf16   eager backend, bf16 autocast
    fast         triton backend + compile + bf16 autocast
    fast-ckpt    fast + activation checkpointing of every region (decoder chunks of 1024 rays)

For each path: the time of a step at `--scenes` scenes (equal work across paths; ratio to
eager-fp32), then the largest number of scenes per step that fits (doubling from `--scenes`,
then bisecting to 8 scenes), and its time. Model FLOPs are the count training logs MFU with
(`osrt_fast.throughput.model_flops_per_scene`: the eager reference architecture, forward x 3,
docs/flop_model.md), MFU is against the GPU's dense bf16 peak (`throughput.PEAK_FLOPS`). `--profile` writes the largest costs
of one step per path (torch.profiler) next to the results. Appends JSON lines to
benchmarks/results/train_step.jsonl.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    # Triton reads this when a kernel is decorated, i.e. when osrt_fast (below) imports kernels/.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks.common import (MSN_HARD_MODEL, RESULTS_DIR, TINY_MODEL, append_result,  # noqa: E402
                               environment, quantiles)
from osrt_fast import parallel  # noqa: E402
from osrt_fast.config import config_from_dict  # noqa: E402
from osrt_fast.model import OSRT  # noqa: E402
from osrt_fast.evaluate import compute_loss  # noqa: E402
from osrt_fast.throughput import model_flops_per_scene, peak_flops  # noqa: E402

PATHS = {
    "eager-fp32": dict(backend="eager", precision="fp32", compile=False, ckpt={}),
    "eager-bf16": dict(backend="eager", precision="bf16", compile=False, ckpt={}),
    # The fast path's algebra in plain PyTorch: the fastest CPU paths (benchmarks/speed/bench_cpu.py).
    "folded-fp32": dict(backend="folded", precision="fp32", compile=False, ckpt={}),
    "folded-bf16": dict(backend="folded", precision="bf16", compile=False, ckpt={}),
    "fast": dict(backend="triton", precision="bf16", compile=True, ckpt={}),
    "fast-ckpt": dict(backend="triton", precision="bf16", compile=True,
                      ckpt={"encoder_blocks": True, "slot_attention": True, "decoder_ray_chunk": 1024}),
}


def random_batch(scenes, views, size, rays, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, 3, device=device, generator=g), dim=-1)  # noqa: E731
    return {"input_images": torch.rand(scenes, views, 3, size, size, device=device, generator=g),
            "input_camera_pos": unit(scenes, views) * 10, "input_rays": unit(scenes, views, size, size),
            "target_camera_pos": unit(scenes, rays) * 10, "target_rays": unit(scenes, rays),
            "target_pixels": torch.rand(scenes, rays, 3, device=device, generator=g)}


def step_flops_per_scene(model_cfg, shape):
    """Model FLOPs of one training step per scene at `shape` (input views, image size, target
    rays): osrt_fast.throughput's count, on the meta device; None where the counter fails."""
    views, size, rays = shape
    return model_flops_per_scene(model_cfg, random_batch(1, views, size, rays, torch.device("cpu")))


class Step:
    """One path's model, optimizer and training step, built as train.py builds them."""

    def __init__(self, path: str, model_cfg: dict, device, ray_chunk=None, compile_backend=None):
        spec = PATHS[path]
        ckpt = dict(spec["ckpt"])
        if ckpt and ray_chunk:
            ckpt["decoder_ray_chunk"] = ray_chunk
        self.cfg = config_from_dict({"model": dict(model_cfg, backend=spec["backend"]),
                                     "training": {"precision": spec["precision"],
                                                  "compile": spec["compile"],
                                                  "activation_checkpointing": ckpt}})
        torch.manual_seed(0)
        self.device = device
        model = OSRT(self.cfg.model).to(device)
        kwargs = {"backend": compile_backend} if compile_backend else None
        self.model = parallel.parallelize(model, self.cfg.training, compile_kwargs=kwargs)
        self.params = [p for p in self.model.parameters()]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-5, fused=True)

    def __call__(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        with parallel.autocast(self.device, self.cfg.training.precision):
            mse, _ = compute_loss(self.model, batch)
        mse.mean().backward()
        parallel.grad_norm_and_clip(self.params)
        self.optimizer.step()


def time_steps(step, batch, device, warmup, repeat):
    for _ in range(warmup):
        step(batch)
    if device.type == "cuda":
        from benchmarks.common import time_cuda
        return time_cuda(lambda: step(batch), warmup=0, repeat=repeat)
    import time
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step(batch)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(path, scenes, args, env, shape, device, after=None, build=None):
    """A record for one path at one batch, or an 'oom' record. `build(scenes)` -> (step, batch)
    makes what is timed (default: this script's `Step` of `path` and a random batch; the GPU
    suite passes the reference's trainer); `after(step, batch)`, if given, runs once the step is
    timed, before it is freed (e.g. a profile of the compiled step). `args.flops_per_scene` (model
    FLOPs of a step per scene at `shape`) and `args.peak` (FLOP/s) give model TFLOP/s and MFU."""
    views, size, rays = shape
    spec = PATHS.get(path, {})
    rec = {"bench": "train_step", "path": path, **{k: v for k, v in spec.items() if k != "ckpt"},
           "checkpointing": spec.get("ckpt") or None, "scenes": scenes, "rays": rays,
           "views": views, "image": size, "slots": args.slots, **env}
    if build is None:
        def build(n):
            return (Step(path, args.model, device, compile_backend=args.compile_backend),
                    random_batch(n, views, size, rays, device))
    torch._dynamo.reset()
    step = batch = None
    try:
        step, batch = build(scenes)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = time_steps(step, batch, device, args.warmup, args.repeat)
        peak_mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
        if after is not None:
            after(step, batch)
    except torch.OutOfMemoryError:
        rec["oom"] = True
        return rec
    finally:
        del step, batch
        free(device)
    q = quantiles(times)
    seconds = q["median_ms"] * 1e-3
    flops_per_s = args.flops_per_scene * scenes / seconds if args.flops_per_scene else None
    rec.update(q, scenes_per_s=scenes / seconds, rays_per_s=scenes * rays / seconds,
               tflops_per_s=flops_per_s / 1e12 if flops_per_s else None,
               mfu=flops_per_s / args.peak if flops_per_s and args.peak else None,
               peak_mem_gib=peak_mem)
    return rec


def largest_fitting(path, start, args, env, shape, device):
    """(largest scenes per step that fit, its record): doubling from `start`, then bisection to
    `args.granularity` scenes; None if even `start` does not fit."""
    good, bad, rec_good = None, None, None
    n = start
    while n <= args.max_scenes:
        rec = measure(path, n, args, env, shape, device)
        if rec.get("oom"):
            bad = n
            break
        good, rec_good = n, rec
        n *= 2
    if good is None:
        return None, None
    while bad is not None and bad - good > args.granularity:
        mid = (good + bad) // 2 // args.granularity * args.granularity or good + 1
        rec = measure(path, mid, args, env, shape, device)
        if rec.get("oom"):
            bad = mid
        else:
            good, rec_good = mid, rec
    return good, rec_good


def profile_step(step, batch, device, rows: int = 20) -> str:
    """The largest costs of one call of a built, warmed-up step (torch.profiler), as a table."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort = "cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "cuda_time_total"
    with torch.profiler.profile(activities=activities) as prof:
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def profile(path, scenes, args, shape, device) -> str:
    """The largest costs of one step of `path` (built and warmed up here), as a table."""
    views, size, rays = shape
    torch._dynamo.reset()
    step = Step(path, args.model, device, compile_backend=args.compile_backend)
    batch = random_batch(scenes, views, size, rays, device)
    for _ in range(2):
        step(batch)
    table = profile_step(step, batch, device)
    del step, batch
    free(device)
    return table


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.bench_train_step",
                                description=__doc__.splitlines()[0])
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--scenes", type=int, default=32, help="scenes per step for the equal-work timing")
    p.add_argument("--rays", type=int, default=8192)
    p.add_argument("--max-scenes", type=int, default=512)
    p.add_argument("--granularity", type=int, default=8)
    p.add_argument("--no-search", action="store_true", help="skip the largest-batch search")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (Triton interpreter)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    env = environment()
    if args.smoke:
        device = torch.device("cpu")
        args.model, args.slots, shape = TINY_MODEL, TINY_MODEL["encoder_kwargs"]["num_slots"], (2, 16, 32)
        args.scenes, args.max_scenes, args.warmup, args.repeat = 2, 2, 1, 1
        args.compile_backend = "aot_eager"         # traces as inductor would, without its C++ build
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_train_step needs a CUDA GPU (or --smoke for a CPU check of the script)")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False      # the reference's fp32
        torch.backends.cudnn.allow_tf32 = False
        torch._dynamo.config.cache_size_limit = 64
        args.model, args.slots, shape = MSN_HARD_MODEL, 32, (5, 128, args.rays)
        args.compile_backend = None
    args.flops_per_scene = step_flops_per_scene(args.model, shape)
    args.peak = peak_flops(device)          # None on the CPU: model TFLOP/s without MFU

    rows, base = [], None
    for path in args.paths:
        rec = measure(path, args.scenes, args, env, shape, device)
        if not rec.get("oom") and path == "eager-fp32":
            base = rec["scenes_per_s"]
        if not rec.get("oom") and base:
            rec["speedup_vs_eager_fp32"] = rec["scenes_per_s"] / base
        rows.append(rec)
        if not args.no_search:
            n, best = largest_fitting(path, args.scenes, args, env, shape, device)
            rows.append(dict(best or rec, bench="train_step_largest", largest_scenes=n))
        if args.profile:
            table = profile(path, args.scenes, args, shape, device)
            name = f"train_step_profile_{path}_{env['commit']}.txt"
            if not args.no_save:
                os.makedirs(RESULTS_DIR, exist_ok=True)
                with open(os.path.join(RESULTS_DIR, name), "w") as f:
                    f.write(f"{env}\n{path}, {args.scenes} scenes x {shape[2]} rays\n{table}\n")
            print(f"profile of {path}:\n{table}")

    print(f"{'bench':19} {'path':11} {'scenes':>6} {'rays':>6} {'median ms':>10} {'scenes/s':>9} "
          f"{'rays/s':>9} {'MFU':>6} {'peak GiB':>9} {'vs fp32':>8}")
    for r in rows:
        if not args.no_save:
            append_result("train_step", r)
        if r.get("oom"):
            print(f"{r['bench']:19} {r['path']:11} {r['scenes']:>6} {r['rays']:>6}  out of memory")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        mem = f"{r['peak_mem_gib']:.2f}" if r.get("peak_mem_gib") is not None else "-"
        ratio = f"{r['speedup_vs_eager_fp32']:.2f}x" if r.get("speedup_vs_eager_fp32") else "-"
        scenes = r.get("largest_scenes") or r["scenes"]
        print(f"{r['bench']:19} {r['path']:11} {scenes:>6} {r['rays']:>6} {r['median_ms']:>10.2f} "
              f"{r['scenes_per_s']:>9.1f} {r['rays_per_s']:>9.3g} {mfu:>6} {mem:>9} {ratio:>8}")


if __name__ == "__main__":
    main()
