"""The run folder: what a training run writes, and `load_run` to read a fine-tune back.

    <train.run_dir>/
      config.gin          the operative run config, every section (RunConfig.to_gin); rewritten
                          at every (re)start with the settings that run used
      model_config.json   the resolved architecture (ModelConfig fields, overrides applied)
      tokenizer/          only with model.tokenizer = "tiny": the tiny tokenizer's two files
      metrics.jsonl       one JSON object per train step: step, loss (mean over loss tokens),
                          z_loss, grad_norm (before clipping), lr, tokens (non-padding),
                          loss_tokens, tokens_seen, step_time_s, tokens_per_s, mfu (null where the
                          peak FLOP/s is unknown), max_attention_logit, qk_clipped_heads,
                          expert_load ((token, expert) pairs per expert over all MoE layers,
                          padding positions included), expert_load_cv, finite, nonfinite_streak,
                          nonfinite_total, time; non-finite values are written as null
      eval.jsonl          one JSON object per evaluation: step, eval_loss, eval_tokens
      tensorboard/        events.out.tfevents.* (the same scalars)
      checkpoints/<step>/ Orbax checkpoints (or checkpoint.dir): train/ (LoRA, trained base
                          leaves, QK-clip factors), opt/ (optimizer state, step, rng), meta/ (JSON:
                          data iterator state, tokens seen)

`load_run(run_dir, step=None)` returns the configs, the base's location and the trained trees of
one checkpoint — everything `k2jax export` (a PEFT adapter) and `k2jax merge` (LoRA and QK-clip
folded into the base) need, without the optimizer state.

Writes are atomic (temporary file, fsync, rename). On resume, metrics.jsonl / eval.jsonl are cut
back to the restored step, so the files describe one consistent history.
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
