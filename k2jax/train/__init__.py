"""k2jax.train: LoRA training over a frozen bf16 or INT4 base — the loop, its state, checkpoints.

* `Trainer` (trainer.py) — `Trainer.from_config(files, overrides).fit()`: set-up, the loop,
  metrics, evaluation, checkpoints, exact resume. `k2jax train` (k2jax/cli.py) calls it.
* `RunConfig` (config.py) — the run's sections (model, compute, mesh, lora, optim, schedule, data,
  train, eval, checkpoint, log), read from gin-syntax files.
* `run_config_from_yaml` (llamafactory.py) — a LLaMA-Factory training YAML as a RunConfig.
* `count_steps`, `resume_step`, ... (start.py) — how a run starts: its length in steps (counted
  from data.num_epochs when train.steps is None), the checkpoint it resumes (newest or chosen),
  the PEFT adapter it starts from (lora.init_from).
* `RunLogs` (outputs.py) — metrics.jsonl, eval.jsonl (loss, perplexity), TensorBoard, W&B.
* `Program` (step.py) — the compiled train/eval steps and every sharding, cached per setup.
* `Checkpointer` (checkpoint.py) — Orbax: async, keep-last-N, atomic, restorable on any mesh.
* `load_run` (run.py) — a run folder's configs, LoRA, QK-clip factors, trained base leaves.
* `plan` / `plan_config` (planner.py) — will a run fit a mesh: the real step compiled for CPU
  devices standing in for the GPUs (`k2jax plan`).
* `tensorboard` — a dependency-free TensorBoard scalar writer.

Names load lazily (as in the top-level package), so `import k2jax.train` does not import jax.
"""

import importlib

_LAZY = {
    "Trainer": "trainer",
    "NonFiniteError": "trainer",
    "DEMO_DATA": "trainer",
    "RunConfig": "config",
    "ModelSource": "config",
    "MeshConfig": "config",
    "TrainConfig": "config",
    "EvalConfig": "config",
    "CheckpointConfig": "config",
    "LogConfig": "config",
    "run_config_from_yaml": "llamafactory",
    "count_steps": "start",
    "RunLogs": "outputs",
    "Program": "step",
    "StepSpec": "step",
    "build_program": "step",
    "Checkpointer": "checkpoint",
    "CheckpointError": "checkpoint",
    "Run": "run",
    "load_run": "run",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"k2jax.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'k2jax.train' has no attribute {name!r}")
