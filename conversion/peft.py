"""LoRA adapters out of k2jax: a PEFT adapter folder with Hugging Face tensor names.

k2jax keeps LoRA factors stacked like the base (k2jax.lora): A [L, (E,) r, in], B [L, (E,) out, r]
per module path, scale s = alpha/r (alpha/√r with rsLoRA). A PEFT adapter is a folder with

    adapter_config.json         r, lora_alpha, target_modules / target_parameters, ...
    adapter_model.safetensors   base_model.model.<HF module>.lora_A.weight [r, in]
                                base_model.model.<HF module>.lora_B.weight [out, r]

and PEFT applies W + scaling·B·A with scaling = lora_alpha / r. We always write
`use_rslora: false` with `lora_alpha = s·r`, which is the same scaling for every loader (vLLM
and PEFT's MoE conversion below compute alpha/r and would mis-scale an rsLoRA fused rank).

Attention (q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj) is named as usual and listed
in `target_modules`. The dense MLP and the shared experts are *not* listed there: PEFT 0.21 on
transformers 5 rewrites every target_modules entry ending in gate_proj/up_proj/down_proj into the
fused routed-expert parameters (its v4→v5 MoE conversion, ECOSYSTEM_NOTES), which would silently
drop them. They are targeted as parameters (`target_parameters: ["mlp.gate_proj.weight",
"shared_experts.down_proj.weight", ...]`), which PEFT wraps in place — same tensor names.

The routed experts come in two layouts (`layout=`):

* "per-expert" (default) — one adapter per expert and projection, the transformers-v4 names:
  `base_model.model.model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.lora_{A,B}.weight`
  with target_modules gate_proj/up_proj/down_proj. This is what vLLM's DeepSeek-V2/V3 (hence
  Kimi-K2) MoE-LoRA loader reads (its 2D per-expert path, `is_3d_moe_weight = False`; it wants all
  three projections of every expert, so a projection without an adapter gets zero factors), and
  what PEFT 0.21 converts on load for transformers 5's fused DeepseekV3 experts (tested). SGLang's
  MoE LoRA is meant to read the same names (not verified here).
* "fused" — transformers 5 keeps each MoE layer's experts as two 3-D parameters,
  `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first) and `mlp.experts.down_proj` [E, D, F],
  and PEFT targets them directly (`target_parameters`, lora.ParamWrapper): lora_A [E·r, in]
  expert-major (row e·r + j), lora_B [out, r·E] expert-minor (column j·E + e). Our separate gate
  and up adapters are exactly one rank-2r adapter on the fused weight, A = [A_gate; A_up] and
  B = [[B_gate, 0], [0, B_up]] per expert, declared with rank_pattern 2r and alpha_pattern 2·s·r.
  Both wrappers sit on the same module, nested: gate_up_proj inside (`experts.base_layer.lora_*`),
  down_proj outside (`experts.lora_*`). Native for PEFT on transformers 5, and for vLLM models
  that declare 3-D MoE LoRA weights (not DeepSeek).

Kimi-K2.5's vision tower and projector (k2jax.conversion.vision_lora): their adapters are written
under transformers' Kimi_K25ForConditionalGeneration names (`model.vision_tower.layers.N.attn.
q_proj`, ..., wqkv unfused and its rope rows permuted as transformers loads the weight), and the
text adapters of such an export under that model's `model.language_model.` prefix — an adapter
for the whole multimodal model. A text-only adapter keeps the language model's own names.

What an adapter cannot carry: MuonClip's QK-clip factors (per-head rescaling of q_b_proj /
kv_b_proj rows of W + s·B·A — not a low-rank update of W) and base parameters trained in full
(router, norms). `export_peft` refuses a run that has them (factors ≠ 1, trained leaves) unless
`strict=False`, which exports the adapters alone with a loud warning: the served model then
differs from the trained one. `k2jax merge` folds both in exactly. And vLLM never applies an
adapter on kv_b_proj: its MLA decode multiplies by W_UK/W_UV split from the base weight at load
time, and its prefill calls the layer through a reference taken before LoRA wrapping (vLLM issue
48974); PEFT/transformers and SGLang apply it. Export warns when kv_b_proj has a non-zero adapter
(README, "Serve your fine-tune").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import einops
import ml_dtypes
import numpy as np

from k2jax.config import ModelConfig
from k2jax.config.vision import VisionConfig
from k2jax.conversion.hf_names import ParamSlot, slot_to_hf
from k2jax.conversion.safetensors_io import replace_dir, write_safetensors
from k2jax.conversion.vision_lora import peft_tensors, split_vision
from k2jax.lora import ATTENTION_TARGETS, MLP_TARGETS, LoraConfig
from k2jax.paths import check_output_path

log = logging.getLogger(__name__)

__all__ = [
    "LAYOUTS",
    "ExportError",
    "LoraSlot",
    "export_peft",
    "flatten_tree",
    "known_paths",
    "linear_shape",
    "lora_factors",
    "lora_slots",
    "qk_clip_is_identity",
    "unbox_tree",
]

LAYOUTS = ("per-expert", "fused")
PREFIX = "base_model.model."
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class ExportError(ValueError):
    """The trained state cannot be written in the requested form; the message says why."""


# ---------------------------------------------------------------------------------------------
# LoRA tree ↔ HF modules (shared with k2jax.conversion.merge)


@dataclasses.dataclass(frozen=True)
class LoraSlot:
    """One adapter: the HF module it adapts and where its factors sit in the LoRA tree.

    module: HF module name, e.g. "model.layers.3.mlp.experts.7.up_proj"
    path:   tree path of the stacked factors, e.g. ("moe_layers", "mlp", "experts", "up_proj")
    layer / expert: indices into the stacked [L] and [E] axes (expert None outside routed experts)
    """

    module: str
    path: tuple[str, ...]
    layer: int
    expert: int | None = None

    @property
    def kind(self) -> str:
        """ "attn", "mlp" (dense), "shared" or "experts"."""
        if self.path[1] == "self_attn":
            return "attn"
        return {"shared_experts": "shared", "experts": "experts"}.get(self.path[2], "mlp")


def linear_shape(cfg: ModelConfig, path: tuple[str, ...]) -> tuple[int, int]:
    """(out, in) of the HF linear at tree path `path` (stack name first)."""
    H, D = cfg.num_attention_heads, cfg.hidden_size
    Dn, Dr, Dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    name = path[-1]
    if path[1] == "self_attn":
        shapes = {
            "q_a_proj": (cfg.q_lora_rank, D),
            "q_b_proj": (H * (Dn + Dr), cfg.q_lora_rank),
            "kv_a_proj_with_mqa": (cfg.kv_lora_rank + Dr, D),
            "kv_b_proj": (H * (Dn + Dv), cfg.kv_lora_rank),
            "o_proj": (D, H * Dv),
        }
        return shapes[name]
    width = {
        "shared_experts": cfg.shared_intermediate_size,
        "experts": cfg.moe_intermediate_size,
    }.get(path[2], cfg.intermediate_size)
    return (D, width) if name == "down_proj" else (width, D)


def known_paths(cfg: ModelConfig) -> dict[tuple[str, ...], int]:
    """Every LoRA-able module path (stack name first) → its stack length."""
    out = {}
    for stack, n, moe in (
        ("dense_layers", cfg.num_dense_layers, False),
        ("moe_layers", cfg.num_moe_layers, True),
    ):
        if not n:
            continue
        for m in ATTENTION_TARGETS:
            out[(stack, "self_attn", m)] = n
        if moe:
            for m in MLP_TARGETS:
                out[(stack, "mlp", "experts", m)] = n
                if cfg.n_shared_experts:
                    out[(stack, "mlp", "shared_experts", m)] = n
        else:
            for m in MLP_TARGETS:
                out[(stack, "mlp", m)] = n
    return out


def unbox_tree(tree):
    """`tree` with flax's partitioning boxes removed (nn.unbox); None stays None (a run without
    LoRA, or without QK-clip, has no such tree)."""
    if tree is None:
        return None
    import flax.linen as nn  # flax imports jax; loaded only when a tree is unboxed

    return nn.unbox(tree)


def flatten_tree(tree, prefix=()) -> Iterator[tuple[tuple[str, ...], object]]:
    """(key path, leaf) for every leaf of a nested mapping, depth first in mapping order."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from flatten_tree(v, (*prefix, str(k)))
    else:
        yield prefix, tree


