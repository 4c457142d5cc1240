"""Times the Pallas grouped matmul (k2jax/ops/gmm_pallas.py) at Kimi-K2 expert shapes on one GPU.

    .venv/bin/python benchmarks/bench_gmm.py results/gmm.json [--tiles 128,128,64,8,3 ...]

For each case (experts E, routed rows M, projection K→N) it times the forward y = x·W[g]ᵀ and the
input gradient dx = dy·W[g] for
  pallas-bf16   grouped_matmul_pallas with bf16 weights
  pallas-int4   grouped_matmul_pallas with INT4 weights (group-32 scales, dequantised per tile)
  einsum-bf16   the padded baseline: rows gathered into [E, C, K] with C = max group size rounded
                up to 128 (so it drops nothing), one batched einsum (GPU_NOTES.md's baseline)
  einsum-int4   the same after dequantising the INT4 stack in XLA (what XLA alone would do)
TFLOP/s counts the useful work 2·M·K·N for every implementation, so the baseline's padding and
the kernel's partial tiles both count as waste. The gather into the padded layout is not timed.
Each case first checks that the kernel agrees with the baseline (relative error printed).

The input-gradient program of the kernel is `vjp(x ↦ y)(dy)` compiled on its own: XLA removes
the unused forward kernel (it has no side effects); `grad_kernels` in the JSON counts the Triton
calls left in that program to show it (1 expected).

GPU only; importing this module does nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.ops.gmm_pallas import Tiles, grouped_matmul_pallas, row_tile
from k2jax.quant import Int4Weight, dequantize

# (name, experts E, routed rows M, K, N): K2's gate|up (7168 → 2·2048) and down (2048 → 7168)
# projections at 32k routed rows over all 384 experts, and per GPU under 8-way expert
# parallelism (48 experts, 262k rows: 32k tokens × top-8).
CASES = (
    ("E384-gate_up", 384, 32768, 7168, 4096),
    ("E384-down", 384, 32768, 2048, 7168),
    ("E48-gate_up", 48, 262144, 7168, 4096),
    ("E48-down", 48, 262144, 2048, 7168),
)
IMPLS = ("pallas-bf16", "pallas-int4", "einsum-bf16", "einsum-int4")


def parse_tiles(spec: str) -> Tiles:
    """'bm,bn,bk,num_warps,num_stages[,group_m]' → Tiles."""
    v = [int(s) for s in spec.split(",")]
    if len(v) not in (5, 6):
        raise argparse.ArgumentTypeError(f"--tiles wants bm,bn,bk,warps,stages[,group_m]: {spec}")
    return Tiles(
        bm=v[0], bn=v[1], bk=v[2], num_warps=v[3], num_stages=v[4], group_m=v[5] if v[5:] else 8
    )


def _time(fn, *args, warmup: int, iters: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _make_inputs(E, M, K, N, seed=0):
    """x [M, K], dy [M, N] bf16, group sizes from uniform random top-k routing, bf16 and INT4 stacks.

    Weights are generated one expert at a time (lax.map) so no fp32/int32 temporary of the whole
    stack is ever live.
    """
    kx, kdy, kr, kw, kq, ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(kx, (M, K), jnp.bfloat16)
    dy = jax.random.normal(kdy, (M, N), jnp.bfloat16)
    expert = jax.random.randint(kr, (M,), 0, E)
    group_sizes = jnp.bincount(expert, length=E).astype(jnp.int32)
    w_bf16 = jax.jit(
        lambda k: jax.lax.map(
            lambda kk: 0.02 * jax.random.normal(kk, (N, K), jnp.bfloat16), jax.random.split(k, E)
        )
    )(kw)
    values = jax.jit(
        lambda k: jax.lax.map(
            lambda kk: jax.random.randint(kk, (N, K), -8, 8, jnp.int8).astype(jnp.int4),
            jax.random.split(k, E),
        )
    )(kq)
    scales = jax.random.uniform(ks, (E, N, K // 32), jnp.float32, 0.002, 0.006).astype(jnp.bfloat16)
    return x, dy, group_sizes, w_bf16, Int4Weight(values, scales)


def _padded_layout(group_sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Row index of x for each slot of the [E, C] padded layout (M for an empty slot)."""
    E = group_sizes.shape[0]
    M = int(group_sizes.sum())
    starts = np.concatenate([[0], np.cumsum(group_sizes)[:-1]])
    slot = np.arange(capacity)[None, :]
    return np.where(slot < group_sizes[:, None], starts[:, None] + slot, M).reshape(E * capacity)


def _rel_err(a, b) -> float:
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def _count_triton_calls(compiled) -> int:
    return compiled.as_text().count("__gpu$xla.gpu.triton")


