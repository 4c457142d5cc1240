"""Training on the tiny model: the loss falls with Muon and with AdamW, the base stays
bit-identical, INT4 and bf16 bases agree, a step on an expert=4 × tensor=2 mesh equals one device,
checkpoints restore onto another mesh, the NaN guard, evaluation, load_run, and the run config.

Compiles are the cost here, so every test reuses a few cached programs (k2jax.train.build_program
caches per spec and mesh): "A" is exactly the spec of configs/tiny_train.gin, which the Trainer
tests and test_train_cli.py's in-process reference run share.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err
from k2_checkpoints import perturbed

from k2jax.api import load_finetune, load_model
from k2jax.config import CONFIG_DIR, ConfigError, load_model_config
from k2jax.data import DEMO_CHATS, DataConfig, KimiTokenizer, PackedBatches
from k2jax.data.testing import write_tiny_tokenizer
from k2jax.sharding import make_mesh, spec_for
from k2jax.testing import make_tiny_checkpoint
from k2jax.train import (
    Checkpointer,
    NonFiniteError,
    RunConfig,
    StepSpec,
    Trainer,
    build_program,
    load_run,
)
from k2jax.train.state import to_host
from k2jax.train.tensorboard import read_events

TINY_TRAIN = CONFIG_DIR / "tiny_train.gin"


def run_config(run_dir, *overrides: str) -> RunConfig:
    return RunConfig.load(
        TINY_TRAIN, [f"train.run_dir={run_dir}", "log.progress=False", *overrides]
    )


@functools.cache
def tiny_model_config():
    return load_model_config(CONFIG_DIR / "tiny.gin")


def one_device():
    return make_mesh(devices=jax.devices()[:1])


def spec_a() -> StepSpec:
    return StepSpec.from_run_config(run_config("unused"), tiny_model_config())


def spec_b() -> StepSpec:
    """The other knobs: bf16 compute over INT4 experts, AdamW, trainable router and norms, a QK-clip
    τ below every head's logit, LoRA dropout, z-loss."""
    rc = run_config(
        "unused",
        'compute.dtype="bfloat16"',
        'compute.param_dtype="bfloat16"',
        'compute.experts="int4"',
        'optim.name="adamw"',
        "optim.learning_rate=0.005",
        "optim.qk_clip_tau=0.01",
        "train.train_router=True",
        "train.train_norms=True",
        "lora.dropout=0.05",
        "train.z_loss=0.0001",
    )
    return StepSpec.from_run_config(rc, tiny_model_config())


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """The first packed batch of the demo chats (8 rows × 128 tokens): the memorisable batch."""
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tiny_tokenizer(folder)
    tok = KimiTokenizer.from_dir(folder)
    data = PackedBatches(DataConfig(path=str(DEMO_CHATS), seq_len=128, batch_size=8), tok)
    return next(data)


def assert_falls(losses):
    """Falls at every step and by > 0.5 nats over 8 steps. (The random tiny base's frozen LM head
    has tiny rows — std 0.02 over 64 dims — which bounds every logit by ~1.3 and the achievable
    loss near 5.6; from ln 1024 = 6.93, a 0.5-nat drop is over a third of the way.)"""
    assert all(np.diff(losses) < 0) and losses[-1] < losses[0] - 0.5, losses


def _steps(program, state, frozen, batch, n):
    losses, metrics = [], []
    b = program.device_batch(batch)
    for _ in range(n):
        state, m = program.train_step(state, frozen, b)
        m = jax.device_get(m)
        losses.append(float(m["loss"]))
        metrics.append(m)
    return state, losses, metrics


