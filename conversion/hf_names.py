"""The map between Hugging Face tensor names and k2jax's parameter tree.

k2jax names its parameters after the HF tensors, so the map is short. The only reshuffles are:

* layer index → stack: layer i < first_k_dense_replace goes to `dense_layers[i]`, the others to
  `moe_layers[i − first_k_dense_replace]` (both stacks carry a leading [L] axis);
* per-expert tensors → stacked experts: `mlp.experts.{e}.down_proj` → `experts.down_proj[:, e]`,
  and gate/up are fused as transformers does in memory: `experts.gate_up_proj[:, e, :F]` is
  gate_proj, `[:, e, F:]` is up_proj;
* K2.5 prefixes every LLM tensor with `language_model.`; its vision tower and projector
  (`vision_tower.*`, `mm_projector.*`) are not part of the text model and are skipped;
* K2-Instruct stores rotary `inv_freq` buffers; they are recomputed from the config and ignored.

    model.embed_tokens.weight                          embed_tokens/weight            [V, D]
    model.layers.{i}.input_layernorm.weight            <stack>/input_layernorm/weight [L, D]
    model.layers.{i}.self_attn.q_a_proj.weight         <stack>/self_attn/q_a_proj/weight
    ...                                                (every attention / norm tensor alike)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    dense_layers/mlp/{...}/weight
    model.layers.{i}.mlp.gate.weight                   moe_layers/mlp/gate/weight     [L, E, D]
    model.layers.{i}.mlp.gate.e_score_correction_bias  moe_layers/mlp/gate/e_score_correction_bias
    model.layers.{i}.mlp.shared_experts.*              moe_layers/mlp/shared_experts/*
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight  moe_layers/mlp/experts/gate_up_proj/weight [L, E, 2F, D] rows :F
    model.layers.{i}.mlp.experts.{e}.up_proj.weight    moe_layers/mlp/experts/gate_up_proj/weight rows F:
    model.layers.{i}.mlp.experts.{e}.down_proj.weight  moe_layers/mlp/experts/down_proj/weight   [L, E, D, F]
    model.norm.weight                                  norm/weight
    lm_head.weight                                     lm_head/weight

A weight stored quantized has other suffixes next to the module name (`weight_scale_inv` for FP8,
`weight_packed` / `weight_scale` / `weight_shape` for INT4); the map keeps the suffix and the
loader decodes.
"""

from __future__ import annotations

import dataclasses
import re

from k2jax.config import ModelConfig
from k2jax.lora import ATTENTION_TARGETS, MLP_TARGETS

# The params subtrees stacked over layers, in layer order: leaves there have a leading [L] axis.
STACKS = ("dense_layers", "moe_layers")
SKIPPED_PREFIXES = ("vision_tower.", "mm_projector.", "multi_modal_projector.")
STRIP_PREFIXES = ("language_model.",)

_ATTN_NORMS = ("q_a_layernorm", "kv_a_layernorm")
_WEIGHT_SUFFIXES = ("weight", "weight_scale_inv", "weight_packed", "weight_scale", "weight_shape")

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")


class UnknownTensorError(KeyError):
    pass


@dataclasses.dataclass(frozen=True)
class ParamSlot:
    """Where one HF tensor goes in the k2jax parameter tree.

    module: path of the module in the tree, e.g. ("moe_layers", "mlp", "experts", "gate_up_proj")
    suffix: the HF suffix ("weight", "weight_packed", ..., "e_score_correction_bias")
    layer:  index into the stacked [L] axis (None outside the stacks)
    expert: index into the stacked [E] axis (None for non-expert tensors)
    part:   for the fused gate_up_proj, 0 = gate rows, 1 = up rows (None otherwise)
    """

    module: tuple[str, ...]
    suffix: str
    layer: int | None = None
    expert: int | None = None
    part: int | None = None


def normalize_name(name: str) -> str | None:
    """Strips the K2.5 `language_model.` prefix; None for tensors outside the text model."""
    for p in SKIPPED_PREFIXES:
        if name.startswith(p):
            return None
    for p in STRIP_PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def is_ignored(name: str) -> bool:
    """Tensors that are recomputed or unused: rotary inv_freq buffers."""
    return name.endswith("rotary_emb.inv_freq")


