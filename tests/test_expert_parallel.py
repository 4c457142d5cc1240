"""The expert-parallel exchange (k2jax/model/expert_parallel.py): exact in the worst case, capacity
blocks counted from the compiled program, independent sub-chunks.

Worst case: every token routed to the experts of one device (a large router bias), so one peer
block gets all the pairs and overflow rounds must run; and random uneven routing; with and
without LoRA dropout. On meshes (1,8,1), (1,4,2), (2,2,2) the MoE layer's output and its input,
LoRA and router gradients equal one device's (float32, ≤ 1e-6 relative) and the expert loads are
identical. The whole model in the worst case agrees within 1e-5 (its attention and data-parallel
sums add their own float32 reordering, as in tests/test_sharding.py).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err
from jax.sharding import NamedSharding

from k2jax.config import CONFIG_DIR, load_model_config
from k2jax.lora import LoraConfig
from k2jax.model import ComputeConfig, Transformer
from k2jax.model.expert_parallel import capacity
from k2jax.model.moe import MoE
from k2jax.model.transformer import init_variables
from k2jax.sharding import logical_specs, make_mesh, spec_for, use_mesh
from k2jax.train.planner import exchange_stats

F32 = ComputeConfig(dtype="float32", param_dtype="float32", remat="none")
MESHES = [(1, 8, 1), (1, 4, 2), (2, 2, 2)]


@pytest.fixture(scope="module")
def tiny16():
    """The tiny model with 16 routed experts (2 per device at 8-way expert parallelism, so all
    of a token's K = 2 experts can sit on one device), every LoRA factor random."""
    cfg = dataclasses.replace(load_model_config(CONFIG_DIR / "tiny.gin"), n_routed_experts=16)
    model = Transformer(cfg, F32, LoraConfig(rank=4, dropout=0.1))
    boxed = init_variables(model, jax.random.key(0), lora_rng=jax.random.key(1))
    v = nn.unbox(boxed)
    keys = iter(jax.random.split(jax.random.key(42), 1000))
    v["lora"] = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(keys), x.shape), v["lora"])
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 12)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (8, 12)), jnp.float32)
    return model, boxed, v, tokens, mask


def _with_bias(v, bias_E):
    """Variables whose MoE routers (every MoE layer) carry `bias_E` as selection bias."""
    params = jax.tree.map(lambda x: x, v["params"])
    gate = params["moe_layers"]["mlp"]["gate"]
    gate["e_score_correction_bias"] = jnp.broadcast_to(
        bias_E, gate["e_score_correction_bias"].shape
    )
    return {**v, "params": params}


def _loss_and_grads(model, v, tokens, mask, dropout_key):
    """Loss, gradients w.r.t. the LoRA factors and the router weights, and the aux."""
    rngs = None if dropout_key is None else {"dropout": dropout_key}

    def f(lora, router):
        params = jax.tree.map(lambda x: x, v["params"])
        params["moe_layers"]["mlp"]["gate"]["weight"] = router
        sums, aux = model.apply(
            {"params": params, "lora": lora},
            tokens,
            jnp.roll(tokens, -1, 1),
            mask,
            method=Transformer.loss,
            rngs=rngs,
        )
        return sums["loss_sum"], aux

    router = v["params"]["moe_layers"]["mlp"]["gate"]["weight"]
    (loss, aux), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(v["lora"], router)
    return loss, grads, aux


ROUTINGS = {
    # experts 0 and 1 live on device 0 of every expert-parallel group: all pairs go there
    "one device": lambda E: jnp.zeros((E,)).at[:2].set(30.0),
    # random, very uneven preferences
    "uneven": lambda E: 3.0 * jax.random.normal(jax.random.key(7), (E,)),
}


def _moe_layer(tiny16):
    """The MoE layer of the tiny16 model alone, its variables (random LoRA) and an input."""
    model, _, _, tokens, _ = tiny16
    layer = MoE(model.cfg, F32, model.lora)
    x = jax.random.normal(jax.random.key(5), (*tokens.shape, model.cfg.hidden_size))
    boxed = layer.init({"params": jax.random.key(0), "lora": jax.random.key(1)}, x)
    lv = nn.unbox(boxed)
    keys = iter(jax.random.split(jax.random.key(9), 100))
    lv["lora"] = jax.tree.map(
        lambda a: a + 0.05 * jax.random.normal(next(keys), a.shape), lv["lora"]
    )
    r = jax.random.normal(jax.random.key(6), x.shape)
    return layer, boxed, lv, x, r


