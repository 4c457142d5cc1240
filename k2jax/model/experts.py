"""The routed experts as plain functions: the router, the sort by expert, the expert FFN, one device.

    idx, w, _ = route(x_ND, gate_ED, bias_E, cfg)           # [N, K] expert ids and weights
    y_ND = routed_experts(x_ND, idx, w, experts, impl=...)  # Σ_k w[n, k] · Expert_idx[n, k](x[n])

Router (float32 throughout, K2_FACTS §3.4):
    s      = sigmoid(x·W_gateᵀ)                                   [N, E]
    choice = s + e_score_correction_bias        (the bias only chooses; it never weights)
    groups: with n_group > 1 keep the `topk_group` groups with the largest sum of their top-2
            choice scores, mask the rest to −inf
    idx    = top-K of choice;  w = s[idx];  w /= Σw + 1e-20 if norm_topk_prob;  w ×= routed_scaling_factor

Experts (dropless). The N·K (token, expert) *pairs* — pair j is token j // K's k = j % K-th
choice — are sorted by expert (`sort_by_expert`), run through one grouped matmul per projection
(k2jax/ops/grouped_matmul.py: gate|up fused, then down) and put back in pair order (`unsort`),
then summed with their weights in float32 (`combine`). The expert-parallel form
(k2jax/model/expert_parallel.py) runs the same `expert_ffn` on the rows that arrive on a device
and shares these helpers.

LoRA dropout on the experts is drawn per *pair* and per adapter from (dropout key, adapter, pair
id), not per device position: each expert's gate, up and down adapter sees its own mask of its
own input (the token for gate and up, the SwiGLU activation for down), as PEFT's per-expert
modules would, and the mask of a pair is the same whichever device computes it — so a mesh
reproduces one device bit for bit even with dropout on, and no mask or dropped-out copy of the
tokens has to travel with the all-to-all (only the int32 pair id does).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from k2jax.config import ModelConfig
from k2jax.model.options import accum_dtype
from k2jax.ops.ce_backward import GroupedFactors
from k2jax.ops.grouped_matmul import GroupedLora, grouped_matmul
from k2jax.quant import Int4Weight


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
    LoRA (optional, per projection): gate/up/down as GroupedLora. With lora.backward = "ce", the
    frozen factors of gate_up and down (k2jax/ops/ce_backward.py), part of the base.
    """

    gate_up: jax.Array | Int4Weight
    down: jax.Array | Int4Weight
    lora_gate: GroupedLora | None = None
    lora_up: GroupedLora | None = None
    lora_down: GroupedLora | None = None
    ce_gate_up: GroupedFactors | None = None
    ce_down: GroupedFactors | None = None

    def split(self) -> tuple[ExpertWeights, dict]:
        """(the frozen base alone, what gets a gradient: the LoRA factors {name: GroupedLora |
        None} and, with lora.ce_refresh ≥ 1, CE-LoRA's probes {"ce_gate_up", "ce_down": score})."""
        lora = {"lora_gate": self.lora_gate, "lora_up": self.lora_up, "lora_down": self.lora_down}
        ce = {"ce_gate_up": self.ce_gate_up, "ce_down": self.ce_down}
        probes = {k: None if f is None else f.score for k, f in ce.items()}
        base = {k: None if f is None else dataclasses.replace(f, score=None) for k, f in ce.items()}
        base = dataclasses.replace(self, lora_gate=None, lora_up=None, lora_down=None, **base)
        return base, {**lora, "probes": probes}

    def with_lora(self, lora: dict) -> ExpertWeights:
        """The inverse of `split`: the base with `lora` (and the probes) put back."""
        lora = dict(lora)
        probes = lora.pop("probes", {})
        ce = {
            k: dataclasses.replace(getattr(self, k), score=p)
            for k, p in probes.items()
            if getattr(self, k) is not None
        }
        return dataclasses.replace(self, **lora, **ce)


