"""Training: the reference's loop (schedule, checkpoints, evaluation, visualisation), exactly resumable.

The batch stream is a function of (training.seed, iteration) alone: each batch is a list of
(item index, sample seed) pairs, so a run resumed at iteration `it` sees the same batches as one
that never stopped. 'it' in a checkpoint counts completed training steps, as in the reference.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections import defaultdict
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state,
                         save_checkpoint)
from .config import Config, ConfigError
from .data import (DataError, collate, get_dataset, loader_kwargs, make_batch, to_device,
                   worker_init_fn)
from .geometry import rotate_about_z
from .metrics import adjusted_rand_index, fg_ari, psnr
from .model import OSRT

EVAL_SEED = 1_000_003


class LrSchedule:
    """Linear warm-up to `peak_lr` over `warmup` steps, then
    peak_lr * decay_rate ** ((it - warmup) / decay_it) (the reference's LrScheduler)."""

    def __init__(self, peak_lr=1e-4, warmup=2500, decay_rate=0.16, decay_it=4_000_000):
        self.peak_lr, self.warmup, self.decay_rate, self.decay_it = peak_lr, warmup, decay_rate, decay_it

    def __call__(self, it: int) -> float:
        if it < self.warmup:
            return self.peak_lr * it / self.warmup
        return self.peak_lr * self.decay_rate ** ((it - self.warmup) / self.decay_it)

    @classmethod
    def from_config(cls, t) -> "LrSchedule":
        return cls(t.peak_lr, t.lr_warmup, t.decay_rate, t.decay_it)

    def state_dict(self) -> dict:
        return {"peak_lr": self.peak_lr, "warmup": self.warmup, "decay_rate": self.decay_rate,
                "decay_it": self.decay_it}


def item_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class ResumableBatchSampler(Sampler):
    """Endless batches of (index, seed) pairs; batch `it` depends only on (seed, it).

    Epoch e visits a permutation drawn from (seed, e); the last incomplete batch of an epoch is
    dropped (unless the dataset is smaller than a batch, when indices wrap around).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_it: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.start_it = num_items, batch_size, seed, start_it
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = max(1, num_items // self.global_batch)

    def batch(self, it: int) -> list:
        epoch, pos = divmod(it, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(item_seed(self.seed, epoch)))
        first = pos * self.global_batch + self.rank * self.batch_size
        return [(int(perm[(first + j) % self.n]), item_seed(self.seed, it, self.rank, j))
                for j in range(self.batch_size)]

    def __iter__(self):
        it = self.start_it
        while True:
            yield self.batch(it)
            it += 1

    def __len__(self):       # endless; DataLoader only needs a number
        return sys.maxsize


class FixedSampler(Sampler):
    """Evaluation batches: items in order, each with a fixed ray-sample seed (reproducible metrics)."""

    def __init__(self, num_items: int, batch_size: int):
        self.n, self.batch_size = num_items, batch_size

    def __iter__(self):
        for start in range(0, self.n, self.batch_size):
            yield [(i, item_seed(EVAL_SEED, i)) for i in range(start, min(self.n, start + self.batch_size))]

    def __len__(self):
        return math.ceil(self.n / self.batch_size)


def _worker_init(worker_id: int) -> None:
    # Ctrl-C goes to the whole process group; workers leave it to the main process, which
    # finishes its step, saves and shuts them down (a worker dying first would break the save).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_init_fn(worker_id)


def is_stream(dataset) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


def record_loader(dataset, batch_size: int, loader_kw: dict, train: bool, seed: int = 0,
                  start_it: int = 0) -> DataLoader:
    """DataLoader of collated scene records: resumable (index, seed) batches for map-style
    datasets, in-order batches for evaluation, and plain batches of a stream."""
    kw = dict(loader_kw, **loader_kwargs(dataset, loader_kw.get("num_workers", 0)))
    if is_stream(dataset):
        return DataLoader(dataset, batch_size=batch_size, drop_last=train, **kw)
    sampler = (ResumableBatchSampler(len(dataset), batch_size, seed, start_it=start_it) if train
               else FixedSampler(len(dataset), batch_size))
    return DataLoader(dataset, batch_sampler=sampler, **kw)


def first_records(dataset, n: int) -> dict:
    """The first n items (with evaluation seeds), collated: for visualisations."""
    if is_stream(dataset):
        import itertools
        return collate(list(itertools.islice(iter(dataset), n)))
    return collate([dataset[(i, item_seed(EVAL_SEED, i))] for i in range(n)])


class GracefulInterrupt:
    """First Ctrl-C: finish the current step, then save and stop (exactly resumable).
    A second Ctrl-C raises KeyboardInterrupt at once (e.g. during a long evaluation)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving model.pt (press Ctrl-C again to "
              "stop at once).", file=sys.stderr, flush=True)

    def __enter__(self):
        # Signal handlers can only be set from the main thread (not e.g. in a notebook worker).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None
                          else signal.default_int_handler)
        return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device is {name!r} but CUDA is not available; use 'cpu' or 'auto'")
    return device


