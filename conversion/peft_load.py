"""PEFT LoRA adapters into k2jax: an adapter folder → k2jax's stacked LoRA factors.

The inverse of `k2jax.conversion.peft` (export), for two uses: a run that starts from an existing
adapter (`lora.init_from = DIR`: continue a LLaMA-Factory / PEFT fine-tune, LLaMA-Factory's
`adapter_name_or_path`) and `k2jax chat --model BASE --adapter DIR`. A PEFT adapter folder holds

    adapter_config.json         peft_type LORA, r, lora_alpha, use_rslora, target_modules, ...
    adapter_model.safetensors   base_model.model.<HF module>.lora_A.weight [r, in]
                                base_model.model.<HF module>.lora_B.weight [out, r]

Each tensor name is mapped back through the checkpoint name map (k2jax.conversion.hf_names) to a
module path of the LoRA tree, e.g. `model.layers.3.mlp.experts.7.up_proj` → moe_layers/mlp/
experts/up_proj at layer 3 − first_k_dense_replace, expert 7, and every shape is checked against
the model config before anything is placed. Read are the per-expert layout (transformers-v4 names:
what `k2jax export` writes by default, what PEFT and vLLM use for DeepSeek-V3-style models) and the
dense MLP / shared experts whether PEFT targeted them as modules or as parameters (same names).

Refused, each with its reason: pickled weights (`adapter_model.bin`: loading a pickle runs code
from the file; never unpickled), other PEFT types, DoRA, LoRA biases, `modules_to_save`, per-module
ranks or alphas (`rank_pattern` / `alpha_pattern`: k2jax has one rank and one scale), LoRA on the
embedding or LM head, transformers 5's fused-experts layout (`k2jax export --layout per-expert`
writes the readable one), and an adapter that covers only some layers or experts of a module (the
stacked factors of one module cover every layer; `layers_to_transform` is not supported).

A module whose factors are all zero (what export writes for a routed projection that was not
trained, because loaders want all three) counts as absent: loaded as zeros it could never train
(both factors zero have zero gradients), so a run starts it fresh, and chat leaves it out.

Tensors are read from the memory-mapped file slice by slice (`PeftAdapter.block`), so a run on a
mesh places each device's part of a factor without the host ever holding the whole adapter.
Rejected alternative: `peft.PeftModel` / `safetensors.safe_open` — torch (or a second reader)
in the library for what a header parse and the name map already do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from k2jax.config import ModelConfig
from k2jax.conversion.hf_names import UnknownTensorError, hf_to_slot, normalize_name
from k2jax.conversion.peft import PREFIX, known_paths, linear_shape
from k2jax.conversion.safetensors_io import CheckpointError, SafetensorsFile
from k2jax.lora import LoraConfig

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterError", "PeftAdapter", "read_peft"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_FUSED_RE = re.compile(r"\.mlp\.experts\.(base_layer\.)?lora_[AB]\.weight$")
_FACTOR_RE = re.compile(r"^(.+)\.(lora_A|lora_B)\.weight$")

Path_ = tuple[str, ...]  # a LoRA module path: ("moe_layers", "mlp", "experts", "up_proj")


class AdapterError(ValueError):
    """A PEFT adapter cannot be read into this model or run; the message names file and reason."""


def target_name(path: Path_) -> str:
    """The lora.targets entry that names exactly this module path ("mlp.experts.up_proj")."""
    return ".".join(path[1:])


@dataclasses.dataclass
class PeftAdapter:
    """A PEFT adapter folder, read and checked against one model config.

    rank, scale: PEFT's r and its scaling, lora_alpha / r (lora_alpha / √r with use_rslora).
    names: module path → "lora_A" / "lora_B" → (layer, expert) → tensor name in the file (layer
      indexes the module's stack, expert is None outside routed experts). Every module present
      covers every layer (and expert) of its stack.
    modules: the module paths present in the file (read from its header).
    trained: those with a non-zero factor (the others hold only zeros); reading every factor
      once, on first use.
    """

    folder: Path
    model_config: ModelConfig
    rank: int
    scale: float
    alpha: float
    rslora: bool
    base_model: str | None
    names: dict[Path_, dict[str, dict[tuple[int, int | None], str]]]
    file: SafetensorsFile
    _trained: tuple[Path_, ...] | None = None

    @property
    def modules(self) -> tuple[Path_, ...]:
        return tuple(sorted(self.names))

    @property
    def trained(self) -> tuple[Path_, ...]:
        if self._trained is None:
            self._trained = tuple(
                path
                for path, factors in sorted(self.names.items())
                if any(np.any(self.file.read(n)) for f in factors.values() for n in f.values())
            )
        return self._trained

    def lora_config(self, *, trained_only: bool = True, **changes) -> LoraConfig:
        """A LoraConfig with this rank and scale that adapts exactly the trained modules (or,
        trained_only=False, every module in the file: no factor is read)."""
        paths = self.trained if trained_only else self.modules
        if not paths:
            raise AdapterError(f"{self.folder}: every factor of the adapter is zero")
        fields = dict(
            rank=self.rank,
            alpha=self.scale * self.rank,
            rslora=False,
            targets=tuple(sorted({target_name(p) for p in paths})),
        )
        return LoraConfig(**{**fields, **changes})

    def check(self, lora: LoraConfig, key: str = "lora.init_from") -> list[Path_]:
        """Raises AdapterError unless a run with `lora` can start from this adapter: same rank,
        same scale, and every trained module among lora.targets. Returns the targeted module
        paths the adapter does not train (they start fresh: A random, B zero)."""
        where = f"{key}: {self.folder}"
        if self.rank != lora.rank:
            raise AdapterError(
                f"{where} has rank r = {self.rank} but lora.rank = {lora.rank}; set lora.rank = "
                f"{self.rank} (the adapter's factors fix the rank)"
            )
        if not math.isclose(self.scale, lora.scale, rel_tol=1e-6):
            need = self.scale * (math.sqrt(lora.rank) if lora.rslora else lora.rank)
            raise AdapterError(
                f"{where} scales its update by lora_alpha / r = {self.scale:g} (lora_alpha "
                f"{self.alpha:g}, r {self.rank}{', rsLoRA: / √r' if self.rslora else ''}) but "
                f"lora.alpha / lora.rank{' (rsLoRA: / √rank)' if lora.rslora else ''} = "
                f"{lora.scale:g}; set lora.alpha = {need:g} to continue the same function"
            )
        outside = sorted(
            {target_name(p) for p in self.trained if not lora.applies_to(target_name(p))}
        )
        if outside:
            raise AdapterError(
                f"{where} trains {', '.join(outside)}, which lora.targets "
                f"({', '.join(lora.targets)}) does not include; add them to lora.targets"
            )
        return [
            p
            for p in known_paths(self.model_config)
            if lora.applies_to(target_name(p)) and p not in self.trained
        ]

    def block(self, path: Path_, factor: str, shape: Sequence[int], index=()) -> np.ndarray:
        """The part `index` (a tuple of slices, as jax.make_array_from_callback passes) of the
        stacked factor `factor` ("lora_A" / "lora_B") of `path`, whose whole shape is `shape`
        ([L, (E,) r, in] or [L, (E,) out, r]), as float32, read from the file slice by slice."""
        experts = "experts" in path
        lead = 2 if experts else 1
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        layers = range(*index[0].indices(shape[0]))
        expert_ids = range(*index[1].indices(shape[1])) if experts else (None,)
        rest = index[lead:]
        names = self.names[path][factor]
        out = None
        for i, layer in enumerate(layers):
            for j, e in enumerate(expert_ids):
                piece = self.file.read(names[(layer, e)])[rest]
                if out is None:
                    out = np.empty((len(layers), len(expert_ids), *piece.shape), np.float32)
                out[i, j] = piece
        if out is None:
            out = np.empty((0, len(expert_ids), 0, 0), np.float32)
        return out if experts else out[:, 0]

    def close(self) -> None:
        self.file.close()


def _adapter_config(folder: Path) -> dict:
    file = folder / ADAPTER_CONFIG
    if not file.is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{file}: cannot read: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{file}: expected a JSON object")

    def refuse(key, why):
        raise AdapterError(f"{file}: {key} = {cfg.get(key)!r}: {why}")

    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        refuse("peft_type", "only LoRA adapters are read")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        refuse("r", "expected the LoRA rank, an integer >= 1")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        refuse("lora_alpha", "expected a positive number")
    if cfg.get("use_dora"):
        refuse("use_dora", "DoRA is not supported")
    if cfg.get("fan_in_fan_out"):
        refuse("fan_in_fan_out", "transposed (Conv1D-style) factors are not read")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        refuse("bias" if cfg.get("bias", "none") != "none" else "lora_bias", "no LoRA biases")
    if cfg.get("modules_to_save"):
        refuse("modules_to_save", "fully trained modules cannot be carried over (LoRA only)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            refuse(key, "k2jax uses one rank and one scale for every module")
    return cfg


def read_peft(folder: str | os.PathLike, model_config: ModelConfig) -> PeftAdapter:
    """Reads and checks a PEFT adapter folder against `model_config` (see the module docstring):
    its config, and every tensor's name and shape from the file's header. The factors stay in the
    memory-mapped file until `trained` or `block` reads them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a folder (a PEFT adapter folder is expected)")
    cfg = _adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [n for n in PICKLED_WEIGHTS if (folder / n).is_file()]
        if pickled:
            raise AdapterError(
                f"{folder / pickled[0]}: a pickle (torch.save); k2jax never unpickles (loading "
                "a pickle runs code from the file). Save the adapter as safetensors, e.g. PEFT's "
                "save_pretrained(dir, safe_serialization=True)"
            )
        raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS}")
    try:
        file = SafetensorsFile(weights)
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    try:
        return _index(folder, model_config, cfg, file)
    except BaseException:
        file.close()
        raise


