"""Mixture of experts as Flax modules: the router's and the experts' weights, the MoE layer.

The computation lives in plain functions: routing, the sort by expert and the expert FFN in
k2jax/model/experts.py (one device), the all-to-all exchange in k2jax/model/expert_parallel.py
(a mesh). This module declares the weights — the router [E, D] and its selection bias, the
stacked experts (bf16, or INT4 codes + group scales) and their per-expert LoRA — and picks the
path: expert-parallel when a mesh of more than one device is the context, else one device. The
shared experts are an ordinary SwiGLU MLP added to the routed output.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from k2jax.config import ModelConfig
from k2jax.lora import LoraConfig
from k2jax.model.context_parallel import flatten_tokens, unflatten_tokens
from k2jax.model.expert_parallel import mesh_is_parallel, moe_expert_parallel
from k2jax.model.experts import ExpertWeights, PairDropout, route, routed_experts
from k2jax.model.layers import (
    BASE_INIT,
    MLP,
    carried_rows,
    lora_a_init,
    lora_variable,
    module_path,
)
from k2jax.model.options import ComputeConfig
from k2jax.ops.ce_backward import GroupedFactors, kept_rows
from k2jax.ops.grouped_matmul import GroupedLora
from k2jax.quant import Int4Weight, random_int4


def _per_expert(draw, num_experts: int):
    """An initializer of an [E, ...] stack that draws one expert at a time (`lax.map` over split
    keys). Random bits are generated at full width (uint32) before they are cast, so drawing a
    whole stack at once needs temporaries of 4× its int32 size: a 384-expert gate|up stack of K2
    asks for 180 GB; one expert at a time needs 0.5 GB. Only random bases (tests, benchmarks,
    `k2jax plan`'s abstract init) run this; a loaded checkpoint never does."""

    def init(key):
        return jax.lax.map(draw, jax.random.split(key, num_experts))

    return init


class ExpertProj(nn.Module):
    """One stacked expert projection: its weight [E, out, in] (bf16, or INT4 codes + scales) when
    `with_weight`, and its per-expert LoRA (A [E, r, in], B [E, out, r]) when targeted.

    gate and up share one fused base weight (`gate_up_proj`) but have separate adapters, so the
    modules `gate_proj` / `up_proj` carry LoRA only.

    `ce`: the run's LoRA config when its backward is "ce" — then the weight has CE-LoRA's frozen
    factors beside it (`ce_ust` [E, k, out], `ce_v` [E, in, k], `ce_rnorm` [E, out], compute
    dtype; filled from the loaded weight by k2jax.train.step), unless every row is kept, which
    is the exact backward.
    """

    num_experts: int
    out_features: int
    in_features: int
    axes: tuple[str, str]  # (out, in) logical axes
    compute: ComputeConfig
    lora: LoraConfig | None
    with_weight: bool = True
    ce: LoraConfig | None = None

    @nn.compact
    def __call__(
        self,
    ) -> tuple[jax.Array | Int4Weight | None, GroupedLora | None, GroupedFactors | None]:
        E, N, K = self.num_experts, self.out_features, self.in_features
        out_axis, in_axis = self.axes
        axes = ("experts", out_axis, in_axis)
        weight = None
        if self.with_weight and self.compute.experts == "int4":
            g = self.compute.int4_group_size
            dtype = self.compute.jnp_param_dtype
            # Codes and scales draw from the same key, so they form one consistent Int4Weight.
            values = self.param(
                "weight_q",
                nn.with_logical_partitioning(
                    _per_expert(lambda key: random_int4(key, (N, K), g, dtype=dtype).values, E),
                    axes,
                ),
            )
            scales = self.param(
                "weight_scale",
                nn.with_logical_partitioning(
                    _per_expert(lambda key: random_int4(key, (N, K), g, dtype=dtype).scales, E),
                    ("experts", out_axis, in_axis + "_groups"),
                ),
            )
            weight = Int4Weight(values, scales)
        elif self.with_weight:
            dtype = self.compute.jnp_param_dtype
            weight = self.param(
                "weight",
                nn.with_logical_partitioning(
                    _per_expert(lambda key: BASE_INIT(key, (N, K), dtype), E), axes
                ),
            )
        lora = None
        if self.lora is not None and self.lora.applies_to(module_path(self)):
            r = self.lora.rank
            a = lora_variable(
                self, "lora_A", (E, r, K), ("experts", "lora_rank", in_axis), lora_a_init(K)
            )
            b = lora_variable(
                self, "lora_B", (E, N, r), ("experts", out_axis, "lora_rank"), nn.initializers.zeros
            )
            lora = GroupedLora(a=a, b=b, scale=self.lora.scale)
        return weight, lora, self._ce_factors()

    def _ce_factors(self) -> GroupedFactors | None:
        if not self.with_weight or self.ce is None or self.ce.backward != "ce":
            return None
        E, N, K = self.num_experts, self.out_features, self.in_features
        m = kept_rows(N, self.ce.ce_keep)
        if m >= N:
            return None
        k = min(self.ce.ce_rank, N, K)
        out_axis, in_axis = self.axes
        dtype, zeros = self.compute.jnp_dtype, nn.initializers.zeros

        def factor(name, shape, axes):
            return self.param(name, nn.with_logical_partitioning(zeros, axes), shape, dtype)

        rows = score = None
        if self.ce.ce_refresh and m > 0:
            rows, score = carried_rows(
                self, (E, m), ("experts", None), (E, N), ("experts", out_axis)
            )
        return GroupedFactors(
            ust=factor("ce_ust", (E, k, N), ("experts", None, out_axis)),
            v=factor("ce_v", (E, K, k), ("experts", in_axis, None)),
            rnorm=factor("ce_rnorm", (E, N), ("experts", out_axis)),
            m=m,
            rows=rows,
            score=score,
        )


class Router(nn.Module):
    """The router's weight [E, D] and its selection-only bias [E] (float32, as on disk)."""

    cfg: ModelConfig
    compute: ComputeConfig

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        E, D = self.cfg.n_routed_experts, self.cfg.hidden_size
        weight = self.param(
            "weight",
            nn.with_logical_partitioning(BASE_INIT, ("router_experts", "embed")),
            (E, D),
            self.compute.jnp_param_dtype,
        )
        bias = self.param(
            "e_score_correction_bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("router_experts",)),
            (E,),
            jnp.float32,
        )
        return weight, bias


class Experts(nn.Module):
    """The stacked routed experts of one MoE layer (HF names: mlp.experts.{gate_up_proj,down_proj})."""

    cfg: ModelConfig
    compute: ComputeConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self) -> ExpertWeights:
        c, kw = self.cfg, dict(compute=self.compute)
        E, D, F = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
        up_axes = ("expert_mlp", "embed")
        kw["ce"] = self.lora
        gate_up, _, ce_gate_up = ExpertProj(
            E, 2 * F, D, up_axes, lora=None, name="gate_up_proj", **kw
        )()
        _, lora_gate, _ = ExpertProj(
            E, F, D, up_axes, lora=self.lora, with_weight=False, name="gate_proj", **kw
        )()
        _, lora_up, _ = ExpertProj(
            E, F, D, up_axes, lora=self.lora, with_weight=False, name="up_proj", **kw
        )()
        down, lora_down, ce_down = ExpertProj(
            E, D, F, ("embed", "expert_mlp"), lora=self.lora, name="down_proj", **kw
        )()
        return ExpertWeights(gate_up, down, lora_gate, lora_up, lora_down, ce_gate_up, ce_down)


