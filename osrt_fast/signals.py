"""Signals during training: Ctrl-C, SIGTERM and SIGUSR1 finish the step, then save and stop.

Clusters pre-empt with SIGTERM and kill a little later (Kubernetes after 30 s, SLURM after
KillWait; torchrun's agent passes SIGTERM on to its workers and kills them 30 s later); SLURM
can warn ahead with `--signal=USR1@120`. Each of these asks the run to stop after the current
step and save model.pt. A second Ctrl-C stops at once (KeyboardInterrupt), for a long
evaluation, but never inside a `critical()` section -- the optimizer step and the iteration
count -- where it waits for the section to end, so a save never holds a half-applied step.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class GracefulStop:
    """`with GracefulStop() as stop:` ... `stop.requested` (the signal's number, or 0) is
    checked between steps; `with stop.critical():` guards what must not be cut in half."""

    def __init__(self):
        self.requested = 0
        self._previous = {}
        self._critical = False
        self._raise_on_leave = False

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            # A second Ctrl-C: stop at once, unless a step is being applied.
            if self._critical:
                self._raise_on_leave = True
                return
            raise KeyboardInterrupt
        if self.requested:
            return                    # e.g. torchrun's SIGTERM after the Ctrl-C it passed on
        self.requested = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = " (press Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        print(f"\n{name}: stopping after this step and saving model.pt{again}.",
              file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def critical(self):
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        if self._raise_on_leave:
            self._raise_on_leave = False
            raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: what a shell reports for a process the signal stopped."""
        return 128 + int(self.requested or signal.SIGINT)

    def __enter__(self):
        # Signal handlers can only be set from the main thread (not e.g. in a notebook worker).
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        return False
