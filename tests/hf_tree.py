"""Test support: k2jax parameter trees ↔ Hugging Face tensor names (test_merge, test_generate)."""

from __future__ import annotations

import itertools

import jax
import numpy as np

from k2jax.config import ModelConfig
from k2jax.conversion.hf_names import ParamSlot, slot_to_hf

STACKS = ("dense_layers", "moe_layers")


def _entries(params):
    """(HF slot fields, leaf path, stacked index, row slice) per HF tensor of `params`."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(p.key for p in path)
        module, suffix = keys[:-1], keys[-1]
        lead = (1 if module[0] in STACKS else 0) + (1 if "experts" in module else 0)
        for index in itertools.product(*(range(n) for n in np.shape(leaf)[:lead])):
            layer = index[0] if module[0] in STACKS else None
            expert = index[1] if lead == 2 else None
            if module[-1] == "gate_up_proj":
                F = np.shape(leaf)[lead] // 2
                for part in (0, 1):
                    slot = ParamSlot(module, suffix, layer, expert, part)
                    yield slot, keys, index, slice(part * F, (part + 1) * F)
            else:
                yield ParamSlot(module, suffix, layer, expert), keys, index, slice(None)


def hf_tensors(cfg: ModelConfig, params: dict):
    """(HF name, float32 array) for every tensor an unquantized checkpoint of `params` holds."""
    for slot, keys, index, rows in _entries(params):
        leaf = params
        for k in keys:
            leaf = leaf[k]
        yield slot_to_hf(slot, cfg), np.asarray(leaf[index], np.float32)[rows]


def tree_from_hf(cfg: ModelConfig, like: dict, tensors: dict) -> dict:
    """A float32 copy of `like` with the leaves `tensors` (HF name → array) has values for."""
    tree = jax.tree.map(lambda x: np.array(x, np.float32), like)
    for slot, keys, index, rows in _entries(like):
        value = tensors.get(slot_to_hf(slot, cfg))
        if value is not None:
            node = tree
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]][(*index, rows)] = value
    return tree


def host_params(model) -> dict:
    """A loaded K2Model's parameters as float32 numpy (INT4 experts must be loaded as bf16)."""
    return jax.tree.map(lambda x: np.array(x, np.float32), model.params)
