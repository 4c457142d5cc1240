"""A dropless grouped matmul in Pallas for the Triton (GPU) backend, INT4-aware, LoRA fused.

    y[m] = x[m] · W[g(m)]ᵀ  (+ s · (x'[m] · A[g(m)]ᵀ) · B[g(m)]ᵀ)      rows sorted by group g(m)

This is `grouped_matmul(..., impl="pallas")` (k2jax/ops/grouped_matmul.py has the contract). It
exists because XLA has no usable grouped GEMM on CUDA (GPU_NOTES.md: `ragged_dot` becomes a dense
masked expansion) and because Kimi's group-32 INT4 experts must be dequantised tile by tile inside
the GEMM: dequantising a 384-expert stack in XLA first costs more than the GEMM itself.

Tiling: group-aligned row tiles ("work items")
----------------------------------------------
The rows of group g are [start_g, start_g + size_g). We cut every group, on its own, into tiles of
`bm` rows *starting at the group's first row*: work item (g, j) covers rows
[start_g + j·bm, min(start_g + (j+1)·bm, end_g)), so a tile never straddles a group boundary and
every row belongs to exactly one work item. The rows past sum(group_sizes) form one more segment,
"group G", whose items only store zeros. The schedule is three int32 arrays (group, lo, hi per work
item) computed in XLA from group_sizes (`make_schedule`: a cumsum and a searchsorted over G+1
entries, microseconds) and read inside the kernel as ordinary small arrays, since the Triton
backend has no scalar prefetch. Its length is static: Σ_g ceil(size_g / bm) over G+1 segments that
partition M rows is at most ceil(M/bm) + G (ceil(a/b) + ceil(c/b) ≤ ceil((a+c)/b) + 1), so shapes
are static under jit; unused trailing items have group −1 and exit at once.

The kernel runs a 1-D grid of (work item, output-column tile) programs. Each loads its bm rows at
an arbitrary (unaligned) row offset with a row mask, loops over the contraction in steps of `bk`
with an fp32 accumulator, and stores with the same row mask. Masked stores of disjoint row ranges
mean no two programs write the same element and every element is written exactly once (rows of
the zero segment included), so the output needs no initialisation. Programs are ordered in bands
of `group_m` work items per column sweep (Triton's "grouped ordering"), so the weight tiles of one
expert and the row tile of one work item are re-read from L2 rather than HBM.

Waste: a group of s rows costs ceil(s/bm)·bm rows of MMA work, i.e. on average bm/2 padding rows
per non-empty group; nothing is copied, no memory is spent beyond the O(M/bm + G) schedule. At
E=384 and 32k routed rows (≈85 ± 9 rows per expert) and bm=128 that is ≈384 tiles for 256 tiles
of real rows: 1.5x the FLOPs (bm=64 too, since 85 rows take two 64-row tiles; bm=32 ≈1.17x, at a
smaller MMA). That regime is weight-bandwidth-bound anyway (a bf16 gate|up stack is 22.5 GB per
layer, INT4 a quarter of it plus scales). At E=48 with ≈5.5k rows per expert the waste is ~1%.

Alternatives rejected:
  * megablocks/MaxText "group metadata" over *globally* aligned tiles (row tile t covers rows
    [t·bm, (t+1)·bm); a tile straddling k group boundaries is visited by k+1 work items, each
    masking the others' rows). That is what TPU kernels must do, because a TPU block is fetched
    at block-aligned offsets. It costs about one extra tile per group boundary (≈2.5x at E=384,
    bm=128 instead of 1.5x), and on a GPU the programs sharing a tile run concurrently, so they
    could not accumulate into one output block anyway. A Triton load takes any row offset.
  * padding every group to a multiple of bm in a permuted copy: the same MMA waste as ours, plus
    a gather of x (32k × 7168 bf16 = 470 MB per gate|up call) and a scatter of y, forward and
    backward.
  * `jax.lax.ragged_dot`: unusable on CUDA in this JAX (GPU_NOTES.md).

INT4 weights
------------
An `Int4Weight` is passed as its two arrays, `jnp.int4` values [G, N, K] and bf16 scales
[G, N, K/32]. Per contraction step the kernel loads a [bn, bk] int4 tile and the matching scales
(gathered with column index k // 32, so bk need not equal the quantisation group), forms
q·scale in fp32 and rounds once to the compute dtype, exactly like `k2jax.quant.dequantize`. No
bf16 copy of the stack is ever written. The values are viewed as [G, N, K/bk, bk] (a bitcast) so
the K tile is a static slice: only then does the Triton lowering load the int4 tile as packed
bytes and unpack it with a shift and a join, instead of one byte load per nibble.

LoRA
----
t = s · x'·A[g]ᵀ [M, r] is computed by the same kernel as its own small call (N = r), rounded to
x's dtype as the reference does, and the rank-r expansion t·B[g]ᵀ is fused into the main kernel's
epilogue (one [bm, r]·[r, bn] dot per output tile). Computing t inside the main kernel instead
would redo it for every one of the N/bn column tiles (+r/bn ≈ 25% MMA work for the fused gate|up
adapter of rank 2·16 at bn=128) and would re-read x' per column tile when x' ≠ x; the separate
call reads x' once and t is needed by the backward pass anyway.

Backward (`jax.custom_vjp`)
---------------------------
    dt  = s · dy·B[g]                  [M, r]   kernel with the weight transposed (N = r)
    dx  = dy·W[g] (+ dt·A[g])          [M, K]   kernel with W transposed, INT4-aware, the LoRA
                                                 term fused when x' is x
    dx' = dt·A[g]                      [M, K]   only when a separate `lora_x` is given
    dA[g] = dt_gᵀ · x'_g, dB[g] = dy_gᵀ · t_g   a "tgmm" kernel: one program per (group, output
                                                 tile) loops over the group's rows; never a
                                                 dense [G, M, ·] expansion
The base weight W is frozen: its cotangent is a symbolic zero (None), as is group_sizes'. Code
that differentiates W through this path silently gets zeros; use impl="xla" for that.
`dy` is cast to x's dtype before the MMAs (a no-op unless `preferred_element_type` differs).

Backend and checks
------------------
Launch parameters go through `jax.experimental.pallas.triton.CompilerParams` (num_warps,
num_stages; `Tiles`). Default tiles 128×128×64 with 8 warps: an offline Triton compile of these
kernels for sm_90a used wgmma, ~170–190 registers per thread and no spills, while 4 warps spilled.
On CPU the kernels run in Pallas interpret mode, which is how tests/test_gmm_pallas.py checks
their numerics; it also lowers them to Triton IR for an abstract H100. Note that jax 0.12 warns
that the Pallas Triton backend is deprecated in favour of Mosaic GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from k2jax.quant import Int4Weight

# Triton's tl.dot wants every operand dimension ≥ 16.
_MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes and Triton launch parameters; powers of two. The defaults are Hopper starting
    points, to be tuned with benchmarks/bench_gmm.py.

    bm: rows per work item; bn: output columns per program; bk: contraction step (rows per step
    in the tgmm kernel); group_m: work items per L2 band of the program order.
    """

    bm: int = 128
    bn: int = 128
    bk: int = 64
    group_m: int = 8
    num_warps: int = 8  # 4 spills the 128×128 fp32 accumulator (module docstring)
    num_stages: int = 3

    def __post_init__(self):
        for name in ("bm", "bn", "bk"):
            v = getattr(self, name)
            if v < _MIN_BLOCK or v & (v - 1):
                raise ValueError(f"Tiles.{name}={v} must be a power of two ≥ {_MIN_BLOCK}")


