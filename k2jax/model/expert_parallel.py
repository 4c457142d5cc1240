"""Expert parallelism: the routed experts inside `shard_map`, pairs exchanged in capacity blocks.

Layout. Outside the MoE, tokens are data-parallel over (data, expert) and replicated over tensor.
Inside, every device takes its own n = N / devices tokens (logical axis "moe_tokens"), and the
routed experts are split over the EP group (logical axis "experts", P devices, expert-major):
device p holds experts [p·E/P, (p+1)·E/P). Per device, for its A = n·K (token, expert) pairs:

    1. route its tokens (router weights are replicated)                     idx, w [n, K]
    2. sort the pairs by expert id, hence by destination peer; each pair gets its rank among the
       pairs for its peer
    3. round 0: the pairs of rank < C go into per-peer blocks of C rows, send [P, C, D], with
       their local expert id and global pair id [P, C, 2]; all_to_all (`moe_dispatch`)
    4. the received rows, sorted by local expert, run the expert FFN (gate|up, SwiGLU, down)
    5. all_to_all back (`moe_combine`); each pair picks its row; Σ_k w·y in float32
    6. exact overflow: pairs of rank ≥ C go in further rounds r = 1, 2, … (ranks [r·C, (r+1)·C)),
       as many as the most loaded (device, peer) needs — a global max, so every device runs the
       same collectives; usually none

Volume. The useful bytes of one exchange are A rows of D per device (each pair's row goes to
exactly one device). Round 0 moves P·C rows with C = ⌈c·A/P⌉ (c = `capacity_factor`, default
1.25), so c × useful; the previous design padded every peer's block to all A pairs, P× useful (8×
at expert=8), and its receive buffers were P·A rows. Here every buffer is sized by C, and an
overflow round costs one more c×, only when routing is that uneven (with K2's learned routers and
c = 1.25 the busiest peer of 8 rarely exceeds 1.25× its share). Nothing is dropped, no pair is
computed twice: each pair is sent in exactly one round.

Gradients. Round 0 is ordinary autodiff (an all_to_all transposes to the reverse all_to_all: the
backward of dispatch is combine with the same plan, and vice versa). The overflow rounds run in a
`lax.fori_loop` whose trip count is data-dependent, which autodiff cannot reverse, so they are one
`jax.custom_vjp`: the backward loops over the same rounds, recomputing each round's forward under
`jax.vjp` and pulling the cotangent back to the tokens and the LoRA factors (the frozen base gets
no cotangent). Recomputing is free in the common case (no rounds) and bounded otherwise: no
residual is stacked per round.

Chunks. `chunk_tokens` (ComputeConfig.moe_chunk_tokens) cuts a device's tokens into memory chunks
run one after another (a rematerialised `lax.scan`): buffers scale with the chunk. Within a
chunk, `overlap_chunks` independent sub-chunks (default 2) each do their own routing, exchange and
experts with no data dependence between them — no scan carry — so XLA's latency-hiding scheduler
on GPU can run sub-chunk i+1's dispatch under sub-chunk i's expert GEMMs.

Rejected alternatives: `ragged_all_to_all` (moves only the used rows, but runs at ~2% of NVLink
inside a node per openxla/xla#33386 and not at all on CPU, so it could not be tested); sending
each token once per destination device and expanding to experts on arrival (fewer bytes at
K ≥ P, but the expanded pair count per device is unbounded, so the expert buffers would need a
capacity and overflow of their own).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from k2jax.config import ModelConfig
from k2jax.model.experts import (
    ExpertWeights,
    PairDropout,
    combine,
    expert_ffn,
    route,
    sort_by_expert,
    unsort,
)
from k2jax.sharding.rules import mesh_axes

DISPATCH_SCOPE, COMBINE_SCOPE = "moe_dispatch", "moe_combine"
OVERFLOW_SCOPE = "moe_overflow"


def mesh_is_parallel() -> bool:
    """True when a mesh with more than one device is the context mesh (jax.set_mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1


def capacity(pairs: int, peers: int, factor: float) -> int:
    """Rows per peer block: ⌈factor · pairs / peers⌉, rounded up to 8 rows, at most `pairs`."""
    c = math.ceil(factor * pairs / peers)
    return max(1, min(pairs, -(-c // 8) * 8))


def moe_expert_parallel(
    x_ND,
    gate_ED,
    bias_E,
    experts: ExpertWeights,
    cfg: ModelConfig,
    *,
    impl: str,
    dropout: PairDropout | None = None,
    chunk_tokens: int = 0,
    capacity_factor: float = 1.25,
    overlap_chunks: int = 2,
):
    """(routed-expert output [N, D], expert load [E], exchange rounds) for tokens x [N, D] on the
    context mesh; rounds: the most rounds any chunk needed (1 = no overflow), an int32 scalar."""
    mesh = jax.sharding.get_abstract_mesh()
    token_axes, ep_axes = mesh_axes("moe_tokens"), mesh_axes("experts")
    n_dev = mesh.size
    N, D = x_ND.shape
    if N % n_dev:
        raise ValueError(
            f"the MoE splits tokens over all {n_dev} devices, but batch·seq = {N} is not divisible "
            f"by {n_dev}; use a batch size or sequence length divisible by the mesh"
        )
    n_ep = math.prod(mesh.shape[a] for a in ep_axes)
    E = cfg.n_routed_experts
    e_loc = E // n_ep
    exchange = functools.partial(
        _exchange,
        cfg=cfg,
        impl=impl,
        n_ep=n_ep,
        e_loc=e_loc,
        ep_axes=ep_axes,
        token_axes=token_axes,
        capacity_factor=capacity_factor,
    )

    def chunk(x, w, drop, token0, route_params):
        """One memory chunk: `overlap_chunks` independent exchanges of its sub-chunks."""
        n = x.shape[0]
        k = overlap_chunks if 0 < overlap_chunks <= n and n % overlap_chunks == 0 else 1
        s = n // k
        outs, load, rounds = [], jnp.zeros((E,), jnp.float32), jnp.zeros((), jnp.int32)
        for i in range(k):
            with jax.named_scope(f"moe_chunk_{i}"):
                out, load_i, rounds_i = exchange(
                    x[i * s : (i + 1) * s], w, drop, token0 + i * s, route_params
                )
            outs.append(out)
            load, rounds = load + load_i, jnp.maximum(rounds, rounds_i)
        return jnp.concatenate(outs) if k > 1 else outs[0], (load, rounds)

    def local(x, gate, bias, w, drop):
        n = x.shape[0]
        c = chunk_tokens if 0 < chunk_tokens < n else n
        if n % c:
            raise ValueError(
                f"compute.moe_chunk_tokens={chunk_tokens} must divide the {n} tokens each device "
                "routes (batch·seq / devices)"
            )
        token0 = jax.lax.axis_index(token_axes) * n  # this device's first global token
        if c == n:
            out, (load, rounds) = chunk(x, w, drop, token0, (gate, bias))
        else:
            # Bounded memory: the buffers scale with the chunk, not with n. Each chunk re-reads
            # the local expert weights, so fewer, larger chunks are faster.
            def body(acc, xs):
                out, (load_c, rounds_c) = jax.checkpoint(chunk)(xs[0], w, drop, xs[1], (gate, bias))
                return (acc[0] + load_c, jnp.maximum(acc[1], rounds_c)), out

            starts = token0 + jnp.arange(n // c, dtype=jnp.int32) * c
            zero = (jnp.zeros((E,), jnp.float32), jnp.zeros((), jnp.int32))
            (load, rounds), out = jax.lax.scan(body, zero, (x.reshape(n // c, c, D), starts))
            out = out.reshape(n, D)
        return out, jax.lax.psum(load, token_axes), rounds

    tokens = P(token_axes)
    fn = jax.shard_map(
        local,
        in_specs=(tokens, P(), P(), jax.tree.map(lambda _: P(ep_axes), experts), P()),
        out_specs=(tokens, P(), P()),
        # Pallas kernels inside shard_map would need per-output "varying axes" annotations whose
        # API differs between jax 0.11 and 0.12; without the check, cotangents of replicated
        # inputs (router weights) are still psum-reduced by shard_map's transpose (tested).
        check_vma=False,
    )
    return fn(x_ND, gate_ED, bias_E, experts, dropout)


def _exchange(
    x_nD,
    w: ExpertWeights,
    drop: PairDropout | None,
    token0,
    route_params,
    *,
    cfg: ModelConfig,
    impl: str,
    n_ep: int,
    e_loc: int,
    ep_axes: tuple[str, ...],
    token_axes: tuple[str, ...],
    capacity_factor: float,
):
    """Route n tokens, exchange their pairs in capacity blocks (+ overflow rounds), run the local
    experts, combine: (output [n, D], expert load [E], rounds). See the module docstring."""
    n, D = x_nD.shape
    K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    A = n * K
    idx, wts, _ = route(x_nD, *route_params, cfg)
    flat = idx.reshape(-1)
    load = jnp.zeros((E,), jnp.float32).at[flat].add(1.0)
    order, _ = sort_by_expert(flat, E)  # experts are contiguous per peer: peer-major too
    e_sorted = flat[order]
    peer = e_sorted // e_loc
    counts = jnp.bincount(peer, length=n_ep)
    rank = jnp.arange(A, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[peer].astype(jnp.int32)
    C = capacity(A, n_ep, capacity_factor)
    plan = {
        "token": (order // K).astype(jnp.int32),
        "peer": peer.astype(jnp.int32),
        "rank": rank,
        # what travels with each row: its local expert and its global pair id (dropout masks)
        "meta": jnp.stack([e_sorted % e_loc, token0 * K + order], axis=-1).astype(jnp.int32),
    }
    round_fn = functools.partial(_round, C=C, n_ep=n_ep, e_loc=e_loc, ep_axes=ep_axes, impl=impl)
    y_pairs = round_fn(0, x_nD, w, drop, plan)
    # Rounds beyond the first: as many as the most loaded (device, peer) block of the mesh needs.
    rounds = jax.lax.pmax(-(-jnp.max(counts) // C), token_axes).astype(jnp.int32)
    base, lora = w.split()
    with jax.named_scope(OVERFLOW_SCOPE):
        y_pairs = y_pairs + _overflow(round_fn, x_nD, lora, base, drop, plan, rounds)
    out = combine(unsort(y_pairs, order).reshape(n, K, D), wts, x_nD.dtype)
    return out, load, rounds


def _round(r, x_nD, w: ExpertWeights, drop, plan, *, C, n_ep, e_loc, ep_axes, impl):
    """Round r of the exchange: the pairs of rank in [r·C, (r+1)·C) to their peers, the local
    experts on what arrives, the results back. Returns [A, D] in sorted-pair order, zero for the
    pairs of other rounds."""
    D = x_nD.shape[1]
    rank = plan["rank"]
    sel = (rank // C) == r
    blocks = n_ep * C
    slot = jnp.where(sel, plan["peer"] * C + rank % C, blocks)  # `blocks`: not sent this round
    send_x = jnp.zeros((blocks, D), x_nD.dtype).at[slot].set(x_nD[plan["token"]], mode="drop")
    pad = jnp.array([e_loc, 0], jnp.int32)  # padding rows: an expert id past the local ones
    send_m = jnp.broadcast_to(pad, (blocks, 2)).at[slot].set(plan["meta"], mode="drop")
    with jax.named_scope(DISPATCH_SCOPE):
        recv_x = jax.lax.all_to_all(send_x.reshape(n_ep, C, D), ep_axes, 0, 0)
        recv_m = jax.lax.all_to_all(send_m.reshape(n_ep, C, 2), ep_axes, 0, 0)
    recv_m = recv_m.reshape(blocks, 2)
    order, sizes = sort_by_expert(recv_m[:, 0], e_loc)
    y = expert_ffn(
        recv_x.reshape(blocks, D)[order],
        sizes,
        w,
        impl=impl,
        dropout=drop,
        pair_ids_M=recv_m[order, 1],
    )
    y_recv = unsort(y, order).reshape(n_ep, C, -1)
    with jax.named_scope(COMBINE_SCOPE):
        y_back = jax.lax.all_to_all(y_recv, ep_axes, 0, 0).reshape(blocks, -1)
    return y_back[jnp.minimum(slot, blocks - 1)] * sel[:, None].astype(y_back.dtype)


def _overflow(round_fn, x_nD, lora, base, drop, plan, rounds):
    """Σ over rounds 1 … rounds−1 of round_fn, with its own VJP (see the module docstring)."""

    def forward(x, lora, base, drop, plan, rounds):
        def body(r, acc):
            return acc + round_fn(r, x, base.with_lora(lora), drop, plan)

        zeros = jnp.zeros((plan["rank"].shape[0], x.shape[1]), x.dtype)
        return jax.lax.fori_loop(1, rounds, body, zeros)

    @jax.custom_vjp
    def overflow(x, lora, base, drop, plan, rounds):
        return forward(x, lora, base, drop, plan, rounds)

    def fwd(x, lora, base, drop, plan, rounds):
        return forward(x, lora, base, drop, plan, rounds), (x, lora, base, drop, plan, rounds)

    def bwd(res, dy):
        x, lora, base, drop, plan, rounds = res
        acc_dtype = jnp.promote_types(x.dtype, jnp.float32)

        def body(r, acc):
            dx, dlora = acc
            _, pull = jax.vjp(
                lambda x_, l_: round_fn(r, x_, base.with_lora(l_), drop, plan), x, lora
            )
            gx, gl = pull(dy)
            return dx + gx.astype(acc_dtype), jax.tree.map(jnp.add, dlora, gl)

        zeros = (jnp.zeros(x.shape, acc_dtype), jax.tree.map(jnp.zeros_like, lora))
        dx, dlora = jax.lax.fori_loop(1, rounds, body, zeros)
        return dx.astype(x.dtype), dlora, None, None, None, None

    overflow.defvjp(fwd, bwd)
    return overflow(x_nD, lora, base, drop, plan, rounds)
