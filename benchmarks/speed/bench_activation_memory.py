"""The Slot Mixer decoder's activation memory, counted independently of the device.

    python -m benchmarks.speed.bench_activation_memory [--dtype fp32 bf16] [--rays 64 128]
                                                       [--small] [--breakdown] [--no-save]

Counts the bytes of the tensors autograd saves for backward during one decoder forward
(torch.autograd.graph.saved_tensors_hooks), each storage once (by its untyped storage's
data_ptr), leaving out the parameters and the inputs passed in (slots, camera positions, rays).
This is what a training step keeps alive between forward and backward, beyond the model; it is
the same on any device up to the attention kernel chosen by SDPA (which differs by device).

Three forwards separate the parts: (B, R) = (1, R1), (1, R2) and (2, R1) give
    per ray    = (n(1, R2) - n(1, R1)) / (R2 - R1)
    per scene  = n(2, R1) - n(1, R1) - R1 * per ray     (e.g. per-scene folded matrices)
    constant   = n(1, R1) - per scene - R1 * per ray    (e.g. autocast's casts of the weights)
and the extrapolation to a training batch of 32 scenes x 8192 rays is
    constant + 32 * per scene + 32 * 8192 * per ray.

Paths: the model's "eager" and "triton" backends (model.set_backend), on the Slot Mixer at the
paper's widths (K = 32 slots of 1536; --small: the tiny test widths). fp32, and bf16 = slots in
bf16 under torch.autocast(device, bfloat16); camera positions and rays stay fp32.
Runs on CUDA when available, else on the CPU with the Triton kernels in the interpreter (only the
forward runs, so a few seconds per count at the paper's widths). Rows are appended to
benchmarks/results/activation_memory.jsonl unless --no-save.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import torch

if not torch.cuda.is_available():
    # Before osrt_fast / kernels are imported: Triton picks the interpreter when a kernel is
    # decorated, and without a GPU the Triton backend can only run there.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import MSN_HARD_MODEL, TINY_MODEL, append_result, environment  # noqa: E402
from osrt_fast.model import OSRT  # noqa: E402

TRAIN_SCENES, TRAIN_RAYS = 32, 8192      # the extrapolation's batch


class SavedTensors:
    """Context manager recording the distinct storages autograd saves for backward inside it.

    `exclude`: tensors whose storages are not counted (parameters, inputs). The storages are
    held until the object is dropped, so that no address is freed and reused while counting.
    """

    def __init__(self, exclude):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages = {}        # data_ptr -> (storage, shape, dtype) of the first tensor seen
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() and ptr not in self.excluded and ptr not in self.storages:
            self.storages[ptr] = (storage, tuple(t.shape), t.dtype)
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s, _, _ in self.storages.values())


def count_saved(model, dtype: str, scenes: int, rays: int, device, seed: int = 0) -> SavedTensors:
    """One decoder forward (autograd recording) on random inputs: slots [scenes, K, D] (requiring
    grad, as the encoder's output does in training), camera_pos and rays [scenes, rays, 3]."""
    K, D = model.slot_attention.num_slots, model.slot_attention.slot_dim
    g = torch.Generator(device).manual_seed(seed)
    low = torch.bfloat16 if dtype == "bf16" else torch.float32
    slots = torch.randn(scenes, K, D, generator=g, device=device).to(low).requires_grad_()
    unit = lambda: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(scenes, rays, 3, generator=g, device=device), dim=-1)
    camera_pos, ray_dirs = unit() * 10, unit()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    counter = SavedTensors([*model.parameters(), slots, camera_pos, ray_dirs])
    with autocast, counter:
        pixels, extras = model.decoder(slots, camera_pos, ray_dirs)
    del pixels, extras    # the graph goes; the counter still holds the storages it saw
    return counter


