"""A dropless grouped matmul in Pallas for the Triton (GPU) backend, INT4-aware, LoRA fused.

    y[m] = x[m] · W[g(m)]ᵀ  (+ s · (x'[m] · A[g(m)]ᵀ) · B[g(m)]ᵀ)      rows sorted by group g(m)

(with LoRA in column blocks, one such term per block of output columns, each its own adapter and
input: "LoRA" below)

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

The row tile
------------
A group of s rows costs ceil(s/bm) row tiles: ceil(s/bm)·bm rows of MMA work, and ceil(s/bm)
loads (and, for INT4, dequantisations) of every weight tile of that expert, since each program
dequantises its own copy. Small tiles cut the first cost and multiply the second. With s̄ = M/G
rows per group on average (static: from x's shape and the number of groups) the kernel takes the
smallest of 32, 64, 128 rows that holds an average group (`row_tile`), so a typical group is one
tile:
  * E=48, ≈5.5k rows per expert (8-way expert parallelism): 128; partial-tile waste ≈1%.
  * E=384, 32k routed rows (≈85 ± 9 per expert): 128, 1.5x the useful MMA rows. bm=64 wastes the
    same (85 rows take two 64-row tiles) and dequantises every weight tile twice; bm=32 cuts the
    MMA waste to 1.13x but dequantises each weight tile three times and, below 64 rows, Triton
    falls back from Hopper's wgmma (64 rows per warpgroup) to mma.sync. With the dequantisation below costing about 24
    rows of MMA per weight tile (from GPU_NOTES.md's 493 vs 320 TFLOP/s, reduced 3x), a group
    costs 152 row-equivalents at bm=128 and ≈230 at bm=32 (prediction, assuming mma.sync at 60%).
  * fewer rows per expert (E=384 at 16k routed rows: s̄ ≈ 43): 64; at s̄ ≤ 32: 32.
M counts every row of x, padding rows too, so a caller that pads heavily gets a larger tile than
its groups need (the safe direction). `Tiles(bm=...)` overrides the choice.

INT4 weights
------------
An `Int4Weight` is passed as its two arrays, `jnp.int4` values [G, N, K] and bf16 scales
[G, N, K/32]. The values are viewed as [G, N, K/bk, bk] (a bitcast) so the K tile is a static
slice: only then does the Triton lowering load the int4 tile as packed bytes and unpack it with a
shift and a join, instead of one byte load per nibble. Per contraction step a program does:

                        gathering a scale per element         this kernel
    x tile [bm, bk]     16 KiB bf16, vector loads             same
    int4 tile [bn, bk]  4 KiB, one 16-byte load per thread    same
    scales              bn·bk = 8192 scalar bf16 loads, each  one [bn, bk/32] = [128, 2] tile
                        with its own address (k // 32)        (256 values), broadcast over
                                                              each 32 columns in registers
    per weight element  sign-extend, int→fp32, scale          AND/XOR, bf16 −, bf16 ×
                        bf16→fp32, fp32 ×, fp32→bf16          (no conversion instruction)

(numbers for bm = bn = 128, bk = 64; the dx kernel reads the transposed [bk, bn] tile the same
way, its scale tile is [bk, bn/32].) The conversion is exact and needs no int→float instruction:
a nibble n holds q ∈ [−8, 7] in two's complement, n ^ 8 = q + 8 ∈ [0, 15], and the bf16 bit
pattern 0x4300 | m is 128 + m for m < 16 (exponent 2⁷, m in the low mantissa bits), so
bitcast(n ^ 0x4308) − 136 = q exactly. q·scale is then one bf16 multiply: q has ≤ 4 significant
bits and the scale 8, so the exact product fits fp32 and a correctly rounded bf16 multiply
(`mul.rn.bf16` on sm_90, or fp32 and one rounding) equals `k2jax.quant.dequantize`'s
fp32-then-round, bit for bit. For any other pair of scale and compute dtypes the product is
formed in fp32 and rounded once, as `dequantize` does.

Predicted effect (not measured): GPU_NOTES.md's naive kernel of the old form ran at 320 TFLOP/s
for [4096×7168]·[7168×2048], against 493 for the same tiling in bf16, i.e. ≈0.30 µs of
dequantisation per 128×128×64 step on top of ≈0.56 µs of MMA and loads. The old per-step work was
bound by the two conversions (1.5 per element at 16 per clock per SM: ≈770 clocks, more than the
step's MMA at 810 TFLOP/s) and the 8192 gathered scale loads; the new work is ≈3 integer/bf16 ops
per element on the 64–128 per clock pipes and 256 scale loads. If the dequantisation costs a third
of what it did, that benchmark predicts ≈420 TFLOP/s (range 380–450), and the K2 expert GEMMs
gain the same factor before their tile waste. bench_gmm.py measures it.

32-bit offsets and stacks above 2 GiB
-------------------------------------
Pallas' Triton lowering (`_compute_offsets_from_indices` in jax/_src/pallas/triton/lowering.py of
jax 0.12; older releases have the same rule) computes every element offset of a load or store in i32
unless the operand is larger than 2³² bytes, and Triton turns `tt.addptr` into an LLVM GEP, which
sign-extends an i32 offset. So an operand of p-byte elements is safe iff it is > 2³² bytes
(i64 offsets) or its offsets stay < 2³¹ elements. For p ≥ 2 that always holds (≤ 2³² bytes means
≤ 2³¹ elements): bf16/fp32 x, y, LoRA factors, scales and schedules are safe at any size (x of
262k rows × 7168 bf16 is 3.8 GB: i32, < 2³¹ elements). The int4 tile is loaded as *bytes* (the
uint8 view above), so an INT4 values stack between 2³¹ and 2³² bytes is at risk: K2's down
projection, 384 × 7168 × 2048 codes = 2.82 GB, addresses expert g at byte g·7.34 MB, and from
expert 292 on the offsets wrap and read wrong memory (the Triton IR shows
`tt.addptr … tensor<128x32xi32>` on that `!tt.ptr<i8>`). The gate|up stack (5.6 GB) gets i64
offsets; under 8-way expert parallelism (48 experts, ≤ 0.7 GB) every stack is small.

Such a stack is split into expert windows that each span < 2³¹ bytes (`expert_windows`): the
first window is the array itself (no copy; its expert index is clamped to the window, so its
offsets are < 2³¹ by construction), each later window an XLA slice of the remaining experts (K2
down: experts 292–383, a 0.68 GB copy, ≈0.45 ms of HBM traffic per kernel call at ≈3 TB/s,
about +13% on that call; prediction). Each program loads from the window that holds its expert,
with the others' loads masked off. tests/test_gmm_offsets.py checks the property on the Triton
IR at K2 shapes: every i32 `tt.addptr` either addresses an operand of < 2³¹ elements or has an
offset whose interval, derived from the IR alone, stays below 2³¹.

Rejected: viewing the int4 values as int32 words (elements shrink 8x) or as uint8 — XLA expands a
`bitcast_convert` between different widths into slices and shifts (BitcastDtypesExpander, in the
GPU pipeline too), i.e. a full 2.82 GB copy per call; slicing every window (the same full copy);
reading the high experts through Pallas' per-nibble int4 path (which does use i64 offsets, from
the nibble count) at 8192 byte loads per tile; patching jax's lowering. Storing the checkpoint's
own int32 words in `Int4Weight` would make every operand safe with no window and no copy.

LoRA
----
t = s · x'·A[g]ᵀ [M, r] is computed by the same kernel as its own small call (N = r), rounded to
the dtype of x' as the reference does, and the rank-r expansion t·B[g]ᵀ is fused into the main
kernel's epilogue (one [bm, r]·[r, bn] dot per output tile). Computing t inside the main kernel
instead would redo it for every one of the N/bn column tiles (+r/bn ≈ 12% MMA work for rank 16
at bn=128) and would re-read x' per column tile when x' ≠ x; the separate call reads x' once and
t is needed by the backward pass anyway.

Column blocks (grouped_matmul.py: k adapters, adapter b on the output columns
[b·nb, (b+1)·nb), nb = N/k, each with its own input x_b; the experts' gate and up on gate|up).
Each adapter gets its own small call, t_b = s_b · x_b·A_b[g]ᵀ [M, r_b], and the main kernel takes
every (t_b, B_b) pair as separate operands, B_b [G, nb, r_b] as stored: nothing is concatenated
and there are no zero blocks. Column tiles are cut per block, as row tiles are cut per group:
tile j of block b covers columns b·nb + [j·bn, min((j+1)·bn, nb)), so no tile straddles two
adapters (at K2's nb = 2048, bn = 128 these are exactly the tiles of k = 1; an nb that is not a
multiple of bn ends each block in a masked partial tile). The epilogue is a `lax.switch` on the
tile's block (in Triton an scf.if chain, once per program after the K loop) whose branch b does
adapter b's one [bm, r_b]·[r_b, bn] dot, so each tile costs what it would with its adapter alone.
Rejected: the former single adapter A = [A_0; A_1], block-diagonal B [G, N, 2r] (half of B zeros,
rebuilt and differentiated every call, and one input for both adapters, so no per-adapter LoRA
dropout); concatenating the B_b along N (a copy of every B per call, and dB would come back
concatenated, a second copy); tiles straddling blocks with a masked epilogue for each (dots on
zeros, and block-local offsets below zero). Cost (prediction): adapters that read the same x (no
dropout) each read it in their own LoRA-A call and dA reduction, ≈0.15 ms per extra read of K2's
32k × 7168 bf16 rows at ≈3 TB/s, ≈2% of the ≈7.7 ms gate|up GEMM (GPU_NOTES.md); with dropout
the inputs differ and those reads are needed anyway.

Backward (`jax.custom_vjp`)
---------------------------
Per adapter b (one, or one per column block; dy_b = dy's columns of block b, read in place
through a column offset, never sliced out):
    dt_b = s_b · dy_b·B_b[g]            [M, r]   kernel with the weight transposed (N = r)
    dx   = dy·W[g] (+ Σ_b dt_b·A_b[g])  [M, K]   kernel with W transposed, INT4-aware, one fused
                                                  epilogue term per adapter whose input is x
    dx'  = Σ_b dt_b·A_b[g]              [M, K]   one kernel per distinct separate input, summing
                                                  the adapters that read it (the first as the
                                                  main loop, the others fused)
    dA_b[g] = dt_b,gᵀ · x_b,g,  dB_b[g] = dy_b,gᵀ · t_b,g
                                                  a "tgmm" kernel: one program per (group, output
                                                  tile) loops over the group's rows; never a
                                                  dense [G, M, ·] expansion
With column blocks the per-adapter kernels are named `…_block{b}` (gmm_lora_a_block1, …).
With `base_dx=False` (CE-LoRA, k2jax/ops/ce_backward.py) dx leaves out dy·W[g]: it is then the
dx' form over the adapters that read x (kernel `gmm_dx_lora`), or zeros when none does.
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
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from k2jax.ops.pallas_tiles import MIN_BLOCK, block_size, mask2d, masked_load, masked_store
from k2jax.quant import Int4Weight

# Row tiles `row_tile` chooses from (module docstring "The row tile").
_ROW_TILES = (32, 64, 128)
# Pallas' Triton lowering uses 64-bit element offsets only for operands of more bytes than this;
# below it, offsets are i32 and sign-extended, so they must stay < 2**31 elements (module
# docstring "32-bit offsets and stacks above 2 GiB").
_OFFSETS_I64_ABOVE = 2**32
_OFFSETS_I32_LIMIT = 2**31


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes and Triton launch parameters; powers of two. The defaults are Hopper starting
    points, to be tuned with benchmarks/bench_gmm.py.

    bm: rows per work item (None: `row_tile` picks it from the rows per group); bn: output
    columns per program; bk: contraction step (rows per step in the tgmm kernel); group_m: work
    items per L2 band of the program order.
    """

    bm: int | None = None
    bn: int = 128
    bk: int = 64
    group_m: int = 8
    num_warps: int = 8  # 4 spills the 128×128 fp32 accumulator (module docstring)
    num_stages: int = 3

    def __post_init__(self):
        for name in ("bm", "bn", "bk"):
            v = getattr(self, name)
            if v is not None and (v < MIN_BLOCK or v & (v - 1)):
                raise ValueError(f"Tiles.{name}={v} must be a power of two ≥ {MIN_BLOCK}")


