"""Ctrl-C during `Trainer.fit`: stop after the current step and save; a second Ctrl-C abandons.

`CtrlC` is the signal handler the loop runs under; `hold_step_for_test` is the test hook that holds
a step (K2JAX_TEST_STEP_DELAY) so that a test can interrupt it there.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

STEP_DELAY_ENV = "K2JAX_TEST_STEP_DELAY"


class CtrlC:
    """Ctrl-C during `fit`: the first one stops the loop at the next safe point — after the
    compile or the running step, never inside the bookkeeping that pairs a state with its data
    position — and the trainer saves; a second one abandons at once, without saving.

    Python delivers SIGINT as a KeyboardInterrupt in whatever Python code runs next, which
    during a long XLA compile can be a garbage-collection callback, where the exception is
    printed and swallowed (seen with jax 0.12): the run would then go on as if nothing happened.
    Hence a handler that only records the request, and `check()` at the safe points. In a
    thread other than the main one (where signals cannot be handled) it does nothing.
    """

    def __init__(self):
        self.requested = self.abandon = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            self.abandon = True
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: stopping after the current step (Ctrl-C again to abandon)")

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


def hold_step_for_test(step: int, ctrl_c: CtrlC) -> None:
    """Test hook: with K2JAX_TEST_STEP_DELAY="STEP:SECONDS", wait before running step STEP
    (after its batch was fetched) — the window in which the Ctrl-C test interrupts a step."""
    spec = os.environ.get(STEP_DELAY_ENV)
    if spec:
        at, seconds = spec.split(":")
        deadline = time.monotonic() + float(seconds)
        while int(at) == step and time.monotonic() < deadline and not ctrl_c.requested:
            time.sleep(0.05)
