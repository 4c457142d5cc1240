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


# Rematerialisation policies for the scanned decoder layers.
#   none   keep every activation (fastest, most memory)
#   full   recompute the whole layer in the backward pass (least memory)
#   dots   save matmul outputs without batch dims (jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
#   layer_io  save only the named layer-boundary activations (attention output, MoE output)
REMAT_POLICIES = ("none", "full", "dots", "layer_io")


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
    # Tokens per device per expert-parallel dispatch (0 = all at once). Bounds the dropless padded
    # all-to-all buffers (see k2jax.sharding.expert_parallel); must divide batch·seq / devices.
    moe_chunk_tokens: int = 0

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
        return jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out")
