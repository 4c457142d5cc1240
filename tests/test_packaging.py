"""The wheel installs k2jax, k2jax.sharding, k2jax.conversion and the configs into a fresh venv."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

# What the wheel is built from, copied out first: building in place would leave build/ and
# k2jax.egg-info/ behind in the repository.
SOURCES = ("pyproject.toml", "README.md", "k2jax", "sharding", "conversion", "configs")


def test_wheel_installs_into_fresh_venv(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    [wheel] = wheel_dir.glob("k2jax-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    # The fresh venv gets k2jax from the wheel only; its dependencies (jax, flax, ...) are borrowed
    # from the test environment through a plain path entry (editable-install hooks in that
    # directory are not processed, so the repository's k2jax cannot leak in).
    [fresh_site] = (venv / "lib").glob("python3*/site-packages")
    (fresh_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    code = (
        "import k2jax, k2jax.sharding, k2jax.conversion, k2jax.configs, k2jax.model;"
        "from k2jax.config import CONFIG_DIR, load_model_config;"
        "print(k2jax.__file__); print(k2jax.sharding.__file__); print(k2jax.conversion.__file__);"
        "print(load_model_config(CONFIG_DIR / 'kimi_k2_thinking.gin').hidden_size)"
    )
    out = subprocess.run(
        [str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path
    ).stdout.split()
    for path in out[:3]:
        assert Path(path).is_relative_to(venv), path
    assert out[3] == "7168"