def decode_in_chunks(decoder, latents, camera_pos, rays, max_rays: int = 65536):
    """Decoder over [B, R, 3] rays in chunks of at most `max_rays` rays in all; concatenates outputs."""
    step = max(1, max_rays // camera_pos.shape[0])
    if rays.shape[1] <= step:
        return decoder(latents, camera_pos, rays)
    pixels, extras = [], defaultdict(list)
    for i in range(0, rays.shape[1], step):
        p, e = decoder(latents, camera_pos[:, i:i + step], rays[:, i:i + step])
        pixels.append(p)
        for k, v in e.items():
            extras[k].append(v)
    return torch.cat(pixels, 1), {k: torch.cat(v, 1) for k, v in extras.items()}


def compute_loss(model, batch: dict, max_rays: Optional[int] = None):
    """Per-scene MSE [B] and metric terms ([B] each: mse, and ari / fg_ari for slot decoders)."""
    latents = model.encoder(batch["input_images"], batch["input_camera_pos"], batch["input_rays"])
    if max_rays is None:
        pixels, extras = model.decoder(latents, batch["target_camera_pos"], batch["target_rays"])
    else:
        pixels, extras = decode_in_chunks(model.decoder, latents, batch["target_camera_pos"],
                                          batch["target_rays"], max_rays)
    mse = (pixels.float() - batch["target_pixels"]).square().mean((1, 2))
    terms = {"mse": mse.detach()}
    if "segmentation" in extras and "target_masks" in batch:
        with torch.no_grad():
            seg, masks = extras["segmentation"].float(), batch["target_masks"].float()
            terms["ari"] = adjusted_rand_index(masks, seg).float()
            terms["fg_ari"] = fg_ari(masks, seg).float()
    return mse, terms


@torch.no_grad()
def evaluate(model, loader, device, spec, max_rays: int = 65536, progress: bool = True) -> dict:
    """Mean over scenes of psnr, mse, ari and fg_ari (per-scene PSNR, as the reference).
    The loader yields scene records; `spec` (the dataset's BatchSpec) turns them into inputs."""
    model.eval()
    values = defaultdict(list)
    try:
        from tqdm import tqdm
        it = tqdm(loader, desc="evaluating", leave=False, dynamic_ncols=True, disable=not progress)
    except ImportError:
        it = loader
    for batch in it:
        batch = make_batch(to_device(batch, device), spec)
        _, terms = compute_loss(model, batch, max_rays=max_rays)
        terms["psnr"] = psnr(terms["mse"])
        for k, v in terms.items():
            values[k].append(v.double().cpu())
    model.train()
    if not values:
        raise DataError("the evaluation split has no scenes")
    out = {k: torch.cat(v).mean().item() for k, v in values.items()}
    out["num_scenes"] = sum(len(v) for v in values["mse"])
    return out


@torch.no_grad()
def visualize(model, batch: dict, path: str, device, num_angles: int = 6, max_rays: int = 16384):
    """A grid per scene: input views, true segmentation, renders and predicted segmentations from
    cameras rotated about the scene's z axis."""
    from .rendering import render_image
    from .visualize import draw_visualization_grid

    model.eval()
    batch = to_device(batch, device)
    images, cam, rays = batch["input_images"], batch["input_camera_pos"], batch["input_rays"]
    latents = model.encoder(images, cam, rays)
    columns = [(f"input {i + 1}" if images.shape[1] > 1 else "input",
                images[:, i].permute(0, 2, 3, 1).cpu().numpy(), "image") for i in range(images.shape[1])]
    labels = None
    if "input_masks" in batch:
        true = batch["input_masks"][:, 0]
        columns.append(("true seg 0°", true.argmax(-1).cpu().numpy(), "clustering"))
    for i in range(num_angles):
        angle = 2 * math.pi * i / num_angles
        img, extras = render_image(model.decoder, latents, rotate_about_z(cam[:, 0], angle),
                                   rotate_about_z(rays[:, 0], angle), max_rays=max_rays)
        columns.append((f"render {360 * i // num_angles}°", img.clamp(0, 1).cpu().numpy(), "image"))
        if "segmentation" in extras:
            seg = extras["segmentation"]
            columns.append((f"pred seg {360 * i // num_angles}°", seg.argmax(-1).cpu().numpy(),
                            "clustering"))
            if i == 0 and "input_masks" in batch:
                score = fg_ari(true.flatten(1, 2).float(), seg.flatten(1, 2).float())
                labels = [f"FG-ARI {100 * s:.1f}" for s in score.tolist()]
    draw_visualization_grid(columns, path, row_labels=labels)
    model.train()


# Dense bf16 matrix-product peaks measured on the lent machines (docs: spec/PERFORMANCE.md);
# MFU is reported against these whatever dtype the step runs in, so numbers stay comparable.
PEAK_FLOPS = {"H100": 798e12, "H200": 790e12}


def training_flops_per_scene(model, batch: dict) -> Optional[float]:
    """Model FLOPs of one training step per scene: forward FLOPs of the first scene x 3
    (backward ~ 2x forward), counted on the eager model as spec/PERFORMANCE.md asks.
    None where the counter cannot trace the model."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
        one = {k: v[:1] for k, v in batch.items() if torch.is_tensor(v)}
        # Not under no_grad: the counter's module tracker needs autograd (torch 2.x); the graph
        # of this one scene is dropped straight away.
        with FlopCounterMode(display=False) as counter:
            latents = model.encoder(one["input_images"], one["input_camera_pos"], one["input_rays"])
            model.decoder(latents, one["target_camera_pos"], one["target_rays"])
        return 3.0 * counter.get_total_flops()
    except Exception:       # a counter failure must never stop training
        return None


def peak_flops(device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def append_log(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def run_dir_for(config_path: str, override: Optional[str] = None) -> str:
    """The reference's convention: a `config.yaml` trains in its folder; other configs in runs/<stem>."""
    if override:
        return override
    if os.path.basename(config_path) == "config.yaml":
        return os.path.dirname(os.path.abspath(config_path))
    return os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])


