"""CE-LoRA (`lora.backward = "ce"`, k2jax/ops/ce_backward.py): the activation gradient through
frozen weights approximated by a rank-k part of W plus its most important rows.

Checked against the exact backward: the dense op and the grouped (routed-expert) op — XLA and
Pallas, dense and INT4 — keep the forward bit for bit, are exact with every row kept and (to
rounding) at full rank, leave the LoRA gradients of the op itself exact, and are a real
approximation in between; the randomized factors are near the optimal truncated SVD; on the tiny
model the loss is unchanged, the LoRA gradients equal the exact ones at keep-all and full rank,
the last layer's gradients are exact at any setting (its dY is), and a run trains.

Carried rows (lora.ce_refresh ≥ 1): given the rows a backward would choose, the ops give its dX,
and their probes' cotangents are the Σ dY² the choice is made from; the step chooses at every
N-th step from the sum since the last choice, so one device, a chunked expert-parallel mesh with
overflow rounds, and gradient accumulation all train alike; the rows survive a checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FAST_COMPILE, rel_err

from k2jax.config import CONFIG_DIR, ConfigError, load_model_config
from k2jax.data import DEMO_CHATS, DataConfig, KimiTokenizer, PackedBatches
from k2jax.data.testing import write_tiny_tokenizer
from k2jax.lora import LoraConfig
from k2jax.ops.ce_backward import (
    GroupedFactors,
    ce_matmul,
    choose_rows,
    factors,
    grouped_factors,
    kept_rows,
)
from k2jax.ops.grouped_matmul import GroupedLora, grouped_matmul
from k2jax.quant import quantize_int4
from k2jax.sharding import make_mesh
from k2jax.train import RunConfig, StepSpec, build_program
from k2jax.train.state import at_path

TINY_TRAIN = CONFIG_DIR / "tiny_train.gin"
CE = ('lora.backward="ce"', "lora.ce_rank=4", "lora.ce_keep=0.1")


def _vjp(f, x, dy):
    y, pull = jax.vjp(f, x)
    return y, pull(dy)[0]


def test_the_op_is_exact_at_its_limits_and_approximate_between():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 48)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 48)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((3, 5, 40)), jnp.float32)
    y, exact = _vjp(lambda x: jnp.einsum("...i,oi->...o", x, w), x, dy)

    def ce(rank, keep):
        us, vt, rnorm = factors(w, rank)
        return _vjp(lambda x: ce_matmul(x, w, us, vt, rnorm, kept_rows(40, keep)), x, dy)

    y_keep_all, keep_all = ce(8, 1.0)
    assert np.array_equal(y_keep_all, y)  # the forward is untouched
    assert rel_err(keep_all, exact) <= 1e-6
    assert rel_err(ce(40, 0.0)[1], exact) <= 1e-5  # full rank: the residual is rounding
    errors = [rel_err(ce(8, keep)[1], exact) for keep in (0.0, 0.25, 0.5)]
    assert 0.05 < errors[-1] < errors[1] < errors[0] < 1.0  # more rows kept, less error


def test_factors_are_the_truncated_svd():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((2, 12, 9)), jnp.float32)
    us, vt, rnorm = factors(w, 4)
    assert us.shape == (2, 12, 4) and vt.shape == (2, 4, 9) and rnorm.shape == (2, 12)
    s = np.linalg.svd(np.asarray(w), compute_uv=False)
    residual = np.asarray(w - us @ vt)
    # Eckart–Young: the residual's Frobenius norm is that of the dropped singular values
    assert np.allclose(np.linalg.norm(residual, axis=(1, 2)), np.sqrt((s[:, 4:] ** 2).sum(1)), 1e-5)
    assert np.allclose(np.linalg.norm(residual, axis=2), rnorm, 1e-5)


def test_randomized_factors_are_near_the_optimum():
    # a spectrum that decays like a trained weight's: σ_i = 0.9^i
    rng = np.random.default_rng(2)
    u = np.linalg.qr(rng.standard_normal((200, 150)))[0]
    v = np.linalg.qr(rng.standard_normal((150, 150)))[0]
    s = 0.9 ** np.arange(150)
    w = jnp.asarray((u * s) @ v.T, jnp.float32)
    us, vt, _ = factors(w, 16, randomized=True)
    optimum = np.sqrt((s[16:] ** 2).sum())
    error = np.linalg.norm(np.asarray(w - us @ vt))
    assert 0.999 * optimum <= error <= 1.01 * optimum  # (0.999: float32 against float64)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_the_grouped_op_is_exact_at_full_rank_and_keeps_lora_exact(impl):
    rng = np.random.default_rng(3)
    G, N, K, M, r = 4, 48, 64, 40, 4
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    x_lora = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)  # a separate (dropout) input
    dense = jnp.asarray(rng.standard_normal((G, N, K)) / 8, jnp.float32)
    sizes = jnp.array([10, 0, 17, 9], jnp.int32)  # an empty group and 4 padding rows
    lora = GroupedLora(
        jnp.asarray(rng.standard_normal((G, r, K)) / 8, jnp.float32),
        jnp.asarray(rng.standard_normal((G, N, r)) / 8, jnp.float32),
        scale=0.5,
    )
    dy = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # Pallas: interpret mode
    def vjp(w, lora_x, ce):
        f = lambda x, lx, lo: grouped_matmul(  # noqa: E731
            x, w, sizes, lora=lo, lora_x=lx, impl=impl, ce=ce
        )
        y, pull = jax.vjp(f, x, lora_x, lora)
        return y, pull(dy)

    for w, lora_x in [(dense, None), (quantize_int4(dense), x_lora)]:
        y, (dx, dlx, dlora) = vjp(w, lora_x, None)

        def ce(rank, keep, w=w):
            f = grouped_factors(w, rank, jnp.float32)
            return GroupedFactors(f["ce_ust"], f["ce_v"], f["ce_rnorm"], kept_rows(N, keep))

        y_full, (dx_full, dlx_full, dlora_full) = vjp(w, lora_x, ce(K, 0.0))
        assert np.array_equal(y_full, y)  # the forward is untouched
        assert rel_err(dx_full, dx) <= 1e-5  # full rank: the residual is rounding
        assert not np.any(dx_full[36:])  # padding rows get no gradient
        for got, want in [(dlx_full, dlx), (dlora_full.a, dlora.a), (dlora_full.b, dlora.b)]:
            assert got is want is None or np.array_equal(got, want)  # LoRA's own backward
        errors = [rel_err(vjp(w, lora_x, ce(8, keep))[1][0], dx) for keep in (0.0, 0.25, 0.75)]
        assert 0.05 < errors[-1] < errors[1] < errors[0] < 1.0  # more rows kept, less error


def test_carried_rows_give_the_chosen_rows_product_and_probes_report_dy_squared():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((6, 48)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 48)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((6, 40)), jnp.float32)
    us, vt, rnorm = factors(w, 8)
    m, dy_sq = kept_rows(40, 0.25), jnp.sum(dy**2, axis=0)
    rows = choose_rows(dy_sq, rnorm, m)
    _, own = _vjp(lambda x: ce_matmul(x, w, us, vt, rnorm, m), x, dy)
    _, pull = jax.vjp(lambda x, s: ce_matmul(x, w, us, vt, rnorm, m, rows, s), x, 0 * rnorm)
    dx, d_score = pull(dy)
    assert np.array_equal(dx, own)  # the rows this dY would choose: the same product
    assert rel_err(d_score, dy_sq) <= 1e-6  # the probe's cotangent: Σ dY² per row
    other = (rows + 1) % 40  # other rows: another product
    assert not np.allclose(_vjp(lambda x: ce_matmul(x, w, us, vt, rnorm, m, other), x, dy)[1], dx)
    # nothing seen yet: the residual's row norms alone choose
    assert set(np.asarray(choose_rows(0 * dy_sq, rnorm, m))) == set(np.argsort(-rnorm)[:m])


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_grouped_carried_rows_and_probes(impl):
    rng = np.random.default_rng(5)
    G, N, K, M = 4, 48, 64, 40
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = quantize_int4(jnp.asarray(rng.standard_normal((G, N, K)) / 8, jnp.float32))
    sizes = jnp.array([10, 0, 17, 9], jnp.int32)  # an empty group and 4 padding rows
    dy = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
    f = grouped_factors(w, 8, jnp.float32)
    m = kept_rows(N, 0.25)
    ce = GroupedFactors(f["ce_ust"], f["ce_v"], f["ce_rnorm"], m)
    ends = np.cumsum(sizes)
    expert = np.searchsorted(ends, np.arange(M), side="right")
    dy_sq = np.stack([(np.asarray(dy)[expert == g] ** 2).sum(0) for g in range(G)])

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)  # Pallas: interpret mode
    def vjp(ce, score):
        def f(x, score):
            c = ce if score is None else dataclasses.replace(ce, score=score)
            return grouped_matmul(x, w, sizes, impl=impl, ce=c)

        return jax.vjp(f, x, score)[1](dy)

    own = vjp(ce, None)[0]
    carried = dataclasses.replace(ce, rows=choose_rows(jnp.asarray(dy_sq), ce.rnorm, m))
    dx, d_score = vjp(carried, jnp.zeros((G, N), jnp.float32))
    assert np.array_equal(dx, own)  # the rows this dY would choose: the same product
    assert rel_err(d_score, dy_sq) <= 1e-6  # each expert's Σ dY² over its rows
    assert not np.any(dx[36:])  # padding rows get no gradient
    stale = dataclasses.replace(ce, rows=(carried.rows + 1) % N)  # other rows: another product
    assert not np.allclose(vjp(stale, None)[0], dx)


def test_knobs_are_checked():
    for kw, match in [
        ({"backward": "fast"}, "'exact' or 'ce'"),
        ({"ce_rank": 0}, "ce_rank"),
        ({"ce_keep": 1.5}, "ce_keep"),
        ({"ce_refresh": -1}, "ce_refresh"),
    ]:
        with pytest.raises(ConfigError, match=match):
            LoraConfig(**kw)
    assert LoraConfig(backward="ce").exact.backward == "exact"


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder)
    data = PackedBatches(
        DataConfig(path=str(DEMO_CHATS), seq_len=128, batch_size=8), KimiTokenizer.from_dir(folder)
    )
    return next(data)


@functools.cache
def _program(*overrides):
    run = RunConfig.load(TINY_TRAIN, ["train.run_dir='unused'", *overrides])
    spec = StepSpec.from_run_config(run, load_model_config(CONFIG_DIR / "tiny.gin"))
    return build_program(spec, make_mesh(devices=jax.devices()[:1]))


def _loss_and_grads(batch, *overrides):
    program = _program(*overrides)
    frozen, tparams = program.init_base(0)
    state = program.init_state(0, tparams)
    mb = jax.tree.map(lambda x: x[0], program.device_batch(batch))

    def loss(tr):
        sums, _ = program._apply_loss(tr, state["qk_clip"], frozen, mb, None)
        return sums["loss_sum"] / sums["count"]

    # B starts at zero, where A's gradient vanishes: move B off zero to see every factor
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if p[-1].key == "lora_B" else x, state["trainable"]
    )
    value, grads = jax.value_and_grad(loss)(trainable)
    return float(value), grads["lora"]


def _flat(tree):
    return {
        "/".join(str(k.key) for k in p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_lora_gradients_against_the_exact_backward(batch):
    loss, exact = _loss_and_grads(batch)
    exact = _flat(exact)
    full, keep_all = (
        _flat(_loss_and_grads(batch, 'lora.backward="ce"', *kw)[1])
        for kw in (
            ["lora.ce_rank=4096", "lora.ce_keep=0.0"],
            ["lora.ce_rank=1", "lora.ce_keep=1.0"],
        )
    )
    approx_loss, approx = _loss_and_grads(
        batch, 'lora.backward="ce"', "lora.ce_rank=4", "lora.ce_keep=0.1"
    )
    approx = _flat(approx)
    assert approx_loss == pytest.approx(loss, rel=1e-6)  # the forward is exact
    for name, g in exact.items():
        assert rel_err(keep_all[name], g) <= 1e-5, name
        assert rel_err(full[name], g) <= 1e-4, name
    # the last layer's MLP down projections see the exact dY of the final norm (no approximated
    # product lies between them and the loss); everything else gets an approximated dX
    last = [n for n in exact if n.startswith("moe_layers/mlp/") and "/down_proj/" in n]
    assert len(last) == 4  # shared and routed experts, A and B
    for name in last:
        assert rel_err(approx[name][-1], exact[name][-1]) <= 1e-5, name
    o_proj = "moe_layers/self_attn/o_proj/lora_A"  # its dY passes the shared expert's backward
    assert rel_err(approx[o_proj][-1], exact[o_proj][-1]) > 1e-3
    gate = "moe_layers/mlp/experts/gate_proj/lora_A"  # its dY passes the experts' down
    assert rel_err(approx[gate][-1], exact[gate][-1]) > 1e-3
    first = "dense_layers/self_attn/q_a_proj/lora_B"
    assert rel_err(approx[first], exact[first]) > 1e-3  # and the approximation is real


def _train(program, batch, steps):
    frozen, tparams = program.init_base(0)
    state = program.init_state(0, tparams)
    b = program.device_batch(batch)
    losses = []
    for _ in range(steps):
        state, m = program.train_step(state, frozen, b)
        losses.append(float(jax.device_get(m["loss"])))
    return frozen, losses


# One exchange round and one MoE chunk: then every expert's rows meet in one grouped matmul, as on
# one device (with more, each call chooses its own kept rows: ce_backward.py).
ONE_CALL = ("compute.moe_capacity_factor=8.0", "compute.moe_overlap_chunks=1")


def test_a_ce_run_trains_on_one_device_and_the_expert_parallel_mesh(batch):
    frozen, losses = _train(_program(*CE), batch, 8)
    assert "ce_us" in frozen["moe_layers"]["self_attn"]["q_b_proj"]
    assert "ce_ust" in frozen["moe_layers"]["mlp"]["experts"]["gate_up_proj"]
    assert all(np.diff(losses) < 0) and losses[-1] < losses[0] - 0.5, losses
    run = RunConfig.load(TINY_TRAIN, ["train.run_dir='unused'", *CE, *ONE_CALL, "mesh.expert=8"])
    spec = StepSpec.from_run_config(run, load_model_config(CONFIG_DIR / "tiny.gin"))
    mesh = _train(build_program(spec, make_mesh(1, 8, 1)), batch, 3)[1]
    assert np.allclose(mesh, losses[:3], rtol=1e-5), (mesh, losses)  # (one device: no exchange)


REFRESH = (*CE, "lora.ce_refresh=2")


def test_carried_rows_are_chosen_every_n_steps_from_the_scores_since(batch):
    program = _program(*REFRESH)  # N = 2: rows chosen at steps 0 (by rnorm), 1, 3, 5, ...
    frozen, tparams = program.init_base(0)
    state = program.init_state(0, tparams)
    b = program.device_batch(batch)
    seen = []
    for _ in range(4):
        state, _ = program.train_step(state, frozen, b)
        seen.append(jax.device_get(state["ce"]))
    leaves = jax.tree_util.tree_flatten_with_path(seen[0]["rows"])[0]
    assert any(k.key == "experts" for p, _ in leaves for k in p)  # routed experts carry rows
    for path, _ in leaves:
        keys = tuple(k.key for k in path[:-1])
        rnorm = at_path(frozen, keys)["ce_rnorm"]
        (r0, r1, r2, r3), (s0, s1, s2, _) = (
            [np.asarray(at_path(x[part], keys)[name]) for x in seen]
            for part, name in (("rows", "rows"), ("score", "score"))
        )
        m = r0.shape[-1]
        assert np.array_equal(r0, choose_rows(0 * s0, rnorm, m)), keys  # step 0: by rnorm
        assert np.array_equal(r1, choose_rows(s0, rnorm, m)), keys  # step 1: from step 0's
        assert np.array_equal(r2, r1), keys  # step 2: carried ...
        assert np.all(s2 >= s1) and np.any(s2 > s1), keys  # ... while the scores add up
        assert np.array_equal(r3, choose_rows(s2, rnorm, m)), keys  # step 3: chosen afresh


def test_carried_rows_train_alike_on_a_chunked_mesh_and_with_gradient_accumulation(batch):
    """With rows chosen per call, each MoE chunk, overflow round, microbatch and data replica
    keeps its own rows; carried rows are the same in all of them, so every layout gives one
    device's run (per-call rows, lora.ce_refresh = 0, missed rtol 1e-5 by 6× with gradient
    accumulation and by 14× on an expert=8 mesh with these chunks)."""
    one = _train(_program(*REFRESH), batch, 3)[1]
    accum = _train(_program(*REFRESH, "train.grad_accum=2"), batch, 3)[1]
    assert np.allclose(accum, one, rtol=1e-5), (accum, one)
    chunked = ("compute.moe_chunk_tokens=32", "compute.moe_capacity_factor=1.0")
    chunked += ("mesh.data=2", "mesh.expert=4")
    run = RunConfig.load(TINY_TRAIN, ["train.run_dir='unused'", *REFRESH, *chunked])
    program = build_program(
        StepSpec.from_run_config(run, load_model_config(CONFIG_DIR / "tiny.gin")),
        make_mesh(2, 4, 1),
    )
    frozen, tparams = program.init_base(0)
    state, b, mesh = program.init_state(0, tparams), program.device_batch(batch), []
    for _ in range(3):
        state, metrics = program.train_step(state, frozen, b)
        mesh.append(float(jax.device_get(metrics["loss"])))
    assert int(metrics["moe_exchange_rounds"]) > 1  # overflow rounds ran
    assert np.allclose(mesh, one, rtol=1e-5), (mesh, one)


def test_carried_rows_survive_a_checkpoint(batch, tmp_path):
    from k2jax.train.checkpoint import Checkpointer, CheckpointError

    program = _program(*REFRESH)
    frozen, tparams = program.init_base(0)
    state, b = program.init_state(0, tparams), program.device_batch(batch)
    state, _ = program.train_step(state, frozen, b)  # mid-period: rows carried, scores partial
    saver = Checkpointer(tmp_path / "run", async_save=False)
    saver.save(1, state, {})

    def losses(state):
        out = []
        for _ in range(2):
            state, m = program.train_step(state, frozen, b)
            out.append(float(jax.device_get(m["loss"])))
        return out, jax.device_get(state["ce"])

    straight, ce = losses(state)
    resumed, ce_resumed = losses(
        saver.restore(1, program.state_abstract, program.state_shardings)[0]
    )
    assert resumed == straight
    jax.tree.map(np.testing.assert_array_equal, ce_resumed, ce)
    # a checkpoint without carried rows cannot seed a run that needs them, and says why
    per_step = _program(*CE)
    saver.save(2, per_step.init_state(0, per_step.init_base(0)[1]), {})
    with pytest.raises(CheckpointError, match="ce_refresh"):
        saver.restore(2, program.state_abstract, program.state_shardings)


def test_plan_counts_the_factors():
    from k2jax.train.planner import plan

    cfg = load_model_config(CONFIG_DIR / "tiny.gin")
    mesh = {"data": 1, "expert": 1, "tensor": 1}
    ce = plan(cfg, mesh_sizes=mesh, seq=64, lora=LoraConfig(rank=4, backward="ce", ce_rank=8))
    # float32 (us [out, 8], vt [8, in], rnorm [out]) of every dense linear's [out, in] weight,
    # and the compute dtype's (bf16: ust [E, 8, out], v [E, in, 8], rnorm [E, out]) of every
    # routed-expert stack [E, out, in]
    want = 0
    for out, inp in _dense_linear_shapes(cfg):
        k = min(8, out, inp)
        want += 4 * (out * k + k * inp + out)
    E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    for out, inp in [(2 * F, D), (D, F)] * cfg.num_moe_layers:
        want += 2 * E * (8 * out + inp * 8 + out)
    assert ce.ce_factors == want
    assert "of which CE-LoRA factors" in ce.table()


def test_the_plan_of_a_ce_run_adds_the_same_temporaries_at_any_depth():
    """CE's extra temporaries are one layer's backward, whatever the depth, INT4 experts in
    memory chunks included (the plan once counted an int8 copy of every layer's int4 experts,
    which XLA:CPU made to gather CE's kept rows from the stacked weights in the layer loop)."""
    from k2jax.model import ComputeConfig
    from k2jax.train.planner import plan

    cfg = load_model_config(CONFIG_DIR / "tiny.gin")
    mesh = {"data": 1, "expert": 8, "tensor": 1}
    compute = ComputeConfig(experts="int4", int4_group_size=16, moe_chunk_tokens=32)
    extra = []
    for layers in (3, 7):
        deep = dataclasses.replace(cfg, num_hidden_layers=layers)
        t = {
            b: plan(
                deep,
                mesh_sizes=mesh,
                seq=64,
                batch=8,
                compute=compute,
                lora=LoraConfig(rank=4, backward=b, ce_rank=4),
            ).temporaries
            for b in ("exact", "ce")
        }
        extra.append(t["ce"] - t["exact"])
    assert 0 < extra[0] == extra[1]


def _dense_linear_shapes(cfg):
    """(out, in) of every Linear of the tiny model, stacked layers counted once each."""
    H, D = cfg.num_attention_heads, cfg.hidden_size
    attn = [
        (cfg.q_lora_rank, D),
        (H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim), cfg.q_lora_rank),
        (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D),
        (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        (D, H * cfg.v_head_dim),
    ]
    mlp = lambda f: [(f, D), (f, D), (D, f)]  # noqa: E731
    shapes = (attn + mlp(cfg.intermediate_size)) * cfg.num_dense_layers
    shapes += (attn + mlp(cfg.shared_intermediate_size)) * cfg.num_moe_layers
    return shapes
