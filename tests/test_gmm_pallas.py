"""The Pallas grouped matmul (k2jax/ops/gmm_pallas.py) against `grouped_matmul_reference`.

Runs the kernels in Pallas interpret mode on CPU: forward and gradients (dx, dA, dB, d lora_x)
for dense fp32 / bf16 and INT4 weights, with and without LoRA and a separate LoRA input. Each
configuration is compiled once and run on two group layouts: uneven and empty groups with a group
of one row, one spanning three row tiles and padding rows past sum(group_sizes); and groups that
fill all M rows with boundaries on and off the tile grid. M is not a multiple of the row tile,
N not a multiple of the column tile, and the LoRA rank is below the kernel's minimum of 16. The
oracle is the reference evaluated in fp32 on the same (bf16-valued) inputs, so a bf16 result is
held to its own rounding only.

Interpret mode fills every output with NaN before the kernel runs, so an element that no program
writes comes back as NaN; `test_unwritten_rows_are_caught` shows that this check is live.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import rel_err

from k2jax.ops import gmm_pallas, grouped_matmul
from k2jax.ops.gmm_pallas import Tiles, grouped_matmul_pallas, make_schedule, num_work_items
from k2jax.ops.grouped_matmul import GroupedLora, grouped_matmul_reference
from k2jax.quant import Int4Weight, int4_numpy

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
# Interpret mode turns each kernel into an XLA loop that takes ~1 s to compile at full
# optimisation; these tiny problems run in milliseconds either way.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def _inputs(seed, dtype, weights, lora, separate_lora_x):
    """Fresh random numpy-made inputs (no eager XLA ops to compile): x, w, lora, lora_x, dy."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]

    def normal(*shape, scale=1.0):
        return scale * rng.standard_normal(shape, dtype=np.float32)

    x = jnp.asarray(normal(M, K).astype(dt))
    if weights == "int4":
        q = int4_numpy(rng.integers(-8, 8, size=(G, N, K)))
        s = rng.uniform(0.02, 0.06, size=(G, N, K // 32)).astype(ml_dtypes.bfloat16)
        w = Int4Weight(jnp.asarray(q), jnp.asarray(s))
    else:
        w = jnp.asarray(normal(G, N, K, scale=0.2).astype(dt))
    # LoRA factors stay fp32 while x may be bf16: gradients must come back in their own dtype.
    lo = GroupedLora(
        jnp.asarray(normal(G, R, K, scale=0.2)), jnp.asarray(normal(G, N, R, scale=0.2)), 0.5
    )
    lx = jnp.asarray(normal(M, K).astype(dt)) if separate_lora_x else None
    dy = jnp.asarray(normal(M, N).astype(dt))
    return x, w, lo if lora else None, lx, dy


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
    x, w, *_ = _inputs(0, "float32", "dense", False, False)
    sizes = LAYOUTS["uneven"]
    y = np.asarray(jax.jit(_pallas, compiler_options=FAST_COMPILE)(x, w, jnp.asarray(sizes)))
    assert np.all(np.isfinite(y[: sum(sizes)])) and np.all(np.isnan(y[sum(sizes) :]))


def test_dispatch(monkeypatch):
    """impl="pallas" reaches the kernel (default Hopper tiles, larger than this problem: the
    row, column and K tiles are all partly past the arrays); impl="auto" on CPU stays on XLA."""
    x, w, lo, _, _ = _inputs(1, "float32", "int4", True, False)
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


# Kimi-K2 expert shapes: 384 experts, 32k routed rows, gate|up 7168 → 4096 with the fused rank-2·16
# adapter, down 2048 → 7168.
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize(
    "weights,K_,N_,lora,separate_lora_x,kernels",
    [("int4", 7168, 4096, True, True, 7), ("bf16", 2048, 7168, True, False, 6)],
)
def test_lowers_to_triton_for_h100(weights, K_, N_, lora, separate_lora_x, kernels):
    """Forward and backward lower to Triton IR (Pallas' own checks: power-of-two tensors, the
    supported primitives) at full size; no GPU needed, the target is an abstract H100."""
    E, M_, r = 384, 32768, 32
    S = jax.ShapeDtypeStruct
    x, dy, gs = S((M_, K_), jnp.bfloat16), S((M_, N_), jnp.bfloat16), S((E,), jnp.int32)
    if weights == "int4":
        w = Int4Weight(S((E, N_, K_), jnp.int4), S((E, N_, K_ // 32), jnp.bfloat16))
    else:
        w = S((E, N_, K_), jnp.bfloat16)
    lo = GroupedLora(S((E, r, K_), jnp.float32), S((E, N_, r), jnp.float32), 2.0) if lora else None
    lx = S((M_, K_), jnp.bfloat16) if separate_lora_x else None

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
# epilogue), d lora_x, both tgmm reductions, and the no-LoRA backward.
@pytest.mark.parametrize(
    "dtype,weights,lora,separate_lora_x",
    [
        ("float32", "int4", True, False),
        ("float32", "dense", True, True),
        ("bfloat16", "int4", True, True),
        ("bfloat16", "dense", False, False),
    ],
    ids=["f32-int4-lora", "f32-dense-lora_x", "bf16-int4-lora_x", "bf16-dense"],
)
def test_matches_reference(dtype, weights, lora, separate_lora_x):
    x, w, lo, lx, dy = _inputs(3, dtype, weights, lora, separate_lora_x)
    run = jax.jit(lambda *a: _value_and_grads(_pallas, *a), compiler_options=FAST_COMPILE)
    oracle = jax.jit(lambda *a: _value_and_grads(grouped_matmul_reference, *a))
    for layout, sizes in LAYOUTS.items():
        gs = jnp.asarray(sizes, jnp.int32)
        y, (dx, dw, dlora, dlx) = run(x, w, gs, lo, lx, dy)
        want_y, (want_dx, _, want_dlora, want_dlx) = oracle(
            *_to_f32((x, w)), gs, *_to_f32((lo, lx, dy))
        )
        got, want = {"y": y, "dx": dx}, {"y": want_y, "dx": want_dx}
        if lora:
            got |= {"da": dlora.a, "db": dlora.b}
            want |= {"da": want_dlora.a, "db": want_dlora.b}
            assert dlora.a.dtype == lo.a.dtype and dlora.b.dtype == lo.b.dtype
        if separate_lora_x:
            got["dlora_x"], want["dlora_x"] = dlx, want_dlx
            assert dlx.dtype == lx.dtype
        assert y.dtype == x.dtype and dx.dtype == x.dtype
        total = sum(sizes)
        for name, v in got.items():
            v = np.asarray(v, np.float32)
            assert np.all(np.isfinite(v)), f"{layout} {name}: non-finite (unwritten or NaN)"
            err = rel_err(v, want[name])
            assert err <= TOL[dtype], f"{layout} {name}: rel err {err:.2e} > {TOL[dtype]:.0e}"
            if name in ("y", "dx", "dlora_x"):
                assert np.all(v[total:] == 0), f"{layout} {name}: rows past the groups not zero"
        # W is frozen: its cotangent is a (materialised) symbolic zero.
        for leaf in jax.tree.leaves(dw):
            assert leaf.dtype == jax.dtypes.float0 or not np.any(np.asarray(leaf))
