"""The batch samplers: which scenes, with which ray-sampling seeds, each step and process sees.

The training stream is a function of (training.seed, iteration) alone: each batch is a list of
(item index, sample seed) pairs, so a run resumed at iteration `it` sees the same batches as one
that never stopped, for any number of processes and micro-batches.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
from torch.utils.data import Sampler

EVAL_SEED = 1_000_003


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
