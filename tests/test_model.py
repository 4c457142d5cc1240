"""Properties of the model that need no reference: packing, causality, loss chunking, remat, INT4,
LoRA at step 0, and full-size Kimi-K2-Thinking shapes through jax.eval_shape."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

from k2jax.config import CONFIG_DIR, load_model_config
from k2jax.lora import LoraConfig
from k2jax.model import ComputeConfig, Transformer
from k2jax.model.loss import chunked_cross_entropy
from k2jax.model.moe import ExpertProj
from k2jax.model.transformer import init_variables
from k2jax.ops.grouped_matmul import GroupedLora, grouped_matmul
from k2jax.quant import dequantize, quantize_int4, random_int4

F32 = ComputeConfig(dtype="float32", param_dtype="float32", remat="none")


@pytest.fixture(scope="module")
def tiny():
    cfg = load_model_config(CONFIG_DIR / "tiny.gin")
    model = Transformer(cfg, F32)
    variables = nn.unbox(init_variables(model, jax.random.key(0)))
    return cfg, model, variables


def _logits(model, variables, tokens, positions=None, segments=None):
    fn = jax.jit(lambda v, t, p, s: model.apply(v, t, p, s, method=Transformer.logits))
    return fn(variables, tokens, positions, segments)


def test_packed_row_equals_segments_run_separately(tiny):
    cfg, model, v = tiny
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, cfg.vocab_size, 7), rng.integers(0, cfg.vocab_size, 5)
    packed = np.concatenate([a, b, [0, 0]])[None]
    positions = np.concatenate([np.arange(7), np.arange(5), [0, 0]])[None]
    segments = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    got = _logits(model, v, packed, positions, segments)[0]
    assert rel_err(got[:7], _logits(model, v, a[None])[0]) <= 1e-5
    assert rel_err(got[7:12], _logits(model, v, b[None])[0]) <= 1e-5


def test_causality_by_gradients(tiny):
    """d loss(position t) / d embedding(token at s > t) is exactly zero; for s ≤ t it is not."""
    _, model, v = tiny
    T = 12
    tokens = jnp.arange(100, 100 + T)[
        None
    ]  # distinct ids: each embedding row belongs to 1 position
    targets = jnp.roll(tokens, -1, axis=1)
    t = 5
    mask = jnp.zeros((1, T)).at[0, t].set(1.0)

    def loss(params):
        sums, _ = model.apply({"params": params}, tokens, targets, mask, method=Transformer.loss)
        return sums["loss_sum"]

    g = jax.jit(jax.grad(loss))(v["params"])["embed_tokens"]["weight"]
    rows = np.abs(np.asarray(g[100 : 100 + T])).sum(-1)
    assert np.all(rows[t + 1 :] == 0.0)
    assert np.all(rows[: t + 1] > 0.0)


def test_chunked_cross_entropy_matches_full_logits():
    rng = np.random.default_rng(1)
    n, d, vocab = 37, 16, 50
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(vocab, d)), jnp.float32)
    t = jnp.asarray(rng.integers(0, vocab, n))
    m = jnp.asarray(rng.integers(0, 2, n), jnp.float32)
    logits = h @ w.T
    lse = jax.nn.logsumexp(logits, -1)
    want_loss = jnp.sum((lse - logits[jnp.arange(n), t]) * m)
    want_z = jnp.sum(1e-4 * lse**2 * m)
    for chunk in (1, 8, 37, 64):
        got = chunked_cross_entropy(h, w, t, m, chunk=chunk, z_weight=1e-4)
        assert rel_err(got["loss_sum"], want_loss) <= 1e-6
        assert rel_err(got["z_loss_sum"], want_z) <= 1e-6
        assert float(got["count"]) == float(m.sum())

    def full(h):
        lg = h @ w.T
        return jnp.sum((jax.nn.logsumexp(lg, -1) - lg[jnp.arange(n), t]) * m)

    g = jax.grad(lambda h: chunked_cross_entropy(h, w, t, m, chunk=8)["loss_sum"])(h)
    assert rel_err(g, jax.grad(full)(h)) <= 1e-5


@pytest.fixture(scope="module")
def lora_grads(tiny):
    """Loss and LoRA gradients of the tiny model per remat policy (B made non-zero)."""
    cfg, _, v = tiny
    lora = LoraConfig(rank=4)
    tokens = jnp.arange(16).reshape(2, 8)
    mask = jnp.ones((2, 8))
    m0 = Transformer(cfg, F32, lora)
    lv = nn.unbox(init_variables(m0, jax.random.key(0), lora_rng=jax.random.key(7)))["lora"]
    lv = jax.tree.map(lambda x: x + 0.01, lv)  # non-zero B: gradients flow through every adapter

    @functools.cache
    def run(remat):
        m = Transformer(cfg, dataclasses.replace(F32, remat=remat), lora)

        def f(lv):
            s, _ = m.apply(
                {"params": v["params"], "lora": lv}, tokens, tokens, mask, method=Transformer.loss
            )
            return s["loss_sum"]

        return jax.jit(jax.value_and_grad(f))(lv)

    return run


@pytest.mark.parametrize("remat", ["full", "selective", "dots", "layer_io"])
def test_remat_policies_do_not_change_results(lora_grads, remat):
    (l0, g0), (l1, g1) = lora_grads("none"), lora_grads(remat)
    assert rel_err(l1, l0) <= 1e-6
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert rel_err(a, b) <= 1e-5


def _frozen_passes(tiny, remat) -> dict[str, float]:
    """Matmuls per step that consume each kind of frozen weight, per layer, read from the jaxpr
    of the LoRA gradient (scan bodies × their length): attention's q_b_proj, the routed
    experts' gate|up and down stacks."""
    cfg, _, v = tiny
    m = Transformer(cfg, dataclasses.replace(F32, remat=remat), LoraConfig(rank=4))
    lv = nn.unbox(jax.eval_shape(lambda: init_variables(m, jax.random.key(0))))["lora"]
    tokens = jnp.zeros((2, 8), jnp.int32)

    def f(lv):
        s, _ = m.apply(
            {"params": v["params"], "lora": lv},
            tokens,
            tokens,
            jnp.ones((2, 8)),
            method=Transformer.loss,
        )
        return s["loss_sum"]

    experts = v["params"]["moe_layers"]["mlp"]["experts"]
    weights = {
        "q_b_proj": v["params"]["moe_layers"]["self_attn"]["q_b_proj"]["weight"].shape[1:],
        "gate_up": experts["gate_up_proj"]["weight"].shape[1:],
        "down": experts["down_proj"]["weight"].shape[1:],
    }
    counts = dict.fromkeys(weights, 0)

    def walk(jaxpr, times):
        for e in jaxpr.eqns:
            if e.primitive.name in ("dot_general", "ragged_dot_general"):
                for x in e.invars:
                    for name, shape in weights.items():
                        counts[name] += times * (tuple(getattr(x.aval, "shape", ())) == shape)
            inner = times * (e.params["length"] if e.primitive.name == "scan" else 1)
            for p in e.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub, inner)

    walk(jax.make_jaxpr(jax.grad(f))(lv).jaxpr, 1)
    layers = {"q_b_proj": cfg.num_hidden_layers, "gate_up": cfg.num_moe_layers}
    return {k: n / layers.get(k, cfg.num_moe_layers) for k, n in counts.items()}


