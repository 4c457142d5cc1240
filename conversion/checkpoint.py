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
) -> tuple[ModelConfig, ComputeConfig, dict]:
    """Reads a checkpoint folder; the arguments are `k2jax.load_model`'s (see there)."""
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
        abstract = abstract_params(cfg, compute)
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
            params = hf.load(abstract, shardings, progress=progress, check_finite=check_finite)
    finally:
        if hf is not None:
            hf.close()
    return cfg, compute, params