def measure(model, path: str, dtype: str, r1: int, r2: int, device, breakdown: bool) -> dict:
    """Bytes per ray, per scene and constant for one path and dtype (see the module docstring)."""
    n = {}
    for scenes, rays in ((1, r1), (1, r2), (2, r1)):
        counter = count_saved(model, dtype, scenes, rays, device)
        n[(scenes, rays)] = counter.nbytes
        if breakdown and (scenes, rays) == (1, r2):
            print(f"-- {path} {dtype}: saved for backward at 1 scene x {r2} rays")
            for s, shape, dt in sorted(counter.storages.values(), key=lambda v: -v[0].nbytes())[:20]:
                print(f"   {s.nbytes():>10} B  {str(dt).replace('torch.', ''):9} {list(shape)}")
        del counter
    per_ray = (n[(1, r2)] - n[(1, r1)]) / (r2 - r1)
    per_scene = n[(2, r1)] - n[(1, r1)] - r1 * per_ray
    constant = n[(1, r1)] - per_scene - r1 * per_ray
    total = constant + TRAIN_SCENES * per_scene + TRAIN_SCENES * TRAIN_RAYS * per_ray
    return {"bench": "decoder_saved_activations", "path": path, "dtype": dtype,
            "counts": {f"{b}x{r}": v for (b, r), v in n.items()},
            "bytes_per_ray": per_ray, "bytes_per_scene": per_scene, "bytes_constant": constant,
            "gib_at_32x8192": total / 2 ** 30}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.bench_activation_memory",
                                description=__doc__.splitlines()[0])
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--rays", nargs=2, type=int, default=[64, 128], metavar=("R1", "R2"))
    p.add_argument("--small", action="store_true", help="the tiny test widths instead of the paper's")
    p.add_argument("--breakdown", action="store_true", help="list the largest saved tensors")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    r1, r2 = sorted(args.rays)
    if r1 == r2:
        p.error("--rays needs two different ray counts")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = TINY_MODEL if args.small else MSN_HARD_MODEL
    model = OSRT(cfg).to(device)
    env = environment()
    shapes = {"widths": "small" if args.small else "paper", "slots": cfg["encoder_kwargs"]["num_slots"],
              "rays": [r1, r2], "device": device.type}
    rows = []
    for dtype in args.dtype:
        for path in ("eager", "triton"):
            row = {"bench": "decoder_saved_activations", "path": path, "dtype": dtype, **shapes}
            try:
                model.set_backend(path)
                row.update(measure(model, path, dtype, r1, r2, device, args.breakdown))
            except Exception as e:     # e.g. no Triton here: a row that says why
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
    model.set_backend("eager")
    eager = {r["dtype"]: r for r in rows if r["path"] == "eager" and "error" not in r}
    for r in rows:
        base = eager.get(r["dtype"])
        if base and "error" not in r:
            r["per_ray_vs_eager"] = r["bytes_per_ray"] / base["bytes_per_ray"]
            r["total_vs_eager"] = r["gib_at_32x8192"] / base["gib_at_32x8192"]
    for r in rows:
        if not args.no_save:
            append_result("activation_memory", {**r, **env})

    print(f"decoder activations saved for backward ({shapes['widths']} widths, K={shapes['slots']}, "
          f"rays {r1} and {r2}, on {device.type})")
    print(f"{'path':7} {'dtype':5} {'bytes/ray':>10} {'KiB/scene':>10} {'MiB const':>10} "
          f"{'GiB@32x8192':>12} {'ray ratio':>10} {'total ratio':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['path']:7} {r['dtype']:5} error: {r['error']}")
            continue
        print(f"{r['path']:7} {r['dtype']:5} {r['bytes_per_ray']:>10.0f} "
              f"{r['bytes_per_scene'] / 2 ** 10:>10.1f} {r['bytes_constant'] / 2 ** 20:>10.2f} "
              f"{r['gib_at_32x8192']:>12.3f} "
              f"{r['per_ray_vs_eager']:>10.3f} {r['total_vs_eager']:>12.3f}")
    print("ratios: triton / eager at the same dtype")


if __name__ == "__main__":
    main()
