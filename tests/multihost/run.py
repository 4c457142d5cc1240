"""The training run both sides of tests/test_multihost.py execute: one process with 8 devices, or
each of two processes with 4 (tests/multihost/worker.py).

`run_steps` builds the spec of configs/tiny_train.gin (float32 compute, Muon, LoRA on every linear)
over the tiny model of configs/tiny.gin, a random base and LoRA state from fixed seeds, and a fixed
random batch, then runs the library's own jitted train step (k2jax.train.Program) on a
(data, expert, tensor) mesh over all devices of all processes. Everything is a pure function of the
seeds, so every process — and the single-process reference — computes the same global arrays.

The batch enters as a real multi-host run's does: every process makes the same global rows, keeps
only the rows its devices hold, and `Program.device_batch` assembles the global array with
`jax.make_array_from_process_local_data`. Which rows those are is read from the batch sharding and
checked against the layout the data pipeline assumes (k2jax.data.PackedBatches: process p keeps
rows [p·b, (p+1)·b)).
"""

from __future__ import annotations

import jax
import numpy as np

from k2jax.config import CONFIG_DIR, load_model_config
from k2jax.sharding import make_mesh
from k2jax.train import RunConfig, StepSpec, build_program

ROWS, SEQ = 8, 32  # per step: 8 rows (2 per data × expert shard of a 2×2×2 mesh) × 32 tokens


def tiny_spec() -> StepSpec:
    run = RunConfig.load(CONFIG_DIR / "tiny_train.gin", ["train.run_dir=unused"])
    return StepSpec.from_run_config(run, load_model_config(CONFIG_DIR / "tiny.gin"))


def global_batch(vocab: int, rows: int = ROWS, seq: int = SEQ, seed: int = 1000) -> dict:
    """A packed batch [rows, seq] of random tokens, laid out as k2jax.data packs chats: two or three
    examples per row, then padding; targets are the next token within an example; a random subset of
    each example's positions is in the loss."""
    rng = np.random.default_rng(seed)
    shape = (rows, seq)
    tokens = rng.integers(0, vocab, shape, dtype=np.int32)
    targets = np.zeros(shape, np.int32)
    loss_mask = np.zeros(shape, np.float32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    for r in range(rows):
        o, k = 0, 0
        while o < seq - 4 and k < 3:
            n = int(rng.integers(4, seq - o + 1))
            k += 1
            targets[r, o : o + n - 1] = tokens[r, o + 1 : o + n]
            loss_mask[r, o : o + n - 1] = rng.random(n - 1) < 0.7
            segment_ids[r, o : o + n] = k
            positions[r, o : o + n] = np.arange(n)
            o += n
        tokens[r, o:] = 0  # padding
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
        "positions": positions,
    }


def local_rows(program, rows: int, seq: int) -> slice:
    """The rows of a [1, rows, seq] batch that this process's devices hold, from the sharding."""
    index = program.batch_sharding.addressable_devices_indices_map((1, rows, seq))
    held = sorted({i for idx in index.values() for i in range(rows)[idx[1]]})
    first, last = held[0], held[-1] + 1
    assert held == list(range(first, last)), f"process {jax.process_index()} holds rows {held}"
    # The data pipeline hands process p rows [p·b, (p+1)·b) (k2jax.data.PackedBatches).
    b = rows // jax.process_count()
    p = jax.process_index()
    assert (first, last) == (p * b, (p + 1) * b), (
        f"the mesh puts rows [{first}, {last}) on process {p}, but PackedBatches gives it "
        f"[{p * b}, {(p + 1) * b})"
    )
    return slice(first, last)


def run_steps(steps: int, mesh_shape: tuple[int, int, int]) -> list[float]:
    """The losses of `steps` LoRA train steps on a (data, expert, tensor) = mesh_shape mesh, all on
    the same batch (so the loss changes only because the adapters train)."""
    spec = tiny_spec()
    program = build_program(spec, make_mesh(*mesh_shape))
    frozen, tparams = program.init_base(0)
    state = program.init_state(0, tparams)
    mine = local_rows(program, ROWS, SEQ)
    host = {k: v[mine] for k, v in global_batch(spec.model.vocab_size).items()}
    batch = program.device_batch(host)
    losses = []
    for _ in range(steps):
        state, metrics = program.train_step(state, frozen, batch)
        losses.append(float(metrics["loss"]))  # replicated: readable on every process
    return losses
