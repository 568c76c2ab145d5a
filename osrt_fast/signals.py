"""Signals during training: Ctrl-C finishes the step, then saves and stops."""
from __future__ import annotations

import signal
import sys
import threading


class GracefulInterrupt:
    """First Ctrl-C: finish the current step, then save and stop (exactly resumable).
    A second Ctrl-C raises KeyboardInterrupt at once (e.g. during a long evaluation)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving model.pt (press Ctrl-C again to "
              "stop at once).", file=sys.stderr, flush=True)

    def __enter__(self):
        # Signal handlers can only be set from the main thread (not e.g. in a notebook worker).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None
                          else signal.default_int_handler)
        return False