def _layer_value_and_grads(layer, lv, x, r, bias, dropout_key):
    rngs = None if dropout_key is None else {"dropout": dropout_key}

    def f(x, lora, router):
        params = {**lv["params"], "gate": {"weight": router, "e_score_correction_bias": bias}}
        y, aux = layer.apply({"params": params, "lora": lora}, x, rngs=rngs)
        return jnp.sum(y * r), (y, aux)

    (_, (y, aux)), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
        x, lv["lora"], lv["params"]["gate"]["weight"]
    )
    return y, grads, aux


@pytest.fixture(scope="module")
def one_device_layer(tiny16):
    layer, _, lv, x, r = _moe_layer(tiny16)
    fn = jax.jit(functools.partial(_layer_value_and_grads, layer))
    E = layer.cfg.n_routed_experts
    return {
        (name, drop): fn(lv, x, r, make(E), jax.random.key(3) if drop else None)
        for name, make in ROUTINGS.items()
        for drop in (False, True)
    }


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_worst_case_routing_equals_one_device(tiny16, one_device_layer, shape):
    layer, boxed, lv, x, r = _moe_layer(tiny16)
    mesh = make_mesh(*shape)
    lv_s = jax.device_put(lv, jax.tree.map(lambda s: NamedSharding(mesh, s), logical_specs(boxed)))
    act = NamedSharding(mesh, spec_for(("batch", "seq", "act_embed")))
    x_s, r_s = jax.device_put(x, act), jax.device_put(r, act)
    fn = jax.jit(functools.partial(_layer_value_and_grads, layer))
    E = layer.cfg.n_routed_experts
    for (name, drop), (y0, grads0, aux0) in one_device_layer.items():
        with use_mesh(mesh):
            y, grads, aux = fn(
                lv_s, x_s, r_s, ROUTINGS[name](E), jax.random.key(3) if drop else None
            )
        where = f"{name}, dropout {drop}"
        assert rel_err(y, y0) <= 1e-6, where
        for (path, g), g0 in zip(
            jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads0)
        ):
            assert rel_err(g, g0) <= 1e-6, (where, jax.tree_util.keystr(path))
        np.testing.assert_array_equal(aux["expert_load"], aux0["expert_load"])
        if name == "one device":
            # every pair in one peer block: overflow rounds ran (round 0 holds only C rows)
            assert int(aux["exchange_rounds"]) > 1, int(aux["exchange_rounds"])
            load = np.asarray(aux["expert_load"])
            assert load[2:].sum() == 0 and load[:2].sum() == x.shape[0] * x.shape[1] * 2
    assert float(jnp.abs(one_device_layer["uneven", False][1][2]).max()) > 0  # router grads


def test_whole_model_in_the_worst_case(tiny16):
    """The chain of layers with every MoE layer's pairs on one device: loss and every gradient
    as on one device (1e-5: attention and data-parallel sums reorder float32 too)."""
    model, boxed, v, tokens, mask = tiny16
    v = _with_bias(v, ROUTINGS["one device"](model.cfg.n_routed_experts))
    fn = jax.jit(functools.partial(_loss_and_grads, model))
    loss0, grads0, _ = fn(v, tokens, mask, None)
    mesh = make_mesh(1, 8, 1)
    v_s = jax.device_put(v, jax.tree.map(lambda s: NamedSharding(mesh, s), logical_specs(boxed)))
    batch = NamedSharding(mesh, spec_for(("batch", "seq")))
    with use_mesh(mesh):
        loss, grads, aux = fn(v_s, jax.device_put(tokens, batch), jax.device_put(mask, batch), None)
    assert rel_err(loss, loss0) <= 1e-6
    for (path, g), g0 in zip(
        jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads0)
    ):
        assert rel_err(g, g0) <= 1e-5, jax.tree_util.keystr(path)
    assert int(np.max(aux["moe"]["exchange_rounds"])) > 1


