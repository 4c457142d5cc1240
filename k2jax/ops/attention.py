"""Multi-head attention for MLA, behind one interface.

MLA's query/key have two parts: a per-head "nope" part (no rotary) and a rotary part whose key is a
single vector shared by all heads. The interface keeps them apart so the reference never
materialises the shared rotary key once per head:

    logits[b, h, t, s] = scale · (q_nope[b,t,h]·k_nope[b,s,h] + q_rope[b,t,h]·k_rope[b,s])

Masking: query t may see key s when s ≤ q_index[b, t] and both carry the same segment id (packed
sequences; segment 0 is padding and only sees padding, so no row is empty). Softmax is in float32.

Besides the output it returns the largest pre-softmax logit of each head over all visible pairs
(float32 [H]): MuonClip's QK-clip needs exactly this number (K2_FACTS §5.2).

Implementations: "xla" (the reference, materialises [B, H, T, S] logits; the oracle for tests) and,
on GPU, a flash kernel (a later issue) chosen by `impl="auto"`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla")


def attention(
    q_nope: jax.Array,  # [B, T, H, Dn]
    q_rope: jax.Array,  # [B, T, H, Dr]
    k_nope: jax.Array,  # [B, S, H, Dn]
    k_rope: jax.Array,  # [B, S, Dr]   shared by all heads
    v: jax.Array,  # [B, S, H, Dv]
    *,
    scale: float,
    q_segment_ids: jax.Array,  # [B, T] int
    kv_segment_ids: jax.Array,  # [B, S] int
    q_index: jax.Array | None = None,  # [B, T] position of each query among the keys
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Returns (out [B, T, H, Dv] in v's dtype, max_logit [H] float32)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    return attention_reference(
        q_nope,
        q_rope,
        k_nope,
        k_rope,
        v,
        scale=scale,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_index=q_index,
    )


def attention_mask(q_segment_ids, kv_segment_ids, q_index=None) -> jax.Array:
    """Boolean [B, 1, T, S]: causal within equal segment ids."""
    b, t = q_segment_ids.shape
    s = kv_segment_ids.shape[1]
    if q_index is None:
        q_index = jnp.broadcast_to(jnp.arange(t), (b, t))
    causal = jnp.arange(s)[None, None, :] <= q_index[:, :, None]
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return (causal & same)[:, None]


def attention_reference(
    q_nope, q_rope, k_nope, k_rope, v, *, scale, q_segment_ids, kv_segment_ids, q_index=None
):
    f32 = jnp.promote_types(q_nope.dtype, jnp.float32)
    logits = jnp.einsum("bthd,bshd->bhts", q_nope, k_nope, preferred_element_type=f32)
    logits += jnp.einsum("bthr,bsr->bhts", q_rope, k_rope, preferred_element_type=f32)
    logits = logits * scale
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_index)
    neg = jnp.finfo(f32).min
    logits = jnp.where(mask, logits, neg)
    max_logit = jnp.max(logits, axis=(0, 2, 3))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhts,bshd->bthd", probs, v, preferred_element_type=f32)
    return out.astype(v.dtype), max_logit