def hf_to_slot(name: str, cfg: ModelConfig) -> ParamSlot | None:
    """The ParamSlot of an HF tensor name, None for an ignored tensor, or UnknownTensorError.

    `name` must already be normalized (see `normalize_name`).
    """
    if is_ignored(name):
        return None
    if name == "model.embed_tokens.weight":
        return ParamSlot(("embed_tokens",), "weight")
    if name == "model.norm.weight":
        return ParamSlot(("norm",), "weight")
    if name == "lm_head.weight":
        return ParamSlot(("lm_head",), "weight")
    m = _LAYER_RE.match(name)
    if not m:
        raise UnknownTensorError(name)
    i, rest = int(m.group(1)), m.group(2)
    if i >= cfg.num_hidden_layers:
        return None  # e.g. DeepSeek-V3's multi-token-prediction layer 61; Kimi has none
    moe = i >= cfg.first_k_dense_replace
    stack = "moe_layers" if moe else "dense_layers"
    layer = i - cfg.first_k_dense_replace if moe else i
    module, _, suffix = rest.rpartition(".")
    parts = tuple(module.split("."))

    if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return ParamSlot((stack, parts[0]), "weight", layer)
    if len(parts) == 2 and parts[0] == "self_attn":
        if parts[1] in ATTENTION_TARGETS and suffix in _WEIGHT_SUFFIXES:
            return ParamSlot((stack, *parts), suffix, layer)
        if parts[1] in _ATTN_NORMS and suffix == "weight":
            return ParamSlot((stack, *parts), suffix, layer)
    dense_mlp = not moe and len(parts) == 2 and parts[0] == "mlp" and parts[1] in MLP_TARGETS
    if dense_mlp and suffix in _WEIGHT_SUFFIXES:
        return ParamSlot((stack, *parts), suffix, layer)
    if moe:
        if parts == ("mlp", "gate") and suffix in ("weight", "e_score_correction_bias"):
            return ParamSlot((stack, *parts), suffix, layer)
        shared = (
            len(parts) == 3 and parts[:2] == ("mlp", "shared_experts") and parts[2] in MLP_TARGETS
        )
        if shared and suffix in _WEIGHT_SUFFIXES:
            return ParamSlot((stack, *parts), suffix, layer)
        e = _EXPERT_RE.match(rest)
        if e and e.group(3) in _WEIGHT_SUFFIXES:
            expert, proj = int(e.group(1)), e.group(2)
            if expert >= cfg.n_routed_experts:
                raise UnknownTensorError(
                    f"{name}: expert {expert} but the config has {cfg.n_routed_experts} experts"
                )
            if proj == "down_proj":
                return ParamSlot((stack, "mlp", "experts", "down_proj"), e.group(3), layer, expert)
            part = 0 if proj == "gate_proj" else 1
            return ParamSlot(
                (stack, "mlp", "experts", "gate_up_proj"), e.group(3), layer, expert, part
            )
    raise UnknownTensorError(name)


def slot_to_hf(slot: ParamSlot, cfg: ModelConfig) -> str:
    """The HF tensor name of a slot (the inverse of `hf_to_slot`, without K2.5's prefix)."""
    if slot.layer is None:
        top = {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
        return f"{top[slot.module[0]]}.{slot.suffix}"
    stack, *rest = slot.module
    i = slot.layer + (cfg.first_k_dense_replace if stack == "moe_layers" else 0)
    if rest[:2] == ["mlp", "experts"]:
        proj = rest[2]
        if proj == "gate_up_proj":
            proj = ("gate_proj", "up_proj")[slot.part]
        return f"model.layers.{i}.mlp.experts.{slot.expert}.{proj}.{slot.suffix}"
    return f"model.layers.{i}.{'.'.join(rest)}.{slot.suffix}"


def expected_hf_names(cfg: ModelConfig) -> list[str]:
    """Every `.weight`-style tensor a complete unquantized checkpoint of `cfg` holds."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{m}.weight" for m in ATTENTION_TARGETS + _ATTN_NORMS]
        if i < cfg.first_k_dense_replace:
            names += [p + f"mlp.{m}.weight" for m in MLP_TARGETS]
            continue
        names += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
        if cfg.n_shared_experts:
            names += [p + f"mlp.shared_experts.{m}.weight" for m in MLP_TARGETS]
        for e in range(cfg.n_routed_experts):
            names += [p + f"mlp.experts.{e}.{m}.weight" for m in MLP_TARGETS]
    return names
