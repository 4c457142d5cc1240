"""The run folder: what a training run writes, and `load_run` to read a fine-tune back.

    <train.run_dir>/
      config.gin          the operative run config, every section (RunConfig.to_gin), of the
                          latest (re)start
      config_history/     when a resumed run changed settings: each earlier config.gin, named by
                          the step it was replaced at (step_000120.gin: in effect up to step 120)
      model_config.json   the resolved architecture (ModelConfig fields, overrides applied)
      tokenizer/          only with model.tokenizer = "tiny": the tiny tokenizer's two files
      metrics.jsonl       one JSON object per train step: step, loss (mean over loss tokens),
                          z_loss, grad_norm (before clipping), lr, tokens (non-padding),
                          loss_tokens, tokens_seen, step_time_s, tokens_per_s, mfu (null where the
                          peak FLOP/s is unknown), mfu_peak_tflops and mfu_peak (the peak mfu
                          divides by and where it comes from: "measured" 800 TFLOP/s on
                          H100/H200, "datasheet", or "log.peak_tflops"), max_attention_logit,
                          qk_clipped_heads,
                          expert_load ((token, expert) pairs per expert over all MoE layers,
                          padding positions included), expert_load_cv, moe_exchange_rounds
                          (all-to-all rounds of the busiest MoE exchange: 1 = no overflow, 0 =
                          one device), finite, nonfinite_streak,
                          nonfinite_total, time; non-finite values are written as null
      eval.jsonl          one JSON object per evaluation: step, eval_loss, eval_tokens
      tensorboard/        events.out.tfevents.* (the same scalars)
      checkpoints/<step>/ Orbax checkpoints (or checkpoint.dir): train/ (LoRA, trained base
                          leaves, QK-clip factors), opt/ (optimizer state, step, rng), meta/ (JSON:
                          data iterator state, tokens seen, the counted steps of an epoch-sized run)
      checkpoints/README.md  how to turn any step into a PEFT adapter (`k2jax export --step N`),
                          chat with it, merge it, or resume from it (`checkpoint_readme`)
      checkpoints-superseded/<step>/  checkpoints after a train.resume_step, moved aside

`load_run(run_dir, step=None)` returns the configs, the base's location and the trained trees of
one checkpoint — everything `k2jax export` (a PEFT adapter) and `k2jax merge` (LoRA and QK-clip
folded into the base) need, without the optimizer state.

Writes are atomic (temporary file, fsync, rename). On resume, metrics.jsonl / eval.jsonl are cut
back to the restored step, so the files describe one consistent history. A run folder's history
is never replaced by another run: a fresh start in a folder whose metrics.jsonl holds steps of a
run with other settings is refused (`check_fresh_start`), and a resume with changed settings keeps
the old config.gin in config_history/ and names the changes (`config_changes`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from k2jax.config import ConfigError, ModelConfig
from k2jax.lora import LoraConfig
from k2jax.train.config import RunConfig

CONFIG_FILE = "config.gin"
MODEL_CONFIG_FILE = "model_config.json"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TENSORBOARD_DIR = "tensorboard"
TOKENIZER_DIR = "tokenizer"
CONFIG_HISTORY_DIR = "config_history"


def checkpoint_dir(config: RunConfig, run_dir: str | os.PathLike | None = None) -> Path:
    """checkpoint.dir, or <run_dir>/checkpoints (run_dir: default train.run_dir)."""
    if config.checkpoint.dir is not None:
        return Path(config.checkpoint.dir)
    return Path(run_dir if run_dir is not None else config.train.run_dir) / "checkpoints"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_readme(run_dir: str | os.PathLike, checkpoints: str | os.PathLike) -> str:
    """The README.md a run writes into its checkpoint folder: what the step folders are and the
    commands that make an adapter, a chat, a merged model or a resumed run of any one of them.

    Why no adapter folder beside each step: a PEFT adapter of Kimi-K2 with every routed expert
    adapted is ~40 GB in float32 (10.5B factors at r = 16), written at every save and duplicating
    what the step already holds; exporting the chosen step on demand is exact, and it applies
    the same checks (QK-clip factors, fully trained leaves) as any export."""
    run = Path(run_dir).absolute()
    return f"""# Checkpoints of the k2jax run {run}

Each numbered folder is the complete training state after that many optimizer steps (Orbax:
`train/` LoRA factors, QK-clip factors, fully trained base leaves; `opt/` optimizer state;
`meta/` data position). Folders named `N.orbax-checkpoint-tmp*` are saves that did not finish;
they are never read. The newest `checkpoint.keep` steps are kept.

A PEFT adapter (adapter_config.json + adapter_model.safetensors, Hugging Face names) of step N:

    k2jax export --run {run} --step N --out {run}-adapters/step_N

(outside the run folder: no command writes into what it reads).

Chat with step N, fold it into the base model, or continue training from it:

    k2jax chat  --run {run} --step N
    k2jax merge --run {run} --step N --out {run}-merged/step_N
    k2jax train --config {run}/config.gin --set train.resume_step=N

Resuming from an earlier step moves the later checkpoints to `{Path(checkpoints).name}-superseded/`
beside this folder (never deleted) and cuts metrics.jsonl back to step N.
"""


def model_config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=1) + "\n"


def model_config_from_json(path: str | os.PathLike) -> ModelConfig:
    try:
        fields = json.loads(Path(path).read_text())
        return ModelConfig(**fields)
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"{path}: cannot read the run's model config: {e}") from None


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> None:
    """Keeps the records with step ≤ last_step (and drops a torn last line)."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            keep.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


