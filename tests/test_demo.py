"""`k2jax demo` end to end, as a user runs it: a fresh process, CPU only, no device flags.

The acceptance of the demo: under 3 minutes; a tiny INT4 HF checkpoint with its tokenizer; a
falling loss; metrics.jsonl and Orbax checkpoints under the folder; a PEFT adapter; the fine-tune
answering in the trained style where the base model does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from k2jax.train.run import read_jsonl

STEPS = 60


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a user's plain CPU
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "k2jax.cli", "demo", "--out", str(out), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert seconds < 180, f"the demo took {seconds:.0f} s"

    # 1. the checkpoint: Kimi-K2-Thinking's released form, INT4 routed experts, tokenizer
    base = out / "base-int4"
    config = json.loads((base / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    assert (base / "tiktoken.model").is_file() and (base / "tokenizer_config.json").is_file()
    assert (base / "model.safetensors.index.json").is_file()

    # 2. training: every step recorded, the loss falls, checkpoints written
    records = read_jsonl(out / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    steps = sorted(int(p.name) for p in (out / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == STEPS

    # 3. the adapter
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0

    # 4. the chat: printed side by side, and the style verdict
    text = proc.stdout
    assert text.count("fine-tune: Arr, matey!") == 3, text
    assert "base:      Arr, matey!" not in text
    assert "style learned" in text.splitlines()[-1]
