"""In-kernel tile helpers shared by the Pallas (Triton) kernels of k2jax/ops.

A Triton program works on power-of-two tiles; a tile that runs past an array's edge is read and
written under a mask. These are the pieces both kernels (gmm_pallas, max_logit_pallas) use:

    block_size(dim, cap)        the power-of-two tile for a dimension: ≥ MIN_BLOCK, ≤ cap
    mask2d(row_ok, col_ok, ..)  a full [R, C] mask from optional row / column masks
    masked_load(ref, mask, v)   a tile whose masked-off elements read as v (0 unless said)
    masked_store(ref, x, mask)  a tile written where the mask holds

Kept apart so that a backend swap (Mosaic GPU, tokamax) replaces them in one place.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MIN_BLOCK = 16  # tl.dot needs every operand dimension ≥ 16


def block_size(dim: int, cap: int) -> int:
    """The power-of-two block for a dimension of size `dim`: ≥ 16 (tl.dot), ≤ cap."""
    return max(MIN_BLOCK, min(cap, pl.next_power_of_2(dim)))


def mask2d(row_ok, col_ok, shape):
    """A full [R, C] mask from optional row/column masks (None: all in range)."""
    if row_ok is None and col_ok is None:
        return None
    m = jnp.ones(shape, jnp.bool_)
    if row_ok is not None:
        m = m & row_ok[:, None]
    if col_ok is not None:
        m = m & col_ok[None, :]
    return m


def masked_load(ref_view, mask, other=0):
    # `other`: masked-off elements read as this. Zeros by default: they are summed into an
    # accumulator, and without `other` Triton leaves them undefined.
    if mask is None:
        return plgpu.load(ref_view)
    return plgpu.load(ref_view, mask=mask, other=other)


def masked_store(ref_view, value, mask):
    if mask is None:
        plgpu.store(ref_view, value)
    else:
        plgpu.store(ref_view, value, mask=mask)