class MoE(nn.Module):
    cfg: ModelConfig
    compute: ComputeConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x_BTD) -> tuple[jax.Array, dict]:
        """Returns (output [B, T, D], {"expert_load": (token, expert) pairs per expert [E]
        float32, "exchange_rounds": all-to-all rounds the expert-parallel exchange needed, 1
        without overflow, 0 on one device})."""
        c = self.cfg
        B, T = x_BTD.shape[:2]
        E = c.n_routed_experts
        gate, bias = Router(c, self.compute, name="gate")()
        # each device's tokens as one contiguous block (context_parallel.flatten_tokens)
        mode = self.compute.context_parallel
        x_ND = flatten_tokens(x_BTD, mode).astype(self.compute.jnp_dtype)
        experts = Experts(c, self.compute, self.lora, name="experts")()
        dropout = None
        if self.lora is not None and self.lora.dropout > 0 and self.has_rng("dropout"):
            key = jax.random.key_data(self.make_rng("dropout"))
            dropout = PairDropout(key, self.lora.dropout)
        impl = self.compute.gmm_impl
        if mesh_is_parallel():
            y, load_E, rounds = moe_expert_parallel(
                x_ND,
                gate,
                bias,
                experts,
                c,
                impl=impl,
                dropout=dropout,
                chunk_tokens=self.compute.moe_chunk_tokens,
                capacity_factor=self.compute.moe_capacity_factor,
                overlap_chunks=self.compute.moe_overlap_chunks,
            )
        else:
            idx, weights, _ = route(x_ND, gate, bias, c)
            y = routed_experts(x_ND, idx, weights, experts, impl=impl, dropout=dropout)
            load_E = jnp.zeros((E,), jnp.float32).at[idx.reshape(-1)].add(1.0)
            rounds = jnp.zeros((), jnp.int32)  # no exchange
        y = unflatten_tokens(y, B, T, mode)
        if c.n_shared_experts:
            y = y + MLP(c.shared_intermediate_size, self.compute, self.lora, name="shared_experts")(
                x_BTD
            )
        return checkpoint_name(y, "mlp_out"), {"expert_load": load_E, "exchange_rounds": rounds}
