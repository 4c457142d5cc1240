"""How a run starts: which checkpoint it resumes, how many steps it has, which LoRA it starts from.

    resume_step(cfg, checkpointer)     the newest checkpoint, or train.resume_step (checked), or
                                       None for a fresh start
    set_aside_later(checkpointer, s)   a resume from an earlier step moves the checkpoints after
                                       it to <checkpoint dir>-superseded/ (kept, never deleted)
    count_steps(data_config, tok)      train.steps = None: the optimizer steps of data.num_epochs
                                       epochs, counted by packing the data as training will
    read_init_adapter(cfg, model_cfg)  lora.init_from: the PEFT adapter, checked against the run
    vision_for(model_source, images)   the K2.5 vision tower to train with (model.vision), if any
    place_adapter(lora, adapter, ...)  its factors put over a fresh LoRA tree, on the mesh

Counting steps. transformers sizes a run in epochs by len(dataloader) × epochs; here a step is
data.batch_size packed rows and the rows an epoch fills depend on its (seeded) order, so the exact
count is one pass over the data per epoch through the same packing (PackedBatches), before the
base model loads. It tokenizes every example once per epoch and takes a fraction of what loading
a large checkpoint takes; a progress bar shows it, and each checkpoint stores the count, so a
resumed run does not count again (unless data.num_epochs or data.batch_size changed). Rejected
alternative: an estimate from one epoch's rows, which can be off by several steps (the row count
of next-fit packing varies with the order) and would leave the schedule unfinished or cut the
last epoch short.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

import jax

from k2jax.config import ConfigError

log = logging.getLogger(__name__)

SUPERSEDED_SUFFIX = "-superseded"


def resume_step(cfg, checkpointer) -> int | None:
    """The step to resume (train.resume_step, else the newest), or None for a fresh start."""
    steps = checkpointer.all_steps()
    wanted = cfg.train.resume_step
    if wanted is None:
        return steps[-1] if steps else None
    if wanted not in steps:
        have = ", ".join(map(str, steps)) or "none"
        raise ConfigError(
            f"train.resume_step = {wanted}: {checkpointer.directory} has no checkpoint of that "
            f"step (it has: {have}; checkpoint.keep = {cfg.checkpoint.keep} keeps the newest)"
        )
    return wanted


def set_aside_later(checkpointer, step: int, *, is_main: bool) -> list:
    """Moves the checkpoints after `step` to <checkpoint dir>-superseded/<step> (a resume from
    `step` continues from there; they stay on disk for inspection). Returns where they went."""
    later = [s for s in checkpointer.all_steps() if s > step]
    if not later:
        return []
    moved = []
    if is_main:
        moved = [checkpointer.set_aside(s, suffix=SUPERSEDED_SUFFIX) for s in later]
        log.warning(
            "resuming from step %d: the later checkpoints (%s) were moved aside to %s",
            step,
            ", ".join(map(str, later)),
            moved[0].parent,
        )
    if jax.process_count() > 1:  # every host's manager must see the moved folders
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("k2jax: later checkpoints set aside")
    checkpointer.manager.reload()
    return moved


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def count_steps(data_config, tokenizer, *, progress: bool = False) -> int:
    """The optimizer steps of `data_config` (data.num_epochs epochs, data.batch_size rows a step):
    the batches PackedBatches yields, counted on this host for the whole batch. The data's own
    notices (bad examples, epoch summaries) are left to the training pass."""
    from k2jax.data import PackedBatches

    if data_config.num_epochs is None:
        raise ConfigError("counting steps needs data.num_epochs")
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="counting steps", unit="step", file=sys.stderr)
    steps = 0
    try:
        with _quiet("k2jax.data"):
            batches = PackedBatches(data_config, tokenizer)
            try:
                for _ in batches:
                    steps += 1
                    if bar is not None:
                        bar.update(1)
            finally:
                batches.close()
    finally:
        if bar is not None:
            bar.close()
    log.info(
        "train.steps = None: %d epoch%s of %d-row batches = %d steps (counted in %.1f s)",
        data_config.num_epochs,
        "s" if data_config.num_epochs != 1 else "",
        data_config.batch_size,
        steps,
        time.perf_counter() - start,
    )
    return steps


def read_init_adapter(cfg, model_config):
    """lora.init_from read and checked against the run's lora section and model (before any
    weights load), or None when it is unset."""
    if cfg.lora.init_from is None:
        return None
    from k2jax.conversion.peft_load import AdapterError, read_peft

    try:
        adapter = read_peft(cfg.lora.init_from, model_config)
        fresh = adapter.check(cfg.lora)
    except AdapterError as e:
        msg = str(e)
        raise ConfigError(
            msg if msg.startswith("lora.init_from") else f"lora.init_from: {msg}"
        ) from None
    log.info(
        "lora.init_from: starting from %s (rank %d, %d modules%s)",
        adapter.folder,
        adapter.rank,
        len(adapter.trained),
        f"; {len(fresh)} targeted modules it does not train start fresh" if fresh else "",
    )
    return adapter


def place_adapter(lora: dict, adapter, shardings: dict) -> dict:
    """`lora` (a fresh LoRA tree of the train state) with the adapter's trained modules replaced
    by its factors, each device's part read from the file (jax.make_array_from_callback)."""
    out = dict(lora)
    for path in adapter.trained:
        node, sh = out, shardings
        for key in path:
            node[key] = dict(node[key])
            node, sh = node[key], sh[key]
        for factor in ("lora_A", "lora_B"):
            shape = node[factor].shape
            node[factor] = jax.make_array_from_callback(
                shape,
                sh[factor],
                lambda index, p=path, f=factor, s=shape: adapter.block(p, f, s, index),
            )
    return out


def vision_for(src, images: int):
    """The VisionConfig of the tower to train with, or None (`ModelSource.vision`): None loads
    it when the checkpoint has a complete one and the data has `images` (the data check's
    count); True requires it; False never. A tower the data needs but the model lacks is an
    error that says how to train on text only."""
    if src.vision is False:
        return None
    if src.path is None:
        vcfg, why = None, "a random base (model.preset) is a text model"
    else:
        from k2jax.conversion.vision_loader import checkpoint_vision

        vcfg, why = checkpoint_vision(src.path)
    if vcfg is None and (src.vision or images):
        data = f"the data has {images:,} images, but " if images else ""
        raise ConfigError(
            f"model.vision: {data}the model has no vision tower ({why}); set model.vision = "
            "False to train on text only (records with images are then skipped as bad "
            "examples)"
        )
    if vcfg is not None and not (src.vision or images):
        log.info("the vision tower is not loaded: the data has no images (model.vision)")
        return None
    return vcfg
