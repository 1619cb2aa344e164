"""Ctrl-C and SIGTERM during training: finish the iteration, save, exit."""

from __future__ import annotations

import signal

from ddetr_cli.console import warn


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (torchrun shutting down, a cluster pre-empting the job): finish the
    current iteration, save, exit. A second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals keep their default meaning
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            warn(f"{name}: stopping after this iteration and saving (Ctrl-C again aborts without saving)")
        self.requested = True

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False
