"""Schedules over training steps: the learning rate of the reference's recipe, and the slot-balance
loss's weight."""
from __future__ import annotations


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


def slot_balance_at(t, it: int) -> float:
    """training.slot_balance at iteration `it` (t: the training config): falling linearly to 0
    over slot_balance_until steps, where that is set."""
    if t.slot_balance_until <= 0:
        return t.slot_balance
    return t.slot_balance * max(0.0, 1.0 - it / t.slot_balance_until)
