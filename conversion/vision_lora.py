"""LoRA adapters of Kimi-K2.5's vision tower and projector, out of k2jax: for merging into the
released checkpoint, and for a PEFT adapter on transformers' Kimi_K25ForConditionalGeneration.

k2jax keeps the tower in the released layout (k2jax.model.vision) and its adapters stacked over
blocks: ("vision_tower", "blocks", m) for m in wqkv, wo, fc0, fc1 — A [L, r, in], B [L, out, r]
— and ("mm_projector", p) for proj_0, proj_2 — A [r, in], B [out, r].

**Merge** (k2jax.conversion.merge): W' = W + s·B·A on the released tensor of each module, e.g.
`vision_tower.encoder.blocks.3.wqkv.weight` — the same layout, nothing permuted.

**PEFT**: transformers loads the released tower under other module names and unfuses wqkv
(its kimi_k25 conversion mapping):

    vision_tower.encoder.blocks.N.wqkv     → model.vision_tower.layers.N.attn.{q,k,v}_proj
    vision_tower.encoder.blocks.N.wo       → model.vision_tower.layers.N.attn.proj
    vision_tower.encoder.blocks.N.mlp.fc0  → model.vision_tower.layers.N.mlp.fc1
    vision_tower.encoder.blocks.N.mlp.fc1  → model.vision_tower.layers.N.mlp.fc2
    mm_projector.proj.0 / proj.2           → model.mm_projector.in_proj / out_proj

and permutes the rows of q and k within each head from the interleaved rotary pairs to halves
(PermuteForRope: [half, 2] → [2, half]). A fused adapter is exactly three adapters with the same
A: q, k and v each take their rows of B, q's and k's permuted like the weight. Targets are listed
with their parent (`attn.proj`, `mlp.fc1`, ...), so PEFT does not also wrap the patch embedding's
convolution, which is called `proj` too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from k2jax.config.vision import VisionConfig

__all__ = ["VISION_ROOTS", "merge_edits", "peft_tensors", "split_vision"]

VISION_ROOTS = ("vision_tower", "mm_projector")
_RELEASED = {
    "wqkv": "wqkv",
    "wo": "wo",
    "fc0": "mlp.fc0",
    "fc1": "mlp.fc1",
    "proj_0": "mm_projector.proj.0",
    "proj_2": "mm_projector.proj.2",
}
_TRANSFORMERS = {"wo": "attn.proj", "fc0": "mlp.fc1", "fc1": "mlp.fc2"}
_PROJECTOR = {"proj_0": "mm_projector.in_proj", "proj_2": "mm_projector.out_proj"}

Factors = Callable[[], tuple[np.ndarray, np.ndarray]]


def split_vision(lora_tree: dict | None) -> tuple[dict, dict]:
    """(text part, vision part) of a plain LoRA tree."""
    tree = lora_tree or {}
    text = {k: v for k, v in tree.items() if k not in VISION_ROOTS}
    return text, {k: v for k, v in tree.items() if k in VISION_ROOTS}


def _adapters(vision_tree: dict) -> list[tuple[str, int | None, Factors]]:
    """(module, block or None, factors) of every vision adapter in the tree, checked."""
    out = []
    blocks = (vision_tree.get("vision_tower") or {}).get("blocks") or {}
    extra = set(vision_tree.get("vision_tower") or {}) - {"blocks"}
    if extra:
        raise ValueError(f"LoRA tree: vision_tower/{sorted(extra)[0]} is not a LoRA-able linear")
    for module, pair in sorted(blocks.items()):
        a, b = _pair(pair, f"vision_tower/blocks/{module}", module in ("wqkv", "wo", "fc0", "fc1"))
        for n in range(a.shape[0]):
            out.append((module, n, lambda a=a, b=b, n=n: (np.asarray(a[n]), np.asarray(b[n]))))
    for module, pair in sorted((vision_tree.get("mm_projector") or {}).items()):
        a, b = _pair(pair, f"mm_projector/{module}", module in _PROJECTOR)
        out.append((module, None, lambda a=a, b=b: (np.asarray(a), np.asarray(b))))
    return out


def _pair(pair, where: str, known: bool):
    if not known or not isinstance(pair, dict) or set(pair) != {"lora_A", "lora_B"}:
        raise ValueError(f"LoRA tree: {where} is not a vision adapter (lora_A and lora_B)")
    return pair["lora_A"], pair["lora_B"]


def merge_edits(vision_tree: dict) -> dict[str, Factors]:
    """Released module name (e.g. "vision_tower.encoder.blocks.0.wqkv") → its factors."""
    out = {}
    for module, n, factors in _adapters(vision_tree):
        if n is None:
            out[_RELEASED[module]] = factors
        else:
            out[f"vision_tower.encoder.blocks.{n}.{_RELEASED[module]}"] = factors
    return out


def _permute_rows(b: np.ndarray, heads: int) -> np.ndarray:
    """transformers' PermuteForRope on the rows of one projection (q or k)."""
    rows = b.shape[0]
    half = rows // heads // 2
    return b.reshape(heads, half, 2, -1).transpose(0, 2, 1, 3).reshape(rows, -1)


def peft_tensors(
    vision_tree: dict, cfg: VisionConfig
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], set[str]]:
    """(transformers module name → (A [r, in], B [out, r]) float32, target_modules) of the
    vision adapters, in transformers' Kimi_K25ForConditionalGeneration names (module
    docstring). The tower's adapters are small; they are computed here, not streamed."""
    tensors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    targets: set[str] = set()
    D = cfg.hidden_size
    for module, n, factors in _adapters(vision_tree):
        a, b = (np.asarray(x, np.float32) for x in factors())
        if n is None:
            tensors[f"model.{_PROJECTOR[module]}"] = (a, b)
            targets.add(_PROJECTOR[module])
        elif module != "wqkv":
            tensors[f"model.vision_tower.layers.{n}.{_TRANSFORMERS[module]}"] = (a, b)
            targets.add(_TRANSFORMERS[module])
        else:
            if b.shape[0] != 3 * D:
                raise ValueError(f"LoRA tree: wqkv lora_B has {b.shape[0]} rows, not 3 × {D}")
            for k, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                part = b[k * D : (k + 1) * D]
                part = part if k == 2 else _permute_rows(part, cfg.num_heads)
                tensors[f"model.vision_tower.layers.{n}.attn.{proj}"] = (a, part)
                targets.add(f"attn.{proj}")
    return tensors, targets
