"""The notebook-facing entry point: `k2jax.load_model(path)` → a model you can call.

    model = k2jax.load_model("ckpt/Kimi-K2-Thinking", mesh=k2jax.sharding.make_mesh(expert=8))
    logits = model.logits(tokens)          # [B, T] int → [B, T, vocab] float32

`K2Model` holds the config, the frozen parameters ("params"), optionally LoRA adapters ("lora"),
and the jitted functions that use them. It is a thin convenience layer over the functional model
(k2jax.model.Transformer), which training uses directly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from k2jax.config import ConfigError, ModelConfig
from k2jax.lora import LoraConfig
from k2jax.model import ComputeConfig, Transformer
from k2jax.model.transformer import init_variables


@dataclasses.dataclass
class K2Model:
    config: ModelConfig
    compute: ComputeConfig
    params: dict
    lora: dict | None = None
    lora_config: LoraConfig | None = None
    mesh: jax.sharding.Mesh | None = None

    @property
    def module(self) -> Transformer:
        return Transformer(self.config, self.compute, self.lora_config if self.lora else None)

    def variables(self) -> dict:
        v = {"params": self.params}
        if self.lora:
            v["lora"] = self.lora
        return v

    @functools.cached_property
    def _logits_fn(self):
        module = self.module
        return jax.jit(lambda v, t, p, s: module.apply(v, t, p, s, method=Transformer.logits))

    def logits(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """[B, T] token ids → [B, T, vocab] float32 logits (positions/segments for packed rows)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        if int(jnp.max(tokens)) >= self.config.vocab_size or int(jnp.min(tokens)) < 0:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        return self._logits_fn(self.variables(), tokens, positions, segment_ids)


def load_model(
    path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype: str = "bfloat16",
    experts: str | None = None,
    compute: ComputeConfig | None = None,
    config_overrides: dict | None = None,
) -> K2Model:
    """Loads a checkpoint folder (Hugging Face layout with config.json + safetensors).

    dtype: compute and parameter dtype ("bfloat16" or "float32").
    experts: "bf16" or "int4" (how routed experts are held; default: as stored).
    config_overrides: ModelConfig fields to change after reading config.json, e.g.
        {"latent_norm_eps": 1e-6} to reproduce the reference code's latent-norm eps.
    """
    from k2jax.conversion.loader import load_params

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint folder")
    cfg = ModelConfig.from_hf_dir(path, **(config_overrides or {}))
    if compute is None:
        compute = ComputeConfig(dtype=dtype, param_dtype=dtype, experts=experts or "bf16")
    elif experts is not None or dtype != "bfloat16":
        raise ConfigError("pass either compute=... or dtype/experts, not both")
    model = Transformer(cfg, compute)
    abstract = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))["params"]
    shardings = None
    if mesh is not None:
        from k2jax.sharding import param_shardings

        shardings = param_shardings(abstract, mesh)
    params = load_params(path, cfg, abstract, shardings=shardings)
    return K2Model(cfg, compute, params, mesh=mesh)
