"""Guards of the training step: what a run does when a step goes wrong."""
from __future__ import annotations

import warnings

import torch


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGuard:
    """A non-finite loss or gradient norm skips the optimizer step with a warning; `limit` in a
    row stop the run (NonFiniteLossError) before anything is saved, so the last good checkpoint
    in `run_dir` stays untouched."""

    def __init__(self, limit: int, run_dir: str):
        self.limit, self.run_dir, self.in_a_row = limit, run_dir, 0

    def step_is_finite(self, loss: torch.Tensor, norm: torch.Tensor, it: int) -> bool:
        # One host sync for both: a finite loss can still overflow in the backward pass.
        loss_ok, norm_ok = torch.stack((loss, norm.float())).isfinite().tolist()
        if loss_ok and norm_ok:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        warnings.warn(f"non-finite {'loss' if not loss_ok else 'gradients'} (loss {loss.item()}) "
                      f"at iteration {it}; optimizer step skipped ({self.in_a_row} in a row, "
                      f"stopping at {self.limit})")
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} non-finite losses in a row at iteration {it}; stopping without "
                f"saving, so the last good checkpoint in {self.run_dir} stays untouched. Lower "
                f"training.peak_lr, set training.grad_clip, or check the data.")
        return False
