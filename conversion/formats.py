"""The quantized weight formats of the Kimi-K2 checkpoints, decoded in numpy.

Three formats occur (K2_FACTS §2):

* **none** — bf16/fp32 tensors named `<module>.weight` (fine-tuned exports, test checkpoints).

* **FP8 block** (Kimi-K2-Instruct; config `quantization_config = {"quant_method": "fp8",
  "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}`) — every
  Linear except lm_head stores

      <module>.weight            float8_e4m3fn  [out, in]
      <module>.weight_scale_inv  float32        [ceil(out/128), ceil(in/128)]

  and W[i, j] = float(Wq[i, j]) × scale_inv[i // 128, j // 128]. Despite its name the "inverse"
  scale is *multiplied* (DeepSeek-V3 `weight_dequant`); edge blocks may be partial
  (kv_a_proj_with_mqa [576, 7168] has scales [5, 56]).

* **INT4, compressed-tensors `pack-quantized`** (K2-Thinking, K2.5, K2.6; `quant_method:
  "compressed-tensors"`) — symmetric INT4, one scale per group of 32 input features, only the
  routed experts (the `ignore` list keeps attention, shared experts, the dense MLP, lm_head):

      <module>.weight_packed  int32  [out, in/8]   8 codes per word, code k in bits [4k, 4k+4)
      <module>.weight_scale   bf16   [out, in/32]
      <module>.weight_shape   int32  [2] = (out, in)   (int64 when compressed-tensors writes it)

  A nibble stores q + 8 (offset binary, 0..15) and W[o, i] = q[o, i] × scale[o, i // 32]. So the
  word holding q = −8..7 in order is 0x76543210 (nibble 0 = −8 + 8 = 0 in the lowest bits).
  Nibbles are not two's complement — tinker-cookbook gets this wrong (K2_FACTS §8.2).

`parse_quantization(config)` reads a config.json into a `WeightFormat`, rejecting every variant
we do not decode (zero points, activation ordering, other bit widths, ...) instead of guessing;
`WeightFormat.is_quantized(module)` applies compressed-tensors' target/ignore rule. The tensor
functions are plain numpy on host: the loader decodes one tensor (or one row range) at a time
before placing it on devices, and INT4 codes stay codes (`Int4Weight`, two per byte on device).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import ml_dtypes
import numpy as np

from k2jax.conversion.safetensors_io import CheckpointError
from k2jax.quant import INT4_MAX, INT4_MIN, Int4Weight

__all__ = [
    "FP8",
    "INT4",
    "NONE",
    "QuantizationConfigError",
    "WeightFormat",
    "dequantize_fp8_block",
    "dequantize_int4",
    "fp8_scale_shape",
    "int4_from_hf",
    "int4_to_hf",
    "int4_weight_from_hf",
    "pack_int4",
    "parse_quantization",
    "unpack_int4",
]

NONE, FP8, INT4 = "none", "fp8", "int4"
# K2.5 nests its quantization_config in `text_config`: it describes the text model, whose module
# names have no prefix (its ignore list says plain "lm_head"), while the checkpoint's tensors
# carry the wrapper's `language_model.` prefix. Names are matched relative to the text model.
TEXT_MODEL_PREFIX = "language_model."
_FP8_CHUNK_ELEMENTS = 1 << 24  # float32 working set of dequantize_fp8_block: 64 MiB


class QuantizationConfigError(CheckpointError):
    """config.json describes a quantization we do not (or cannot safely) decode."""


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How a checkpoint stores its Linear weights.

    method:      NONE, FP8 (block-scaled float8_e4m3fn) or INT4 (compressed-tensors pack-quantized)
    block_size:  FP8 scale block (rows, cols), (128, 128) for Kimi
    group_size:  INT4 input features per scale, 32 for Kimi
    targets:     INT4: compressed-tensors targets ("Linear" = every Linear layer, or module names /
                 "re:" regexes)
    ignore:      INT4: compressed-tensors ignore list; FP8: transformers' modules_to_not_convert
    scope:       TEXT_MODEL_PREFIX when the config came from `text_config` (K2.5), else ""
    """

    method: str = NONE
    block_size: tuple[int, int] | None = None
    group_size: int | None = None
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    scope: str = ""

    def is_quantized(self, module: str, *, linear: bool = True) -> bool:
        """Whether the checkpoint stores module `module`'s weight quantized.

        `module` is an HF module name (`model.layers.3.mlp.experts.7.up_proj`, no `.weight`;
        K2.5's `language_model.` prefix may be present or already stripped); `linear` says
        whether it is a Linear layer (the router `mlp.gate` is not: it is a custom module
        holding a bf16 weight, so "Linear" targets never cover it).

        INT4 follows compressed-tensors `is_match`: quantized iff some target matches (the class
        name "Linear", an exact module name, or "re:<regex>" matched with re.match at the start
        of the name) and no ignore entry does. FP8 follows transformers' fine-grained FP8
        loader: every Linear except lm_head and `modules_to_not_convert`.
        """
        if self.method == NONE or not linear:
            return False
        if self.scope and module.startswith(self.scope):
            module = module[len(self.scope) :]
        if self.method == FP8:
            if module == "lm_head" or module.endswith(".lm_head"):
                return False
            return not any(_hf_skip_match(module, p) for p in self.ignore)
        targeted = any(t == "Linear" or _ct_match(module, t) for t in self.targets)
        return targeted and not any(_ct_match(module, ign) for ign in self.ignore)

    def stored_suffixes(self, module: str, *, linear: bool = True) -> tuple[str, ...]:
        """The tensor suffixes stored for `module`'s weight (e.g. ("weight", "weight_scale_inv"))."""
        if not self.is_quantized(module, linear=linear):
            return ("weight",)
        if self.method == FP8:
            return ("weight", "weight_scale_inv")
        return ("weight_packed", "weight_scale", "weight_shape")


