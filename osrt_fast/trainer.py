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
from .config import Config, ConfigError, micro_batch_size, model_config_from_any
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
    """Endless micro-batches of (index, seed) pairs for one process; step `it` depends only on
    (seed, it), whatever the number of processes.

    `batch_size` is the global batch: the scenes of one optimizer step over all `world_size`
    processes and `accum` micro-batches each. Epoch e visits a permutation drawn from (seed, e);
    step `it` takes the next `batch_size` of it (the last incomplete batch of an epoch is
    dropped, unless the dataset is smaller than a batch, when indices wrap around). Process r,
    micro-batch m gets positions [r * B / W + m * b, ... + b) of the step's batch, b =
    B / (W * accum), each with the ray-sample seed of its position: one process with accum 2
    and two processes with accum 1 see the same scenes and rays, grouped the same way.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_it: int = 0,
                 rank: int = 0, world_size: int = 1, accum: int = 1):
        if batch_size % (world_size * accum):
            raise ValueError(f"global batch {batch_size} does not split over {world_size} "
                             f"process(es) x {accum} micro-batches")
        self.n, self.global_batch, self.seed, self.start_it = num_items, batch_size, seed, start_it
        self.rank, self.world_size, self.accum = rank, world_size, accum
        self.batch_size = batch_size // (world_size * accum)      # per micro-batch
        self.steps_per_epoch = max(1, num_items // self.global_batch)

    def batch(self, it: int, micro: int = 0) -> list:
        epoch, pos = divmod(it, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(item_seed(self.seed, epoch)))
        first = (self.rank * self.accum + micro) * self.batch_size      # position in the step
        # (The 0 stands where earlier versions put the rank, so their runs resume identically.)
        return [(int(perm[(pos * self.global_batch + first + j) % self.n]),
                 item_seed(self.seed, it, 0, first + j)) for j in range(self.batch_size)]

    def __iter__(self):
        it = self.start_it
        while True:
            for micro in range(self.accum):
                yield self.batch(it, micro)
            it += 1

    def __len__(self):       # endless; DataLoader only needs a number
        return sys.maxsize


class FixedSampler(Sampler):
    """Evaluation batches: items in order, each with a fixed ray-sample seed (reproducible metrics).
    With several processes, process r takes items r, r + W, r + 2W, ..."""

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.items = list(range(rank, num_items, world_size))
        self.batch_size = batch_size

    def __iter__(self):
        for start in range(0, len(self.items), self.batch_size):
            yield [(i, item_seed(EVAL_SEED, i)) for i in self.items[start:start + self.batch_size]]

    def __len__(self):
        return math.ceil(len(self.items) / self.batch_size)


def _worker_init(worker_id: int) -> None:
    # Ctrl-C goes to the whole process group; workers leave it to the main process, which
    # finishes its step, saves and shuts them down (a worker dying first would break the save).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker_init_fn(worker_id)


def is_stream(dataset) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


def record_loader(dataset, batch_size: int, loader_kw: dict, train: bool, seed: int = 0,
                  start_it: int = 0, rank: int = 0, world_size: int = 1, accum: int = 1) -> DataLoader:
    """DataLoader of collated scene records for this process: resumable (index, seed)
    micro-batches for map-style datasets (`batch_size` is then the global batch), in-order
    batches for evaluation (`batch_size` per process), and plain batches of a stream (which
    shards itself over processes; `batch_size` per micro-batch)."""
    kw = dict(loader_kw, **loader_kwargs(dataset, loader_kw.get("num_workers", 0)))
    if is_stream(dataset):
        micro = batch_size // (world_size * accum) if train else batch_size
        return DataLoader(dataset, batch_size=micro, drop_last=train, **kw)
    sampler = (ResumableBatchSampler(len(dataset), batch_size, seed, start_it=start_it, rank=rank,
                                     world_size=world_size, accum=accum) if train
               else FixedSampler(len(dataset), batch_size, rank, world_size))
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


def compute_loss(model, batch: dict, max_rays: Optional[int] = None):
    """Per-scene MSE [B] and metric terms ([B] each: mse, and ari / fg_ari for slot decoders).

    Runs `model(...)` (encoder and decoder), so that a sharded model's root hooks run. Under an
    autocast context the model computes in its dtype; the loss and the metrics are fp32.
    """
    pixels, extras = model(batch["input_images"], batch["input_camera_pos"], batch["input_rays"],
                           batch["target_camera_pos"], batch["target_rays"], max_rays=max_rays)
    mse = (pixels.float() - batch["target_pixels"]).square().mean((1, 2))
    terms = {"mse": mse.detach()}
    if "segmentation" in extras and "target_masks" in batch:
        with torch.no_grad(), torch.autocast(pixels.device.type, enabled=False):
            seg, masks = extras["segmentation"].float(), batch["target_masks"].float()
            terms["ari"] = adjusted_rand_index(masks, seg).float()
            terms["fg_ari"] = fg_ari(masks, seg).float()
    return mse, terms


def for_inference(model):
    """The module to run without gradients: DDP's inner module (no collectives needed); a
    sharded (FSDP) model as it is, since it must gather its parameters."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def evaluate(model, loader, device, spec, max_rays: int = 65536, progress: bool = True,
             precision: str = "fp32") -> dict:
    """Mean over scenes of psnr, mse, ari and fg_ari (per-scene PSNR, as the reference).
    The loader yields scene records; `spec` (the dataset's BatchSpec) turns them into inputs.

    With several processes, each evaluates its share of the scenes and the sums are reduced.
    All processes run the same number of forward passes (FSDP gathers parameters in each): one
    whose share is used up repeats its last batch with weight 0.
    """
    from . import parallel
    info = parallel.current()
    model = for_inference(model)
    was_training = model.training
    model.eval()
    try:
        from tqdm import tqdm
        bar = tqdm(desc="evaluating", leave=False, dynamic_ncols=True,
                   disable=not progress or not info.is_main)
    except ImportError:
        bar = None
    sums, last, batches = defaultdict(lambda: torch.zeros((), dtype=torch.float64)), None, iter(loader)
    count = 0
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
        with parallel.autocast(device, precision):
            _, terms = compute_loss(model, batch, max_rays=max_rays)
        terms["psnr"] = psnr(terms["mse"])
        for k, v in terms.items():
            sums[k] = sums[k] + weight * v.double().sum().cpu()
        count += int(weight) * len(terms["mse"])
        if bar is not None:
            bar.update(1)
    if bar is not None:
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


