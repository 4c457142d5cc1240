"""Loading a Hugging Face checkpoint folder into k2jax parameters, straight onto their shardings.

The loader never builds the model on one host: for every parameter leaf it asks
`jax.make_array_from_callback` for an array with the leaf's final sharding, and the callback
assembles only the slice a device owns, reading only the HF tensors that intersect it. A stacked
leaf such as `moe_layers/mlp/experts/gate_up_proj/weight` [L, E, 2F, D] is put together from the
per-expert, per-layer HF tensors that fall into the requested [layer, expert] range.

Targets that differ from the stored form are converted on the way: a bf16/fp32 tensor becomes an
INT4 `weight_q`/`weight_scale` pair when the model holds experts in INT4 (compressed-tensors'
min-max rule, k2jax.quant.quantize_int4), and the other way round.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from k2jax.config import ModelConfig
from k2jax.conversion.hf_names import (
    ParamSlot,
    UnknownTensorError,
    hf_to_slot,
    normalize_name,
)
from k2jax.quant import quantize_int4

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint folder or tensor is not what the config says; the message names it."""


class _SafetensorsShim:
    """Minimal reader over safetensors' numpy API (bf16/fp32 checkpoints)."""

    def __init__(self, folder: Path):
        import json

        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").exists():
            with safe_open(folder / "model.safetensors", "numpy") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118
        else:
            raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self.weight_map = weight_map
        self._open = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def read(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        file = self.weight_map[name]
        if file not in self._open:
            self._open[file] = safe_open(self.folder / file, "numpy")
        return self._open[file].get_tensor(name)


@dataclasses.dataclass
class _Source:
    """One HF tensor (or quantized tensor group) feeding a leaf."""

    hf_name: str
    slot: ParamSlot


def _to_numpy_dtype(dtype) -> np.dtype:
    if dtype == jnp.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    if dtype == jnp.int4:
        return np.dtype(ml_dtypes.int4)
    return np.dtype(dtype)


def plan_sources(reader, cfg: ModelConfig) -> dict[tuple[str, ...], list[_Source]]:
    """Groups the checkpoint's tensors by the module they belong to (module path → sources)."""
    plan: dict[tuple[str, ...], list[_Source]] = defaultdict(list)
    skipped = 0
    for raw in reader.names():
        name = normalize_name(raw)
        if name is None:
            skipped += 1
            continue
        try:
            slot = hf_to_slot(name, cfg)
        except UnknownTensorError as e:
            raise CheckpointError(
                f"{reader.folder}: tensor {raw!r} is not part of a Kimi-K2 text model ({e})"
            ) from None
        if slot is None:
            continue
        plan[(*slot.module, slot.suffix)].append(_Source(raw, slot))
    if skipped:
        log.info("skipped %d vision/projector tensors (not part of the text model)", skipped)
    return plan


def _assemble(
    shape: tuple[int, ...],
    index: tuple[slice, ...],
    sources: Sequence[_Source],
    read: Callable[[_Source], np.ndarray],
    dtype: np.dtype,
    stacked_dims: int,
    part_rows: int | None,
) -> np.ndarray:
    """Builds leaf[index] from the sources that intersect it.

    The first `stacked_dims` dims of the leaf are (layer[, expert]); each source fills one entry
    of them, and for a fused gate|up leaf (`part_rows` = F) rows [part·F, (part+1)·F) of the next.
    """
    index = tuple(slice(*s.indices(n)) for s, n in zip(index, shape))
    out_shape = tuple(s.stop - s.start for s in index)
    out = np.empty(out_shape, dtype)
    filled = np.zeros(out_shape[:stacked_dims] + ((2,) if part_rows else ()), bool)
    for src in sources:
        lead = tuple(i for i in (src.slot.layer, src.slot.expert) if i is not None)
        if len(lead) != stacked_dims:
            raise CheckpointError(f"{src.hf_name}: unexpected position in a stacked parameter")
        if not all(s.start <= i < s.stop for i, s in zip(lead, index)):
            continue
        local = tuple(i - s.start for i, s in zip(lead, index))
        rest = index[stacked_dims:]
        if part_rows:
            row0 = src.slot.part * part_rows
            r = rest[0]
            lo, hi = max(r.start, row0), min(r.stop, row0 + part_rows)
            if lo >= hi:
                continue
            arr = read(src)
            block = arr[(slice(lo - row0, hi - row0), *rest[1:])]
            out[(*local, slice(lo - r.start, hi - r.start))] = block
            filled[(*local, src.slot.part)] = True
        else:
            arr = read(src)
            out[local] = arr[rest] if rest else arr
            filled[local] = True
    if not filled.all():
        raise CheckpointError(
            f"missing tensors for {sources[0].slot.module if sources else '?'} "
            f"(index {index}): the checkpoint does not cover every layer/expert"
        )
    return out


def load_params(
    folder: str | Path,
    cfg: ModelConfig,
    abstract_params,
    *,
    shardings=None,
    reader=None,
) -> dict:
    """Loads the "params" collection described by `abstract_params` (boxed or plain
    ShapeDtypeStructs, as from `jax.eval_shape(init_variables(...))["params"]`).

    `shardings` is a matching tree of jax.sharding.Sharding (default: the first device).
    """
    folder = Path(folder)
    reader = reader or _SafetensorsShim(folder)
    plan = plan_sources(reader, cfg)
    abstract = nn.unbox(abstract_params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    flat_shardings = (
        jax.tree.leaves(shardings)
        if shardings is not None
        else [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(flat)
    )
    used: set[tuple[str, ...]] = set()
    leaves = []
    for (path, spec), sharding in zip(flat, flat_shardings):
        keys = tuple(p.key for p in path)
        module, leaf = keys[:-1], keys[-1]
        dtype = _to_numpy_dtype(spec.dtype)
        stacked_dims = (1 if module[0] in ("dense_layers", "moe_layers") else 0) + (
            1 if "experts" in module else 0
        )
        part_rows = spec.shape[stacked_dims] // 2 if module[-1] == "gate_up_proj" else None
        if leaf in ("weight_q", "weight_scale"):
            sources = plan.get((*module, "weight"), [])
            used.add((*module, "weight"))
            which = 0 if leaf == "weight_q" else 1
            group = spec.shape[-1] if leaf == "weight_q" else None

            def read(src, which=which, dtype=dtype, group=group, module=module):
                w = reader.read(src.hf_name)
                g = _int4_group(abstract, module)
                q = quantize_int4(np.asarray(w, np.float32), g, scale_dtype=jnp.bfloat16)
                return np.asarray((q.values, q.scales)[which]).astype(dtype)

        else:
            sources = plan.get((*module, leaf), [])
            used.add((*module, leaf))

            def read(src, dtype=dtype):
                return np.asarray(reader.read(src.hf_name)).astype(dtype)

        if not sources:
            raise CheckpointError(
                f"{folder}: no tensor for parameter {'/'.join(keys)} "
                f"(expected HF tensors like {_example_name(module, leaf, cfg)})"
            )
        _check_source_shapes(reader, sources, spec.shape, stacked_dims, part_rows, leaf)

        def callback(
            index, sources=sources, read=read, spec=spec, dtype=dtype, sd=stacked_dims, pr=part_rows
        ):
            return _assemble(spec.shape, index, sources, read, dtype, sd, pr)

        leaves.append(jax.make_array_from_callback(spec.shape, sharding, callback))
    unused = set(plan) - used
    if unused:
        names = sorted(plan[k][0].hf_name for k in unused)[:5]
        raise CheckpointError(f"{folder}: tensors with no place in the model: {names}")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _int4_group(abstract, module) -> int:
    node = abstract
    for k in module:
        node = node[k]
    return node["weight_q"].shape[-1] // node["weight_scale"].shape[-1]


def _example_name(module, leaf, cfg) -> str:
    from k2jax.conversion.hf_names import slot_to_hf

    layer = 0 if module[0] in ("dense_layers", "moe_layers") else None
    expert = 0 if "experts" in module else None
    part = 0 if module[-1] == "gate_up_proj" else None
    suffix = "weight" if leaf.startswith("weight") else leaf
    try:
        return slot_to_hf(ParamSlot(module, suffix, layer, expert, part), cfg)
    except Exception:
        return "/".join(module)


def _check_source_shapes(reader, sources, leaf_shape, stacked_dims, part_rows, leaf):
    """Each HF tensor must have the per-entry shape the config implies."""
    if leaf == "weight_scale":
        return  # the same HF tensors are checked for the sibling weight_q leaf
    want = list(leaf_shape[stacked_dims:])
    if part_rows:
        want[0] = part_rows
    for src in sources:
        shape = _shape_of(reader, src.hf_name)
        if list(shape) != want:
            raise CheckpointError(
                f"tensor {src.hf_name!r} has shape {list(shape)}, but the config implies {want}"
            )


def _shape_of(reader, name) -> tuple[int, ...]:
    info = getattr(reader, "info", None)
    if info is not None:
        return tuple(info(name)[1])
    return tuple(reader.read(name).shape)
