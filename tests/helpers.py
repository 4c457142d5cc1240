"""Shared test helpers (imported by test modules as `helpers`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"
REF_DIR = ROOT / "tests" / "reference"


def run_reference(script: str, *args: str, timeout: float = 600) -> str:
    """Runs tests/reference/<script> in the torch reference environment (.venv-ref, Python 3.11).

    Never skips: a missing environment is an error telling how to build it.
    """
    if not REF_PYTHON.exists():
        raise RuntimeError(
            f"{REF_PYTHON} not found: the torch reference environment is built by scripts/setup"
        )
    proc = subprocess.run(
        [str(REF_PYTHON), str(REF_DIR / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"reference script {script} {' '.join(map(str, args))} failed "
            f"(exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc.stdout


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=1))
    return path


def rel_err(actual, expected) -> float:
    """max |actual − expected| / max |expected| (the parity metric of the issues)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def python_exe() -> str:
    return sys.executable
