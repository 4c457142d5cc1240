"""The fused vocabulary-chunked cross-entropy (k2jax.model.loss) against the implementation it
replaced: sums and gradients in float32, bfloat16 and float64, padding, masks, z-loss, a
vocabulary-sharded mesh, and the compiled K2-width program (bf16 backward GEMMs, temporaries)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err
from jax.sharding import NamedSharding

from k2jax.model.loss import chunked_cross_entropy
from k2jax.ops.einsum import einsum_acc
from k2jax.sharding import make_mesh, spec_for


def reference_cross_entropy(hidden_ND, head_VD, targets_N, mask_N, *, chunk=2048, z_weight=0.0):
    """The previous k2jax loss, kept as the oracle: the LM head + loss per token chunk under
    jax.checkpoint in a lax.scan, [chunk, V] float32 logits, gradients by autodiff."""
    n, d = hidden_ND.shape
    chunk = min(chunk, n)
    pad = (-n) % chunk
    if pad:
        hidden_ND = jnp.pad(hidden_ND, ((0, pad), (0, 0)))
        targets_N = jnp.pad(targets_N, (0, pad))
        mask_N = jnp.pad(mask_N, (0, pad))
    n_chunks = (n + pad) // chunk
    h = hidden_ND.reshape(n_chunks, chunk, d)
    t = targets_N.reshape(n_chunks, chunk)
    f32 = jnp.promote_types(hidden_ND.dtype, jnp.float32)
    m = mask_N.reshape(n_chunks, chunk).astype(f32)

    @jax.checkpoint
    def one_chunk(h_CD, t_C, m_C):
        logits = einsum_acc("cd,vd->cv", h_CD, head_VD.astype(h_CD.dtype))
        lse = jax.nn.logsumexp(logits, axis=-1)
        w_t = jnp.take(head_VD, t_C, axis=0).astype(h_CD.dtype)
        target_logit = einsum_acc("cd,cd->c", h_CD, w_t)
        return (lse - target_logit) * m_C, z_weight * lse * lse * m_C

    def body(carry, xs):
        loss, z = one_chunk(*xs)
        return (carry[0] + loss.sum(), carry[1] + z.sum()), None

    zero = jnp.zeros((), f32)
    (loss_sum, z_sum), _ = jax.lax.scan(body, (zero, zero), (h, t, m))
    return {"loss_sum": loss_sum, "z_loss_sum": z_sum, "count": m.sum()}


def _value_and_grads(fn, **kw):
    """jit(value_and_grad) of loss_sum + 3·z_loss_sum w.r.t. (hidden, head), with the sums."""

    def f(h, w, t, m):
        sums = fn(h, w, t, m, **kw)
        return sums["loss_sum"] + 3.0 * sums["z_loss_sum"], sums

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def _inputs(seed, n, d, vocab, dtype, masked=0.4):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(n, d)), dtype)
    w = jnp.asarray(0.5 * rng.normal(size=(vocab, d)), dtype)
    t = jnp.asarray(rng.integers(0, vocab, n), jnp.int32)
    m = jnp.asarray(rng.random(n) >= masked, jnp.float32)
    return h, w, t, m


def _compare(inputs, tol, *, chunk, vocab_chunk, z_weight):
    (_, got), got_g = _value_and_grads(
        chunked_cross_entropy, chunk=chunk, vocab_chunk=vocab_chunk, z_weight=z_weight
    )(*inputs)
    (_, want), want_g = _value_and_grads(reference_cross_entropy, chunk=chunk, z_weight=z_weight)(
        *inputs
    )
    assert float(got["count"]) == float(want["count"]) == float(inputs[3].sum())
    assert rel_err(got["loss_sum"], want["loss_sum"]) <= tol
    if z_weight:
        assert rel_err(got["z_loss_sum"], want["z_loss_sum"]) <= tol
    else:
        assert float(got["z_loss_sum"]) == 0.0
    for g, g_want, x in zip(got_g, want_g, inputs):
        assert g.dtype == x.dtype
        assert rel_err(g, g_want) <= tol
    return got, got_g


# (tokens, token chunk, vocabulary chunk, z_weight) at V = 50: 37 tokens in chunks of 8 and 50
# rows in chunks of 7 pad both axes (40 tokens, 56 rows); 40 / 10 divide; 64 / 64 is one block.
CASES = [
    (37, 8, 7, 0.0),
    (37, 8, 7, 1e-2),
    (40, 8, 10, 1e-2),
    (37, 64, 64, 1e-2),
    (37, 1, 50, 0.0),
]


@pytest.mark.parametrize("n, chunk, vocab_chunk, z_weight", CASES)
def test_float32_matches_reference(n, chunk, vocab_chunk, z_weight):
    inputs = _inputs(n + chunk, n, 16, 50, jnp.float32)
    _compare(inputs, 1e-6, chunk=chunk, vocab_chunk=vocab_chunk, z_weight=z_weight)


@pytest.mark.parametrize("n, chunk, vocab_chunk, z_weight", [CASES[1], CASES[3]])
def test_bfloat16_matches_reference(n, chunk, vocab_chunk, z_weight):
    """bf16 compute: the backward casts dlogits to bf16 where the reference kept float32."""
    inputs = _inputs(7, n, 16, 50, jnp.bfloat16)
    _compare(inputs, 2e-2, chunk=chunk, vocab_chunk=vocab_chunk, z_weight=z_weight)


def test_float64_promotes():
    with jax.enable_x64(True):
        inputs = _inputs(3, 37, 16, 50, jnp.float64)
        got, grads = _compare(inputs, 1e-12, chunk=8, vocab_chunk=7, z_weight=1e-2)
        assert all(x.dtype == jnp.float64 for x in (*got.values(), *grads))


def test_fully_masked_rows_contribute_nothing():
    h, w, t, m = _inputs(5, 24, 16, 50, jnp.float32)
    m = m.at[8:16].set(0.0)
    (_, sums), (dh, _) = _value_and_grads(
        chunked_cross_entropy, chunk=8, vocab_chunk=16, z_weight=1e-2
    )(h, w, t, m)
    assert np.all(np.asarray(dh[8:16]) == 0.0)
    (_, sums_out), _ = _value_and_grads(
        chunked_cross_entropy, chunk=8, vocab_chunk=16, z_weight=1e-2
    )(h.at[8:16].set(100.0), w, t.at[8:16].set(0), m)
    assert float(sums_out["loss_sum"]) == pytest.approx(float(sums["loss_sum"]), rel=1e-6)


@pytest.mark.parametrize(
    "mesh_shape, vocab",
    [((2, 1, 4), 256), ((4, 1, 2), 250)],
    ids=["data2-tensor4", "data4-tensor2"],
)
def test_vocabulary_sharded_mesh_matches_single_device(mesh_shape, vocab):
    """Head over `tensor`, tokens over data × expert (the rules table): equal to one device,
    and nothing is gathered — no all-gather or all-to-all of W, h or logits in the program.
    (V = 250 pads the vocabulary to 4 × 63: still correct, but the padded head reshards.)"""
    inputs = _inputs(11, 64, 16, vocab, jnp.float32)
    fn = _value_and_grads(chunked_cross_entropy, chunk=16, vocab_chunk=64, z_weight=1e-2)
    want = fn(*inputs)
    mesh = make_mesh(*mesh_shape)
    hidden = NamedSharding(mesh, spec_for(("batch", "embed")))
    head = NamedSharding(mesh, spec_for(("vocab", "embed")))
    tokens = NamedSharding(mesh, spec_for(("batch",)))
    sharded = jax.device_put(inputs, (hidden, head, tokens, tokens))
    got = fn(*sharded)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_err(a, b) <= 1e-6
    dh, dw = got[1]
    assert dh.sharding.is_equivalent_to(hidden, 2)
    if vocab % (64 * mesh_shape[2]) == 0:
        assert dw.sharding.is_equivalent_to(head, 2)
        hlo = fn.lower(*sharded).compile().as_text()
        assert not re.search(r" (all-gather|all-to-all)(-start)?\(", hlo)


# --- the compiled K2-width program --------------------------------------------------------------

K2_N, K2_D, K2_V, K2_CHUNK = 4096, 7168, 163840, 2048


def _k2_program(fn, argnums, monkeypatch):
    """value_and_grad of the loss at K2 width in bf16, lowered from abstract inputs and compiled.

    Traced as for a GPU: einsum_acc widens bf16 operands to float32 on the CPU backend only (XLA:CPU
    cannot run some unfused bf16 dots), which would hide the dtypes the GPU program gets. The
    program is compiled by XLA:CPU, never run."""
    S = jax.ShapeDtypeStruct
    args = (
        S((K2_N, K2_D), jnp.bfloat16),
        S((K2_V, K2_D), jnp.bfloat16),
        S((K2_N,), jnp.int32),
        S((K2_N,), jnp.float32),
    )

    def loss(h, w, t, m):
        sums = fn(h, w, t, m, chunk=K2_CHUNK, z_weight=1e-4)
        return sums["loss_sum"] + sums["z_loss_sum"]

    with monkeypatch.context() as patch:
        patch.setattr(jax, "default_backend", lambda: "gpu")
        lowered = jax.jit(jax.value_and_grad(loss, argnums=argnums)).lower(*args)
    return lowered.as_text(), lowered.compile()


def _hlo_dots(hlo: str) -> list[tuple[str, list[str]]]:
    """(result shape, operand dtypes) of every dot in optimized HLO text."""
    dtypes = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", hlo))
    return [
        (out, [dtypes[o.strip()] for o in operands.split(",")])
        for out, operands in re.findall(r"= (\w+\[[\d,]*\])\S* dot\(([^)]*)\)", hlo)
    ]


def test_k2_width_backward_gemms_take_bf16(monkeypatch):
    """Before: the head's input-gradient GEMM dh = dlogits·W takes float32 operands (the float32
    cotangent and an upcast W). After: every GEMM takes bf16, dW's GEMM disappears when the head
    is not differentiated, and the temporaries shrink by the [chunk, V] float32 blocks."""
    dh_shape = f"f32[{K2_CHUNK},{K2_D}]"
    _, before = _k2_program(reference_cross_entropy, (0,), monkeypatch)
    assert [ops for out, ops in _hlo_dots(before.as_text()) if out == dh_shape] == [["f32", "f32"]]

    stablehlo, after_hw = _k2_program(chunked_cross_entropy, (0, 1), monkeypatch)
    dots = re.findall(
        r"stablehlo\.dot_general .*: \(tensor<\S+x(\w+)>, tensor<\S+x(\w+)>\)", stablehlo
    )
    assert len(dots) == 4 and all(ops == ("bf16", "bf16") for ops in dots)  # fwd, recompute, dh, dW
    _, after_h = _k2_program(chunked_cross_entropy, (0,), monkeypatch)
    hw_dots, h_dots = _hlo_dots(after_hw.as_text()), _hlo_dots(after_h.as_text())
    assert len(hw_dots) == 4 and len(h_dots) == 3  # no dW GEMM when only dh is needed
    # XLA:CPU runs dW's GEMM (contracting the leading dims) on float32 copies of the bf16
    # operands; dh's GEMM it keeps in bf16, as a GPU does all of them.
    assert [ops for out, ops in h_dots if out == dh_shape] == [["bf16", "bf16"]]

    temp_before = before.memory_analysis().temp_size_in_bytes
    temp_after = after_h.memory_analysis().temp_size_in_bytes
    assert temp_before > 4 * 2**30  # [2048, V] float32 logits, their cotangent, a float32 W
    assert temp_after < 2**30 and temp_after * 5 < temp_before
