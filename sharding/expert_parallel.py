"""Expert parallelism: the MoE layer inside `shard_map`, tokens exchanged with all-to-all.

Layout. Outside the MoE, tokens are data-parallel over (data, expert) and replicated over tensor.
Inside, every device takes its own 1/(data·expert·tensor) of the tokens, and the routed experts are
split over the EP group (expert × tensor, P devices, expert-major): device p holds experts
[p·E/P, (p+1)·E/P). Per device:

    1. route its n tokens (router weights are replicated)               idx, w  [n, K]
    2. sort the A = n·K (token, expert) pairs by expert id — hence by destination device — and
       scatter them into a send buffer [P, A, D] (row j of block p = the j-th pair for device p)
    3. all_to_all over (expert, tensor): block p goes to device p         recv  [P, A, D]
    4. sort the received rows by local expert, grouped matmul (gate|up, SwiGLU, down)
    5. all_to_all back; gather each pair's result; combine Σ_k w·y in float32

Collectives: two all_to_alls (named `moe_dispatch` / `moe_combine`) and one psum for the expert
load statistics. Gradients flow through the all_to_alls (they transpose to each other).

Dropless buffer sizing (the cost, stated): a device may route all of its A pairs to one peer, so a
padded all_to_all needs A rows per peer: send and receive buffers of P·A·D elements each, P times
the routed activations. That is what this module implements — it runs everywhere, including the
CPU tests (`ragged_all_to_all` does not run on CPU) — and its traffic is P× the useful bytes.
For full Kimi-K2 on 8 devices with one 4096-token row each (A = 32k pairs) one such buffer is
3.8 GB in bf16, and the forward and backward passes hold about ten of them (~38 GB, measured with
`k2jax plan`). `ComputeConfig.moe_chunk_tokens` bounds this: the tokens are dispatched in chunks
(a `lax.scan` with a rematerialised body), so the buffers scale with the chunk — at the price of
re-reading the local expert weights once per chunk. On GPU, `jax.lax.ragged_all_to_all` sends
only the used rows (receive buffers stay worst-case sized); that path needs a GPU to test and is
part of the GPU fast-path issue.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from k2jax.config import ModelConfig

EP_AXES = ("expert", "tensor")
TOKEN_AXES = ("data", "expert", "tensor")


def mesh_is_parallel() -> bool:
    """True when a mesh with more than one device is the context mesh (jax.set_mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1


def _expert_specs(weights):
    """Every expert array (weights, INT4 scales, LoRA) is split on its leading expert dim."""
    return jax.tree.map(lambda x: P(EP_AXES), weights)


def moe_expert_parallel(
    x_ND, gate_ED, bias_E, experts, cfg: ModelConfig, *, impl: str, lora_x_ND=None, chunk_tokens=0
):
    """Routed-expert output [N, D] and expert load [E] for tokens x [N, D] on the context mesh."""
    from k2jax.model.moe import expert_ffn, route

    mesh = jax.sharding.get_abstract_mesh()
    n_dev = mesh.size
    N, D = x_ND.shape
    if N % n_dev:
        raise ValueError(
            f"the MoE splits tokens over all {n_dev} devices, but batch·seq = {N} is not divisible "
            f"by {n_dev}; use a batch size or sequence length divisible by the mesh"
        )
    n_ep = mesh.shape["expert"] * mesh.shape["tensor"]
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    E_loc = E // n_ep
    has_lora_x = lora_x_ND is not None

    def local(x, gate, bias, w, lx):
        n = x.shape[0]
        c = chunk_tokens if 0 < chunk_tokens < n else n
        if n % c:
            raise ValueError(
                f"compute.moe_chunk_tokens={chunk_tokens} must divide the {n} tokens each device "
                "routes (batch·seq / devices)"
            )
        if c == n:
            out, load = dispatch_and_combine(x, gate, bias, w, lx)
        else:
            # Bounded memory: the padded buffers scale with the chunk, not with n. Each chunk
            # re-reads the local expert weights, so fewer, larger chunks are faster.
            def body(load, xs):
                out, load_c = jax.checkpoint(dispatch_and_combine)(xs[0], gate, bias, w, xs[1])
                return load + load_c, out

            lx_chunks = lx.reshape(n // c, c, D) if has_lora_x else jnp.zeros((n // c,), x.dtype)
            load, out = jax.lax.scan(
                body, jnp.zeros((E,), jnp.float32), (x.reshape(n // c, c, D), lx_chunks)
            )
            out = out.reshape(n, D)
        return out, jax.lax.psum(load, TOKEN_AXES)

    def dispatch_and_combine(x, gate, bias, w, lx):
        n = x.shape[0]
        A = n * K
        idx, wts, _ = route(x, gate, bias, cfg)
        flat = idx.reshape(-1)
        load = jnp.zeros((E,), jnp.float32).at[flat].add(1.0)

        # 2. sort pairs by expert (peer-major), place them into the per-peer send blocks
        order = jnp.argsort(flat, stable=True)
        peer = flat[order] // E_loc
        counts = jnp.bincount(peer, length=n_ep)
        starts = jnp.cumsum(counts) - counts
        slot = peer * A + (jnp.arange(A) - starts[peer])  # unique rows of the [P·A] send buffer
        token = order // K

        def send(rows):  # [A, X] rows in sorted order → [P, A, X] blocks, zero padded
            buf = jnp.zeros((n_ep * A, *rows.shape[1:]), rows.dtype).at[slot].set(rows)
            return buf.reshape(n_ep, A, *rows.shape[1:])

        send_e = send((flat[order] % E_loc + 1).astype(jnp.int32))  # local expert id + 1; 0 = pad
        with jax.named_scope("moe_dispatch"):
            recv_x = jax.lax.all_to_all(send(x[token]), EP_AXES, 0, 0)
            recv_e = jax.lax.all_to_all(send_e, EP_AXES, 0, 0)
            recv_lx = jax.lax.all_to_all(send(lx[token]), EP_AXES, 0, 0) if has_lora_x else None

        # 4. local experts on the received rows (padding rows come out as zeros)
        rows_e = recv_e.reshape(-1) - 1
        rows_e = jnp.where(rows_e < 0, E_loc, rows_e)  # padding rows sort after every expert
        order2 = jnp.argsort(rows_e, stable=True)
        sizes = jnp.bincount(rows_e, length=E_loc + 1)[:E_loc].astype(jnp.int32)
        rx = recv_x.reshape(n_ep * A, D)[order2]
        rlx = None if recv_lx is None else recv_lx.reshape(n_ep * A, D)[order2]
        y_sorted = expert_ffn(rx, sizes, w, impl=impl, lora_x_MD=rlx)
        y_recv = jnp.zeros_like(y_sorted).at[order2].set(y_sorted).reshape(n_ep, A, D)

        with jax.named_scope("moe_combine"):
            y_back = jax.lax.all_to_all(y_recv, EP_AXES, 0, 0)
        y_pairs = y_back.reshape(n_ep * A, D)[slot]  # sorted-pair order
        y_NKD = jnp.zeros_like(y_pairs).at[order].set(y_pairs).reshape(n, K, D)
        out = jnp.einsum("nkd,nk->nd", y_NKD.astype(wts.dtype), wts).astype(x.dtype)
        return out, load

    tokens = P(TOKEN_AXES)
    fn = jax.shard_map(
        local,
        in_specs=(tokens, P(), P(), _expert_specs(experts), tokens if has_lora_x else P()),
        out_specs=(tokens, P()),
        # Pallas kernels inside shard_map would need per-output "varying axes" annotations whose
        # API differs between jax 0.11 and 0.12; without the check, cotangents of replicated
        # inputs (router weights) are still psum-reduced by shard_map's transpose (tested).
        check_vma=False,
    )
    lx = lora_x_ND if has_lora_x else jnp.zeros((), x_ND.dtype)
    return fn(x_ND, gate_ED, bias_E, experts, lx)
