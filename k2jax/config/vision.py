"""`VisionConfig`: the MoonViT vision tower and projector of Kimi-K2.5 / K2.6, from config.json.

Two spellings of the same config exist, and both are read:

* the released checkpoints' (Moonshot's own code): `vision_config.{vt_hidden_size,
  vt_num_hidden_layers, vt_num_attention_heads, vt_intermediate_size, init_pos_emb_height,
  init_pos_emb_width, init_pos_emb_time, mm_hidden_size, projector_ln_eps}` and a top-level
  `media_placeholder_token_id` (K2_FACTS §1.3);
* transformers' kimi_k25 (what `save_pretrained` writes): `vision_config.{hidden_size,
  num_hidden_layers, num_attention_heads, intermediate_size, pos_emb_height, pos_emb_width,
  pos_emb_time, hidden_act, rope_parameters}` and top-level `projection_hidden_size`,
  `projection_layer_norm_eps`, `image_token_id`, `vision_start_token_id`, `vision_end_token_id`.

A value given under both names must agree; an architecture value (sizes, layers, heads, position
table, merge kernel, image token id) under neither is an error naming both. Defaults are taken
only where transformers takes them too: the projector's width (the tower's) and eps (1e-5), the
rotary base 10000 and the tanh-approximated GELU of the tower's MLP — the last two have no key in
the released config and are constants of Moonshot's MoonViT code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from k2jax.config.checks import ConfigError

__all__ = ["VisionConfig"]

# (field, transformers' key, released key) inside vision_config
_VISION_KEYS = (
    ("patch_size", "patch_size", "patch_size"),
    ("hidden_size", "hidden_size", "vt_hidden_size"),
    ("num_layers", "num_hidden_layers", "vt_num_hidden_layers"),
    ("num_heads", "num_attention_heads", "vt_num_attention_heads"),
    ("intermediate_size", "intermediate_size", "vt_intermediate_size"),
    ("pos_emb_height", "pos_emb_height", "init_pos_emb_height"),
    ("pos_emb_width", "pos_emb_width", "init_pos_emb_width"),
)
_ACTS = ("gelu_pytorch_tanh", "gelu")
# released fields that name a variant; only these values are implemented (K2_FACTS §1.3)
_VARIANTS = {
    "pos_emb_type": "divided_fixed",
    "merge_type": "sd2_tpool",
    "mm_projector_type": "patchmerger",
    "projector_hidden_act": "gelu",
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower (MoonViT) and the projector into the language model's width."""

    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    pos_emb_height: int  # the learned position table [height, width, hidden], resampled per image
    pos_emb_width: int
    merge_kernel: tuple[int, int]  # patches pooled into one language-model token (2×2)
    text_hidden_size: int
    image_token_id: int  # <|media_pad|>: one per merged image token in the prompt
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    projection_hidden_size: int | None = None  # the projector's pre-norm width (= hidden_size)
    projection_eps: float = 1e-5
    media_start_id: int | None = None  # <|media_start|>, <|media_end|> when the config names them
    media_end_id: int | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(
                f"vision_config: hidden size {self.hidden_size} must split into "
                f"{self.num_heads} heads of a width divisible by 4 (2-D rotary embedding)"
            )
        if self.hidden_act not in _ACTS:
            raise ConfigError(
                f"vision_config.hidden_act: {self.hidden_act!r} is not one of {_ACTS}"
            )
        if self.projection_hidden_size not in (None, self.hidden_size):
            raise ConfigError(
                f"projection_hidden_size {self.projection_hidden_size} != vision hidden size "
                f"{self.hidden_size}: the projector normalises the tower's output"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_size(self) -> int:
        return self.merge_kernel[0] * self.merge_kernel[1]

    @property
    def patch_features(self) -> int:
        """Values in one flattened patch: 3 channels × patch_size²."""
        return 3 * self.patch_size * self.patch_size

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], *, source: str = "config.json") -> VisionConfig:
        """From a kimi_k25 config.json (either spelling; module docstring)."""
        if hf.get("model_type") != "kimi_k25":
            raise ConfigError(f"{source}: model_type {hf.get('model_type')!r} has no vision tower")
        v, text = hf.get("vision_config"), hf.get("text_config")
        if not isinstance(v, Mapping) or not isinstance(text, Mapping):
            raise ConfigError(f"{source}: kimi_k25 needs 'vision_config' and 'text_config' objects")

        def pick(where: Mapping, keys: tuple[str, ...], label: str, default=None):
            found = {k: where[k] for k in keys if k in where}
            if len(set(map(repr, found.values()))) > 1:
                raise ConfigError(f"{source}: {label}: {found} disagree")
            if found:
                return next(iter(found.values()))
            if default is not None:
                return default
            raise ConfigError(f"{source}: {label} needs one of {' / '.join(keys)}")

        for key, want in _VARIANTS.items():
            if key in v and v[key] != want:
                raise ConfigError(
                    f"{source}: vision_config.{key} = {v[key]!r}; only {want!r} is implemented"
                )
        # the temporal table only matters for video clips (not supported); its two names must
        # still agree
        pick(v, ("pos_emb_time", "init_pos_emb_time"), "vision_config", default=1)
        fields = {f: pick(v, (a, b), f"vision_config.{f}") for f, a, b in _VISION_KEYS}
        merge = tuple(pick(v, ("merge_kernel_size",), "vision_config.merge_kernel_size"))
        rope = v.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"{source}: vision rope_type {rope['rope_type']!r} is not 'axial'")
        hidden = fields["hidden_size"]
        proj = pick({**v, **hf}, ("projection_hidden_size", "mm_hidden_size"), "", default=hidden)
        return cls(
            **fields,
            merge_kernel=(int(merge[0]), int(merge[1])),
            text_hidden_size=int(text["hidden_size"]),
            image_token_id=int(
                pick(hf, ("image_token_id", "media_placeholder_token_id"), "the image token id")
            ),
            hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            projection_hidden_size=int(proj),
            projection_eps=float(
                pick({**v, **hf}, ("projection_layer_norm_eps", "projector_ln_eps"), "", 1e-5)
            ),
            media_start_id=hf.get("vision_start_token_id", hf.get("media_start_token_id")),
            media_end_id=hf.get("vision_end_token_id", hf.get("media_end_token_id")),
        )
