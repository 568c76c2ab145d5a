"""Activation checkpointing of one call: the helper the eager model's regions and the fast path
share (osrt_fast/parallel.py decides which regions are checkpointed)."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def run_checkpointed(fn, checkpointed: bool, *args, **kwargs):
    """fn(*args, **kwargs), under activation checkpointing when `checkpointed` and autograd
    records: fn's activations are then recomputed in backward instead of kept."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)
