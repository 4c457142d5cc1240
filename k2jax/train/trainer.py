"""The training loop: `Trainer(config).fit()` — for the `k2jax train` command and for notebooks.

    trainer = k2jax.Trainer.from_config("configs/lora_sft.gin", overrides=["lora.rank=32"])
    history = trainer.fit()            # per-step metric dicts of this call
    trainer.evaluate()                 # loss on eval.path

Set-up (`setup()`, run by `fit()`): mesh from the `mesh` section (a single process may use fewer
devices than it has); architecture from the checkpoint's config.json or the preset; the compiled
program (k2jax.train.step); the frozen base — loaded by `k2jax.load_model` straight onto the mesh,
or random from the preset's seed; the train state — restored from the newest checkpoint of the run
folder, or fresh (LoRA A random, B zero: step 0 is the base model); the data iterator — resumed from
the checkpoint's data state. The operative config is written into the run folder.

Each step: the next packed batch becomes one global array per field (this host's rows, via
`jax.make_array_from_process_local_data`), the jitted step runs, its metrics are fetched and
written (metrics.jsonl, TensorBoard, the progress bar, a console line every log.every steps). A
step with a non-finite loss or gradient is skipped by the step itself; after
`train.max_nonfinite_steps` of them in a row the loop stops with `NonFiniteError`. Evaluation
every eval.every steps, a checkpoint every checkpoint.every steps and at the end.

The loop fetches each step's metrics before starting the next (one host sync per step). For a
model whose step takes seconds this costs nothing and keeps tokens/s and the NaN guard exact; the
rejected alternative, fetching one step late, would overlap a few milliseconds of host work at the
price of acting on a divergence one step late.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from k2jax.config import ConfigError, ModelConfig, load_model_config
from k2jax.train.checkpoint import Checkpointer
from k2jax.train.config import RunConfig
from k2jax.train.run import (
    CONFIG_FILE,
    EVAL_FILE,
    METRICS_FILE,
    MODEL_CONFIG_FILE,
    TENSORBOARD_DIR,
    TOKENIZER_DIR,
    atomic_write_text,
    checkpoint_dir,
    model_config_from_json,
    model_config_to_json,
    truncate_jsonl,
)
from k2jax.train.step import StepSpec, build_program, peak_flops

log = logging.getLogger(__name__)

# data.path value naming the demo conversations shipped with k2jax (k2jax.data.DEMO_CHATS).
DEMO_DATA = "k2jax:demo_chats"


class NonFiniteError(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


def resolve_data_path(path: str) -> str:
    if path == DEMO_DATA:
        from k2jax.data import DEMO_CHATS

        return str(DEMO_CHATS)
    return path


class Trainer:
    """LoRA training of one run config. See the module docstring."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.run_dir = Path(config.train.run_dir)
        self._ready = False
        self.last_saved_step: int | None = None

    @classmethod
    def from_config(
        cls, files: str | os.PathLike | Sequence[str | os.PathLike], overrides: Sequence[str] = ()
    ) -> Trainer:
        """A trainer from config files (gin syntax) and `section.key=value` overrides."""
        return cls(RunConfig.load(files, overrides))

    # Set-up -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Builds mesh, model, base, state and data (restoring a checkpoint if there is one)."""
        if self._ready:
            return
        cfg = self.config
        self.is_main = jax.process_index() == 0
        self.mesh = self._make_mesh()
        self.model_config = self._model_config()
        from k2jax.sharding import check_mesh_fits

        check_mesh_fits(self.mesh, self.model_config)
        self._check_batch_layout()
        self.tokenizer = self._tokenizer()
        self.program = build_program(StepSpec.from_run_config(cfg, self.model_config), self.mesh)
        self.checkpointer = Checkpointer(
            checkpoint_dir(cfg), keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        latest = self.checkpointer.latest_step()
        data_state, meta = None, {}
        if latest is not None:  # decided before loading a terabyte of base weights
            if not cfg.train.resume:
                raise ConfigError(
                    f"{self.checkpointer.directory} already holds checkpoints (newest: step "
                    f"{latest}); set train.resume = True to continue that run, or choose another "
                    "train.run_dir"
                )
            self._check_resumable()
            meta = self.checkpointer.restore_meta(latest)
            data_state = meta.get("data_state")
        from k2jax.data import PackedBatches

        # The data (and its resume fingerprint) is checked before the base is loaded.
        self.data = PackedBatches(
            self._data_config(),
            self.tokenizer,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            state=data_state,
        )
        self.frozen, trained_params = self._load_base()
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        if latest is None:
            self.state = self.program.init_state(cfg.train.seed, trained_params)
        else:
            log.info("resuming from %s/%d", self.checkpointer.directory, latest)
            # The checkpoint holds the trained base leaves too: the loaded ones are replaced.
            self.state, _ = self.checkpointer.restore(
                latest, self.program.state_abstract, self.program.state_shardings
            )
            self.last_saved_step = latest
        self.step = int(jax.device_get(self.state["step"]))
        self._open_outputs()
        self._ready = True

    def _make_mesh(self):
        from k2jax.sharding import make_mesh

        m = self.config.mesh
        devices = jax.devices()
        if m.size < len(devices):
            if jax.process_count() > 1:
                raise ConfigError(
                    f"mesh data={m.data} × expert={m.expert} × tensor={m.tensor} = {m.size} "
                    f"devices, but a multi-host run must use all {len(devices)}"
                )
            log.info("mesh uses %d of the %d devices", m.size, len(devices))
            devices = devices[: m.size]
        return make_mesh(m.data, m.expert, m.tensor, devices=devices)

    def _model_config(self) -> ModelConfig:
        src = self.config.model
        unknown = set(src.overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
        if unknown:
            raise ConfigError(
                f"model.overrides: {sorted(unknown)} are not ModelConfig fields (k2jax/config.py)"
            )
        if src.path is not None:
            return ModelConfig.from_hf_dir(src.path, **src.overrides)
        return dataclasses.replace(load_model_config(src.preset), **src.overrides)

    def _check_batch_layout(self) -> None:
        """The batch must split over the mesh: rows over data × expert, tokens over all devices."""
        cfg, mesh = self.config, self.mesh
        rows, accum = cfg.data.batch_size, cfg.train.grad_accum
        if rows % accum:
            raise ConfigError(
                f"data.batch_size ({rows}) must be divisible by train.grad_accum ({accum})"
            )
        micro = rows // accum
        dp = mesh.shape["data"] * mesh.shape["expert"]
        if micro % dp:
            raise ConfigError(
                f"a microbatch of {micro} rows (data.batch_size / train.grad_accum) must be "
                f"divisible by mesh.data × mesh.expert = {dp}"
            )
        if (micro * cfg.data.seq_len) % mesh.size:
            raise ConfigError(
                f"microbatch tokens {micro} × {cfg.data.seq_len} must be divisible by the "
                f"{mesh.size} devices (the MoE splits tokens over all of them)"
            )

    def _tokenizer(self):
        from k2jax.data import KimiTokenizer

        tok = self.config.model.tokenizer
        if tok == "tiny":
            folder = self.run_dir / TOKENIZER_DIR
            if not (folder / "tiktoken.model").exists():
                from k2jax.data.testing import write_tiny_tokenizer

                tmp = self.run_dir / f".tokenizer.tmp{os.getpid()}"
                write_tiny_tokenizer(tmp)
                try:
                    os.replace(tmp, folder)
                except OSError:  # another host won the race; its files are identical
                    shutil.rmtree(tmp, ignore_errors=True)
        else:
            folder = Path(tok if tok is not None else self.config.model.path)
        tokenizer = KimiTokenizer.from_dir(folder)
        if tokenizer.vocab_size > self.model_config.vocab_size:
            raise ConfigError(
                f"model.tokenizer: {folder} has {tokenizer.vocab_size} ids but the model embeds "
                f"only {self.model_config.vocab_size}"
            )
        return tokenizer

    def _load_base(self):
        src, prog = self.config.model, self.program
        if src.path is None:
            return prog.init_base(src.seed)
        from k2jax.api import load_model

        loaded = load_model(
            src.path,
            mesh=self.mesh,
            compute=self.config.compute,
            config_overrides=dict(src.overrides) or None,
        )
        return prog.split_base(loaded.params)

    def _data_config(self, path: str | None = None, **changes):
        data = self.config.data
        return dataclasses.replace(
            data, path=resolve_data_path(path if path is not None else data.path), **changes
        )

    def _check_resumable(self) -> None:
        """Refuses to resume a run whose architecture or adapter layout changed."""
        old_file = self.run_dir / CONFIG_FILE
        if not old_file.exists():
            return
        old = RunConfig.load(old_file)
        for section in ("lora",):
            if getattr(old, section) != getattr(self.config, section):
                raise ConfigError(
                    f"{old_file}: the run was trained with a different `{section}` section "
                    f"({getattr(old, section)}); resume with the same one or use a new "
                    "train.run_dir"
                )
        model_file = self.run_dir / MODEL_CONFIG_FILE
        if model_file.exists() and model_config_from_json(model_file) != self.model_config:
            raise ConfigError(
                f"{model_file}: the run was trained on a different architecture; resume with the "
                "same model or use a new train.run_dir"
            )

    def _open_outputs(self) -> None:
        self._metrics_file = self._eval_file = self._events = None
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / CONFIG_FILE, self.config.to_gin())
        atomic_write_text(self.run_dir / MODEL_CONFIG_FILE, model_config_to_json(self.model_config))
        for name in (METRICS_FILE, EVAL_FILE):
            truncate_jsonl(self.run_dir / name, self.step)
        self._metrics_file = (self.run_dir / METRICS_FILE).open("a")
        self._eval_file = (self.run_dir / EVAL_FILE).open("a")
        if self.config.log.tensorboard:
            from k2jax.train.tensorboard import EventWriter

            self._events = EventWriter(self.run_dir / TENSORBOARD_DIR)

    # The loop -----------------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None) -> list[dict]:
        """Trains up to train.steps (or `max_steps` more steps, if fewer remain); returns the
        metric records of the steps run by this call. Calling it again continues."""
        self.setup()
        cfg = self.config
        total = cfg.train.steps
        stop = total if max_steps is None else min(total, self.step + max_steps)
        history: list[dict] = []
        if self.step >= total:
            log.info("the run is already at step %d of %d", self.step, total)
            return history
        peak = peak_flops(self.mesh.devices.flat[0], cfg.log.peak_tflops)
        bar = self._progress_bar(total)
        compiled = False
        try:
            while self.step < stop:
                host_batch = next(self.data, None)
                if host_batch is None:
                    log.warning("data exhausted after step %d of %d: stopping", self.step, total)
                    break
                batch = self.program.device_batch(host_batch)
                if not compiled:
                    seconds = self.program.prepare(self.state, self.frozen, batch)
                    log.info("compiled the train step in %.1f s", seconds)
                    compiled = True
                t0 = time.perf_counter()
                self.state, metrics = self.program.train_step(self.state, self.frozen, batch)
                metrics = jax.device_get(metrics)
                seconds = time.perf_counter() - t0
                self.step += 1
                record = self._record(metrics, host_batch, seconds, peak)
                history.append(record)
                self._write(record)
                if bar is not None:
                    bar.update(1)
                    loss = record["loss"] if record["loss"] is not None else float("nan")
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if self.step % cfg.log.every == 0 or self.step == total:
                    log.info(_console_line(record, total))
                if not record["finite"]:
                    self._nonfinite(record)
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
            if self.last_saved_step != self.step:
                self.save()
            self.checkpointer.wait()
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise
        finally:
            if bar is not None:
                bar.close()
            self._flush()
        return history

    def _progress_bar(self, total: int):
        if not (self.config.log.progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=self.step, desc="train", unit="step", file=sys.stderr)

    def _record(self, m: dict, host_batch: dict, seconds: float, peak: float | None) -> dict:
        tokens = int(m["tokens"])
        self.tokens_seen += tokens
        # Attention pairs are counted on this host's rows; other hosts' rows are alike on average.
        flops = self.program.step_flops(host_batch["segment_ids"]) * jax.process_count()
        load = np.asarray(m["expert_load"], np.float64)
        record = {
            "step": self.step,
            "loss": _finite_or_none(m["loss"]),
            "z_loss": _finite_or_none(m["z_loss"]),
            "grad_norm": _finite_or_none(m["grad_norm"]),
            "lr": float(m["lr"]),
            "tokens": tokens,
            "loss_tokens": _int_or_none(m["loss_tokens"]),
            "tokens_seen": self.tokens_seen,
            "step_time_s": seconds,
            "tokens_per_s": tokens / seconds,
            "mfu": flops / (seconds * self.mesh.size * peak) if peak else None,
            "max_attention_logit": _finite_or_none(m["max_attention_logit"]),
            "qk_clipped_heads": int(m["qk_clipped_heads"]),
            "expert_load": [float(x) for x in load],
            "expert_load_cv": float(load.std() / load.mean())
            if load.size and load.mean()
            else None,
            "finite": bool(m["finite"]),
            "nonfinite_streak": int(m["nonfinite_streak"]),
            "nonfinite_total": int(m["nonfinite_total"]),
            "time": time.time(),
        }
        return record

    def _write(self, record: dict) -> None:
        if self._metrics_file is not None:
            self._metrics_file.write(json.dumps(record) + "\n")
            self._metrics_file.flush()
        if self._events is not None:
            scalars = {
                f"train/{k}": float(v)
                for k, v in record.items()
                if k not in ("step", "time", "expert_load", "finite")
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
            }
            self._events.scalars(record["step"], scalars)
            self._events.flush()

    def _nonfinite(self, record: dict) -> None:
        limit = self.config.train.max_nonfinite_steps
        log.warning(
            "step %d: non-finite loss or gradient; update skipped (%d in a row, %d in all)",
            record["step"],
            record["nonfinite_streak"],
            record["nonfinite_total"],
        )
        if record["nonfinite_streak"] >= limit:
            raise NonFiniteError(
                f"stopping at step {record['step']}: {limit} consecutive steps had a non-finite "
                "loss or gradient (their updates were skipped; the state is that of the last good "
                f"step, checkpointed at step {self.last_saved_step}). Lower optim.learning_rate, "
                "keep optim.grad_clip_norm on, or check the data around this step "
                f"(data state: {json.dumps(self.data.state())})"
            )

    # Evaluation and checkpoints -----------------------------------------------------------------
    def evaluate(self) -> dict | None:
        """Mean loss over up to eval.batches batches of eval.path (None without eval.path)."""
        self.setup()
        cfg = self.config
        if cfg.eval.path is None:
            return None
        from k2jax.data import PackedBatches

        data = PackedBatches(
            self._data_config(cfg.eval.path, shuffle=False, num_epochs=1),
            self.tokenizer,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        total = {"loss_sum": 0.0, "z_loss_sum": 0.0, "count": 0.0}
        for _, host_batch in zip(range(cfg.eval.batches), data):
            sums = jax.device_get(
                self.program.eval_step(
                    self.state, self.frozen, self.program.device_batch(host_batch)
                )
            )
            for k in total:
                total[k] += float(sums[k])
        data.close()
        count = max(total["count"], 1.0)
        record = {
            "step": self.step,
            "eval_loss": total["loss_sum"] / count,
            "eval_tokens": int(total["count"]),
        }
        log.info("step %d: eval loss %.4f over %d tokens", self.step, *list(record.values())[1:])
        if self._eval_file is not None:
            self._eval_file.write(json.dumps(record) + "\n")
            self._eval_file.flush()
        if self._events is not None:
            self._events.scalars(self.step, {"eval/loss": record["eval_loss"]})
            self._events.flush()
        return record

    def save(self) -> None:
        """Starts an (async) checkpoint of the current state and data position."""
        self.setup()
        # The state's own step: after an interrupt it may be one ahead of the recorded metrics
        # (the step ran, its batch is consumed), and it is the state that must match the data.
        step = int(jax.device_get(self.state["step"]))
        meta = {"data_state": self.data.state(), "tokens_seen": self.tokens_seen}
        self.checkpointer.save(step, self.state, meta)
        self.last_saved_step = step

    def _save_on_interrupt(self) -> None:
        """Ctrl-C: keep the work done since the last checkpoint, if the state is intact (an
        interrupt inside a step's dispatch may leave it donated)."""
        if any(x.is_deleted() for x in jax.tree.leaves(self.state)):
            log.warning(
                "interrupted mid-step: the newest checkpoint is step %s", self.last_saved_step
            )
            return
        if int(jax.device_get(self.state["step"])) != self.last_saved_step:
            log.warning("interrupted: saving a checkpoint before exiting (Ctrl-C again to abandon)")
            self.save()
            self.checkpointer.wait()

    def _flush(self) -> None:
        for f in (self._metrics_file, self._eval_file, self._events):
            if f is not None:
                f.flush()

    def close(self) -> None:
        """Waits for pending checkpoint writes and closes files."""
        if not self._ready:
            return
        self.checkpointer.wait()
        self.checkpointer.close()
        for f in (self._metrics_file, self._eval_file, self._events):
            if f is not None:
                f.close()
        self.data.close()
        self._ready = False

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _finite_or_none(x) -> float | None:
    """JSON has no NaN/inf: non-finite values are written as null (the record says finite: false)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _int_or_none(x) -> int | None:
    x = float(x)
    return int(x) if math.isfinite(x) else None


def _console_line(r: dict, total: int) -> str:
    loss = "nan" if r["loss"] is None else f"{r['loss']:.4f}"
    gn = "nan" if r["grad_norm"] is None else f"{r['grad_norm']:.3g}"
    mfu = "" if r["mfu"] is None else f" mfu {100 * r['mfu']:.1f}%"
    return (
        f"step {r['step']}/{total} loss {loss} grad_norm {gn} lr {r['lr']:.3g} "
        f"{r['tokens_per_s']:.0f} tok/s{mfu} max_logit {r['max_attention_logit']}"
    )
