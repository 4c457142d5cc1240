"""`k2jax demo --images`: multimodal fine-tuning of Kimi-K2.5's form, on a CPU in minutes.

    k2jax demo --images --out runs/demo-images

1. writes a tiny Kimi-K2.5 checkpoint in the released form — the `kimi_k25` wrapper config, the
   text model under `language_model.` (routed experts compressed-tensors INT4), and a complete
   MoonViT vision tower and projector under the released names (`make_tiny_checkpoint(layout=
   "k25", vision=True)`), weights random;
2. writes colour chats (`k2jax.data.testing.write_image_chats`): PNG images of one colour with
   noise, of random sizes, each asked "What colour is this?" and answered "It is {colour}." —
   only the image tells the answers apart; 48 to train on, 16 held out;
3. trains LoRA on every text linear and on the tower's and projector's linears
   (configs/tiny_vision_train.gin, the same `Trainer` as `k2jax train`), printing the held-out
   loss before and after;
4. asks the fine-tune the colour of four held-out images (greedy) and counts the right answers.

The last line says how many held-out colours the fine-tune named right; the exit status is 0 when
the held-out loss fell and at least three of the four are right. Every step is resumable, as in
`k2jax demo` (a second call reuses what is there).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEFAULT_STEPS = 40


def image_demo(out: str | Path, *, steps: int = DEFAULT_STEPS, progress: bool = True) -> dict:
    """Runs the four steps under `out`; returns a summary dict (paths, losses, eval losses,
    answers, `learned`)."""
    from k2jax.data.testing import write_image_chats
    from k2jax.testing import make_tiny_checkpoint

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base-k25"
    if not (base / "config.json").is_file():
        make_tiny_checkpoint(base, format="int4", layout="k25", vision=True)
    print(f"[1/4] checkpoint: {base} (tiny Kimi-K2.5: INT4 experts + MoonViT tower)", flush=True)
    train, held_out = out / "train" / "chats.jsonl", out / "held_out" / "chats.jsonl"
    if not train.is_file():
        write_image_chats(train.parent, 48, seed=0)
    if not held_out.is_file():
        write_image_chats(held_out.parent, 16, seed=1)
    print(f"[2/4] colour chats: 48 to train ({train}), 16 held out", flush=True)

    run_dir = out / "run"
    print(f"[3/4] LoRA on the text model and the vision tower, {steps} steps -> {run_dir}")
    losses, before, after = _train(base, train, held_out, run_dir, steps, progress)
    print(f"      training loss {losses[0]:.3f} (step 1) -> {losses[-1]:.3f} (step {len(losses)})")
    print(f"      held-out loss {before:.3f} (base) -> {after:.3f} (fine-tune)")

    print("[4/4] the fine-tune names the colour of held-out images (greedy):", flush=True)
    answers = _ask(run_dir, held_out)
    right = 0
    for image, colour, answer in answers:
        ok = colour in answer.lower()
        right += ok
        print(f"  {Path(image).name} ({colour}): {answer.strip()!r} {'✓' if ok else '✗'}")
    learned = after < before and right >= 3
    verdict = "learned" if learned else "NOT learned (train longer: --steps)"
    print(
        f"colours {verdict}: {right}/{len(answers)} held-out images named right, held-out loss "
        f"{before:.3f} -> {after:.3f}; {time.perf_counter() - t0:.0f} s; everything is under {out}"
    )
    return {
        "checkpoint": base,
        "run_dir": run_dir,
        "losses": losses,
        "eval_before": before,
        "eval_after": after,
        "answers": answers,
        "learned": learned,
    }


def _train(base, train, held_out, run_dir, steps, progress):
    from k2jax.config import CONFIG_DIR
    from k2jax.train import Trainer
    from k2jax.train.run import EVAL_FILE, METRICS_FILE, read_jsonl

    overrides = [
        f"model.path={str(base)!r}",
        f"data.path={str(train)!r}",
        f"eval.path={str(held_out)!r}",
        f"train.run_dir={str(run_dir)!r}",
        f"train.steps={steps}",
        f"checkpoint.every={max(1, steps // 2)}",
        f"log.every={max(1, steps // 8)}",
        f"log.progress={progress}",
    ]
    with Trainer.from_config(CONFIG_DIR / "tiny_vision_train.gin", overrides) as trainer:
        trainer.setup()
        if trainer.step == 0:  # the base (LoRA B = 0); a resumed run logged it before
            trainer.evaluate()
        trainer.fit()
        after = trainer.evaluate()["eval_loss"]
    before = read_jsonl(run_dir / EVAL_FILE)[0]["eval_loss"]
    return [r["loss"] for r in read_jsonl(run_dir / METRICS_FILE)], before, after


def _ask(run_dir, held_out) -> list[tuple[str, str, str]]:
    from k2jax.chat import ChatSession, load
    from k2jax.generate import Sampling

    session = ChatSession.from_loaded(
        load(run=str(run_dir), dtype="float32"),
        sampling=Sampling(temperature=0.0),
        max_new_tokens=8,
    )
    answers, seen = [], set()
    for line in held_out.read_text().splitlines():
        record = json.loads(line)
        colour = record["messages"][1]["content"].removeprefix("It is ").rstrip(".")
        if colour in seen:
            continue
        seen.add(colour)
        image = str(held_out.parent / record["messages"][0]["content"][0]["image"])
        session.reset()
        answers.append((image, colour, session.reply("What colour is this?", images=[image])))
    return answers
