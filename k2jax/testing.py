"""Tiny but complete Kimi-format checkpoints, for tests, the demo and the notebook.

    from k2jax.testing import make_tiny_checkpoint
    folder = make_tiny_checkpoint("ckpt/tiny-int4", format="int4")
    model = k2jax.load_model(folder)

`make_tiny_checkpoint` writes what a released Kimi folder holds, at a size a CPU handles in
seconds: `config.json` in the real model's form (model_type `kimi_k2`, a YaRN `rope_scaling`;
K2-Instruct's FP8 or K2-Thinking's compressed-tensors `quantization_config` with its ignore list),
`model.safetensors.index.json` and several shards with per-expert HF tensor names, and the tiny
tokenizer (`tiktoken.model`, `tokenizer_config.json`; k2jax.data.testing). `layout="k25"` writes
Kimi-K2.5's form instead: a `kimi_k25` wrapper config with the text model (and its
quantization_config) in `text_config`, every text tensor prefixed `language_model.`, and a few
vision-tower and projector tensors that a text loader must skip — or, with `vision=True`, a
complete tiny MoonViT and projector under the released names (`TINY_VISION`: 2 blocks of width
32, 14-pixel patches, an 8×8 position table; config keys in the released vt_* spelling, image
token `<|media_pad|>` of the tiny tokenizer) that `load_model` and the trainer use.

Weights are random but behave like a trained model's: norm weights near 1, a random router bias
(so the bias really changes which experts are chosen), Linear weights ~ N(0, 1/fan_in) so
activations stay O(1) through the layers. Each tensor is drawn from its own seed (seed, name), so
the values do not depend on how tensors are split into shards, and only one tensor is in memory
at a time: the same function writes multi-GB checkpoints for benchmarks/bench_convert.py.

Quantised formats are encoded with k2jax's codecs, which tests/test_formats.py checks bit for bit
against compressed-tensors and torch: INT4 experts as `quantize_int4` (compressed-tensors' min-max
rule) packed by `pack_int4`, FP8 with one float32 `weight_scale_inv` per block (amax / 448, as
DeepSeek's quantizer), including partial edge blocks where a dimension is not a multiple of the
block.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

from k2jax.config import ConfigError, ModelConfig
from k2jax.data.tokenizer import KIMI_SPECIAL_OFFSETS

__all__ = [
    "FP8_QUANTIZATION_CONFIG",
    "INT4_QUANTIZATION_CONFIG",
    "hf_tensor_shapes",
    "make_tiny_checkpoint",
]

# Kimi-K2-Instruct's quantization_config (K2_FACTS §1.1).
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
# Kimi-K2-Thinking's / K2.5's (K2_FACTS §2.3): INT4 routed experts only.
INT4_QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "kv_cache_scheme": None,
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "input_activations": None,
            "output_activations": None,
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 32,
                "dynamic": False,
                "observer": "minmax",
                "observer_kwargs": {},
                "actorder": None,
                "block_structure": None,
            },
        }
    },
    "ignore": [
        "lm_head",
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
    ],
}
FORMATS = ("bf16", "fp8", "int4")
LAYOUTS = ("k2", "k25")
# The complete tiny vision tower of make_tiny_checkpoint(layout="k25", vision=True), in the
# released config spelling (K2_FACTS §1.3).
TINY_VISION = {
    "patch_size": 14,
    "vt_hidden_size": 32,
    "vt_num_hidden_layers": 2,
    "vt_num_attention_heads": 2,
    "vt_intermediate_size": 64,
    "init_pos_emb_height": 8,
    "init_pos_emb_width": 8,
    "init_pos_emb_time": 4,
    "merge_kernel_size": [2, 2],
    "mm_hidden_size": 32,
    "pos_emb_type": "divided_fixed",
    "merge_type": "sd2_tpool",
    "mm_projector_type": "patchmerger",
    "projector_hidden_act": "gelu",
    "projector_ln_eps": 1e-5,
}
# <|media_pad|> of the tiny tokenizer: its 256 byte tokens and 512 merges, then Kimi's specials.
_TINY_IMAGE_TOKEN = 256 + 512 + KIMI_SPECIAL_OFFSETS["<|media_pad|>"]
# A few of K2.5's vision-tower / projector tensors (K2_FACTS §1.3), shrunk.
_VISION_TENSORS = {
    "vision_tower.patch_embed.proj.weight": (16, 3, 14, 14),
    "vision_tower.patch_embed.proj.bias": (16,),
    "vision_tower.encoder.blocks.0.wqkv.weight": (48, 16),
    "mm_projector.pre_norm.weight": (16,),
    "mm_projector.proj.0.weight": (64, 64),
}


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an unquantized HF checkpoint of `cfg` → its shape, in layer order.

    Derived from the model's own parameter declarations (the abstract params tree) through the
    HF name map, so a checkpoint written from it has exactly what the loader expects.
    """
    import flax.linen as nn
    import jax

    from k2jax.conversion.hf_names import ParamSlot, slot_to_hf
    from k2jax.conversion.loader import abstract_params
    from k2jax.model import ComputeConfig

    abstract = nn.unbox(abstract_params(cfg, ComputeConfig(experts="bf16")))
    shapes: dict[str, tuple[int, ...]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = tuple(str(p.key) for p in path)
        module, suffix = keys[:-1], keys[-1]
        stacked = keys[0] in ("dense_layers", "moe_layers")
        shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
        for layer in range(leaf.shape[0]) if stacked else [None]:
            if "experts" not in module:
                shapes[slot_to_hf(ParamSlot(module, suffix, layer), cfg)] = shape
                continue
            fused = module[-1] == "gate_up_proj"
            for e in range(shape[0]):
                for part in (0, 1) if fused else (None,):
                    out = shape[1] // 2 if fused else shape[1]
                    name = slot_to_hf(ParamSlot(module, suffix, layer, e, part), cfg)
                    shapes[name] = (out, shape[2])

    def order(name):
        parts = name.split(".")
        layer = int(parts[2]) if name.startswith("model.layers.") else -1
        return (layer if name != "lm_head.weight" else 1 << 30, name)

    return dict(sorted(shapes.items(), key=lambda kv: order(kv[0])))


def _resolve_config(config) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    from k2jax.config import CONFIG_DIR, load_model_config

    path = Path(config)
    if not path.suffix:
        path = CONFIG_DIR / f"{config}.gin"
    return load_model_config(path)


class _Lazy:
    """A tensor computed when the writer asks for its bytes (np.asarray), so one at a time."""

    def __init__(self, shape, dtype, make):
        self.shape, self.dtype, self._make = tuple(shape), np.dtype(dtype), make

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self._make(), self.dtype)
        assert arr.shape == self.shape, (arr.shape, self.shape)
        return arr if dtype is None else arr.astype(dtype)


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _dense_value(name: str, shape, seed: int) -> np.ndarray:
    """The float32 value of one tensor: norms near 1, random router bias, N(0, 1/fan_in)."""
    rng = _rng(seed, name)
    x = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith(("norm.weight", "layernorm.weight")):
        return 1.0 + 0.2 * x
    if name.endswith("e_score_correction_bias"):
        return 0.1 * x
    if name == "model.embed_tokens.weight":
        return x
    if name.endswith("mlp.gate.weight"):  # router logits of a few units: decisive top-k
        return 2.0 * x / np.float32(math.sqrt(shape[-1]))
    return x / np.float32(math.sqrt(shape[-1]))


