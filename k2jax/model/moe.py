"""Mixture of experts: the sigmoid router, the routed experts and the shared experts (K2_FACTS §3.4).

Router (float32 throughout):
    s      = sigmoid(x·W_gateᵀ)                                   [N, E]
    choice = s + e_score_correction_bias        (the bias only chooses; it never weights)
    groups: with n_group > 1 keep the `topk_group` groups with the largest sum of their top-2
            choice scores, mask the rest to −inf
    idx    = top-K of choice;  w = s[idx];  w /= Σw + 1e-20 if norm_topk_prob;  w ×= routed_scaling_factor

Routed experts (dropless): the N·K (token, expert) pairs are sorted by expert, run through one
grouped matmul per projection (k2jax/ops/grouped_matmul.py: gate|up fused, then down), unsorted,
and summed with their weights in float32. Under expert parallelism the same per-device computation
runs inside `shard_map` after an all-to-all (k2jax.sharding); here is the single-device form.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from k2jax.config import ModelConfig
from k2jax.lora import LoraConfig
from k2jax.model.layers import BASE_INIT, MLP, lora_a_init, lora_variable, module_path
from k2jax.model.options import ComputeConfig, accum_dtype
from k2jax.ops.grouped_matmul import GroupedLora, grouped_matmul
from k2jax.quant import Int4Weight, random_int4
from k2jax.sharding.expert_parallel import mesh_is_parallel, moe_expert_parallel


def route(
    x_ND: jax.Array, gate_ED: jax.Array, bias_E: jax.Array, cfg: ModelConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns (expert ids [N, K] int32, weights [N, K] float32, router logits [N, E] float32)."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    f32 = accum_dtype(x_ND.dtype)
    logits = jnp.einsum("nd,ed->ne", x_ND.astype(f32), gate_ED.astype(f32), precision="highest")
    scores = jax.nn.sigmoid(logits)
    choice = scores + bias_E.astype(f32)
    if cfg.n_group > 1:
        per_group = E // cfg.n_group
        grouped = choice.reshape(-1, cfg.n_group, per_group)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)
        keep_G = (
            jnp.zeros_like(group_score, dtype=bool)
            .at[jnp.arange(group_score.shape[0])[:, None], keep]
            .set(True)
        )
        keep_E = jnp.repeat(keep_G, per_group, axis=1)
        choice = jnp.where(keep_E, choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, K)
    weights = jnp.take_along_axis(scores, idx, axis=1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * cfg.routed_scaling_factor
    return idx.astype(jnp.int32), weights, logits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """One MoE layer's routed experts, HF [out, in] layout stacked over experts.

    gate_up: [E, 2F, D] (gate rows first), down: [E, D, F]; each a dense array or an Int4Weight.
    LoRA (optional, per projection): gate/up/down as GroupedLora.
    """

    gate_up: jax.Array | Int4Weight
    down: jax.Array | Int4Weight
    lora_gate: GroupedLora | None = None
    lora_up: GroupedLora | None = None
    lora_down: GroupedLora | None = None


def _gate_up_lora(w: ExpertWeights) -> GroupedLora | None:
    """Separate gate and up adapters as one LoRA on the fused gate|up weight.

    A = [A_gate; A_up] [E, 2r, D] and a block-diagonal B [E, 2F, 2r]: exactly the two adapters.
    """
    if w.lora_gate is None and w.lora_up is None:
        return None
    parts = [p for p in (w.lora_gate, w.lora_up) if p is not None]
    E, F2 = w.gate_up.shape[0], w.gate_up.shape[1]
    F = F2 // 2
    dtype = parts[0].b.dtype
    a_list, b_cols = [], []
    for which, p in (("gate", w.lora_gate), ("up", w.lora_up)):
        if p is None:
            continue
        r = p.a.shape[1]
        zero = jnp.zeros((E, F, r), dtype)
        # B columns for this adapter: its B in its own row block, zeros in the other.
        b_cols.append(jnp.concatenate([p.b, zero] if which == "gate" else [zero, p.b], axis=1))
        a_list.append(p.a)
    scales = {p.scale for p in parts}
    assert len(scales) == 1, "gate and up adapters share one LoRA scale"
    return GroupedLora(
        a=jnp.concatenate(a_list, axis=1), b=jnp.concatenate(b_cols, axis=2), scale=scales.pop()
    )


def sort_by_expert(idx_NK: jax.Array, num_experts: int):
    """(order [N·K], group_sizes [E]): pair order sorted by expert id, and rows per expert."""
    flat = idx_NK.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def expert_ffn(x_MD, group_sizes_E, w: ExpertWeights, *, impl: str, lora_x_MD=None) -> jax.Array:
    """SwiGLU of rows sorted by expert: down(silu(gate) ⊙ up) with the grouped matmul."""
    F = w.gate_up.shape[1] // 2
    h = grouped_matmul(
        x_MD, w.gate_up, group_sizes_E, lora=_gate_up_lora(w), lora_x=lora_x_MD, impl=impl
    )
    act = nn.silu(h[:, :F]) * h[:, F:]
    return grouped_matmul(act, w.down, group_sizes_E, lora=w.lora_down, impl=impl)


def routed_experts(x_ND, idx_NK, weights_NK, w: ExpertWeights, *, impl: str, lora_x_ND=None):
    """Σ_k weights[n, k] · Expert_{idx[n, k]}(x[n]) on one device, dropless."""
    N, K = idx_NK.shape
    E = w.gate_up.shape[0]
    order, group_sizes = sort_by_expert(idx_NK, E)
    token = order // K
    lx = None if lora_x_ND is None else lora_x_ND[token]
    y_sorted = expert_ffn(x_ND[token], group_sizes, w, impl=impl, lora_x_MD=lx)
    y_NKD = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(N, K, -1)
    out = jnp.einsum("nkd,nk->nd", y_NKD.astype(weights_NK.dtype), weights_NK)
    return out.astype(x_ND.dtype)


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
    """

    num_experts: int
    out_features: int
    in_features: int
    axes: tuple[str, str]  # (out, in) logical axes
    compute: ComputeConfig
    lora: LoraConfig | None
    with_weight: bool = True

    @nn.compact
    def __call__(self) -> tuple[jax.Array | Int4Weight | None, GroupedLora | None]:
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
        return weight, lora


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
        gate_up, _ = ExpertProj(E, 2 * F, D, up_axes, lora=None, name="gate_up_proj", **kw)()
        _, lora_gate = ExpertProj(
            E, F, D, up_axes, lora=self.lora, with_weight=False, name="gate_proj", **kw
        )()
        _, lora_up = ExpertProj(
            E, F, D, up_axes, lora=self.lora, with_weight=False, name="up_proj", **kw
        )()
        down, lora_down = ExpertProj(
            E, D, F, ("embed", "expert_mlp"), lora=self.lora, name="down_proj", **kw
        )()
        return ExpertWeights(gate_up, down, lora_gate, lora_up, lora_down)