def test_selective_remat_equals_full_and_multiplies_frozen_weights_twice(tiny, lora_grads):
    """remat "selective" saves the frozen matmuls' outputs: the same loss and gradients as
    "full" (float32, 1e-6), and every frozen weight is multiplied twice per step (forward and
    input gradient) instead of three times (the recompute)."""
    (l0, g0), (l1, g1) = lora_grads("full"), lora_grads("selective")
    assert rel_err(l1, l0) <= 1e-6
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert rel_err(a, b) <= 1e-6
    assert _frozen_passes(tiny, "full") == {"q_b_proj": 3, "gate_up": 3, "down": 3}
    assert _frozen_passes(tiny, "selective") == {"q_b_proj": 2, "gate_up": 2, "down": 2}
    assert _frozen_passes(tiny, "none") == {"q_b_proj": 2, "gate_up": 2, "down": 2}


def test_lora_step0_equals_base_model(tiny):
    cfg, model, v = tiny
    lora_model = Transformer(cfg, F32, LoraConfig(rank=4))
    lv = nn.unbox(init_variables(lora_model, jax.random.key(0), lora_rng=jax.random.key(1)))
    assert jax.tree.structure(lv["params"]) == jax.tree.structure(v["params"])
    tokens = jnp.arange(20).reshape(2, 10)
    base = _logits(model, v, tokens)
    with_lora = _logits(lora_model, {"params": v["params"], "lora": lv["lora"]}, tokens)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(with_lora))
    # every routed expert has its own adapter pair
    experts = lv["lora"]["moe_layers"]["mlp"]["experts"]
    assert experts["gate_proj"]["lora_A"].shape == (
        cfg.num_moe_layers,
        cfg.n_routed_experts,
        4,
        cfg.hidden_size,
    )
    assert experts["down_proj"]["lora_B"].shape == (
        cfg.num_moe_layers,
        cfg.n_routed_experts,
        cfg.hidden_size,
        4,
    )


