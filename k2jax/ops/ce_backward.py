"""A frozen-weight matmul whose backward is approximated (CE-LoRA's idea, `lora.backward="ce"`).

In LoRA training the frozen weight W [out, in] gets no gradient, but the activation gradient
still flows through it: dX = dY·W, as many FLOPs as the forward. This op keeps the forward
exact (y = x·Wᵀ) and replaces that one product with

    dX ≈ dY·(Us·Vt)  +  dY[:, I]·(W − Us·Vt)[I, :]

* Us [out, k], Vt [k, in]: the best rank-k approximation of W (its truncated SVD, Us = U·S),
  computed once from the frozen weight (`factors`) and stored beside it — 2·T·k·(out + in) FLOPs
  instead of 2·T·out·in;
* I: the m output rows that matter most for this dY, chosen every step by the score
  ‖dY[:, i]‖ · ‖(W − Us·Vt)[i, :]‖ (the bound on row i's share of the error; the residual's row
  norms are stored as `rnorm` [out]), whose residual rows are applied exactly: 2·T·m·in FLOPs
  plus 2·m·k·in to form them from W's rows (INT4-friendly: a row gather, no dense residual is
  ever stored).

With m = out (keep every row) the backward is dY·W itself; with k = min(out, in) the residual is
zero up to rounding. The LoRA branch beside this op (x·Aᵀ·Bᵀ) is differentiated exactly by
autodiff; only the product with the frozen W is approximated, so the loss is exact, and so are
the gradients of every adapter between which and the loss no approximated product lies (the last
layer's MLP down projections); the error enters the layers below through dX.

When the rows are chosen (`lora.ce_refresh`). CE-LoRA (arXiv 2502.01378) — which pairs
approximated multiplication with a "double LoRA" against error propagation — refreshes a fixed
set periodically; both readings are here:

* refresh 0 (the default): every backward chooses its own rows from its own dY, as above
  (cheap: T·out for the column norms) — the freshest choice, but made per call, so each
  microbatch of gradient accumulation, each MoE chunk and exchange round and, for the experts,
  each data replica keeps its own m rows;
* refresh N ≥ 1: the rows are an input (`rows` [m], per expert [G, m]), carried in the train
  state and re-chosen every N steps (`choose_rows`; steps 1, 1 + N, 1 + 2N, … of
  k2jax.train.step) from Σ dY[:, i]² accumulated over the steps since the last choice. The
  backward reports this step's Σ dY[:, i]² as the cotangent of a `score` input whose value it
  ignores — a probe: autodiff then sums it over microbatches, MoE chunks, exchange rounds and
  data replicas exactly as it sums the LoRA gradients, so every call of a step uses the same
  rows, chosen from the whole batch's importance (and a mesh reproduces one device to rounding,
  chunks and gradient accumulation included: tested). Before the first gradient (step 0; an
  expert that saw no token since the last choice) the score is rnorm alone. Each call still forms Σ dY² (for the probe) but skips its top-m; the price is
  staleness: on the tiny model, rows chosen from another batch give less faithful gradients
  than the batch's own (benchmarks/RESULTS.md, "CE-LoRA").

Routed experts (`GroupedFactors`, `attach_grouped`): the same per expert. Expert g's factors are
stored transposed for the grouped matmul (which computes x·W[g]ᵀ): ust = (U·S)ᵀ [G, k, N],
v = Vtᵀ [G, K, k], and the kept rows are chosen per expert from the column norms of *its* rows
of dY. The base product's own backward is switched off inside the grouped matmul
(`grouped_matmul(..., ce=...)`: the Pallas kernel skips dY·W[g], the XLA reference stops its
gradient) and `attach_grouped` — the identity on y — adds the approximation to dX; the LoRA part
of the fused kernel keeps its exact backward. The rows are chosen per grouped-matmul call: all of
an expert's rows meet in one call on one device, and under expert parallelism too unless the
exchange needs overflow rounds or the MoE runs in chunks (compute.moe_chunk_tokens,
moe_overlap_chunks, on by default) — then each call keeps its own m rows (more rows in all), and
a mesh no longer reproduces one device to rounding as it does with the exact backward (tested
with one call). The factors are kept in the compute dtype (they are MMA operands of the grouped
kernel; float32 rank-64 factors of K2's 60 × 384 × 2 expert stacks would be ≈122 GB, bf16 half
of that: ≈7.6 GB per device at expert parallelism 8).

Factors: the dense linears' from a full SVD (K2 has ≈490 of them, the largest o_proj at
≈4·10¹¹ FLOPs); the experts' from a randomized SVD (Halko, Martinsson & Tropp 2011: a Gaussian
sketch of 2k + 8 columns, two power iterations, QR between them), since K2 has 46k expert
matrices: for a 4096 × 7168 expert at rank 64 the sketch's ≈12·N·K·136 FLOPs are ≈20× fewer
than a full SVD's ≈4N²K + 8N³, and they are GEMMs (a full SVD's bidiagonalisation is
memory-bound and sequential). It is near-optimal when the spectrum decays (tested: within 1% of
the optimal residual at σᵢ = 0.9ⁱ) and falls short on a flat one (random weights); when the
sketch covers min(out, in) columns it is the exact SVD.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from k2jax.quant import Int4Weight, dequantize

__all__ = [
    "GroupedFactors",
    "attach_grouped",
    "ce_matmul",
    "choose_rows",
    "factors",
    "grouped_factors",
    "kept_rows",
]

_POWER_ITERATIONS = 2


def kept_rows(out: int, keep: float) -> int:
    """m: the number of output rows corrected exactly for a keep fraction."""
    return min(out, max(0, math.ceil(keep * out)))


def factors(
    w: jax.Array, rank: int, *, randomized: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Us [.., out, k], Vt [.., k, in], rnorm [.., out]) in float32 of W [.., out, in] (leading
    axes: stacked layers or experts), k = min(rank, out, in): the truncated SVD — exact, or the
    randomized sketch of the module docstring — and the row norms of its residual W − Us·Vt."""
    w32 = w.astype(jnp.float32)
    out, inp = w.shape[-2:]
    k = min(rank, out, inp)
    if randomized:
        u, s, vt = _randomized_svd(w32, k)
    else:
        u, s, vt = jnp.linalg.svd(w32, full_matrices=False)
    us = u[..., :k] * s[..., None, :k]
    vt = vt[..., :k, :]
    residual = w32 - us @ vt
    return us, vt, jnp.sqrt(jnp.sum(jnp.square(residual), axis=-1))