@torch.no_grad()
def visualize(model, batch: dict, path: Optional[str], device, num_angles: int = 6,
              max_rays: int = 16384, precision: str = "fp32"):
    """A grid per scene: input views, true segmentation, renders and predicted segmentations from
    cameras rotated about the scene's z axis. With several processes every one renders (a
    sharded model needs them all) and the one given a `path` writes it."""
    from . import parallel
    from .rendering import render_image
    from .visualize import draw_visualization_grid

    model = for_inference(model)
    was_training = model.training
    model.eval()
    batch = to_device(batch, device)
    images, cam, rays = batch["input_images"], batch["input_camera_pos"], batch["input_rays"]
    if parallel.is_sharded(model):
        # Through the root module (its hooks gather the parameters), encoding again per chunk.
        latents = None

        def decode(_, target_cam, target_rays):
            return model(images, cam, rays, target_cam, target_rays)
    else:
        with parallel.autocast(device, precision):
            latents = model.encoder(images, cam, rays)
        decode = model.decoder
    columns = [(f"input {i + 1}" if images.shape[1] > 1 else "input",
                images[:, i].permute(0, 2, 3, 1).cpu().numpy(), "image") for i in range(images.shape[1])]
    labels = None
    if "input_masks" in batch:
        true = batch["input_masks"][:, 0]
        columns.append(("true seg 0°", true.argmax(-1).cpu().numpy(), "clustering"))
    for i in range(num_angles):
        angle = 2 * math.pi * i / num_angles
        with parallel.autocast(device, precision):
            img, extras = render_image(decode, latents, rotate_about_z(cam[:, 0], angle),
                                       rotate_about_z(rays[:, 0], angle), max_rays=max_rays)
        columns.append((f"render {360 * i // num_angles}°", img.float().clamp(0, 1).cpu().numpy(), "image"))
        if "segmentation" in extras:
            seg = extras["segmentation"].float()
            columns.append((f"pred seg {360 * i // num_angles}°", seg.argmax(-1).cpu().numpy(),
                            "clustering"))
            if i == 0 and "input_masks" in batch:
                score = fg_ari(true.flatten(1, 2).float(), seg.flatten(1, 2).float())
                labels = [f"FG-ARI {100 * s:.1f}" for s in score.tolist()]
    if path is not None:
        draw_visualization_grid(columns, path, row_labels=labels)
    if was_training:
        model.train()