def test_int4_experts_model_runs_and_matches_dequantized(tiny):
    """An INT4-expert model gives the logits of the bf16 model holding the dequantised experts."""
    cfg = tiny[0]
    int4 = Transformer(cfg, dataclasses.replace(F32, experts="int4"))
    v4 = nn.unbox(init_variables(int4, jax.random.key(3)))
    ex4 = v4["params"]["moe_layers"]["mlp"]["experts"]
    assert ex4["gate_up_proj"]["weight_q"].dtype == jnp.int4
    dense = jax.tree.map(lambda x: x, v4["params"])
    dense["moe_layers"]["mlp"]["experts"] = {
        name: {"weight": dequantize(random_like(ex4[name]), jnp.float32)} for name in ex4
    }
    tokens = jnp.arange(12).reshape(2, 6)
    a = _logits(int4, v4, tokens)
    b = _logits(Transformer(cfg, F32), {"params": dense}, tokens)
    assert rel_err(a, b) <= 1e-5


def random_like(node):
    from k2jax.quant import Int4Weight

    return Int4Weight(node["weight_q"], node["weight_scale"])


def test_grouped_matmul_reference_matches_loop():
    rng = np.random.default_rng(2)
    G, N, K, r = 5, 24, 64, 3
    sizes = np.array([4, 0, 7, 1, 3])
    M = sizes.sum() + 2  # two padding rows
    x = jnp.asarray(rng.normal(size=(M, K)), jnp.float32)
    w = random_int4(jax.random.key(0), (G, N, K), 32, scale=0.5, dtype=jnp.float32)
    lora = GroupedLora(
        jnp.asarray(rng.normal(size=(G, r, K)), jnp.float32),
        jnp.asarray(rng.normal(size=(G, N, r)), jnp.float32),
        scale=0.5,
    )
    y = grouped_matmul(x, w, jnp.asarray(sizes, jnp.int32), lora=lora, impl="xla")
    wd = np.asarray(dequantize(w, jnp.float32))
    want = np.zeros((M, N))
    start = 0
    for g, n in enumerate(sizes):
        xs = np.asarray(x[start : start + n])
        a, b = np.asarray(lora.a[g]), np.asarray(lora.b[g])
        want[start : start + n] = xs @ wd[g].T + 0.5 * (xs @ a.T) @ b.T
        start += n
    assert rel_err(y, want) <= 1e-5
    assert np.all(np.asarray(y[-2:]) == 0)


