"""Folding a fine-tune back into its base checkpoint, in the base's own format.

    merge_lora(base_dir, model_config, lora_config, lora, qk_clip, out_dir)

For every linear W [out, in] with an adapter, and for the attention projections of heads that
MuonClip rescaled, the merged weight is what the trained model computes with:

    W' = diag(row scale) · (W + s·B·A)

(Kimi-K2.5's vision adapters too, on the released tower tensors: k2jax.conversion.vision_lora),
with the QK-clip row scales of k2jax.model.mla: q_b_proj rows of head h × s_qn[h] (its Dn nope
rows) and × s_qr[h] (its Dr rope rows); kv_b_proj rows × s_kn[h] (its Dn key rows; value rows
unchanged). Base parameters trained in full (`trained_params`: router, norms) replace theirs.

W' is written as the base stored W, under the same tensor names, in the same shard files, with
the same config.json (and so the same quantization_config):

* bf16 / fp32 `.weight` — W' formed in float32 and rounded once to the stored dtype;
* FP8 block-scaled (`.weight` float8_e4m3fn + `.weight_scale_inv`, K2-Instruct) — W dequantised,
  W' re-quantised per block (the block size of the checkpoint's quantization_config, 128×128 for
  Kimi) with the DeepSeek-V3 rule scale_inv = max|W'_block| / 448, q = round-to-nearest(W'/scale_inv)
  in e4m3 (`quantize_fp8_block`);
* INT4 pack-quantized (`.weight_packed/.weight_scale/.weight_shape`, K2-Thinking / K2.5 experts)
  — W dequantised, W' re-quantised with compressed-tensors' symmetric min-max rule (scale =
  max|W'_group| / 7.5 in the stored scale dtype, q = clamp(round(W'/scale), −8, 7), k2jax.quant.
  quantize_int4) and packed. The merged model then differs from the trained one by this
  re-quantisation: |W'_deq − W'| ≤ scale/2 per weight (tested), a quarter to a half of the base's
  own quantisation step, as for any LoRA merged into an INT4 model.

Bounded memory: the output is written shard by shard through the streaming safetensors writer,
and each tensor is produced only when the writer reaches it: unchanged tensors are copied from
the memory-mapped input, a changed one is computed from its module's stored tensors and one
adapter (one expert at a time), so peak memory is about one weight in float32 plus the LoRA tree.
The price: a quantized module stores two or three tensors that the writer does not reach one after
another (it orders by dtype width), so such a module is dequantised and re-quantised once per
tensor — deterministic, so the parts always agree.

Everything else in the folder (tokenizer, chat template, generation config, code) is copied. The
output folder is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from k2jax.config import ARCHITECTURE_KEYS, ModelConfig, read_hf_config
from k2jax.conversion.formats import (
    dequantize_fp8_block,
    dequantize_int4,
    fp8_scale_shape,
    int4_from_hf,
    int4_to_hf,
    parse_quantization,
)
from k2jax.conversion.hf_names import STACKS, ParamSlot, normalize_name, slot_to_hf
from k2jax.conversion.peft import flatten_tree, lora_factors, lora_slots, unbox_tree
from k2jax.conversion.safetensors_io import (
    PICKLE_SUFFIXES,
    CheckpointIndex,
    SafetensorsFile,
    replace_dir,
    write_safetensors,
)
from k2jax.conversion.vision_lora import VISION_ROOTS, merge_edits, split_vision
from k2jax.lora import LoraConfig
from k2jax.paths import check_output_path
from k2jax.quant import quantize_int4

log = logging.getLogger(__name__)

__all__ = ["FP8_MAX", "MergeError", "merge_lora", "quantize_fp8_block"]

FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


class MergeError(ValueError):
    """The fine-tune does not fit the base checkpoint; the message names the tensor."""


def quantize_fp8_block(
    w: np.ndarray, block: Sequence[int] = (128, 128)
) -> tuple[np.ndarray, np.ndarray]:
    """(float8_e4m3fn [out, in], float32 scale_inv [ceil(out/B0), ceil(in/B1)]) of a weight, one
    scale per block: scale_inv = max|w_block| / 448, q = round-to-nearest-even(w / scale_inv)
    (DeepSeek-V3's rule; an all-zero block stores scale_inv 0). The inverse of
    formats.dequantize_fp8_block up to the e4m3 rounding: |q·s − w| ≤ 2⁻⁴·|w| + 2⁻¹⁰·s."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    b0, b1 = (int(b) for b in block)
    rows, cols = w.shape
    s0, s1 = fp8_scale_shape(w.shape, (b0, b1))
    padded = np.zeros((s0 * b0, s1 * b1), np.float32)
    padded[:rows, :cols] = w
    blocks = padded.reshape(s0, b0, s1, b1)
    scale = (np.abs(blocks).max(axis=(1, 3)) / np.float32(FP8_MAX)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    q = np.clip(blocks / safe[:, None, :, None], -FP8_MAX, FP8_MAX)
    q = q.reshape(s0 * b0, s1 * b1)[:rows, :cols].astype(ml_dtypes.float8_e4m3fn)
    return q, scale


# ---------------------------------------------------------------------------------------------
# What changes


@dataclasses.dataclass
class _Edit:
    """The changes to one HF module's weight."""

    adapters: list[tuple[Callable[[], tuple[np.ndarray, np.ndarray]], float]] = dataclasses.field(
        default_factory=list
    )
    row_scale: Callable[[], np.ndarray] | None = None
    replace: Callable[[], np.ndarray] | None = None  # a full-parameter value (router, norm)

    def apply(self, w: np.ndarray) -> np.ndarray:
        """W' = diag(row_scale)·(W + Σ s·B·A) in float32."""
        if self.replace is not None:
            return np.asarray(self.replace(), np.float32)
        w = np.array(w, np.float32)
        for factors, scale in self.adapters:
            a, b = factors()
            w += np.float32(scale) * (b @ a)
        if self.row_scale is not None:
            w *= self.row_scale()[:, None]
        return w


def _edits(cfg: ModelConfig, lora_config, lora_tree, qk_clip_tree, trained_params):
    """HF module or tensor name → _Edit (modules for weights, full names for replacements)."""
    edits: dict[str, _Edit] = {}
    lora_tree, vision_tree = split_vision(unbox_tree(lora_tree))
    if (lora_tree or vision_tree) and lora_config is None:
        raise MergeError("a LoRA tree needs its lora_config (for the scale alpha/r)")
    for slot in lora_slots(cfg, lora_tree) if lora_tree else ():
        edit = edits.setdefault(slot.module, _Edit())
        edit.adapters.append((lambda s=slot: lora_factors(lora_tree, s), float(lora_config.scale)))
    try:
        vision = merge_edits(vision_tree)
    except ValueError as e:
        raise MergeError(str(e)) from None
    for module, factors in vision.items():  # released names, the layout k2jax keeps
        edits.setdefault(module, _Edit()).adapters.append((factors, float(lora_config.scale)))
    for stack, layer, scales in _qk_clip_layers(cfg, qk_clip_tree):
        if np.all(scales == 1.0):
            continue
        H, Dn, Dr, Dv = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        )
        s_qn, s_qr, s_kn = scales.astype(np.float32)
        q_rows = np.concatenate(
            [np.repeat(s_qn[:, None], Dn, 1), np.repeat(s_qr[:, None], Dr, 1)], 1
        )
        kv_rows = np.concatenate([np.repeat(s_kn[:, None], Dn, 1), np.ones((H, Dv), np.float32)], 1)
        for proj, rows in (("q_b_proj", q_rows), ("kv_b_proj", kv_rows)):
            name = slot_to_hf(ParamSlot((stack, "self_attn", proj), "weight", layer), cfg)
            edit = edits.setdefault(name.removesuffix(".weight"), _Edit())
            edit.row_scale = lambda rows=rows: rows.reshape(-1)
    for path, leaf in flatten_tree(unbox_tree(trained_params) or {}):
        module, suffix = path[:-1], path[-1]
        lead = 1 if module and module[0] in STACKS else 0
        if "experts" in module:
            raise MergeError(
                f"trained_params: {'/'.join(path)}: routed experts trained in full are not supported"
            )
        n = np.shape(leaf)[0] if lead else 1
        for layer in range(n):
            try:
                name = slot_to_hf(ParamSlot(module, suffix, layer if lead else None), cfg)
            except (KeyError, IndexError, ValueError):
                raise MergeError(
                    f"trained_params: {'/'.join(path)} is not a base parameter"
                ) from None
            edits.setdefault(name, _Edit()).replace = lambda leaf=leaf, layer=layer, lead=lead: (
                np.asarray(leaf[layer] if lead else leaf)
            )
    return edits


def _qk_clip_layers(cfg, qk_clip_tree):
    tree = unbox_tree(qk_clip_tree) or {}
    for stack, sub in tree.items():
        if stack not in STACKS:
            raise MergeError(f"qk_clip tree: unexpected top-level key {stack!r}")
        scales = np.asarray(sub["self_attn"]["scales"], np.float32)
        n = cfg.num_dense_layers if stack == "dense_layers" else cfg.num_moe_layers
        if scales.shape != (n, 3, cfg.num_attention_heads):
            raise MergeError(
                f"qk_clip tree: {stack}/self_attn/scales has shape {list(scales.shape)}, the model "
                f"config implies {[n, 3, cfg.num_attention_heads]}"
            )
        for layer in range(n):
            yield stack, layer, scales[layer]


# ---------------------------------------------------------------------------------------------
# Computing merged tensors


class _Lazy:
    def __init__(self, shape, dtype, fn):
        self.shape, self.dtype, self._fn = tuple(shape), np.dtype(dtype), fn

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self._fn())
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise MergeError(
                f"merged tensor has {arr.dtype} {list(arr.shape)}, expected {self.dtype} "
                f"{list(self.shape)}"
            )
        return arr if dtype is None else arr.astype(dtype)


