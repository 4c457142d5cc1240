"""Muon's Newton–Schulz in the r×r Gram space (k2jax.optim.optimizer) against the oracle, optax's
own full-matrix `optax.contrib.muon`: the orthogonaliser on wide, tall, stacked, rank-1 and nearly
square factors, and against float64 on ill-conditioned ones; the whole optimizer over several
steps with each setting it passes on; the state's pytree; an expert-sharded 8-device mesh without
gathers; the compiled temporaries and FLOPs at a K2-like shape."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rel_err
from jax.sharding import NamedSharding, PartitionSpec
from optax.contrib._muon import orthogonalize_via_newton_schulz

from k2jax.optim import (
    LORA_DIMENSION_NUMBERS,
    OptimConfig,
    ScheduleConfig,
    expert_major,
    make_optimizer,
    make_schedule,
    muon_dimension_numbers,
    optimizer,
    orthogonalize_in_gram_space,
)
from k2jax.optim.optimizer import _in_expert_major_view
from k2jax.sharding import make_mesh
from k2jax.train.state import opt_state_shardings

NS = (3.4445, -4.7750, 2.0315)
DION = (  # optax's per-step preset: one (a, b, c) row per step
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)


def optax_muon(config: OptimConfig, schedule, trainable) -> optax.GradientTransformation:
    """The oracle: make_optimizer as it was before the Gram form — optax.contrib.muon with the LoRA
    dimension numbers, in the expert-major view, after the clip."""
    adam_lr = schedule
    if config.adam_learning_rate is not None:
        ratio = config.adam_learning_rate / config.learning_rate
        adam_lr = lambda count: schedule(count) * ratio  # noqa: E731
    opt = optax.contrib.muon(
        schedule,
        ns_coeffs=config.ns_coeffs,
        ns_steps=config.ns_steps,
        beta=config.muon_beta,
        eps=config.eps,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
        adam_b1=config.b1,
        adam_b2=config.b2,
        adam_weight_decay=config.adam_weight_decay,
        adam_learning_rate=adam_lr,
        muon_weight_dimension_numbers=muon_dimension_numbers(trainable),
        consistent_rms=config.consistent_rms,
    )
    opt = _in_expert_major_view(opt)
    if config.grad_clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
    return opt


def _matrices(x):
    """The matrices of a stacked leaf: [.., m, n] → [-1, m, n]."""
    x = np.asarray(x, np.float64)
    return x.reshape(-1, *x.shape[-2:]) if x.ndim >= 2 else x.reshape(1, 1, -1)


def _worst(got, want) -> float:
    """The largest rel_err over the matrices (every expert of every layer) of a leaf."""
    return max(rel_err(g, w) for g, w in zip(_matrices(got), _matrices(want)))


@pytest.mark.parametrize(
    "shape",
    [
        (16, 96),  # wide: lora_A [r, in]
        (96, 16),  # tall: lora_B [out, r] (optax transposes it)
        (1, 40),  # r = 1
        (40, 1),
        (24, 32),  # r ≥ n/2: Gram space buys nothing but stays exact
        (32, 24),
        (12, 12),  # square: optax does not transpose
        (2, 3, 4, 64),  # stacked [L, E, r, in]
        (3, 2, 64, 4),  # stacked [E, L, out, r] (the expert-major view)
    ],
)
def test_gram_space_newton_schulz_equals_optax(shape):
    x = jnp.asarray(np.random.default_rng(len(shape) * 100 + shape[-1]).normal(size=shape))
    x = x.astype(jnp.float32)
    for coeffs in (NS, DION):
        c = jnp.asarray(coeffs, jnp.float32)
        want = orthogonalize_via_newton_schulz(x, c, 5, "frobenius", 1e-8, LORA_DIMENSION_NUMBERS)
        got = orthogonalize_in_gram_space(
            x, jnp.broadcast_to(c, (5, 3)) if c.ndim == 1 else c, 1e-8
        )
        assert got.shape == x.shape and got.dtype == x.dtype
        assert _worst(got, want) <= 1e-5, (shape, coeffs is DION)
    zero = orthogonalize_in_gram_space(
        jnp.zeros(shape), jnp.broadcast_to(jnp.asarray(NS), (5, 3)), 1e-8
    )
    np.testing.assert_array_equal(zero, 0.0)  # eps in the normalisation: 0, not NaN


def _newton_schulz64(x: np.ndarray, steps: int = 5) -> np.ndarray:
    """optax's full-form iteration in float64 numpy: the truth both float32 forms approximate."""
    transposed = x.shape[0] > x.shape[1]
    x = (x.T if transposed else x) / (np.linalg.norm(x) + 1e-8)
    a, b, c = NS
    for _ in range(steps):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if transposed else x