def _ct_match(name: str, target: str) -> bool:
    """compressed-tensors `match_name`: "re:" → re.match (anchored at the start only), else ==."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def _hf_skip_match(name: str, pattern: str) -> bool:
    """transformers `should_convert_module`: a pattern skips `name` when it matches from the
    start up to a module boundary (as a regex), or is a suffix of it."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return re.match(rf"(?:{pattern}){boundary}", name) is not None or name.endswith(pattern)


# ---------------------------------------------------------------------------------------------
# config.json → WeightFormat


def parse_quantization(config: Mapping, *, source: str = "config.json") -> WeightFormat:
    """The weight format a model config.json (as a dict) declares.

    The quantization_config is read from the top level (K2, K2-Thinking) or from `text_config`
    (K2.5, whose wrapper config nests the text model's). `source` names the file in errors.
    """
    top = config.get("quantization_config")
    text_config = config.get("text_config")
    nested = text_config.get("quantization_config") if isinstance(text_config, Mapping) else None
    if top is not None and nested is not None and top != nested:
        raise QuantizationConfigError(
            f"{source}: quantization_config and text_config.quantization_config differ; "
            "cannot tell which describes the weights"
        )
    if top is not None:
        qc, where, scope = top, "quantization_config", ""
    elif nested is not None:
        qc, where, scope = nested, "text_config.quantization_config", TEXT_MODEL_PREFIX
    else:
        return WeightFormat(NONE)
    where = f"{source}: {where}"
    if not isinstance(qc, Mapping):
        raise QuantizationConfigError(f"{where} must be an object, got {qc!r:.100}")
    method = qc.get("quant_method")
    if method == "fp8":
        return _parse_fp8(qc, where)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(qc, where, scope)
    raise QuantizationConfigError(
        f"{where}: quant_method {method!r} is not supported (supported: 'fp8' block-scaled as in "
        "Kimi-K2-Instruct, 'compressed-tensors' pack-quantized INT4 as in K2-Thinking/K2.5)"
    )


def _parse_fp8(qc: Mapping, where: str) -> WeightFormat:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise QuantizationConfigError(f"{where}: fmt {fmt!r} is not supported, expected 'e4m3'")
    block = qc.get("weight_block_size")
    if block is None:
        raise QuantizationConfigError(
            f"{where}: no weight_block_size; only block-scaled FP8 (e.g. [128, 128]) is supported, "
            "not per-tensor scales"
        )
    if not (
        isinstance(block, Sequence) and len(block) == 2 and all(_positive_int(b) for b in block)
    ):
        raise QuantizationConfigError(
            f"{where}: weight_block_size must be two positive integers, got {block!r}"
        )
    scale_fmt = qc.get("scale_fmt", "float")
    if scale_fmt != "float":
        raise QuantizationConfigError(
            f"{where}: scale_fmt {scale_fmt!r} is not supported, expected 'float' (fp32 scales)"
        )
    if qc.get("expert_dtype", "fp8") != "fp8":
        raise QuantizationConfigError(
            f"{where}: expert_dtype {qc['expert_dtype']!r} is not supported, expected 'fp8'"
        )
    if qc.get("modules_to_convert"):
        raise QuantizationConfigError(f"{where}: modules_to_convert is not supported")
    skip = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise QuantizationConfigError(f"{where}: modules_to_not_convert must be a list of strings")
    # activation_scheme ("dynamic") concerns inference kernels, not how weights are stored.
    return WeightFormat(FP8, block_size=(block[0], block[1]), ignore=tuple(skip))