def _randomized_svd(w32, k):
    out, inp = w32.shape[-2:]
    sketch = min(out, inp, 2 * k + 8)
    # A fixed key: the factors of a base are a function of it (a resumed run recomputes them).
    omega = jax.random.normal(jax.random.key(0), (inp, sketch), jnp.float32)
    wt = jnp.swapaxes(w32, -1, -2)
    q = jnp.linalg.qr(w32 @ omega)[0]  # [.., out, sketch]: an orthonormal basis of W's range
    for _ in range(_POWER_ITERATIONS):  # sharpen it towards the leading singular vectors
        q = jnp.linalg.qr(w32 @ jnp.linalg.qr(wt @ q)[0])[0]
    u_b, s, vt = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ w32, full_matrices=False)
    return q @ u_b, s, vt


def choose_rows(dy_sq: jax.Array, rnorm: jax.Array, m: int) -> jax.Array:
    """The m rows [.., m] (int32) of largest ‖dY[:, i]‖ · rnorm[i], from dy_sq [.., out] = Σ dY[:, i]²
    (leading axes: layers, experts); where dy_sq is all zero (no gradient seen: the first step,
    an expert that got no token) by rnorm alone."""
    dy_sq, rnorm = dy_sq.astype(jnp.float32), rnorm.astype(jnp.float32)
    seen = jnp.any(dy_sq > 0, axis=-1, keepdims=True)
    _, rows = jax.lax.top_k(jnp.where(seen, jnp.sqrt(dy_sq), 1.0) * rnorm, m)
    return rows.astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def ce_matmul(x, w, us, vt, rnorm, m: int, rows=None, score=None):
    """x [..., in] · W [out, in]ᵀ in x's dtype — the same product as the exact Linear — with the
    backward of the module docstring. `rows` [m] (int32): the kept rows, else chosen from this
    dY; `score` [out] (float32): a probe whose cotangent is this dY's Σ dY[:, i]² (its value is
    not read)."""
    return _forward(x, w)