def test_ill_conditioned_factors_stay_near_the_full_forms_accuracy(monkeypatch):
    """Momenta whose singular values span 10² … 10⁶, or that are rank-deficient (an expert that
        got few tokens): ≤ 5e-5 off float64 (measured ≤ 3.7e-5), where optax's float32 full form is
        ~2e-5 off. All five steps on one Gram matrix (GRAM_SEGMENT_STEPS = 5) break that bound (measured
    3e-4 … 1e-3 off, depending on the CPU's summation order): G squares the condition number."""
    rng = np.random.default_rng(5)
    u, _ = np.linalg.qr(rng.normal(size=(1024, 16)))
    v, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    cases = [(v * np.logspace(0, -d, 16)) @ u.T for d in (2, 3, 6)]
    cases.append(rng.normal(size=(16, 4)) @ rng.normal(size=(4, 1024)))  # rank 4 of 16
    c = jnp.asarray(NS, jnp.float32)
    coeffs = jnp.broadcast_to(c, (5, 3))
    for x in cases + [case.T for case in cases]:
        truth = _newton_schulz64(x)
        x32 = jnp.asarray(x, jnp.float32)
        full = orthogonalize_via_newton_schulz(x32, c, 5, "frobenius", 1e-8, LORA_DIMENSION_NUMBERS)
        assert rel_err(full, truth) <= 3e-5, x.shape  # the oracle's own float32 error
        assert rel_err(orthogonalize_in_gram_space(x32, coeffs, 1e-8), truth) <= 5e-5, x.shape
    monkeypatch.setattr(optimizer, "GRAM_SEGMENT_STEPS", 5)
    worst = max(
        rel_err(orthogonalize_in_gram_space(jnp.asarray(x, jnp.float32), coeffs, 1e-8), truth)
        for x, truth in ((x, _newton_schulz64(x)) for x in cases[1:3])
    )
    assert worst > 4 * 5e-5, worst


