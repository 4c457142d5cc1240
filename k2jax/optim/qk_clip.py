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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# qk_clip collection stack name -> the key of its aux entry (Transformer.__call__)
STACKS = {"dense_layers": "dense", "moe_layers": "moe"}


def clip_gamma(max_logit: jax.Array, tau: float) -> jax.Array:
    """γ per head: τ / S where S > τ, else 1 (non-finite S leaves the head alone)."""
    s = max_logit.astype(jnp.float32)
    clip = jnp.isfinite(s) & (s > tau)
    return jnp.where(clip, tau / jnp.where(clip, s, 1.0), 1.0)


def update_qk_clip(qk_clip, aux, tau: float):
    """(new qk_clip tree, number of clipped heads) from the step's aux max logits.

    qk_clip: {"dense_layers"|"moe_layers": {"self_attn": {"scales": [L, 3, H]}}};
    aux: {"dense"|"moe": {"max_logit": [L, H], ...}} as returned by `Transformer.loss`.
    """
    out = {}
    clipped = jnp.zeros((), jnp.int32)
    for stack, node in qk_clip.items():
        if stack not in STACKS:
            raise KeyError(f"qk_clip collection has an unknown stack {stack!r}")
        scales = node["self_attn"]["scales"]
        gamma = clip_gamma(aux[STACKS[stack]]["max_logit"], tau)  # [L, H]
        root = jnp.sqrt(gamma)
        factors = jnp.stack([root, gamma, root], axis=1)  # [L, 3, H]: q_nope, q_rope, k_nope
        out[stack] = {"self_attn": {"scales": scales * factors.astype(scales.dtype)}}
        clipped = clipped + jnp.sum(gamma < 1.0).astype(jnp.int32)
    return out, clipped
