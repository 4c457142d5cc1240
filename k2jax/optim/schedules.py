"""Learning-rate schedules: linear warmup, then constant, cosine, or warmup-stable-decay (WSD).

    constant  lr(c) = peak after warmup
    cosine    cosine from peak down to final_fraction · peak over the steps after warmup
    wsd       peak until the last `decay_fraction` of the steps, then down to final_fraction · peak
              (K2's own pre-training recipe is WSD, K2_FACTS §5.1; for short fine-tunes cosine is
              the common choice)

`c` is the optimizer's update count (optax evaluates the schedule at the count *before* the
update, starting at 0). Warmup is linear and reaches `peak · (c + 1) / warmup_steps`, so the first
update already moves the weights (optax.linear_schedule starts at exactly 0, which wastes the first
step: with LoRA's B = 0 that step would change nothing at all).

Built from optax's pieces (linear_schedule, cosine_decay_schedule, join_schedules, which hands
each piece the count minus its start); only the WSD cooldown shapes are written here. The schedule
is a pure function of the count, so resuming from a checkpoint (which holds the
optimizer's count) continues it exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import jax.numpy as jnp
import optax

from k2jax.config import ConfigError, check_field_types

SCHEDULES = ("constant", "cosine", "wsd")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The `schedule` section of a run config (the peak is `optim.learning_rate`).

    name: constant | cosine | wsd.
    warmup_steps: linear warmup length (0 = none).
    warmup_ratio: the warmup as a share of all steps instead, round(ratio × total steps) (as
      transformers' warmup_ratio; for a run sized in epochs the total is counted from the data).
      At most one of warmup_steps / warmup_ratio is non-zero.
    decay_steps: steps of the decay phase for cosine (None: all steps after warmup); for wsd the
      decay length is `decay_fraction` of the total steps.
    final_fraction: the lr at the end of the decay, as a fraction of the peak.
    decay_fraction: wsd only: the final share of the steps spent decaying.
    decay_shape: wsd only: linear, cosine or sqrt (1 − √progress, the "1-sqrt" cooldown).
    """

    name: Literal["constant", "cosine", "wsd"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    decay_steps: int | None = None
    final_fraction: float = 0.1
    decay_fraction: float = 0.2
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"

    def __post_init__(self):
        check_field_types(self, "schedule")
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"schedule.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError(
                "schedule.warmup_steps and schedule.warmup_ratio are both set; set one (the "
                "other = 0)"
            )
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ConfigError(f"schedule.decay_steps must be >= 1 or None, got {self.decay_steps}")
        if not 0.0 <= self.final_fraction <= 1.0:
            raise ConfigError(
                f"schedule.final_fraction must be in [0, 1], got {self.final_fraction}"
            )
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(
                f"schedule.decay_fraction must be in (0, 1], got {self.decay_fraction}"
            )


def warmup_steps(config: ScheduleConfig, total_steps: int) -> int:
    """The warmup length in steps: schedule.warmup_steps, or round(warmup_ratio × total_steps)."""
    return config.warmup_steps or round(config.warmup_ratio * total_steps)


def make_schedule(
    config: ScheduleConfig, peak: float, total_steps: int
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """count → learning rate (float32), for `total_steps` optimizer updates."""
    if total_steps < 1:
        raise ConfigError(f"the schedule needs at least one step, got {total_steps}")
    warmup = warmup_steps(config, total_steps)
    if warmup >= total_steps and config.name != "constant":
        raise ConfigError(
            f"schedule.warmup_steps ({warmup}) must be smaller than the number of steps "
            f"({total_steps}) for a decaying schedule"
        )
    final = peak * config.final_fraction
    # optax.linear_schedule starts at init_value: peak/warmup at c = 0, peak at c = warmup − 1.
    warm = optax.linear_schedule(peak / max(warmup, 1), peak, max(warmup - 1, 1))
    if config.name == "constant":
        after = optax.constant_schedule(peak)
    elif config.name == "cosine":
        decay = config.decay_steps or (total_steps - warmup)
        after = optax.cosine_decay_schedule(peak, decay, alpha=config.final_fraction)
    else:  # wsd: stable at the peak, then the last decay_fraction of the steps decays
        decay = max(1, round(total_steps * config.decay_fraction))
        start = max(warmup, total_steps - decay)
        decay = max(1, total_steps - start)
        shape = config.decay_shape

        def cooldown(k):  # k = count − start; the first decayed update is already below peak
            p = jnp.clip((k + 1.0) / decay, 0.0, 1.0)
            if shape == "linear":
                f = 1.0 - p
            elif shape == "cosine":
                f = 0.5 * (1.0 + jnp.cos(math.pi * p))
            else:
                f = 1.0 - jnp.sqrt(p)
            return final + (peak - final) * f

        after = optax.join_schedules([optax.constant_schedule(peak), cooldown], [start - warmup])
    schedule = optax.join_schedules([warm, after], [warmup])
    return lambda count: jnp.asarray(schedule(count), jnp.float32)
