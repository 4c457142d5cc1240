"""Context parallelism: one row's tokens split along the sequence, attention over the gathered
MLA latent.

Without it a row lives on one device outside the MoE, so a row's activations must fit one GPU.
With `compute.context_parallel` = "expert" (or "all") the token axes [B, T] are split as
[rows over data, sequence over expert] (or [—, sequence over data × expert]); every per-token
op (norms, projections, the LM head and loss, the MoE dispatch) runs unchanged on each device's
T / n tokens. Only attention mixes tokens, and MLA makes its exchange cheap: every key and
value of a layer is a function of the per-token compressed latent — the normalised c_kv
(kv_lora_rank, 512 for K2) and the rotated shared rotary key (qk_rope_head_dim, 64) — so each
device all-gathers those 576 numbers per token (75 MB per layer for a 64k row in bf16), expands
them through kv_b_proj (its LoRA included) to every head's k_nope and v locally, and attends its
own queries to all keys. The backward pass is the transpose: each device's partial gradient of
the gathered latent is reduce-scattered back to its owner — again latent-sized, never the
H·(Dn + Dv) = 16,384 numbers per token of expanded keys and values (an all-reduce that plain
GSPMD propagation would insert after the key/value gradient GEMM). That is why the region from
the gather to the attention output is one `shard_map` (`gathered_attention`).

Load balance. Causal attention is triangular: with contiguous chunks the last device would do
2n − 1 times the first one's work. The row is cut into 2n chunks and device d holds chunks d and
2n − 1 − d (the "zig-zag" layout): chunk c sees c + ½ chunk-squares of (query, key) pairs, so
chunks d and 2n − 1 − d see 2n of them together, whatever d — every device does 1/n of the
T² / 2 causal pairs. The layout is
a static permutation of the sequence axis (`zigzag`), applied once to the token ids, positions
and segment ids as the model starts (and to targets and loss mask for the loss), so the layers
see an ordinary sharded [B, T] array; attention is told each query's position in the natural
order (`q_index`) and un-permutes the gathered keys, so masking — causal within equal segment
ids, packed rows included — is exactly the single-device mask.

Token order inside the MoE and the loss. The MoE and the chunked loss flatten [B, T] into N
tokens split over the mesh in contiguous blocks. With rows split over data and the sequence over
expert, a plain reshape would interleave devices' tokens, so `flatten_tokens` puts each device's
[B/nd, T/ne] block together first (a transpose of the logical array that is local on every
device): each device hands the MoE exactly its own tokens, as without context parallelism.

The degree. "none" needs the rows of a microbatch to be a multiple of data × expert (one row per
device at least); "expert" a multiple of data; "all" any number. `resolve` picks the first that
the batch allows ("auto", the default), so one row per step on a node is simply context-parallel
8 ways. The sequence must be a multiple of 2n. Decoding (the "cache" collection) never uses it.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from k2jax.ops.attention import attention
from k2jax.sharding.rules import mesh_axes, token_axes


def resolve(mode: str, rows: int, mesh_shape: Mapping[str, int]) -> str:
    """The concrete layout ("none", "expert" or "all") of `rows` rows per microbatch on a mesh of
    these axis sizes; raises ValueError naming the key when the rows cannot be split that way."""
    data, expert = mesh_shape.get("data", 1), mesh_shape.get("expert", 1)
    fits = {"none": rows % (data * expert) == 0, "expert": rows % data == 0, "all": True}
    if mode == "auto":
        return next(m for m in ("none", "expert", "all") if fits[m])
    if not fits[mode]:
        need = {"none": f"data × expert = {data * expert}", "expert": f"data = {data}"}[mode]
        raise ValueError(
            f"compute.context_parallel = {mode!r}: a microbatch of {rows} rows must be a multiple "
            f"of {need}; use 'auto' (or 'all', which splits every row over data × expert)"
        )
    return mode


def _sizes(names) -> list[int]:
    """Mesh sizes of the axes each logical name maps to, on the context mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return [
        int(np.prod([mesh.shape[a] for a in mesh_axes(n)])) if n and not mesh.empty else 1
        for n in names
    ]


def degree(mode: str) -> int:
    """How many devices one row's sequence is split over on the context mesh (1: not split)."""
    return _sizes(token_axes(mode))[1]


