"""Cross-entropy over a 163,840-token vocabulary without materialising the logits.

Full-size logits for a 4096-token sequence in float32 are 2.7 GB; their gradient as much again.
Per token (only positions with mask > 0 count):

    lse    = logsumexp(h·Wᵀ)                (float32)
    loss   = lse − h·W[target]
    z_loss = z_weight · lse²                (optional; PaLM's auxiliary loss keeping lse near 0)

Returned are *sums* and the mask count, so gradient accumulation and data parallelism can add
them before dividing once.

The LM head and the softmax run over blocks of C tokens × Vc vocabulary rows, inside one
`jax.custom_vjp` (`_lse_and_target`) whose two outputs are the per-token lse and target logit:

    forward   for each block: logits = h_C·W_Vcᵀ (float32 accumulation); an online max / sum of
              exp over the vocabulary blocks gives lse; the target's logit is picked out of the
              block by comparing column ids with the targets. Saved: h, W, targets, lse [N].
    backward  for each block: recompute the logits, form
                  dlogits = softmax · g_lse + onehot(target) · g_target
              in float32 (with g_lse = mask·g_loss + 2·z_weight·lse·mask·g_z and
              g_target = −mask·g_loss from the plain-JAX masking around it), cast it to the
              compute dtype (bf16 in production), and feed the two GEMMs
                  dh_C   += dlogits · W_Vc        dW_Vc += dlogitsᵀ · h_C
              with float32 accumulators (dh [N, D] and one dW block [Vc, D]).

So no float32 logits beyond one [C, Vc] block ever live, and both backward GEMMs take bf16
operands like the forward one. Being a custom_vjp, it has reverse-mode derivatives only. (Plain autodiff of a checkpointed per-token-chunk head, the
rejected alternative and our previous code, keeps [C, V] float32 logits and hands a float32
cotangent to the input-gradient GEMM: a float32 GEMM or an upcast copy of W on a GPU.)

dW is always computed correctly (the function is generic); when nothing uses it — LoRA training
never trains the head — jit drops it as dead code, so it costs nothing (tests/test_loss.py counts
the GEMMs of both programs).

Chunk sizes. `chunk` (compute.loss_chunk_tokens) bounds the tokens and `vocab_chunk` the
vocabulary rows of one block; each axis is cut into ceil(size / bound) equal chunks, zero-padded
at the end only when the size does not divide (padded tokens are masked out, padded vocabulary
columns set to −inf; padding W copies it, which K2's V = 163,840 = 10 × 16,384 never needs). The default blocks, 2048 × 16,384, hold 128 MiB
of float32 logits, and each of their GEMMs is 2·C·Vc·D = 481 GFLOP at D = 7168: large enough to
run at peak, small enough that the block temporaries stay a few hundred MiB.

Sharding. Chunk k of an axis takes every (n_chunks)-th row, k, k + n, k + 2n, ... — the chunk
index is the minor factor of the reshape [V, D] → [Vc, n, D] (tokens alike). A vocabulary split
over `tensor` (or tokens over `data`) into contiguous blocks then lands on the within-chunk axis
(when the device count divides Vc), so every step of the loops works on each device's local rows
and the loops index an unsharded axis: no all-gather of W, h or logits. The target logit is a
masked sum over the local columns, and lse a max and a sum: [C]-sized all-reduces, like the row
gather h·W[target] of our previous code. The larger collectives are inherent to the
parallelism: each block's partial dh [C, D] is summed over `tensor` (a larger `vocab_chunk` means
fewer of them), and, only when dW is used, each partial dW block over the token axes. (Our
previous contiguous token chunks put `data` on the scanned axis, and XLA all-gathered h: every
data-parallel device computed every token's loss.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from k2jax.ops.einsum import accum_dtype, einsum_acc


def chunked_cross_entropy(
    hidden_ND: jax.Array,
    head_VD: jax.Array,
    targets_N: jax.Array,
    mask_N: jax.Array,
    *,
    chunk: int = 2048,
    vocab_chunk: int = 16384,
    z_weight: float = 0.0,
) -> dict[str, jax.Array]:
    """Returns {"loss_sum", "z_loss_sum", "count"} (float32 scalars, float64 for float64 hidden
    states) over masked positions; differentiable (reverse mode) w.r.t. hidden_ND and head_VD."""
    n, d = hidden_ND.shape
    v = head_VD.shape[0]
    nt, c = _split(n, chunk)
    nv, vc = _split(v, vocab_chunk)
    acc = accum_dtype(hidden_ND)
    h = _pad_rows(hidden_ND, nt * c).reshape(c, nt, d)
    t = _pad_rows(targets_N.astype(jnp.int32), nt * c).reshape(c, nt)
    m = _pad_rows(mask_N.astype(acc), nt * c).reshape(c, nt)
    w = _pad_rows(head_VD, nv * vc).reshape(vc, nv, d)
    lse, target_logit = _lse_and_target(h, w, t, v)
    return {
        "loss_sum": jnp.sum((lse - target_logit) * m),
        "z_loss_sum": z_weight * jnp.sum(lse * lse * m),
        "count": jnp.sum(m),
    }


def _split(size: int, bound: int) -> tuple[int, int]:
    """(number of chunks, chunk size): the fewest chunks of at most `bound`, equal in size."""
    n_chunks = max(1, -(-size // max(1, min(bound, size))))
    return n_chunks, -(-size // n_chunks)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    pad = rows - x.shape[0]
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x


def _block_logits(h_CD, w_VD, j, n_vocab_chunks, v):
    """Float32 logits of one block and the vocabulary id of each column (padding: −inf)."""
    logits_CV = einsum_acc("cd,vd->cv", h_CD, w_VD.astype(h_CD.dtype))
    ids_V = jnp.arange(w_VD.shape[0], dtype=jnp.int32) * n_vocab_chunks + j
    if w_VD.shape[0] * n_vocab_chunks > v:
        logits_CV = jnp.where(ids_V < v, logits_CV, -jnp.inf)
    return logits_CV, ids_V


def _take(x, i):
    """Chunk i of a strided layout: index i of axis 1."""
    return jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)


def _put(x, chunk, i):
    return jax.lax.dynamic_update_index_in_dim(x, chunk, i, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lse_and_target(h_CnD, w_VnD, t_Cn, v):
    """Per-token logsumexp(h·Wᵀ) and h·W[target], [C, nt] each, over the first `v` rows of W."""
    return _forward(h_CnD, w_VnD, t_Cn, v)


def _forward(h_CnD, w_VnD, t_Cn, v):
    c, nt, _ = h_CnD.shape
    nv = w_VnD.shape[1]
    acc = accum_dtype(h_CnD)

    # Vocabulary chunks outside, token chunks inside: each (strided, so copied) W chunk is
    # sliced once and used for every token chunk. The carry holds the online statistics.
    def vocab_step(carry, j):
        w_j = _take(w_VnD, j)

        def token_step(carry, i):
            max_, sum_, target = carry
            t_i = _take(t_Cn, i)
            logits, ids = _block_logits(_take(h_CnD, i), w_j, j, nv, v)
            new_max = jnp.maximum(_take(max_, i), logits.max(-1))
            # Every chunk holds a real column (column 0 is id j < v): new_max is finite.
            s = _take(sum_, i) * jnp.exp(_take(max_, i) - new_max)
            s = s + jnp.exp(logits - new_max[:, None]).sum(-1)
            hit = jnp.where(ids[None, :] == t_i[:, None], logits, 0.0).sum(-1)
            return (
                _put(max_, new_max, i),
                _put(sum_, s, i),
                _put(target, _take(target, i) + hit, i),
            ), None

        return jax.lax.scan(token_step, carry, jnp.arange(nt))[0], None

    init = (
        jnp.full((c, nt), -jnp.inf, acc),
        jnp.zeros((c, nt), acc),
        jnp.zeros((c, nt), acc),
    )
    (max_, sum_, target), _ = jax.lax.scan(vocab_step, init, jnp.arange(nv))
    return max_ + jnp.log(sum_), target


def _fwd(h_CnD, w_VnD, t_Cn, v):
    lse, target = _forward(h_CnD, w_VnD, t_Cn, v)
    return (lse, target), (h_CnD, w_VnD, t_Cn, lse)


def _bwd(v, res, cts):
    h_CnD, w_VnD, t_Cn, lse_Cn = res
    g_lse, g_target = cts
    c, nt, d = h_CnD.shape
    vc, nv, _ = w_VnD.shape
    acc = lse_Cn.dtype

    def vocab_step(carry, j):
        dh, dw = carry
        w_j = _take(w_VnD, j)

        def token_step(carry, i):
            dh, dw_j = carry
            h_i, t_i = _take(h_CnD, i), _take(t_Cn, i)
            logits, ids = _block_logits(h_i, w_j, j, nv, v)
            dlogits = jnp.exp(logits - _take(lse_Cn, i)[:, None]) * _take(g_lse, i)[:, None]
            onehot = ids[None, :] == t_i[:, None]
            dlogits = dlogits + jnp.where(onehot, _take(g_target, i)[:, None], 0.0)
            # The cast that matters: both GEMMs below take compute-dtype (bf16) operands.
            dlogits = dlogits.astype(h_i.dtype)
            dh_i = _take(dh, i) + einsum_acc("cv,vd->cd", dlogits, w_j.astype(h_i.dtype))
            dw_j = dw_j + einsum_acc("cv,cd->vd", dlogits, h_i)
            return (_put(dh, dh_i, i), dw_j), None

        (dh, dw_j), _ = jax.lax.scan(token_step, (dh, jnp.zeros((vc, d), acc)), jnp.arange(nt))
        return (dh, _put(dw, dw_j.astype(w_VnD.dtype), j)), None

    init = (jnp.zeros((c, nt, d), acc), jnp.zeros_like(w_VnD))
    (dh, dw), _ = jax.lax.scan(vocab_step, init, jnp.arange(nv))
    return dh.astype(h_CnD.dtype), dw, None


_lse_and_target.defvjp(_fwd, _bwd)
