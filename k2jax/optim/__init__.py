"""k2jax.optim: the optimizer of LoRA training — Muon/MuonClip and AdamW, schedules, QK-clip.

* `optimizer` — `OptimConfig`, `make_optimizer(config, schedule, trainable)`: Muon for every LoRA
  factor (batched over layers and experts via optax dimension numbers), AdamW for trainable base
  weights, or AdamW for all; global-norm clipping.
* `schedules` — `ScheduleConfig`, `make_schedule(config, peak, total_steps)`: warmup + constant,
  cosine or WSD.
* `qk_clip` — `update_qk_clip(qk_clip, aux, tau)`: MuonClip's per-head rescaling after the update.
"""

from k2jax.optim.optimizer import (
    LORA_DIMENSION_NUMBERS,
    OptimConfig,
    expert_major,
    make_optimizer,
    muon_dimension_numbers,
)
from k2jax.optim.qk_clip import clip_gamma, update_qk_clip
from k2jax.optim.schedules import SCHEDULES, ScheduleConfig, make_schedule

__all__ = [
    "LORA_DIMENSION_NUMBERS",
    "SCHEDULES",
    "OptimConfig",
    "ScheduleConfig",
    "clip_gamma",
    "expert_major",
    "make_optimizer",
    "make_schedule",
    "muon_dimension_numbers",
    "update_qk_clip",
]