def _parse_compressed_tensors(qc: Mapping, where: str, scope: str) -> WeightFormat:
    fmt = qc.get("format")
    if fmt != "pack-quantized":
        raise QuantizationConfigError(
            f"{where}: compressed-tensors format {fmt!r} is not supported, expected "
            "'pack-quantized' (int32-packed INT4)"
        )
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise QuantizationConfigError(
            f"{where}: quantization_status {status!r}: the weights are not stored compressed"
        )
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if qc.get(key) is not None:
            raise QuantizationConfigError(f"{where}: {key} is set; this is not supported")
    groups = qc.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise QuantizationConfigError(f"{where}: config_groups must be a non-empty object")

    targets: list[str] = []
    group_size = None
    for gname, group in groups.items():
        gwhere = f"{where}.config_groups.{gname}"
        if not isinstance(group, Mapping):
            raise QuantizationConfigError(f"{gwhere} must be an object")
        if group.get("format") not in (None, "pack-quantized"):
            raise QuantizationConfigError(
                f"{gwhere}: format {group['format']!r} is not supported, expected 'pack-quantized'"
            )
        for act in ("input_activations", "output_activations"):
            if group.get(act) is not None:
                raise QuantizationConfigError(
                    f"{gwhere}: {act} are quantized; only weight-only (W4A16) INT4 is supported"
                )
        g = _check_int4_args(group.get("weights"), f"{gwhere}.weights")
        if group_size is not None and g != group_size:
            raise QuantizationConfigError(
                f"{where}: config groups use different group sizes ({group_size} and {g})"
            )
        group_size = g
        gt = group.get("targets")
        if not isinstance(gt, list) or not gt or not all(isinstance(t, str) for t in gt):
            raise QuantizationConfigError(f"{gwhere}: targets must be a non-empty list of strings")
        targets += gt

    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise QuantizationConfigError(f"{where}: ignore must be a list of strings")
    for pattern in (*targets, *ignore):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise QuantizationConfigError(f"{where}: bad regex {pattern!r}: {e}") from None
    return WeightFormat(
        INT4, group_size=group_size, targets=tuple(targets), ignore=tuple(ignore), scope=scope
    )


def _check_int4_args(w, where: str) -> int:
    """Validates a compressed-tensors QuantizationArgs dict for Kimi's INT4; returns group_size."""
    if not isinstance(w, Mapping):
        raise QuantizationConfigError(f"{where}: missing (weight quantization arguments)")
    expect = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    for key, value in expect.items():
        if w.get(key) != value:
            why = {
                "symmetric": " (asymmetric INT4 stores zero points, which k2jax does not decode)"
            }
            raise QuantizationConfigError(
                f"{where}: {key} is {w.get(key)!r}, expected {value!r}{why.get(key, '')}"
            )
    if w.get("actorder") not in (None, False):
        raise QuantizationConfigError(
            f"{where}: actorder {w['actorder']!r}: activation ordering (weight_g_idx) is not "
            "supported"
        )
    if w.get("dynamic") not in (None, False):
        raise QuantizationConfigError(f"{where}: dynamic {w['dynamic']!r}: expected static weights")
    if w.get("block_structure") is not None:
        raise QuantizationConfigError(f"{where}: block_structure is set; expected group strategy")
    g = w.get("group_size")
    if not _positive_int(g):
        raise QuantizationConfigError(f"{where}: group_size must be a positive integer, got {g!r}")
    if g % 8:
        raise QuantizationConfigError(
            f"{where}: group_size {g} is not a multiple of 8 (one int32 word packs 8 codes)"
        )
    return g


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


# ---------------------------------------------------------------------------------------------
# FP8


def fp8_scale_shape(shape: Sequence[int], block: Sequence[int] = (128, 128)) -> tuple[int, int]:
    """The weight_scale_inv shape of an FP8 weight [out, in]: (ceil(out/B0), ceil(in/B1))."""
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


