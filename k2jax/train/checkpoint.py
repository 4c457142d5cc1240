"""Checkpoints of a training run (Orbax): exact resume, async, keep-last-N, atomic.

A checkpoint is one Orbax step folder `<checkpoint dir>/<step>/` with three items:

    train/   {"trainable": {"lora", "params"}, "qk_clip"}  — what the fine-tune *is*; `load_run`,
             `k2jax export` and `k2jax merge` read only this item
    opt/     {"opt_state", "step", "rng", "nonfinite",     — what resuming needs on top
              "qk_thresholds", "ce" — CE-LoRA's carried rows, with lora.ce_refresh ≥ 1}
    meta/    JSON: step, the data iterator's state (PackedBatches.state()), tokens seen, time

The frozen base is never saved (it is the input checkpoint). Splitting train from opt lets an
export restore the adapters without reading the (larger) optimizer state.

Atomic. Orbax writes into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only after
every item is complete; a process killed mid-save leaves a tmp folder that is never listed as a
step (and is removed by the next manager), so the previous checkpoint stays the newest usable one.

Async. `save` returns once the arrays are copied to host memory; the files are written by a
background thread while training continues (the train step donates its state buffers, which is
safe after that copy). `wait()` blocks until the last save is committed; the trainer calls it
before exiting.

Exact resume. Restoring `train` + `opt` + the data state gives the same next batch, the same
optimizer moments and count, the same dropout keys (fold_in of the saved key with the step) and
the same QK-clip factors: the continued run's losses equal an uninterrupted run's (tested).
Restore targets carry the *current* run's shardings, so a run saved on one mesh resumes on
another (Orbax reshards on read).

Test hook: with K2JAX_TEST_SAVE_DELAY="STEP:SECONDS" in the environment, writing the meta item of
step STEP sleeps SECONDS first, holding that checkpoint in its tmp state — the window the SIGKILL
test kills the process in. It changes nothing else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

SAVE_DELAY_ENV = "K2JAX_TEST_SAVE_DELAY"


class CheckpointError(ValueError):
    """A checkpoint cannot be read into this run (wrong shapes, missing items)."""


class _MetaHandler(ocp.JsonCheckpointHandler):
    """Orbax's JSON handler, plus the test-only save delay (see the module docstring)."""

    async def _save_fn(self, x, directory):
        delay = os.environ.get(SAVE_DELAY_ENV)
        if delay:
            step, seconds = delay.split(":")
            if int(step) == x.get("step"):
                await asyncio.sleep(float(seconds))
        await super()._save_fn(x, directory)


@ocp.args.register_with_handler(_MetaHandler, for_save=True)
@dataclasses.dataclass
class _MetaSave(ocp.args.CheckpointArgs):
    item: dict


@ocp.args.register_with_handler(_MetaHandler, for_restore=True)
@dataclasses.dataclass
class _MetaRestore(ocp.args.CheckpointArgs):
    item: dict | None = None


def _split(state: dict) -> tuple[dict, dict]:
    train = {"trainable": state["trainable"], "qk_clip": state["qk_clip"]}
    opt = {k: state[k] for k in ("opt_state", "step", "rng", "nonfinite", "qk_thresholds")}
    if "ce" in state:  # lora.ce_refresh ≥ 1: CE-LoRA's kept rows and their scores
        opt["ce"] = state["ce"]
    return train, opt


class Checkpointer:
    """Saves and restores train states under `directory` (an Orbax CheckpointManager)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = Path(directory).absolute()
        # read_only (load_run): neither create the folder nor clean up another process's tmp dirs.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "train": ocp.StandardCheckpointHandler(),
                "opt": ocp.StandardCheckpointHandler(),
                "meta": _MetaHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, meta: dict[str, Any]) -> None:
        """Starts saving `state` as step `step` (returns before the files are written if async)."""
        train, opt = _split(state)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                train=ocp.args.StandardSave(train),
                opt=ocp.args.StandardSave(opt),
                meta=_MetaSave({**meta, "step": step}),
            ),
            force=True,
        )

    def restore(self, step: int, abstract: dict, shardings: dict) -> tuple[dict, dict]:
        """(state, meta) of `step`, placed with `shardings` (any mesh)."""
        targets = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
        )
        train_t, opt_t = _split(targets)
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    train=ocp.args.StandardRestore(train_t),
                    opt=ocp.args.StandardRestore(opt_t),
                    meta=_MetaRestore(),
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{self.directory / str(step)}: cannot restore into this run ({e}). Did the model, "
                "lora (rank/targets, backward/ce_keep/ce_refresh), train.train_router/train_norms or "
                "optim.name change since it was saved?"
            ) from None
        return {**out["train"], **out["opt"]}, dict(out["meta"])

    def restore_meta(self, step: int) -> dict:
        """The JSON meta item of `step` (data state, tokens seen) — cheap, no arrays."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=_MetaRestore()))
        return dict(out["meta"])

    def restore_train(self, step: int, sharding=None) -> tuple[dict, dict]:
        """({"trainable", "qk_clip"}, meta) of `step` without the optimizer state.

        Shapes come from the checkpoint's own metadata; arrays are placed with `sharding` (one
        sharding for all; default: the first CPU device, i.e. host memory).
        """
        metadata = self.manager.item_metadata(step)
        tree = getattr(metadata["train"], "tree", metadata["train"])
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree
        )
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(train=ocp.args.StandardRestore(target), meta=_MetaRestore()),
        )
        return dict(out["train"]), dict(out["meta"])

    def set_aside(self, step: int, suffix: str = "-nonfinite") -> Path:
        """Moves the checkpoint of `step` out of the checkpoint folder, to
        `<dir><suffix>/<step>` beside it (`<step>.2`, ... when that exists: nothing set aside
        before is replaced): kept for inspection, never resumed. Returns where."""
        self.wait()
        dest = self.directory.with_name(self.directory.name + suffix) / str(step)
        dest.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{step}.{n}")
        shutil.move(str(self.directory / str(step)), str(dest))
        self.manager.reload()
        return dest

    def wait(self) -> None:
        """Blocks until the last save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