DEFAULT_TILES = Tiles()


def row_tile(num_rows: int, num_groups: int) -> int:
    """The smallest of 32, 64, 128 rows that holds an average group (module docstring)."""
    mean = pl.cdiv(num_rows, max(num_groups, 1))
    return next((bm for bm in _ROW_TILES if bm >= mean), _ROW_TILES[-1])


def _compiler_params(tiles: Tiles):
    # `CompilerParams` in jax ≥ 0.7 (0.11.2 on the GPU machine, 0.12 in CI); older releases named
    # it `TritonCompilerParams`. Interpret mode ignores it.
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    return None if cls is None else cls(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


# --------------------------------------------------------------------------------------------
# 32-bit offsets
# --------------------------------------------------------------------------------------------


def expert_windows(num_experts: int, expert_bytes: int, slack_bytes: int) -> tuple[int, ...]:
    """Boundaries [0, …, G] of expert windows whose byte offsets stay < 2³¹ (module docstring).

    One window when the stack is ≤ 2³¹ bytes (i32 offsets suffice) or > 2³² bytes (Pallas uses
    i64). Otherwise windows of as many experts as fit in 2³¹ − slack bytes; the slack covers the
    rows a masked tile overhangs past the window's last expert.
    """
    total = num_experts * expert_bytes
    if total <= _OFFSETS_I32_LIMIT or total > _OFFSETS_I64_ABOVE:
        return (0, num_experts)
    per = (_OFFSETS_I32_LIMIT - slack_bytes) // expert_bytes
    if per < 1:
        raise ValueError(f"one INT4 expert of {expert_bytes} bytes exceeds 2**31-byte offsets")
    return (*range(0, num_experts, per), num_experts)


def _check_offsets(name: str, operands) -> None:
    """Raises unless every operand (label, shape, dtype, reachable bytes or None for all) of a
    kernel is addressed with i64 offsets or within 2³¹ elements (module docstring)."""
    for label, shape, dtype, reachable in operands:
        dtype = jnp.dtype(dtype)
        int4 = dtype in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))
        pointee = 1 if int4 else dtype.itemsize  # int4 codes are addressed as packed bytes
        nbytes = pl.cdiv(math.prod(shape), 2) if int4 else math.prod(shape) * pointee
        if nbytes > _OFFSETS_I64_ABOVE:
            continue
        if (nbytes if reachable is None else reachable) > _OFFSETS_I32_LIMIT * pointee:
            raise ValueError(
                f"{name}: operand {label} {tuple(shape)} {dtype.name} spans "
                f"{nbytes} bytes; the Triton lowering addresses it with 32-bit offsets, which "
                f"wrap past 2**31 elements of {pointee} byte(s)"
            )


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


