"""Multi-head attention for MLA, behind one interface.

MLA's query/key have two parts: a per-head "nope" part (no rotary) and a rotary part whose key is a
single vector shared by all heads. The interface keeps them apart so the reference never
materialises the shared rotary key once per head:

    logits[b, h, t, s] = scale · (q_nope[b,t,h]·k_nope[b,s,h] + q_rope[b,t,h]·k_rope[b,s])

Masking: query t may see key s when s ≤ q_index[b, t] and both carry the same segment id (packed
sequences; segment 0 is padding and only sees padding, so no row is empty). Softmax is in float32.

Besides the output it returns the largest pre-softmax logit of each head over all visible pairs
(float32 [H]): MuonClip's QK-clip needs exactly this number (K2_FACTS §5.2).

Implementations:
  "xla"    the reference: materialises [B, H, T, S] logits; the oracle for tests. Its max logit is
           the max of those logits.
  "cudnn"  cuDNN flash attention through `jax.nn.dot_product_attention` (GPU). cuDNN wants one head
           dim for q, k and v, so the shared rotary key is broadcast to every head and v is
           zero-padded from Dv to Dn + Dr (the padded output columns are exactly zero and are
           cropped). Packed rows pass their segment mask (cuDNN turns it into a bias); the causal
           part uses cuDNN's causal mode. The flash kernel does not expose logits, so the per-head
           max logit comes from a second kernel, k2jax/ops/max_logit_pallas.py (Pallas Triton): a
           flash-attention-shaped pass without softmax and V that keeps a running max in
           registers and writes one float per (batch, head, query block) — no logit block in
           memory, and it never broadcasts the rotary key. It runs only when asked for
           (`with_max_logit`), under stop_gradient.
  "auto"   "cudnn" on GPU, else "xla".
  "plan"   a shape-faithful stand-in with no [T, S] buffer, for `k2jax plan`'s CPU compile only;
           its max logit stands in for the kernel's (per-(b, h) reductions of the inputs, no
           [·, ·, block, S] temporaries), so the plan shows the GPU program's memory.
The "cudnn" wrapper is tested on CPU through the same code with jax's XLA backend of
`dot_product_attention` (`impl="dpa_xla"`), whose max logit is the same Pallas kernel, run in
interpret mode on CPU (compiled on GPU). So only the cuDNN call and the kernel's Triton compile
are GPU-only; the kernel's partitioning over a mesh and its numerics run in the CPU tests.
(Rejected: keeping `max_logit_blocked` as dpa_xla's max logit on CPU — faster there, but then the
cuDNN path's max logit, the part most likely to break, would never run before a GPU does.)
`max_logit_blocked` is the same number in plain XLA over query blocks (float32 [B, H, block, S]
temporaries): the kernel's oracle in tests.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp

from k2jax.ops.einsum import einsum_acc
from k2jax.ops.max_logit_pallas import max_logit_pallas

IMPLS = ("auto", "xla", "cudnn", "dpa_xla", "plan")


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
    with_max_logit: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Returns (out [B, T, H, Dv] in v's dtype, max_logit [H] float32).

    With `with_max_logit=False` the second output is −inf for every head (fast paths skip the
    extra pass).
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    if impl == "plan":
        out = attention_plan(q_nope, q_rope, k_nope, k_rope, v)
    elif impl in ("cudnn", "dpa_xla"):
        out = attention_dpa(
            q_nope,
            q_rope,
            k_nope,
            k_rope,
            v,
            scale=scale,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            q_index=q_index,
            implementation="cudnn" if impl == "cudnn" else "xla",
        )
    if impl in ("cudnn", "dpa_xla", "plan"):
        H = q_nope.shape[2]
        if not with_max_logit:
            max_logit = jnp.full((H,), -jnp.inf, jnp.promote_types(q_nope.dtype, jnp.float32))
        elif impl == "plan":
            max_logit = jax.lax.stop_gradient(max_logit_plan(q_nope, q_rope, k_nope, k_rope))
        else:  # the Pallas kernel: compiled on GPU, interpret mode on CPU (dpa_xla's tests)
            max_logit = max_logit_pallas(
                q_nope, q_rope, k_nope, k_rope, scale, q_segment_ids, kv_segment_ids, q_index
            )
        return out, max_logit
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
    logits = einsum_acc("bthd,bshd->bhts", q_nope, k_nope)
    logits += einsum_acc("bthr,bsr->bhts", q_rope, k_rope)
    logits = logits * scale
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_index)
    neg = jnp.finfo(f32).min
    logits = jnp.where(mask, logits, neg)
    max_logit = jnp.max(logits, axis=(0, 2, 3))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = einsum_acc("bhts,bshd->bthd", probs, v)
    return out.astype(v.dtype), max_logit


def attention_dpa(
    q_nope,
    q_rope,
    k_nope,
    k_rope,
    v,
    *,
    scale,
    q_segment_ids,
    kv_segment_ids,
    q_index,
    implementation,
):
    """`jax.nn.dot_product_attention` on the concatenated MLA heads (see the module docstring)."""
    B, S, H, _ = k_nope.shape
    Dv = v.shape[-1]
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    k = jnp.concatenate(
        [k_nope, jnp.broadcast_to(k_rope[:, :, None], (B, S, H, k_rope.shape[-1]))], -1
    )
    d = q.shape[-1]
    if Dv > d:
        raise ValueError(f"v head dim {Dv} exceeds the q/k head dim {d}")
    v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, d - Dv)))
    if q_index is None and q.shape[1] == S:
        # training: causality by cuDNN's causal mode, packing by the segment mask
        mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
        out = jax.nn.dot_product_attention(
            q, k, v_pad, mask=mask, scale=scale, is_causal=True, implementation=implementation
        )
    else:
        mask = attention_mask(q_segment_ids, kv_segment_ids, q_index)
        out = jax.nn.dot_product_attention(
            q, k, v_pad, mask=mask, scale=scale, implementation=implementation
        )
    return out[..., :Dv]


def max_logit_blocked(
    q_nope, q_rope, k_nope, k_rope, scale, q_segment_ids, kv_segment_ids, q_index=None, block=512
):
    """Per-head max of the visible pre-softmax logits, computed over query blocks of `block` rows
    (peak extra memory B·H·block·S float32 instead of B·H·T·S). The XLA formulation of
    `max_logit_pallas`, and its oracle in tests; no implementation uses it."""
    B, T = q_nope.shape[:2]
    if q_index is None:
        q_index = jnp.broadcast_to(jnp.arange(T), (B, T))
    block = min(block, T)
    pad = (-T) % block
    if pad:  # padded queries get segment −1, which matches no key
        pad_t = ((0, 0), (0, pad))
        q_nope = jnp.pad(q_nope, (*pad_t, (0, 0), (0, 0)))
        q_rope = jnp.pad(q_rope, (*pad_t, (0, 0), (0, 0)))
        q_segment_ids = jnp.pad(q_segment_ids, pad_t, constant_values=-1)
        q_index = jnp.pad(q_index, pad_t)
    n = (T + pad) // block

    def one(args):
        qn, qr, seg, idx = args
        logits = einsum_acc("bthd,bshd->bhts", qn, k_nope)
        logits += einsum_acc("bthr,bsr->bhts", qr, k_rope)
        visible = attention_mask(seg, kv_segment_ids, idx)
        return jnp.max(jnp.where(visible, logits * scale, -jnp.inf), axis=(0, 2, 3))

    def split(x):  # [B, T, ...] → [n, B, block, ...]: lax.map runs over the query blocks
        return einops.rearrange(x, "b (n t) ... -> n b t ...", n=n)

    per_block = jax.lax.map(
        one, (split(q_nope), split(q_rope), split(q_segment_ids), split(q_index))
    )
    return jnp.max(per_block, axis=0)


def attention_plan(q_nope, q_rope, k_nope, k_rope, v):
    """A memory-planning stand-in for flash attention (`k2jax plan` only; NOT attention).

    Output [B, T, H, Dv] from all five inputs, with gradients to each, and no [T, S] buffer —
    what a flash kernel keeps. Used so that a CPU compile reports the GPU program's memory.
    """
    s = jnp.sum(q_nope, -1, keepdims=True) + jnp.sum(q_rope, -1, keepdims=True)
    s = (
        s
        + jnp.sum(k_nope, axis=(1, 3))[:, None, :, None]
        + jnp.sum(k_rope, axis=(1, 2))[:, None, None, None]
    )
    return (v.sum(axis=1, keepdims=True) * s.astype(v.dtype)[..., :1]).astype(v.dtype) + jnp.zeros(
        (v.shape[0], q_nope.shape[1], v.shape[2], v.shape[3]), v.dtype
    )


def max_logit_plan(q_nope, q_rope, k_nope, k_rope):
    """A memory-planning stand-in for `max_logit_pallas` (`k2jax plan` only; NOT the max logit).

    Float32 [H] from all four inputs through per-(b, h) reductions: like the kernel, it reads the
    inputs once and keeps nothing larger than its [B, H] partial maxima (no logit blocks).
    """
    f32 = jnp.promote_types(q_nope.dtype, jnp.float32)
    q = jnp.max(q_nope, axis=(1, 3)).astype(f32) + jnp.max(q_rope, axis=(1, 3)).astype(f32)
    k = jnp.max(k_nope, axis=(1, 3)).astype(f32) + jnp.max(k_rope, axis=(1, 2))[:, None].astype(f32)
    return jnp.max(q + k, axis=0)
