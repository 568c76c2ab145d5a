"""DataLoaders of scene records: the resumable training stream and evaluation batches
(`samplers.py` chooses their scenes), with the options every loader of this project runs with."""
from __future__ import annotations

import contextlib
import os
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader

from .records import collate
from .samplers import EVAL_SEED, FixedSampler, ResumableBatchSampler, item_seed

class WorkerLoader(DataLoader):
    """A DataLoader whose workers start with SIGTERM blocked. A worker may make threads before
    `worker_init` runs (torch sets its threads there; with the parent's thread count set,
    one more thread), and a thread that does not block SIGTERM takes a job-wide SIGTERM and
    kills the worker before `_sigterm_only_from_parent` can tell who sent it. Threads inherit
    the mask of the thread that makes them, the workers that of the thread that forks them."""

    def _get_iterator(self):
        with _sigterm_blocked():
            return super()._get_iterator()


@contextlib.contextmanager
def _sigterm_blocked():
    """SIGTERM blocked in this thread for the block (delivered at its end if it came)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def loader_kwargs(dataset, num_workers: int) -> dict:
    """DataLoader options a dataset needs with this many workers ('spawn' for TensorFlow)."""
    ctx = getattr(dataset, "multiprocessing_context", None)
    return {"multiprocessing_context": ctx} if ctx and num_workers > 0 else {}


def worker_init_fn(worker_id: int) -> None:
    """Seeds numpy differently in every DataLoader worker (and run), as the reference, so
    unseeded ray sampling differs between workers."""
    base_seed = int.from_bytes(os.urandom(4), byteorder="big")
    np.random.seed((base_seed + worker_id) % 2 ** 32)


def worker_init(worker_id: int) -> None:
    """A training or evaluation worker: leaves Ctrl-C, SIGTERM and SIGUSR1 to the main process,
    which finishes its step, saves and shuts the workers down (a worker dying first would break
    the save; SLURM signals every process of a job); seeds numpy as `worker_init_fn`."""
    for s in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    _sigterm_only_from_parent()
    worker_init_fn(worker_id)


def _sigterm_only_from_parent() -> None:
    """A SIGTERM from the main process (the DataLoader's and multiprocessing's shutdown) ends
    this worker as before; one from elsewhere (SLURM signals every process of a job) is ignored,
    so the main process can finish its step and save. SIGTERM is blocked and a thread waits
    for it, the only way to learn who sent it. Without sigwaitinfo (macOS): unchanged."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    import threading
    parent = os.getppid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)     # not the trainer's handler, inherited by fork
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})   # threads started later inherit it

    def wait():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        # Unblocked in this thread only: the signal sent again is delivered here, and kills.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()


def loader_options(num_workers: int, device: torch.device) -> dict:
    """The DataLoader options of train.py's loaders."""
    return dict(num_workers=num_workers, pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                persistent_workers=num_workers > 0)


def is_stream(dataset) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


def scene_records(dataset, scene_ids):
    """The dataset's records `scene_ids`, in order. A stream (MSN-Hard's TFDS reader) is read once,
    skipping to the first (whole records, undecoded, where it can), so its ids must increase."""
    ids = [int(i) for i in scene_ids]
    if not is_stream(dataset):
        for i in ids:
            yield dataset[i]
        return
    if ids != sorted(set(ids)):
        raise ValueError("a streamed dataset is read in order: give increasing scene ids")
    skips = bool(ids) and hasattr(dataset, "skipping")
    stream = iter(dataset.skipping(ids[0]) if skips else dataset)
    pos = ids[0] if skips else 0
    for i in ids:
        for _ in range(i - pos):
            next(stream)
        yield next(stream)
        pos = i + 1


def record_loader(dataset, batch_size: int, loader_kw: dict, train: bool, seed: int = 0,
                  start_it: int = 0, rank: int = 0, world_size: int = 1, accum: int = 1) -> DataLoader:
    """DataLoader of collated scene records for this process: resumable (index, seed)
    micro-batches for map-style datasets (`batch_size` is then the global batch), in-order
    batches for evaluation (`batch_size` per process), and plain batches of a stream (which
    shards itself over processes; `batch_size` per micro-batch)."""
    kw = dict(loader_kw, **loader_kwargs(dataset, loader_kw.get("num_workers", 0)))
    if is_stream(dataset):
        micro = batch_size // (world_size * accum) if train else batch_size
        return WorkerLoader(dataset, batch_size=micro, drop_last=train, **kw)
    sampler = (ResumableBatchSampler(len(dataset), batch_size, seed, start_it=start_it, rank=rank,
                                     world_size=world_size, accum=accum) if train
               else FixedSampler(len(dataset), batch_size, rank, world_size))
    return WorkerLoader(dataset, batch_sampler=sampler, **kw)


def first_records(dataset, n: int) -> dict:
    """The first n items (with evaluation seeds), collated: for visualisations."""
    if is_stream(dataset):
        import itertools
        return collate(list(itertools.islice(iter(dataset), n)))
    return collate([dataset[(i, item_seed(EVAL_SEED, i))] for i in range(n)])


def training_loaders(train_set, eval_set, t, eval_batch_size: int, start_it: int, info, device,
                     dali: bool = False) -> tuple:
    """(training loader from step `start_it`, evaluation loader) of this process, as train.py
    runs them: `t` is the training config, `info` the process group's `parallel.DistInfo`;
    `dali`: NVIDIA DALI's loader over png shards instead of PyTorch's."""
    if dali:
        from .dali import DaliShardLoader
        train_sampler = ResumableBatchSampler(len(train_set), t.batch_size, t.seed, start_it=start_it,
                                              rank=info.rank, world_size=info.world_size, accum=t.grad_accum)
        eval_sampler = FixedSampler(len(eval_set), eval_batch_size, info.rank, info.world_size)
        kw = dict(device=str(device) if device.type == "cuda" else "cpu", num_threads=max(1, t.num_workers))
        micro = t.batch_size // (info.world_size * t.grad_accum)
        return (DaliShardLoader(train_set, micro, seed=t.seed, start_it=start_it, batch_sampler=train_sampler, **kw),
                DaliShardLoader(eval_set, eval_batch_size, train=False, batch_sampler=eval_sampler, **kw))
    options = loader_options(t.num_workers, device)
    return (record_loader(train_set, t.batch_size, options, train=True, seed=t.seed, start_it=start_it,
                          rank=info.rank, world_size=info.world_size, accum=t.grad_accum),
            record_loader(eval_set, eval_batch_size, options, train=False, rank=info.rank,
                          world_size=info.world_size))
