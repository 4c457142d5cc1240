"""QK-clip, MuonClip's guard against exploding attention logits (K2_FACTS §5.2).

After each optimizer update, for every layer l and head h whose largest pre-softmax logit in the
step, S = max_logit[l, h], exceeds τ:

    γ = τ / S   (γ = 1 where S ≤ τ; also where S is not finite or ≤ 0)
    q_nope, k_nope  × √γ     (their product, the "nope" logit, shrinks by γ)
    q_rope          × γ      (the shared rotary key is not touched: scaling it would clip every
                              head of the layer — the over-clipping the per-head rule avoids)

so every logit of that head shrinks by exactly γ, and on the same batch and weights the head's max
logit becomes τ.

Where the rescaling lives. With LoRA over a frozen base we cannot rescale the rows of q_b_proj /
kv_b_proj (the base is frozen and may be INT4), and rescaling only the LoRA factors would not bound
the logits when the base part dominates. So the model keeps three per-head factors per layer in the
"qk_clip" collection — `scales` [L, 3, H] = (q_nope, q_rope, k_nope), all ones at the start —
applied to the *effective* (base + LoRA) projections (k2jax/model/mla.py). `update_qk_clip`
multiplies them in place. This is exactly MuonClip's rescaling of the merged weights; `k2jax merge`
folds the factors into the q_b_proj / kv_b_proj rows. The factors are not trained (no gradient, no
optimizer state); they are part of the train state and of every checkpoint.

The recorded max logit already includes the current factors, hence the update multiplies the
existing factors by γ rather than setting them.

The threshold, in K2_FACTS terms. The logit S is measured after the model's softmax scale, which
for the YaRN-extended releases is 1/√192 · m² with m = 0.1·ln(factor) + 1 (§3.2.6): m² = 1.81
for K2-Instruct (factor 32) and 2.00 for K2-Thinking / K2.5 (factor 64). K2's τ = 100 was applied
during pre-training at 4k context (§5.1, §5.2), before the YaRN extension, where the scale was
1/√192 alone; a released head that obeyed τ there reports up to m²·τ here. Comparing the scaled S
with τ itself would therefore clip pretrained heads at the first step with a zero LoRA, i.e.
change the released model by itself. So k2jax reads τ in pre-training (unscaled) units and,
per head h, clips above

    threshold_h = max(τ · m², S_h of the run's first applied step)

The first term is the unit fix; the second makes "QK-clip never rescales a head of the model it
starts from" hold for any checkpoint (at the first step LoRA B is zero: S_h is the base model's
own max logit on that batch), so a head the released model already runs above τ keeps its
pretrained range and is only held from growing beyond it. The thresholds are set once, stored in
the train state (`qk_thresholds`, [L, H] per stack, NaN until set) and restored on resume.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# qk_clip collection stack name -> the key of its aux entry (Transformer.__call__)
STACKS = {"dense_layers": "dense", "moe_layers": "moe"}


def logit_scale_factor(cfg) -> float:
    """m², the factor by which the model's softmax scale exceeds 1/√(qk head dim) (YaRN's
    attention temperature; 1 without YaRN) — the units conversion of τ (module docstring)."""
    return cfg.softmax_scale * math.sqrt(cfg.qk_head_dim)


def unset_thresholds(qk_clip) -> dict:
    """Per-head thresholds {stack: [L, H] float32}, all NaN (set at the first applied step)."""
    return {
        stack: jnp.full(
            (node["self_attn"]["scales"].shape[0], node["self_attn"]["scales"].shape[-1]),
            jnp.nan,
            jnp.float32,
        )
        for stack, node in qk_clip.items()
    }


def set_thresholds(thresholds, aux, tau_logit: float):
    """Thresholds with every unset (NaN) head set to max(tau_logit, its max logit in `aux`)."""
    out = {}
    for stack, thr in thresholds.items():
        s = aux[STACKS[stack]]["max_logit"].astype(jnp.float32)
        first = jnp.maximum(tau_logit, jnp.where(jnp.isfinite(s), s, tau_logit))
        out[stack] = jnp.where(jnp.isnan(thr), first, thr)
    return out


def clip_gamma(max_logit: jax.Array, tau) -> jax.Array:
    """γ per head: τ / S where S > τ, else 1 (non-finite S leaves the head alone); τ a scalar or
    per-head thresholds of S's shape."""
    s = max_logit.astype(jnp.float32)
    clip = jnp.isfinite(s) & (s > tau)
    return jnp.where(clip, tau / jnp.where(clip, s, 1.0), 1.0)


def update_qk_clip(qk_clip, aux, threshold):
    """(new qk_clip tree, number of clipped heads) from the step's aux max logits.

    qk_clip: {"dense_layers"|"moe_layers": {"self_attn": {"scales": [L, 3, H]}}};
    aux: {"dense"|"moe": {"max_logit": [L, H], ...}} as returned by `Transformer.loss`;
    threshold: one number in the logits' units, or per-head thresholds {stack: [L, H]}
    (`set_thresholds`).
    """
    out = {}
    clipped = jnp.zeros((), jnp.int32)
    for stack, node in qk_clip.items():
        if stack not in STACKS:
            raise KeyError(f"qk_clip collection has an unknown stack {stack!r}")
        scales = node["self_attn"]["scales"]
        tau = threshold[stack] if isinstance(threshold, dict) else threshold
        gamma = clip_gamma(aux[STACKS[stack]]["max_logit"], tau)  # [L, H]
        root = jnp.sqrt(gamma)
        factors = jnp.stack([root, gamma, root], axis=1)  # [L, 3, H]: q_nope, q_rope, k_nope
        out[stack] = {"self_attn": {"scales": scales * factors.astype(scales.dtype)}}
        clipped = clipped + jnp.sum(gamma < 1.0).astype(jnp.int32)
    return out, clipped