# Dense bf16 matrix-product peaks measured on the lent machines, random data (H100:
# spec/PERFORMANCE.md; H200: the device library's KINDS.md, 8192^3 products); MFU is reported
# against these whatever dtype the step runs in, so numbers stay comparable.
PEAK_FLOPS = {"H100": 798e12, "H200": 788e12}


def model_flops_per_scene(model_cfg, batch: dict) -> Optional[float]:
    """Model FLOPs of one training step per scene (forward x 3: backward ~ 2x forward), counted
    as spec/PERFORMANCE.md asks: on the eager reference architecture, whatever fast path runs
    (recomputation and exact rewrites do not change it). Counted on a copy of the model on the
    meta device, so no memory, no collectives and no compiled code are involved. None where the
    counter fails."""
    try:
        import copy

        from torch.utils.flop_counter import FlopCounterMode
        cfg = copy.deepcopy(model_config_from_any(model_cfg))
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
    """The training loop, on one process or on each of several started by torchrun. Returns a
    process exit code."""
    from . import parallel
    info, device = parallel.init_distributed(resolve_device(cfg.training.device))
    try:
        return _train(cfg, run_dir, args, info, device)
    except (ConfigError, DataError, CheckpointError) as e:
        if not info.distributed:
            raise
        # Said before the process group is torn down: once one process has exited, torchrun's
        # agent stops the others, and a teardown that waits on the gone peer would lose this.
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        parallel.shutdown_distributed()


