"""The architecture of a Kimi-K2-family model, read from the checkpoint's own config.json.

    cfg = ModelConfig.from_hf_dir("ckpt/Kimi-K2-Thinking")     # a checkpoint folder
    cfg = load_model_config("kimi_k2_thinking.gin")            # a preset: no weights needed

`ModelConfig` is always read from the checkpoint's `config.json` (`ModelConfig.from_hf_dict` /
`from_hf_dir`), because the Kimi-K2 family differs in exactly the constants one is tempted to
hard-code (rms_norm_eps 1e-6 vs 1e-5, YaRN factor 32 vs 64, beta_fast 1 vs 32; K2_FACTS §1, §8).
Field names are the HF keys, so the map is the identity but for the flattened `rope_scaling` (and
`latent_norm_eps`, which HF lacks); variants the code does not implement (another scoring_func,
a plain q_proj, tied embeddings) are refused by name rather than half-supported.

The presets in `configs/*.gin` bind the same fields (`model.hidden_size = 7168`) for planning
without weights (`k2jax plan`) and for tiny test models; `load_model_config` reads their `model`
section through the config-file loader (k2jax.config.files). `ARCHITECTURE_KEYS` names the fields
that fix every weight's shape: a fine-tune fits a checkpoint only when they agree.

Rejected alternative: presets as Python constants beside per-model `if model_type == ...`
branches. A preset is a value (a file any tool can read), and variation is a field with a meaning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from k2jax.config.checks import ConfigError, check_field_types
from k2jax.config.files import bind_sections, read_bindings

# The fields that fix the shape of every weight: a checkpoint, a fine-tune trained on it and the
# converter's shape checks agree exactly when these do (the others — eps, RoPE, routing — change
# what the model computes, not what it stores).
ARCHITECTURE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "first_k_dense_replace",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of one Kimi-K2-family (DeepSeek-V3-style) model.

    Field names follow the Hugging Face config.json keys; the YaRN `rope_scaling` dict is flattened
    into `rope_*` fields. Only `latent_norm_eps` has no HF counterpart (see its comment).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense SwiGLU MLP width (the first_k_dense_replace layers)
    moe_intermediate_size: int  # per routed expert; shared experts use this × n_shared_experts
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1
    rms_norm_eps: float = 1e-6
    # eps of the two MLA latent norms (q_a_layernorm, kv_a_layernorm). None means `rms_norm_eps`,
    # as vLLM, SGLang, Megatron and prime-rl do. Moonshot's remote code and transformers' DeepseekV3
    # construct these two norms without eps, i.e. always 1e-6 (K2_FACTS §3.1, §8.1); set 1e-6 here to
    # reproduce them bit for bit. For K2-Instruct (rms_norm_eps 1e-6) both choices agree; for
    # K2-Thinking and K2.5 (1e-5) they differ in the 6th digit of the latent norms.
    latent_norm_eps: float | None = None
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" or "yarn"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 0.0
    rope_truncate: bool = True
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    model_type: str = "kimi_k2"

    def __post_init__(self):
        check_field_types(self, "model")
        nonzero = ("n_shared_experts", "first_k_dense_replace")  # may be 0; checked below
        positive = [k for k in ARCHITECTURE_KEYS if k not in nonzero]
        positive += ["num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.n_shared_experts < 0:
            raise ConfigError(f"model.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"model.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"model.num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"model.n_routed_experts ({self.n_routed_experts})"
            )
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"model.n_routed_experts ({self.n_routed_experts}) must be divisible by "
                f"model.n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ConfigError(
                f"model.topk_group ({self.topk_group}) exceeds model.n_group ({self.n_group})"
            )
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ConfigError("model.n_group > 1 needs at least 2 experts per group (top-2 score)")
        if self.n_group > 1 and self.topk_group * (self.n_routed_experts // self.n_group) < (
            self.num_experts_per_tok
        ):
            raise ConfigError(
                "model.topk_group groups hold fewer experts than model.num_experts_per_tok"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                f"model.first_k_dense_replace must be in [0, num_hidden_layers], "
                f"got {self.first_k_dense_replace}"
            )
        if self.rope_type not in ("default", "yarn"):
            raise ConfigError(
                f"model.rope_type must be 'default' or 'yarn', got {self.rope_type!r}"
            )
        for name in ("rms_norm_eps", "rope_theta", "rope_factor"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.latent_norm_eps is not None and self.latent_norm_eps <= 0:
            raise ConfigError(f"model.latent_norm_eps must be > 0, got {self.latent_norm_eps}")

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def latent_eps(self) -> float:
        return self.rms_norm_eps if self.latent_norm_eps is None else self.latent_norm_eps

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)² under YaRN (K2_FACTS §3.2.6)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn" and self.rope_mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)
            scale *= m * m
        return scale

    # Construction from Hugging Face config.json ---------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], *, source: str = "config.json", **overrides):
        """Builds a ModelConfig from a parsed config.json.

        Accepts model_type `kimi_k2` and `deepseek_v3` (the LLM at top level) and `kimi_k25`
        (the LLM in `text_config`; vision fields are ignored here), and both the original
        `rope_scaling` dict and transformers-5 `rope_parameters`.
        """
        model_type = hf.get("model_type")
        if model_type == "kimi_k25":
            if not isinstance(hf.get("text_config"), Mapping):
                raise ConfigError(f"{source}: model_type 'kimi_k25' needs a 'text_config' object")
            text = dict(hf["text_config"])
            text.setdefault("model_type", "kimi_k2")
            return cls.from_hf_dict(text, source=f"{source} (text_config)", **overrides)
        if model_type not in ("kimi_k2", "deepseek_v3"):
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not a Kimi-K2-family model; expected "
                "'kimi_k2', 'kimi_k25' or 'deepseek_v3'"
            )
        _check_supported(hf, source)
        kwargs: dict[str, Any] = {"model_type": model_type}
        simple = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("rope_")]
        simple.remove("latent_norm_eps")
        for name in [*simple, "rope_theta"]:
            if name in hf and hf[name] is not None:
                kwargs[name] = hf[name]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in kwargs]
        if missing:
            raise ConfigError(f"{source}: missing required keys {missing}")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(key), list):  # some configs list several eos ids
                kwargs[key] = kwargs[key][0] if kwargs[key] else None
        rope = hf.get("rope_scaling") or hf.get("rope_parameters")
        if rope:
            if not isinstance(rope, Mapping):
                raise ConfigError(f"{source}: rope_scaling must be an object, got {rope!r}")
            if "rope_theta" in rope and "rope_theta" not in kwargs:
                kwargs["rope_theta"] = rope["rope_theta"]
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", "yarn"):
                raise ConfigError(
                    f"{source}: rope_scaling type {rope_type!r} is not supported "
                    "(expected 'yarn' or 'default')"
                )
            kwargs["rope_type"] = rope_type
            if rope_type == "yarn":
                if rope.get("attention_factor") is not None:
                    raise ConfigError(f"{source}: rope_scaling.attention_factor is not supported")
                orig = rope.get("original_max_position_embeddings")
                factor = rope.get("factor")
                if factor is None:  # transformers' rule: the ratio of the two lengths
                    if orig is None:
                        raise ConfigError(f"{source}: yarn rope_scaling needs 'factor'")
                    factor = hf["max_position_embeddings"] / orig
                kwargs["rope_factor"] = float(factor)
                kwargs["rope_original_max_position_embeddings"] = int(
                    orig if orig is not None else hf.get("max_position_embeddings", 4096)
                )
                # transformers' YaRN falls back to 32 / 1 when the keys are absent (or 0).
                kwargs["rope_beta_fast"] = float(rope.get("beta_fast") or 32.0)
                kwargs["rope_beta_slow"] = float(rope.get("beta_slow") or 1.0)
                kwargs["rope_mscale"] = float(rope.get("mscale") or 0.0)
                kwargs["rope_mscale_all_dim"] = float(rope.get("mscale_all_dim") or 0.0)
                kwargs["rope_truncate"] = bool(rope.get("truncate", True))
        for key in ("routed_scaling_factor", "rms_norm_eps", "rope_theta"):
            if isinstance(kwargs.get(key), int) and not isinstance(kwargs[key], bool):
                kwargs[key] = float(kwargs[key])
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike, **overrides) -> ModelConfig:
        return cls.from_hf_dict(
            read_hf_config(path), source=str(Path(path) / "config.json"), **overrides
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json form of this config (model_type kimi_k2/deepseek_v3, rope_scaling dict)."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": self.model_type,
        }
        for f in dataclasses.fields(self):
            if f.name.startswith("rope_") or f.name in ("latent_norm_eps", "model_type"):
                continue
            out[f.name] = getattr(self, f.name)
        out.update(
            num_key_value_heads=self.num_attention_heads,
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            moe_layer_freq=1,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            num_nextn_predict_layers=0,
            rope_theta=self.rope_theta,
            rope_scaling=None,
            torch_dtype="bfloat16",
        )
        if self.rope_type == "yarn":
            out["rope_scaling"] = {
                "type": "yarn",
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings,
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "mscale": self.rope_mscale,
                "mscale_all_dim": self.rope_mscale_all_dim,
            }
        return out


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor: 0.1·mscale·ln(factor) + 1 (1 when factor ≤ 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _check_supported(hf: Mapping[str, Any], source: str) -> None:
    """Rejects config.json variants of the DeepSeek-V3 family that k2jax does not implement."""
    expect = {
        "scoring_func": ("sigmoid",),
        "topk_method": ("noaux_tc",),
        "hidden_act": ("silu",),
        "moe_layer_freq": (1,),
        "attention_bias": (False,),
    }
    for key, allowed in expect.items():
        if key in hf and hf[key] is not None and hf[key] not in allowed:
            raise ConfigError(
                f"{source}: {key}={hf[key]!r} is not supported by k2jax (expected {allowed[0]!r})"
            )
    if "q_lora_rank" in hf and hf["q_lora_rank"] is None:
        raise ConfigError(f"{source}: q_lora_rank=null (a plain q_proj) is not supported")
    if hf.get("tie_word_embeddings"):
        raise ConfigError(
            f"{source}: tie_word_embeddings=true is not supported (Kimi's are untied)"
        )


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads `config.json` from a checkpoint folder (or the file itself), with clear errors."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"{file}: not found (a checkpoint folder needs its config.json)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return data


def load_model_config(
    files: str | os.PathLike | Sequence[str | os.PathLike], overrides: Sequence[str] = ()
) -> ModelConfig:
    """Reads a preset such as `configs/kimi_k2_thinking.gin` into a ModelConfig.

    Bindings for other sections are allowed in the file (a run recipe that includes a preset) and
    ignored here: only the `model` section is bound, so they need no dataclass.
    """
    model_bindings = [b for b in read_bindings(files, overrides) if b[0] == "model"]
    return bind_sections(model_bindings, {"model": ModelConfig})["model"]
