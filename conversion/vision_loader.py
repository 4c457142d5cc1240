"""Kimi-K2.5's vision tower and projector out of a checkpoint folder, under the released names.

The released K2.5 / K2.6 folders store them in bf16 beside the language model (K2_FACTS §1.3):

    vision_tower.patch_embed.proj.{weight [Dv, 3, P, P], bias}     (a stride-P convolution)
    vision_tower.patch_embed.pos_emb.weight [Hp, Wp, Dv]
    vision_tower.encoder.blocks.N.{wqkv, wo, mlp.fc0, mlp.fc1}.{weight, bias}
    vision_tower.encoder.blocks.N.{norm0, norm1}.{weight, bias}      (LayerNorms)
    vision_tower.encoder.final_layernorm.{weight, bias}
    mm_projector.pre_norm.{weight, bias}, mm_projector.proj.{0, 2}.{weight, bias}

`vision_name` maps a leaf of k2jax's params tree (k2jax.model.vision) and a block index to that
name; the blocks are stacked [L, ...] like the language model's layers. The tower is small (0.4B
parameters in K2.5, 0.8 GB bf16), so each leaf is read whole (pread, one tensor at a time),
checked — present, floating point, the shape the config implies, finite — cast to the parameter
dtype and placed with its sharding (replicated by the rules table).

Whether a folder has a usable tower is `find_vision`: a kimi_k25 config.json with a complete
vision_config, and every tensor above present. `load_model(vision=None)` loads it when so and
otherwise loads the text model alone with one log line saying why; `vision=True` makes any
problem an error, `vision=False` never loads it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from k2jax.config import ConfigError
from k2jax.config.vision import VisionConfig
from k2jax.conversion.safetensors_io import CheckpointError, CheckpointIndex

__all__ = ["VISION_ROOTS", "expected_names", "find_vision", "load_vision", "vision_name"]

log = logging.getLogger(__name__)

VISION_ROOTS = ("vision_tower", "mm_projector")
_BLOCK_MODULES = {"wqkv": "wqkv", "wo": "wo", "fc0": "mlp.fc0", "fc1": "mlp.fc1"}
_PLAIN = {
    ("vision_tower", "patch_embed_proj"): "vision_tower.patch_embed.proj",
    ("vision_tower", "final_layernorm"): "vision_tower.encoder.final_layernorm",
    ("mm_projector", "pre_norm"): "mm_projector.pre_norm",
    ("mm_projector", "proj_0"): "mm_projector.proj.0",
    ("mm_projector", "proj_2"): "mm_projector.proj.2",
}


def vision_name(path: tuple[str, ...], block: int | None = None) -> str:
    """The released tensor name of a vision leaf, e.g. ("vision_tower", "blocks", "wqkv",
    "weight") with block 3 → "vision_tower.encoder.blocks.3.wqkv.weight"."""
    if path == ("vision_tower", "pos_emb"):
        return "vision_tower.patch_embed.pos_emb.weight"
    if path[:2] == ("vision_tower", "blocks"):
        module = _BLOCK_MODULES.get(path[2], path[2])
        return f"vision_tower.encoder.blocks.{block}.{module}.{path[3]}"
    if path[:2] in _PLAIN:
        return f"{_PLAIN[path[:2]]}.{path[2]}"
    raise KeyError(f"no released name for the vision leaf {'/'.join(path)}")


def expected_names(cfg: VisionConfig) -> list[str]:
    """Every tensor name a complete tower of this config stores."""
    plain = [f"{m}.{s}" for m in _PLAIN.values() for s in ("weight", "bias")]
    blocks = [
        f"vision_tower.encoder.blocks.{n}.{m}.{s}"
        for n in range(cfg.num_layers)
        for m in (*_BLOCK_MODULES.values(), "norm0", "norm1")
        for s in ("weight", "bias")
    ]
    return ["vision_tower.patch_embed.pos_emb.weight", *plain, *blocks]


def _leaves(abstract) -> list[tuple[tuple[str, ...], jax.ShapeDtypeStruct]]:
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]
    return [(tuple(k.key for k in p), x) for p, x in flat]


def find_vision(config_json: dict, names, *, source: str) -> tuple[VisionConfig | None, str]:
    """(the VisionConfig, "") when config.json and the stored `names` describe a complete
    vision tower, else (None, why not)."""
    if config_json.get("model_type") != "kimi_k25" or "vision_config" not in config_json:
        return None, "the config has no vision_config"
    try:
        cfg = VisionConfig.from_hf_dict(config_json, source=source)
    except ConfigError as e:
        return None, str(e)
    missing = sorted(set(expected_names(cfg)) - set(names))
    if missing:
        return None, f"{len(missing)} vision tensors are missing ({missing[0]}, ...)"
    return cfg, ""


def checkpoint_vision(folder: str | os.PathLike) -> tuple[VisionConfig | None, str]:
    """`find_vision` of a checkpoint folder, from its config.json and its tensor names (the
    index or the single file's header; no data is read). A converted (Orbax) folder holds the
    text model only."""
    from k2jax.config import read_hf_config
    from k2jax.conversion.orbax_io import is_converted

    folder = Path(folder)
    if is_converted(folder):
        return None, "a converted folder holds the text model only"
    config_json = read_hf_config(folder)
    names = CheckpointIndex(folder).names()
    return find_vision(config_json, names, source=str(folder / "config.json"))


def load_vision(
    index: CheckpointIndex, cfg: VisionConfig, abstract: dict, shardings=None, *, check_finite=True
) -> dict:
    """{"vision_tower": ..., "mm_projector": ...} read from `index` (module docstring).

    `abstract` / `shardings` are those two subtrees of the model's abstract params and their
    shardings (None: the first local device)."""
    flat_shardings = None
    if shardings is not None:
        flat_shardings = [s for _, s in _leaves(shardings)]
    names = set(expected_names(cfg))
    extra = sorted(n for n in index.names() if n.startswith(tuple(f"{r}." for r in VISION_ROOTS)))
    unknown = [n for n in extra if n not in names]
    if unknown:
        raise CheckpointError(
            f"{index.folder}: {len(unknown)} vision tensors have no place in the model "
            f"({', '.join(unknown[:3])}); expected only these names: {', '.join(sorted(names)[:4])}, ..."
        )
    out: dict = {}
    for i, (path, shape) in enumerate(_leaves(abstract)):
        blocks = range(cfg.num_layers) if path[1] == "blocks" else [None]
        parts = [
            _read(index, vision_name(path, b), shape, b is not None, check_finite) for b in blocks
        ]
        host = np.stack(parts) if path[1] == "blocks" else parts[0]
        target = flat_shardings[i] if flat_shardings else jax.local_devices()[0]
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.device_put(host.astype(shape.dtype), target)
    log.info("loaded the vision tower and projector (%d tensors)", len(names))
    return out


def _read(index, name, shape, stacked: bool, check_finite: bool) -> np.ndarray:
    info = index.info(name)
    want = tuple(shape.shape[1:] if stacked else shape.shape)
    if info.dtype not in ("F32", "BF16", "F16"):
        raise CheckpointError(f"{index.folder}: {name} is {info.dtype}; expected a float tensor")
    # the patch embedding is stored as a convolution [Dv, 3, P, P]; k2jax holds [Dv, 3·P·P]
    if int(np.prod(info.shape)) != int(np.prod(want)) or (
        tuple(info.shape) != want and not name.startswith("vision_tower.patch_embed.proj")
    ):
        raise CheckpointError(
            f"{index.folder}: {name} has shape {tuple(info.shape)}; the config implies {want}"
        )
    x = np.asarray(index.read(name, mmap=False)).reshape(want)
    if check_finite and not np.isfinite(x.astype(np.float32)).all():
        raise CheckpointError(
            f"{index.folder}: {name} holds NaN or Inf; repair or download the file again, or "
            "pass check_finite=False"
        )
    return x