def _train(cfg: Config, run_dir: str, args, info, device) -> int:
    from . import parallel
    t = cfg.training
    main_process = info.is_main
    say = print if main_process else (lambda *a, **k: None)
    micro = micro_batch_size(t, info.world_size)
    torch.manual_seed(t.seed)
    os.makedirs(run_dir, exist_ok=True)

    eval_split = "test" if args.test else "val"
    # The first process prepares the data (e.g. generates the built-in scenes) before the others read.
    for turn in (0, 1) if info.distributed else (0,):
        error = None
        if (turn == 0) == main_process:
            try:
                say("Loading training set...")
                train_set = get_dataset("train", cfg.data)
                say(f"Loading {eval_split} set...")
                eval_set = get_dataset(eval_split, cfg.data, max_len=args.max_eval,
                                       full_scale=args.full_scale)
            except (ConfigError, DataError) as e:
                if not info.distributed:
                    raise
                error = e
        # Every process learns of a failure, so all stop with a message (none waits forever).
        if info.distributed and not parallel.all_agree(error is None, device):
            if error is not None:
                raise error
            raise DataError("another process could not load the data (its message says why)")

    model = OSRT(cfg.model).to(device)
    model.check_device(device)
    if args.print_model and main_process:
        print(model)
        for name, p in model.named_parameters():
            print(f"{name:80}{str(list(p.shape)):20}{p.numel():10d}")
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    model = parallel.parallelize(model, t, info, device)
    schedule = LrSchedule.from_config(t)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=schedule(0), fused=True)

    it, elapsed, run_id = 0, 0.0, None
    sign = 1 if t.model_selection_mode == "maximize" else -1
    best = -sign * math.inf
    resume = os.path.join(run_dir, f"model_{t.max_it}.pt")
    if not os.path.exists(resume):
        resume = os.path.join(run_dir, "model.pt")
    if os.path.exists(resume):
        state = load_checkpoint(resume, model, optimizer, map_location="cpu")
        it = int(state.get("it", 0))
        elapsed, run_id = float(state.get("t", 0.0)), state.get("run_id")
        best = float(state.get("loss_val_best", best))
        extras = state.get("osrt_fast") or {}
        restore_rng_state(extras.get("rng"))
        if "seed" in extras and extras["seed"] != t.seed:
            say(f"warning: {resume} was trained with training.seed {extras['seed']}, the config "
                f"says {t.seed}: the batch stream from here on differs from the original run's")
        if extras.get("lr_scheduler") not in (None, schedule.state_dict()):
            say(f"note: the LR schedule changed since {resume} was written "
                f"({extras['lr_scheduler']} -> {schedule.state_dict()}); using the config's")
        if extras.get("world_size", 1) != info.world_size:
            say(f"note: {resume} was written by {extras.get('world_size', 1)} process(es), this "
                f"run has {info.world_size}; the global batch ({t.batch_size} scenes) is the same")
        say(f"Resumed from {resume} at iteration {it} (lr {schedule(it):.3g}).")
    max_it = args.exit_after if args.exit_after is not None else t.max_it

    strategy = (f"{info.world_size} processes, {t.parallel.upper()}" if info.distributed
                else "1 process")
    regions = {k: v for k, v in t.activation_checkpointing.items() if v}
    say(f"Parameters: encoder {n_enc:,}, decoder {n_dec:,}, total {n_enc + n_dec:,}. Device {device}, "
        f"{strategy}; global batch {t.batch_size} = {info.world_size} x {t.grad_accum} micro-batches "
        f"of {micro} scenes; {t.precision}{', compiled' if t.compile else ''}"
        f"{f', checkpointing {regions}' if regions else ''}.")

    wandb = None
    if args.wandb and main_process:
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
    eval_bs = t.eval_batch_size or max(1, t.batch_size // (8 * info.world_size))
    use_dali = cfg.data.loader == "dali"
    dali_device = str(device) if device.type == "cuda" else "cpu"
    if use_dali:
        from .data.dali import DaliShardLoader
        eval_loader = DaliShardLoader(eval_set, eval_bs, device=dali_device, train=False,
                                      num_threads=max(1, workers),
                                      batch_sampler=FixedSampler(len(eval_set), eval_bs, info.rank,
                                                                 info.world_size))
    else:
        eval_loader = record_loader(eval_set, eval_bs, loader_kw, train=False, rank=info.rank,
                                    world_size=info.world_size)
    vis_n = min(t.vis_scenes, len(eval_set), len(train_set))
    vis_val = first_records(eval_set, vis_n)
    vis_train = first_records(train_set, vis_n)
    max_rays = cfg.data.num_points * micro

    def checkpoint(name: str):
        # Every process takes part (FSDP gathers the state); the first one writes.
        save_checkpoint(os.path.join(run_dir, name), model, optimizer, it=it,
                        epoch_it=it // max(1, len(train_set) // t.batch_size), t=elapsed,
                        loss_val_best=best, run_id=run_id,
                        extras={"lr_scheduler": schedule.state_dict(), "rng": capture_rng_state(),
                                "seed": t.seed, "world_size": info.world_size})

    def run_eval():
        nonlocal best
        say(f"Evaluating on {eval_split} ({len(eval_set)} items)...")
        result = evaluate(model, eval_loader, device, eval_set.spec, max_rays=max_rays,
                          precision=t.precision)
        say(f"Evaluation at it={it}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
        if main_process:
            append_log(run_dir, {"it": it, "split": eval_split, **result})
        if wandb:
            wandb.log({f"val/{k}": v for k, v in result.items()}, step=it)
        metric = result[t.model_selection_metric]
        if sign * (metric - best) > 0:
            best = metric
            checkpoint("model_best.pt")
            say(f"New best model ({t.model_selection_metric} {best:.4f}), saved model_best.pt")

    def run_vis():
        for name, records, spec in (("val", vis_val, eval_set.spec), ("train", vis_train, train_set.spec)):
            path = os.path.join(run_dir, f"renders-{name}.png") if main_process else None
            visualize(model, make_batch(records, spec), path, device, max_rays=max_rays,
                      precision=t.precision)
        say(f"Visualisations written to {run_dir}/renders-{{val,train}}.png")

    from tqdm import tqdm
    if use_dali:
        loader = DaliShardLoader(train_set, micro, device=dali_device, seed=t.seed, start_it=it,
                                 num_threads=max(1, workers),
                                 batch_sampler=ResumableBatchSampler(
                                     len(train_set), t.batch_size, t.seed, start_it=it, rank=info.rank,
                                     world_size=info.world_size, accum=t.grad_accum))
    else:
        loader = record_loader(train_set, t.batch_size, loader_kw, train=True, seed=t.seed,
                               start_it=it, rank=info.rank, world_size=info.world_size,
                               accum=t.grad_accum)
    if is_stream(train_set) and it > 0:
        say(f"note: {cfg.data.dataset} is read as a stream, so the resumed run sees other scenes "
            f"than the original would have (convert it to shards for exactly resumable runs)")
    bar = tqdm(total=max_it, initial=it, desc="training", dynamic_ncols=True, disable=not main_process)
    nonfinite, rate_t, rate_it = 0, time.perf_counter(), it
    flops_per_scene, peak = None, peak_flops(device, t.peak_tflops)
    model.train()
    with GracefulInterrupt() as stop:
        try:
            if args.evalnow:
                run_eval()
            if args.visnow:
                run_vis()
            batches = iter(loader)
            while it < max_it:
                # Checked between steps, so a first Ctrl-C saves a consistent, resumable state;
                # with several processes, all stop at the same step when any was interrupted.
                requested = stop.requested
                if info.distributed:
                    requested = not parallel.all_agree(not requested, device)
                if requested:
                    raise KeyboardInterrupt
                lr = schedule(it)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                losses, step_terms = [], defaultdict(list)
                for m in range(t.grad_accum):
                    batch = make_batch(to_device(next(batches), device), train_set.spec)
                    if flops_per_scene is None:
                        flops_per_scene = model_flops_per_scene(cfg.model, batch) or 0.0
                    with parallel.gradient_sync(model, m == t.grad_accum - 1):
                        with parallel.autocast(device, t.precision):
                            mse, terms = compute_loss(model, batch)
                        loss = mse.mean()
                        (loss / t.grad_accum).backward()
                    losses.append(loss.detach().float())
                    for k in ("ari", "fg_ari"):
                        if k in terms:
                            step_terms[k].append(terms[k].mean())
                # One host sync per step for both checks: a finite loss can still overflow in
                # the backward pass. The loss is averaged over processes, the gradient norm is
                # global, so every process takes the same decision.
                loss = parallel.all_reduce_mean(torch.stack(losses).mean())
                norm = parallel.grad_norm_and_clip(params, t.grad_clip).to(loss.device)
                loss_ok, norm_ok = torch.stack((loss, norm.float())).isfinite().tolist()
                if not (loss_ok and norm_ok):
                    nonfinite += 1
                    what = "loss" if not loss_ok else "gradients"
                    warnings.warn(f"non-finite {what} (loss {loss.item()}) at iteration {it}; "
                                  f"optimizer step skipped ({nonfinite} in a row, stopping at "
                                  f"{t.max_nonfinite_steps})")
                    if nonfinite >= t.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{nonfinite} non-finite losses in a row at iteration {it}; stopping "
                            f"without saving, so the last good checkpoint in {run_dir} stays "
                            f"untouched. Lower training.peak_lr, set training.grad_clip, or "
                            f"check the data.")
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
                    rec = {"it": it, "loss": loss.item(), "psnr": psnr(loss).item(),
                           "lr": lr, "grad_norm": norm.item(),
                           "scenes_per_s": steps_per_s * t.batch_size,
                           "rays_per_s": steps_per_s * t.batch_size * cfg.data.num_points,
                           "time": elapsed, "world_size": info.world_size}
                    if step_terms:
                        names = sorted(step_terms)
                        means = parallel.all_reduce_mean(
                            torch.stack([torch.stack(step_terms[k]).mean() for k in names]))
                        rec.update(zip(names, means.tolist()))
                    if flops_per_scene:
                        rec["tflops_per_s"] = rec["scenes_per_s"] * flops_per_scene / 1e12
                        if peak:      # per device: the model FLOP rate over all devices' peaks
                            rec["mfu"] = rec["tflops_per_s"] * 1e12 / (peak * info.world_size)
                    postfix = dict(loss=f"{rec['loss']:.4f}", psnr=f"{rec['psnr']:.2f}",
                                   scenes_s=f"{rec['scenes_per_s']:.1f}",
                                   rays_s=f"{rec['rays_per_s']:.3g}")
                    if "mfu" in rec:
                        postfix["mfu"] = f"{rec['mfu']:.1%}"
                    elif "tflops_per_s" in rec:
                        postfix["tflops"] = f"{rec['tflops_per_s']:.3g}"
                    bar.set_postfix(**postfix, lr=f"{lr:.2e}")
                    if main_process:
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
            say(f"\nInterrupted at iteration {it}; saving {os.path.join(run_dir, 'model.pt')} ...")
            checkpoint("model.pt")
            say("Saved. Run the same command to resume.")
            return 130
        except NonFiniteLossError as e:
            bar.close()
            print(f"error: {e}", file=sys.stderr)
            return 3
    bar.close()
    checkpoint("model.pt")
    say(f"Reached iteration {it}; saved {os.path.join(run_dir, 'model.pt')}.")
    return 0


def main(argv=None) -> int:
    import argparse
    import shutil

    from .config import load_config
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
        first = int(os.environ.get("RANK", 0)) == 0      # under torchrun, one process copies
        if first and os.path.abspath(target) != os.path.abspath(args.config):
            if os.path.exists(target):
                with open(target, "rb") as f_old, open(args.config, "rb") as f_new:
                    if f_old.read() != f_new.read():
                        print(f"note: {args.config} differs from the run's {target}; "
                              "replacing the run's copy")
            shutil.copyfile(args.config, target)
        if first:
            print(f"Run directory: {run_dir}")
        return train(cfg, run_dir, args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