def test_loss_falls_with_muon_and_the_base_stays_bit_identical(batch):
    prog = build_program(spec_a(), one_device())
    frozen, tparams = prog.init_base(0)
    before = to_host(frozen)
    state = prog.init_state(0, tparams)
    state, losses, metrics = _steps(prog, state, frozen, batch, 8)
    assert_falls(losses)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(to_host(frozen))[0], jax.tree.leaves(before)
    ):
        assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)
    m = metrics[0]
    # every position (padding too: the MoE runs on whole rows) visits K experts per MoE layer
    assert float(m["expert_load"].sum()) == 8 * 128 * 2 * tiny_model_config().num_moe_layers
    assert int(m["loss_tokens"]) == int(batch["loss_mask"].sum())
    assert float(m["lr"]) == pytest.approx(0.01)  # warmup: 0.02 · 1/2
    assert int(jax.device_get(state["step"])) == 8


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory):
    """A tiny Kimi-K2-Thinking-format folder: INT4 (compressed-tensors) routed experts, bf16 rest,
    the tiny tokenizer — the same architecture as the tiny preset."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-int4", "int4")


def _load(folder, compute):
    return load_model(folder, mesh=one_device(), compute=compute)


def test_loss_falls_with_adamw_in_bf16_over_an_int4_checkpoint(batch, int4_checkpoint):
    """bf16 compute over the INT4 experts as loaded; router and norms trained as fp32 masters;
    every frozen array — the int4 codes included — bit-identical after training."""
    prog = build_program(spec_b(), one_device())
    frozen, tparams = prog.split_base(_load(int4_checkpoint, spec_b().compute).params)
    assert frozen["moe_layers"]["mlp"]["experts"]["down_proj"]["weight_q"].dtype == jnp.int4
    frozen_before, tparams_before = to_host(frozen), to_host(tparams)
    assert set(tparams) == {"dense_layers", "moe_layers", "norm"}
    state = prog.init_state(0, tparams)
    state, losses, metrics = _steps(prog, state, frozen, batch, 8)
    assert_falls(losses)
    assert all(float(m["z_loss"]) > 0 for m in metrics)
    # the trainable base leaves trained (fp32 masters), the frozen rest is bit-identical
    trained = to_host(state["trainable"]["params"])
    router = trained["moe_layers"]["mlp"]["gate"]["weight"]
    assert router.dtype == np.float32
    assert not np.array_equal(router, tparams_before["moe_layers"]["mlp"]["gate"]["weight"])
    assert not np.array_equal(trained["norm"]["weight"], tparams_before["norm"]["weight"])
    flat = jax.tree_util.tree_flatten_with_path(to_host(frozen))[0]
    for (path, a), b in zip(flat, jax.tree.leaves(frozen_before)):
        assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)
    assert "weight" not in frozen["moe_layers"]["mlp"]["gate"]  # moved, not duplicated
    # QK-clip: τ = 0.01 is below every head's logit, yet the first step clips nothing (the
    # thresholds are the heads' own step-1 max); later steps clip heads that grow past it.
    assert int(metrics[0]["qk_clipped_heads"]) == 0
    assert sum(int(m["qk_clipped_heads"]) for m in metrics) > 0
    for node in jax.device_get(state["qk_clip"]).values():
        f = node["self_attn"]["scales"]
        assert f.min() < 1.0
        np.testing.assert_allclose(f[:, 1], f[:, 0] ** 2, rtol=1e-5)


def test_int4_and_bf16_bases_give_the_same_loss(batch, int4_checkpoint):
    """The INT4 checkpoint held as INT4 codes + scales, or dequantised to bf16 by the loader: bf16
    compute gives the same loss within bf16 rounding (the INT4 path dequantises exactly in
    float32, then rounds once to bf16)."""
    int4 = spec_b()
    bf16 = dataclasses.replace(int4, compute=dataclasses.replace(int4.compute, experts="bf16"))
    prog4, prog16 = build_program(int4, one_device()), build_program(bf16, one_device())
    frozen4, tparams = prog4.split_base(_load(int4_checkpoint, int4.compute).params)
    frozen16, _ = prog16.split_base(_load(int4_checkpoint, bf16.compute).params)
    experts = frozen16["moe_layers"]["mlp"]["experts"]
    assert experts["down_proj"]["weight"].dtype == jnp.bfloat16
    state = prog4.init_state(0, tparams)
    state["trainable"]["lora"] = perturbed(state["trainable"]["lora"], jax.random.key(3))
    b = prog4.device_batch(batch)
    loss = {}
    for name, prog, frozen in (("int4", prog4, frozen4), ("bf16", prog16, frozen16)):
        sums = jax.device_get(prog.eval_step(state, frozen, b))
        loss[name] = float(sums["loss_sum"] / sums["count"])
    assert math.isfinite(loss["int4"])
    assert rel_err(loss["int4"], loss["bf16"]) <= 1e-2, loss


@pytest.fixture(scope="module")
def mesh_programs():
    mesh = make_mesh(1, 4, 2)
    accum2 = dataclasses.replace(spec_a(), grad_accum=2)
    return build_program(spec_a(), one_device()), build_program(accum2, mesh)


def test_step_on_expert4_tensor2_mesh_matches_one_device(batch, mesh_programs):
    """One step on the mesh — also with the batch split into 2 accumulated microbatches — equals
    one step of the whole batch on one device."""
    prog1, prog8 = mesh_programs
    frozen, tparams = prog1.init_base(0)
    state = prog1.init_state(0, tparams)
    state["trainable"]["lora"] = perturbed(state["trainable"]["lora"], jax.random.key(4))
    host_state, host_frozen = to_host(state), to_host(frozen)

    state8 = jax.device_put(host_state, prog8.state_shardings)
    frozen8 = jax.device_put(host_frozen, prog8.frozen_shardings)
    new1, m1 = prog1.train_step(state, frozen, prog1.device_batch(batch))
    new8, m8 = prog8.train_step(state8, frozen8, prog8.device_batch(batch))
    assert rel_err(m8["loss"], m1["loss"]) <= 1e-5
    assert rel_err(m8["grad_norm"], m1["grad_norm"]) <= 1e-5
    np.testing.assert_array_equal(m8["expert_load"], m1["expert_load"])
    flat1 = jax.tree_util.tree_flatten_with_path(new1["trainable"])[0]
    for (path, a), b in zip(flat1, jax.tree.leaves(new8["trainable"])):
        assert rel_err(b, a) <= 1e-5, jax.tree_util.keystr(path)
    # the state after the step lives where the rules table says
    for (path, arr), want in zip(
        jax.tree_util.tree_flatten_with_path(new8)[0], jax.tree.leaves(prog8.state_shardings)
    ):
        assert arr.sharding.is_equivalent_to(want, arr.ndim), jax.tree_util.keystr(path)
    lora_b = new8["trainable"]["lora"]["moe_layers"]["mlp"]["experts"]["down_proj"]["lora_B"]
    assert lora_b.sharding.spec == spec_for(("layers", "experts", "embed", "lora_rank"))
    # Muon's momentum, held expert-major ([E, L, ..]), sharded over the experts like its factor
    mu = new8["opt_state"][1].inner_states["muon"].inner_state[0].mu
    mu_b = mu["lora"]["moe_layers"]["mlp"]["experts"]["down_proj"]["lora_B"]
    assert mu_b.shape == (8, 2, 64, 8)
    assert mu_b.sharding.spec == spec_for(("experts", "layers", "embed", "lora_rank"))
    # No expert's factor (or its momentum) is ever gathered whole onto a device: Muon
    # orthogonalises each device's experts where they live.
    hlo = next(iter(prog8._compiled.values())).as_text()
    gathered = {
        tuple(map(int, d.split(","))) for d in re.findall(r"f32\[([\d,]+)\]\S* all-gather\(", hlo)
    }
    experts = new8["trainable"]["lora"]["moe_layers"]["mlp"]["experts"]
    for factor in jax.tree.leaves(experts):
        shape = tuple(factor.shape)
        assert not {shape, (shape[1], shape[0], *shape[2:])} & gathered, shape


def test_optimizer_state_of_expert_factors_is_sharded_over_experts():
    """Muon's and AdamW's moments of a routed-expert factor live on the devices of its experts
    (a replicated moment would cost 8× the adapters' memory at expert=8)."""
    mesh = make_mesh(1, 4, 2)
    for name in ("muon", "adamw"):
        spec = dataclasses.replace(spec_a(), optim=dataclasses.replace(spec_a().optim, name=name))
        prog = build_program(spec, mesh)
        flat = jax.tree_util.tree_flatten_with_path(prog.state_shardings["opt_state"])[0]
        moments = [
            (jax.tree_util.keystr(path), s.spec)
            for path, s in flat
            if "['experts']" in jax.tree_util.keystr(path)
        ]
        assert len(moments) >= 6, (name, moments)  # 3 projections × (A, B), one moment or two
        for path, pspec in moments:
            first = pspec[0] if len(pspec) else None  # P(): replicated
            first = first if isinstance(first, tuple) else (first,)
            assert "expert" in first, (name, path, pspec)  # [E, L, ..]: E over the expert axis


def test_checkpoint_restores_onto_another_mesh(tmp_path, mesh_programs):
    prog1, prog8 = mesh_programs
    _, tparams = prog1.init_base(0)
    state = prog1.init_state(0, tparams)
    state["trainable"]["lora"] = perturbed(state["trainable"]["lora"], jax.random.key(5))
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(3, state, {"data_state": {"x": 1}})
    ckpt.wait()
    restored, meta = ckpt.restore(3, prog8.state_abstract, prog8.state_shardings)
    ckpt.close()
    assert meta["data_state"] == {"x": 1} and meta["step"] == 3
    for a, b, want in zip(
        jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(prog8.state_shardings)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(want, a.ndim)


class _Batches:
    """A stand-in for the trainer's PackedBatches that yields given batches."""

    def __init__(self, batches):
        self._it = iter(batches)

    def __next__(self):
        return next(self._it)

    def state(self):
        return {"stand-in": True}

    def close(self):
        pass


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, batch, caplog):
    """Skipped steps change nothing; no checkpoint is written inside a streak; at the stop, the
    checkpoint of the state that produced the streak is moved aside, so a rerun resumes from the
    last state whose own step was finite. A finite but dead run (zero gradient) is warned of."""
    rc = run_config(tmp_path / "run", "train.max_nonfinite_steps=3", "checkpoint.every=1")
    trainer = Trainer(rc)
    trainer.setup()
    good = trainer.fit(max_steps=2)
    assert all(r["finite"] for r in good)
    before = to_host(trainer.state["trainable"])
    bad = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
    trainer.data = _Batches([bad] * 5)
    with pytest.raises(NonFiniteError, match="3 consecutive steps had a non-finite") as e:
        trainer.fit()
    assert "state after step 2 is taken to have diverged" in str(e.value)
    assert "the newest checkpoint is step 1" in str(e.value)
    for a, b in zip(jax.tree.leaves(to_host(trainer.state["trainable"])), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)  # skipped updates change nothing
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_streak"] for r in records] == [0, 0, 1, 2, 3]
    assert records[-1]["loss"] is None and records[-1]["finite"] is False
    assert trainer.checkpointer.all_steps() == [1]  # none written in the streak; 2 set aside
    assert (tmp_path / "run" / "checkpoints-nonfinite" / "2").is_dir()
    trainer.close()
    with Trainer(rc) as again:  # resumes from the last finite state
        again.setup()
        assert again.step == 1

    # A dead run: nothing to learn (no loss tokens) gives a zero gradient, finite; warned once.
    dead = dict(batch, loss_mask=np.zeros_like(batch["loss_mask"]))
    with Trainer(run_config(tmp_path / "dead", "checkpoint.every=0")) as trainer:
        trainer.setup()
        trainer.data = _Batches([dead] * 4)
        with caplog.at_level("WARNING", logger="k2jax"):
            trainer.fit(max_steps=4)
    warnings = [r.getMessage() for r in caplog.records if "nothing is learning" in r.getMessage()]
    assert len(warnings) == 1 and "steps 1-3" in warnings[0], warnings


def test_trainer_on_a_checkpoint_eval_tensorboard_and_load_run(tmp_path, int4_checkpoint):
    """The Trainer from a checkpoint folder (its tokenizer too), with a held-out eval file; then
    load_run reads the run back as export / merge / chat do."""
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(DEMO_CHATS.read_text().splitlines(keepends=True)[-16:]))
    run_dir = tmp_path / "run"
    rc = run_config(
        run_dir,
        f"model.path={int4_checkpoint}",
        "model.preset=None",
        "model.tokenizer=None",
        f"eval.path={held_out}",
        "eval.every=2",
        "eval.batches=1",
    )
    with Trainer(rc) as trainer:
        history = trainer.fit(max_steps=4)
        lora = to_host(trainer.state["trainable"]["lora"])
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["eval_perplexity"] == pytest.approx(math.exp(evals[1]["eval_loss"]))
    [events_file] = (run_dir / "tensorboard").iterdir()
    events = read_events(events_file)
    assert events[0]["file_version"] == "brain.Event:2"
    losses = {e["step"]: e["scalars"]["train/loss"] for e in events if "train/loss" in e["scalars"]}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in history})
    assert any("eval/loss" in e["scalars"] for e in events)

    run = load_run(run_dir)
    assert run.step == 4 and run.config == rc and run.lora_config == rc.lora
    assert run.model_config == tiny_model_config()
    assert run.base_path == str(int4_checkpoint) and run.preset is None
    assert run.tokenizer_dir == int4_checkpoint
    for a, b in zip(jax.tree.leaves(to_host(run.lora)), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(a, b)
    scales = run.qk_clip["moe_layers"]["self_attn"]["scales"]
    assert scales.shape == (2, 3, 4) and run.trained_params == {}
    assert run.meta["data_state"]["batches"] == 4
    # The fine-tune as a model (chat, notebooks): the trained adapters change the logits, and on
    # an (expert 4, tensor 2) mesh it computes what it computes on one device.
    tokens = np.arange(2 * 16).reshape(2, 16) % 700
    base = load_model(int4_checkpoint, dtype="float32").logits(tokens)
    tuned = load_finetune(run, dtype="float32")
    want = tuned.logits(tokens)
    assert rel_err(want, base) > 1e-3
    sharded = load_finetune(run_dir, dtype="float32", mesh=make_mesh(1, 4, 2))
    assert sharded.lora_config == rc.lora and sharded.qk_clip is not None
    assert rel_err(sharded.logits(tokens), want) <= 1e-5
    # The folder now holds checkpoints: refusing to overwrite, refusing a changed adapter layout.
    with pytest.raises(ConfigError, match="already holds checkpoints .* train.resume = True"):
        Trainer(rc.replace(train={"resume": False})).setup()
    with pytest.raises(ConfigError, match="different `lora` section"):
        Trainer(rc.replace(lora={"rank": 4})).setup()


def test_setup_checks_come_first_and_say_what_to_do(tmp_path):
    """A mesh larger than the machine names a mesh that fits and how to plan the big one; a
    missing model.path is reported before the mesh; a run folder that is a file is named."""
    from k2jax.sharding import MeshError

    with pytest.raises(MeshError, match=r"needs 16 devices, but this machine has 8 \(cpu\)") as e:
        Trainer(run_config(tmp_path / "a", "mesh.expert=16", "data.batch_size=16")).setup()
    assert "--set mesh.expert=8" in str(e.value) and "k2jax plan" in str(e.value)
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises((ConfigError, OSError), match="no-such-checkpoint"):
        rc = run_config(tmp_path / "b", f"model.path='{missing}'", "model.preset=None")
        Trainer(rc.replace(mesh={"expert": 16})).setup()
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=f"train.run_dir: {a_file} is a file, not a folder"):
        Trainer(run_config(a_file)).setup()
    # Outputs never in, around or equal to an input: a run folder inside the data folder would
    # add its metrics.jsonl to the data; a checkpoint folder equal to it would replace it.
    data = tmp_path / "data"
    data.mkdir()
    (data / "chats.jsonl").write_text(DEMO_CHATS.read_text())
    inside = run_config(data / "run", f"data.path='{data}'")
    with pytest.raises(ConfigError, match="lies inside the training data, data.path"):
        Trainer(inside).setup()
    around = run_config(tmp_path / "c", f"data.path='{data}'", f"checkpoint.dir='{data}'")
    with pytest.raises(ConfigError, match="checkpoint.dir .* is the training data"):
        Trainer(around).setup()
    assert sorted(p.name for p in data.iterdir()) == ["chats.jsonl"]  # nothing written there


