"""k2jax: LoRA fine-tuning of the Kimi-K2 family in JAX/XLA on an explicit device mesh.

    import k2jax
    model = k2jax.load_model("ckpt/Kimi-K2-Thinking", mesh=k2jax.sharding.make_mesh(expert=8))
    model.logits(tokens)

Importing k2jax imports nothing heavy: jax and the library's modules load on first use (so that,
e.g., `k2jax plan` can still choose how many CPU devices jax should simulate).
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": "k2jax.api",
    "load_finetune": "k2jax.api",
    "load_adapter": "k2jax.api",
    "K2Model": "k2jax.api",
    "ModelConfig": "k2jax.config",
    "ConfigError": "k2jax.config",
    "Trainer": "k2jax.train",
}
_SUBMODULES = ("sharding", "conversion", "model", "ops", "data", "optim", "train", "configs")

__all__ = [*_LAZY, *_SUBMODULES]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"k2jax.{name}")
    raise AttributeError(f"module 'k2jax' has no attribute {name!r}")
