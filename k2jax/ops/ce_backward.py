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

The row selection, from CE-LoRA (arXiv 2502.01378) — which pairs approximated multiplication with
a "double LoRA" against error propagation — is our own reading: a per-step top-m by the score
above (cheap: T·out for the column norms) rather than a periodically refreshed fixed set.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["ce_matmul", "factors", "kept_rows"]


def kept_rows(out: int, keep: float) -> int:
    """m: the number of output rows corrected exactly for a keep fraction."""
    return min(out, max(0, math.ceil(keep * out)))


def factors(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Us [.., out, k], Vt [.., k, in], rnorm [.., out]) in float32 of W [.., out, in] (leading
    axes: stacked layers or experts), k = min(rank, out, in)."""
    w32 = w.astype(jnp.float32)
    u, s, vt = jnp.linalg.svd(w32, full_matrices=False)
    k = min(rank, w.shape[-1], w.shape[-2])
    us = u[..., :k] * s[..., None, :k]
    vt = vt[..., :k, :]
    residual = w32 - us @ vt
    return us, vt, jnp.sqrt(jnp.sum(jnp.square(residual), axis=-1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def ce_matmul(x, w, us, vt, rnorm, m: int):
    """x [..., in] · W [out, in]ᵀ in x's dtype — the same product as the exact Linear — with the
    backward of the module docstring."""
    return _forward(x, w)


def _forward(x, w):
    return jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))


def _fwd(x, w, us, vt, rnorm, m):
    return _forward(x, w), (w, us, vt, rnorm)


def _bwd(m, res, dy):
    w, us, vt, rnorm = res  # dy has y's shape and dtype, which are x's but for the last axis
    out = w.shape[0]
    dy2 = dy.reshape(-1, out).astype(jnp.float32)
    if m >= out:  # every row kept: the exact product
        dx = dy2 @ w.astype(jnp.float32)
    else:
        dx = (dy2 @ us) @ vt
        if m > 0:
            score = jnp.sqrt(jnp.sum(jnp.square(dy2), axis=0)) * rnorm
            _, rows = jax.lax.top_k(score, m)
            residual = w[rows].astype(jnp.float32) - us[rows] @ vt  # [m, in]
            dx = dx + jnp.take(dy2, rows, axis=1) @ residual
    dx = dx.reshape(*dy.shape[:-1], w.shape[1]).astype(dy.dtype)
    zero = lambda a: jnp.zeros_like(a)  # noqa: E731  (frozen: no gradient, removed by XLA)
    return dx, zero(w), zero(us), zero(vt), zero(rnorm)


ce_matmul.defvjp(_fwd, _bwd)
