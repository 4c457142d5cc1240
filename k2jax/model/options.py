"""Run-time knobs of the model that are not part of the architecture (dtypes, kernels, remat)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from k2jax.config import ConfigError, check_field_types

# float64 is for numerics checks only (needs jax_enable_x64); training uses bfloat16 or float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def accum_dtype(dtype):
    """The dtype of reductions, softmax and routing: float32, or wider if the inputs are."""
    return jnp.promote_types(dtype, jnp.float32)


# Rematerialisation policies for the scanned decoder layers (what the backward pass recomputes).
#   none       keep every activation (most memory; every frozen weight multiplies twice a step:
#              forward and input gradient)
#   full       recompute the whole layer in the backward pass (least memory; three passes over
#              every frozen weight: forward, recompute, input gradient)
#   selective  save the outputs of every frozen-weight matmul — the linears ("proj_out"), the
#              routed experts' gate|up and down GEMMs ("expert_h", "expert_out") — and the LoRA
#              intermediates ("lora_t"), the attention and MoE outputs; recompute only the cheap
#              rest (norms, RoPE, SwiGLU, routing, attention's softmax): two passes over every
#              frozen weight, at a fraction of "none"'s memory
#   dots       save matmul outputs without batch dims (jax.checkpoint_policies.dots_with_no_batch_
#              dims_saveable: not the expert GEMMs, which are not dot_general)
#   layer_io   save only the named layer-boundary activations (attention output, MoE output)
REMAT_POLICIES = ("none", "full", "selective", "dots", "layer_io")
# How one row's tokens are laid out outside the MoE (k2jax/model/context_parallel.py):
#   none    rows split over data × expert, each row on one device (batch a multiple of both)
#   expert  each row split along the sequence over `expert`, rows over `data`
#   all     each row split along the sequence over data × expert (any number of rows)
#   auto    "none" when the rows of a microbatch split over data × expert, else "expert" when they
#           split over data, else "all" (resolved by the trainer and the planner, who know the
#           batch; model code without a resolved mode lays tokens out as "none")
CONTEXT_PARALLEL = ("auto", "none", "expert", "all")
SELECTIVE_NAMES = ("proj_out", "lora_t", "expert_h", "expert_out", "attn_out", "mlp_out")


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    dtype: str = "bfloat16"  # activations and matmul inputs
    param_dtype: str = "bfloat16"  # frozen base weights (and experts when experts="bf16")
    experts: str = "bf16"  # how routed experts are held: "bf16" or "int4" (values + group scales)
    int4_group_size: int = 32
    remat: str = "full"
    attention_impl: str = "auto"
    gmm_impl: str = "auto"
    loss_chunk_tokens: int = 2048  # tokens per chunk of the LM head + cross-entropy
    # Expert parallelism (k2jax/model/expert_parallel.py). moe_chunk_tokens: tokens per device per
    # memory chunk, run one after another (0 = all at once); must divide batch·seq / devices.
    # moe_capacity_factor: rows per peer block of the all-to-all, × the average (pairs / peers);
    # pairs beyond it go in exact overflow rounds. moe_overlap_chunks: independent sub-chunks per
    # chunk, so one's all-to-all can overlap another's expert GEMMs on GPU (1 = off).
    moe_chunk_tokens: int = 0
    moe_capacity_factor: float = 1.25
    moe_overlap_chunks: int = 2
    context_parallel: str = "auto"

    def __post_init__(self):
        check_field_types(self, "compute")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(
                    f"compute.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}"
                )
        if self.experts not in ("bf16", "int4"):
            raise ConfigError(f"compute.experts must be 'bf16' or 'int4', got {self.experts!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"compute.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.int4_group_size <= 0 or self.loss_chunk_tokens <= 0:
            raise ConfigError("compute.int4_group_size and compute.loss_chunk_tokens must be > 0")
        if self.moe_chunk_tokens < 0:
            raise ConfigError(f"compute.moe_chunk_tokens must be >= 0, got {self.moe_chunk_tokens}")
        if not self.moe_capacity_factor > 0:
            raise ConfigError(
                f"compute.moe_capacity_factor must be > 0, got {self.moe_capacity_factor}"
            )
        if self.context_parallel not in CONTEXT_PARALLEL:
            raise ConfigError(
                f"compute.context_parallel must be one of {CONTEXT_PARALLEL}, "
                f"got {self.context_parallel!r}"
            )
        if self.moe_overlap_chunks < 1:
            raise ConfigError(
                f"compute.moe_overlap_chunks must be >= 1, got {self.moe_overlap_chunks}"
            )

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    def remat_policy(self):
        """The jax.checkpoint policy, or None for no rematerialisation."""
        if self.remat == "none":
            return None
        if self.remat == "full":
            return jax.checkpoint_policies.nothing_saveable
        if self.remat == "dots":
            return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        if self.remat == "selective":
            return jax.checkpoint_policies.save_only_these_names(*SELECTIVE_NAMES)
        return jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out")
