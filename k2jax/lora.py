"""LoRA: which linears get adapters, their shapes, initialisation and scaling.

A LoRA adapter on a frozen weight W [out, in] (the Hugging Face layout k2jax keeps) is a pair
A [r, in], B [out, r] with  y = x·Wᵀ + s · (x·Aᵀ)·Bᵀ,  s = alpha / r  (or alpha / √r with rsLoRA).
Routed experts get one adapter per expert: A [E, r, in], B [E, out, r]. A starts random
(PEFT's kaiming-uniform: U(±1/√in)), B starts at zero, so step 0 is exactly the base model.

The adapters live in their own variable collection, "lora", next to the frozen "params": the
optimizer and the gradient only ever see "lora"; the base stays bit-identical. We never form
W + s·BA during training (for INT4 experts that would mean a bf16 copy of every expert).

Targets are module names matched PEFT-style against the end of a module path, component by
component: "q_a_proj" matches `self_attn.q_a_proj` in every layer, "gate_proj" matches the dense MLP,
the shared experts and the routed experts, "experts.gate_proj" only the routed experts,
"shared_experts.*" every shared-expert linear. Module paths are the HF names without the layer index:

    self_attn.{q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj}
    mlp.{gate_proj, up_proj, down_proj}                      (dense layers)
    mlp.shared_experts.{gate_proj, up_proj, down_proj}
    mlp.experts.{gate_proj, up_proj, down_proj}              (all routed experts, stacked)

Kimi-K2.5's vision side (k2jax.model.vision) has its own paths, which no default target matches
— the tower and projector stay frozen unless named:

    vision_tower.blocks.{wqkv, wo, fc0, fc1}                 (every MoonViT block, stacked)
    mm_projector.{proj_0, proj_2}

e.g. `lora.targets = [..., "vision_tower.blocks.*", "mm_projector.*"]`. (The patch embedding, a
convolution in the checkpoint, takes no adapter.)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

from k2jax.config import ConfigError, check_field_types

# The linears LoRA can target, by HF module name: attention's five and the MLP's three (dense
# MLP, shared and routed experts alike). The one list: conversion's names and checks use it too.
ATTENTION_TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS

LINEAR_PATHS = (
    "self_attn.q_a_proj",
    "self_attn.q_b_proj",
    "self_attn.kv_a_proj_with_mqa",
    "self_attn.kv_b_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "mlp.shared_experts.gate_proj",
    "mlp.shared_experts.up_proj",
    "mlp.shared_experts.down_proj",
    "mlp.experts.gate_proj",
    "mlp.experts.up_proj",
    "mlp.experts.down_proj",
)
VISION_PATHS = (
    "vision_tower.blocks.wqkv",
    "vision_tower.blocks.wo",
    "vision_tower.blocks.fc0",
    "vision_tower.blocks.fc1",
    "mm_projector.proj_0",
    "mm_projector.proj_2",
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The `lora` section: rank, alpha (scale alpha/rank, or alpha/√rank with rslora), dropout
    on the adapters' input, the target modules (see the module docstring), and `init_from`: a
    PEFT adapter folder (adapter_config.json + adapter_model.safetensors) whose factors a new run
    starts from instead of A random, B zero — its rank and scale must equal this section's, its
    modules must be among the targets (k2jax.conversion.peft_load). A resumed run ignores it."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # scale alpha/√r instead of alpha/r (Kalajdzievski 2023)
    targets: tuple[str, ...] = ALL_TARGETS
    init_from: str | None = None
    # The activation gradient through frozen weights: "exact", or "ce" — approximated by a
    # rank-`ce_rank` part of W plus its `ce_keep` fraction of rows that matter most for the
    # step's gradient (k2jax/ops/ce_backward.py): every frozen linear (attention, MLPs, shared
    # and routed experts — per expert —, the vision tower) but the LM head. The forward is
    # unchanged. `ce_refresh`: 0 chooses the rows in every backward from its own gradient; N ≥ 1
    # carries one set per linear (per expert) in the train state, re-chosen at steps 1, 1 + N,
    # 1 + 2N, … from the gradients of the steps since — the same rows for every microbatch,
    # replica and MoE chunk of a step (step 0: by the residual's row norms).
    backward: str = "exact"
    ce_rank: int = 64
    ce_keep: float = 0.125
    ce_refresh: int = 0

    def __post_init__(self):
        check_field_types(self, "lora")
        if self.rank <= 0:
            raise ConfigError(f"lora.rank must be > 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ConfigError("lora.targets is empty: name at least one module")
        if self.init_from is not None and not self.init_from:
            raise ConfigError("lora.init_from: name a PEFT adapter folder, or None")
        if self.backward not in ("exact", "ce"):
            raise ConfigError(f"lora.backward must be 'exact' or 'ce', got {self.backward!r}")
        if self.ce_rank < 1:
            raise ConfigError(f"lora.ce_rank must be >= 1, got {self.ce_rank}")
        if not 0.0 <= self.ce_keep <= 1.0:
            raise ConfigError(f"lora.ce_keep must be in [0, 1], got {self.ce_keep}")
        if self.ce_refresh < 0:
            raise ConfigError(
                f"lora.ce_refresh must be >= 0 (0: rows chosen every backward; N: every N "
                f"steps), got {self.ce_refresh}"
            )
        for t in self.targets:
            if not any(_matches(t, p) for p in LINEAR_PATHS + VISION_PATHS):
                raise ConfigError(
                    f"lora.targets: {t!r} matches no linear; known module paths: "
                    + ", ".join(LINEAR_PATHS + VISION_PATHS)
                )

    @property
    def trains_vision(self) -> bool:
        """Whether any target is a vision-tower or projector linear."""
        return any(self.applies_to(p) for p in VISION_PATHS)

    @property
    def exact(self) -> LoraConfig:
        """This config with the exact backward (what inference and export use: the adapters are
        the same, only training's backward differs)."""
        return dataclasses.replace(self, backward="exact")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def applies_to(self, module_path: str) -> bool:
        """Whether the linear at `module_path` (e.g. "mlp.experts.gate_proj") gets an adapter."""
        return any(_matches(t, module_path) for t in self.targets)


def _matches(target: str, path: str) -> bool:
    """PEFT-style suffix match on dotted components; glob characters are allowed."""
    t_parts, p_parts = target.split("."), path.split(".")
    if len(t_parts) > len(p_parts):
        return False
    tail = p_parts[len(p_parts) - len(t_parts) :]
    return all(fnmatch.fnmatchcase(p, t) for p, t in zip(tail, t_parts))