DEFAULT_TILES = Tiles()


def _compiler_params(tiles: Tiles):
    # `CompilerParams` in jax ≥ 0.7 (0.11.2 on the GPU machine, 0.12 in CI); older releases named
    # it `TritonCompilerParams`. Interpret mode ignores it.
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    return None if cls is None else cls(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _block(dim: int, cap: int) -> int:
    """The power-of-two block for a dimension of size `dim`: ≥ 16 (tl.dot), ≤ cap."""
    return max(_MIN_BLOCK, min(cap, pl.next_power_of_2(dim)))


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Work items of the row-tiled kernels and the group extents of the tgmm kernel.

    item_group [W]: group id; G for the zero-padding rows past sum(group_sizes); −1 when unused.
    item_lo, item_hi [W]: the item's rows [lo, hi), hi − lo ≤ bm.
    group_start, group_size [G]: each group's rows, clipped to the M rows of x.
    """

    item_group: jax.Array
    item_lo: jax.Array
    item_hi: jax.Array
    group_start: jax.Array
    group_size: jax.Array


def num_work_items(num_rows: int, num_groups: int, bm: int) -> int:
    """The static bound ceil(M/bm) + G on the number of work items (module docstring)."""
    return pl.cdiv(num_rows, bm) + num_groups


def make_schedule(group_sizes: jax.Array, num_rows: int, bm: int) -> Schedule:
    """Cuts each group (and the padding rows after the last group) into tiles of bm rows."""
    G = group_sizes.shape[0]
    # Clip to the rows that exist, so no work item ever points past row M even when
    # sum(group_sizes) > M (a caller bug, for which ragged_dot promises nothing either).
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    sizes = ends - starts
    # G+1 segments: the groups, then the padding rows [total, M).
    seg_start = jnp.concatenate([starts, ends[-1:]])
    seg_end = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
    seg_items = (seg_end - seg_start + bm - 1) // bm
    items_end = jnp.cumsum(seg_items)
    W = num_work_items(num_rows, G, bm)
    w = jnp.arange(W, dtype=jnp.int32)
    seg = jnp.minimum(jnp.searchsorted(items_end, w, side="right"), G).astype(jnp.int32)
    used = w < items_end[-1]
    lo = seg_start[seg] + (w - (items_end[seg] - seg_items[seg])) * bm
    hi = jnp.minimum(lo + bm, seg_end[seg])
    return Schedule(
        item_group=jnp.where(used, seg, -1),
        item_lo=jnp.where(used, lo, 0),
        item_hi=jnp.where(used, hi, 0),
        group_start=starts,
        group_size=sizes,
    )


# --------------------------------------------------------------------------------------------
# In-kernel helpers
# --------------------------------------------------------------------------------------------


def _mask2d(row_ok, col_ok, shape):
    """A full [R, C] mask from optional row/column masks (None: all in range)."""
    if row_ok is None and col_ok is None:
        return None
    m = jnp.ones(shape, jnp.bool_)
    if row_ok is not None:
        m = m & row_ok[:, None]
    if col_ok is not None:
        m = m & col_ok[None, :]
    return m


def _load(ref_view, mask):
    # `other=0`: masked-off elements must read as zeros (they are summed into the accumulator);
    # without it Triton leaves them undefined.
    if mask is None:
        return plgpu.load(ref_view)
    return plgpu.load(ref_view, mask=mask, other=0)


def _store(ref_view, value, mask):
    if mask is None:
        plgpu.store(ref_view, value)
    else:
        plgpu.store(ref_view, value, mask=mask)


def _load_weight_tile(w_refs, g, r0, nr, c0, nc, dims, mask_rows, mask_cols, quant_group, cdt):
    """Tile [nr, nc] at (r0, c0) of stack g of a stored [G, D1, D2] weight, in dtype `cdt`.

    w_refs is (dense [G, D1, D2],) or (int4 values [G, D1, D2 // nc, nc], scales [G, D1, D2 //
    quant_group]) with K = D2 the last stored dim, cut by the caller into tiles of nc (`_gmm`:
    nc divides K, so INT4 tiles need no column mask). INT4 tiles are dequantised here,
    q · scale[·, k // quant_group] formed in fp32 and rounded once, like `quant.dequantize`.
    """
    d1, d2 = dims
    rows = r0 + jnp.arange(nr, dtype=jnp.int32)
    cols = c0 + jnp.arange(nc, dtype=jnp.int32)
    row_ok = rows < d1 if mask_rows else None
    mask = _mask2d(row_ok, cols < d2 if mask_cols else None, (nr, nc))
    if len(w_refs) == 1:
        return _load(w_refs[0].at[g, pl.ds(r0, nr), pl.ds(c0, nc)], mask).astype(cdt)
    values_ref, scales_ref = w_refs
    # The K tile is picked by a scalar index and read as the static slice [0, nc): only then does
    # the Triton lowering load int4 as packed bytes and split the nibbles with one shift (its
    # "contiguous int4" path); a dynamic K offset would load every nibble's byte separately. The
    # row mask must stay [nr, 1] because that load is shaped [nr, nc / 2] bytes.
    q = _load(
        values_ref.at[g, pl.ds(r0, nr), lax.div(c0, nc), pl.ds(0, nc)],
        None if row_ok is None else row_ok[:, None],
    )
    # One scale per (row, quant_group columns): a gather whose column index repeats
    # quant_group times; the scales tile is tiny and served from L1/L2.
    scales = _load(scales_ref.at[g, rows[:, None], lax.div(cols, quant_group)[None, :]], mask)
    return (q.astype(jnp.float32) * scales.astype(jnp.float32)).astype(cdt)


def _dot(a, b, contract_a: int, contract_b: int, precision):
    return lax.dot_general(
        a,
        b,
        (((contract_a,), (contract_b,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


# --------------------------------------------------------------------------------------------
# The grouped matmul kernel
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _GmmSpec:
    """Static description of one row-tiled kernel call (hashable: it parameterises the kernel)."""

    contract: int  # C: the contracted dimension
    out_cols: int  # N: output columns
    groups: int  # G
    items: int  # W
    bm: int
    bn: int
    bk: int
    group_m: int
    transpose_w: bool  # False: w stored [G, N, C]; True: w stored [G, C, N]
    n_w: int  # 1 dense, 2 int4 (values, scales)
    quant_group: int
    epi_rank: int  # r of the fused LoRA epilogue (a power of two ≥ 16), 0 for none
    alpha: float
    cdt: jnp.dtype  # compute (MMA operand) dtype
    precision: lax.Precision | None


def _program_to_item(pid, items: int, col_tiles: int, group_m: int):
    """Grouped program order: bands of group_m work items sweep all column tiles together."""
    # All operands are non-negative: lax.div/rem (truncating) avoid jnp's floor-division fix-ups.
    band_size = group_m * col_tiles
    first = lax.div(pid, band_size) * group_m
    in_band = jnp.minimum(items - first, group_m)
    local = lax.rem(pid, band_size)
    return first + lax.rem(local, in_band), lax.div(local, in_band)


def _gmm_kernel(*refs, spec: _GmmSpec):
    item_group_ref, item_lo_ref, item_hi_ref, lhs_ref = refs[:4]
    w_refs = refs[4 : 4 + spec.n_w]
    epi_refs = refs[4 + spec.n_w : -1]
    out_ref = refs[-1]
    bm, bn, bk, G = spec.bm, spec.bn, spec.bk, spec.groups
    col_tiles = pl.cdiv(spec.out_cols, bn)

    item, col_tile = _program_to_item(pl.program_id(0), spec.items, col_tiles, spec.group_m)
    g = item_group_ref[item]
    lo = item_lo_ref[item]
    hi = item_hi_ref[item]
    n0 = col_tile * bn
    row_ok = lo + jnp.arange(bm, dtype=jnp.int32) < hi
    cols = n0 + jnp.arange(bn, dtype=jnp.int32)
    mask_n = spec.out_cols % bn != 0
    store_mask = _mask2d(row_ok, cols < spec.out_cols if mask_n else None, (bm, bn))
    out_view = out_ref.at[pl.ds(lo, bm), pl.ds(n0, bn)]
    mask_k = spec.contract % bk != 0

    @pl.when((g >= 0) & (g < G))
    def _compute():
        def step(i, acc):
            c0 = i * bk
            k_ok = c0 + jnp.arange(bk, dtype=jnp.int32) < spec.contract if mask_k else None
            x = _load(lhs_ref.at[pl.ds(lo, bm), pl.ds(c0, bk)], _mask2d(row_ok, k_ok, (bm, bk)))
            x = x.astype(spec.cdt)
            if spec.transpose_w:  # w [G, C, N]: tile [bk, bn]
                dims = (spec.contract, spec.out_cols)
                w = _load_weight_tile(
                    w_refs, g, c0, bk, n0, bn, dims, mask_k, mask_n, spec.quant_group, spec.cdt
                )
                return acc + _dot(x, w, 1, 0, spec.precision)
            dims = (spec.out_cols, spec.contract)  # w [G, N, C]: tile [bn, bk]
            w = _load_weight_tile(
                w_refs, g, n0, bn, c0, bk, dims, mask_n, mask_k, spec.quant_group, spec.cdt
            )
            return acc + _dot(x, w, 1, 1, spec.precision)

        acc = jnp.zeros((bm, bn), jnp.float32)
        acc = lax.fori_loop(0, pl.cdiv(spec.contract, bk), step, acc)
        if spec.epi_rank:
            # LoRA epilogue: acc += t[rows] · E[g], t [M, r], E stored like w with r as C; r is
            # a power of two ≥ 16 (`_pad_rank`), so the rank needs no mask.
            t_ref, e_ref = epi_refs
            r = spec.epi_rank
            t = _load(t_ref.at[pl.ds(lo, bm), pl.ds(0, r)], _mask2d(row_ok, None, (bm, r)))
            t = t.astype(spec.cdt)
            if spec.transpose_w:  # E [G, r, N]
                dims = (r, spec.out_cols)
                e = _load_weight_tile((e_ref,), g, 0, r, n0, bn, dims, False, mask_n, 1, spec.cdt)
                acc = acc + _dot(t, e, 1, 0, spec.precision)
            else:  # E [G, N, r]
                dims = (spec.out_cols, r)
                e = _load_weight_tile((e_ref,), g, n0, bn, 0, r, dims, mask_n, False, 1, spec.cdt)
                acc = acc + _dot(t, e, 1, 1, spec.precision)
        if spec.alpha != 1.0:
            acc = acc * spec.alpha
        _store(out_view, acc.astype(out_ref.dtype), store_mask)

    @pl.when(g == G)
    def _zero_padding_rows():
        _store(out_view, jnp.zeros((bm, bn), out_ref.dtype), store_mask)


def _weight_arrays(w, k_tile: int) -> tuple[tuple[jax.Array, ...], int]:
    """The kernel operands of a weight, and its quantisation group (1 when dense).

    INT4 values [G, D1, K] are passed as [G, D1, K / k_tile, k_tile] (`_load_weight_tile`): the
    same bytes in the same order, so XLA makes the reshape a bitcast.
    """
    if isinstance(w, Int4Weight):
        G, d1, k = w.values.shape
        return (w.values.reshape(G, d1, k // k_tile, k_tile), w.scales), w.group_size
    return (w,), 1


def _dividing_block(dim: int, cap: int) -> int:
    """The largest power-of-two block ≤ cap that divides dim (INT4 K tiles), at least 16."""
    b = _block(dim, cap)
    while dim % b:
        b //= 2
    if b < _MIN_BLOCK:
        raise ValueError(f"INT4 in_features {dim} must be a multiple of {_MIN_BLOCK}")
    return b


def _precision(cdt):
    # fp32 operands: IEEE fp32 MMA (Triton would use TF32 by default); 16-bit operands: native.
    return lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None


def _gmm(
    lhs: jax.Array,
    w,
    sched: Schedule,
    *,
    transpose_w: bool,
    out_dtype,
    tiles: Tiles,
    interpret: bool,
    alpha: float = 1.0,
    epilogue: tuple[jax.Array, jax.Array] | None = None,
    name: str = "gmm",
) -> jax.Array:
    """out[m] = alpha · (lhs[m] · op(w[g(m)]) + t[m] · op(e[g(m)])), op = ᵀ unless transpose_w.

    lhs [M, C]; w [G, N, C] (or [G, C, N] when transpose_w), dense or Int4Weight; epilogue
    (t [M, r], e [G, N, r] or [G, r, N]). Rows outside every group come out as zeros.
    """
    M, C = lhs.shape
    G = w.shape[0]
    N = w.shape[2] if transpose_w else w.shape[1]
    cdt = jnp.dtype(lhs.dtype)
    bn, bk = _block(N, tiles.bn), _block(C, tiles.bk)
    if isinstance(w, Int4Weight):  # the tile along K (stored last) must divide K
        if transpose_w:
            bn = _dividing_block(N, tiles.bn)
        else:
            bk = _dividing_block(C, tiles.bk)
    w_arrays, quant_group = _weight_arrays(w, bn if transpose_w else bk)
    epi_rank = 0 if epilogue is None else epilogue[0].shape[1]
    if epi_rank and (epi_rank < _MIN_BLOCK or epi_rank & (epi_rank - 1)):
        raise ValueError(f"LoRA epilogue rank {epi_rank} must be a power of two ≥ {_MIN_BLOCK}")
    spec = _GmmSpec(
        contract=C,
        out_cols=N,
        groups=G,
        items=sched.item_group.shape[0],
        bm=tiles.bm,
        bn=bn,
        bk=bk,
        group_m=tiles.group_m,
        transpose_w=transpose_w,
        n_w=len(w_arrays),
        quant_group=quant_group,
        epi_rank=epi_rank,
        alpha=float(alpha),
        cdt=cdt,
        precision=_precision(cdt),
    )
    grid = spec.items * pl.cdiv(N, spec.bn)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, spec=spec),
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        grid=(grid,),
        compiler_params=_compiler_params(tiles),
        interpret=interpret,
        name=name,
    )(sched.item_group, sched.item_lo, sched.item_hi, lhs, *w_arrays, *(epilogue or ()))


# --------------------------------------------------------------------------------------------
# The transposed grouped matmul (per-group reductions over rows) for the LoRA gradients
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TgmmSpec:
    p: int  # P: rows of each output matrix
    q: int  # Q: columns of each output matrix
    bp: int
    bq: int
    bm: int  # rows per reduction step
    cdt: jnp.dtype
    precision: lax.Precision | None


def _tgmm_kernel(group_start_ref, group_size_ref, a_ref, b_ref, out_ref, *, spec: _TgmmSpec):
    bp, bq, bm = spec.bp, spec.bq, spec.bm
    q_tiles = pl.cdiv(spec.q, bq)
    tiles = pl.cdiv(spec.p, bp) * q_tiles
    # Programs of one group are adjacent, so they share its rows of a and b in L2.
    pid = pl.program_id(0)
    g = lax.div(pid, tiles)
    p0 = lax.div(lax.rem(pid, tiles), q_tiles) * bp
    q0 = lax.rem(lax.rem(pid, tiles), q_tiles) * bq
    start = group_start_ref[g]
    end = start + group_size_ref[g]
    p_ok = p0 + jnp.arange(bp, dtype=jnp.int32) < spec.p if spec.p % bp else None
    q_ok = q0 + jnp.arange(bq, dtype=jnp.int32) < spec.q if spec.q % bq else None

    def step(i, acc):
        r0 = start + i * bm
        row_ok = r0 + jnp.arange(bm, dtype=jnp.int32) < end
        a = _load(a_ref.at[pl.ds(r0, bm), pl.ds(p0, bp)], _mask2d(row_ok, p_ok, (bm, bp)))
        b = _load(b_ref.at[pl.ds(r0, bm), pl.ds(q0, bq)], _mask2d(row_ok, q_ok, (bm, bq)))
        return acc + _dot(a.astype(spec.cdt), b.astype(spec.cdt), 0, 0, spec.precision)

    # An empty group runs no step and stores zeros: every element of the output is written.
    steps = lax.div(end - start + bm - 1, bm)
    acc = lax.fori_loop(0, steps, step, jnp.zeros((bp, bq), jnp.float32))
    _store(
        out_ref.at[g, pl.ds(p0, bp), pl.ds(q0, bq)],
        acc.astype(out_ref.dtype),
        _mask2d(p_ok, q_ok, (bp, bq)),
    )


def _tgmm(a, b, sched: Schedule, *, out_dtype, cdt, tiles: Tiles, interpret: bool, name: str):
    """out[g] = a_gᵀ · b_g [G, P, Q] for a [M, P], b [M, Q]: Σ over the rows of group g."""
    P, Q = a.shape[1], b.shape[1]
    G = sched.group_size.shape[0]
    cdt = jnp.dtype(cdt)
    spec = _TgmmSpec(
        p=P,
        q=Q,
        bp=_block(P, tiles.bn),
        bq=_block(Q, tiles.bn),
        bm=tiles.bk,
        cdt=cdt,
        precision=_precision(cdt),
    )
    grid = G * pl.cdiv(P, spec.bp) * pl.cdiv(Q, spec.bq)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, spec=spec),
        out_shape=jax.ShapeDtypeStruct((G, P, Q), out_dtype),
        grid=(grid,),
        compiler_params=_compiler_params(tiles),
        interpret=interpret,
        name=name,
    )(sched.group_start, sched.group_size, a, b)


# --------------------------------------------------------------------------------------------
# Public entry point and its VJP
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    out_dtype: jnp.dtype
    lora_scale: float
    tiles: Tiles
    interpret: bool


def grouped_matmul_pallas(
    x: jax.Array,
    w: jax.Array | Int4Weight,
    group_sizes: jax.Array,
    *,
    lora=None,
    lora_x: jax.Array | None = None,
    preferred_element_type=None,
    tiles: Tiles = DEFAULT_TILES,
    interpret: bool | None = None,
) -> jax.Array:
    """The Pallas grouped matmul; same contract as `grouped_matmul` (module docstring there).

    `lora` is a `GroupedLora` (a [G, r, K], b [G, N, r], scale). `interpret=None` runs the kernels
    in Pallas interpret mode when JAX's default backend is the CPU, compiled through Triton
    otherwise. Gradients flow to x, lora_x, lora.a and lora.b; W is treated as frozen.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    cfg = _Config(
        out_dtype=jnp.dtype(preferred_element_type or x.dtype),
        lora_scale=1.0 if lora is None else float(lora.scale),
        tiles=tiles,
        interpret=bool(interpret),
    )
    sched = make_schedule(group_sizes, x.shape[0], tiles.bm)
    if lora is None:
        return _gmm_vjp(cfg, x, w, sched, None, None, None)
    a, b = _pad_rank(lora.a, lora.b)
    return _gmm_vjp(cfg, x, w, sched, a, b, lora_x)


def _pad_rank(a, b):
    """Zero-pads the LoRA rank to a power of two ≥ 16 (tl.dot's minimum; the kernels then need
    no rank masks). A no-op for the usual r = 16, 32, 64; autodiff slices the gradients back."""
    r = a.shape[1]
    rp = max(_MIN_BLOCK, pl.next_power_of_2(r))
    if rp == r:
        return a, b
    return jnp.pad(a, ((0, 0), (0, rp - r), (0, 0))), jnp.pad(b, ((0, 0), (0, 0), (0, rp - r)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm_vjp(cfg, x, w, sched, a, b, lora_x):
    return _gmm_fwd(cfg, x, w, sched, a, b, lora_x)[0]


def _gmm_fwd(cfg: _Config, x, w, sched, a, b, lora_x):
    kw = dict(tiles=cfg.tiles, interpret=cfg.interpret)
    t = None
    epilogue = None
    if a is not None:
        lx = x if lora_x is None else lora_x
        # t = s · x'·Aᵀ, rounded to x′'s dtype like the reference (it is an MMA operand next).
        t = _gmm(
            lx,
            a,
            sched,
            transpose_w=False,
            out_dtype=lx.dtype,
            alpha=cfg.lora_scale,
            name="gmm_lora_a",
            **kw,
        )
        epilogue = (t, b)
    y = _gmm(
        x, w, sched, transpose_w=False, out_dtype=cfg.out_dtype, epilogue=epilogue, name="gmm", **kw
    )
    return y, (x, w, sched, a, b, lora_x, t)


def _gmm_bwd(cfg: _Config, res, dy):
    x, w, sched, a, b, lora_x, t = res
    kw = dict(tiles=cfg.tiles, interpret=cfg.interpret)
    dy = dy.astype(x.dtype)
    if a is None:
        dx = _gmm(dy, w, sched, transpose_w=True, out_dtype=x.dtype, name="gmm_dx", **kw)
        return dx, None, None, None, None, None
    lx = x if lora_x is None else lora_x
    # dt = s · dy·B[g]: the cotangent of x'·A[g]ᵀ, already scaled, rounded to x's dtype.
    dt = _gmm(
        dy, b, sched, transpose_w=True, out_dtype=x.dtype, alpha=cfg.lora_scale, name="gmm_dt", **kw
    )
    if lora_x is None:
        dx = _gmm(
            dy, w, sched, transpose_w=True, out_dtype=x.dtype, epilogue=(dt, a), name="gmm_dx", **kw
        )
        d_lora_x = None
    else:
        dx = _gmm(dy, w, sched, transpose_w=True, out_dtype=x.dtype, name="gmm_dx", **kw)
        d_lora_x = _gmm(
            dt, a, sched, transpose_w=True, out_dtype=lora_x.dtype, name="gmm_dlora_x", **kw
        )
    da = _tgmm(dt, lx, sched, out_dtype=a.dtype, cdt=x.dtype, name="tgmm_da", **kw)
    db = _tgmm(dy, t, sched, out_dtype=b.dtype, cdt=x.dtype, name="tgmm_db", **kw)
    return dx, None, None, da, db, d_lora_x


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)