def bench_case(name, E, M, K, N, tiles_list, *, warmup, iters, impls):
    x, dy, group_sizes, w_bf16, w_int4 = _make_inputs(E, M, K, N)
    gs_np = np.asarray(group_sizes)
    capacity = int(-(-gs_np.max() // 128) * 128)
    slots = jnp.asarray(_padded_layout(gs_np, capacity))
    # Padded operands for the baseline (the gather is not timed); an extra zero row for empty slots.
    x_pad = jnp.concatenate([x, jnp.zeros((1, K), x.dtype)])[slots].reshape(E, capacity, K)
    dy_pad = jnp.concatenate([dy, jnp.zeros((1, N), dy.dtype)])[slots].reshape(E, capacity, N)
    flops = 2.0 * M * K * N
    weights = {"bf16": w_bf16, "int4": w_int4}

    def unpad(y_pad):  # [E, C, ·] → [M, ·]
        flat = y_pad.reshape(E * capacity, -1)
        return jnp.zeros((M + 1, flat.shape[1]), flat.dtype).at[slots].set(flat)[:M]

    einsum_fwd = jax.jit(
        lambda xp, w: jnp.einsum(
            "eck,enk->ecn", xp, dequantize(w, jnp.bfloat16), preferred_element_type=jnp.bfloat16
        )
    )
    einsum_dx = jax.jit(
        lambda dyp, w: jnp.einsum(
            "ecn,enk->eck", dyp, dequantize(w, jnp.bfloat16), preferred_element_type=jnp.bfloat16
        )
    )

    rows = []
    want_y = {k: unpad(einsum_fwd(x_pad, w)) for k, w in weights.items()}
    want_dx = {k: unpad(einsum_dx(dy_pad, w)) for k, w in weights.items()}
    for impl in impls:
        kind, wname = impl.split("-")
        w = weights[wname]
        if kind == "einsum":
            fwd_s = _time(einsum_fwd, x_pad, w, warmup=warmup, iters=iters)
            dx_s = _time(einsum_dx, dy_pad, w, warmup=warmup, iters=iters)
            rows.append(
                dict(case=name, impl=impl, capacity=capacity, fwd_ms=fwd_s * 1e3, dx_ms=dx_s * 1e3)
            )
            continue
        for tiles in tiles_list:

            def f(x, w, gs, tiles=tiles):
                # interpret=None: Triton on a GPU; interpret mode for a CPU dry run (--shape).
                return grouped_matmul_pallas(x, w, gs, tiles=tiles)

            fwd = jax.jit(f)
            grad = jax.jit(lambda x, w, gs, dy, f=f: jax.vjp(lambda x: f(x, w, gs), x)[1](dy)[0])
            grad_compiled = grad.lower(x, w, group_sizes, dy).compile()
            err_y = _rel_err(fwd(x, w, group_sizes), want_y[wname])
            err_dx = _rel_err(grad_compiled(x, w, group_sizes, dy), want_dx[wname])
            fwd_s = _time(fwd, x, w, group_sizes, warmup=warmup, iters=iters)
            dx_s = _time(grad_compiled, x, w, group_sizes, dy, warmup=warmup, iters=iters)
            rows.append(
                dict(
                    case=name,
                    impl=impl,
                    # bm=None: the kernel picks the row tile from the rows per expert
                    tiles={**dataclasses.asdict(tiles), "bm": tiles.bm or row_tile(M, E)},
                    fwd_ms=fwd_s * 1e3,
                    dx_ms=dx_s * 1e3,
                    rel_err_fwd=err_y,
                    rel_err_dx=err_dx,
                    grad_kernels=_count_triton_calls(grad_compiled),
                )
            )
    for r in rows:
        r.update(E=E, M=M, K=K, N=N)
        r["fwd_tflops"] = flops / (r["fwd_ms"] * 1e-3) / 1e12
        r["dx_tflops"] = flops / (r["dx_ms"] * 1e-3) / 1e12
    return rows


def _print_table(rows):
    header = f"{'case':<14} {'impl':<12} {'tiles':<18} {'fwd ms':>8} {'TF/s':>6} "
    header += f"{'dx ms':>8} {'TF/s':>6} {'err fwd':>8} {'err dx':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        t = r.get("tiles")
        tiles = (
            f"{t['bm']}x{t['bn']}x{t['bk']} w{t['num_warps']}s{t['num_stages']}"
            if t
            else f"C={r['capacity']}"
        )
        err = (
            f"{r['rel_err_fwd']:>8.1e} {r['rel_err_dx']:>8.1e}" if "rel_err_fwd" in r else " " * 17
        )
        print(
            f"{r['case']:<14} {r['impl']:<12} {tiles:<18} {r['fwd_ms']:>8.3f} "
            f"{r['fwd_tflops']:>6.0f} {r['dx_ms']:>8.3f} {r['dx_tflops']:>6.0f} {err}"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="JSON file to write")
    p.add_argument(
        "--tiles",
        type=parse_tiles,
        action="append",
        help="bm,bn,bk,num_warps,num_stages[,group_m]; repeat to sweep (default: Tiles())",
    )
    p.add_argument("--cases", nargs="*", default=[c[0] for c in CASES], help="subset of cases")
    p.add_argument(
        "--shape",
        action="append",
        help="E,M,K,N: run this shape instead of the K2 cases (repeatable; tiny ones run on CPU)",
    )
    p.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    tiles_list = args.tiles or [Tiles()]
    cases = [c for c in CASES if c[0] in args.cases]
    if args.shape:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape]
        cases = [(f"E{e}-M{m}-{k}x{n}", e, m, k, n) for e, m, k, n in shapes]
    rows = []
    for name, E, M, K, N in cases:
        rows += bench_case(
            name, E, M, K, N, tiles_list, warmup=args.warmup, iters=args.iters, impls=args.impls
        )
        jax.clear_caches()  # each case's executables and buffers go before the next one's
    _print_table(rows)
    meta = dict(
        device=str(jax.devices()[0].device_kind),
        jax=jax.__version__,
        flops="useful: 2·M·K·N for every implementation",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