def test_a_run_folders_history_is_never_replaced(tmp_path, caplog):
    """Another run pointed at a folder with a run's metrics is refused (the metrics intact); a
    resume with changed settings keeps the old config.gin and names the changes."""
    run = tmp_path / "run"
    with Trainer(run_config(run, "checkpoint.every=0")) as trainer:
        trainer.fit(max_steps=2)
    metrics = (run / "metrics.jsonl").read_text()
    elsewhere = tmp_path / "elsewhere"
    other = run_config(run, "checkpoint.every=0", f"checkpoint.dir='{elsewhere}'")
    with pytest.raises(ConfigError, match="holds 2 steps of another run"):
        Trainer(other).setup()
    assert (run / "metrics.jsonl").read_text() == metrics
    old_config = (run / "config.gin").read_text()
    changed = run_config(run, "checkpoint.every=0", "train.seed=7", "log.every=2")
    with caplog.at_level("WARNING", logger="k2jax"), Trainer(changed) as trainer:
        trainer.fit(max_steps=1)
    [kept] = (run / "config_history").iterdir()
    assert kept.name == "step_000002.gin" and kept.read_text() == old_config
    assert "train.seed = 7" in (run / "config.gin").read_text()
    [warning] = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert "train.seed: 0 → 7" in warning and "log.every: 5 → 2" in warning
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert not (run / "eval.jsonl").exists()  # no eval.path: no empty eval file