def _trainable(rng, L=2, E=4):
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return {
        "lora": {
            "moe_layers": {
                "mlp": {
                    "experts": {
                        "gate_proj": {"lora_A": f(L, E, 4, 48), "lora_B": f(L, E, 24, 4)},
                        "down_proj": {"lora_A": f(L, E, 4, 24), "lora_B": f(L, E, 48, 4)},
                    }
                },
                "self_attn": {"q_proj": {"lora_A": f(L, 1, 48), "lora_B": f(L, 64, 1)}},  # r = 1
            },
            "dense_layers": {"mlp": {"up_proj": {"lora_A": f(1, 8, 12), "lora_B": f(1, 12, 8)}}},
        },
        "params": {
            "moe_layers": {
                "mlp": {"gate": {"weight": f(L, E, 48)}},
                "post_attention_layernorm": {"weight": f(L, 48)},
            }
        },
    }


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the defaults: Nesterov, consistent RMS 0.2, clipping
        {
            "nesterov": False,
            "muon_beta": 0.9,
            "weight_decay": 0.1,
            "consistent_rms": None,
            "adam_learning_rate": 3e-3,
            "adam_weight_decay": 0.01,
            "grad_clip_norm": None,
        },
    ],
)
def test_optimizer_equals_optax_muon_step_by_step(overrides):
    """Four steps on the same parameters and gradients: every leaf's update, every expert's, and
    the state equal optax's full-matrix muon; the state is optax's pytree."""
    rng = np.random.default_rng(7)
    config = OptimConfig(learning_rate=1e-2, **overrides)
    schedule = make_schedule(ScheduleConfig(name="cosine", warmup_steps=2), 1e-2, 6)
    params = _trainable(rng)
    ours = make_optimizer(config, schedule, params)
    oracle = optax_muon(config, schedule, params)
    state, ref_state = ours.init(params), oracle.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    update, ref_update = jax.jit(ours.update), jax.jit(oracle.update)
    for step in range(4):
        grads = jax.tree.map(lambda x: 0.3 * x, _trainable(rng))
        u, state = update(grads, state, params)
        want, ref_state = ref_update(grads, ref_state, params)
        flat = jax.tree_util.tree_flatten_with_path(want)[0]
        for (path, w), g in zip(flat, jax.tree.leaves(u)):
            assert _worst(g, w) <= 1e-5, (step, jax.tree_util.keystr(path))
        params = optax.apply_updates(params, want)  # both follow the oracle's trajectory
    for (path, w), g in zip(
        jax.tree_util.tree_flatten_with_path(ref_state)[0], jax.tree.leaves(state)
    ):
        assert np.shape(g) == np.shape(w) and np.asarray(g).dtype == np.asarray(w).dtype
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_expert_sharded_update_needs_no_gather_and_equals_optax():
    """On an expert=8 mesh with experts sharded: the same numbers as optax on one device, the
    state where the train step places it, and no collective but the clip's all-reduce."""
    mesh = make_mesh(1, 8, 1)
    rng = np.random.default_rng(11)
    params = _trainable(rng, E=8)
    grads = _trainable(rng, E=8)
    config = OptimConfig(learning_rate=1e-2, weight_decay=0.1)
    opt = make_optimizer(config, lambda c: 1e-2, params)

    def sharding(path, x):
        keys = [str(getattr(k, "key", k)) for k in path]
        spec = PartitionSpec(None, "expert") if "experts" in keys else PartitionSpec()
        return NamedSharding(mesh, spec)

    param_sh = jax.tree_util.tree_map_with_path(sharding, params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state_abs = jax.eval_shape(opt.init, abstract)
    state_sh = opt_state_shardings(state_abs, expert_major(abstract), expert_major(param_sh), mesh)
    step = jax.jit(
        opt.update, in_shardings=(param_sh, state_sh, param_sh), out_shardings=(param_sh, state_sh)
    )
    put = lambda tree, sh: jax.device_put(tree, sh)  # noqa: E731
    state = put(opt.init(params), state_sh)
    # two steps, so the second sees momentum
    oracle = optax_muon(config, lambda c: 1e-2, params)
    ref_state = oracle.init(params)
    for _ in range(2):
        u, state = step(put(grads, param_sh), state, put(params, param_sh))
        want, ref_state = oracle.update(grads, ref_state, params)
        for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(u)):
            assert _worst(g, w) <= 1e-5, jax.tree_util.keystr(path)
        grads = jax.tree.map(lambda g: -0.5 * g, grads)
    mu = state[1].inner_states["muon"].inner_state[0].mu
    mu_b = mu["lora"]["moe_layers"]["mlp"]["experts"]["down_proj"]["lora_B"]
    assert mu_b.shape == (8, 2, 48, 4)  # expert-major
    assert mu_b.sharding.spec[0] == "expert"
    hlo = step.lower(put(grads, param_sh), state, put(params, param_sh)).compile().as_text()
    for collective in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
        assert not re.search(rf"\b{collective}(-start)?\(", hlo), collective


def _compiled(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled.memory_analysis().temp_size_in_bytes, cost["flops"]


def test_temporaries_and_flops_drop_at_a_k2_like_shape():
    """8 experts' rank-16 factors at K2's width 7168, lowered abstractly: the orthogonaliser's
    temporaries are one factor-sized iterate (the re-formed X₂) and r×r matrices, against optax's
    two factor-sized copies; its FLOPs fall 2.6× (4 r×n products instead of 10); the whole
    update's temporaries are the two factor-sized arrays the products need (the Nesterov momentum
    and a result) — 7.0 MiB against optax's 17.5 MiB here."""
    f32 = jnp.float32
    a = jax.ShapeDtypeStruct((1, 8, 16, 7168), f32)
    b = jax.ShapeDtypeStruct((1, 8, 7168, 16), f32)
    c = jnp.asarray(NS, f32)
    factor = 8 * 16 * 7168 * 4
    for x in (a, b):
        full_temp, full_flops = _compiled(
            lambda x: orthogonalize_via_newton_schulz(
                x, c, 5, "frobenius", 1e-8, LORA_DIMENSION_NUMBERS
            ),
            x,
        )
        gram_temp, gram_flops = _compiled(
            lambda x: orthogonalize_in_gram_space(x, jnp.broadcast_to(c, (5, 3)), 1e-8), x
        )
        assert full_temp >= 2 * factor and gram_temp <= factor + 2**20, (full_temp, gram_temp)
        assert full_flops > 2.5 * gram_flops, (full_flops, gram_flops)
    trainable = {"lora": {"experts": {"down_proj": {"lora_A": a, "lora_B": b}}}}
    temps = {}
    for name, build in (("gram", make_optimizer), ("optax", optax_muon)):
        opt = build(OptimConfig(), lambda count: 1e-4, trainable)
        state = jax.eval_shape(opt.init, trainable)
        temps[name], _ = _compiled(opt.update, trainable, state, trainable)
    assert temps["gram"] <= 2 * factor + 2**20 and 2 * temps["gram"] < temps["optax"], temps
