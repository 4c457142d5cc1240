"""Test support: random k2jax parameter and LoRA trees, and Hugging Face folders written from a
given tree.

`k2jax.testing.make_tiny_checkpoint` makes a folder from a seed; tests that already hold a
parameter tree (test_generate: the model it samples from must be the one `k2jax chat` loads) use
`write_checkpoint` to write exactly that tree in the unquantized HF layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from hf_tree import hf_tensors, tree_from_hf

from k2jax.config import ModelConfig
from k2jax.conversion.loader import abstract_params
from k2jax.conversion.safetensors_io import write_sharded_checkpoint
from k2jax.data.testing import write_tiny_tokenizer
from k2jax.model import ComputeConfig
from k2jax.model.transformer import init_variables
from k2jax.testing import _config_json, _dense_value, hf_tensor_shapes


def variable_shapes(module) -> dict:
    """The unboxed abstract variables of `module` (params, lora, qk_clip): shapes, no memory."""
    return nn.unbox(
        jax.eval_shape(
            lambda: init_variables(module, jax.random.key(0), lora_rng=jax.random.key(1))
        )
    )


def random_lora(lora_shapes: dict, rng: np.random.Generator) -> dict:
    """A float32 "lora" tree with every factor non-zero: A ~ N(0, 1/in), B ~ N(0, 0.2²), so each
    adapter (B = 0 at init) visibly changes the model."""

    def fill(path, x):
        if path[-1].key == "lora_A":
            return (rng.normal(size=x.shape) / np.sqrt(x.shape[-1])).astype(np.float32)
        return (0.2 * rng.normal(size=x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, lora_shapes)


@jax.jit
def perturbed(lora, key):
    """`lora` plus N(0, 0.05²) on every factor (B ≠ 0), so every adapter contributes."""
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """A float32 numpy "params" tree (bf16-layout experts) with make_tiny_checkpoint's values:
    norms near 1, a random router bias, N(0, 1/fan_in) matrices."""
    like = nn.unbox(abstract_params(cfg, ComputeConfig(experts="bf16")))
    like = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), like)
    tensors = {n: _dense_value(n, s, seed) for n, s in hf_tensor_shapes(cfg).items()}
    return tree_from_hf(cfg, like, tensors)


def write_checkpoint(
    folder: str | os.PathLike,
    cfg: ModelConfig,
    params: dict,
    *,
    fmt: str = "float32",
    shards: int = 2,
    tokenizer: bool = True,
) -> Path:
    """Writes `params` as an unquantized HF folder (config.json, `shards` safetensors files,
    the tiny tokenizer when `tokenizer`); fmt is "float32" or "bfloat16"."""
    import ml_dtypes

    dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[fmt]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = [(name, w.astype(dtype)) for name, w in hf_tensors(cfg, params)]
    total = sum(w.nbytes for _, w in tensors)
    write_sharded_checkpoint(folder, tensors, max_shard_bytes=max(1, total // shards + 1))
    text = _config_json(cfg, None, "k2")
    text["torch_dtype"] = fmt
    (folder / "config.json").write_text(json.dumps(text, indent=2) + "\n")
    if tokenizer:
        write_tiny_tokenizer(folder)
    return folder
