"""How a run starts and what it leaves (k2jax.train.start, k2jax.train.outputs): train.steps =
None counted from data.num_epochs (the LR schedule and schedule.warmup_ratio sized by it), the
loss and perplexity of the data.val_size split every eval.every steps, Weights & Biases (a stand-in
module: no network, no package) beside TensorBoard, the checkpoint folder's README, a resume from a
chosen step (later checkpoints set aside, the continued losses exact), a run started from a PEFT
adapter exported from another one (lora.init_from, with its checks), and
`k2jax chat --model BASE --adapter DIR`.

One tiny run (module fixture) serves every test: its train step is compiled once; the resumed
and adapter-started runs have the same program (same counted steps).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import sys

import jax
import numpy as np
import pytest
from helpers import rel_err

from k2jax.api import K2Model, load_adapter, load_model
from k2jax.cli import main
from k2jax.config import CONFIG_DIR, ConfigError
from k2jax.conversion.peft import export_peft
from k2jax.conversion.peft_load import AdapterError, read_peft
from k2jax.conversion.safetensors_io import write_safetensors
from k2jax.data import DEMO_CHATS, KimiTokenizer, PackedBatches
from k2jax.optim import make_schedule
from k2jax.testing import make_tiny_checkpoint
from k2jax.train import Checkpointer, RunConfig, Trainer, load_run
from k2jax.train.state import to_host
from k2jax.train.tensorboard import read_events

TINY_TRAIN = CONFIG_DIR / "tiny_train.gin"


class FakeWandb:
    """Records what the trainer hands to `wandb` (init, log, finish)."""

    def __init__(self):
        self.init_kwargs, self.logged, self.finished = None, [], False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def config(run_dir, data, *extra: str) -> RunConfig:
    return RunConfig.load(
        TINY_TRAIN,
        [
            f"train.run_dir={run_dir}",
            f"data.path={data}",
            "log.progress=False",
            "train.steps=None",
            "data.num_epochs=2",
            "data.val_size=0.25",
            "eval.every=2",
            "eval.batches=1",
            "checkpoint.every=2",
            "checkpoint.keep=10",
            "schedule.warmup_steps=0",
            "schedule.warmup_ratio=0.3",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    data = root / "chats.jsonl"
    data.write_text("".join(DEMO_CHATS.read_text().splitlines(keepends=True)[:40]))
    fake = FakeWandb()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", fake)
        rc = config(root / "run", data, "log.wandb=True")
        with Trainer(rc) as trainer:
            history = trainer.fit()
            total = trainer.total_steps
            trainer.logs.close()
            trainer.logs = None  # the final state's loss, not written into eval.jsonl
            final_eval = trainer.evaluate()
    return dict(
        root=root,
        data=data,
        run_dir=root / "run",
        rc=rc,
        history=history,
        total=total,
        wandb=fake,
        final_eval=final_eval,
    )


def test_epochs_count_the_steps_and_size_the_schedule(run):
    rc, history, total = run["rc"], run["history"], run["total"]
    tok = KimiTokenizer.from_dir(run["run_dir"] / "tokenizer")
    batches = PackedBatches(dataclasses.replace(rc.data, path=str(run["data"])), tok)
    assert total == sum(1 for _ in batches) >= 4  # two epochs of packed 8-row batches
    assert [r["step"] for r in history] == list(range(1, total + 1))
    warmup = round(0.3 * total)
    lrs = [r["lr"] for r in history]
    assert lrs[0] == pytest.approx(rc.optim.learning_rate / warmup)
    assert lrs[warmup - 1] == pytest.approx(rc.optim.learning_rate)
    schedule = make_schedule(rc.schedule, rc.optim.learning_rate, total)
    assert lrs == pytest.approx([float(schedule(c)) for c in range(total)])
    assert lrs[-1] < lrs[warmup]  # the cosine ran its course over the counted steps
    ckpt = Checkpointer(run["run_dir"] / "checkpoints", read_only=True, async_save=False)
    meta = ckpt.restore_meta(total)
    ckpt.close()
    assert meta["counted_steps"] == {"for": {"num_epochs": 2, "batch_size": 8}, "steps": total}


def test_eval_writes_loss_and_perplexity_to_every_sink(run):
    run_dir, total = run["run_dir"], run["total"]
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == list(range(2, total + 1, 2))
    for e in evals:
        assert e["eval_tokens"] > 0 and e["eval_perplexity"] == pytest.approx(
            math.exp(e["eval_loss"])
        )
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    [events_file] = (run_dir / "tensorboard").iterdir()
    tb = {k for e in read_events(events_file) for k in e.get("scalars", {})}
    assert {"train/loss", "eval/loss", "eval/perplexity"} <= tb
    fake = run["wandb"]
    assert fake.init_kwargs["project"] == "k2jax" and fake.init_kwargs["name"] == "run"
    assert fake.init_kwargs["dir"] == str(run_dir) and fake.init_kwargs["config"]["lora"]["rank"]
    steps = {s for s, v in fake.logged if "train/loss" in v}
    assert steps == set(range(1, total + 1)) and fake.finished
    perplexity = [v["eval/perplexity"] for _, v in fake.logged if "eval/perplexity" in v]
    assert perplexity == pytest.approx([e["eval_perplexity"] for e in evals])


def test_wandb_asked_for_but_missing_is_said_first(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
    with pytest.raises(ConfigError, match=r"needs the wandb package.*pip install 'k2jax\[wandb\]'"):
        Trainer(config(tmp_path / "run", run["data"], "log.wandb=True")).setup()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_checkpoint_readme_and_resume_from_a_chosen_step(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run["run_dir"], run_dir)
    readme = (run_dir / "checkpoints" / "README.md").read_text()
    assert f"k2jax export --run {run_dir} --step N" not in readme  # names the run it was written by
    assert f"k2jax export --run {run['run_dir']} --step N --out" in readme
    total = run["total"]
    with pytest.raises(ConfigError, match="has no checkpoint of that step"):
        Trainer(config(run_dir, run["data"], "train.resume_step=3")).setup()
    with Trainer(config(run_dir, run["data"], "train.resume_step=2")) as trainer:
        trainer.setup()
        assert trainer.step == 2 and trainer.total_steps == total  # the count came from meta
        later = sorted(int(p.name) for p in (run_dir / "checkpoints-superseded").iterdir())
        assert later == sorted(set(range(4, total + 1, 2)) | {total})  # the last step too
        assert trainer.checkpointer.all_steps() == [2]
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
        history = trainer.fit()
    assert [r["step"] for r in history] == list(range(3, total + 1))
    for r, want in zip(history, run["history"][2:]):
        assert rel_err(r["loss"], want["loss"]) <= 1e-6, (r["step"], r["loss"], want["loss"])
    readme = (run_dir / "checkpoints" / "README.md").read_text()
    assert f"k2jax export --run {run_dir} --step N" in readme


@pytest.fixture(scope="module")
def adapter(run, tmp_path_factory):
    """The run's last step as a PEFT adapter (float32, per-expert): `k2jax export --step N`."""
    out = tmp_path_factory.mktemp("adapter") / "step"
    assert (
        main(
            ["export", "--run", str(run["run_dir"]), "--step", str(run["total"]), "--out", str(out)]
        )
        == 0
    )
    return out


