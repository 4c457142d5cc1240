"""Building blocks: RMSNorm, a LoRA-aware linear, the embedding, the SwiGLU MLP.

Every weight is declared once, here, with its shape, dtype, initializer and logical axis names
(`nn.with_logical_partitioning`); shardings, abstract shapes for restore and the converter's shape
checks all derive from these declarations (see k2jax.sharding for the logical→mesh rules).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from k2jax.lora import LoraConfig
from k2jax.model.options import ComputeConfig, accum_dtype
from k2jax.ops.ce_backward import ce_matmul, kept_rows

BASE_INIT = nn.initializers.normal(0.02)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """y = w ⊙ cast(x32 · rsqrt(mean(x32²) + eps)) — the weight multiplies after the cast back
    to x's dtype, exactly as the reference (K2_FACTS §3.1)."""
    x32 = x.astype(accum_dtype(x.dtype))
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    compute: ComputeConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        w = self.param(
            "weight",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            self.compute.jnp_param_dtype,
        )
        return rms_norm(x, w, self.eps)


def module_path(module: nn.Module) -> str:
    """The HF-style dotted path of a module without stack names: 'self_attn.q_a_proj'."""
    parts = [p for p in module.scope.path if p not in ("dense_layers", "moe_layers")]
    return ".".join(parts)


def lora_variable(module: nn.Module, name: str, shape, axes, init):
    """A float32 LoRA factor in the "lora" collection (fp32 master weights)."""
    if module.is_initializing() and not module.has_rng("lora"):
        rng = module.make_rng("params")
    elif module.is_initializing():
        rng = module.make_rng("lora")
    else:
        rng = None
    var = module.variable(
        "lora",
        name,
        nn.with_logical_partitioning(lambda: init(rng, shape, jnp.float32), axes),
    )
    return var.value


def lora_a_init(fan_in: int):
    """PEFT's default for A (kaiming-uniform with a=√5): U(−1/√in, 1/√in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
    """y = x·Wᵀ (+ b) (+ s·(dropout(x)·Aᵀ)·Bᵀ), W in HF's [out, in] layout. The language model
    has no biases; the vision tower does (`bias=True`).

    `axes` names W's (out, in) logical axes. The LoRA pair exists when `lora` targets this module
    (k2jax.lora); dropout is active only when a "dropout" rng is passed to `apply`.
    """

    features: int
    axes: tuple[str, str]
    compute: ComputeConfig
    lora: LoraConfig | None = None
    bias: bool = False

    @nn.compact
    def __call__(self, x):
        dtype = self.compute.jnp_dtype
        in_features = x.shape[-1]
        w = self.param(
            "weight",
            nn.with_logical_partitioning(BASE_INIT, self.axes),
            (self.features, in_features),
            self.compute.jnp_param_dtype,
        )
        x = x.astype(dtype)
        if self.lora is not None and self.lora.backward == "ce":
            y = self._ce_matmul(x, w)
        else:
            y = jnp.einsum("...i,oi->...o", x, w.astype(dtype))
        if self.bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.axes[:1]),
                (self.features,),
                self.compute.jnp_param_dtype,
            )
            y = y + bias.astype(dtype)
        if self.lora is not None and self.lora.applies_to(module_path(self)):
            out_axis, in_axis = self.axes
            r = self.lora.rank
            a = lora_variable(
                self, "lora_A", (r, in_features), ("lora_rank", in_axis), lora_a_init(in_features)
            )
            b = lora_variable(
                self, "lora_B", (self.features, r), (out_axis, "lora_rank"), nn.initializers.zeros
            )
            lx = x
            if self.lora.dropout > 0 and self.has_rng("dropout"):
                lx = nn.Dropout(self.lora.dropout, deterministic=False)(x)
            t = jnp.einsum("...i,ri->...r", lx, a.astype(dtype)) * self.lora.scale
            t = checkpoint_name(t, "lora_t")
            y = y + jnp.einsum("...r,or->...o", t.astype(dtype), b.astype(dtype))
        # Named for remat "selective": the output of a frozen-weight matmul, saved so the backward
        # pass does not multiply by the frozen weight a third time (k2jax.model.options).
        return checkpoint_name(y, "proj_out")

    def _ce_matmul(self, x, w):
        """x·Wᵀ with lora.backward = "ce": W's rank-k factors and residual row norms are frozen
        params beside it (`ce_us`, `ce_vt`, `ce_rnorm`, float32), filled from the loaded W by
        k2jax.train.step (k2jax/ops/ce_backward.py). With lora.ce_refresh ≥ 1 the kept rows are
        the train state's ("ce_rows" collection, `rows` [m]) and the "ce_score" collection holds
        the probe whose gradient is the step's Σ dY² per row (`score` [out])."""
        out, inp = w.shape
        k = min(self.lora.ce_rank, out, inp)
        out_axis, in_axis = self.axes
        zeros = nn.initializers.zeros
        part = nn.with_logical_partitioning
        us = self.param("ce_us", part(zeros, (out_axis, None)), (out, k), jnp.float32)
        vt = self.param("ce_vt", part(zeros, (None, in_axis)), (k, inp), jnp.float32)
        rnorm = self.param("ce_rnorm", part(zeros, (out_axis,)), (out,), jnp.float32)
        m = kept_rows(out, self.lora.ce_keep)
        rows = score = None
        if self.lora.ce_refresh and 0 < m < out:
            rows, score = carried_rows(self, (m,), (None,), (out,), (out_axis,))
        return ce_matmul(x, w, us, vt, rnorm, m, rows, score)


def carried_rows(module: nn.Module, rows_shape, rows_axes, score_shape, score_axes):
    """(rows, score) of lora.ce_refresh ≥ 1 (k2jax/ops/ce_backward.py): the kept rows
    ("ce_rows"/"rows", int32; the train step chooses them, these initial ones are a placeholder)
    and the probe ("ce_score"/"score", float32 zeros; the step differentiates it)."""
    part = nn.with_logical_partitioning
    m = rows_shape[-1]
    first = lambda: jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), rows_shape)  # noqa: E731
    rows = module.variable("ce_rows", "rows", part(first, rows_axes))
    zeros = lambda: jnp.zeros(score_shape, jnp.float32)  # noqa: E731
    score = module.variable("ce_score", "score", part(zeros, score_axes))
    return rows.value, score.value


class Embed(nn.Module):
    vocab_size: int
    features: int
    compute: ComputeConfig

    @nn.compact
    def __call__(self, tokens):
        w = self.param(
            "weight",
            nn.with_logical_partitioning(BASE_INIT, ("vocab", "embed")),
            (self.vocab_size, self.features),
            self.compute.jnp_param_dtype,
        )
        return jnp.take(w, tokens, axis=0).astype(self.compute.jnp_dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) ⊙ up(x)). The dense layers and the shared experts."""

    intermediate: int
    compute: ComputeConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        kw = dict(compute=self.compute, lora=self.lora)
        gate = Linear(self.intermediate, ("mlp", "embed"), name="gate_proj", **kw)(x)
        up = Linear(self.intermediate, ("mlp", "embed"), name="up_proj", **kw)(x)
        return Linear(d, ("embed", "mlp"), name="down_proj", **kw)(nn.silu(gate) * up)