def _forward(x, w):
    return jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))


def _fwd(x, w, us, vt, rnorm, m, rows, score):
    # `()` or None: whether a probe was given, as tree structure (residuals hold no Python values)
    return _forward(x, w), (w, us, vt, rnorm, rows, None if score is None else ())


def _bwd(m, res, dy):
    w, us, vt, rnorm, rows, probe = res  # dy has y's shape and dtype: x's but for the last axis
    probe = probe is not None
    out = w.shape[0]
    dy2 = dy.reshape(-1, out).astype(jnp.float32)
    dy_sq = jnp.sum(jnp.square(dy2), axis=0) if probe or (rows is None and 0 < m < out) else None
    if m >= out:  # every row kept: the exact product
        dx = dy2 @ w.astype(jnp.float32)
    else:
        dx = (dy2 @ us) @ vt
        if m > 0:
            rows = choose_rows(dy_sq, rnorm, m) if rows is None else rows
            residual = w[rows].astype(jnp.float32) - us[rows] @ vt  # [m, in]
            dx = dx + jnp.take(dy2, rows, axis=1) @ residual
    dx = dx.reshape(*dy.shape[:-1], w.shape[1]).astype(dy.dtype)
    zero = lambda a: jnp.zeros_like(a)  # noqa: E731  (frozen: no gradient, removed by XLA)
    return dx, zero(w), zero(us), zero(vt), zero(rnorm), None, dy_sq if probe else None


ce_matmul.defvjp(_fwd, _bwd)


# Routed experts ----------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupedFactors:
    """One expert stack's factors (module docstring): ust [G, k, N], v [G, K, k], rnorm [G, N],
    and m, the rows per expert corrected exactly (static). With lora.ce_refresh ≥ 1 also the
    carried kept rows [G, m] (int32) and the probe `score` [G, N] (float32) whose cotangent is
    each expert's Σ dY[:, i]² over its rows of this call."""

    ust: jax.Array
    v: jax.Array
    rnorm: jax.Array
    m: int = dataclasses.field(metadata=dict(static=True), default=0)
    rows: jax.Array | None = None
    score: jax.Array | None = None


def grouped_factors(w: jax.Array | Int4Weight, rank: int, dtype) -> dict[str, jax.Array]:
    """{"ce_ust", "ce_v", "ce_rnorm"} of an expert stack W [G, N, K] or stacked layers of them
    [L, G, N, K] (dense or INT4), in `dtype`, one layer at a time: the dequantised float32 copy
    is one layer's experts (per device: its own experts), never the whole stack."""

    def layer(w_gnk):
        us, vt, rnorm = factors(dequantize(w_gnk, jnp.float32), rank, randomized=True)
        return {
            "ce_ust": jnp.swapaxes(us, 1, 2).astype(dtype),
            "ce_v": jnp.swapaxes(vt, 1, 2).astype(dtype),
            "ce_rnorm": rnorm.astype(dtype),
        }

    return layer(w) if len(w.shape) == 3 else jax.lax.map(layer, w)


Matmul = Callable[..., jax.Array]  # (x [M, K], w [G, N, K], group_sizes, preferred_element_type)