def _modules_of(cfg: ModelConfig, lora_tree) -> dict[tuple[str, ...], tuple[object, object]]:
    """Module path → (A, B) stacked factors, with every shape checked against the config."""
    lora_tree = lora_tree or {}
    known = known_paths(cfg)
    leaves = dict(flatten_tree(lora_tree))
    modules: dict[tuple[str, ...], dict[str, object]] = {}
    for path, leaf in leaves.items():
        module, name = path[:-1], path[-1]
        if name not in ("lora_A", "lora_B") or module not in known:
            raise ExportError(
                f"LoRA tree leaf {'/'.join(path)} is not an adapter of a {cfg.model_type} linear "
                f"(expected <module>/lora_A and lora_B for modules like "
                f"{'/'.join(next(iter(known)))})"
            )
        modules.setdefault(module, {})[name] = leaf
    rank = None
    out = {}
    for module, pair in modules.items():
        where = "/".join(module)
        if set(pair) != {"lora_A", "lora_B"}:
            raise ExportError(f"LoRA tree: {where} has {sorted(pair)} but needs lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        out_f, in_f = linear_shape(cfg, module)
        lead = (known[module],) + ((cfg.n_routed_experts,) if "experts" in module else ())
        r = a.shape[-2]
        want_a, want_b = (*lead, r, in_f), (*lead, out_f, r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ExportError(
                f"LoRA tree: {where} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, but "
                f"the model config implies {list(want_a)} and {list(want_b)}"
            )
        if rank is not None and r != rank:
            raise ExportError(f"LoRA tree: {where} has rank {r}, other modules rank {rank}")
        rank = r
        out[module] = (a, b)
    return out


def lora_slots(cfg: ModelConfig, lora_tree) -> list[LoraSlot]:
    """Every adapter in `lora_tree` (plain, unboxed) as an HF module, in layer order; every
    shape is checked against the config."""
    slots = []
    for path, (a, _) in sorted(_modules_of(cfg, lora_tree).items()):
        n_layers = a.shape[0]
        experts = range(cfg.n_routed_experts) if "experts" in path else [None]
        for layer in range(n_layers):
            for e in experts:
                hf = slot_to_hf(ParamSlot(path, "weight", layer, e), cfg)
                slots.append(LoraSlot(hf.removesuffix(".weight"), path, layer, e))
    return sorted(slots, key=lambda s: (_layer_of(s.module), s.module))


def _layer_of(module: str) -> int:
    parts = module.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1


def lora_factors(lora_tree, slot: LoraSlot) -> tuple[np.ndarray, np.ndarray]:
    """(A [r, in], B [out, r]) of one adapter as float32 numpy (one slice copied to host)."""
    node = lora_tree
    for k in slot.path:
        node = node[k]
    index = (slot.layer,) if slot.expert is None else (slot.layer, slot.expert)
    a = np.asarray(node["lora_A"][index], np.float32)
    b = np.asarray(node["lora_B"][index], np.float32)
    return a, b


def qk_clip_is_identity(qk_clip_tree) -> bool:
    """True when every QK-clip factor is exactly 1 (nothing was clipped), or there is no tree."""
    if qk_clip_tree is None:
        return True
    return all(
        bool(np.all(np.asarray(x) == 1.0)) for _, x in flatten_tree(unbox_tree(qk_clip_tree))
    )


def _nonempty(tree) -> bool:
    return tree is not None and any(True for _ in flatten_tree(unbox_tree(tree)))


# ---------------------------------------------------------------------------------------------
# Export


class _Lazy:
    """A tensor described by shape and dtype, computed only when the writer reaches it."""

    def __init__(self, shape, dtype, fn: Callable[[], np.ndarray]):
        self.shape, self.dtype, self._fn = tuple(shape), np.dtype(dtype), fn

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self._fn(), self.dtype)
        if arr.shape != self.shape:
            raise ExportError(f"internal: tensor of shape {arr.shape}, expected {self.shape}")
        return arr if dtype is None else arr.astype(dtype)


def _alpha(x: float) -> float | int:
    return round(x) if abs(x - round(x)) < 1e-9 * max(1.0, abs(x)) else float(x)


def export_peft(
    model_config: ModelConfig,
    lora_config: LoraConfig,
    lora_tree,
    qk_clip_tree,
    out_dir: str | os.PathLike,
    *,
    layout: str = "per-expert",
    dtype: str = "float32",
    trained_params=None,
    base_model_name_or_path: str | None = None,
    strict: bool = True,
    overwrite: bool = False,
    vision: VisionConfig | None = None,
) -> Path:
    """Writes `lora_tree` as a PEFT adapter folder (adapter_model.safetensors +
    adapter_config.json) and returns its path. See the module docstring for the layouts and for
    what `strict` refuses. The folder appears complete or not at all (written under a temporary
    name, then renamed); an existing folder is replaced only with `overwrite`.

    base_model_name_or_path goes into adapter_config.json: a hub name as given, a local folder
    that exists as its absolute path (symlinks resolved), so the adapter finds its base from any
    working directory. `out_dir` must not be, contain or lie inside that folder. vision: the
    base's VisionConfig, needed when the tree has vision-tower adapters.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    if base_model_name_or_path is not None and Path(base_model_name_or_path).is_dir():
        base_model_name_or_path = str(Path(base_model_name_or_path).resolve())
        check_output_path(
            out_dir, {"the base model,": base_model_name_or_path}, flag="the adapter folder"
        )
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    lora_tree, vision_tree = split_vision(unbox_tree(lora_tree))
    modules = _modules_of(model_config, lora_tree)
    vision_adapters, vision_targets = {}, set()
    if vision_tree:
        if vision is None:
            raise ExportError(
                "the LoRA tree has vision-tower adapters; export needs the base's vision config "
                "(a Kimi-K2.5/K2.6 checkpoint folder)"
            )
        try:
            vision_adapters, vision_targets = peft_tensors(vision_tree, vision)
        except ValueError as e:
            raise ExportError(str(e)) from None
    if not modules and not vision_adapters:
        raise ExportError("the LoRA tree holds no adapters; nothing to export")
    lossy = []
    if not qk_clip_is_identity(qk_clip_tree):
        lossy.append(
            "QK-clip factors != 1 (MuonClip rescaled attention heads; the rescaling of "
            "q_b_proj/kv_b_proj rows is not a low-rank update)"
        )
    if _nonempty(trained_params):
        names = ["/".join(p) for p, _ in flatten_tree(unbox_tree(trained_params))][:3]
        lossy.append(f"base parameters trained in full ({', '.join(names)}, ...)")
    if lossy:
        msg = (
            "a PEFT adapter cannot carry " + "; ".join(lossy) + ". `k2jax merge` folds them "
            "into the base exactly"
        )
        if strict:
            raise ExportError(
                msg + "; or export the adapters alone with strict=False "
                "(--allow-lossy), accepting a model that differs from the trained one"
            )
        warnings.warn(
            "EXPORTING A LOSSY ADAPTER: " + msg + ". The adapter alone is written; the served "
            "model will NOT reproduce the trained one.",
            stacklevel=2,
        )
    kv_b = [m for m in modules if m[-1] == "kv_b_proj"]
    if kv_b and any(np.any(np.asarray(modules[m][1]) != 0) for m in kv_b):
        log.warning(
            "the adapter includes kv_b_proj; vLLM never applies a kv_b_proj adapter (its MLA "
            "uses W_UK/W_UV split from the base weight; vLLM issue 48974), so that part of the "
            "fine-tune vanishes there. PEFT, transformers and SGLang apply it; `k2jax merge` "
            "folds it in exactly. To serve adapters on vLLM, train without kv_b_proj "
            "(README, 'Serve your fine-tune')"
        )

    ranks = {a.shape[-2] for a, _ in modules.values()}
    ranks |= {a.shape[0] for a, _ in vision_adapters.values()}
    if len(ranks) != 1:
        raise ExportError(f"the adapters have different ranks {sorted(ranks)}")
    rank = ranks.pop()
    scale = lora_config.scale
    np_dtype = _DTYPES[dtype]
    tensors, config = _build(model_config, lora_tree, modules, rank, scale, layout, np_dtype)
    if vision_adapters:  # the whole multimodal model: its language model under language_model.
        text = PREFIX + "model."
        tensors = {
            k.replace(text, text + "language_model.", 1) if k.startswith(text) else k: v
            for k, v in tensors.items()
        }
        for name, (a, b) in vision_adapters.items():
            tensors[f"{PREFIX}{name}.lora_A.weight"] = _Lazy(a.shape, np_dtype, lambda a=a: a)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = _Lazy(b.shape, np_dtype, lambda b=b: b)
        config["target_modules"] = sorted({*config["target_modules"], *vision_targets})
    config["base_model_name_or_path"] = base_model_name_or_path

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        write_safetensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n"
        )
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "wrote a %s PEFT adapter (%d tensors, rank %d) to %s", layout, len(tensors), rank, out_dir
    )
    return out_dir


def _build(cfg, lora_tree, modules, r, scale, layout, np_dtype):
    tensors: dict[str, _Lazy] = {}

    def add(name, shape, fn):
        tensors[PREFIX + name] = _Lazy(shape, np_dtype, fn)

    target_modules: set[str] = set()
    target_parameters: set[str] = set()
    rank_pattern, alpha_pattern = {}, {}
    expert_layers: dict[int, set[str]] = {}
    for slot in lora_slots(cfg, lora_tree):
        out_f, in_f = linear_shape(cfg, slot.path)
        if slot.kind == "experts":
            expert_layers.setdefault(slot.layer, set()).add(slot.path[-1])
            continue
        name = slot.path[-1]
        if slot.kind == "attn":
            target_modules.add(name)
        else:  # dense MLP / shared experts: as parameters (see the module docstring)
            target_parameters.add(
                ("shared_experts." if slot.kind == "shared" else "mlp.") + name + ".weight"
            )
        add(f"{slot.module}.lora_A.weight", (r, in_f), lambda s=slot: lora_factors(lora_tree, s)[0])
        add(
            f"{slot.module}.lora_B.weight", (out_f, r), lambda s=slot: lora_factors(lora_tree, s)[1]
        )

    stack = "moe_layers"
    E, F, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    for layer, projs in sorted(expert_layers.items()):
        i = layer + cfg.first_k_dense_replace
        base = f"model.layers.{i}.mlp.experts"

        def factors(proj, e, layer=layer, projs=projs):
            if proj not in projs:  # zero adapter: exact, and loaders want every projection
                out_f, in_f = linear_shape(cfg, (stack, "mlp", "experts", proj))
                return np.zeros((r, in_f), np.float32), np.zeros((out_f, r), np.float32)
            return lora_factors(lora_tree, LoraSlot("", (stack, "mlp", "experts", proj), layer, e))

        if layout == "per-expert":
            target_modules.update(MLP_TARGETS)
            for e in range(E):
                for proj in MLP_TARGETS:
                    out_f, in_f = linear_shape(cfg, (stack, "mlp", "experts", proj))
                    add(
                        f"{base}.{e}.{proj}.lora_A.weight",
                        (r, in_f),
                        lambda p=proj, e=e, f=factors: f(p, e)[0],
                    )
                    add(
                        f"{base}.{e}.{proj}.lora_B.weight",
                        (out_f, r),
                        lambda p=proj, e=e, f=factors: f(p, e)[1],
                    )
            continue

        gate_up = [p for p in ("gate_proj", "up_proj") if p in projs]
        nested = bool(gate_up) and "down_proj" in projs
        if gate_up:
            target_parameters.add("mlp.experts.gate_up_proj")
            rank_gu = r * len(gate_up)
            if len(gate_up) > 1:
                rank_pattern[r"mlp\.experts\.gate_up_proj"] = rank_gu
                alpha_pattern[r"mlp\.experts\.gate_up_proj"] = _alpha(scale * rank_gu)
            key = f"{base}.base_layer" if nested else base

            def fused_a(gate_up=gate_up, f=factors):
                # [E·R, D], expert-major: rows e·R + j; j < r gate, r ≤ j < 2r up
                return np.stack(
                    [np.concatenate([f(p, e)[0] for p in gate_up]) for e in range(E)]
                ).reshape(E * len(gate_up) * r, D)

            def fused_b(gate_up=gate_up, f=factors):
                # per expert the block-diagonal [2F, R]; stored [2F, R·E] expert-minor
                blocks = np.zeros((E, 2 * F, len(gate_up) * r), np.float32)
                for e in range(E):
                    for k, p in enumerate(gate_up):
                        rows = slice(0, F) if p == "gate_proj" else slice(F, 2 * F)
                        blocks[e, rows, k * r : (k + 1) * r] = f(p, e)[1]
                return einops.rearrange(blocks, "e f k -> f (k e)")

            add(f"{key}.lora_A.weight", (E * rank_gu, D), fused_a)
            add(f"{key}.lora_B.weight", (2 * F, rank_gu * E), fused_b)
        if "down_proj" in projs:
            target_parameters.add("mlp.experts.down_proj")

            def down_a(f=factors):
                return np.concatenate([f("down_proj", e)[0] for e in range(E)])  # [E·r, F]

            def down_b(f=factors):
                b = np.stack([f("down_proj", e)[1] for e in range(E)])  # [E, D, r]
                return einops.rearrange(b, "e d k -> d (k e)")  # column k·E + e

            add(f"{base}.lora_A.weight", (E * r, F), down_a)
            add(f"{base}.lora_B.weight", (D, r * E), down_b)

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": _alpha(scale * r),
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "target_modules": sorted(target_modules),
        "target_parameters": sorted(target_parameters) or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    return tensors, config