def dequantize_fp8_block(
    w: np.ndarray,
    scale_inv: np.ndarray,
    block: Sequence[int] = (128, 128),
    out_dtype=ml_dtypes.bfloat16,
    *,
    name: str = "FP8 weight",
) -> np.ndarray:
    """W = float32(w) × scale_inv[i // B0, j // B1], rounded once to `out_dtype`.

    `w` float8_e4m3fn [out, in], `scale_inv` [ceil(out/B0), ceil(in/B1)] (float32 in Kimi; bf16
    and f16 are accepted and widened exactly). Edge blocks may be partial. Works through row
    blocks so the float32 working set stays near 64 MiB whatever the weight's size; `w` may be a
    memory-mapped view. `name` is used in error messages.
    """
    w = np.asarray(w)
    scale_inv = np.asarray(scale_inv)
    b0, b1 = (int(b) for b in block)
    if w.dtype != ml_dtypes.float8_e4m3fn:
        raise CheckpointError(f"{name}: dtype {w.dtype}, expected float8_e4m3fn")
    if w.ndim != 2:
        raise CheckpointError(f"{name}: shape {list(w.shape)}, expected a 2-D [out, in] weight")
    want = fp8_scale_shape(w.shape, (b0, b1))
    if scale_inv.shape != want:
        raise CheckpointError(
            f"{name}: weight_scale_inv has shape {list(scale_inv.shape)}, but a {list(w.shape)} "
            f"weight with {b0}x{b1} blocks needs {list(want)}"
        )
    if scale_inv.dtype not in (np.float32, np.float16, ml_dtypes.bfloat16):
        raise CheckpointError(f"{name}: weight_scale_inv dtype {scale_inv.dtype}, expected float32")
    rows, cols = w.shape
    out = np.empty((rows, cols), out_dtype)
    step = b0 * max(1, _FP8_CHUNK_ELEMENTS // max(1, b0 * cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s = scale_inv[r0 // b0 : math.ceil(r1 / b0)].astype(np.float32)
        s = np.repeat(np.repeat(s, b0, axis=0)[: r1 - r0], b1, axis=1)[:, :cols]
        out[r0:r1] = (w[r0:r1].astype(np.float32) * s).astype(out_dtype)
    return out


# ---------------------------------------------------------------------------------------------
# INT4 (compressed-tensors pack-quantized)


def unpack_int4(packed: np.ndarray, in_features: int, *, name: str = "weight_packed") -> np.ndarray:
    """int32 words [..., out, in/8] → int8 codes [..., out, in] in [−8, 7].

    Code k of a word sits in bits [4k, 4k+4) (LSB first) as q + 8. On a little-endian byte view
    of the words, byte b of a row holds codes 2b (low nibble) and 2b+1 (high nibble).
    """
    packed = np.asarray(packed)
    if packed.dtype != np.int32:
        raise CheckpointError(f"{name}: dtype {packed.dtype}, expected int32 packed INT4 words")
    if packed.ndim < 2:
        raise CheckpointError(f"{name}: shape {list(packed.shape)}, expected [..., out, in/8]")
    if in_features % 8 or packed.shape[-1] != in_features // 8:
        raise CheckpointError(
            f"{name}: shape {list(packed.shape)} does not pack {in_features} input features "
            f"(8 per int32 word: expected last dim {in_features / 8:g}, and in_features "
            "divisible by 8)"
        )
    nibbles = np.ascontiguousarray(packed, dtype="<i4").view(np.uint8)
    codes = np.empty((*packed.shape[:-1], in_features), np.int8)
    codes[..., 0::2] = (nibbles & 0x0F).view(np.int8) - 8
    codes[..., 1::2] = (nibbles >> 4).view(np.int8) - 8
    return codes


def pack_int4(q: np.ndarray, *, name: str = "INT4 codes") -> np.ndarray:
    """int8 (or ml_dtypes.int4) codes [..., out, in] in [−8, 7] → int32 words [..., out, in/8];
    the inverse of `unpack_int4`, bit-identical to compressed-tensors' pack_to_int32(q, 4)."""
    q = np.asarray(q)
    if q.dtype == ml_dtypes.int4:
        q = q.astype(np.int8)
    if q.dtype.kind not in "iu" or q.ndim < 2:
        raise ValueError(f"{name}: expected integer codes [..., out, in], got {q.dtype} {q.shape}")
    if q.shape[-1] % 8:
        raise ValueError(f"{name}: in_features {q.shape[-1]} is not divisible by 8")
    if q.size and (q.min() < INT4_MIN or q.max() > INT4_MAX):
        raise ValueError(
            f"{name}: codes span [{q.min()}, {q.max()}], outside the INT4 range "
            f"[{INT4_MIN}, {INT4_MAX}]"
        )
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    nibbles = u[..., 0::2] | (u[..., 1::2] << 4)
    return np.ascontiguousarray(nibbles).view("<i4").astype(np.int32)


def int4_from_hf(
    weight_packed: np.ndarray,
    weight_scale: np.ndarray,
    weight_shape: np.ndarray,
    group_size: int,
    *,
    name: str = "INT4 weight",
) -> tuple[np.ndarray, np.ndarray]:
    """Checks one stored INT4 weight and decodes it: (int8 codes [out, in], scales [out, in/g]).

    `name` (the HF module name) prefixes every error. The scales keep their stored dtype (bf16).
    """
    shape = np.asarray(weight_shape)
    if shape.dtype not in (np.int32, np.int64) or shape.shape != (2,):
        raise CheckpointError(
            f"{name}.weight_shape: {shape.dtype} {list(shape.shape)}, expected 2 int32/int64 "
            "values (out, in)"
        )
    out_f, in_f = (int(x) for x in shape)
    if out_f <= 0 or in_f <= 0:
        raise CheckpointError(f"{name}.weight_shape: ({out_f}, {in_f}) is not a valid shape")
    if in_f % group_size:
        raise CheckpointError(
            f"{name}: in_features {in_f} is not divisible by the group size {group_size}"
        )
    packed = np.asarray(weight_packed)
    if packed.shape != (out_f, in_f // 8):
        raise CheckpointError(
            f"{name}.weight_packed: shape {list(packed.shape)}, but weight_shape ({out_f}, {in_f})"
            f" needs [{out_f}, {in_f // 8}] (8 INT4 codes per int32)"
        )
    scale = np.asarray(weight_scale)
    if scale.shape != (out_f, in_f // group_size):
        raise CheckpointError(
            f"{name}.weight_scale: shape {list(scale.shape)}, but weight_shape ({out_f}, {in_f}) "
            f"with group size {group_size} needs [{out_f}, {in_f // group_size}]"
        )
    if scale.dtype not in (ml_dtypes.bfloat16, np.float16, np.float32):
        raise CheckpointError(f"{name}.weight_scale: dtype {scale.dtype}, expected bfloat16")
    return unpack_int4(packed, in_f, name=f"{name}.weight_packed"), scale


def int4_weight_from_hf(
    weight_packed: np.ndarray,
    weight_scale: np.ndarray,
    weight_shape: np.ndarray,
    group_size: int,
    *,
    name: str = "INT4 weight",
) -> Int4Weight:
    """`int4_from_hf` as k2jax's `Int4Weight` (host numpy: values ml_dtypes.int4, scales as
    stored); `jax.device_put` turns the values into jnp.int4."""
    codes, scale = int4_from_hf(weight_packed, weight_scale, weight_shape, group_size, name=name)
    return Int4Weight(values=codes.astype(ml_dtypes.int4), scales=scale)


def int4_to_hf(values: np.ndarray, scales: np.ndarray) -> dict[str, np.ndarray]:
    """The stored tensors of one INT4 weight (codes [out, in], scales [out, in/g]), as Kimi's
    checkpoints hold them: weight_packed int32, weight_scale (dtype kept), weight_shape int32."""
    values = np.asarray(values)
    scales = np.asarray(scales)
    if values.ndim != 2 or scales.ndim != 2 or scales.shape[0] != values.shape[0]:
        raise ValueError(
            f"expected codes [out, in] and scales [out, in/g], got {values.shape} and {scales.shape}"
        )
    if scales.shape[1] == 0 or values.shape[1] % scales.shape[1]:
        raise ValueError(
            f"in_features {values.shape[1]} is not a multiple of {scales.shape[1]} groups"
        )
    return {
        "weight_packed": pack_int4(values),
        "weight_scale": scales,
        "weight_shape": np.asarray(values.shape, np.int32),
    }


def dequantize_int4(
    codes: np.ndarray, scales: np.ndarray, out_dtype=ml_dtypes.bfloat16
) -> np.ndarray:
    """W[o, i] = codes[o, i] × scales[o, i // g], formed in float32 and rounded once (numpy twin
    of k2jax.quant.dequantize, for host-side conversion)."""
    codes = np.asarray(codes)
    scales = np.asarray(scales)
    *lead, n, k = codes.shape
    if scales.shape[:-1] != codes.shape[:-1] or not scales.shape[-1] or k % scales.shape[-1]:
        raise ValueError(f"scales {scales.shape} do not group codes {codes.shape}")
    g = k // scales.shape[-1]
    q = codes.astype(np.float32).reshape(*lead, n, k // g, g)
    return (q * scales.astype(np.float32)[..., None]).reshape(codes.shape).astype(out_dtype)