def attach_grouped(y, x, w, group_sizes, ce: GroupedFactors, matmul: Matmul):
    """y itself; in the backward, y's cotangent also flows to x as the approximation of
    dY·W[g] (module docstring). `matmul` is the grouped matmul that computes its three
    products (the caller's implementation: Pallas on a GPU). `w` None is `k2jax plan`'s
    stand-in (grouped_matmul's "plan" impl): the kept rows of W are replaced by a product of the
    same shape and dtype, so the memory is planned without making the weights an input, which
    XLA:CPU would copy from int4 to int8 stacks to slice them in the layer loop."""
    return _attach(matmul, y, x, w, group_sizes, ce)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attach(matmul, y, x, w, group_sizes, ce):
    return y


def _attach_fwd(matmul, y, x, w, group_sizes, ce):
    # the probe's value is never read: only whether there is one (`()`), as tree structure
    probe = None if ce.score is None else ()
    return y, (x, w, group_sizes, dataclasses.replace(ce, score=None), probe)


def _attach_bwd(matmul, res, dy):
    x, w, group_sizes, ce, probe = res
    G = ce.ust.shape[0]
    f32 = dict(preferred_element_type=jnp.float32)
    dyc = dy.astype(x.dtype)
    t = matmul(dyc, ce.ust, group_sizes).astype(x.dtype)  # dY·Us[g]            [M, k]
    dx = matmul(t, ce.v, group_sizes, **f32)  # ·Vt[g]                           [M, K]
    # each row's expert; the rows past Σ group_sizes (padding) get G, a zero expert
    ends = jnp.cumsum(group_sizes)
    expert = jnp.searchsorted(ends, jnp.arange(dy.shape[0]), side="right")
    dy_sq = None  # [G, N]: per expert, Σ over its rows of dY², when a choice or the probe needs it
    if probe is not None or (ce.m > 0 and ce.rows is None):
        sq = jax.ops.segment_sum(jnp.square(dy.astype(jnp.float32)), expert, num_segments=G + 1)
        dy_sq = sq[:G]
    if ce.m > 0:
        # [G, m]: per expert, its most important rows — carried, or chosen from this dY
        rows = choose_rows(dy_sq, ce.rnorm, ce.m) if ce.rows is None else ce.rows
        ust_rows = jnp.take_along_axis(ce.ust, rows[:, None, :], axis=2)  # [G, k, m]
        if w is None:  # k2jax plan's stand-in for W's kept rows (attach_grouped)
            w_rows = jnp.einsum("gkm,gKk->gmK", ust_rows, ce.v, **f32)
        else:
            w_rows = jax.tree.map(lambda a: jnp.take_along_axis(a, rows[..., None], axis=1), w)
            w_rows = dequantize(w_rows, jnp.float32)  # [G, m, K]
        # the residual's kept rows, transposed for the grouped matmul: Rᵀ [G, K, m]
        residual_t = jnp.swapaxes(w_rows, 1, 2) - jnp.einsum(
            "gKk,gkm->gKm", ce.v.astype(jnp.float32), ust_rows.astype(jnp.float32)
        )
        rows = jnp.concatenate([rows, jnp.zeros((1, ce.m), rows.dtype)])  # padding: any rows
        dy_kept = jnp.take_along_axis(dyc, rows[expert], axis=1)  # [M, m]
        residual_t = residual_t.astype(x.dtype)
        dx = dx + matmul(dy_kept, residual_t, group_sizes, **f32)
        if w is None:  # the plan's matmul reads no weights; this one's are temporaries to count
            dx = dx + jnp.mean(jax.lax.optimization_barrier(residual_t), dtype=jnp.float32)
    # w, group_sizes, factors: frozen; the probe's cotangent is dy_sq
    d_ce = None if probe is None else GroupedFactors(None, None, None, ce.m, None, dy_sq)
    return dy, dx.astype(x.dtype), None, None, d_ce


_attach.defvjp(_attach_fwd, _attach_bwd)
