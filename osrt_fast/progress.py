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