def _index(folder: Path, mc: ModelConfig, cfg: dict, file: SafetensorsFile) -> PeftAdapter:
    r = cfg["r"]
    known = known_paths(mc)
    names: dict[Path_, dict[str, dict[tuple[int, int | None], str]]] = {}
    for name in file:
        why = _refused_tensor(name)
        if why:
            raise AdapterError(f"{file.path}: {name}: {why}")
        module, factor = _FACTOR_RE.match(name.removeprefix(PREFIX)).groups()
        hf = normalize_name(module)
        try:
            slot = None if hf is None else hf_to_slot(f"{hf}.weight", mc)
        except UnknownTensorError:
            slot = None
        if slot is None or slot.layer is None:
            raise AdapterError(
                f"{file.path}: {name}: not a LoRA-able linear of this {mc.model_type} model "
                f"({mc.num_hidden_layers} layers, {mc.n_routed_experts} routed experts); k2jax "
                "adapts the attention and MLP linears of each layer"
            )
        path = slot.module
        if path[-1] == "gate_up_proj":  # the base fuses gate and up; LoRA keeps them apart
            path = (*path[:-1], ("gate_proj", "up_proj")[slot.part])
        if path not in known:
            raise AdapterError(f"{file.path}: {name}: no such module in this model")
        out_f, in_f = linear_shape(mc, path)
        want = (r, in_f) if factor == "lora_A" else (out_f, r)
        got = tuple(file.info(name).shape)
        if got != want:
            raise AdapterError(
                f"{file.path}: {name} has shape {list(got)}, but rank r = {r} "
                f"({ADAPTER_CONFIG}) and the model config imply {list(want)}"
            )
        names.setdefault(path, {"lora_A": {}, "lora_B": {}})[factor][(slot.layer, slot.expert)] = (
            name
        )
    if not names:
        raise AdapterError(f"{file.path}: no LoRA factors (lora_A / lora_B tensors)")
    for path, factors in sorted(names.items()):
        experts = range(mc.n_routed_experts) if "experts" in path else (None,)
        want = {(layer, e) for layer in range(known[path]) for e in experts}
        for factor, slots in factors.items():
            if set(slots) != want:
                raise AdapterError(
                    f"{file.path}: {target_name(path)} in the {path[0]} has {factor} for "
                    f"{len(set(slots) & want)} of its {len(want)} (layer, expert) slots; k2jax "
                    "adapts a module in every layer (and expert) or not at all "
                    "(layers_to_transform is not supported)"
                )
    alpha = float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    base = cfg.get("base_model_name_or_path")
    return PeftAdapter(
        folder=folder,
        model_config=mc,
        rank=r,
        scale=alpha / (math.sqrt(r) if rslora else r),
        alpha=alpha,
        rslora=rslora,
        base_model=base if isinstance(base, str) else None,
        names=names,
        file=file,
    )


def _refused_tensor(name: str) -> str | None:
    """Why a tensor of an adapter file cannot be read, or None."""
    if not name.startswith(PREFIX):
        return f"expected names starting with {PREFIX!r} (PEFT's saved names)"
    if _FUSED_RE.search(name):
        return (
            "transformers 5's fused-experts layout (target_parameters on mlp.experts) is not "
            "read; export the adapter per expert (k2jax export --layout per-expert)"
        )
    if "lora_embedding_" in name:
        return "LoRA on the token embedding is not supported"
    if "lora_magnitude_vector" in name:
        return "DoRA is not supported"
    if "modules_to_save" in name or name.endswith(".bias"):
        return "fully trained modules and biases cannot be carried over (LoRA factors only)"
    if not _FACTOR_RE.match(name):
        return "not a LoRA factor (<module>.lora_A.weight / lora_B.weight)"
    return None