class _Merger:
    def __init__(self, index: CheckpointIndex, fmt, edits, cfg):
        self.index, self.fmt, self.edits, self.cfg = index, fmt, edits, cfg
        self._last: tuple[str, dict[str, np.ndarray]] | None = None

    def tensor_fn(self, raw_module, suffix, edit, dtype) -> Callable[[], np.ndarray]:
        """The function computing one merged stored tensor (raw_module None: a replacement)."""
        if raw_module is None:
            return lambda: edit.apply(None).astype(dtype)
        return lambda: self.module_tensors(raw_module, edit)[suffix]

    def module_tensors(self, raw_module: str, edit: _Edit) -> dict[str, np.ndarray]:
        """suffix → merged stored tensor(s) of one module (the last module is cached)."""
        if self._last is not None and self._last[0] == raw_module:
            return self._last[1]
        names = self.index.weight_map
        read = self.index.read
        if f"{raw_module}.weight_packed" in names:
            group = self.fmt.group_size
            if group is None:
                raise MergeError(
                    f"{raw_module}: INT4 tensors, but config.json declares no INT4 group size"
                )
            codes, scale = int4_from_hf(
                read(f"{raw_module}.weight_packed"),
                read(f"{raw_module}.weight_scale"),
                read(f"{raw_module}.weight_shape"),
                group,
                name=raw_module,
            )
            w = edit.apply(dequantize_int4(codes, scale, out_dtype=np.float32))
            with jax.default_device(jax.local_devices(backend="cpu")[0]):  # host work, host data
                q = quantize_int4(w, group, scale_dtype=scale.dtype)
                codes, scale = np.asarray(q.values).astype(np.int8), np.asarray(q.scales)
            stored = int4_to_hf(codes, scale)
            stored["weight_shape"] = np.asarray(read(f"{raw_module}.weight_shape"))
        elif f"{raw_module}.weight_scale_inv" in names:
            block = self.fmt.block_size or (128, 128)
            w = dequantize_fp8_block(
                read(f"{raw_module}.weight"),
                read(f"{raw_module}.weight_scale_inv"),
                block,
                out_dtype=np.float32,
                name=raw_module,
            )
            q, s = quantize_fp8_block(edit.apply(w), block)
            stored = {
                "weight": q,
                "weight_scale_inv": s.astype(read(f"{raw_module}.weight_scale_inv").dtype),
            }
        else:
            w = read(f"{raw_module}.weight")
            stored = {"weight": edit.apply(w).astype(w.dtype)}
        self._last = (raw_module, stored)
        return stored