GATE_SALT, UP_SALT, DOWN_SALT = 0, 1, 2  # one dropout mask stream per adapter


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PairDropout:
    """LoRA dropout of the routed experts: `rate`, and the key data its masks derive from."""

    key: jax.Array  # jax.random.key_data of a key
    rate: float = dataclasses.field(metadata=dict(static=True), default=0.0)

    def apply(self, x_MD: jax.Array, pair_ids_M: jax.Array, salt: int) -> jax.Array:
        """x with inverted dropout (zeroed, kept values / (1 − rate)); row m's mask is drawn from
        (key, salt, pair_ids[m])."""
        keep = 1.0 - self.rate
        key = jax.random.fold_in(jax.random.wrap_key_data(self.key), salt)

        def mask(pair_id):
            return jax.random.bernoulli(jax.random.fold_in(key, pair_id), keep, x_MD.shape[1:])

        kept = jax.vmap(mask)(pair_ids_M)
        return jnp.where(kept, x_MD / jnp.asarray(keep, x_MD.dtype), 0).astype(x_MD.dtype)


def sort_by_expert(expert_ids_A: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """(order [A], group_sizes [E]): the stable order that sorts the ids, and rows per expert.
    Ids ≥ num_experts (padding) sort last and are not counted."""
    order = jnp.argsort(expert_ids_A, stable=True)
    group_sizes = jnp.bincount(expert_ids_A, length=num_experts + 1)[:num_experts]
    return order, group_sizes.astype(jnp.int32)


def unsort(y_sorted: jax.Array, order: jax.Array) -> jax.Array:
    """The inverse of `y_sorted = y[order]`."""
    return jnp.zeros_like(y_sorted).at[order].set(y_sorted)


def combine(y_ND_K: jax.Array, weights_NK: jax.Array, dtype) -> jax.Array:
    """Σ_k weights[n, k] · y[n, k] in the weights' (float32) dtype, cast to `dtype`."""
    return jnp.einsum("nkd,nk->nd", y_ND_K.astype(weights_NK.dtype), weights_NK).astype(dtype)


def expert_ffn(
    x_MD,
    group_sizes_E,
    w: ExpertWeights,
    *,
    impl: str,
    dropout: PairDropout | None = None,
    pair_ids_M: jax.Array | None = None,
) -> jax.Array:
    """SwiGLU of rows sorted by expert: down(silu(gate) ⊙ up) with the grouped matmul.

    gate and up share the fused base weight but have their own adapters, as column blocks of the
    one grouped matmul (no block-diagonal B of zeros). With `dropout`, each adapter sees its own
    dropout of its own input — gate's and up's of the row, down's of the SwiGLU activation —
    drawn per row from its pair id, as PEFT's per-expert modules would."""
    F = w.gate_up.shape[1] // 2

    def drop(z, salt):
        return None if dropout is None else dropout.apply(z, pair_ids_M, salt)

    lora = None if w.lora_gate is None and w.lora_up is None else (w.lora_gate, w.lora_up)
    lora_x = (drop(x_MD, GATE_SALT), drop(x_MD, UP_SALT))
    h = grouped_matmul(
        x_MD, w.gate_up, group_sizes_E, lora=lora, lora_x=lora_x, impl=impl, ce=w.ce_gate_up
    )
    # Named for remat "selective": the two expert GEMMs' outputs (k2jax.model.options).
    h = checkpoint_name(h, "expert_h")
    act = nn.silu(h[:, :F]) * h[:, F:]
    lora_x_down = drop(act, DOWN_SALT) if w.lora_down is not None else None
    y = grouped_matmul(
        act, w.down, group_sizes_E, lora=w.lora_down, lora_x=lora_x_down, impl=impl, ce=w.ce_down
    )
    return checkpoint_name(y, "expert_out")


def routed_experts(
    x_ND, idx_NK, weights_NK, w: ExpertWeights, *, impl: str, dropout: PairDropout | None = None
):
    """Σ_k weights[n, k] · Expert_{idx[n, k]}(x[n]) on one device, dropless."""
    N, K = idx_NK.shape
    order, group_sizes = sort_by_expert(idx_NK.reshape(-1), w.gate_up.shape[0])
    y_sorted = expert_ffn(
        x_ND[order // K], group_sizes, w, impl=impl, dropout=dropout, pair_ids_M=order
    )
    return combine(unsort(y_sorted, order).reshape(N, K, -1), weights_NK, x_ND.dtype)
