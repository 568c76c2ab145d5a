"""Progress bars that stay out of log files: shown on a terminal, off when stderr is redirected
(a log file would fill with the bars' carriage returns); long work then reports in plain lines,
with the same fields (`progress_fields`)."""
from __future__ import annotations

import sys


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):        # closed or replaced stderr
        return False


def progress_bar(iterable=None, enabled: bool = True, **kwargs):
    """tqdm(iterable, **kwargs), disabled unless `enabled` and stderr is a terminal."""
    from tqdm import tqdm
    return tqdm(iterable, disable=not (enabled and on_terminal()), dynamic_ncols=True, **kwargs)


def duration(seconds: float) -> str:
    """'45 s', '3 min 20 s', '1 h 05 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressLines:
    """A progress bar's counts as plain lines, for output that is no terminal (a log file):
    'desc: done/total unit (pct), rate unit/s, about T left', at most every `every` seconds and
    once at the end. update(n) and close(), as tqdm's."""

    def __init__(self, total: int, desc: str, unit: str = "it", every: float = 10.0, file=None):
        import time
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.file = file if file is not None else sys.stdout
        self.done, self.clock = 0, time.perf_counter
        self.start = self.last = self.clock()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.clock() - self.last >= self.every and self.done < self.total:
            self._line()

    def _line(self) -> None:
        self.last = now = self.clock()
        rate = self.done / max(now - self.start, 1e-9)
        left = (f", about {duration((self.total - self.done) / rate)} left"
                if 0 < self.done < self.total else f" in {duration(now - self.start)}")
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}s "
              f"({self.done / max(self.total, 1):.0%}), {rate:.3g} {self.unit}s/s{left}",
              file=self.file, flush=True)

    def close(self) -> None:
        if self.done:
            self._line()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_counter(total: int, desc: str, unit: str = "it", enabled: bool = True,
                     every: float = 10.0):
    """A progress bar (with its time left) on a terminal, else `ProgressLines`; None where
    `enabled` is false."""
    if not enabled:
        return None
    if on_terminal():
        return progress_bar(total=total, desc=desc, unit=unit)
    return ProgressLines(total, desc, unit, every)


def progress_fields(rec: dict) -> dict:
    """The progress line's fields of a training log record: loss, PSNR, scenes/s, rays/s, slot
    usage where there is some, and MFU (or TFLOP/s where the device's peak is unknown)."""
    fields = dict(loss=f"{rec['loss']:.4f}", psnr=f"{rec['psnr']:.2f}",
                  scenes_s=f"{rec['scenes_per_s']:.1f}", rays_s=f"{rec['rays_per_s']:.3g}")
    # The largest slot's share of the rays and the slots' mean cosine similarity: both near 1 is
    # the one-slot collapse (guards.CollapseWatch).
    for key, name in (("slot_max_share", "top_slot"), ("slot_similarity", "slot_sim")):
        if key in rec:
            fields[name] = f"{rec[key]:.2f}"
    if "mfu" in rec:
        fields["mfu"] = f"{rec['mfu']:.1%}"
    elif "tflops_per_s" in rec:
        fields["tflops"] = f"{rec['tflops_per_s']:.3g}"
    return fields