def test_dropout_is_applied_and_depends_on_the_key(one_device_layer, tiny16):
    """Dropout changes the expert LoRA gradients, and another key changes them again (the
    mesh reproduces a key's masks exactly: test above)."""
    layer, _, lv, x, r = _moe_layer(tiny16)
    fn = jax.jit(functools.partial(_layer_value_and_grads, layer))
    E = layer.cfg.n_routed_experts
    g_off = one_device_layer["uneven", False][1][1]["experts"]["gate_proj"]["lora_A"]
    g_on = one_device_layer["uneven", True][1][1]["experts"]["gate_proj"]["lora_A"]
    g_other = fn(lv, x, r, ROUTINGS["uneven"](E), jax.random.key(4))[1][1]["experts"]
    assert rel_err(g_on, g_off) > 1e-2
    assert rel_err(g_other["gate_proj"]["lora_A"], g_on) > 1e-2


def test_capacity_and_counted_volume():
    assert capacity(32768, 8, 1.25) == 5120  # 1.25 × 4096 rows per peer
    assert capacity(24, 8, 1.25) == 8 and capacity(4, 1, 1.25) == 4  # ≥ 8 rows, ≤ all pairs
    hlo = "\n".join(
        [
            '%a = (bf16[1,5,7]{2,1,0}, bf16[1,5,7]{2,1,0}) all-to-all(...), metadata={op_name="x/moe_chunk_0/moe_dispatch/all_to_all"}',
            '%b = (bf16[1,5,7]{2,1,0}, bf16[1,5,7]{2,1,0}) all-to-all(...), metadata={op_name="x/rematted/moe_chunk_0/moe_dispatch/all_to_all"}',
            '%c = s32[2,5,2]{2,1,0} all-to-all(...), metadata={op_name="x/moe_chunk_1/moe_dispatch/all_to_all"}',
            '%d = f32[2,5,7]{2,1,0} all-to-all(...), metadata={op_name="x/moe_chunk_1/moe_dispatch/all_to_all"}',
            '%e = f32[2,5,7]{2,1,0} all-to-all(...), metadata={op_name="x/transpose(jvp(moe_dispatch))/all_to_all"}',
            '%f = f32[2,5,7]{2,1,0} all-to-all(...), metadata={op_name="x/moe_chunk_1/moe_combine/all_to_all"}',
            '%g = f32[2,5,7]{2,1,0} all-to-all(...), metadata={op_name="x/moe_chunk_1/moe_overflow/while/body/moe_dispatch/all_to_all"}',
        ]
    )
    # chunk 0: 70 elements (its forward and recompute are one exchange), chunk 1: 70 floats
    # (the int32 metadata, the backward transpose and the combine are not dispatch volume)
    stats = exchange_stats(hlo, activation_bytes=2, memory_chunks=3)
    assert stats == {"per_exchange": (70 + 70) * 2 * 3, "overflow_round": 70 * 2 * 3}


def _hlo_graph(text: str, scope: str):
    """{instruction: (operands, op_name, is an all-to-all)} of the HLO computation that holds an
    all-to-all in `scope`."""
    for comp in re.split(r"\n(?=\S)", text):
        graph = {}
        for line in comp.splitlines():
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?\b([\w\-]+)\((.*?)\)(?:,|$)", line)
            if m:
                name = re.search(r'op_name="([^"]*)"', line)
                is_a2a = " all-to-all(" in line
                graph[m.group(1)] = (
                    re.findall(r"%([\w.\-]+)", m.group(3)),
                    name and name[1],
                    is_a2a,
                )
        if any(a2a and op and scope in op for _, op, a2a in graph.values()):
            return graph
    raise AssertionError(f"no computation with an all-to-all in {scope!r}")


