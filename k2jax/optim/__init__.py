"""k2jax.optim: the optimizer of LoRA training — Muon/MuonClip and AdamW, schedules, QK-clip.

* `optimizer` — `OptimConfig`, `make_optimizer(config, schedule, trainable)`: Muon for every LoRA
  factor (optax's muon with its Newton–Schulz run in the r×r Gram space,
  `orthogonalize_in_gram_space`; batched over layers and experts), AdamW for trainable base
  weights, or AdamW for all; global-norm clipping.
* `schedules` — `ScheduleConfig`, `make_schedule(config, peak, total_steps)`: warmup + constant,
  cosine or WSD.
* `qk_clip` — `update_qk_clip(qk_clip, aux, threshold)`: MuonClip's per-head rescaling after the
  update; `set_thresholds` / `unset_thresholds` / `logit_scale_factor`: the per-head thresholds.
"""

from k2jax.optim.optimizer import (
    LORA_DIMENSION_NUMBERS,
    OptimConfig,
    expert_major,
    make_optimizer,
    muon_dimension_numbers,
    orthogonalize_in_gram_space,
)
from k2jax.optim.qk_clip import (
    clip_gamma,
    logit_scale_factor,
    set_thresholds,
    unset_thresholds,
    update_qk_clip,
)
from k2jax.optim.schedules import SCHEDULES, ScheduleConfig, make_schedule

__all__ = [
    "LORA_DIMENSION_NUMBERS",
    "SCHEDULES",
    "OptimConfig",
    "ScheduleConfig",
    "clip_gamma",
    "expert_major",
    "logit_scale_factor",
    "make_optimizer",
    "make_schedule",
    "muon_dimension_numbers",
    "orthogonalize_in_gram_space",
    "set_thresholds",
    "unset_thresholds",
    "update_qk_clip",
]
