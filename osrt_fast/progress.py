"""Progress bars that stay out of log files: shown on a terminal, off when stderr is redirected
(a log file would fill with the bars' carriage returns); long work then reports in plain lines."""
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