@dataclasses.dataclass(frozen=True)
class _Weight:
    """How a kernel reads one stored weight stack [G, D1, D2] (static; D2 is INT4's K axis).

    quant_group: 0 for a dense array, else the INT4 group along D2; windows: for INT4, the expert
    range [lo, hi) of each values operand (`expert_windows`).
    """

    quant_group: int = 0
    windows: tuple[tuple[int, int], ...] = ()


_DENSE = _Weight()


def dequantize_codes(codes, scales, cdt):
    """q · scale in dtype `cdt` for int4 codes q given as their low 4 bits (int16), exactly as
    `k2jax.quant.dequantize` rounds it, without an int→float conversion (module docstring)."""
    # n ^ 8 = q + 8 ∈ [0, 15]; bf16 0x4300 | m = 128 + m; so bitcast(n ^ 0x4308) − 136 = q.
    q = lax.bitcast_convert_type(codes ^ 0x4308, jnp.bfloat16) - 136
    if jnp.dtype(cdt) == jnp.bfloat16 and scales.dtype == jnp.bfloat16:
        return q * scales  # the exact product fits fp32, so one bf16 rounding = dequantize's
    return (q.astype(jnp.float32) * scales.astype(jnp.float32)).astype(cdt)


def _load_weight_tile(w_refs, wt: _Weight, g, r0, nr, c0, nc, row_end, col_end, cdt):
    """Tile [nr, nc] at (r0, c0) of stack g of a stored weight, in dtype `cdt`; rows ≥ row_end
    and columns ≥ col_end read as zeros (None: no mask).

    w_refs is (dense [G, D1, D2],) or (int4 values windows [Gw, D1, D2 // nc, nc]..., scales
    [G, D1, D2 // quant_group]), cut by the caller into K tiles of nc (`_gmm`: nc divides K, so
    INT4 tiles need no column mask). INT4 tiles are dequantised here (`dequantize_codes`).
    """
    rows = r0 + jnp.arange(nr, dtype=jnp.int32)
    row_ok = None if row_end is None else rows < row_end
    if not wt.quant_group:
        cols = c0 + jnp.arange(nc, dtype=jnp.int32)
        mask = mask2d(row_ok, None if col_end is None else cols < col_end, (nr, nc))
        return masked_load(w_refs[0].at[g, pl.ds(r0, nr), pl.ds(c0, nc)], mask).astype(cdt)
    assert col_end is None, "INT4 K tiles divide K"
    *values_refs, scales_ref = w_refs
    k_tile = lax.div(c0, nc)
    codes = None
    for values_ref, (lo, hi) in zip(values_refs, wt.windows, strict=True):
        # The K tile is picked by a scalar index and read as the static slice [0, nc): only then
        # does the Triton lowering load int4 as packed bytes and split the nibbles with one
        # shift (its "contiguous int4" path). The mask must stay [nr, 1] because that load is
        # shaped [nr, nc / 2] bytes. The clamp keeps every offset inside the window even where
        # the load is masked off; a program whose expert lies in another window reads zeros.
        local = jnp.minimum(jnp.maximum(g - lo, 0), hi - lo - 1)
        mask = None if row_ok is None else row_ok[:, None]
        if len(wt.windows) > 1:
            inside = jnp.broadcast_to((g >= lo) & (g < hi), (nr, 1))
            mask = inside if mask is None else mask & inside
        q = masked_load(values_ref.at[local, pl.ds(r0, nr), k_tile, pl.ds(0, nc)], mask)
        part = q.astype(jnp.int16) & 0xF
        codes = part if codes is None else codes | part
    # One scale per (row, quant_group columns): a [nr, nc / quant_group] tile (one column when
    # the tile lies inside one group), broadcast over its columns in registers.
    qg = wt.quant_group
    per_tile = max(1, nc // qg)
    scales = masked_load(
        scales_ref.at[g, pl.ds(r0, nr), pl.ds(lax.div(c0, qg), per_tile)],
        mask2d(row_ok, None, (nr, per_tile)),
    )
    if per_tile == 1:
        scales = jnp.broadcast_to(scales, (nr, nc))
    else:
        scales = jnp.broadcast_to(scales[:, :, None], (nr, per_tile, nc // per_tile))
        scales = scales.reshape(nr, nc)
    return dequantize_codes(codes, scales, cdt)


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
    col_blocks: int  # the output columns are this many blocks of N / col_blocks, tiled apart
    groups: int  # G
    items: int  # W
    bm: int
    bn: int
    bk: int
    group_m: int
    transpose_w: bool  # False: w stored [G, N, C]; True: w stored [G, C, N]
    weight: _Weight
    n_w: int  # number of weight operands
    lhs_col0: int  # the contraction reads lhs columns [lhs_col0, lhs_col0 + C)
    # LoRA epilogue terms (rank, column block): each a power of two ≥ 16 (`_pad_rank`)
    epilogue: tuple[tuple[int, int], ...]
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
    # local < in_band · col_tiles, so the column tile is < col_tiles; the clamp (free) states that
    # in the IR, where tests/test_gmm_offsets.py bounds the weight offsets from it.
    col_tile = jnp.minimum(lax.div(local, in_band), col_tiles - 1)
    return first + lax.rem(local, in_band), col_tile


def _gmm_kernel(*refs, spec: _GmmSpec):
    item_group_ref, item_lo_ref, item_hi_ref, lhs_ref = refs[:4]
    w_refs = refs[4 : 4 + spec.n_w]
    epi_refs = refs[4 + spec.n_w : -1]  # (t, e) per epilogue term
    out_ref = refs[-1]
    bm, bn, bk, G = spec.bm, spec.bn, spec.bk, spec.groups
    nb = spec.out_cols // spec.col_blocks  # columns per block
    block_tiles = pl.cdiv(nb, bn)

    item, col_tile = _program_to_item(
        pl.program_id(0), spec.items, spec.col_blocks * block_tiles, spec.group_m
    )
    g = item_group_ref[item]
    lo = item_lo_ref[item]
    hi = item_hi_ref[item]
    # Column tiles are cut per block, like row tiles per group, so none straddles two blocks:
    # tile j of block blk covers columns blk·nb + [j·bn, min((j+1)·bn, nb)).
    if spec.col_blocks == 1:
        blk, j0 = 0, col_tile * bn
        n0 = j0
    else:
        blk, j0 = lax.div(col_tile, block_tiles), lax.rem(col_tile, block_tiles) * bn
        n0 = blk * nb + j0
    mask_n = nb % bn != 0
    row_ok = lo + jnp.arange(bm, dtype=jnp.int32) < hi
    col_ok = j0 + jnp.arange(bn, dtype=jnp.int32) < nb if mask_n else None
    store_mask = mask2d(row_ok, col_ok, (bm, bn))
    out_view = out_ref.at[pl.ds(lo, bm), pl.ds(n0, bn)]
    n_end = blk * nb + nb if mask_n else None  # the block's end, for the weight tile's mask
    mask_k = spec.contract % bk != 0

    def epilogue(block):
        """acc + Σ t[rows] · E[g] over the epilogue terms of one column block."""

        def add(acc):
            for (r, term_block), t_ref, e_ref in zip(
                spec.epilogue, epi_refs[::2], epi_refs[1::2], strict=True
            ):
                if term_block != block:
                    continue
                t = masked_load(t_ref.at[pl.ds(lo, bm), pl.ds(0, r)], mask2d(row_ok, None, (bm, r)))
                t = t.astype(spec.cdt)
                e_end = nb if mask_n else None  # E holds this block's columns only
                if spec.transpose_w:  # E [G, r, nb]
                    e = _load_weight_tile((e_ref,), _DENSE, g, 0, r, j0, bn, None, e_end, spec.cdt)
                    acc = acc + _dot(t, e, 1, 0, spec.precision)
                else:  # E [G, nb, r]
                    e = _load_weight_tile((e_ref,), _DENSE, g, j0, bn, 0, r, e_end, None, spec.cdt)
                    acc = acc + _dot(t, e, 1, 1, spec.precision)
            return acc

        return add

    @pl.when((g >= 0) & (g < G))
    def _compute():
        def step(i, acc):
            c0 = i * bk
            k_ok = c0 + jnp.arange(bk, dtype=jnp.int32) < spec.contract if mask_k else None
            x_view = lhs_ref.at[pl.ds(lo, bm), pl.ds(spec.lhs_col0 + c0, bk)]
            x = masked_load(x_view, mask2d(row_ok, k_ok, (bm, bk))).astype(spec.cdt)
            k_end = spec.contract if mask_k else None
            if spec.transpose_w:  # w [G, C, N]: tile [bk, bn]
                w = _load_weight_tile(
                    w_refs, spec.weight, g, c0, bk, n0, bn, k_end, n_end, spec.cdt
                )
                return acc + _dot(x, w, 1, 0, spec.precision)
            # w [G, N, C]: tile [bn, bk]
            w = _load_weight_tile(w_refs, spec.weight, g, n0, bn, c0, bk, n_end, k_end, spec.cdt)
            return acc + _dot(x, w, 1, 1, spec.precision)

        acc = jnp.zeros((bm, bn), jnp.float32)
        acc = lax.fori_loop(0, pl.cdiv(spec.contract, bk), step, acc)
        if spec.epilogue and spec.col_blocks == 1:
            acc = epilogue(0)(acc)
        elif spec.epilogue:  # one branch per block: the tile's own adapter, no zero blocks
            acc = lax.switch(blk, [epilogue(b) for b in range(spec.col_blocks)], acc)
        if spec.alpha != 1.0:
            acc = acc * spec.alpha
        masked_store(out_view, acc.astype(out_ref.dtype), store_mask)

    @pl.when(g == G)
    def _zero_padding_rows():
        masked_store(out_view, jnp.zeros((bm, bn), out_ref.dtype), store_mask)


def _weight_operands(w, k_tile: int, slack_rows: int):
    """The kernel operands of a weight, their reachable bytes (None: all), and its `_Weight`.

    INT4 values [G, D1, K] are passed as [G, D1, K / k_tile, k_tile] (`_load_weight_tile`): the
    same bytes in the same order, so XLA makes the reshape a bitcast. A stack between 2³¹ and 2³²
    bytes is cut into expert windows (`expert_windows`): the first is the array itself, the others
    are slices, i.e. copies of the experts past the first window.
    """
    if not isinstance(w, Int4Weight):
        return (w,), (None,), _DENSE
    G, d1, k = w.values.shape
    values = w.values.reshape(G, d1, k // k_tile, k_tile)
    expert_bytes = d1 * k // 2
    bounds = expert_windows(G, expert_bytes, slack_rows * k // 2)
    windows = tuple(itertools.pairwise(bounds))
    parts = tuple(values if lo == 0 else values[lo:hi] for lo, hi in windows)
    # The first window's expert index is clamped below hi (`_load_weight_tile`).
    reach = (None,) if len(windows) == 1 else ((windows[0][1] * d1 + slack_rows) * k // 2,)
    reach += (None,) * (len(parts) - 1)
    weight = _Weight(quant_group=w.group_size, windows=windows)
    return (*parts, w.scales), (*reach, None), weight


def _dividing_block(dim: int, cap: int) -> int:
    """The largest power-of-two block ≤ cap that divides dim (INT4 K tiles), at least 16."""
    b = block_size(dim, cap)
    while dim % b:
        b //= 2
    if b < MIN_BLOCK:
        raise ValueError(f"INT4 in_features {dim} must be a multiple of {MIN_BLOCK}")
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
    epilogue: tuple[tuple[jax.Array, jax.Array, int], ...] = (),
    col_blocks: int = 1,
    lhs_col0: int = 0,
    name: str = "gmm",
) -> jax.Array:
    """out[m] = alpha · (lhs[m, c:c+C] · op(w[g(m)]) + Σ_terms t[m] · op(e[g(m)])), op = ᵀ unless
    transpose_w, c = lhs_col0.

    lhs [M, ≥ c+C]; w [G, N, C] (or [G, C, N] when transpose_w), dense or Int4Weight. The N output
    columns are `col_blocks` blocks of nb = N / col_blocks; an epilogue term (t [M, r], e, b) adds
    to block b only, with e [G, nb, r] (or [G, r, nb]) holding that block's columns. Rows outside
    every group come out as zeros.
    """
    M = lhs.shape[0]
    G = w.shape[0]
    C, N = (w.shape[1], w.shape[2]) if transpose_w else (w.shape[2], w.shape[1])
    if N % col_blocks or lhs_col0 + C > lhs.shape[1]:
        raise ValueError(f"{name}: {N} columns in {col_blocks} blocks, lhs {lhs.shape}, C={C}")
    nb = N // col_blocks
    cdt = jnp.dtype(lhs.dtype)
    bn, bk = block_size(nb, tiles.bn), block_size(C, tiles.bk)
    if isinstance(w, Int4Weight):  # the tile along K (stored last) must divide K
        qg = w.group_size
        if qg & (qg - 1):
            raise ValueError(f"INT4 group size {qg} must be a power of two for the Pallas kernel")
        if transpose_w:  # K is the output columns; tiles of one block start at multiples of bn
            bn = _dividing_block(nb, tiles.bn)
        else:
            bk = _dividing_block(C, tiles.bk)
    w_arrays, w_reach, weight = _weight_operands(w, bn if transpose_w else bk, max(bn, bk))
    for t, e, block in epilogue:
        r = t.shape[1]
        e_shape = (G, r, nb) if transpose_w else (G, nb, r)
        if r < MIN_BLOCK or r & (r - 1) or e.shape != e_shape or not 0 <= block < col_blocks:
            raise ValueError(
                f"{name}: epilogue t {t.shape}, e {e.shape} for block {block}: want a rank that "
                f"is a power of two ≥ {MIN_BLOCK} and e {e_shape}"
            )
    spec = _GmmSpec(
        contract=C,
        out_cols=N,
        col_blocks=col_blocks,
        groups=G,
        items=sched.item_group.shape[0],
        bm=tiles.bm,
        bn=bn,
        bk=bk,
        group_m=tiles.group_m,
        transpose_w=transpose_w,
        weight=weight,
        n_w=len(w_arrays),
        lhs_col0=lhs_col0,
        epilogue=tuple((t.shape[1], block) for t, _, block in epilogue),
        alpha=float(alpha),
        cdt=cdt,
        precision=_precision(cdt),
    )
    epi_arrays = tuple(a for t, e, _ in epilogue for a in (t, e))
    inputs = (sched.item_group, sched.item_lo, sched.item_hi, lhs, *w_arrays, *epi_arrays)
    out_shape = jax.ShapeDtypeStruct((M, N), out_dtype)
    reach = (None,) * 4 + w_reach + (None,) * (len(epi_arrays) + 1)
    _check_offsets(
        name,
        [
            (i, a.shape, a.dtype, r)
            for i, (a, r) in enumerate(zip((*inputs, out_shape), reach, strict=True))
        ],
    )
    grid = spec.items * col_blocks * pl.cdiv(nb, spec.bn)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, spec=spec),
        out_shape=out_shape,
        grid=(grid,),
        compiler_params=_compiler_params(tiles),
        interpret=interpret,
        name=name,
    )(*inputs)


# --------------------------------------------------------------------------------------------
# The transposed grouped matmul (per-group reductions over rows) for the LoRA gradients
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TgmmSpec:
    p: int  # P: rows of each output matrix
    q: int  # Q: columns of each output matrix
    a_col0: int  # the P columns read from a start here
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
        a_view = a_ref.at[pl.ds(r0, bm), pl.ds(spec.a_col0 + p0, bp)]
        a = masked_load(a_view, mask2d(row_ok, p_ok, (bm, bp)))
        b = masked_load(b_ref.at[pl.ds(r0, bm), pl.ds(q0, bq)], mask2d(row_ok, q_ok, (bm, bq)))
        return acc + _dot(a.astype(spec.cdt), b.astype(spec.cdt), 0, 0, spec.precision)

    # An empty group runs no step and stores zeros: every element of the output is written.
    steps = lax.div(end - start + bm - 1, bm)
    acc = lax.fori_loop(0, steps, step, jnp.zeros((bp, bq), jnp.float32))
    masked_store(
        out_ref.at[g, pl.ds(p0, bp), pl.ds(q0, bq)],
        acc.astype(out_ref.dtype),
        mask2d(p_ok, q_ok, (bp, bq)),
    )


def _tgmm(
    a,
    b,
    sched: Schedule,
    *,
    out_dtype,
    cdt,
    tiles: Tiles,
    interpret: bool,
    name: str,
    a_cols: tuple[int, int] | None = None,
):
    """out[g] = a_gᵀ · b_g [G, P, Q] for a [M, P], b [M, Q]: Σ over the rows of group g.

    a_cols = (c, P): use a's columns [c, c + P) only (one column block of dy).
    """
    a_col0, P = a_cols or (0, a.shape[1])
    Q = b.shape[1]
    if a_col0 + P > a.shape[1]:
        raise ValueError(f"{name}: columns {a_cols} of a {a.shape}")
    G = sched.group_size.shape[0]
    cdt = jnp.dtype(cdt)
    spec = _TgmmSpec(
        p=P,
        q=Q,
        a_col0=a_col0,
        bp=block_size(P, tiles.bn),
        bq=block_size(Q, tiles.bn),
        bm=tiles.bk,
        cdt=cdt,
        precision=_precision(cdt),
    )
    inputs = (sched.group_start, sched.group_size, a, b)
    out_shape = jax.ShapeDtypeStruct((G, P, Q), out_dtype)
    _check_offsets(name, [(i, v.shape, v.dtype, None) for i, v in enumerate((*inputs, out_shape))])
    grid = G * pl.cdiv(P, spec.bp) * pl.cdiv(Q, spec.bq)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, spec=spec),
        out_shape=out_shape,
        grid=(grid,),
        compiler_params=_compiler_params(tiles),
        interpret=interpret,
        name=name,
    )(*inputs)


# --------------------------------------------------------------------------------------------
# Public entry point and its VJP
# --------------------------------------------------------------------------------------------


def lora_blocks(lora, lora_x) -> tuple[tuple, tuple]:
    """The column-block form of a (`lora`, `lora_x`) pair: (adapters, inputs), two k-tuples.

    lora: None, one GroupedLora (k = 1), or a sequence of k GroupedLora | None, adapter b covering
    output columns [b·N/k, (b+1)·N/k). lora_x: None (every adapter reads x), one array (every
    adapter reads it), or a sequence of k arrays | None (None: x). The input of a missing adapter
    is dropped (None), and no adapter at all gives ((), ()).
    """
    if lora is None:
        return (), ()
    adapters = tuple(lora) if isinstance(lora, (tuple, list)) else (lora,)
    if isinstance(lora_x, (tuple, list)):
        if len(lora_x) != len(adapters):
            raise ValueError(f"{len(lora_x)} LoRA inputs for {len(adapters)} column blocks")
        inputs = tuple(lora_x)
    else:
        inputs = (lora_x,) * len(adapters)
    if all(ad is None for ad in adapters):
        return (), ()
    return adapters, tuple(None if ad is None else v for ad, v in zip(adapters, inputs))


@dataclasses.dataclass(frozen=True)
class _Adapter:
    """One column block's adapter, static: its block, scale and input (0: x, i: lora_x[i−1])."""

    block: int
    scale: float
    source: int


@dataclasses.dataclass(frozen=True)
class _Config:
    out_dtype: jnp.dtype
    col_blocks: int
    adapters: tuple[_Adapter, ...]
    tiles: Tiles
    interpret: bool
    base_dx: bool = True  # False: x's cotangent leaves out dy·W[g] (CE-LoRA adds its own)

    def name(self, base: str, block: int) -> str:
        """Kernel names: one per adapter's block when there are column blocks."""
        return base if self.col_blocks == 1 else f"{base}_block{block}"


def grouped_matmul_pallas(
    x: jax.Array,
    w: jax.Array | Int4Weight,
    group_sizes: jax.Array,
    *,
    lora=None,
    lora_x=None,
    preferred_element_type=None,
    tiles: Tiles = DEFAULT_TILES,
    interpret: bool | None = None,
    base_dx: bool = True,
) -> jax.Array:
    """The Pallas grouped matmul; same contract as `grouped_matmul` (module docstring there).

    `lora` is a `GroupedLora` (a [G, r, K], b [G, N, r], scale) or a sequence of k of them (or
    None) for k column blocks, b [G, N/k, r]; `lora_x` their inputs (`lora_blocks`).
    `interpret=None` runs the kernels in Pallas interpret mode when JAX's default backend is the
    CPU, compiled through Triton otherwise. Gradients flow to x, the lora_x, and each adapter's a
    and b; W is treated as frozen. `base_dx=False` leaves dy·W[g] out of x's cotangent (only the
    LoRA terms of adapters reading x remain: `lora.backward = "ce"` adds its approximation).
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if tiles.bm is None:  # static: from x's rows and the number of groups
        tiles = dataclasses.replace(tiles, bm=row_tile(x.shape[0], group_sizes.shape[0]))
    loras, inputs = lora_blocks(lora, lora_x)
    adapters, a, b, sources = [], [], [], []
    for block, (lo, lx) in enumerate(zip(loras, inputs)):
        if lo is None:
            continue
        # Blocks that read the same array share its cotangent kernel (`_gmm_bwd`).
        source = 0 if lx is None else next((i for i, s in enumerate(sources, 1) if s is lx), 0)
        if lx is not None and not source:
            sources.append(lx)
            source = len(sources)
        adapters.append(_Adapter(block=block, scale=float(lo.scale), source=source))
        pa, pb = _pad_rank(lo.a, lo.b)
        a.append(pa)
        b.append(pb)
    cfg = _Config(
        out_dtype=jnp.dtype(preferred_element_type or x.dtype),
        col_blocks=max(len(loras), 1),
        adapters=tuple(adapters),
        tiles=tiles,
        interpret=bool(interpret),
        base_dx=base_dx,
    )
    sched = make_schedule(group_sizes, x.shape[0], tiles.bm)
    return _gmm_vjp(cfg, x, w, sched, tuple(a), tuple(b), tuple(sources))


def _pad_rank(a, b):
    """Zero-pads the LoRA rank to a power of two ≥ 16 (tl.dot's minimum; the kernels then need
    no rank masks). A no-op for the usual r = 16, 32, 64; autodiff slices the gradients back."""
    r = a.shape[1]
    rp = max(MIN_BLOCK, pl.next_power_of_2(r))
    if rp == r:
        return a, b
    return jnp.pad(a, ((0, 0), (0, rp - r), (0, 0))), jnp.pad(b, ((0, 0), (0, 0), (0, rp - r)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm_vjp(cfg, x, w, sched, a, b, lora_x):
    """a, b: one padded factor per adapter (`cfg.adapters`); lora_x: the distinct separate
    inputs."""
    return _gmm_fwd(cfg, x, w, sched, a, b, lora_x)[0]


def _gmm_fwd(cfg: _Config, x, w, sched, a, b, lora_x):
    kw = dict(tiles=cfg.tiles, interpret=cfg.interpret)
    sources = (x, *lora_x)
    # t_b = s_b · x_b·A_bᵀ, one small call per adapter on its own input, rounded to that input's
    # dtype like the reference (it is an MMA operand next).
    t = tuple(
        _gmm(
            sources[ad.source],
            a_b,
            sched,
            transpose_w=False,
            out_dtype=sources[ad.source].dtype,
            alpha=ad.scale,
            name=cfg.name("gmm_lora_a", ad.block),
            **kw,
        )
        for ad, a_b in zip(cfg.adapters, a, strict=True)
    )
    y = _gmm(
        x,
        w,
        sched,
        transpose_w=False,
        out_dtype=cfg.out_dtype,
        epilogue=tuple((t_b, b_b, ad.block) for ad, t_b, b_b in zip(cfg.adapters, t, b)),
        col_blocks=cfg.col_blocks,
        name="gmm",
        **kw,
    )
    return y, (x, w, sched, a, b, lora_x, t)


def _gmm_bwd(cfg: _Config, res, dy):
    x, w, sched, a, b, lora_x, t = res
    kw = dict(tiles=cfg.tiles, interpret=cfg.interpret)
    dy = dy.astype(x.dtype)
    sources = (x, *lora_x)
    nb = dy.shape[1] // cfg.col_blocks
    # dt_b = s_b · dy_b·B_b[g], dy_b = dy's columns of block b: the cotangent of x_b·A_b[g]ᵀ,
    # already scaled, rounded to x's dtype.
    dt = tuple(
        _gmm(
            dy,
            b_b,
            sched,
            transpose_w=True,
            out_dtype=x.dtype,
            alpha=ad.scale,
            lhs_col0=ad.block * nb,
            name=cfg.name("gmm_dt", ad.block),
            **kw,
        )
        for ad, b_b in zip(cfg.adapters, b, strict=True)
    )
    # d source = Σ over the adapters reading it of dt_b·A_b[g] (+ dy·W[g] for x): one kernel per
    # source, the first adapter's product as its main loop when it is not x, the rest fused.
    d_sources = []
    for i, src in enumerate(sources):
        terms = [(dt_b, a_b, 0) for ad, dt_b, a_b in zip(cfg.adapters, dt, a) if ad.source == i]
        if i == 0 and cfg.base_dx:
            lhs, w_i, name = dy, w, "gmm_dx"
        elif not terms:  # x without W's product and without an adapter reading it
            d_sources.append(jnp.zeros_like(src))
            continue
        else:  # the first adapter's product is the main loop
            (lhs, w_i, _), *terms = terms
            first = next(ad.block for ad in cfg.adapters if ad.source == i)
            name = cfg.name("gmm_dx_lora" if i == 0 else "gmm_dlora_x", first)
        d_sources.append(
            _gmm(
                lhs,
                w_i,
                sched,
                transpose_w=True,
                out_dtype=src.dtype,
                epilogue=tuple(terms),
                name=name,
                **kw,
            )
        )
    da = tuple(
        _tgmm(
            dt_b,
            sources[ad.source],
            sched,
            out_dtype=a_b.dtype,
            cdt=x.dtype,
            name=cfg.name("tgmm_da", ad.block),
            **kw,
        )
        for ad, dt_b, a_b in zip(cfg.adapters, dt, a)
    )
    db = tuple(
        _tgmm(
            dy,
            t_b,
            sched,
            out_dtype=b_b.dtype,
            cdt=x.dtype,
            a_cols=(ad.block * nb, nb),
            name=cfg.name("tgmm_db", ad.block),
            **kw,
        )
        for ad, t_b, b_b in zip(cfg.adapters, t, b)
    )
    return d_sources[0], None, None, da, db, tuple(d_sources[1:])


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)
