"""The Pallas grouped matmul (k2jax/ops/gmm_pallas.py) against `grouped_matmul_reference`.

Runs the kernels in Pallas interpret mode on CPU: forward and gradients (dx, dA, dB, d lora_x)
for dense fp32 / bf16 and INT4 weights, with and without LoRA and a separate LoRA input, with one
adapter and with two column-block adapters (the experts' gate and up adapters on the fused gate|up
weight: `test_gate_up_as_column_blocks`). Each
configuration is compiled once and run on two group layouts: uneven and empty groups with a group
of one row, one spanning three row tiles and padding rows past sum(group_sizes); and groups that
fill all M rows with boundaries on and off the tile grid. M is not a multiple of the row tile,
N not a multiple of the column tile, and the LoRA rank is below the kernel's minimum of 16. The
oracle is the reference evaluated in fp32 on the same (bf16-valued) inputs, so a bf16 result is
held to its own rounding only.

Interpret mode fills every output with NaN before the kernel runs, so an element that no program
writes comes back as NaN; `test_unwritten_rows_are_caught` shows that this check is live.

INT4 stacks between 2**31 and 2**32 bytes are read through expert windows (gmm_pallas.py, "32-bit
offsets"); a tiny stack is forced through three windows here, and tests/test_gmm_offsets.py checks
the offsets themselves at K2 sizes. The conversion-free INT4 dequantisation is checked bit for bit
against `k2jax.quant.dequantize` for every code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import FAST_COMPILE, rel_err

from k2jax.ops import gmm_pallas, grouped_matmul
from k2jax.ops.gmm_pallas import (
    Tiles,
    dequantize_codes,
    expert_windows,
    grouped_matmul_pallas,
    make_schedule,
    num_work_items,
    row_tile,
)
from k2jax.ops.grouped_matmul import GroupedLora, grouped_matmul_reference
from k2jax.quant import Int4Weight, dequantize, int4_numpy

# Small tiles so that the tiny problems below still span several row, column and K tiles.
TILES = Tiles(bm=16, bn=16, bk=32, group_m=2)
M, K, N, R = 100, 128, 40, 3  # N % bn != 0; K: 4 K-steps and 4 INT4 scale groups; R < 16
LAYOUTS = {
    # Empty groups first and inside, a group of one row, one spanning 3 row tiles; 14 padding rows.
    "uneven": (0, 23, 1, 0, 37, 16, 9),
    # No padding rows: boundaries on and off the tile grid, the last group ends at row M.
    "full": (16, 0, 33, 3, 48, 0, 0),
}
G = 7
TOL = {"float32": 1e-5, "bfloat16": 1e-2}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


# LoRA forms. ranks: None (no LoRA), an int (one GroupedLora: b [G, N, r]) or a tuple (column
# blocks: b [G, N/k, r_b], None for a block without an adapter). lora_x: "x" (None), "one" (one
# array for every adapter: with blocks, one input shared by two adapters), "first" (block 0 its
# own input, the others x), "each" (every block its own).
SCALES = (0.5, 2.0, 0.25)


def _inputs(seed, dtype, weights, ranks, lora_x="x", n=N):
    """Fresh random numpy-made inputs (no eager XLA ops to compile): x, w, lora, lora_x, dy."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]

    def normal(*shape, scale=1.0):
        return scale * rng.standard_normal(shape, dtype=np.float32)

    x = jnp.asarray(normal(M, K).astype(dt))
    if weights == "int4":
        q = int4_numpy(rng.integers(-8, 8, size=(G, n, K)))
        s = rng.uniform(0.02, 0.06, size=(G, n, K // 32)).astype(ml_dtypes.bfloat16)
        w = Int4Weight(jnp.asarray(q), jnp.asarray(s))
    else:
        w = jnp.asarray(normal(G, n, K, scale=0.2).astype(dt))
    blocks = (ranks,) if isinstance(ranks, int) else ranks or ()
    nb = n // max(len(blocks), 1)
    # LoRA factors stay fp32 while x may be bf16: gradients must come back in their own dtype.
    adapters = tuple(
        None
        if r is None
        else GroupedLora(
            jnp.asarray(normal(G, r, K, scale=0.2)), jnp.asarray(normal(G, nb, r, scale=0.2)), s
        )
        for r, s in zip(blocks, SCALES)
    )
    own = [jnp.asarray(normal(M, K).astype(dt)) for _ in blocks]
    if lora_x == "x":
        lx = None
    elif lora_x == "one":
        lx = own[0]
    elif lora_x == "first":
        lx = (own[0], *(None,) * (len(blocks) - 1))
    else:
        assert lora_x == "each"
        lx = tuple(own)
    dy = jnp.asarray(normal(M, n).astype(dt))
    lora = adapters[0] if isinstance(ranks, int) else (adapters or None)
    return x, w, lora, lx, dy


def _value_and_grads(fn, x, w, gs, lora, lx, dy):
    """y and the cotangents of (x, w, lora, lora_x) for the output cotangent dy."""
    y, vjp = jax.vjp(lambda x, w, lora, lx: fn(x, w, gs, lora=lora, lora_x=lx), x, w, lora, lx)
    return y, vjp(dy)


def _pallas(*args, **kw):
    return grouped_matmul_pallas(*args, **kw, tiles=TILES, interpret=True)


def _to_f32(tree):
    return jax.tree.map(lambda v: v if v.dtype == jnp.int4 else v.astype(jnp.float32), tree)


def test_schedule_covers_every_row_once():
    rows, num_groups = 200, 12
    rng = np.random.default_rng(0)
    layouts = [
        (0, 23, 1, 0, 37, 16, 9, 0, 0, 0, 0, 0),
        (1,) * num_groups,  # every boundary inside a tile
        (0,) * num_groups,  # only padding rows
        (300,) + (0,) * (num_groups - 1),  # more rows than x has: clipped to M
        (16, 16, 32, 0, 64, 8, 8, 56, 0, 0, 0, 0),  # fills M exactly, mostly tile-aligned
    ] + [tuple(rng.integers(0, 30, size=num_groups)) for _ in range(10)]
    for bm in (16, 128):
        schedule = jax.jit(make_schedule, static_argnums=(1, 2))
        for sizes in layouts:
            s = jax.tree.map(np.asarray, schedule(jnp.asarray(sizes, jnp.int32), rows, bm))
            assert s.item_group.shape == (num_work_items(rows, num_groups, bm),)
            used = s.item_group >= 0
            n_used = used.sum()
            assert used[:n_used].all(), "unused work items must be a suffix"
            ends = np.minimum(np.cumsum(sizes), rows)
            starts = np.concatenate([[0], ends[:-1]])
            owner = np.full(rows, -1)
            for g, lo, hi in zip(s.item_group[used], s.item_lo[used], s.item_hi[used]):
                assert 0 <= lo < hi <= min(lo + bm, rows)
                assert np.all(owner[lo:hi] == -1), f"rows {lo}:{hi} covered twice, {sizes}"
                owner[lo:hi] = g
            want = np.repeat(np.arange(num_groups + 1), np.append(ends - starts, rows - ends[-1]))
            np.testing.assert_array_equal(owner, want, err_msg=str(sizes))
            # Each group's rows are cut into ceil(size / bm) items: no more work than padding.
            want_items = -(-np.append(ends - starts, rows - ends[-1]) // bm)
            np.testing.assert_array_equal(
                np.bincount(s.item_group[used], minlength=num_groups + 1), want_items
            )
            np.testing.assert_array_equal(s.group_start, starts)
            np.testing.assert_array_equal(s.group_size, ends - starts)


def test_unwritten_rows_are_caught(monkeypatch):
    """Without the zero-padding work items the rows past sum(group_sizes) stay NaN: the
    finiteness checks above would catch any element the kernel fails to write."""
    real = gmm_pallas.make_schedule

    def without_padding_items(group_sizes, num_rows, bm):
        s = real(group_sizes, num_rows, bm)
        padding = s.item_group == group_sizes.shape[0]
        return gmm_pallas.Schedule(
            jnp.where(padding, -1, s.item_group), s.item_lo, s.item_hi, s.group_start, s.group_size
        )

    monkeypatch.setattr(gmm_pallas, "make_schedule", without_padding_items)
    x, w, *_ = _inputs(0, "float32", "dense", None)
    sizes = LAYOUTS["uneven"]
    y = np.asarray(jax.jit(_pallas, compiler_options=FAST_COMPILE)(x, w, jnp.asarray(sizes)))
    assert np.all(np.isfinite(y[: sum(sizes)])) and np.all(np.isnan(y[sum(sizes) :]))


def test_dispatch(monkeypatch):
    """impl="pallas" reaches the kernel (default Hopper tiles, larger than this problem: the
    row, column and K tiles are all partly past the arrays); impl="auto" on CPU stays on XLA."""
    x, w, lo, _, _ = _inputs(1, "float32", "int4", R)
    gs = jnp.asarray(LAYOUTS["uneven"], jnp.int32)
    want = grouped_matmul_reference(x, w, gs, lora=lo)
    y = jax.jit(
        lambda x, w, gs, lo: grouped_matmul.grouped_matmul(x, w, gs, lora=lo, impl="pallas"),
        compiler_options=FAST_COMPILE,
    )(x, w, gs, lo)
    assert rel_err(y, want) <= 1e-5

    def fail(*args, **kwargs):
        raise AssertionError("impl='auto' must not pick the Pallas kernel on CPU")

    monkeypatch.setattr(grouped_matmul, "grouped_matmul_pallas", fail)
    assert rel_err(grouped_matmul.grouped_matmul(x, w, gs, lora=lo, impl="auto"), want) <= 1e-5


# Kimi-K2 expert shapes: 384 experts, 32k routed rows, gate|up 7168 → 4096 with a rank-32 adapter
# or the gate and up adapters (rank 16 each, own inputs) as column blocks, down 2048 → 7168.
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize(
    "weights,K_,N_,blocks,lora_x,kernels",
    [
        ("int4", 7168, 4096, 1, "one", 7),
        ("int4", 7168, 4096, 2, "each", 12),
        ("bf16", 2048, 7168, 1, "x", 6),
    ],
)
def test_lowers_to_triton_for_h100(weights, K_, N_, blocks, lora_x, kernels):
    """Forward and backward lower to Triton IR (Pallas' own checks: power-of-two tensors, the
    supported primitives) at full size; no GPU needed, the target is an abstract H100."""
    E, M_ = 384, 32768
    r = 32 // blocks
    S = jax.ShapeDtypeStruct
    x, dy, gs = S((M_, K_), jnp.bfloat16), S((M_, N_), jnp.bfloat16), S((E,), jnp.int32)
    if weights == "int4":
        w = Int4Weight(S((E, N_, K_), jnp.int4), S((E, N_, K_ // 32), jnp.bfloat16))
    else:
        w = S((E, N_, K_), jnp.bfloat16)
    lo = tuple(
        GroupedLora(S((E, r, K_), jnp.float32), S((E, N_ // blocks, r), jnp.float32), 2.0)
        for _ in range(blocks)
    )
    lx = {
        "x": None,
        "one": S((M_, K_), jnp.bfloat16),
        "each": tuple(S((M_, K_), jnp.bfloat16) for _ in range(blocks)),
    }[lora_x]
    if blocks == 1:
        (lo,) = lo

    def gpu_kernel(*args, **kw):
        return grouped_matmul_pallas(*args, **kw, interpret=False)

    h100 = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"
    )
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
    ):
        lowered = (
            jax.jit(lambda *a: _value_and_grads(gpu_kernel, *a))
            .trace(x, w, gs, lo, lx, dy)
            .lower(lowering_platforms=("cuda",))
        )
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == kernels


# Together these reach every kernel variant: forward dense / INT4 with and without the fused
# LoRA epilogue, the rank-r projections, dx with W transposed (dense / INT4, with and without the
# epilogue), d lora_x, both tgmm reductions, and the no-LoRA backward; then the column-block form
# (k = 2 adapters of ranks 3 and 16, scales 0.5 and 2): its epilogue picking the tile's adapter,
# dx with one or two fused terms, d lora_x per block or shared by two blocks (its kernel with the
# second adapter fused), a block without an adapter; blocks of N/2 = 20 columns, so each block
# ends in a partial column tile, and of 32 (whole tiles) for N = 64.
@pytest.mark.parametrize(
    "dtype,weights,ranks,lora_x,n",
    [
        ("float32", "int4", R, "x", N),
        ("float32", "dense", R, "one", N),
        ("bfloat16", "int4", R, "one", N),
        ("bfloat16", "dense", None, "x", N),
        ("float32", "int4", (R, 16), "x", N),
        ("float32", "dense", (R, 16), "first", N),
        ("bfloat16", "int4", (R, 16), "each", N),
        ("bfloat16", "dense", (R, None), "one", N),
        ("bfloat16", "int4", (16, R), "one", 64),
    ],
    ids=[
        "f32-int4-lora",
        "f32-dense-lora_x",
        "bf16-int4-lora_x",
        "bf16-dense",
        "f32-int4-blocks",
        "f32-dense-blocks-first_x",
        "bf16-int4-blocks-each_x",
        "bf16-dense-blocks-one_adapter",
        "bf16-int4-blocks-one_x-N64",
    ],
)
def test_matches_reference(dtype, weights, ranks, lora_x, n):
    _assert_matches_reference(dtype, weights, ranks, lora_x, n)


def test_expert_windows_match_reference(monkeypatch):
    """An INT4 stack read through three expert windows (the array itself for experts 0–2, slices
    for 3–5 and 6) gives the same forward and gradients; on a GPU that split happens for stacks
    between 2**31 and 2**32 bytes (K2's 384-expert down projection)."""
    calls = []

    def three_windows(num_experts, expert_bytes, slack_bytes):
        calls.append(num_experts)
        return (0, 3, 6, num_experts)

    monkeypatch.setattr(gmm_pallas, "expert_windows", three_windows)
    _assert_matches_reference("bfloat16", "int4", R, "one")
    assert calls and set(calls) == {G}  # the INT4 kernels did take the windows


def _assert_matches_reference(dtype, weights, ranks, lora_x, n=N):
    x, w, lo, lx, dy = _inputs(3, dtype, weights, ranks, lora_x, n)
    run = jax.jit(lambda *a: _value_and_grads(_pallas, *a), compiler_options=FAST_COMPILE)
    oracle = jax.jit(lambda *a: _value_and_grads(grouped_matmul_reference, *a))
    for layout, sizes in LAYOUTS.items():
        gs = jnp.asarray(sizes, jnp.int32)
        y, (dx, dw, dlora, dlx) = run(x, w, gs, lo, lx, dy)
        want_y, (want_dx, _, want_dlora, want_dlx) = oracle(
            *_to_f32((x, w)), gs, *_to_f32((lo, lx, dy))
        )
        # Named leaves: y, dx, every adapter's a and b cotangents, every separate input's.
        got = _named(y=y, dx=dx, dlora=dlora, dlora_x=dlx)
        want = _named(y=want_y, dx=want_dx, dlora=want_dlora, dlora_x=want_dlx)
        assert got.keys() == want.keys() == _named(y=y, dx=x, dlora=lo, dlora_x=lx).keys()
        for got_leaf, primal in zip(jax.tree.leaves((dlora, dlx)), jax.tree.leaves((lo, lx))):
            assert got_leaf.dtype == primal.dtype and got_leaf.shape == primal.shape
        assert y.dtype == x.dtype and dx.dtype == x.dtype
        total = sum(sizes)
        for name, v in got.items():
            v = np.asarray(v, np.float32)
            assert np.all(np.isfinite(v)), f"{layout} {name}: non-finite (unwritten or NaN)"
            err = rel_err(v, want[name])
            assert err <= TOL[dtype], f"{layout} {name}: rel err {err:.2e} > {TOL[dtype]:.0e}"
            if not name.startswith("dlora."):  # y, dx, d lora_x: rows
                assert np.all(v[total:] == 0), f"{layout} {name}: rows past the groups not zero"
        # W is frozen: its cotangent is a (materialised) symbolic zero.
        for leaf in jax.tree.leaves(dw):
            assert leaf.dtype == jax.dtypes.float0 or not np.any(np.asarray(leaf))


def _named(**trees):
    """{path: leaf} over the trees, e.g. 'dlora.[1].a' for the second adapter's A."""
    return {
        name + jax.tree_util.keystr(path, simple=True, separator="."): leaf
        for name, tree in trees.items()
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_gate_up_as_column_blocks():
    """The experts' call: the fused gate|up weight with the gate and up adapters as two column
    blocks, each on its own (dropped-out) input, through `grouped_matmul` with impl="xla" and
    "pallas" (default tiles), equals gate and up computed apart with the reference, forward and
    every gradient; and with both adapters on x."""
    F = N // 2
    x, w, (lora_gate, lora_up), (x_gate, x_up), dy = _inputs(5, "float32", "int4", (R, 16), "each")
    w_gate = Int4Weight(w.values[:, :F], w.scales[:, :F])
    w_up = Int4Weight(w.values[:, F:], w.scales[:, F:])
    gs = jnp.asarray(LAYOUTS["uneven"], jnp.int32)

    def fused(impl, x, lora_gate, lora_up, x_gate, x_up):
        return grouped_matmul.grouped_matmul(
            x, w, gs, lora=(lora_gate, lora_up), lora_x=(x_gate, x_up), impl=impl
        )

    def apart(x, lora_gate, lora_up, x_gate, x_up):
        gate = grouped_matmul_reference(x, w_gate, gs, lora=lora_gate, lora_x=x_gate)
        up = grouped_matmul_reference(x, w_up, gs, lora=lora_up, lora_x=x_up)
        return jnp.concatenate([gate, up], axis=1)

    for lora_x in ((x_gate, x_up), (None, None)):
        args = (x, lora_gate, lora_up, *lora_x)
        want, want_vjp = jax.vjp(apart, *args)
        want_grads = want_vjp(dy)
        for impl in ("xla", "pallas"):
            fn = jax.jit(functools.partial(fused, impl), compiler_options=FAST_COMPILE)
            got, vjp = jax.vjp(fn, *args)
            got_grads = vjp(dy)
            assert rel_err(got, want) <= 1e-5, impl
            named, want_named = _named(d=got_grads), _named(d=want_grads)
            assert named.keys() == want_named.keys()
            assert len(named) == 5 + 2 * (lora_x[0] is not None)  # dx, 2 × (dA, dB), d x_gate/up
            for name, v in named.items():
                assert rel_err(v, want_named[name]) <= 1e-5, (impl, name)


def test_int4_dequantisation_is_exact():
    """`dequantize_codes` (bf16 bit patterns instead of int→float conversions, scales broadcast
    per tile) equals `dequantize` bit for bit, for every code and scales over bf16's range."""
    rng = np.random.default_rng(0)
    n = 512
    exponents = rng.integers(-100, 100, size=(n, 1)).astype(np.float32)
    scales = (rng.uniform(-2, 2, size=(n, 1)) * 2.0**exponents).astype(ml_dtypes.bfloat16)
    codes = np.tile(np.arange(-8, 8), (n, 2))  # every code, in each row of one 32-group
    w = Int4Weight(jnp.asarray(int4_numpy(codes)), jnp.asarray(scales))
    for cdt in (jnp.bfloat16, jnp.float32, jnp.float16):
        want = np.asarray(dequantize(w, cdt))
        nibbles = w.values.astype(jnp.int16) & 0xF
        got = np.asarray(
            jax.jit(dequantize_codes, static_argnums=2)(
                nibbles, jnp.broadcast_to(w.scales, codes.shape), cdt
            )
        )
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=str(cdt))


def test_row_tile_follows_rows_per_group():
    assert row_tile(32768, 384) == 128  # K2 on one GPU: ≈85 rows per expert
    assert row_tile(262144, 48) == 128  # 8-way expert parallelism: ≈5.5k rows per expert
    assert row_tile(16384, 384) == 64  # ≈43
    assert row_tile(8192, 384) == 32  # ≈21
    assert row_tile(100, 7) == 32
    assert row_tile(0, 7) == 32


def test_expert_windows_at_k2_sizes():
    """Windows only for stacks between 2**31 and 2**32 bytes, each spanning < 2**31 bytes."""
    down, gate_up = 7168 * 2048 // 2, 4096 * 7168 // 2  # bytes per INT4 expert
    assert expert_windows(384, down, 128 * 1024) == (0, 292, 384)  # 2.82 GB
    assert expert_windows(384, gate_up, 128 * 3584) == (0, 384)  # 5.6 GB: 64-bit offsets
    assert expert_windows(192, gate_up, 128 * 3584) == (0, 146, 192)  # 2-way EP: 2.82 GB
    assert expert_windows(48, down, 128 * 1024) == (0, 48)  # 8-way EP: 0.35 GB
    assert 292 * down + 128 * 1024 <= 2**31 < 293 * down  # the first window is as large as fits
