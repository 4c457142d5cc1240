"""The grouped-matmul contract (k2jax/ops/grouped_matmul.py) for every `lora` / `lora_x` form.

The XLA reference (impl="xla", the oracle the Pallas kernel is tested against in
tests/test_gmm_pallas.py) is itself checked here against a plain per-group loop in float64 with
hand-written gradients: forward, dx, each adapter's dA and dB, each separate input's cotangent,
for one adapter and for column blocks (k = 2 and 3, a block without an adapter, inputs of their
own, one input shared by two adapters), with an empty group and padding rows. The "plan"
stand-in gives the reference's output and gradient shapes and dtypes in every form, with no
temporaries; malformed forms are refused before anything is traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

from k2jax.ops.grouped_matmul import GroupedLora, grouped_matmul
from k2jax.quant import Int4Weight

G, K, N = 5, 64, 24
SIZES = (4, 0, 7, 1, 3)
M = sum(SIZES) + 2  # two padding rows
SCALES = (0.5, 2.0, 0.25)

# name: (ranks, lora_x). ranks: an int (one GroupedLora, b [G, N, r]) or a tuple (column blocks,
# b [G, N/k, r], None: no adapter). lora_x: None (x), "own" (one array for every adapter), or per
# block "own" / None.
FORMS = {
    "one": (3, None),
    "one-lora_x": (3, "own"),
    "blocks": ((3, 5), None),
    "blocks-each_x": ((3, 5), ("own", "own")),
    "blocks-one_x": ((3, 5), "own"),  # one input shared by both adapters: cotangents add
    "blocks-first_x": ((3, 5), ("own", None)),
    "three-blocks-gap": ((3, None, 2), (None, "own", "own")),  # block 1: no adapter, input unused
}


def _form(name, rng, m=M, k=K, n=N):
    """(lora, lora_x) in the public form at size m, k, n; per block (adapter | None, input index:
    0 for x, i for own[i − 1]); and the separate inputs own."""
    ranks, lora_x = FORMS[name]
    blocks = (ranks,) if isinstance(ranks, int) else ranks
    nb = n // len(blocks)
    adapters = [
        None
        if r is None
        else GroupedLora(
            jnp.asarray(rng.standard_normal((G, r, k)), jnp.float32),
            jnp.asarray(rng.standard_normal((G, nb, r)), jnp.float32),
            scale,
        )
        for r, scale in zip(blocks, SCALES)
    ]

    def new_input():
        return jnp.asarray(rng.standard_normal((m, k)), jnp.float32)

    if lora_x is None:
        own, lx, sources = [], None, [0] * len(blocks)
    elif lora_x == "own":
        own = [new_input()]
        lx, sources = own[0], [1] * len(blocks)
    else:
        own = [new_input() if s else None for s in lora_x]
        lx = tuple(own)
        sources = [i + 1 if s else 0 for i, s in enumerate(lora_x)]
    lora = adapters[0] if isinstance(ranks, int) else tuple(adapters)
    return lora, lx, list(zip(adapters, sources)), own


def _oracle(x, w, blocks, own, dy):
    """y, and the cotangents of x, of each separate input and of each adapter's (a, b), from a
    loop over groups in float64 (padding rows: zeros)."""
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    x, w, dy = f64(x), f64(w), f64(dy)
    inputs = [x] + [None if v is None else f64(v) for v in own]
    nb = N // len(blocks)
    y = np.zeros((M, N))
    d_inputs = [None if v is None else np.zeros_like(v) for v in inputs]
    d_ab = [
        None if lo is None else (np.zeros(lo.a.shape), np.zeros(lo.b.shape)) for lo, _ in blocks
    ]
    start = 0
    for g, n in enumerate(SIZES):
        rows = slice(start, start + n)
        start += n
        y[rows] = x[rows] @ w[g].T
        d_inputs[0][rows] += dy[rows] @ w[g]
        for i, (lo, source) in enumerate(blocks):
            if lo is None:
                continue
            cols = slice(i * nb, (i + 1) * nb)
            a, b, xi, dyi = f64(lo.a[g]), f64(lo.b[g]), inputs[source][rows], dy[rows, cols]
            t = lo.scale * xi @ a.T
            y[rows, cols] += t @ b.T
            dt = lo.scale * dyi @ b
            d_ab[i][0][g] = dt.T @ xi
            d_ab[i][1][g] = dyi.T @ t
            d_inputs[source][rows] += dt @ a
    return y, d_inputs, d_ab


def _vjp(impl, x, w, gs, lora, lx, dy):
    y, vjp = jax.vjp(
        lambda x, lora, lx: grouped_matmul(x, w, gs, lora=lora, lora_x=lx, impl=impl), x, lora, lx
    )
    return y, vjp(dy)


@pytest.mark.parametrize("form", list(FORMS))
def test_reference_matches_per_group_loop(form):
    rng = np.random.default_rng(list(FORMS).index(form))
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((G, N, K)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
    lora, lx, blocks, own = _form(form, rng)
    gs = jnp.asarray(SIZES, jnp.int32)
    y, (dx, dlora, dlx) = jax.jit(_vjp, static_argnums=0)("xla", x, w, gs, lora, lx, dy)
    want_y, want_d_inputs, want_d_ab = _oracle(x, w, blocks, own, dy)

    got = {"y": y, "dx": dx}
    want = {"y": want_y, "dx": want_d_inputs[0]}
    dlora = (dlora,) if isinstance(dlora, GroupedLora) else dlora
    for i, (d, (lo, _)) in enumerate(zip(dlora, blocks, strict=True)):
        assert (d is None) == (lo is None)
        if lo is not None:
            got |= {f"da{i}": d.a, f"db{i}": d.b}
            want |= {f"da{i}": want_d_ab[i][0], f"db{i}": want_d_ab[i][1]}
    if isinstance(lx, tuple):
        for i, (d, v) in enumerate(zip(dlx, want_d_inputs[1:], strict=True)):
            assert (d is None) == (v is None)
            if d is not None:
                got[f"dlora_x{i}"], want[f"dlora_x{i}"] = d, v
    elif lx is not None:
        got["dlora_x"], want["dlora_x"] = dlx, want_d_inputs[1]
    for name, v in got.items():
        assert rel_err(v, want[name]) <= 1e-5, name
    assert np.all(np.asarray(y)[sum(SIZES) :] == 0)


def _abstract(form):
    """Abstract arguments of `_vjp` at 8x M, K and N (temporaries would show against the outputs'
    bytes): INT4 weights, bf16 rows, float32 LoRA factors."""
    m, k, n = 8 * M, 8 * K, 8 * N
    lora, lx, _, _ = _form(form, np.random.default_rng(0), m, k, n)
    S = jax.ShapeDtypeStruct
    w = Int4Weight(S((G, n, k), jnp.int4), S((G, n, k // 32), jnp.bfloat16))
    lx = jax.tree.map(lambda v: S(v.shape, jnp.bfloat16), lx)
    lora = jax.tree.map(lambda v: S(v.shape, v.dtype), lora)
    rows = S((m, k), jnp.bfloat16)
    return rows, w, S((G,), jnp.int32), lora, lx, S((m, n), jnp.bfloat16)


@pytest.mark.parametrize("form", list(FORMS))
def test_plan_has_the_kernels_shapes_and_no_temporaries(form):
    args = _abstract(form)
    want = jax.eval_shape(lambda *a: _vjp("xla", *a), *args)
    got = jax.eval_shape(lambda *a: _vjp("plan", *a), *args)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
    compiled = jax.jit(lambda *a: _vjp("plan", *a)).lower(*args).compile()
    # Beyond its outputs the stand-in keeps at most a float32 row sum per row, and scalars.
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 4 * args[0].shape[0] + 1024, temp


def test_malformed_forms_are_refused():
    x = jnp.zeros((M, K))
    w = jnp.zeros((G, N, K))
    gs = jnp.asarray(SIZES, jnp.int32)

    def lora(nb, r=2):
        return GroupedLora(jnp.zeros((G, r, K)), jnp.zeros((G, nb, r)))

    bad = [
        dict(lora=(lora(N // 5),) * 5),  # N = 24 is not 5 blocks
        dict(lora=(lora(N), lora(N))),  # each block's b holds N/k rows
        dict(lora=lora(N // 2)),  # one GroupedLora covers all N columns
        dict(lora=(lora(N // 2), lora(N // 2)), lora_x=(x,)),  # one input per block
        dict(lora=(lora(N // 2), lora(N // 2)), lora_x=(None, jnp.zeros((M, K + 1)))),
    ]
    for kw in bad:
        for impl in ("xla", "pallas", "plan"):
            with pytest.raises(ValueError):
                grouped_matmul(x, w, gs, impl=impl, **kw)
    # No adapter in any block is no LoRA at all (and the unused input is ignored).
    y = grouped_matmul(x, w, gs, lora=(None, None), lora_x=(x, None), impl="xla")
    assert y.shape == (M, N)