def zigzag(T: int, n: int) -> np.ndarray:
    """Layout position → natural position: device d holds chunks d and 2n − 1 − d of 2n."""
    if T % (2 * n):
        raise ValueError(
            f"context parallelism over {n} devices splits a row into 2 × {n} chunks: the sequence "
            f"length {T} must be a multiple of {2 * n}"
        )
    chunks = np.arange(T).reshape(2 * n, T // (2 * n))
    return np.concatenate([np.concatenate([chunks[d], chunks[2 * n - 1 - d]]) for d in range(n)])


def to_layout(x_BT, n: int):
    """[B, T, ...] in natural order → zig-zag layout order (identity for n = 1)."""
    return x_BT if n == 1 else x_BT[:, zigzag(x_BT.shape[1], n)]


def from_layout(x_BT, n: int):
    """Inverse of `to_layout`."""
    return x_BT if n == 1 else x_BT[:, np.argsort(zigzag(x_BT.shape[1], n))]


def flatten_tokens(x_BT, mode: str):
    """[B, T, ...] → [B·T, ...] with each device's token block contiguous (module docstring)."""
    B, T = x_BT.shape[:2]
    nd, ne = _sizes(token_axes(mode))
    if ne == 1:
        return x_BT.reshape(B * T, *x_BT.shape[2:])
    x = x_BT.reshape(nd, B // nd, ne, T // ne, *x_BT.shape[2:])
    return jnp.swapaxes(x, 1, 2).reshape(B * T, *x_BT.shape[2:])


def unflatten_tokens(x_N, B: int, T: int, mode: str):
    """Inverse of `flatten_tokens`."""
    nd, ne = _sizes(token_axes(mode))
    if ne == 1:
        return x_N.reshape(B, T, *x_N.shape[1:])
    x = x_N.reshape(nd, ne, B // nd, T // ne, *x_N.shape[1:])
    return jnp.swapaxes(x, 1, 2).reshape(B, T, *x_N.shape[1:])


def gathered_attention(
    q_nope,  # [B, T, H, Dn] local queries, layout order (qk-clip factors applied)
    q_rope,  # [B, T, H, Dr] rotated
    c_kv,  # [B, T, Rkv] normalised latent, layout order
    k_rope,  # [B, T, Dr] rotated shared rotary key
    segment_ids,  # [B, T] layout order
    kv_b,  # kv_b_proj weight [H·(Dn + Dv), Rkv]
    kv_b_lora,  # None or (A [r, Rkv], B [H·(Dn + Dv), r], dropped-out input [B, T, Rkv] or None)
    s_kn,  # None or the k_nope QK-clip factors [H]
    *,
    mode: str,
    scale: float,
    impl: str,
    dtype,
    lora_scale: float = 1.0,
):
    """Attention of each device's queries over the whole row's keys, expanded from the gathered
    latent (module docstring). Returns (out [B, T, H, Dv] layout order, max logit [H])."""
    rows, seq = token_axes(mode)
    r_ax, s_ax, h_ax = ((mesh_axes(n) or None) if n else None for n in (rows, seq, "heads"))
    n = degree(mode)
    T = q_nope.shape[1]
    natural = np.argsort(zigzag(T, n))  # gathered layout → natural order
    q_index = jnp.broadcast_to(jnp.asarray(zigzag(T, n), jnp.int32), segment_ids.shape)
    Dn = q_nope.shape[-1]
    lora_in = None if kv_b_lora is None else kv_b_lora[:2]
    lora_x = None if kv_b_lora is None else kv_b_lora[2]

    def local(qn, qr, c, kr, seg, q_idx, w, lora, lx, s):
        def gather(x):  # this row's whole sequence, natural order
            return jax.lax.all_gather(x, s_ax, axis=1, tiled=True)[:, natural]

        c_S, kr_S, seg_S = gather(c), gather(kr), gather(seg)
        # kv_b_proj as `layers.Linear` computes it, on every key of the row
        kv = jnp.einsum("bsc,oc->bso", c_S.astype(dtype), w.astype(dtype))
        if lora is not None:
            a, b = lora
            x_S = (c_S if lx is None else gather(lx)).astype(dtype)
            t = jnp.einsum("bsc,rc->bsr", x_S, a.astype(dtype)) * lora_scale
            kv = kv + jnp.einsum("bsr,or->bso", t.astype(dtype), b.astype(dtype))
        B, S = kv.shape[:2]
        kv = kv.reshape(B, S, qn.shape[2], -1)
        k_nope, v = kv[..., :Dn], kv[..., Dn:]
        if s is not None:
            k_nope = k_nope * s[:, None].astype(k_nope.dtype)
        out, max_logit = attention(
            qn,
            qr,
            k_nope,
            kr_S.astype(qr.dtype),
            v,
            scale=scale,
            q_segment_ids=seg,
            kv_segment_ids=seg_S,
            q_index=q_idx,
            impl=impl,
        )
        token_mesh_axes = tuple(a for ax in (r_ax, s_ax) if ax for a in ax)
        return out, jax.lax.pmax(jax.lax.stop_gradient(max_logit), token_mesh_axes)

    per_head = P(r_ax, s_ax, h_ax, None)
    per_token = P(r_ax, s_ax, None)
    lora_spec = None if lora_in is None else (P(), P(h_ax, None))
    fn = jax.shard_map(
        local,
        in_specs=(
            per_head,
            per_head,
            per_token,
            per_token,
            P(r_ax, s_ax),
            P(r_ax, s_ax),
            P(h_ax, None),
            lora_spec,
            None if lora_x is None else per_token,
            None if s_kn is None else P(h_ax),
        ),
        out_specs=(per_head, P(h_ax)),
        # As in expert_parallel.py: the attention kernels inside carry no "varying axes"
        # annotations; cotangents of the replicated inputs (kv_b's LoRA factors) are still
        # psum-reduced by shard_map's transpose (tests/test_context_parallel.py).
        check_vma=False,
    )
    return fn(q_nope, q_rope, c_kv, k_rope, segment_ids, q_index, kv_b, lora_in, lora_x, s_kn)
