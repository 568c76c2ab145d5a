"""Schedules over training steps: the learning rate of the reference's recipe, and the slot-balance
loss's weight."""
from __future__ import annotations


class LrSchedule:
    """Linear warm-up to `peak_lr` over `warmup` steps, then
    peak_lr * decay_rate ** ((it - warmup) / decay_it) (the reference's LrScheduler).

    With `cooldown` > 0 (off in the reference), the last `cooldown` steps before `max_it` scale
    that rate linearly down to 0 at `max_it`: the "decay" phase of a warm-up-stable-decay schedule
    (Hu et al., MiniCPM, arXiv:2404.06395; Haegele et al., arXiv:2405.18392), which gives a run's
    end the low learning rate that a slow decay only reaches much later. The steps before the
    cooldown are the plain schedule's, so a run that is continued and then cooled down follows
    exactly the schedule of a run started with the final `max_it`.
    """

    def __init__(self, peak_lr=1e-4, warmup=2500, decay_rate=0.16, decay_it=4_000_000,
                 cooldown=0, max_it=None):
        if cooldown > 0 and max_it is None:
            raise ValueError("a cooldown ends at max_it: give max_it")
        self.peak_lr, self.warmup, self.decay_rate, self.decay_it = peak_lr, warmup, decay_rate, decay_it
        self.cooldown, self.max_it = cooldown, max_it

    def __call__(self, it: int) -> float:
        if it < self.warmup:
            return self.peak_lr * it / self.warmup
        lr = self.peak_lr * self.decay_rate ** ((it - self.warmup) / self.decay_it)
        if self.cooldown > 0:
            lr *= min(1.0, max(0.0, (self.max_it - it) / self.cooldown))
        return lr

    @classmethod
    def from_config(cls, t) -> "LrSchedule":
        return cls(t.peak_lr, t.lr_warmup, t.decay_rate, t.decay_it, t.lr_cooldown, t.max_it)

    def state_dict(self) -> dict:
        out = {"peak_lr": self.peak_lr, "warmup": self.warmup, "decay_rate": self.decay_rate,
               "decay_it": self.decay_it}
        if self.cooldown > 0:
            out.update(cooldown=self.cooldown, max_it=self.max_it)
        return out


def slot_balance_at(t, it: int) -> float:
    """training.slot_balance at iteration `it` (t: the training config): falling linearly to 0
    over slot_balance_until steps, where that is set."""
    if t.slot_balance_until <= 0:
        return t.slot_balance
    return t.slot_balance * max(0.0, 1.0 - it / t.slot_balance_until)
