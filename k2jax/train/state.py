"""What a training run holds: the frozen base, the trainable tree, and the train state.

    frozen      the base parameters ("params" collection) minus any trainable leaves; bf16 or
                INT4; an input of every step, never donated, never updated, never checkpointed
    state = {
      "step":      int32 — optimizer steps taken (skipped non-finite steps included)
      "trainable": {"lora": LoRA factors (fp32), "params": trainable base leaves (fp32 masters)}
      "opt_state": the optax state of `trainable`
      "qk_clip":   MuonClip's per-head factors [L, 3, H] (k2jax.optim.qk_clip)
      "rng":       uint32 key data — dropout keys are fold_in(rng, step, microbatch)
      "nonfinite": {"streak", "total"} — skipped steps in a row / in all
      "ce":        only with lora.backward = "ce" and lora.ce_refresh ≥ 1: {"rows": the kept
                   rows of every approximated linear [L, m] / expert stack [L, E, m] (int32),
                   "score": their Σ dY² since the rows were chosen} (k2jax/ops/ce_backward.py)
    }

Trainable base weights without a second copy. With `train_router` / `train_norms`, those leaves
are *moved* out of the frozen tree into `trainable["params"]` (as fp32 master copies) and merged
back into one parameter tree inside the step (`merge_params`, a dict merge — free under jit). The
frozen tree thus lacks them, the optimizer sees only them, and nothing is held twice. The
rejected alternative, a boolean mask over the full tree (optax.masked), keeps the frozen copy of
every trainable leaf alive next to its master copy and gives optax a 1T-leaf-sized state skeleton.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "q_a_layernorm", "kv_a_layernorm")


def path_keys(path) -> tuple[str, ...]:
    """A jax key path (from tree_flatten_with_path) as plain strings: dict keys and attribute
    names, e.g. ("moe_layers", "mlp", "gate", "weight"). The parameter, LoRA and aux trees are
    nested dicts, so this is the name every predicate here and in the step matches on."""
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def at_path(tree: dict, keys: tuple[str, ...]):
    """The node of the nested dict `tree` at `keys` (path_keys' names)."""
    for k in keys:
        tree = tree[k]
    return tree


def is_router(keys: tuple[str, ...]) -> bool:
    """The MoE router weight `mlp.gate.weight` (not its selection-only bias, which gets no
    gradient: it only chooses experts)."""
    return keys[-3:] == ("mlp", "gate", "weight")


def is_norm(keys: tuple[str, ...]) -> bool:
    """Every RMSNorm weight: the per-layer norms, the MLA latent norms and the final `norm`."""
    return keys[-1] == "weight" and (keys[-2] in NORM_NAMES or keys == ("norm", "weight"))


def trainable_predicate(*, router: bool, norms: bool) -> Callable[[tuple[str, ...]], bool]:
    return lambda keys: (router and is_router(keys)) or (norms and is_norm(keys))


def split_params(params, predicate) -> tuple[dict, dict]:
    """(frozen, trainable): the nested dict split by `predicate(keys)`; empty dicts pruned."""
    frozen: dict = {}
    trainable: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]:
        keys = path_keys(path)
        target = trainable if predicate(keys) else frozen
        node = target
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return frozen, trainable


def merge_params(frozen, trainable) -> dict:
    """The full parameter tree: `frozen` with the leaves of `trainable` put back (no copies)."""
    if not trainable:
        return frozen
    out = dict(frozen)
    for k, v in trainable.items():
        out[k] = merge_params(out[k], v) if isinstance(v, dict) and k in out else v
    return out


def _is_box(x) -> bool:
    import flax.linen as nn

    return isinstance(x, nn.LogicallyPartitioned)


def opt_state_shardings(opt_state_abstract, trainable_abstract, trainable_shardings, mesh):
    """A sharding for every optimizer-state leaf: that of the trainable leaf it belongs to.

    optax states hold copies of the parameter tree (momenta); an optimizer-state leaf belongs to the
    parameter whose dict path its own key path ends with, when the shapes agree. Everything else
    (counts, Newton–Schulz coefficients) is small and replicated.
    """
    by_path = {}
    flat_shardings = jax.tree.leaves(trainable_shardings)
    for (path, x), s in zip(
        jax.tree_util.tree_flatten_with_path(trainable_abstract)[0], flat_shardings
    ):
        by_path[path_keys(path)] = (tuple(x.shape), s)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        keys = _dict_suffix(path)
        for i in range(len(keys)):
            shape, s = by_path.get(keys[i:], (None, None))
            if s is not None and shape == tuple(leaf.shape):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state_abstract)


def _dict_suffix(path) -> tuple[str, ...]:
    """The trailing run of dict keys of a key path (the parameter path inside an optax state)."""
    out = []
    for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        out.append(str(k.key))
    return tuple(reversed(out))


def to_host(tree):
    """Numpy copies of every array (for comparisons and export)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
