"""Meshes, the rules table, and expert/tensor/data parallelism equal to one device."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err
from jax.sharding import NamedSharding, PartitionSpec

from k2jax.config import CONFIG_DIR, load_model_config
from k2jax.lora import LoraConfig
from k2jax.model import ComputeConfig, Transformer
from k2jax.model.transformer import init_variables
from k2jax.sharding import (
    MeshError,
    ShardingRuleError,
    check_mesh_fits,
    constrain,
    logical_specs,
    make_mesh,
    parse_mesh_spec,
    spec_for,
    use_mesh,
)

F32 = ComputeConfig(dtype="float32", param_dtype="float32", remat="none")
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)]


def test_make_mesh_and_errors():
    mesh = make_mesh(2, 2, 2)
    assert dict(mesh.shape) == {"data": 2, "expert": 2, "tensor": 2}
    with pytest.raises(MeshError, match="= 4 devices, but 8 are available"):
        make_mesh(1, 4, 1)
    with pytest.raises(MeshError, match="= 16 devices"):
        make_mesh(1, 16, 1)
    assert parse_mesh_spec("data=1,expert=8") == {"data": 1, "expert": 8, "tensor": 1}
    with pytest.raises(MeshError, match="axis 'pipeline' unknown"):
        parse_mesh_spec("pipeline=2")
    with pytest.raises(MeshError, match="expected an integer"):
        parse_mesh_spec("expert=eight")


def test_mesh_must_fit_the_model():
    cfg = load_model_config(CONFIG_DIR / "kimi_k2_thinking.gin")
    check_mesh_fits(make_mesh(1, 8, 1), cfg)
    small = dataclasses.replace(cfg, n_routed_experts=12)
    with pytest.raises(MeshError, match="12 routed experts cannot be split over expert=8"):
        check_mesh_fits(make_mesh(1, 8, 1), small)
    odd_heads = dataclasses.replace(cfg, num_attention_heads=6)
    with pytest.raises(MeshError, match="6 attention heads cannot be split over tensor=4"):
        check_mesh_fits(make_mesh(1, 2, 4), odd_heads)


def test_rules_table_errors():
    assert spec_for(("layers", "experts", "expert_mlp", "embed")) == PartitionSpec(
        None, ("expert", "tensor"), None, None
    )
    with pytest.raises(ShardingRuleError, match="no rule"):
        spec_for(("embed", "mystery"))
    with pytest.raises(ShardingRuleError, match="twice"):
        spec_for(("experts", "heads"))  # both use `tensor`


def test_activation_constraints_use_the_strict_resolver():
    """`constrain` pins activations with spec_for: a no-op without a mesh, the layer-boundary
    layout flax's resolver also gives, and an error where flax would silently drop an axis."""
    x = jnp.ones((8, 4, 16))
    assert constrain(x, ("batch", "seq", "act_embed")) is x  # no context mesh
    mesh = make_mesh(2, 2, 2)
    with use_mesh(mesh):
        y = jax.jit(lambda x: constrain(x, ("batch", "seq", "act_embed")))(x)
        want = PartitionSpec(("data", "expert"), None, None)
        assert y.sharding.is_equivalent_to(NamedSharding(mesh, want), x.ndim)
        assert nn.logical_to_mesh_axes(("batch", "seq", "act_embed")) == want
        with pytest.raises(ShardingRuleError, match="twice"):
            jax.jit(lambda x: constrain(x, ("batch", "moe_tokens", None)))(x)


def test_every_full_size_array_has_a_rule():
    cfg = load_model_config(CONFIG_DIR / "kimi_k2_thinking.gin")
    model = Transformer(cfg, ComputeConfig(experts="int4"), LoraConfig(rank=16))
    boxed = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    specs = logical_specs(boxed)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)  # every array is named
    ex = specs["params"]["moe_layers"]["mlp"]["experts"]["gate_up_proj"]
    assert ex["weight_q"] == PartitionSpec(None, ("expert", "tensor"), None, None)
    assert ex["weight_scale"] == PartitionSpec(None, ("expert", "tensor"), None, None)
    attn = specs["params"]["moe_layers"]["self_attn"]
    assert attn["q_b_proj"]["weight"] == PartitionSpec(None, "tensor", None)
    assert attn["o_proj"]["weight"] == PartitionSpec(None, None, "tensor")
    assert specs["params"]["lm_head"]["weight"] == PartitionSpec("tensor", None)
    assert specs["lora"]["moe_layers"]["mlp"]["experts"]["down_proj"]["lora_A"] == PartitionSpec(
        None, ("expert", "tensor"), None, None
    )
    assert specs["params"]["moe_layers"]["mlp"]["gate"]["weight"] == PartitionSpec(None, None, None)


