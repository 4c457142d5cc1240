"""What a run writes as it trains: metrics.jsonl, eval.jsonl, TensorBoard, Weights & Biases.

`RunLogs` is opened by the main process only (the others write nothing). Every train step is one
JSON line of metrics.jsonl and the same scalars as `train/<name>` in TensorBoard (and W&B); every
evaluation one line of eval.jsonl (step, eval_loss, eval_perplexity = exp(eval_loss),
eval_tokens) and `eval/loss`, `eval/perplexity`. eval.jsonl is created by the first evaluation:
a run that never evaluates has none (not an empty file). On resume both files are first cut back
to the restored step (k2jax.train.run.truncate_jsonl).

Weights & Biases is optional (`log.wandb = True`; the package is the 'wandb' extra): imported only
when asked, with an error naming the install command when it is missing, checked in set-up
before anything expensive. Each (re)start is a new W&B run named after the run folder, its config
the run's sections; WANDB_MODE=offline (wandb's own switch) writes it under <run_dir>/wandb with no
network, for `wandb sync` later. Rejected alternative: a generic tracker interface (MLflow,
SwanLab, ...): one more concept for one more optional sink; each is a few lines like this one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from k2jax.config import ConfigError
from k2jax.train.run import EVAL_FILE, METRICS_FILE, TENSORBOARD_DIR, truncate_jsonl

WANDB_INSTALL = "pip install 'k2jax[wandb]' (or pip install wandb)"


def import_wandb():
    """The wandb module, or a ConfigError saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            f"log.wandb = True needs the wandb package, which is not installed: {WANDB_INSTALL}; "
            "or set log.wandb = False (TensorBoard and metrics.jsonl are always written)"
        ) from None
    return wandb


class WandbWriter:
    """TensorBoard's `scalars(step, values)` interface over one W&B run."""

    def __init__(self, config, run_dir: Path):
        wandb = import_wandb()
        log = config.log
        self.run = wandb.init(
            project=log.wandb_project or os.environ.get("WANDB_PROJECT") or "k2jax",
            name=log.wandb_name or Path(run_dir).absolute().name,
            dir=str(run_dir),
            config={
                f.name: dataclasses.asdict(getattr(config, f.name))
                for f in dataclasses.fields(config)
            },
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class RunLogs:
    """The run folder's metric files and event sinks, from `step` on (see the module docstring)."""

    def __init__(self, config, run_dir: Path, step: int):
        self.run_dir = Path(run_dir)
        for name in (METRICS_FILE, EVAL_FILE):
            truncate_jsonl(self.run_dir / name, step)
        self._metrics = (self.run_dir / METRICS_FILE).open("a")
        self._eval = None  # opened by the first evaluation
        self._sinks = []
        if config.log.tensorboard:
            from k2jax.train.tensorboard import EventWriter

            self._sinks.append(EventWriter(self.run_dir / TENSORBOARD_DIR))
        if config.log.wandb:
            self._sinks.append(WandbWriter(config, self.run_dir))

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        for sink in self._sinks:
            sink.scalars(step, values)
            sink.flush()

    def train(self, record: dict) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        self._scalars(
            record["step"],
            {
                f"train/{k}": float(v)
                for k, v in record.items()
                if k not in ("step", "time", "expert_load", "finite")
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
            },
        )

    def eval(self, record: dict) -> None:
        if self._eval is None:
            self._eval = (self.run_dir / EVAL_FILE).open("a")
        self._eval.write(json.dumps(record) + "\n")
        self._eval.flush()
        self._scalars(
            record["step"],
            {"eval/loss": record["eval_loss"], "eval/perplexity": record["eval_perplexity"]},
        )

    def flush(self) -> None:
        for f in (self._metrics, self._eval, *self._sinks):
            if f is not None:
                f.flush()

    def close(self) -> None:
        for f in (self._metrics, self._eval, *self._sinks):
            if f is not None:
                f.close()
        self._metrics = self._eval = None
        self._sinks = []