def test_sub_chunks_are_independent_in_the_compiled_program(tiny16):
    """With moe_overlap_chunks = 2 (the default), sub-chunk 1's dispatch all-to-all depends on
    nothing of sub-chunk 0 (routing, exchange, expert GEMMs, combine): XLA may run it while
    sub-chunk 0's experts compute."""
    model, boxed, v, tokens, _ = tiny16
    mesh = make_mesh(1, 8, 1)
    v_s = jax.device_put(v, jax.tree.map(lambda s: NamedSharding(mesh, s), logical_specs(boxed)))
    batch = NamedSharding(mesh, spec_for(("batch", "seq")))

    def forward(v, t):
        sums, _ = model.apply(v, t, t, jnp.ones(t.shape), method=Transformer.loss)
        return sums["loss_sum"]

    with use_mesh(mesh):
        text = jax.jit(forward).lower(v_s, jax.device_put(tokens, batch)).compile().as_text()
    graph = _hlo_graph(text, "moe_chunk_1/moe_dispatch")

    def a2a(scope):
        return [n for n, (_, op, is_a2a) in graph.items() if is_a2a and op and scope in op]

    users: dict[str, list[str]] = {}
    for node, (operands, _, _) in graph.items():
        for o in operands:
            users.setdefault(o, []).append(node)

    def closure(roots, edges):
        seen, todo = set(), list(roots)
        while todo:
            for nxt in edges(todo.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    # sub-chunk 0's work after its dispatch: its expert GEMMs, its combine, ...
    chunk0 = closure(a2a("moe_chunk_0/moe_dispatch"), lambda n: users.get(n, []))
    assert any(graph[n][2] and "moe_chunk_0/moe_combine" in (graph[n][1] or "") for n in chunk0)
    needed = closure(a2a("moe_chunk_1/moe_dispatch"), lambda n: graph.get(n, ((),))[0])
    assert a2a("moe_chunk_1/moe_dispatch") and not needed & chunk0, sorted(needed & chunk0)[:5]


def test_each_expert_adapter_sees_its_own_dropout():
    """PEFT-consistent LoRA dropout on the routed experts: gate, up and down each drop out their
    own input with their own mask (gate and up the row, down the SwiGLU activation), drawn per
    pair — checked against a per-row computation with those masks."""
    from k2jax.model.experts import (
        DOWN_SALT,
        GATE_SALT,
        UP_SALT,
        ExpertWeights,
        PairDropout,
        expert_ffn,
    )
    from k2jax.ops.grouped_matmul import GroupedLora

    E, D, F, r, s = 3, 16, 8, 2, 0.5
    keys = iter(jax.random.split(jax.random.key(0), 20))
    rand = lambda *shape: jax.random.normal(next(keys), shape)  # noqa: E731
    lora = {
        n: GroupedLora(rand(E, r, k), rand(E, o, r), s)
        for n, o, k in (("gate", F, D), ("up", F, D), ("down", D, F))
    }
    w = ExpertWeights(rand(E, 2 * F, D), rand(E, D, F), lora["gate"], lora["up"], lora["down"])
    sizes = jnp.array([4, 0, 6], jnp.int32)
    x, ids = rand(10, D), jnp.arange(100, 110)
    drop = PairDropout(jax.random.key_data(jax.random.key(1)), 0.4)
    y = expert_ffn(x, sizes, w, impl="xla", dropout=drop, pair_ids_M=ids)

    group = np.repeat(np.arange(E), np.asarray(sizes))
    xg, xu = drop.apply(x, ids, GATE_SALT), drop.apply(x, ids, UP_SALT)
    assert not np.allclose(xg, xu) and not np.allclose(xg, x)  # own masks, applied

    def adapter(name, inp):
        a, b = lora[name].a[group], lora[name].b[group]
        return s * jnp.einsum("mor,mr->mo", b, jnp.einsum("mrk,mk->mr", a, inp))

    h = jnp.einsum("mnk,mk->mn", w.gate_up[group], x)
    gate = h[:, :F] + adapter("gate", xg)
    up = h[:, F:] + adapter("up", xu)
    act = jax.nn.silu(gate) * up
    want = jnp.einsum("mnk,mk->mn", w.down[group], act)
    want = want + adapter("down", drop.apply(act, ids, DOWN_SALT))
    assert rel_err(y, want) <= 1e-5