@pytest.fixture(scope="module")
def tiny():
    cfg = load_model_config(CONFIG_DIR / "tiny.gin")
    lora = LoraConfig(rank=4)
    model = Transformer(cfg, F32, lora)
    boxed = init_variables(model, jax.random.key(0), lora_rng=jax.random.key(1))
    v = nn.unbox(boxed)
    # A trained-looking adapter state: every factor (incl. B) random, so every adapter contributes
    # and gets a gradient. (A constant offset would be a degenerate rank-1 state whose gradients
    # are ill-conditioned in float32; in float64 the meshes agree to 1e-14 either way.)
    keys = iter(jax.random.split(jax.random.key(42), 1000))
    v["lora"] = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(keys), x.shape), v["lora"])
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (8, 12)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (8, 12)), jnp.float32)
    return model, boxed, v, tokens, mask


def _loss_and_grads(model, v, tokens, mask):
    def f(lora):
        sums, aux = model.apply(
            {"params": v["params"], "lora": lora},
            tokens,
            jnp.roll(tokens, -1, 1),
            mask,
            method=Transformer.loss,
        )
        return sums["loss_sum"], aux

    (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(v["lora"])
    logits = model.apply(v, tokens, method=Transformer.logits)
    return logits, loss, grads, aux


@pytest.fixture(scope="module")
def single_device(tiny):
    model, _, v, tokens, mask = tiny
    return jax.jit(functools.partial(_loss_and_grads, model))(v, tokens, mask)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_matches_single_device(tiny, single_device, shape):
    model, boxed, v, tokens, mask = tiny
    mesh = make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
    check_mesh_fits(mesh, model.cfg)
    specs = logical_specs(boxed)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    v_sharded = jax.device_put(v, shardings)
    # each array lives where the rules table says
    for arr, spec in zip(jax.tree.leaves(v_sharded), jax.tree.leaves(specs)):
        assert arr.sharding.spec == spec
    batch = NamedSharding(mesh, spec_for(("batch", "seq")))
    tokens_s, mask_s = jax.device_put(tokens, batch), jax.device_put(mask, batch)
    with use_mesh(mesh):
        logits, loss, grads, aux = jax.jit(functools.partial(_loss_and_grads, model))(
            v_sharded, tokens_s, mask_s
        )
    logits0, loss0, grads0, aux0 = single_device
    assert rel_err(logits, logits0) <= 1e-5
    assert rel_err(loss, loss0) <= 1e-5
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        g0 = functools.reduce(lambda t, k: t[k.key], path, grads0)
        assert rel_err(g, g0) <= 1e-5, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(aux["moe"]["expert_load"], aux0["moe"]["expert_load"])


def test_base_parameter_gradients_match_single_device(tiny):
    """Gradients w.r.t. every base weight, incl. the router replicated into the MoE's shard_map
    (its cotangent must be summed over devices), equal one device's on a 2×2×2 mesh."""
    model, boxed, v, tokens, _ = tiny
    base = Transformer(model.cfg, F32, None)

    def f(params, t):
        s, _ = base.apply(
            {"params": params}, t, jnp.roll(t, -1, 1), jnp.ones(t.shape), method=Transformer.loss
        )
        return s["loss_sum"]

    g0 = jax.jit(jax.grad(f))(v["params"], tokens)
    mesh = make_mesh(2, 2, 2)
    specs = logical_specs(boxed)["params"]
    params = jax.device_put(v["params"], jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    with use_mesh(mesh):
        g = jax.jit(jax.grad(f))(
            params, jax.device_put(tokens, NamedSharding(mesh, spec_for(("batch", "seq"))))
        )
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(g0)):
        assert rel_err(a, b) <= 1e-5, jax.tree_util.keystr(path)
    assert float(jnp.abs(g["moe_layers"]["mlp"]["gate"]["weight"]).max()) > 0


def test_chunked_expert_dispatch_equals_unchunked(tiny, single_device):
    """moe_chunk_tokens bounds the all-to-all buffers without changing the result."""
    model, boxed, v, tokens, mask = tiny
    chunked = model.clone(compute=dataclasses.replace(F32, moe_chunk_tokens=4))
    mesh = make_mesh(1, 4, 2)
    specs = logical_specs(boxed)
    v_sharded = jax.device_put(v, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    batch = NamedSharding(mesh, spec_for(("batch", "seq")))
    with use_mesh(mesh):
        logits, loss, grads, aux = jax.jit(functools.partial(_loss_and_grads, chunked))(
            v_sharded, jax.device_put(tokens, batch), jax.device_put(mask, batch)
        )
    logits0, loss0, grads0, aux0 = single_device
    assert rel_err(logits, logits0) <= 1e-5 and rel_err(loss, loss0) <= 1e-5
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        assert rel_err(g, g0) <= 1e-5
    np.testing.assert_array_equal(aux["moe"]["expert_load"], aux0["moe"]["expert_load"])
    bad = model.clone(compute=dataclasses.replace(F32, moe_chunk_tokens=5))
    with use_mesh(mesh), pytest.raises(ValueError, match="moe_chunk_tokens=5 must divide"):
        jax.jit(functools.partial(_loss_and_grads, bad))(
            v_sharded, jax.device_put(tokens, batch), jax.device_put(mask, batch)
        )