def test_a_run_starts_from_an_exported_adapter(run, adapter, tmp_path):
    trained = load_run(run["run_dir"])
    with Trainer(config(tmp_path / "run", run["data"], f"lora.init_from={adapter}")) as trainer:
        trainer.setup()
        assert trainer.step == 0
        lora = to_host(trainer.state["trainable"]["lora"])
        flat = jax.tree_util.tree_flatten_with_path(lora)[0]
        for (path, got), want in zip(flat, jax.tree.leaves(to_host(trained.lora))):
            np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
        # the same function: its loss at step 0 is the trained run's at its last step
        assert rel_err(trainer.evaluate()["eval_loss"], run["final_eval"]["eval_loss"]) <= 1e-6
    # what cannot continue the adapter is said before any weights load, by key and value
    for extra, message in (
        ("lora.rank=4", "has rank r = 8 but lora.rank = 4; set lora.rank = 8"),
        ("lora.alpha=8.0", "set lora.alpha = 16 to continue the same function"),
        ("lora.targets=('q_a_proj',)", "which lora.targets (q_a_proj) does not include"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            Trainer(
                config(tmp_path / "bad", run["data"], f"lora.init_from={adapter}", extra)
            ).setup()


def test_adapter_files_are_checked_never_unpickled(run, adapter, tmp_path):
    mc = load_run(run["run_dir"]).model_config
    found = read_peft(adapter, mc)
    assert (found.rank, found.scale) == (8, 2.0) and found.trained == found.modules
    found.close()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(AdapterError, match="a pickle .*never unpickles"):
        read_peft(pickled, mc)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(adapter / "adapter_config.json", bad)
    name = "base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight"
    write_safetensors(bad / "adapter_model.safetensors", {name: np.zeros((8, 7), np.float32)})
    with pytest.raises(AdapterError, match=r"q_a_proj.lora_A.weight has shape \[8, 7\], but rank"):
        read_peft(bad, mc)
    config_file = json.loads((adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config_file, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora = True: DoRA is not supported"):
        read_peft(bad, mc)


def test_chat_with_a_base_and_an_adapter(run, adapter, tmp_path, capsys):
    """The tiny run's adapter on a tiny checkpoint of the same architecture: the API gives the
    logits of the base with the run's LoRA; `k2jax chat --model --adapter` answers with it."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "bf16", dtype="float32", tokenizer=True)
    base = load_model(ckpt, dtype="float32")
    tuned = load_adapter(base, adapter)
    trained = load_run(run["run_dir"])
    assert (tuned.lora_config.rank, tuned.lora_config.scale) == (8, trained.lora_config.scale)
    want = K2Model(base.config, base.compute, base.params, trained.lora, trained.lora_config)
    tokens = np.arange(2 * 16).reshape(2, 16) % 700
    got = tuned.logits(tokens)
    assert rel_err(got, want.logits(tokens)) <= 1e-6 and rel_err(got, base.logits(tokens)) > 1e-4
    argv = ["chat", "--model", str(ckpt), "--adapter", str(adapter), "--prompt", "Hi"]
    assert main([*argv, "--max-new-tokens", "3", "--temperature", "0", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["chat", "--run", str(run["run_dir"]), "--adapter", str(adapter)]) == 2
    assert "--adapter goes with --model" in capsys.readouterr().err


def test_peft_adapter_round_trip_keeps_zero_modules_out(run, tmp_path):
    """A module whose factors are all zero (export's fill for an untrained routed projection)
    reads as absent: chat leaves it out, a run starts it fresh."""
    trained = load_run(run["run_dir"])
    lora = to_host(trained.lora)
    experts = lora["moe_layers"]["mlp"]["experts"]["gate_proj"]
    experts["lora_A"], experts["lora_B"] = (np.zeros_like(x) for x in experts.values())
    out = export_peft(trained.model_config, trained.lora_config, lora, None, tmp_path / "a")
    found = read_peft(out, trained.model_config)
    assert ("moe_layers", "mlp", "experts", "gate_proj") in found.modules
    assert ("moe_layers", "mlp", "experts", "gate_proj") not in found.trained
    assert "mlp.experts.gate_proj" not in found.lora_config().targets
    fresh = found.check(trained.lora_config)
    assert fresh == [("moe_layers", "mlp", "experts", "gate_proj")]
    found.close()
