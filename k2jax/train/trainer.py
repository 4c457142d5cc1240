"""The training loop: `Trainer(config).fit()` — for the `k2jax train` command and for notebooks.

    trainer = k2jax.Trainer.from_config("configs/lora_sft.gin", overrides=["lora.rank=32"])
    history = trainer.fit()            # per-step metric dicts of this call
    trainer.evaluate()                 # loss on eval.path

Set-up (`setup()`, run by `fit()`): mesh from the `mesh` section (a single process may use fewer
devices than it has); architecture from the checkpoint's config.json or the preset; the number of
steps (train.steps, or counted from data.num_epochs: k2jax.train.start); the compiled program
(k2jax.train.step); the frozen base — loaded by `k2jax.load_model` straight onto the mesh, or
random from the preset's seed; the train state — restored from the newest checkpoint of the run
folder (or train.resume_step's), or fresh (LoRA A random, B zero: step 0 is the base model; or
lora.init_from's PEFT adapter); the data iterator — resumed from the checkpoint's data state. The
operative config is written into the run folder, and a README.md into the checkpoint folder
saying how to export, chat with or resume any of its steps.

Each step: the next packed batch becomes one global array per field (this host's rows, via
`jax.make_array_from_process_local_data`), the jitted step runs, its metrics are fetched and
written (metrics.jsonl, TensorBoard, W&B if asked — k2jax.train.outputs —, the progress bar, a
console line every log.every steps). A
step with a non-finite loss or gradient is skipped by the step itself; after
`train.max_nonfinite_steps` of them in a row the loop stops with `NonFiniteError`. Evaluation
(loss and perplexity) every eval.every steps, a checkpoint every checkpoint.every steps and at the
end.

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

from k2jax.config import ConfigError, ModelConfig, did_you_mean, load_model_config
from k2jax.model.context_parallel import resolve as resolve_context
from k2jax.sharding.mesh import MeshError
from k2jax.train.checkpoint import Checkpointer
from k2jax.train.config import RunConfig
from k2jax.train.interrupt import STEP_DELAY_ENV, CtrlC, hold_step_for_test  # noqa: F401 (tests)
from k2jax.train.run import (
    CONFIG_FILE,
    MODEL_CONFIG_FILE,
    TOKENIZER_DIR,
    atomic_write_text,
    check_fresh_start,
    checkpoint_dir,
    checkpoint_readme,
    config_changes,
    keep_config_history,
    model_config_from_json,
    model_config_to_json,
)
from k2jax.train.start import (
    count_steps,
    place_adapter,
    read_init_adapter,
    resume_step,
    set_aside_later,
    vision_for,
)
from k2jax.train.step import StepSpec, build_program, peak_flops, peak_source

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
        self._last_streak = 0  # the current run of consecutive non-finite steps
        self._dead_steps, self._warned_dead = 0, False

    @classmethod
    def from_config(
        cls, files: str | os.PathLike | Sequence[str | os.PathLike], overrides: Sequence[str] = ()
    ) -> Trainer:
        """A trainer from config files (gin syntax) and `section.key=value` overrides."""
        return cls(RunConfig.load(files, overrides))

    # Set-up -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Builds mesh, model, base, state and data (restoring a checkpoint if there is one).

        Cheap checks come first — the run folder, the model's config.json, the mesh, the data's
        lines — so that a mistake is reported in seconds, before the compile and the base load.
        """
        if self._ready:
            return
        cfg = self.config
        self.is_main = jax.process_index() == 0
        self._check_outputs()
        self.model_config = self._model_config()  # a missing model.path before the mesh
        self.mesh = self._make_mesh()
        from k2jax.sharding import check_mesh_fits

        check_mesh_fits(self.mesh, self.model_config)
        self._check_batch_layout()
        if cfg.log.wandb and self.is_main:
            from k2jax.train.outputs import import_wandb

            import_wandb()  # installed? said now, not after the compile
        self.tokenizer = self._tokenizer()
        self.vision = vision_for(cfg.model, self._check_data())
        self.checkpointer = Checkpointer(
            checkpoint_dir(cfg), keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        latest = self.checkpointer.latest_step()
        data_state, meta, adapter = None, {}, None
        if latest is not None:  # decided before loading a terabyte of base weights
            if not cfg.train.resume:
                raise ConfigError(
                    f"{self.checkpointer.directory} already holds checkpoints (newest: step "
                    f"{latest}); set train.resume = True to continue that run, or choose another "
                    "train.run_dir"
                )
            self._check_resumable()
            latest = resume_step(cfg, self.checkpointer)
            meta = self.checkpointer.restore_meta(latest)
            data_state = meta.get("data_state")
            if cfg.lora.init_from is not None:
                log.info("lora.init_from is not read: resuming the run's own LoRA")
        else:
            if cfg.train.resume_step is not None:
                raise ConfigError(
                    f"train.resume_step = {cfg.train.resume_step}: "
                    f"{self.checkpointer.directory} holds no checkpoints"
                )
            if self.is_main:
                check_fresh_start(self.run_dir, cfg)
            adapter = read_init_adapter(cfg, self.model_config)  # checked before the base loads
        self.total_steps = self._total_steps(meta)
        spec = StepSpec.from_run_config(
            cfg, self.model_config, total_steps=self.total_steps, vision=self.vision
        )
        self.program = build_program(spec, self.mesh)
        from k2jax.data import PackedBatches

        # The data (and its resume fingerprint) is checked before the base is loaded.
        self.data = PackedBatches(
            self._data_config(),
            self.tokenizer,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            state=data_state,
            images=self._image_processor(),
        )
        self.frozen, trained_params = self._load_base()
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        if latest is None:
            self.state = self.program.init_state(cfg.train.seed, trained_params)
            if adapter is not None:  # the optimizer state is all zeros: independent of values
                self.state["trainable"]["lora"] = place_adapter(
                    self.state["trainable"]["lora"],
                    adapter,
                    self.program.state_shardings["trainable"]["lora"],
                )
                adapter.close()
        else:
            log.info("resuming from %s/%d", self.checkpointer.directory, latest)
            # The checkpoint holds the trained base leaves too: the loaded ones are replaced.
            self.state, _ = self.checkpointer.restore(
                latest, self.program.state_abstract, self.program.state_shardings
            )
            set_aside_later(self.checkpointer, latest, is_main=self.is_main)
            self.last_saved_step = latest
        self.step = int(jax.device_get(self.state["step"]))
        # The data position that goes with a state of each step (see `save`).
        self._data_states = {self.step: self.data.state()}
        self._open_outputs(resumed_from=latest)
        self._ready = True

    def _check_outputs(self) -> None:
        """The run folder and checkpoint folder: folders (or absent), and never one of the
        run's inputs (base checkpoint, data, tokenizer) or inside/around one."""
        from k2jax.paths import check_output_path

        cfg = self.config
        outputs = {"train.run_dir": self.run_dir, "checkpoint.dir": checkpoint_dir(cfg)}
        for key, folder in outputs.items():
            if folder.exists() and not folder.is_dir():
                raise ConfigError(f"{key}: {folder} is a file, not a folder; name a folder")
        paths = (cfg.data.path,) if isinstance(cfg.data.path, str) else cfg.data.path
        inputs = {
            "the base checkpoint, model.path": cfg.model.path,
            **{
                f"the training data, data.path{'' if len(paths) == 1 else f' [{i}]'}": (
                    resolve_data_path(p)
                )
                for i, p in enumerate(paths)
            },
            "the evaluation data, eval.path": cfg.eval.path,
            "the adapter to start from, lora.init_from": cfg.lora.init_from,
            "the tokenizer, model.tokenizer": None
            if cfg.model.tokenizer == "tiny"
            else cfg.model.tokenizer,
        }
        for key, folder in outputs.items():
            check_output_path(folder, inputs, flag=key)

    def _check_data(self) -> None:
        """One cheap pass over the data's (and eval data's) lines before anything expensive:
        a bad line is an error (or a count of lines to skip) in seconds, not after the compile."""
        from k2jax.data import validate_data

        check = validate_data(
            self._data_config(), progress=self.config.log.progress and self.is_main
        )
        images = check.images
        if self.config.eval.path is not None:
            images += validate_data(
                self._data_config(self.config.eval.path, shuffle=False, num_epochs=1),
                progress=self.config.log.progress and self.is_main,
            ).images
        return images

    def _make_mesh(self):
        from k2jax.sharding import make_mesh

        m = self.config.mesh
        devices = jax.devices()
        if m.size > len(devices):
            raise MeshError(_mesh_too_large(m, devices, self.model_config))
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
        fields = [f.name for f in dataclasses.fields(ModelConfig)]
        unknown = sorted(set(src.overrides) - set(fields))
        if unknown:
            raise ConfigError(
                f"model.overrides: {unknown} are not ModelConfig fields (k2jax/config/model.py)"
                + did_you_mean(unknown[0], fields)
            )
        if src.path is not None:
            return ModelConfig.from_hf_dir(src.path, **src.overrides)
        return dataclasses.replace(load_model_config(src.preset), **src.overrides)

    def _check_batch_layout(self) -> None:
        """The batch must split over the mesh: rows over data × expert (or each row's sequence, with
        context parallelism), tokens over all devices."""
        cfg, mesh = self.config, self.mesh
        rows, accum = cfg.data.batch_size, cfg.train.grad_accum
        if rows % accum:
            raise ConfigError(
                f"data.batch_size ({rows}) must be divisible by train.grad_accum ({accum})"
            )
        micro = rows // accum
        try:
            mode = resolve_context(cfg.compute.context_parallel, micro, mesh.shape)
        except ValueError as e:
            raise ConfigError(f"{e} (data.batch_size / train.grad_accum = {micro})") from None
        n = {"none": 1, "expert": mesh.shape["expert"]}.get(
            mode, mesh.shape["data"] * mesh.shape["expert"]
        )
        if n > 1 and cfg.data.seq_len % (2 * n):
            raise ConfigError(
                f"data.seq_len {cfg.data.seq_len}: context parallelism over {n} devices "
                f"(compute.context_parallel resolved to {mode!r}) needs a multiple of {2 * n}"
            )
        # each host's loader feeds whole rows (k2jax.data): a row's devices must share a host
        row_groups = mesh.devices.reshape(1 if mode == "all" else mesh.shape["data"], -1)
        if n > 1 and any(len({d.process_index for d in g}) > 1 for g in row_groups):
            raise ConfigError(
                f"compute.context_parallel resolved to {mode!r}: each row's sequence would be "
                "split over devices of several hosts, and rows cannot span hosts yet; use one "
                "row per host at least, with mesh.data = hosts and mesh.expert × mesh.tensor "
                "within a host"
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

    def _image_processor(self):
        """The checkpoint's ImageProcessor when training with the vision tower, else None."""
        if self.vision is None:
            return None
        from k2jax.data.images import ImageProcessor

        return ImageProcessor.from_dir(self.config.model.path)

    def _load_base(self):
        src, prog = self.config.model, self.program
        if src.path is None:
            return prog.init_base(src.seed)
        from k2jax.conversion.checkpoint import read_checkpoint

        _, _, params = read_checkpoint(
            src.path,
            mesh=self.mesh,
            compute=self.config.compute,
            config_overrides=dict(src.overrides) or None,
            vision=self.vision is not None,
        )
        return prog.split_base(params)

    def _data_config(self, path: str | None = None, **changes):
        data = self.config.data
        if path is not None:  # other data (eval.path): no dataset names, mixture or val split
            return data.for_path(resolve_data_path(path), **changes)
        return dataclasses.replace(data, path=resolve_data_path(data.path), **changes)

    def _check_resumable(self) -> None:
        """Refuses to resume a run whose architecture or adapter layout changed."""
        old_file = self.run_dir / CONFIG_FILE
        if not old_file.exists():
            return
        old = RunConfig.load(old_file)
        # lora.init_from only seeds a fresh start; the rest of the section shapes the adapters
        if dataclasses.replace(old.lora, init_from=None) != dataclasses.replace(
            self.config.lora, init_from=None
        ):
            raise ConfigError(
                f"{old_file}: the run was trained with a different `lora` section "
                f"({old.lora}); resume with the same one or use a new train.run_dir"
            )
        model_file = self.run_dir / MODEL_CONFIG_FILE
        if model_file.exists() and model_config_from_json(model_file) != self.model_config:
            raise ConfigError(
                f"{model_file}: the run was trained on a different architecture; resume with the "
                "same model or use a new train.run_dir"
            )

    def _total_steps(self, meta: dict) -> int:
        """train.steps, or the steps of data.num_epochs epochs: counted from the data, or read
        from the resumed checkpoint's meta when it counted the same epochs and batch size."""
        cfg = self.config
        if cfg.train.steps is not None:
            return cfg.train.steps
        counted = meta.get("counted_steps") or {}
        if counted.get("for") == self._count_key():
            return int(counted["steps"])
        return count_steps(
            self._data_config(), self.tokenizer, progress=cfg.log.progress and self.is_main
        )

    def _count_key(self) -> dict:
        return {
            "num_epochs": self.config.data.num_epochs,
            "batch_size": self.config.data.batch_size,
        }

    def _open_outputs(self, resumed_from: int | None) -> None:
        self.logs = None
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_file = self.run_dir / CONFIG_FILE
        if resumed_from is not None and config_file.is_file():
            changes = config_changes(RunConfig.load(config_file), self.config)
            if changes:
                kept = keep_config_history(self.run_dir, resumed_from)
                log.warning(
                    "resuming at step %d with changed settings (the previous config is kept "
                    "as %s): %s",
                    resumed_from,
                    kept,
                    "; ".join(changes),
                )
        # train.resume_step is a one-time choice: a later rerun of config.gin continues from the
        # newest checkpoint, not from that step again
        atomic_write_text(config_file, self.config.replace(train={"resume_step": None}).to_gin())
        atomic_write_text(self.run_dir / MODEL_CONFIG_FILE, model_config_to_json(self.model_config))
        ckpt = self.checkpointer.directory
        ckpt.mkdir(parents=True, exist_ok=True)
        atomic_write_text(ckpt / "README.md", checkpoint_readme(self.run_dir, ckpt))
        from k2jax.train.outputs import RunLogs

        self.logs = RunLogs(self.config, self.run_dir, self.step)

    # The loop -----------------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None) -> list[dict]:
        """Trains up to train.steps (or `max_steps` more steps, if fewer remain); returns the
        metric records of the steps run by this call. Calling it again continues."""
        self.setup()
        cfg = self.config
        total = self.total_steps
        stop = total if max_steps is None else min(total, self.step + max_steps)
        history: list[dict] = []
        if self.step >= total:
            log.info("the run is already at step %d of %d", self.step, total)
            return history
        peak = peak_flops(self.mesh.devices.flat[0], cfg.log.peak_tflops)
        bar = self._progress_bar(total)
        compiled = False
        ctrl_c = CtrlC()
        try:
            with ctrl_c:
                while self.step < stop:
                    ctrl_c.check()
                    # The data position of each state: the batch is fetched (and the data
                    # advanced) before the step runs, so an interrupt in between must save the
                    # position from before the fetch with the unchanged state.
                    self._data_states = {self.step: self.data.state()}
                    host_batch = next(self.data, None)
                    if host_batch is None:
                        log.warning(
                            "data exhausted after step %d of %d: stopping", self.step, total
                        )
                        break
                    self._data_states[self.step + 1] = self.data.state()
                    batch = self.program.device_batch(host_batch)
                    if not compiled:
                        log.info("compiling the train step (%s)", _program_summary(self))
                        seconds = self.program.prepare(self.state, self.frozen, batch)
                        log.info("compiled the train step in %.1f s", seconds)
                        compiled = True
                    hold_step_for_test(self.step + 1, ctrl_c)
                    ctrl_c.check()
                    record = self._step(batch, host_batch, peak, total, first=not history)
                    history.append(record)
                    if bar is not None:
                        bar.update(1)
                        loss = record["loss"] if record["loss"] is not None else float("nan")
                        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    if cfg.eval.every and self.step % cfg.eval.every == 0:
                        self.evaluate()
                    # No checkpoint inside a non-finite streak: its state may be the one that
                    # diverged (see _nonfinite); the next finite step saves as scheduled.
                    if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                        self._save_if_finite(record)
                if self.last_saved_step != self.step and self._last_streak == 0:
                    self.save()
                self.checkpointer.wait()
        except KeyboardInterrupt:
            if not ctrl_c.abandon:
                self._save_on_interrupt()
            raise
        finally:
            if bar is not None:
                bar.close()
            self._flush()
            if history and hasattr(self.data, "summary"):
                # what the data policies touched (bad, over-long dropped or cut at turns) so far
                log.info("data: %s", self.data.summary())
        return history

    def _step(self, batch, host_batch, peak, total: int, first: bool) -> dict:
        """Runs one train step; records, logs and guards its metrics."""
        t0 = time.perf_counter()
        self.state, metrics = self.program.train_step(self.state, self.frozen, batch)
        metrics = jax.device_get(metrics)
        seconds = time.perf_counter() - t0
        self.step += 1
        record = self._record(metrics, host_batch, seconds, peak)
        self._write(record)
        if self.step % self.config.log.every == 0 or self.step == total or first:
            log.info(_console_line(record, total))
        self._last_streak = record["nonfinite_streak"]
        if first:
            self._log_qk_thresholds(record)
        if not record["finite"]:
            self._nonfinite(record)
        self._check_alive(record)
        return record

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
            # The peak MFU divides by (k2jax.train.step.PEAK_TFLOPS: the measured 800 TFLOP/s of an
            # H100/H200, not the datasheet's 989) and where it came from.
            "mfu_peak_tflops": peak / 1e12 if peak else None,
            "mfu_peak": peak_source(self.mesh.devices.flat[0], self.config.log.peak_tflops),
            "max_attention_logit": _finite_or_none(m["max_attention_logit"]),
            "qk_clipped_heads": int(m["qk_clipped_heads"]),
            "expert_load": [float(x) for x in load],
            "moe_exchange_rounds": int(m["moe_exchange_rounds"]),
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
        if self.logs is not None:
            self.logs.train(record)

    def _save_if_finite(self, record: dict) -> None:
        if record["nonfinite_streak"] == 0:
            self.save()

    def _nonfinite(self, record: dict) -> None:
        """A skipped step; after max_nonfinite_steps in a row, stop (NonFiniteError).

        The state that produced the streak — the one after the last applied update, step
        s = first non-finite step − 1 — is presumed to have diverged (that many different
        batches all non-finite): its checkpoint, if one was written, is moved aside (to
        `<checkpoint dir>-nonfinite/<s>`, kept for inspection), so that a rerun resumes from the
        newest checkpoint of a state whose own step was finite. Skipped steps do not change the
        state, and no checkpoint is written inside a streak.
        """
        limit = self.config.train.max_nonfinite_steps
        log.warning(
            "step %d: non-finite loss or gradient; update skipped (%d in a row, %d in all)",
            record["step"],
            record["nonfinite_streak"],
            record["nonfinite_total"],
        )
        if record["nonfinite_streak"] < limit:
            return
        diverged = record["step"] - record["nonfinite_streak"]  # the state of step s
        self.checkpointer.wait()
        moved = [
            self.checkpointer.set_aside(s) for s in self.checkpointer.all_steps() if s >= diverged
        ]
        kept = self.checkpointer.all_steps()
        self.last_saved_step = kept[-1] if kept else None
        where = (
            f"the newest checkpoint is step {kept[-1]}"
            if kept
            else "no checkpoint is left: a rerun starts from step 0"
        )
        raise NonFiniteError(
            f"stopping at step {record['step']}: {limit} consecutive steps had a non-finite "
            f"loss or gradient, so the state after step {diverged} is taken to have diverged"
            + (f" (its checkpoint was moved aside to {moved[0]})" if moved else "")
            + f"; {where}. Lower optim.learning_rate, keep optim.grad_clip_norm on, or check "
            "the data around this step, then rerun to resume "
            f"(data state: {json.dumps(self.data.state())})"
        )

    def _check_alive(self, record: dict) -> None:
        """Warns once about a finite but dead run: a zero gradient norm three steps in a row
        (nothing can learn; with LoRA B at zero, the A gradient alone is zero but B's is not)."""
        dead = record["finite"] and record["grad_norm"] == 0.0
        self._dead_steps = self._dead_steps + 1 if dead else 0
        if self._dead_steps == 3 and not self._warned_dead:
            self._warned_dead = True
            lnv = math.log(self.model_config.vocab_size)
            log.warning(
                "steps %d-%d: the gradient norm is exactly 0 (loss %.4f; ln(vocab) = %.4f): "
                "nothing is learning. Check that the data has assistant tokens to learn "
                "(loss_tokens %s), that lora.targets names modules of this model, and that the "
                "base weights are not all zeros",
                record["step"] - 2,
                record["step"],
                record["loss"],
                lnv,
                record["loss_tokens"],
            )

    def _log_qk_thresholds(self, record: dict) -> None:
        """After the first step: QK-clip's per-head thresholds (k2jax.optim.qk_clip)."""
        tau = self.config.optim.qk_clip_tau
        if tau is None or not record["finite"]:
            return
        from k2jax.optim import logit_scale_factor

        tau_logit = tau * logit_scale_factor(self.model_config)
        thr = np.concatenate(
            [np.ravel(x) for x in jax.tree.leaves(jax.device_get(self.state["qk_thresholds"]))]
        )
        above = int(np.sum(thr > tau_logit))
        log.info(
            "QK-clip: τ = %g (× m² = %.3f: %.1f in logit units); %d of %d heads start above it "
            "and keep their own step-1 max as threshold; %d heads clipped at step %d",
            tau,
            logit_scale_factor(self.model_config),
            tau_logit,
            above,
            thr.size,
            record["qk_clipped_heads"],
            record["step"],
        )

    # Evaluation and checkpoints -----------------------------------------------------------------
    def evaluate(self) -> dict | None:
        """Mean loss (and its perplexity, exp(loss)) over up to eval.batches batches of
        eval.path, or else of the validation records data.val_size sets aside (None with
        neither). Every eval.every steps in `fit`; eval.jsonl gets one line each."""
        self.setup()
        cfg = self.config
        if cfg.eval.path is None and not cfg.data.val_size:
            return None
        from k2jax.data import PackedBatches

        data = PackedBatches(
            self._data_config(cfg.eval.path, shuffle=False, num_epochs=1),
            self.tokenizer,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            split="train" if cfg.eval.path is not None else "validation",
            images=self._image_processor(),
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
        if not total["count"]:
            log.warning("step %d: the evaluation data has no tokens to score", self.step)
            return None
        loss = total["loss_sum"] / total["count"]
        record = {
            "step": self.step,
            "eval_loss": loss,
            # exp of the mean per-token loss; inf past exp's range (never a failed run)
            "eval_perplexity": math.exp(loss) if loss < 709 else math.inf,
            "eval_tokens": int(total["count"]),
        }
        log.info(
            "step %d: eval loss %.4f, perplexity %.3f over %d tokens",
            self.step,
            loss,
            record["eval_perplexity"],
            record["eval_tokens"],
        )
        if self.logs is not None:
            self.logs.eval(record)
        return record

    def save(self) -> None:
        """Starts an (async) checkpoint of the current state and its data position."""
        self.setup()
        # The state's own step: after an interrupt it may differ from the recorded metrics (the
        # step ran, or the batch was fetched but not run), and it is the state that must match
        # the data: each state step has its data position in _data_states.
        step = int(jax.device_get(self.state["step"]))
        data_state = self._data_states.get(step)
        if data_state is None:  # a bug, not a user error: never save a mismatched position
            raise RuntimeError(f"no data position recorded for the state of step {step}")
        meta = {"data_state": data_state, "tokens_seen": self.tokens_seen}
        if self.config.train.steps is None:  # a resume need not count the epochs again
            meta["counted_steps"] = {"for": self._count_key(), "steps": self.total_steps}
        self.checkpointer.save(step, self.state, meta)
        self.last_saved_step = step

    def _save_on_interrupt(self) -> None:
        """Ctrl-C: keep the work done since the last checkpoint, if the state is intact (an
        interrupt inside a step's dispatch may leave it donated) and finite."""
        if any(x.is_deleted() for x in jax.tree.leaves(self.state)):
            log.warning(
                "interrupted mid-step: the newest checkpoint is step %s", self.last_saved_step
            )
            return
        step = int(jax.device_get(self.state["step"]))
        if step == self.last_saved_step or (step == 0 and self.last_saved_step is None):
            log.warning("interrupted: nothing new to save (newest checkpoint: step %s)", step)
            return
        if self._last_streak:
            log.warning("interrupted inside a non-finite streak: not saving that state")
            return
        log.warning("saving step %d before exiting (Ctrl-C again to abandon)", step)
        self.save()
        self.checkpointer.wait()

    def _flush(self) -> None:
        if getattr(self, "logs", None) is not None:
            self.logs.flush()

    def close(self) -> None:
        """Waits for pending checkpoint writes and closes files — also after a set-up that
        failed half-way (an open checkpoint manager would complain at interpreter exit)."""
        checkpointer = getattr(self, "checkpointer", None)
        if checkpointer is not None:
            checkpointer.wait()
            checkpointer.close()
            self.checkpointer = None
        if getattr(self, "logs", None) is not None:
            self.logs.close()
            self.logs = None
        data = getattr(self, "data", None)
        if data is not None:
            data.close()
        self._ready = False

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mesh_too_large(m, devices, model_config) -> str:
    """What to do when the mesh asks for more devices than this machine has."""
    n, have = m.size, len(devices)
    platform = devices[0].platform
    fits = [
        e for e in range(have, 0, -1) if have % e == 0 and model_config.n_routed_experts % e == 0
    ]
    expert = fits[0] if fits else 1
    hint = (
        f"for this machine use e.g. --set mesh.data={have // expert} --set mesh.expert={expert} "
        "--set mesh.tensor=1"
    )
    if platform == "cpu":
        hint += (
            f", or simulate {n} CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count"
            f"={n} (slow; for tests)"
        )
    return (
        f"mesh data={m.data} × expert={m.expert} × tensor={m.tensor} needs {n} devices, but this "
        f"machine has {have} ({platform}): {hint}. To see whether the {n}-device mesh fits its "
        f"GPUs without them, run: k2jax plan --config CONFIG --mesh data={m.data},"
        f"expert={m.expert},tensor={m.tensor} --device-memory-gb GB"
    )


def _program_summary(trainer: Trainer) -> str:
    m = trainer.config.mesh
    return (
        f"mesh data={m.data} expert={m.expert} tensor={m.tensor}, "
        f"{trainer.config.data.batch_size} rows × {trainer.config.data.seq_len} tokens"
    )


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