def test_run_config_round_trip_and_errors(tmp_path):
    rc = run_config(tmp_path)
    (tmp_path / "op.gin").write_text(rc.to_gin())
    assert RunConfig.load(tmp_path / "op.gin") == rc
    with pytest.raises(ConfigError, match="'train' has no key 'stepz'"):
        run_config(tmp_path, "train.stepz=3")
    with pytest.raises(ConfigError, match="exactly one of model.path"):
        run_config(tmp_path, "model.path=/somewhere")
    with pytest.raises(ConfigError, match="data.batch_size .* divisible by train.grad_accum"):
        Trainer(run_config(tmp_path, "train.grad_accum=3")).setup()
    with pytest.raises(ConfigError, match="'none': a microbatch of 4 rows .* data × expert = 8"):
        Trainer(
            run_config(
                tmp_path, "mesh.expert=8", "data.batch_size=4", "compute.context_parallel='none'"
            )
        ).setup()
    # the default ("auto") splits each of the 4 rows over 2 × 4 = 8 chunks of the sequence
    with pytest.raises(ConfigError, match="data.seq_len 60: context parallelism over 8 devices"):
        Trainer(
            run_config(tmp_path, "mesh.expert=8", "data.batch_size=4", "data.seq_len=60")
        ).setup()


def test_lora_sft_recipe_and_full_size_flops():
    """The full Kimi-K2-Thinking recipe parses and validates; its model FLOPs per token follow
    from ~32B activated parameters (4 FLOPs each, frozen) plus the adapters (6 each)."""
    rc = RunConfig.load(CONFIG_DIR / "lora_sft.gin", ["model.path=/ckpt/Kimi-K2-Thinking"])
    assert (rc.mesh.expert, rc.lora.rank, rc.optim.name, rc.optim.qk_clip_tau) == (
        8,
        16,
        "muon",
        100.0,
    )
    assert rc.compute.experts == "int4" and rc.compute.dtype == "bfloat16"
    cfg = load_model_config(CONFIG_DIR / "kimi_k2_thinking.gin")
    prog = build_program(StepSpec.from_run_config(rc, cfg), make_mesh(1, 8, 1))
    per_token = prog.weight_flops_per_token
    assert 4 * 31e9 < per_token < 4 * 33e9 + 6 * 1e9, per_token / 1e9
    n_lora = sum(x.size for x in jax.tree.leaves(prog.state_abstract["trainable"]["lora"]))
    assert 10e9 < n_lora < 11e9  # r = 16 on every linear of every expert: ~10.5B adapter weights
    # attention FLOPs count the visible (query, key) pairs of each packed example exactly
    seg = np.array([[1, 1, 1, 2, 2, 0]])
    attn = 3 * 2 * 64 * (192 + 128) * 61  # fwd + bwd, q·k and p·v, per pair and layer
    assert prog.step_flops(seg) == pytest.approx(5 * per_token + (6 + 3) * attn)
