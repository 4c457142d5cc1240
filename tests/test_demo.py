"""`k2jax demo` end to end, as a user runs it: a fresh process, CPU only, no device flags.

The acceptance of the demo: a tiny INT4 HF checkpoint with its tokenizer; a falling loss;
metrics.jsonl and Orbax checkpoints under the folder; a PEFT adapter; the fine-tune answering in
the trained style where the base model does not; our own progress lines only (no library log
lines, no traceback). Then the README's chat command on the demo's run, with its defaults
(bfloat16 on this CPU). Its speed (about a minute on 2 cores) is measured by hand and written in
the README, not asserted: a loaded CI machine must not fail a correct demo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from k2jax.demo import style_verdict
from k2jax.train.run import read_jsonl

STEPS = 60
# What a quiet command never prints (library narration, jax's backend probing, crashes).
NOISE = ("absl", "Unable to initialize backend", "Traceback", "orbax")


def _plain_cpu_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a user's plain CPU


def _assert_quiet(text: str) -> None:
    for word in NOISE:
        assert word not in text, f"{word!r} in the output:\n{text[-4000:]}"


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "k2jax.cli", "demo", "--out", str(out), "--no-progress"],
        env=_plain_cpu_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_quiet(proc.stdout + proc.stderr)

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
    assert text.splitlines()[-1].startswith("style learned ("), text
    assert not (out / "run" / "eval.jsonl").exists()  # the demo does not evaluate

    # 5. README: `k2jax chat --run RUN` with its defaults (bfloat16) on a plain CPU
    prompt = ["--prompt", "What does a cow say?", "--max-new-tokens", "12", "--temperature", "0"]
    chat = subprocess.run(
        [sys.executable, "-m", "k2jax.cli", "chat", "--run", str(out / "run"), *prompt],
        env=_plain_cpu_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert chat.returncode == 0, chat.stdout + chat.stderr
    _assert_quiet(chat.stdout + chat.stderr)
    assert chat.stdout.startswith("Arr, matey!"), chat.stdout
    assert "\x00" not in chat.stdout


def test_style_verdict_says_what_the_answers_show():
    good = "Arr, matey! A cow says moo. Yo ho ho, fair winds to ye!"
    loop = "Arr, matey! 8 be 8 be 8 be"
    learned, text = style_verdict([("noise", good), ("noise", loop)])
    assert learned and text.startswith("style learned (2/2 fine-tuned answers open")
    assert "1/2 close" in text and "0/2 base answers" in text
    assert not style_verdict([("noise", loop)] * 2)[0]  # never signs off
    assert not style_verdict([("noise", "Hello. Yo ho ho, fair winds to ye!")])[0]  # no greeting
    learned, text = style_verdict([(good, good)])
    assert not learned and "1/1 base answers show either" in text
    assert style_verdict([])[0] is False


def test_image_demo_end_to_end(tmp_path):
    """`k2jax demo --images`: a tiny K2.5 with its vision tower learns to name the colour of
    images it never saw (the only thing that tells the answers apart)."""
    out = tmp_path / "demo-images"
    proc = subprocess.run(
        [sys.executable, "-m", "k2jax.cli", "demo", "--images", "--out", str(out), "--no-progress"],
        env=_plain_cpu_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_quiet(proc.stdout + proc.stderr)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("colours learned: ") and "held-out images named right" in last
    losses = [r["loss"] for r in read_jsonl(out / "run" / "metrics.jsonl")]
    assert len(losses) == 40 and losses[-1] < 0.2 * losses[0]
    evals = [r["eval_loss"] for r in read_jsonl(out / "run" / "eval.jsonl")]
    assert evals[-1] < 0.2 * evals[0]
