"""Console output of the `k2jax` commands: our progress and results by default, library logs on request.

    k2jax train ...              INFO lines of k2jax itself, warnings and errors of everyone
    k2jax train --verbose ...    also the libraries' INFO lines (Orbax's checkpoint narration,
    K2JAX_VERBOSE=1 k2jax ...    jax's backend discovery, ...) and k2jax's DEBUG lines

Orbax narrates every save and restore at INFO through absl (dozens of lines per checkpoint) and
jax logs each backend it fails to find ("Unable to initialize backend 'tpu'"); none of it is for
a user who asked for a training run, so those loggers are held at WARNING unless verbose.

Log lines and progress bars share stderr: a plain StreamHandler would write into the middle of a
tqdm bar's line. `TqdmHandler` prints through `tqdm.write`, which clears the active bars, prints
the line and redraws them, so log lines go around the bars (and print normally when no bar is
active).

Only the commands call `setup_logging` (k2jax/cli.py), and they undo it when they return (a
command run in-process — a test, a notebook calling `k2jax.cli.main` — leaves the process's
logging as it found it). The library itself never installs handlers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

VERBOSE_ENV = "K2JAX_VERBOSE"

# Loggers of the libraries k2jax drives; WARNING unless verbose.
LIBRARY_LOGGERS = ("absl", "jax", "jaxlib", "orbax", "flax", "optax", "tensorstore", "matplotlib")


class TqdmHandler(logging.Handler):
    """Writes records through `tqdm.write`, so that they never land inside a progress bar."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream or sys.stderr)
        except Exception:  # logging must never raise into the program
            self.handleError(record)


class _Formatter(logging.Formatter):
    """k2jax's INFO lines as plain text; everything else with its level and logger name."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno == logging.INFO and record.name.split(".")[0] == "k2jax":
            return message
        return f"{record.levelname.lower()}: {record.name}: {message}"


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def setup_logging(verbose: bool = False):
    """Within the context: the console handler on the root logger and the levels of the module
    docstring; on exit the previous handlers and levels are restored."""
    verbose = verbose or verbose_from_env()
    root = logging.getLogger()
    names = ("k2jax", *LIBRARY_LOGGERS)
    saved = (list(root.handlers), root.level, {n: logging.getLogger(n).level for n in names})
    for h in list(root.handlers):
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (
            sys.stderr,
            sys.stdout,
        ):
            root.removeHandler(h)  # e.g. a basicConfig console handler: ours replaces it
    handler = TqdmHandler()
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("k2jax").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
