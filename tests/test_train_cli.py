"""`k2jax train --config configs/tiny_train.gin` on CPU: the loss falls, a SIGKILL in the middle
of writing a checkpoint loses nothing but that checkpoint, Ctrl-C while the step compiles or while
a step runs saves a consistent state, and the resumed run's per-step losses equal those of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import ROOT, rel_err

from k2jax.config import CONFIG_DIR
from k2jax.train import RunConfig, Trainer
from k2jax.train.checkpoint import SAVE_DELAY_ENV
from k2jax.train.tensorboard import crc32c, masked_crc32c, read_events
from k2jax.train.trainer import STEP_DELAY_ENV

TINY_TRAIN = CONFIG_DIR / "tiny_train.gin"


def _command(run_dir) -> list[str]:
    return [
        sys.executable,
        "-m",
        "k2jax.cli",
        "train",
        "--config",
        str(TINY_TRAIN),
        "--set",
        f"train.run_dir={run_dir}",
        "--set",
        "checkpoint.every=4",
        "--set",
        "log.progress=False",
    ]


def _env(cache_dir, **extra) -> dict:
    # The test process's XLA flags (8 CPU devices, -O0) are inherited; matmul precision is a jax
    # setting, passed the way jax reads settings from the environment. The second process reuses
    # the first one's compiled programs from a persistent compilation cache (same executables).
    return {
        **os.environ,
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        **extra,
    }


def _losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted reference: 20 steps in this process (the same compiled program as
    test_train.py's "A")."""
    run_dir = tmp_path_factory.mktemp("straight")
    config = RunConfig.load(TINY_TRAIN, [f"train.run_dir={run_dir}", "log.progress=False"])
    with Trainer(config) as trainer:
        history = trainer.fit()
    return {r["step"]: r["loss"] for r in history}


def test_sigkill_during_a_save_then_resume_is_exact(tmp_path, straight_run):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    # Run 1: the checkpoint of step 4 completes; the one of step 8 is held in its temporary
    # folder (test hook) and the process is killed there.
    proc = subprocess.Popen(
        _command(run_dir),
        env=_env(tmp_path / "jax_cache", **{SAVE_DELAY_ENV: "8:300"}),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 240
    try:
        while not ((ckpt / "4").is_dir() and list(ckpt.glob("8.orbax-checkpoint-tmp*"))):
            if proc.poll() is not None:
                pytest.fail(f"k2jax train exited early ({proc.returncode}):\n{proc.stdout.read()}")
            if time.time() > deadline:
                pytest.fail("no checkpoint save of step 8 started within 240 s")
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (ckpt / "8").exists()  # the interrupted save never became a checkpoint
    killed = _losses(run_dir)
    assert max(killed) >= 8

    # Run 2: the same command resumes from step 4 and finishes the 20 steps.
    out = subprocess.run(
        _command(run_dir),
        env=_env(tmp_path / "jax_cache"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "resuming from" in out.stderr and "/checkpoints/4" in out.stderr
    assert "k2jax train: step 20: loss" in out.stdout
    resumed = _losses(run_dir)
    assert sorted(resumed) == list(range(1, 21))  # steps 5..8+ of run 1 were cut, then redone
    for step, loss in straight_run.items():
        assert rel_err(resumed[step], loss) <= 1e-6, (step, resumed[step], loss)
    for step in range(1, 5):
        assert resumed[step] == killed[step]
    assert resumed[20] < resumed[1] - 0.5  # the loss falls
    assert not list(ckpt.glob("*.orbax-checkpoint-tmp*"))  # the torn save was cleaned up
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [16, 20]

    # Both processes' TensorBoard files parse, CRCs checked; the last has steps 5..20.
    files = sorted((run_dir / "tensorboard").iterdir())
    assert len(files) == 2
    events = [read_events(f) for f in files]
    assert {e["step"] for e in events[1] if "train/loss" in e["scalars"]} == set(range(5, 21))


def _interrupt_when(cmd, env, ready) -> str:
    """Runs `cmd`, sends SIGINT (Ctrl-C) once `ready(output so far)` holds, returns the output;
    the command must exit with 130 (interrupted)."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 300
    try:
        while not ready("".join(lines)):
            if proc.poll() is not None:
                reader.join(5)
                pytest.fail(f"exited early ({proc.returncode}):\n{''.join(lines)}")
            if time.time() > deadline:
                pytest.fail(f"not ready within 300 s:\n{''.join(lines)}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    out = "".join(lines)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "absl" not in out, out  # quiet: no library narration
    return out


def test_ctrl_c_while_compiling_and_during_a_step_then_resume_is_exact(tmp_path, straight_run):
    """The batch is fetched before its step runs: Ctrl-C in between must save the state with the
    data position from before the fetch (not skip a batch on resume)."""
    run_dir = tmp_path / "run"
    cache = tmp_path / "jax_cache"
    cmd = _command(run_dir)
    # 1. Ctrl-C while the first step compiles: nothing trained, nothing to save.
    out = _interrupt_when(cmd, _env(cache), lambda text: "compiling the train step" in text)
    assert "nothing new to save" in out
    # 2. Ctrl-C while step 7 runs (its batch fetched; test hook holds the step): step 6 saved.
    metrics = run_dir / "metrics.jsonl"
    out = _interrupt_when(
        cmd,
        _env(cache, **{STEP_DELAY_ENV: "7:300"}),
        lambda text: metrics.is_file() and len(metrics.read_text().splitlines()) >= 6,
    )
    assert "saving step 6" in out
    # 3. resume to the end: every step's loss equals the uninterrupted run's
    done = subprocess.run(cmd, env=_env(cache), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "/checkpoints/6" in done.stderr
    resumed = _losses(run_dir)
    assert sorted(resumed) == list(range(1, 21))
    for step, loss in straight_run.items():
        assert rel_err(resumed[step], loss) <= 1e-6, (step, resumed[step], loss)


def test_crc32c_known_values():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    assert crc32c(b"") == 0
    assert masked_crc32c(b"") == 0xA282EAD8


def test_cli_does_not_import_jax_to_parse(tmp_path):
    code = (
        "import sys; from k2jax.cli import build_parser; "
        "a = build_parser().parse_args(['train', '--config', 'x.gin']); "
        "print('jax' in sys.modules, a.config)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False ['x.gin']", out.stderr


def test_print_config_and_bad_override(tmp_path):
    cmd = [sys.executable, "-m", "k2jax.cli", "train", "--config", str(TINY_TRAIN)]
    out = subprocess.run([*cmd, "--print-config"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "optim.qk_clip_tau = 100.0" in out.stdout
    bad = subprocess.run([*cmd, "--set", "lora.rnk=4"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "'lora' has no key 'rnk'" in bad.stderr


def test_bad_data_is_reported_before_compiling_and_quietly(tmp_path):
    """A bad line (on_bad_example = "error", as tiny_train.gin) is reported by the data check in
    set-up — before the train step compiles — as one line naming file:line, without a traceback
    (also none from Orbax at interpreter exit); the run writes no checkpoint."""
    data = tmp_path / "chats.jsonl"
    good = (
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}'
    )
    data.write_text(f"{good}\n{good}\n{{not json\n")
    run_dir = tmp_path / "run"
    cmd = [*_command(run_dir), "--set", f"data.path={data}"]
    out = subprocess.run(cmd, env=_env(tmp_path / "c"), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{data}:3: invalid JSON" in out.stderr
    text = out.stdout + out.stderr
    for word in ("Traceback", "compiling the train step", "absl", "Unable to initialize"):
        assert word not in text, text
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
