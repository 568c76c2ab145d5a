"""Guards of the training step: what a run does when a step goes wrong.

Every step's loss and gradient norm are judged before the optimizer applies the step. A
non-finite value, or a spike (a loss, or gradient norm, far above the median of the recent
accepted steps), skips the step with a warning; too many bad steps in a row stop the run. The
trainer writes a checkpoint of the weights after step k only once step k+1 has measured their
loss and found it sane (`Trainer.step`), so a stopped run leaves the last good checkpoint in
place: lower the learning rate and run the same command to resume from it.
"""
from __future__ import annotations

import collections
import math
import statistics
import warnings
from typing import Optional

import torch


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the run stops without saving."""


class DivergenceError(RuntimeError):
    """Too many loss or gradient-norm spikes in a row; the run stops without saving."""


class StepGuard:
    """Judges steps (see the module docstring). `nonfinite_limit`: non-finite steps in a row that
    stop the run (NonFiniteLossError); `divergence`: a config.DivergenceConfig (DivergenceError).
    The trainer adds to the errors' messages where the last good checkpoint is."""

    def __init__(self, nonfinite_limit: int, divergence):
        self.nonfinite_limit, self.div = nonfinite_limit, divergence
        self.losses = collections.deque(maxlen=divergence.window)
        self.norms = collections.deque(maxlen=divergence.window)
        self.nonfinite_in_a_row = self.spikes_in_a_row = 0

    def spike(self, loss: float, norm: Optional[float]) -> Optional[str]:
        """Why (loss, norm) is a spike against the recent accepted steps, or None."""
        checks = [("loss", loss, self.losses, self.div.loss_factor),
                  ("gradient norm", norm, self.norms, self.div.grad_norm_factor)]
        for name, value, history, factor in checks:
            if value is None or factor <= 0 or not history:
                continue
            median = statistics.median(history)
            if value > factor * median:
                return (f"{name} {value:.4g} is {value / median:.1f}x the median of the last "
                        f"{len(history)} accepted steps ({median:.4g}; the limit is "
                        f"training.divergence.{'loss_factor' if name == 'loss' else 'grad_norm_factor'}"
                        f" = {factor:g})")
        return None

    def step_is_good(self, loss: torch.Tensor, norm: torch.Tensor, it: int) -> bool:
        """True: apply the step (and remember it). False: skip it (warned). Raises when bad
        steps in a row reach their limit. Every process calls it with the same global values."""
        # One host sync for both: a finite loss can still overflow in the backward pass.
        loss_v, norm_v = torch.stack((loss.float(), norm.float())).tolist()
        if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
            self.nonfinite_in_a_row += 1
            what = "loss" if not math.isfinite(loss_v) else "gradients"
            warnings.warn(f"non-finite {what} (loss {loss_v}) at iteration {it}; optimizer step "
                          f"skipped ({self.nonfinite_in_a_row} in a row, stopping at "
                          f"{self.nonfinite_limit})")
            if self.nonfinite_in_a_row >= self.nonfinite_limit:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} non-finite losses in a row at iteration {it}; "
                    f"stopping without saving.")
            return False
        self.nonfinite_in_a_row = 0
        why = self.spike(loss_v, norm_v)
        if why is not None:
            self.spikes_in_a_row += 1
            warnings.warn(f"spike at iteration {it}: {why}; optimizer step skipped "
                          f"({self.spikes_in_a_row} in a row, stopping at {self.div.max_spikes})")
            if self.spikes_in_a_row >= self.div.max_spikes:
                raise DivergenceError(
                    f"the run diverged: {self.spikes_in_a_row} spikes in a row at iteration {it} "
                    f"({why}); stopping without saving (training.divergence.loss_factor: 0 turns "
                    f"this check off).")
            return False
        self.spikes_in_a_row = 0
        self.losses.append(loss_v)
        self.norms.append(norm_v)
        return True

    def weights_are_sane(self, loss: torch.Tensor) -> Optional[str]:
        """None if the current weights' loss (measured without a step) is finite and no spike;
        else why not. For the save at the end of a run, whose weights no later step measured."""
        value = loss.float().item()
        if not math.isfinite(value):
            return f"their loss is {value}"
        return self.spike(value, None)


class CollapseWatch:
    """Watches the slot usage of a slot model's evaluations for the one-slot collapse: one slot
    explaining (nearly) every ray, so the segmentation is a single region and FG-ARI stays near 0.
    `update` returns a warning once the largest slot's share has been at least `share` in
    `times` evaluations in a row (and again after the collapse ended and came back)."""

    def __init__(self, share: float = 0.95, times: int = 3):
        self.share, self.times, self.in_a_row = share, times, 0

    def update(self, top_share: Optional[float], it: int) -> Optional[str]:
        if top_share is None:
            return None
        self.in_a_row = self.in_a_row + 1 if top_share >= self.share else 0
        if self.in_a_row != self.times:
            return None
        return (f"warning: slot collapse: at iteration {it} one slot explains {top_share:.1%} of the "
                f"rays' slot weights, and at least {self.share:.0%} in the last {self.times} "
                f"evaluations; the segmentation is then one region (FG-ARI near 0). docs/learning.md "
                f"lists what prevents it (e.g. training.slot_balance).")
