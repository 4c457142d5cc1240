"""Parity with Hugging Face transformers' DeepseekV3 (torch, float32) on tiny random models.

One subprocess in the reference environment builds every case (tests/reference/hf_model.py): a
model with seeded non-trivial weights and a random router bias, saved with `save_pretrained`, plus
its logits and the inputs/outputs of every component. Here k2jax loads the saved folder with
`k2jax.load_model` and must reproduce each number: max|k2jax − HF| / max|HF| ≤ 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import K2_YARN, TINY_HF_CONFIG, rel_err, run_reference, write_json

import k2jax
from k2jax.model.layers import MLP, rms_norm
from k2jax.model.mla import MLA
from k2jax.model.moe import MoE, route
from k2jax.model.rope import rope_cos_sin, rope_parameters
from k2jax.model.transformer import DecoderLayer

TOL = 1e-5

K25_YARN = {**K2_YARN, "factor": 64.0, "beta_fast": 32.0}

BASE = TINY_HF_CONFIG


def _tokens(seed, batch, seq):
    return np.random.default_rng(seed).integers(0, 256, (batch, seq)).tolist()


CASES = {
    # Kimi-K2-Instruct-like: no group limit, YaRN factor 32 with beta_fast 1.
    "k2": dict(config=BASE, seed=1, tokens=_tokens(1, 2, 17)),
    # DeepSeek-V3-style group-limited routing: 4 groups, keep 2.
    "grouped": dict(
        config={
            **BASE,
            "n_routed_experts": 16,
            "n_group": 4,
            "topk_group": 2,
            "num_experts_per_tok": 3,
        },
        seed=2,
        tokens=_tokens(2, 2, 11),
    ),
    # Kimi-K2.5-like: YaRN factor 64 with beta_fast 32, rms_norm_eps 1e-5.
    "k25": dict(
        config={
            **BASE,
            "rope_scaling": K25_YARN,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 262144,
        },
        seed=3,
        tokens=_tokens(3, 1, 23),
    ),
    # Two dense layers, two shared experts, v_head_dim != qk_nope_head_dim, several lengths.
    "dense2": dict(
        config={
            **BASE,
            "num_hidden_layers": 4,
            "first_k_dense_replace": 2,
            "n_shared_experts": 2,
            "v_head_dim": 12,
        },
        seed=4,
        tokens=_tokens(4, 2, 9),
        extra_tokens={"len1": _tokens(5, 1, 1), "len40": _tokens(6, 2, 40)},
    ),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    spec = {"cases": [{"name": k, **v} for k, v in CASES.items()]}
    run_reference(
        "hf_model.py", "build", "--spec", write_json(out / "spec.json", spec), "--out", out
    )
    return out


def _load(reference, name):
    # transformers constructs the MLA latent norms with eps 1e-6 whatever rms_norm_eps says;
    # k2jax's default follows rms_norm_eps (see ModelConfig.latent_norm_eps), so match it here.
    model = k2jax.load_model(
        reference / name / "ckpt", dtype="float32", config_overrides={"latent_norm_eps": 1e-6}
    )
    outputs = np.load(reference / name / "outputs.npz", allow_pickle=False)
    return model, outputs


def _layer_params(model, i):
    c = model.config
    if i < c.first_k_dense_replace:
        stack, j = model.params["dense_layers"], i
    else:
        stack, j = model.params["moe_layers"], i - c.first_k_dense_replace
    return jax.tree.map(lambda x: x[j], stack)


def _positions(x):
    b, t = x.shape[:2]
    return jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), jnp.int32)


@pytest.mark.parametrize("name", list(CASES))
def test_logits(reference, name):
    model, out = _load(reference, name)
    assert rel_err(model.logits(out["tokens"]), out["logits"]) <= TOL
    for key, tokens in CASES[name].get("extra_tokens", {}).items():
        assert rel_err(model.logits(np.asarray(tokens)), out[f"logits.{key}"]) <= TOL, key


@pytest.mark.parametrize("name", list(CASES))
def test_loss(reference, name):
    """k2jax's chunked cross-entropy equals transformers' loss for labels = tokens."""
    model, out = _load(reference, name)
    tokens = jnp.asarray(out["tokens"])
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.ones_like(tokens, jnp.float32).at[:, -1].set(0)
    module = model.module.clone(
        compute=model.compute.__class__(**{**model.compute.__dict__, "loss_chunk_tokens": 5})
    )
    sums, _ = module.apply(model.variables(), tokens, targets, mask, method=type(module).loss)
    loss = float(sums["loss_sum"] / sums["count"])
    assert abs(loss - float(out["loss"])) / float(out["loss"]) <= TOL


@pytest.mark.parametrize("name", ["k2", "k25"])
def test_rope(reference, name):
    model, out = _load(reference, name)
    inv_freq, attention_factor = rope_parameters(model.config)
    np.testing.assert_allclose(inv_freq, out["rotary.inv_freq"], rtol=2.4e-7)  # ≤ 1 float32 ulp
    assert attention_factor == pytest.approx(float(out["rotary.attention_scaling"]), rel=1e-12)
    assert model.config.softmax_scale == pytest.approx(float(out["softmax_scale"]), rel=1e-12)
    t = out["tokens"].shape[1]
    pos = jnp.arange(t)[None]
    cos, sin = rope_cos_sin(pos, inv_freq, attention_factor, jnp.float32)
    half = out["rotary.cos"].shape[-1] // 2
    assert rel_err(cos[0], out["rotary.cos"][0, :, :half]) <= TOL
    assert rel_err(sin[0], out["rotary.sin"][0, :, :half]) <= TOL


@pytest.mark.parametrize("name", ["k2", "k25"])
def test_rms_norms(reference, name):
    model, out = _load(reference, name)
    c = model.config
    for i in range(c.num_hidden_layers):
        p = _layer_params(model, i)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            got = rms_norm(out[f"layers.{i}.{norm}.in"], p[norm]["weight"], c.rms_norm_eps)
            assert rel_err(got, out[f"layers.{i}.{norm}.out"]) <= TOL
        for norm in ("q_a_layernorm", "kv_a_layernorm"):
            x = out[f"layers.{i}.self_attn.{norm}.in"]
            got = rms_norm(x, p["self_attn"][norm]["weight"], c.latent_eps)
            assert rel_err(got, out[f"layers.{i}.self_attn.{norm}.out"]) <= TOL


@pytest.mark.parametrize("name", list(CASES))
def test_attention(reference, name):
    model, out = _load(reference, name)
    for i in range(model.config.num_hidden_layers):
        x = out[f"layers.{i}.self_attn.in"]
        p = _layer_params(model, i)["self_attn"]
        got, _ = MLA(model.config, model.compute).apply({"params": p}, x, *_positions(x))
        assert rel_err(got, out[f"layers.{i}.self_attn.out0"]) <= TOL, i


@pytest.mark.parametrize("name", ["k2", "grouped"])
def test_router(reference, name):
    model, out = _load(reference, name)
    c = model.config
    for i in range(c.first_k_dense_replace, c.num_hidden_layers):
        p = _layer_params(model, i)["mlp"]["gate"]
        x = out[f"layers.{i}.mlp.gate.in"].reshape(-1, c.hidden_size)
        idx, weights, logits = route(jnp.asarray(x), p["weight"], p["e_score_correction_bias"], c)
        assert rel_err(logits, out[f"layers.{i}.mlp.gate.out0"]) <= TOL
        ref_idx = out[f"layers.{i}.mlp.gate.out2"]
        ref_w = out[f"layers.{i}.mlp.gate.out1"]
        # torch.topk(sorted=False) lists the chosen experts in no fixed order: compare as sets.
        idx = np.asarray(idx)
        order, ref_order = np.argsort(idx, axis=1), np.argsort(ref_idx, axis=1)
        got_i, ref_i = np.take_along_axis(idx, order, 1), np.take_along_axis(ref_idx, ref_order, 1)
        np.testing.assert_array_equal(got_i, ref_i)
        got_w = np.take_along_axis(np.asarray(weights), order, 1)
        assert rel_err(got_w, np.take_along_axis(ref_w, ref_order, 1)) <= TOL
        if c.n_group > 1:  # the group limit must actually have excluded some experts
            per_group = c.n_routed_experts // c.n_group
            groups = got_i // per_group
            assert len(np.unique(groups)) > c.topk_group  # over all tokens, more groups are used
            assert all(len(set(row.tolist())) <= c.topk_group for row in groups)  # per token, few


@pytest.mark.parametrize("name", ["k2", "grouped", "dense2"])
def test_mlp_and_moe(reference, name):
    model, out = _load(reference, name)
    c = model.config
    for i in range(c.num_hidden_layers):
        p = _layer_params(model, i)["mlp"]
        x = out[f"layers.{i}.mlp.in"]
        if i < c.first_k_dense_replace:
            got = MLP(c.intermediate_size, model.compute).apply({"params": p}, x)
        else:
            got, aux = MoE(c, model.compute).apply({"params": p}, x)
            load = aux["expert_load"]
            assert float(load.sum()) == x.shape[0] * x.shape[1] * c.num_experts_per_tok
        assert rel_err(got, out[f"layers.{i}.mlp.out"]) <= TOL, i


@pytest.mark.parametrize("name", ["k2", "dense2"])
def test_decoder_layer(reference, name):
    model, out = _load(reference, name)
    c = model.config
    for i in range(c.num_hidden_layers):
        x = out[f"layers.{i}.in"]
        layer = DecoderLayer(c, model.compute, None, moe=i >= c.first_k_dense_replace)
        got, aux = layer.apply({"params": _layer_params(model, i)}, x, *_positions(x))
        assert rel_err(got, out[f"layers.{i}.out"]) <= TOL, i
        assert aux["max_logit"].shape == (c.num_attention_heads,)


def test_final_norm(reference):
    model, out = _load(reference, "k2")
    got = rms_norm(out["norm.in"], model.params["norm"]["weight"], model.config.rms_norm_eps)
    assert rel_err(got, out["norm.out"]) <= TOL


def test_latent_norm_eps_default_follows_config(reference):
    """With rms_norm_eps 1e-5 and the default latent_norm_eps, the latent norms use 1e-5 (and so
    differ from transformers, which hard-codes 1e-6): the field is really wired through."""
    default = k2jax.load_model(reference / "k25" / "ckpt", dtype="float32")
    assert default.config.latent_eps == 1e-5
    out = np.load(reference / "k25" / "outputs.npz", allow_pickle=False)
    p = _layer_params(default, 0)["self_attn"]
    x = out["layers.0.self_attn.q_a_layernorm.in"]
    got = rms_norm(x, p["q_a_layernorm"]["weight"], default.config.latent_eps)
    assert rel_err(got, out["layers.0.self_attn.q_a_layernorm.out"]) > TOL / 100