def test_int4_quantize_roundtrip():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(3, 8, 64)).astype(np.float32)
    q = quantize_int4(w, 32)
    assert q.values.dtype == jnp.int4 and q.scales.shape == (3, 8, 2)
    codes = np.asarray(q.values.astype(jnp.int8))
    assert codes.min() >= -8 and codes.max() <= 7
    back = np.asarray(dequantize(q, jnp.float32))
    # error at most half a step of each group's scale (+ the bf16 rounding of the scale itself)
    step = np.repeat(np.asarray(q.scales, np.float32), 32, axis=-1)
    assert np.all(np.abs(back - w) <= step * 0.55)


def test_full_size_kimi_k2_thinking_shapes():
    """The real model's parameter tree, with INT4 experts and LoRA on every linear, without
    allocating a byte (jax.eval_shape)."""
    cfg = load_model_config(CONFIG_DIR / "kimi_k2_thinking.gin")
    compute = ComputeConfig(experts="int4")
    model = Transformer(cfg, compute, LoraConfig(rank=16))
    shapes = jax.eval_shape(lambda: nn.unbox(init_variables(model, jax.random.key(0))))
    p, lora = shapes["params"], shapes["lora"]
    ex = p["moe_layers"]["mlp"]["experts"]
    assert ex["gate_up_proj"]["weight_q"].shape == (60, 384, 4096, 7168)
    assert ex["gate_up_proj"]["weight_q"].dtype == jnp.int4
    assert ex["gate_up_proj"]["weight_scale"].shape == (60, 384, 4096, 224)
    assert ex["down_proj"]["weight_q"].shape == (60, 384, 7168, 2048)
    attn = p["moe_layers"]["self_attn"]
    assert attn["q_b_proj"]["weight"].shape == (60, 64 * 192, 1536)
    assert attn["kv_a_proj_with_mqa"]["weight"].shape == (60, 576, 7168)
    assert attn["kv_b_proj"]["weight"].shape == (60, 64 * 256, 512)
    assert p["dense_layers"]["mlp"]["gate_proj"]["weight"].shape == (1, 18432, 7168)
    assert p["lm_head"]["weight"].shape == (163840, 7168)
    n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(p))
    n_params -= sum(
        np.prod(node["weight_scale"].shape) for node in (ex["gate_up_proj"], ex["down_proj"])
    )
    assert (
        1.02e12 < n_params < 1.04e12
    )  # "1T parameters": 1,026,470,731,056 stored elements incl. FP8 scales
    lx = lora["moe_layers"]["mlp"]["experts"]
    assert lx["gate_proj"]["lora_A"].shape == (60, 384, 16, 7168)
    assert lx["down_proj"]["lora_B"].shape == (60, 384, 7168, 16)
    tokens = jax.ShapeDtypeStruct((1, 4096), jnp.int32)
    out = jax.eval_shape(
        lambda v, t: model.apply(v, t, t, jnp.ones(t.shape), method=Transformer.loss),
        shapes,
        tokens,
    )
    assert out[0]["loss_sum"].shape == ()
    assert out[1]["moe"]["expert_load"].shape == (60, 384)
    assert out[1]["moe"]["max_logit"].shape == (60, 64)


@pytest.mark.parametrize("experts", ["int4", "bf16"])
def test_random_expert_stack_init_is_drawn_one_expert_at_a_time(experts):
    """A random base's 384-expert gate|up stack at K2 widths (tests, benchmarks, the planner's
    abstract init): drawn whole, its random bits need 180 GB of temporaries; one expert at a
    time, under a gigabyte. Compiled only, never run."""
    proj = ExpertProj(384, 4096, 7168, ("mlp", "embed"), ComputeConfig(experts=experts), None)
    compiled = jax.jit(proj.init).lower(jax.random.key(0)).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 2e9
    # and the experts are different draws
    small = ExpertProj(4, 8, 64, ("mlp", "embed"), ComputeConfig(experts=experts), None)
    leaves = jax.tree.leaves(nn.unbox(small.init(jax.random.key(0))))
    for leaf in leaves:
        x = np.asarray(leaf.astype(jnp.float32))
        assert not np.array_equal(x[0], x[1])