class MoE(nn.Module):
    cfg: ModelConfig
    compute: ComputeConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x_BTD) -> tuple[jax.Array, jax.Array]:
        """Returns (output [B, T, D], tokens routed to each expert [E] float32)."""
        c = self.cfg
        B, T, D = x_BTD.shape
        E = c.n_routed_experts
        gate, bias = Router(c, self.compute, name="gate")()
        x_ND = x_BTD.reshape(B * T, D).astype(self.compute.jnp_dtype)
        experts = Experts(c, self.compute, self.lora, name="experts")()
        lora_x = None
        if self.lora is not None and self.lora.dropout > 0 and self.has_rng("dropout"):
            lora_x = nn.Dropout(self.lora.dropout, deterministic=False)(x_ND)
        impl = self.compute.gmm_impl
        if mesh_is_parallel():
            y, load_E = moe_expert_parallel(
                x_ND,
                gate,
                bias,
                experts,
                c,
                impl=impl,
                lora_x_ND=lora_x,
                chunk_tokens=self.compute.moe_chunk_tokens,
            )
        else:
            idx, weights, _ = route(x_ND, gate, bias, c)
            y = routed_experts(x_ND, idx, weights, experts, impl=impl, lora_x_ND=lora_x)
            load_E = jnp.zeros((E,), jnp.float32).at[idx.reshape(-1)].add(1.0)
        y = y.reshape(B, T, D)
        if c.n_shared_experts:
            y = y + MLP(c.shared_intermediate_size, self.compute, self.lora, name="shared_experts")(
                x_BTD
            )
        return checkpoint_name(y, "mlp_out"), load_E