def fp8_block_quantize(w: np.ndarray, block=(128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """float32 [out, in] → (float8_e4m3fn weight, float32 weight_scale_inv [⌈out/B0⌉, ⌈in/B1⌉]),
    one scale per block = amax / 448 (DeepSeek's quantizer); partial edge blocks allowed."""
    out, inn = w.shape
    b0, b1 = block
    nr, nc = -(-out // b0), -(-inn // b1)
    pad = np.zeros((nr * b0, nc * b1), np.float32)
    pad[:out, :inn] = np.abs(w)
    amax = pad.reshape(nr, b0, nc, b1).max(axis=(1, 3))
    scale = (np.maximum(amax, 1e-12) / 448.0).astype(np.float32)
    expanded = np.repeat(np.repeat(scale, b0, 0)[:out], b1, 1)[:, :inn]
    q = np.clip(w / expanded, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def _int4_encode(w: np.ndarray, group: int) -> dict[str, np.ndarray]:
    from k2jax.conversion.formats import int4_to_hf
    from k2jax.conversion.loader import quantize_host

    return int4_to_hf(*quantize_host(w, group))


def _plan_tensors(cfg, fmt_name, seed, dtype, fp8_block, group_size):
    """name → _Lazy for every stored tensor, and the quantization_config (or None)."""
    from k2jax.conversion.formats import FP8, INT4, parse_quantization
    from k2jax.conversion.pieces import LINEAR_MODULES

    qc = None
    if fmt_name == "fp8":
        qc = {**FP8_QUANTIZATION_CONFIG, "weight_block_size": list(fp8_block)}
    elif fmt_name == "int4":
        qc = json.loads(json.dumps(INT4_QUANTIZATION_CONFIG))
        qc["config_groups"]["group_0"]["weights"]["group_size"] = group_size
    fmt = parse_quantization({"quantization_config": qc} if qc else {})
    store = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)

    @functools.lru_cache(maxsize=2)
    def encoded(name, shape):
        w = _dense_value(name + ".weight", shape, seed)
        if fmt.method == FP8:
            q, s = fp8_block_quantize(w, fp8_block)
            return {"weight": q, "weight_scale_inv": s}
        return _int4_encode(w, group_size)

    tensors: dict[str, _Lazy] = {}
    for name, shape in hf_tensor_shapes(cfg).items():
        module = name.removesuffix(".weight")
        linear = name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEAR_MODULES
        if not (linear and fmt.is_quantized(module)):
            dt = np.float32 if name.endswith("e_score_correction_bias") else store
            tensors[name] = _Lazy(shape, dt, functools.partial(_dense_value, name, shape, seed))
            continue
        out, inn = shape
        if fmt.method == FP8:
            parts = {
                "weight": ((out, inn), ml_dtypes.float8_e4m3fn),
                "weight_scale_inv": (
                    (-(-out // fp8_block[0]), -(-inn // fp8_block[1])),
                    np.float32,
                ),
            }
        elif fmt.method == INT4:
            if inn % group_size:
                raise ConfigError(f"{name}: in_features {inn} not divisible by {group_size}")
            parts = {
                "weight_packed": ((out, inn // 8), np.int32),
                "weight_scale": ((out, inn // group_size), ml_dtypes.bfloat16),
                "weight_shape": ((2,), np.int32),
            }
        for suffix, (s, dt) in parts.items():
            make = functools.partial(lambda m, sh, sf: encoded(m, sh)[sf], module, shape, suffix)
            tensors[f"{module}.{suffix}"] = _Lazy(s, dt, make)
    return tensors, qc


def make_tiny_checkpoint(
    folder: str | os.PathLike,
    format: str = "bf16",
    config: str | ModelConfig = "tiny",
    *,
    seed: int = 0,
    shards: int = 3,
    layout: str = "k2",
    dtype: str = "bfloat16",
    fp8_block: tuple[int, int] = (128, 128),
    group_size: int = 32,
    tokenizer: bool | None = None,
    overwrite: bool = False,
    vision: bool = False,
) -> Path:
    """Writes a complete Hugging Face-style Kimi checkpoint folder; returns its path.

    format:  "bf16" (every tensor in `dtype`), "fp8" (K2-Instruct: every Linear but lm_head FP8
             with `fp8_block` scales) or "int4" (K2-Thinking: routed experts compressed-tensors
             INT4 with `group_size`, the rest in `dtype`)
    config:  a preset name ("tiny", "tiny_grouped", ...), a .gin path, or a ModelConfig
    shards:  number of safetensors files (tensors in layer order, split by bytes)
    layout:  "k2" (K2 / K2-Thinking names) or "k25" (K2.5: kimi_k25 wrapper config, tensors
             prefixed `language_model.`, plus vision tensors)
    dtype:   "bfloat16" (as Kimi ships) or "float32" for the unquantized tensors
    tokenizer: write the tiny tokenizer (default: when the vocabulary holds its 1,024 ids)
    vision:  with layout "k25", a complete tiny vision tower and projector (`TINY_VISION`,
             in `dtype`) instead of a few stray vision tensors

    The folder is assembled under a temporary name and renamed into place when complete.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if vision and layout != "k25":
        raise ValueError("vision=True writes Kimi-K2.5's vision tower: it needs layout='k25'")
    from k2jax.conversion.safetensors_io import INDEX_NAME, write_safetensors

    cfg = _resolve_config(config)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty (pass overwrite=True)")
    tensors, qc = _plan_tensors(cfg, format, seed, dtype, tuple(fp8_block), group_size)
    prefix = "language_model." if layout == "k25" else ""
    tensors = {prefix + k: v for k, v in tensors.items()}
    if layout == "k25":
        vision_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
        shapes = _vision_shapes(cfg) if vision else _VISION_TENSORS
        for name, shape in shapes.items():
            make = functools.partial(_vision_value, name, shape, seed)
            tensors[name] = _Lazy(shape, vision_dtype if vision else ml_dtypes.bfloat16, make)

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        names = list(tensors)
        sizes = [math.prod(tensors[n].shape) * tensors[n].dtype.itemsize for n in names]
        total = sum(sizes)
        n_files = min(shards, len(names))
        bounds, acc = [0], 0
        for i, size in enumerate(sizes):  # cut after the tensor that crosses k/n of the bytes
            acc += size
            if len(bounds) < n_files and acc >= total * len(bounds) / n_files:
                bounds.append(i + 1)
        bounds.append(len(names))
        weight_map = {}
        for k, (a, b) in enumerate(itertools.pairwise(bounds), start=1):
            file = f"model-{k:05d}-of-{n_files:05d}.safetensors"
            write_safetensors(tmp / file, {n: tensors[n] for n in names[a:b]}, {"format": "pt"})
            weight_map.update(dict.fromkeys(names[a:b], file))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config_json = _config_json(cfg, qc, layout, vision)
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        if tokenizer or (tokenizer is None and cfg.vocab_size >= 1024):
            from k2jax.data.testing import write_tiny_tokenizer

            vocab = write_tiny_tokenizer(tmp)
            if vocab > cfg.vocab_size:
                raise ConfigError(
                    f"the tiny tokenizer has {vocab} ids but the model embeds {cfg.vocab_size}"
                )
        tmp.chmod(0o755)  # mkdtemp's 0700 is for the work in progress only
        if folder.exists():
            shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _vision_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the TINY_VISION tower, by released name (conversion/vision_loader.py)."""
    v = TINY_VISION
    d, p, inner = v["vt_hidden_size"], v["patch_size"], v["vt_intermediate_size"]
    merged = d * v["merge_kernel_size"][0] * v["merge_kernel_size"][1]
    out = {
        "vision_tower.patch_embed.proj.weight": (d, 3, p, p),
        "vision_tower.patch_embed.proj.bias": (d,),
        "vision_tower.patch_embed.pos_emb.weight": (
            v["init_pos_emb_height"],
            v["init_pos_emb_width"],
            d,
        ),
    }
    for n in range(v["vt_num_hidden_layers"]):
        b = f"vision_tower.encoder.blocks.{n}"
        for module, (rows, cols) in {
            "wqkv": (3 * d, d),
            "wo": (d, d),
            "mlp.fc0": (inner, d),
            "mlp.fc1": (d, inner),
        }.items():
            out[f"{b}.{module}.weight"] = (rows, cols)
            out[f"{b}.{module}.bias"] = (rows,)
        for norm in ("norm0", "norm1"):
            out[f"{b}.{norm}.weight"] = out[f"{b}.{norm}.bias"] = (d,)
    for name, width in (
        ("vision_tower.encoder.final_layernorm", d),
        ("mm_projector.pre_norm", d),
    ):
        out[f"{name}.weight"] = out[f"{name}.bias"] = (width,)
    out["mm_projector.proj.0.weight"] = (merged, merged)
    out["mm_projector.proj.0.bias"] = (merged,)
    out["mm_projector.proj.2.weight"] = (cfg.hidden_size, merged)
    out["mm_projector.proj.2.bias"] = (cfg.hidden_size,)
    return out


def _vision_value(name: str, shape, seed: int) -> np.ndarray:
    """LayerNorm weights near 1, small biases, N(0, 1/fan_in) weights (a conv's fan-in is
    3·P·P)."""
    x = _rng(seed, name).standard_normal(shape, dtype=np.float32)
    if name.endswith(".bias"):
        return 0.02 * x
    if "norm" in name:
        return 1.0 + 0.2 * x
    return x / np.float32(math.sqrt(math.prod(shape[1:]) if len(shape) == 4 else shape[-1]))


def _config_json(cfg: ModelConfig, qc: dict | None, layout: str, vision: bool = False) -> dict:
    text = cfg.to_hf_dict()
    text["model_type"] = "kimi_k2"
    text["auto_map"] = {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    }
    if qc is not None:
        text["quantization_config"] = qc
    if layout == "k2":
        return text
    media = {}
    if vision:
        media = {"media_placeholder_token_id": _TINY_IMAGE_TOKEN}
    return {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "text_config": text,
        "vision_config": dict(TINY_VISION)
        if vision
        else {"patch_size": 14, "vt_hidden_size": 16, "vt_num_hidden_layers": 1},
        **media,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
