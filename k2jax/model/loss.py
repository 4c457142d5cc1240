"""Cross-entropy over a 163,840-token vocabulary without materialising all the logits.

Full-size logits for a 4096-token sequence in float32 are 2.7 GB; their gradient as much again.
We run the LM head and the loss over chunks of `chunk` tokens under `jax.checkpoint`, so only one
chunk of float32 logits [chunk, V] lives at a time, forward and backward (the backward recomputes
the chunk's logits). Per token:

    lse    = logsumexp(logits)          (float32)
    loss   = lse − logits[target]
    z_loss = z_weight · lse²            (optional; PaLM's auxiliary loss keeping lse near 0)

Only positions with mask > 0 count. Returned are *sums* and the mask count, so gradient
accumulation and data parallelism can add them before dividing once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(
    hidden_ND: jax.Array,
    head_VD: jax.Array,
    targets_N: jax.Array,
    mask_N: jax.Array,
    *,
    chunk: int = 2048,
    z_weight: float = 0.0,
) -> dict[str, jax.Array]:
    """Returns {"loss_sum", "z_loss_sum", "count"} (float32 scalars) over masked positions."""
    n, d = hidden_ND.shape
    chunk = min(chunk, n)
    pad = (-n) % chunk
    if pad:
        hidden_ND = jnp.pad(hidden_ND, ((0, pad), (0, 0)))
        targets_N = jnp.pad(targets_N, (0, pad))
        mask_N = jnp.pad(mask_N, (0, pad))
    n_chunks = (n + pad) // chunk
    h = hidden_ND.reshape(n_chunks, chunk, d)
    t = targets_N.reshape(n_chunks, chunk)
    f32 = jnp.promote_types(hidden_ND.dtype, jnp.float32)
    m = mask_N.reshape(n_chunks, chunk).astype(f32)

    @jax.checkpoint
    def one_chunk(h_CD, t_C, m_C):
        logits = jnp.einsum(
            "cd,vd->cv", h_CD, head_VD.astype(h_CD.dtype), preferred_element_type=f32
        )
        lse = jax.nn.logsumexp(logits, axis=-1)
        # The target's logit as h·W[target]: a row gather, which stays cheap when the vocabulary
        # is sharded over `tensor` (indexing the sharded logits would gather them).
        w_t = jnp.take(head_VD, t_C, axis=0).astype(h_CD.dtype)
        target_logit = jnp.einsum("cd,cd->c", h_CD, w_t, preferred_element_type=f32)
        return (lse - target_logit) * m_C, z_weight * lse * lse * m_C

    def body(carry, xs):
        loss, z = one_chunk(*xs)
        return (carry[0] + loss.sum(), carry[1] + z.sum()), None

    zero = jnp.zeros((), f32)
    (loss_sum, z_sum), _ = jax.lax.scan(body, (zero, zero), (h, t, m))
    return {"loss_sum": loss_sum, "z_loss_sum": z_sum, "count": m.sum()}