def _plan_changes(index: CheckpointIndex, edits: dict[str, _Edit], cfg: ModelConfig):
    """raw tensor name → (raw module, suffix, edit) for every tensor that changes."""
    by_module: dict[str, str] = {}  # normalized module → raw module
    by_name: dict[str, str] = {}
    for raw in index.names():
        name = raw if raw.startswith(tuple(f"{r}." for r in VISION_ROOTS)) else normalize_name(raw)
        if name is None:
            continue
        by_name[name] = raw
        module, _, suffix = name.rpartition(".")
        if suffix.startswith("weight"):
            by_module[module] = raw[: len(raw) - len(name)] + module
    changes = {}
    missing = []
    for key, edit in edits.items():
        if edit.replace is not None:
            if key not in by_name:
                missing.append(key)
                continue
            dtype = index.info(by_name[key]).dtype
            if dtype not in ("BF16", "F16", "F32"):
                raise MergeError(
                    f"{by_name[key]}: stored as {dtype}; only unquantized tensors (router, norms) "
                    "can take a fully trained value"
                )
            changes[by_name[key]] = (None, None, edit)
            continue
        raw_module = by_module.get(key)
        if raw_module is None:
            missing.append(key)
            continue
        for suffix in (
            "weight",
            "weight_scale_inv",
            "weight_packed",
            "weight_scale",
            "weight_shape",
        ):
            if f"{raw_module}.{suffix}" in index:
                changes[f"{raw_module}.{suffix}"] = (raw_module, suffix, edit)
    if missing:
        raise MergeError(
            f"{index.folder}: the fine-tune changes {len(missing)} tensors the checkpoint does not "
            f"hold, e.g. {sorted(missing)[:3]}: is this the base the run was trained on?"
        )
    return changes


