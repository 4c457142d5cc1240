"""The optimizer pieces on small arrays: Muon per expert against an independent Newton–Schulz,
AdamW for non-LoRA leaves, decoupled weight decay, the schedules, QK-clip's γ rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rel_err

from k2jax.config import ConfigError
from k2jax.optim import (
    OptimConfig,
    ScheduleConfig,
    clip_gamma,
    make_optimizer,
    make_schedule,
    muon_dimension_numbers,
    update_qk_clip,
)

NS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """Moonlight's reference orthogonalisation (K2_FACTS §5.1), in float64 numpy."""
    x = g / (np.linalg.norm(g) + 1e-8)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    a, b, c = NS
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if transposed else x


def _tree(rng):
    """A trainable tree like the trainer's: stacked expert LoRA factors and a router weight."""
    return {
        "lora": {
            "experts": {
                "down_proj": {
                    "lora_A": jnp.asarray(rng.normal(size=(2, 3, 4, 16)), jnp.float32),
                    "lora_B": jnp.asarray(rng.normal(size=(2, 3, 24, 4)), jnp.float32),
                }
            }
        },
        "params": {"gate": {"weight": jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)}},
    }


def test_muon_orthogonalises_every_expert_of_every_layer_on_its_own():
    rng = np.random.default_rng(0)
    params = _tree(rng)
    grads = _tree(rng)
    lr = 0.01
    config = OptimConfig(learning_rate=lr, grad_clip_norm=None)
    opt = make_optimizer(config, lambda count: lr, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    for name in ("lora_A", "lora_B"):
        g = np.asarray(grads["lora"]["experts"]["down_proj"][name], np.float64)
        u = np.asarray(updates["lora"]["experts"]["down_proj"][name], np.float64)
        scale = 0.2 * np.sqrt(max(g.shape[-2:]))  # consistent RMS: 0.2·√max(fan_in, fan_out)
        for layer in range(2):
            for expert in range(3):
                # Step 1's Nesterov momentum is a multiple of the gradient, which the Frobenius
                # normalisation removes: the update is −lr · scale · NS(g) of this expert alone.
                want = -lr * scale * newton_schulz(g[layer, expert])
                assert rel_err(u[layer, expert], want) <= 1e-4, (name, layer, expert)
    # The router weight is not a LoRA factor: AdamW (Nesterov, as optax's muon passes it), whose
    # first step is lr · (1 + b1 / (1 + b1)) · sign(g) in every element.
    u = np.asarray(updates["params"]["gate"]["weight"])
    g = np.asarray(grads["params"]["gate"]["weight"])
    np.testing.assert_allclose(u, -lr * (1 + 0.9 / 1.9) * np.sign(g), rtol=1e-4)


def test_dimension_numbers_mark_only_lora_factors():
    dims = muon_dimension_numbers(_tree(np.random.default_rng(1)))
    a = dims["lora"]["experts"]["down_proj"]["lora_A"]
    assert (a.reduction_axis, a.output_axis) == (-1, -2)
    assert dims["params"]["gate"]["weight"] is None


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_weight_decay_is_decoupled_and_scaled_by_lr(name):
    params = _tree(np.random.default_rng(2))
    zeros = jax.tree.map(jnp.zeros_like, params)
    opt = make_optimizer(
        OptimConfig(name=name, learning_rate=0.1, weight_decay=0.5, grad_clip_norm=None),
        lambda count: 0.1,
        params,
    )
    updates, _ = opt.update(zeros, opt.init(params), params)
    a = params["lora"]["experts"]["down_proj"]["lora_A"]
    np.testing.assert_allclose(
        updates["lora"]["experts"]["down_proj"]["lora_A"], -0.1 * 0.5 * a, rtol=1e-5
    )


def test_gradient_clipping_bounds_the_global_norm():
    params = _tree(np.random.default_rng(3))
    big = jax.tree.map(lambda x: 100.0 * x, params)
    opt = make_optimizer(OptimConfig(name="adamw", grad_clip_norm=1.0), lambda c: 1.0, params)
    # The first transformation of the chain is the clip; check what it hands to AdamW.
    clip_state, _ = opt.init(params)
    clipped, _ = optax.clip_by_global_norm(1.0).update(big, clip_state)
    assert abs(float(optax.tree.norm(clipped)) - 1.0) < 1e-5


def test_muon_needs_lora_factors():
    with pytest.raises(ConfigError, match="no LoRA factors"):
        make_optimizer(OptimConfig(), lambda c: 1.0, {"params": {"w": jnp.ones((2, 2))}})


def test_schedules():
    lr = lambda cfg, steps=100: make_schedule(cfg, 1.0, steps)  # noqa: E731
    const = lr(ScheduleConfig(name="constant", warmup_steps=4))
    np.testing.assert_allclose([const(c) for c in range(6)], [0.25, 0.5, 0.75, 1, 1, 1])
    cos = lr(ScheduleConfig(name="cosine", warmup_steps=10, final_fraction=0.1))
    assert float(cos(0)) == pytest.approx(0.1)
    assert float(cos(10)) == pytest.approx(1.0)
    assert float(cos(55)) == pytest.approx(0.55, abs=1e-6)  # half way: (1 + 0.1) / 2
    assert float(cos(100)) == pytest.approx(0.1)
    wsd = lr(ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=0.2, final_fraction=0.0))
    assert [float(wsd(c)) for c in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert float(wsd(89)) == pytest.approx(0.5)  # linear from step 80 to the last one (99)
    assert float(wsd(99)) == pytest.approx(0.0)
    sqrt = lr(ScheduleConfig(name="wsd", decay_fraction=0.5, decay_shape="sqrt", final_fraction=0))
    assert float(sqrt(74)) == pytest.approx(1 - np.sqrt(0.5))
    with pytest.raises(ConfigError, match="warmup_steps"):
        make_schedule(ScheduleConfig(warmup_steps=10), 1.0, 10)
    with pytest.raises(ConfigError, match="schedule.name"):
        ScheduleConfig(name="linear")


def test_optim_config_errors():
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        OptimConfig(learning_rate=0)
    with pytest.raises(ConfigError, match="optim.name"):
        OptimConfig(name="sgd")
    with pytest.raises(ConfigError, match="optim.qk_clip_tau"):
        OptimConfig(qk_clip_tau=-1.0)


def test_qk_clip_gamma_and_factors():
    tau = 10.0
    s = jnp.array([[5.0, 10.0, 20.0, 40.0], [jnp.nan, jnp.inf, -50.0, 11.0]])
    np.testing.assert_allclose(clip_gamma(s, tau), [[1, 1, 0.5, 0.25], [1, 1, 1, 10 / 11]])
    qk = {"moe_layers": {"self_attn": {"scales": jnp.full((2, 3, 4), 0.5)}}}
    new, clipped = update_qk_clip(qk, {"moe": {"max_logit": s}}, tau)
    got = np.asarray(new["moe_layers"]["self_attn"]["scales"])
    g = np.asarray(clip_gamma(s, tau))
    # existing factors are multiplied: q_nope, k_nope by √γ; q_rope by γ
    np.testing.assert_allclose(got[:, 0], 0.5 * np.sqrt(g), rtol=1e-6)
    np.testing.assert_allclose(got[:, 1], 0.5 * g, rtol=1e-6)
    np.testing.assert_allclose(got[:, 2], 0.5 * np.sqrt(g), rtol=1e-6)
    assert int(clipped) == 3