def config_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """ "section.key: old → new" for every setting that differs between two run configs."""

    def bindings(cfg: RunConfig) -> dict[str, str]:
        pairs = (line.split(" = ", 1) for line in cfg.to_gin().splitlines() if " = " in line)
        return {k.strip(): v.strip() for k, v in pairs}

    a, b = bindings(old), bindings(new)
    return [
        f"{k}: {a.get(k, '(unset)')} → {b.get(k, '(unset)')}" for k in a | b if a.get(k) != b.get(k)
    ]


def keep_config_history(run_dir: str | os.PathLike, step: int) -> Path:
    """Copies the run folder's config.gin to config_history/step_<step>.gin (never overwriting
    an earlier copy) and returns the copy's path."""
    run_dir = Path(run_dir)
    folder = run_dir / CONFIG_HISTORY_DIR
    folder.mkdir(exist_ok=True)
    target = folder / f"step_{step:06d}.gin"
    n = 1
    while target.exists():
        n += 1
        target = folder / f"step_{step:06d}.{n}.gin"
    atomic_write_text(target, (run_dir / CONFIG_FILE).read_text())
    return target


def check_fresh_start(run_dir: str | os.PathLike, config: RunConfig) -> None:
    """Refuses to start a new run (no checkpoint to resume) in a folder whose metrics.jsonl
    holds steps of a run with other settings: starting would replace that run's history. The
    same settings again (a run stopped before its first checkpoint) may restart."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        return
    steps = 0
    for line in metrics.read_text().splitlines():
        try:
            steps += isinstance(json.loads(line), dict)
        except json.JSONDecodeError:
            continue
    if not steps:
        return
    old_file = run_dir / CONFIG_FILE
    why = f"its {old_file.name} is missing"
    if old_file.is_file():
        try:
            old = RunConfig.load(old_file)
        except (ConfigError, OSError) as e:
            why = f"its {old_file.name} cannot be read ({e})"
        else:
            changes = config_changes(old, config)
            if not changes:
                return
            why = "it had other settings: " + "; ".join(changes[:5])
            if len(changes) > 5:
                why += f"; and {len(changes) - 5} more"
    raise ConfigError(
        f"{metrics} holds {steps} steps of another run, and no checkpoint of it is in "
        f"{checkpoint_dir(config)} to resume; {why}. Starting here would replace that run's "
        "history: choose a new train.run_dir (or remove the old run's files yourself)"
    )


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@dataclasses.dataclass
class Run:
    """One checkpoint of a training run, as `load_run` returns it.

    lora: the "lora" collection (HF names, lora_A [.., r, in], lora_B [.., out, r], fp32), the
      tree `Transformer(model_config, compute, lora_config).apply({"params", "lora", "qk_clip"})`
      takes. qk_clip: the "qk_clip" collection ({stack: {"self_attn": {"scales": [L, 3, H]}}},
      factors for q_nope, q_rope, k_nope rows of each head). trained_params: base leaves trained
      as full parameters (router / norms; fp32), to be put over the base — empty when none.
    base_path / preset: where the frozen base came from (exactly one is set).
    """

    run_dir: Path
    step: int
    config: RunConfig
    model_config: ModelConfig
    lora_config: LoraConfig
    base_path: str | None
    preset: str | None
    lora: dict
    qk_clip: dict
    trained_params: dict
    meta: dict[str, Any]

    @property
    def tokenizer_dir(self) -> Path | None:
        """The tokenizer folder the run used (the checkpoint, the run's copy, or a named one)."""
        tok = self.config.model.tokenizer
        if tok == "tiny":
            return self.run_dir / TOKENIZER_DIR
        if tok is not None:
            return Path(tok)
        return Path(self.base_path) if self.base_path else None


def load_run(run_dir: str | os.PathLike, step: int | None = None, *, sharding=None) -> Run:
    """Reads a run folder's configs and one checkpoint's trained trees (default: the newest).

    Arrays are placed with `sharding` (default: host memory via the CPU device). The optimizer
    state is not read.
    """
    from k2jax.train.checkpoint import Checkpointer

    run_dir = Path(run_dir)
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found ({run_dir} is not a k2jax run folder)")
    config = RunConfig.load(config_file)
    model_config = model_config_from_json(run_dir / MODEL_CONFIG_FILE)
    ckpt = checkpoint_dir(config, run_dir)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: the run's checkpoint folder does not exist")
    checkpointer = Checkpointer(ckpt, keep=config.checkpoint.keep, async_save=False, read_only=True)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(f"{ckpt}: the run has no complete checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"{ckpt}: no checkpoint for step {step} (have {steps})")
        train, meta = checkpointer.restore_train(step, sharding)
    finally:
        checkpointer.close()
    return Run(
        run_dir=run_dir,
        step=step,
        config=config,
        model_config=model_config,
        lora_config=config.lora,
        base_path=config.model.path,
        preset=config.model.preset,
        lora=train["trainable"]["lora"],
        qk_clip=train["qk_clip"],
        trained_params=train["trainable"].get("params", {}) or {},
        meta=meta,
    )