def _check_architecture(base_dir: Path, cfg: ModelConfig) -> None:
    base = ModelConfig.from_hf_dir(base_dir)
    diff = [
        f"{k}: {getattr(base, k)} vs {getattr(cfg, k)}"
        for k in ARCHITECTURE_KEYS
        if getattr(base, k) != getattr(cfg, k)
    ]
    if diff:
        raise MergeError(
            f"{base_dir}: its config.json does not describe the model the fine-tune was trained "
            f"on (checkpoint vs run): {'; '.join(diff)}"
        )


def merge_lora(
    base_dir: str | os.PathLike,
    model_config: ModelConfig,
    lora_config: LoraConfig | None,
    lora_tree,
    qk_clip_tree,
    out_dir: str | os.PathLike,
    *,
    trained_params=None,
    overwrite: bool = False,
) -> Path:
    """Writes base + LoRA (+ QK-clip, + fully trained parameters) to `out_dir` in the base
    checkpoint's format (module docstring) and returns `out_dir`.

    `lora_tree` / `qk_clip_tree` / `trained_params` are the "lora" and "qk_clip" collections
    and the trained base leaves of a run (k2jax.train.load_run), any of them None. An existing
    `out_dir` is replaced only with `overwrite`; it must not be, contain or lie inside
    `base_dir`, whatever `overwrite` says (k2jax.paths.OutputPathError).
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    check_output_path(
        out_dir, {"its own base checkpoint,": base_dir}, flag="the merged checkpoint folder"
    )
    if not base_dir.is_dir():
        raise FileNotFoundError(f"{base_dir}: not a checkpoint folder")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    _check_architecture(base_dir, model_config)
    fmt = parse_quantization(read_hf_config(base_dir), source=str(base_dir / "config.json"))
    edits = _edits(model_config, lora_config, lora_tree, qk_clip_tree, trained_params)
    index = CheckpointIndex(base_dir)
    changes = _plan_changes(index, edits, model_config)
    merger = _Merger(index, fmt, edits, model_config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        weight_files = set(index.shards())
        for i, shard in enumerate(index.shards()):
            src = SafetensorsFile(base_dir / shard)
            tensors = {}
            for name in src:
                if name not in changes:
                    tensors[name] = src.read(name)  # memory-mapped; streamed to the output
                    continue
                info = src.info(name)
                fn = merger.tensor_fn(*changes[name], info.numpy_dtype)
                tensors[name] = _Lazy(info.shape, info.numpy_dtype, fn)
            write_safetensors(tmp / shard, tensors, src.metadata or {"format": "pt"})
            log.info("merged shard %d/%d: %s", i + 1, len(weight_files), shard)
        for item in base_dir.iterdir():
            if item.name in weight_files or item.name.endswith(PICKLE_SUFFIXES):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)  # incl. the index: same names, same shards
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        index.close()
    log.info("merged %d tensors into %s", len(changes), out_dir)
    return out_dir
