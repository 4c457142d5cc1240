"""The attention implementations agree with the reference (output, gradients, per-head max logit).

"dpa_xla" is the cuDNN path's code on CPU: its max logit is the Pallas kernel in interpret mode
(tests/test_max_logit_pallas.py tests the kernel itself)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

from k2jax.ops.attention import attention, max_logit_blocked


def _inputs(seed, B=2, T=13, S=13, H=3, Dn=8, Dr=4, Dv=6):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    seg = np.ones((B, S), np.int32)
    seg[0, 5:] = 2  # a packed row: two examples
    seg[1, -3:] = 0  # a padded row
    return (f(B, T, H, Dn), f(B, T, H, Dr), f(B, S, H, Dn), f(B, S, Dr), f(B, S, H, Dv)), seg


@pytest.mark.parametrize("seed", [0, 1])
def test_dot_product_attention_path_matches_reference(seed):
    (qn, qr, kn, kr, v), seg = _inputs(seed)
    seg = jnp.asarray(seg)
    kw = dict(scale=0.3, q_segment_ids=seg, kv_segment_ids=seg)

    def run(impl):
        def f(qn, qr, kn, kr, v):
            out, m = attention(qn, qr, kn, kr, v, impl=impl, **kw)
            return jnp.sum(out * jnp.cos(out)), (out, m)

        (_, (out, m)), grads = jax.jit(
            jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)
        )(qn, qr, kn, kr, v)
        return out, m, grads

    out0, m0, g0 = run("xla")
    out1, m1, g1 = run("dpa_xla")
    assert rel_err(out1, out0) <= 1e-5
    assert rel_err(m1, m0) <= 1e-6
    for a, b in zip(g1, g0):
        assert rel_err(a, b) <= 1e-5


def test_decode_queries_against_a_longer_cache():
    """Queries at positions 9..12 of a 13-key cache (q_index), as in cached generation."""
    (qn, qr, kn, kr, v), seg = _inputs(2, T=4)
    seg = jnp.asarray(seg)
    q_seg = seg[:, 9:]
    q_index = jnp.broadcast_to(jnp.arange(9, 13), (2, 4))
    kw = dict(scale=0.3, q_segment_ids=q_seg, kv_segment_ids=seg, q_index=q_index)
    out0, m0 = attention(qn, qr, kn, kr, v, impl="xla", **kw)
    out1, m1 = attention(qn, qr, kn, kr, v, impl="dpa_xla", **kw)
    assert rel_err(out1, out0) <= 1e-5 and rel_err(m1, m0) <= 1e-6


@pytest.mark.parametrize("block", [1, 4, 5, 13, 64])
def test_blocked_max_logit(block):
    (qn, qr, kn, kr, _), seg = _inputs(3)
    seg = jnp.asarray(seg)
    _, want = attention(
        qn, qr, kn, kr, _, impl="xla", scale=0.3, q_segment_ids=seg, kv_segment_ids=seg
    )
    got = max_logit_blocked(qn, qr, kn, kr, 0.3, seg, seg, block=block)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_max_logit_can_be_skipped():
    (qn, qr, kn, kr, v), seg = _inputs(4)
    seg = jnp.asarray(seg)
    _, m = attention(
        qn,
        qr,
        kn,
        kr,
        v,
        impl="dpa_xla",
        scale=0.3,
        q_segment_ids=seg,
        kv_segment_ids=seg,
        with_max_logit=False,
    )
    assert np.all(np.isneginf(np.asarray(m)))
