"""QK-clip on the tiny model: after clipping, every clipped head's max logit on the same batch is
τ (≤ τ within 1%), every other head is unchanged — with K2's τ = 100 on adapters grown to
produce logits far above it, and with a small τ on ordinary ones. And the thresholds: τ read in
pre-training units (× the YaRN factor m²), never below a head's own max at the first step, so the
model a run starts from is never rescaled by QK-clip itself."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from k2_checkpoints import perturbed

from k2jax.config import CONFIG_DIR, load_model_config
from k2jax.lora import LoraConfig
from k2jax.model import ComputeConfig, Transformer
from k2jax.model.transformer import init_variables
from k2jax.optim import logit_scale_factor, set_thresholds, unset_thresholds, update_qk_clip

F32 = ComputeConfig(dtype="float32", param_dtype="float32", remat="none")


@pytest.fixture(scope="module")
def tiny():
    cfg = load_model_config(CONFIG_DIR / "tiny.gin")
    model = Transformer(cfg, F32, LoraConfig(rank=4))
    v = nn.unbox(init_variables(model, jax.random.key(0), lora_rng=jax.random.key(1)))
    v["lora"] = perturbed(v["lora"], jax.random.key(2))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
    mask = jnp.ones(tokens.shape, jnp.float32)

    @jax.jit
    def max_logits(variables):
        _, aux = model.apply(variables, tokens, tokens, mask, method=Transformer.loss)
        return {k: a["max_logit"] for k, a in aux.items()}

    max_logits.cfg = cfg
    return v, max_logits


def _grow_last_layer_query_key(lora, factor):
    """Scales the LoRA B of q_b_proj and kv_b_proj of the last layer: its queries and keys grow,
    its logits by about factor²; the layers before it are untouched."""
    out = jax.tree.map(lambda x: x, lora)
    attn = out["moe_layers"]["self_attn"]
    for name in ("q_b_proj", "kv_b_proj"):
        attn[name]["lora_B"] = attn[name]["lora_B"].at[-1].multiply(factor)
    return out


def _check_clipped(S, after, tau, rtol):
    for stack, s in S.items():
        a = np.asarray(after[stack])
        over = s > tau
        assert np.all(a[over] <= tau * 1.01), (stack, a[over])
        np.testing.assert_allclose(a[over], tau, rtol=rtol)


def test_k2_tau_clips_the_exploding_heads_to_tau(tiny):
    """τ = 100 (K2) against adapters that drive one layer's logits into the hundreds. The clipped
    layer is the last, so nothing upstream of any head changes: clipped heads end at exactly
    τ = γ·S, all other heads keep their logits bit for bit."""
    v, max_logits = tiny
    v = {**v, "lora": _grow_last_layer_query_key(v["lora"], 60.0)}
    before = max_logits(v)
    tau = 100.0
    S = {k: np.asarray(x) for k, x in before.items()}
    n_over = sum(int((s > tau).sum()) for s in S.values())
    assert n_over > 0 and S["moe"][-1].max() > 3 * tau  # a real explosion to clip
    assert S["moe"][:-1].max() < tau and S["dense"].max() < tau

    aux = {k: {"max_logit": x} for k, x in before.items()}  # the step's aux, as the model gives it
    new_qk, clipped = update_qk_clip(v["qk_clip"], aux, tau)
    assert int(clipped) == n_over
    after = {k: np.asarray(x) for k, x in max_logits({**v, "qk_clip": new_qk}).items()}
    _check_clipped(S, after, tau, rtol=1e-4)
    for stack, s in S.items():
        np.testing.assert_array_equal(after[stack][s <= tau], s[s <= tau])
    # The factors only shrink; the query's rotary part by the square of the nope parts.
    for node in new_qk.values():
        f = np.asarray(node["self_attn"]["scales"])
        assert np.all(f <= 1.0)
        np.testing.assert_allclose(f[:, 1], f[:, 0] ** 2, rtol=1e-6)
        np.testing.assert_array_equal(f[:, 0], f[:, 2])


def test_small_tau_in_every_layer(tiny):
    """τ at the median head: half the heads of every layer clip at once. The first layer's heads
    see unchanged inputs and end at exactly τ; later layers' inputs move with the clipping of the
    layers before them (by a few %), which the next step's clip corrects — as in training, where
    QK-clip runs after every update. Two rounds on the same batch bring every head to ≤ τ (1%)."""
    v, max_logits = tiny
    before = max_logits(v)
    tau = float(np.median(np.concatenate([np.ravel(x) for x in before.values()])))
    qk = v["qk_clip"]
    S = {k: np.asarray(x) for k, x in before.items()}
    for round_ in range(2):
        aux = {k: {"max_logit": jnp.asarray(x)} for k, x in S.items()}
        qk, clipped = update_qk_clip(qk, aux, tau)
        assert int(clipped) == sum(int((s > tau).sum()) for s in S.values())
        after = {k: np.asarray(x) for k, x in max_logits({**v, "qk_clip": qk}).items()}
        if round_ == 0:
            first = S["dense"][0] > tau
            assert first.any()
            np.testing.assert_allclose(after["dense"][0][first], tau, rtol=1e-4)
        S = after
    for s in S.values():
        assert np.all(s <= tau * 1.01), s


def test_thresholds_never_rescale_the_starting_model(tiny):
    """τ below every head's logit: the old rule (S > τ) would clip every head at the first step.
    The thresholds are max(τ·m², S at the first step): nothing is clipped then, whatever the
    heads' range; later, a head that grows past its own starting max is clipped back to it."""
    v, max_logits = tiny
    m2 = logit_scale_factor(max_logits.cfg)
    assert m2 == pytest.approx((0.1 * np.log(64.0) + 1) ** 2)  # K2-Thinking's YaRN, factor 64
    S = {k: np.asarray(x) for k, x in max_logits(v).items()}
    flat = np.concatenate([s.ravel() for s in S.values()])
    # τ between the heads in pre-training units: some heads are above τ·m², all above τ.
    tau = 0.9 * float(flat.min())
    assert (flat > tau).all() and (flat > tau * m2).any() and (flat <= tau * m2).any()
    aux = {k: {"max_logit": jnp.asarray(x)} for k, x in S.items()}
    _, old_clipped = update_qk_clip(v["qk_clip"], aux, tau)
    assert int(old_clipped) == flat.size  # the rule this replaces clips the whole model

    thr = set_thresholds(unset_thresholds(v["qk_clip"]), aux, tau * m2)
    for stack, key in (("dense_layers", "dense"), ("moe_layers", "moe")):
        np.testing.assert_allclose(np.asarray(thr[stack]), np.maximum(tau * m2, S[key]))
    qk, clipped = update_qk_clip(v["qk_clip"], aux, thr)
    assert int(clipped) == 0
    for node in jax.tree.leaves(qk):
        np.testing.assert_array_equal(np.asarray(node), 1.0)
    # set once: a later step keeps them
    again = set_thresholds(thr, {k: {"max_logit": 2 * a["max_logit"]} for k, a in aux.items()}, 0)
    for stack in thr:
        np.testing.assert_array_equal(np.asarray(again[stack]), np.asarray(thr[stack]))

    # The last layer's heads grow (LoRA): those past their threshold are clipped back to it.
    grown = {**v, "lora": _grow_last_layer_query_key(v["lora"], 60.0)}
    G = {k: np.asarray(x) for k, x in max_logits(grown).items()}
    qk, clipped = update_qk_clip(
        v["qk_clip"], {k: {"max_logit": jnp.asarray(x)} for k, x in G.items()}, thr
    )
    over = G["moe"] > np.asarray(thr["moe_layers"])
    assert over[-1].any() and int(clipped) == int(over.sum())
    after = np.asarray(max_logits({**grown, "qk_clip": qk})["moe"])
    np.testing.assert_allclose(after[over], np.asarray(thr["moe_layers"])[over], rtol=1e-4)
