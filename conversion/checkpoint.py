"""One checkpoint folder → (ModelConfig, ComputeConfig, parameters on their final shardings).

    cfg, compute, params = read_checkpoint("ckpt/Kimi-K2-Thinking", mesh=make_mesh(expert=8))

The folder is either a Hugging Face release (config.json + safetensors: bf16, FP8 blocks or INT4
compressed-tensors experts, K2 or K2.5's nested layout; read by loader.HFCheckpoint) or a folder
written by `k2jax convert` (recognised by its k2jax_checkpoint.json; read by orbax_io). Both
paths build the same abstract parameter tree first (loader.abstract_params), so a leaf is
created once, already sharded — the whole model never sits in host memory.

This is the loading step shared by `k2jax.load_model` (which wraps the result in a K2Model for
notebooks) and the trainer (which splits it into frozen base and trainable leaves).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from k2jax.config import ConfigError, ModelConfig
from k2jax.conversion.safetensors_io import CheckpointError
from k2jax.conversion.vision_loader import VISION_ROOTS, load_vision
from k2jax.model import ComputeConfig


def read_checkpoint(
    path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype: str = "bfloat16",
    experts: str | None = None,
    compute: ComputeConfig | None = None,
    config_overrides: dict | None = None,
    progress: bool | None = None,
    check_finite: bool = True,
    vision: bool | None = False,
) -> tuple[ModelConfig, ComputeConfig, dict]:
    """Reads a checkpoint folder; the arguments are `k2jax.load_model`'s (see there). With a
    vision tower loaded, the params also hold "vision_tower" and "mm_projector"."""
    from k2jax.conversion.loader import HFCheckpoint, abstract_params
    from k2jax.conversion.orbax_io import is_converted, read_metadata, restore_params

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint folder")
    cfg = ModelConfig.from_hf_dir(path, **(config_overrides or {}))
    converted = is_converted(path)
    hf = None
    if converted:
        stored_experts = read_metadata(path)["experts"]
    else:
        hf = HFCheckpoint(path, cfg)
        stored_experts = hf.default_experts
    try:
        if compute is None:
            compute = ComputeConfig(
                dtype=dtype, param_dtype=dtype, experts=experts or stored_experts
            )
        elif experts is not None or dtype != "bfloat16":
            raise ConfigError("pass either compute=... or dtype/experts, not both")
        if converted and compute.experts != stored_experts:
            raise ConfigError(
                f"{path} was converted with experts={stored_experts!r}; load it with that (or "
                f"convert the Hugging Face checkpoint again with --experts {compute.experts})"
            )
        vcfg = None
        if vision is not False:
            vcfg = None if hf is None else hf.vision
            problem = "a converted folder holds the text model only" if hf is None else None
            if vision and vcfg is None:
                raise CheckpointError(
                    f"{path}: no vision tower to load: {problem or hf.vision_problem}"
                )
        abstract = abstract_params(cfg, compute, vcfg)
        shardings = None
        if mesh is not None:
            from k2jax.sharding import check_mesh_fits, param_shardings

            check_mesh_fits(mesh, cfg)
            shardings = param_shardings(abstract, mesh)
        if converted:
            params = restore_params(
                path, abstract, shardings, progress=progress, check_finite=check_finite
            )
        else:
            text = {k: v for k, v in abstract.items() if k not in VISION_ROOTS}
            text_sh = None if shardings is None else {k: shardings[k] for k in text}
            params = hf.load(text, text_sh, progress=progress, check_finite=check_finite)
            if vcfg is not None:
                params = dict(params)
                params.update(
                    load_vision(
                        hf.index,
                        vcfg,
                        {k: abstract[k] for k in VISION_ROOTS},
                        None if shardings is None else {k: shardings[k] for k in VISION_ROOTS},
                        check_finite=check_finite,
                    )
                )
    finally:
        if hf is not None:
            hf.close()
    return cfg, compute, params