class NonFiniteLossError(RuntimeError):
    pass


def train(cfg: Config, run_dir: str, args) -> int:
    """The training loop. Returns a process exit code."""
    t = cfg.training
    device = resolve_device(t.device)
    torch.manual_seed(t.seed)
    os.makedirs(run_dir, exist_ok=True)

    print("Loading training set...")
    train_set = get_dataset("train", cfg.data)
    eval_split = "test" if args.test else "val"
    print(f"Loading {eval_split} set...")
    eval_set = get_dataset(eval_split, cfg.data, max_len=args.max_eval, full_scale=args.full_scale)

    model = OSRT(cfg.model).to(device)
    model.check_device(device)
    schedule = LrSchedule.from_config(t)
    use_fused = device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule(0), fused=use_fused or None)

    it, epoch_it, elapsed, run_id = 0, 0, 0.0, None
    sign = 1 if t.model_selection_mode == "maximize" else -1
    best = -sign * math.inf
    resume = os.path.join(run_dir, f"model_{t.max_it}.pt")
    if not os.path.exists(resume):
        resume = os.path.join(run_dir, "model.pt")
    if os.path.exists(resume):
        state = load_checkpoint(resume, model, optimizer, map_location=device)
        it, epoch_it = int(state.get("it", 0)), int(state.get("epoch_it", 0))
        elapsed, run_id = float(state.get("t", 0.0)), state.get("run_id")
        best = float(state.get("loss_val_best", best))
        extras = state.get("osrt_fast") or {}
        restore_rng_state(extras.get("rng"))
        if "seed" in extras and extras["seed"] != t.seed:
            print(f"warning: {resume} was trained with training.seed {extras['seed']}, the config "
                  f"says {t.seed}: the batch stream from here on differs from the original run's")
        if extras.get("lr_scheduler") not in (None, schedule.state_dict()):
            print(f"note: the LR schedule changed since {resume} was written "
                  f"({extras['lr_scheduler']} -> {schedule.state_dict()}); using the config's")
        print(f"Resumed from {resume} at iteration {it} (lr {schedule(it):.3g}).")
    max_it = args.exit_after if args.exit_after is not None else t.max_it

    if args.print_model:
        print(model)
        for name, p in model.named_parameters():
            print(f"{name:80}{str(list(p.shape)):20}{p.numel():10d}")
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    print(f"Parameters: encoder {n_enc:,}, decoder {n_dec:,}, total {n_enc + n_dec:,}. Device {device}.")

    wandb = None
    if args.wandb:
        try:
            import wandb as _wandb
            wandb = _wandb
            run_id = run_id or wandb.util.generate_id()
            wandb.init(project="osrt-fast", name=run_dir, id=run_id, resume="allow", config=cfg.to_dict())
        except ImportError:
            print("--wandb: the wandb package is not installed (pip install 'osrt-fast[wandb]'); "
                  "continuing without it.")

    workers = t.num_workers
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda",
                     worker_init_fn=_worker_init, persistent_workers=workers > 0)
    eval_bs = t.eval_batch_size or max(1, t.batch_size // 8)
    use_dali = cfg.data.loader == "dali"
    if use_dali:
        from .data.dali import DaliShardLoader
        eval_loader = DaliShardLoader(eval_set, eval_bs, device=device.type, train=False,
                                      num_threads=max(1, workers))
    else:
        eval_loader = record_loader(eval_set, eval_bs, loader_kw, train=False)
    vis_n = min(t.vis_scenes, len(eval_set), len(train_set))
    vis_val = first_records(eval_set, vis_n)
    vis_train = first_records(train_set, vis_n)
    max_rays = cfg.data.num_points * t.batch_size

    def checkpoint(name: str):
        save_checkpoint(os.path.join(run_dir, name), model, optimizer, it=it,
                        epoch_it=it // max(1, len(train_set) // t.batch_size), t=elapsed, loss_val_best=best,
                        run_id=run_id, extras={"lr_scheduler": schedule.state_dict(),
                                               "rng": capture_rng_state(), "seed": t.seed})

    def run_eval():
        nonlocal best
        print(f"Evaluating on {eval_split} ({len(eval_set)} items)...")
        result = evaluate(model, eval_loader, device, eval_set.spec, max_rays=max_rays)
        print(f"Evaluation at it={it}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
        append_log(run_dir, {"it": it, "split": eval_split, **result})
        if wandb:
            wandb.log({f"val/{k}": v for k, v in result.items()}, step=it)
        metric = result[t.model_selection_metric]
        if sign * (metric - best) > 0:
            best = metric
            checkpoint("model_best.pt")
            print(f"New best model ({t.model_selection_metric} {best:.4f}), saved model_best.pt")

    def run_vis():
        visualize(model, make_batch(vis_val, eval_set.spec), os.path.join(run_dir, "renders-val.png"),
                  device, max_rays=max_rays)
        visualize(model, make_batch(vis_train, train_set.spec),
                  os.path.join(run_dir, "renders-train.png"), device, max_rays=max_rays)
        print(f"Visualisations written to {run_dir}/renders-{{val,train}}.png")

    from tqdm import tqdm
    if use_dali:
        loader = DaliShardLoader(train_set, t.batch_size, device=device.type, seed=t.seed,
                                 start_it=it, num_threads=max(1, workers))
    else:
        loader = record_loader(train_set, t.batch_size, loader_kw, train=True, seed=t.seed,
                               start_it=it)
    if is_stream(train_set) and it > 0:
        print(f"note: {cfg.data.dataset} is read as a stream, so the resumed run sees other scenes "
              f"than the original would have (convert it to shards for exactly resumable runs)")
    bar = tqdm(total=max_it, initial=it, desc="training", dynamic_ncols=True)
    nonfinite, rate_t, rate_it = 0, time.perf_counter(), it
    params = [p for p in model.parameters() if p.requires_grad]
    flops_per_scene, peak = None, peak_flops(device)
    model.train()
    with GracefulInterrupt() as stop:
        try:
            if args.evalnow:
                run_eval()
            if args.visnow:
                run_vis()
            batches = iter(loader)
            while it < max_it:
                # Checked between steps, so a first Ctrl-C saves a consistent, resumable state.
                if stop.requested:
                    raise KeyboardInterrupt
                batch = make_batch(to_device(next(batches), device), train_set.spec)
                if flops_per_scene is None:
                    flops_per_scene = training_flops_per_scene(model, batch) or 0.0
                lr = schedule(it)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                mse, terms = compute_loss(model, batch)
                loss = mse.mean()
                loss.backward()
                # A finite loss can still overflow in the backward pass: check both with a
                # single host sync per step.
                grads = [p.grad for p in params if p.grad is not None]
                checks = [loss.detach().float().reshape(1)]
                if grads:
                    checks.append(torch.stack(torch._foreach_norm(grads)).float())
                if not bool(torch.cat(checks).isfinite().all()):
                    nonfinite += 1
                    what = "loss" if not torch.isfinite(loss) else "gradients"
                    warnings.warn(f"non-finite {what} (loss {loss.item()}) at iteration {it}; "
                                  f"optimizer step skipped ({nonfinite} in a row, stopping at "
                                  f"{t.max_nonfinite_steps})")
                    if nonfinite >= t.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{nonfinite} non-finite losses in a row at iteration {it}; stopping "
                            f"without saving, so the last good checkpoint in {run_dir} stays "
                            f"untouched. Lower training.peak_lr or check the data.")
                    optimizer.zero_grad(set_to_none=True)
                    it += 1
                    bar.update(1)
                    continue
                nonfinite = 0
                optimizer.step()
                it += 1
                elapsed += time.perf_counter() - t0
                bar.update(1)

                if (t.print_every > 0 and it % t.print_every == 0) or it == max_it:
                    now = time.perf_counter()
                    steps_per_s = (it - rate_it) / max(now - rate_t, 1e-9)
                    rate_t, rate_it = now, it
                    rec = {"it": it, "loss": loss.item(), "psnr": psnr(loss.detach()).item(),
                           "lr": lr, "scenes_per_s": steps_per_s * t.batch_size,
                           "rays_per_s": steps_per_s * t.batch_size * cfg.data.num_points,
                           "time": elapsed}
                    for k in ("ari", "fg_ari"):
                        if k in terms:
                            rec[k] = terms[k].mean().item()
                    if flops_per_scene:
                        rec["tflops_per_s"] = rec["scenes_per_s"] * flops_per_scene / 1e12
                        if peak:
                            rec["mfu"] = rec["tflops_per_s"] * 1e12 / peak
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", psnr=f"{rec['psnr']:.2f}",
                                    scenes_s=f"{rec['scenes_per_s']:.1f}",
                                    rays_s=f"{rec['rays_per_s']:.3g}", lr=f"{lr:.2e}")
                    append_log(run_dir, rec)
                    if wandb:
                        wandb.log(rec, step=it)
                if t.checkpoint_every > 0 and it % t.checkpoint_every == 0:
                    checkpoint("model.pt")
                if t.backup_every > 0 and it % t.backup_every == 0:
                    checkpoint(f"model_{it}.pt")
                if t.validate_every > 0 and it % t.validate_every == 0:
                    run_eval()
                if t.visualize_every > 0 and it % t.visualize_every == 0:
                    run_vis()
        except KeyboardInterrupt:
            bar.close()
            print(f"\nInterrupted at iteration {it}; saving {os.path.join(run_dir, 'model.pt')} ...")
            checkpoint("model.pt")
            print("Saved. Run the same command to resume.")
            return 130
        except NonFiniteLossError as e:
            bar.close()
            print(f"error: {e}", file=sys.stderr)
            return 3
    bar.close()
    checkpoint("model.pt")
    print(f"Reached iteration {it}; saved {os.path.join(run_dir, 'model.pt')}.")
    return 0


