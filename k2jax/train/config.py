"""The run configuration: one typed, validated dataclass per section of a gin-syntax file.

    model       where the frozen base comes from: a checkpoint folder (`path`) or an architecture
                preset for a random base (`preset`, tests and demos); tokenizer; ModelConfig overrides
    compute     k2jax.model.ComputeConfig: dtypes, INT4 or bf16 experts, remat, kernels
    mesh        data × expert × tensor
    lora        k2jax.lora.LoraConfig: rank, alpha, dropout, rsLoRA, targets
    optim       k2jax.optim.OptimConfig: Muon/AdamW, weight decay, clipping, QK-clip τ
    schedule    k2jax.optim.ScheduleConfig: warmup + constant / cosine / WSD
    data        k2jax.data.DataConfig: JSONL path, chat template, seq_len, batch_size (rows per step)
    train       run folder, steps (or None: sized by data.num_epochs), gradient accumulation,
                seeds, trainable base weights, NaN guard, resume (from the newest or a chosen step)
    eval        held-out file (or the data.val_size split), how often, how many batches
    checkpoint  where, how often, how many kept, async
    log         progress bar, TensorBoard, Weights & Biases, console cadence, peak FLOP/s for MFU

Sections reuse the library's own config dataclasses where one exists (compute, lora, optim,
schedule, data), so a knob has one definition and one validation. `RunConfig.load(files,
overrides)` reads files and `--set section.key=value` overrides through k2jax.config (unknown
keys and wrong types fail there, naming file:line, before any compute); `RunConfig.to_gin()` writes
the operative config back, which the trainer stores in the run folder and `load_run` reads.

The architecture itself is not a section: it comes from the checkpoint's config.json (DESIGN.md:
never hard-code a per-model constant) or, for a random base, from a preset file
(`model.preset = "tiny.gin"`), whose own `model.*` bindings are ModelConfig fields. Keeping it out
of the run file keeps that one meaning of `model.*` per file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from k2jax.config import ConfigError, check_field_types, load_config, to_gin
from k2jax.data.dataset import DataConfig
from k2jax.lora import LoraConfig
from k2jax.model.options import ComputeConfig
from k2jax.optim import OptimConfig, ScheduleConfig


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """The `model` section: where the frozen base comes from.

    path: a checkpoint folder (Hugging Face safetensors, bf16/FP8/INT4, or a converted folder) read
      by `k2jax.load_model`. Exactly one of path / preset.
    preset: an architecture file (a configs/*.gin name or a path) for a randomly initialised base —
      tests, demos, benchmarks without weights.
    seed: the random base's seed (preset only).
    tokenizer: a folder with tiktoken.model + tokenizer_config.json; None: the checkpoint folder;
      "tiny": the built-in 1,024-id test tokenizer (k2jax.data.testing), written into the run folder.
    overrides: ModelConfig fields to change after reading the architecture, e.g.
      {"latent_norm_eps": 1e-6} to match the reference code's latent norms.
    vision: Kimi-K2.5/K2.6's vision tower and projector. None: used when the checkpoint has a
      complete one and the data has images; True: always (an error without one); False: never
      (images in the data are then bad examples). Frozen unless lora.targets name its linears.
    """

    path: str | None = None
    preset: str | None = None
    seed: int = 0
    tokenizer: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    vision: bool | None = None

    def __post_init__(self):
        check_field_types(self, "model")
        if (self.path is None) == (self.preset is None):
            raise ConfigError(
                "model: set exactly one of model.path (a checkpoint folder) or model.preset "
                "(an architecture file for a random base)"
            )
        if self.preset is not None and self.tokenizer is None:
            raise ConfigError(
                "model.tokenizer: a random base (model.preset) has no tokenizer folder; name one "
                'or use "tiny" with the tiny presets'
            )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The `mesh` section: device mesh axis sizes (their product = devices used)."""

    data: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        check_field_types(self, "mesh")
        for name in ("data", "expert", "tensor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mesh.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def size(self) -> int:
        return self.data * self.expert * self.tensor


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The `train` section.

    run_dir: the run folder (config, metrics, TensorBoard events, checkpoints).
    steps: optimizer steps in total (a resumed run continues up to this number); None: as many
      as data.num_epochs epochs of data.batch_size rows take, counted from the data before
      training (one pass over the data per epoch, tokenizing and packing as training will), so
      the learning-rate schedule ends with the last epoch. A number and data.num_epochs both:
      the run stops at whichever comes first, the schedule is sized by the number.
    grad_accum: microbatches per step; data.batch_size rows are split into grad_accum microbatches
      run one after the other (lax.scan), gradients summed in float32.
    seed: LoRA initialisation and dropout.
    z_loss: weight of the auxiliary z-loss (lse²) added to the objective (0 = off).
    train_router, train_norms: also train the MoE router weights / all RMSNorm weights as full
      parameters with AdamW (LoRA covers only the linears).
    max_nonfinite_steps: stop after this many consecutive steps with a non-finite loss or gradient
      (each such step is skipped: no update).
    resume: continue from the newest checkpoint in the run folder; False refuses to start in a
      folder that already has checkpoints (nothing is overwritten silently).
    resume_step: continue from this step's checkpoint instead of the newest; the checkpoints of
      later steps are moved aside (to `<checkpoint dir>-superseded/<step>`, never deleted) and the
      run's metrics are cut back to this step, so the run continues as one history.
    """

    run_dir: str = "runs/k2jax"
    steps: int | None = 1000
    grad_accum: int = 1
    seed: int = 0
    z_loss: float = 0.0
    train_router: bool = False
    train_norms: bool = False
    max_nonfinite_steps: int = 5
    resume: bool = True
    resume_step: int | None = None

    def __post_init__(self):
        check_field_types(self, "train")
        if not self.run_dir:
            raise ConfigError("train.run_dir must name a folder")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1 or None, got {self.steps}")
        if self.resume_step is not None and (self.resume_step < 1 or not self.resume):
            raise ConfigError(
                f"train.resume_step = {self.resume_step}: needs train.resume = True and a step "
                ">= 1 (a checkpoint of this run)"
            )
        if self.grad_accum < 1:
            raise ConfigError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.z_loss < 0:
            raise ConfigError(f"train.z_loss must be >= 0, got {self.z_loss}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(
                f"train.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}"
            )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The `eval` section: loss on held-out data (eval.path, else the data.val_size split) every
    `every` steps (0 = never), over at most `batches` batches of data.batch_size rows (the data
    section's template and seq_len)."""

    path: str | None = None
    every: int = 0
    batches: int = 8

    def __post_init__(self):
        check_field_types(self, "eval")
        if self.every < 0 or self.batches < 1:
            raise ConfigError("eval.every must be >= 0 and eval.batches >= 1")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint` section.

    dir: where checkpoints go (None: <run_dir>/checkpoints).
    every: save every this many steps (0: only at the end); the last step is always saved.
    keep: how many of the newest checkpoints to keep.
    async_save: write in the background while training continues (Orbax async).
    """

    dir: str | None = None
    every: int = 500
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        check_field_types(self, "checkpoint")
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """The `log` section.

    every: a console log line every this many steps (metrics.jsonl gets every step).
    progress: show a tqdm progress bar.
    tensorboard: write TensorBoard event files to <run_dir>/tensorboard.
    peak_tflops: peak dense bf16 TFLOP/s of one device for the MFU estimate (None: the measured
      ceiling of the device kind where one was measured — 800 on H100/H200, GPU_NOTES.md — else
      its datasheet figure; no MFU on unknown devices and CPUs). metrics.jsonl names the peak.
    wandb: also log the same scalars to Weights & Biases (the `wandb` package, an optional
      extra: `pip install 'k2jax[wandb]'`; imported only when this is True). WANDB_MODE=offline
      writes the run under <run_dir>/wandb with no network (`wandb sync` uploads it later).
    wandb_project, wandb_name: the W&B project (None: $WANDB_PROJECT, else "k2jax") and run name
      (None: the run folder's name).
    """

    every: int = 10
    progress: bool = True
    tensorboard: bool = True
    peak_tflops: float | None = None
    wandb: bool = False
    wandb_project: str | None = None
    wandb_name: str | None = None

    def __post_init__(self):
        check_field_types(self, "log")
        if self.every < 1:
            raise ConfigError(f"log.every must be >= 1, got {self.every}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"log.peak_tflops must be > 0 or None, got {self.peak_tflops}")


SECTIONS: dict[str, type] = {
    "model": ModelSource,
    "compute": ComputeConfig,
    "mesh": MeshConfig,
    "lora": LoraConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """All sections of a run. Build with `RunConfig.load(files, overrides)` or directly."""

    model: ModelSource
    data: DataConfig
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    @classmethod
    def load(
        cls,
        files: str | os.PathLike | Sequence[str | os.PathLike],
        overrides: Sequence[str] = (),
    ) -> RunConfig:
        """Reads config files (gin syntax) and `section.key=value` overrides."""
        return cls(**load_config(files, SECTIONS, overrides))

    def __post_init__(self):
        if self.eval.every and self.eval.path is None and not self.data.val_size:
            raise ConfigError(
                "eval.every > 0 needs eval.path (held-out data) or data.val_size (a split)"
            )
        if self.train.steps is None and self.data.num_epochs is None:
            raise ConfigError(
                "train.steps = None sizes the run by its epochs: set data.num_epochs (or a "
                "number of train.steps)"
            )

    def replace(self, **changes: dict[str, Any]) -> RunConfig:
        """A copy with some fields changed per section: `cfg.replace(train={"steps": 10})`."""
        out = {}
        for section, fields in changes.items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
            out[section] = dataclasses.replace(getattr(self, section), **fields)
        return dataclasses.replace(self, **out)

    def to_gin(self) -> str:
        """The operative config, every knob of every section, in the syntax `load` reads."""
        return "\n".join(to_gin(name, getattr(self, name)) for name in SECTIONS)
