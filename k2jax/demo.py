"""`k2jax demo`: the whole job — checkpoint in, fine-tune, adapter out, chat — on a CPU in minutes.

    k2jax demo --out runs/demo

1. writes a tiny Kimi-K2-architecture checkpoint in Kimi-K2-Thinking's released form (routed
   experts compressed-tensors INT4, everything else bf16, sharded safetensors, config.json,
   tiktoken tokenizer) — `k2jax.testing.make_tiny_checkpoint`, its weights random;
2. trains a LoRA on every linear (routed experts included, over the frozen INT4 experts) with
   MuonClip on the pirate-voice chats shipped with k2jax (`k2jax.data.DEMO_CHATS`), through the
   same `Trainer` as `k2jax train` (configs/tiny_train.gin): progress bar, metrics.jsonl,
   TensorBoard, Orbax checkpoints under OUT/run;
3. exports the adapters as a PEFT folder (OUT/adapter, per-expert HF names);
4. answers a few questions with the base model and with the fine-tune, side by side (greedy).

Every step is resumable: a second `k2jax demo --out DIR` reuses the checkpoint, continues or
skips the training (the run resumes from its newest checkpoint) and rewrites the adapter.
The random base answers with noise; the fine-tune answers like a pirate (every training answer
opens with "Arr, matey!" and closes with "Yo ho ho, fair winds to ye!"). The last line says
whether the style was learned, with how many answers show each marker (`style_verdict`), so a
script (or CI) can check the run; the exit status is 0 when learned, 1 otherwise.
"""

from __future__ import annotations

import time
from pathlib import Path

# Questions in the style of the demo set (k2jax/data/make_demo_chats.py), not copied from it.
PROMPTS = (
    "What is the capital of France?",
    "How much is 2 plus 3?",
    "What does a cow say?",
)
DEFAULT_STEPS = 60


def demo(
    out: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    max_new_tokens: int = 32,
    progress: bool = True,
    prompts=PROMPTS,
) -> dict:
    """Runs the four steps under `out`; returns a summary dict (paths, first/last loss, answers,
    `style_learned`)."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = _checkpoint(out / "base-int4")
    print(f"[1/4] checkpoint: {base} (tiny Kimi-K2, INT4 routed experts)", flush=True)

    run_dir = out / "run"
    print(f"[2/4] LoRA + MuonClip on the demo chats, {steps} steps -> {run_dir}", flush=True)
    losses = _train(base, run_dir, steps, progress)
    print(f"      loss {losses[0]:.3f} (step 1) -> {losses[-1]:.3f} (step {len(losses)})")

    adapter = _export(run_dir, out / "adapter")
    print(f"[3/4] PEFT adapter: {adapter}", flush=True)

    print("[4/4] base model vs fine-tune (greedy):", flush=True)
    answers = _compare(base, run_dir, prompts, max_new_tokens)
    for q, (before, after) in zip(prompts, answers, strict=True):
        print(
            f"  user:      {q}\n  base:      {_one_line(before)}\n  fine-tune: {_one_line(after)}"
        )
    learned, verdict = style_verdict(answers)
    print(f"{verdict}; {time.perf_counter() - t0:.0f} s in all; everything is under {out}")
    return {
        "checkpoint": base,
        "run_dir": run_dir,
        "adapter": adapter,
        "losses": losses,
        "answers": answers,
        "style_learned": learned,
    }


def style_verdict(answers: list[tuple[str, str]]) -> tuple[bool, str]:
    """(learned, the verdict line) for (base answer, fine-tuned answer) pairs.

    Learned: every fine-tuned answer opens with the demo data's greeting, at least one closes
    with its sign-off (a short answer budget or a repetition loop of the tiny model may cut the
    others short), and no base answer shows either. The line always says how many answers show
    each marker, so it claims no more than the answers do."""
    from k2jax.data.make_demo_chats import GREETING, SIGN_OFF

    n = len(answers)
    opens = sum(a.strip().startswith(GREETING) for _, a in answers)
    closes = sum(SIGN_OFF in a for _, a in answers)
    base_styled = sum(b.strip().startswith(GREETING) or SIGN_OFF in b for b, _ in answers)
    counts = (
        f"{opens}/{n} fine-tuned answers open with {GREETING!r}, {closes}/{n} close with "
        f"{SIGN_OFF!r}, {base_styled}/{n} base answers show either"
    )
    if n and opens == n and closes and not base_styled:
        return True, f"style learned ({counts})"
    return False, f"style NOT learned ({counts}; train longer: --steps)"


def _checkpoint(folder: Path) -> Path:
    from k2jax.testing import make_tiny_checkpoint

    if (folder / "config.json").is_file():  # make_tiny_checkpoint renames a complete folder in
        return folder
    return make_tiny_checkpoint(folder, format="int4", tokenizer=True)


def _train(base: Path, run_dir: Path, steps: int, progress: bool) -> list[float]:
    from k2jax.config import CONFIG_DIR
    from k2jax.train import Trainer
    from k2jax.train.run import METRICS_FILE, read_jsonl

    overrides = [
        f"model.path={str(base)!r}",
        "model.preset=None",
        "model.tokenizer=None",  # the checkpoint's own tiktoken.model
        'compute.experts="int4"',
        f"train.run_dir={str(run_dir)!r}",
        f"train.steps={steps}",
        f"checkpoint.every={max(1, steps // 3)}",
        f"log.every={max(1, steps // 6)}",
        f"log.progress={progress}",
    ]
    trainer = Trainer.from_config(CONFIG_DIR / "tiny_train.gin", overrides)
    try:
        trainer.fit()
    finally:
        trainer.close()
    # metrics.jsonl holds every step of the run, also those of an earlier, resumed call.
    return [r["loss"] for r in read_jsonl(run_dir / METRICS_FILE)]


def _export(run_dir: Path, folder: Path) -> Path:
    from k2jax.api import export_adapter

    # QK-clip factors that moved cannot go into a PEFT adapter: export says so rather than
    # writing a different model (k2jax merge carries them); τ = 100 does not bind on this run.
    return export_adapter(run_dir, folder, overwrite=True)


def _compare(base: Path, run_dir: Path, prompts, max_new_tokens: int) -> list[tuple[str, str]]:
    from k2jax.chat import ChatSession, load
    from k2jax.generate import Sampling

    sessions = [
        ChatSession.from_loaded(
            load(**source, dtype="float32"),
            sampling=Sampling(temperature=0.0),
            max_new_tokens=max_new_tokens,
        )
        for source in (dict(model=str(base)), dict(run=str(run_dir)))
    ]
    answers = []
    for q in prompts:
        pair = []
        for s in sessions:
            s.reset()
            pair.append(s.reply(q))
        answers.append(tuple(pair))
    return answers


def _one_line(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