def main(argv=None) -> int:
    import argparse
    import shutil

    from .config import load_config, save_config
    p = argparse.ArgumentParser(description="Train OSRT (the reference's train.py flags).")
    p.add_argument("config", help="Path to a config file (configs/*.yaml or a run's config.yaml).")
    p.add_argument("--exit-after", type=int, help="Exit after this many training iterations.")
    p.add_argument("--test", action="store_true", help="Evaluate on the test split instead of val.")
    p.add_argument("--evalnow", action="store_true", help="Run evaluation on startup.")
    p.add_argument("--visnow", action="store_true", help="Run visualisation on startup.")
    p.add_argument("--wandb", action="store_true", help="Log to Weights and Biases (optional extra).")
    p.add_argument("--max-eval", type=int, help="Limit the number of items in the evaluation set.")
    p.add_argument("--full-scale", action="store_true", help="Evaluate on full images.")
    p.add_argument("--print-model", action="store_true", help="Print the model and its parameters.")
    p.add_argument("--run-dir", help="Run directory (default: the config's folder for config.yaml, "
                                     "else runs/<config name>).")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
        run_dir = run_dir_for(args.config, args.run_dir)
        os.makedirs(run_dir, exist_ok=True)
        target = os.path.join(run_dir, "config.yaml")
        if os.path.abspath(target) != os.path.abspath(args.config):
            if os.path.exists(target):
                with open(target, "rb") as f_old, open(args.config, "rb") as f_new:
                    if f_old.read() != f_new.read():
                        print(f"note: {args.config} differs from the run's {target}; "
                              "replacing the run's copy")
            shutil.copyfile(args.config, target)
        print(f"Run directory: {run_dir}")
        return train(cfg, run_dir, args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
