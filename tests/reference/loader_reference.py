"""Torch reference for the loader tests; runs in .venv-ref (Python 3.11, torch, transformers,
compressed-tensors).

    python loader_reference.py build --spec spec.json --out DIR

From one transformers DeepseekV3ForCausalLM with seeded random weights it writes the checkpoint
folders Kimi ships, each with the formats' own tools, plus the logits transformers computes (in
float32) on exactly the weights each folder encodes:

  DIR/bf16   every tensor bf16 (router bias float32), per-expert names as save_pretrained writes
  DIR/int4   Kimi-K2-Thinking: routed experts quantised (calculate_qparams) and packed by
             compressed-tensors' PackedQuantizationCompressor (pack_to_int32), its
             quantization_config with the K2-Thinking ignore list; the rest bf16
  DIR/fp8    Kimi-K2-Instruct: every Linear but lm_head as torch.float8_e4m3fn with float32
             block scales (partial edge blocks), the rest bf16
  DIR/k25    the int4 checkpoint in Kimi-K2.5's layout: `kimi_k25` wrapper config with the text
             config (and quantization_config) in text_config, `language_model.` prefixes, and
             vision-tower / projector tensors

The HF model of the int4 (and k25) case runs on the experts as compressed-tensors' own decompress
returns them (with float32 scales, so q × scale is exact); the fp8 case on transformers'
_dequantize_fp8_weight in float32. Also, for checkpoints written by k2jax.testing
(spec "tiny": {name: folder}), it reads the folder with safetensors' torch loader, decodes it
with the same tools and writes the logits transformers computes — the check that
make_tiny_checkpoint writes what Hugging Face tooling reads.

DIR/outputs.npz (np.savez, no pickles): logits.<case>, and for the int4 case the codes
compressed-tensors' unpack_from_int32 returns and the scales, per expert tensor (ct.<name>.codes,
ct.<name>.scale).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from hf_model import randomize

K2T_IGNORE = [
    "lm_head",
    "re:.*self_attn.*",
    "re:.*shared_experts.*",
    "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
]
LINEAR = (
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


# K2-Thinking's quantization_config (and K2-Instruct's, fp8_config below). k2jax.testing's
# INT4_/FP8_QUANTIZATION_CONFIG are the library's copies; this script runs in .venv-ref (torch,
# no jax), which cannot import k2jax.
def int4_config(group: int) -> dict:
    return {
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
                    "group_size": group,
                    "dynamic": False,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "actorder": None,
                    "block_structure": None,
                },
            }
        },
        "ignore": K2T_IGNORE,
    }


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEAR


def is_expert(name: str) -> bool:
    return ".mlp.experts." in name and is_linear(name)


def write_folder(folder: Path, tensors: dict, config: dict, shards: int = 3) -> None:
    """Tensors in `shards` files with safetensors' torch writer, the index and config.json."""
    folder.mkdir(parents=True)
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        part = names[k * per : (k + 1) * per]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, folder / file, {"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def hf_logits(config: dict, weights: dict, tokens) -> np.ndarray:
    """transformers' float32 logits with exactly these (per-expert named) weights."""
    with tempfile.TemporaryDirectory() as tmp:
        save_file(
            {k: v.float().contiguous() for k, v in weights.items()}, f"{tmp}/model.safetensors"
        )
        hf = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")}
        hf.pop("model_type", None)
        DeepseekV3Config(**hf).save_pretrained(tmp)
        model = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


def ct_compress(w: torch.Tensor, group: int) -> dict:
    """compressed-tensors' own INT4 compression of one weight (as llm-compressor writes it)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    scheme = QuantizationConfig.model_validate(int4_config(group)).config_groups["group_0"]
    grouped = w.unflatten(-1, (w.shape[-1] // group, group))
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), scheme.weights)
    out = PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme
    )
    out["weight_shape"] = out["weight_shape"].to(torch.int32)  # Kimi's files: int32
    return out


def ct_decompress(stored: dict, group: int) -> torch.Tensor:
    """compressed-tensors' decompress with float32 scales: q × scale, exact."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    scheme = QuantizationConfig.model_validate(int4_config(group)).config_groups["group_0"]
    state = {**stored, "weight_scale": stored["weight_scale"].float()}
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]


def fp8_quantize(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weight + float32 scale_inv per block (amax / 448), partial edges cropped."""
    b0, b1 = block
    rows, cols = w.shape
    nr, nc = -(-rows // b0), -(-cols // b1)
    pad = torch.zeros(nr * b0, nc * b1)
    pad[:rows, :cols] = w
    amax = pad.abs().reshape(nr, b0, nc, b1).amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = (amax / 448.0).float()
    expanded = scale_inv.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
    return (w / expanded).clamp(-448, 448).to(torch.float8_e4m3fn), scale_inv


def fp8_dequantize(wq, scale_inv, block) -> torch.Tensor:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    return _dequantize_fp8_weight(wq, scale_inv, list(block), torch.float32)


def build(spec: dict, out: Path) -> None:
    torch.set_grad_enabled(False)
    arrays: dict[str, np.ndarray] = {}
    cfg = spec["config"]
    group, block = spec["group_size"], spec["fp8_block"]
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).float().eval()
    randomize(model, spec["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # per-expert names, as on disk
        state = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            state.update(load_file(f))
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in state), sorted(state)[:20]
    state = {n: t for n, t in state.items() if not n.endswith("inv_freq")}
    kimi = {**cfg, "model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"]}

    # bf16: every tensor rounded to bf16 (the router's correction bias stays float32).
    bf16 = {
        n: t if n.endswith("e_score_correction_bias") else t.bfloat16() for n, t in state.items()
    }
    write_folder(out / "bf16", bf16, kimi)
    arrays["logits.bf16"] = hf_logits(cfg, bf16, spec["tokens"])

    # int4: the routed experts compressed by compressed-tensors from the bf16 weights.
    int4, int4_effective = {}, {}
    for n, t in bf16.items():
        if not is_expert(n):
            int4[n] = int4_effective[n] = t
            continue
        module = n.removesuffix(".weight")
        stored = ct_compress(t, group)
        for suffix, v in stored.items():
            int4[f"{module}.{suffix}"] = v
        int4_effective[n] = ct_decompress(stored, group)
        from compressed_tensors.compressors import unpack_from_int32

        codes = unpack_from_int32(stored["weight_packed"], 4, stored["weight_shape"])
        arrays[f"ct.{n}.codes"] = codes.numpy().astype(np.int8)
        arrays[f"ct.{n}.scale"] = stored["weight_scale"].float().numpy()
    write_folder(out / "int4", int4, {**kimi, "quantization_config": int4_config(group)})
    arrays["logits.int4"] = hf_logits(cfg, int4_effective, spec["tokens"])

    # k25: the same tensors in Kimi-K2.5's wrapper layout, plus vision tensors to skip.
    k25 = {f"language_model.{n}": t for n, t in int4.items()}
    g = torch.Generator().manual_seed(7)
    k25["vision_tower.patch_embed.proj.weight"] = torch.randn(8, 3, 14, 14, generator=g).bfloat16()
    k25["vision_tower.encoder.blocks.0.wqkv.weight"] = torch.randn(24, 8, generator=g).bfloat16()
    k25["mm_projector.proj.0.weight"] = torch.randn(32, 32, generator=g).bfloat16()
    text = {**kimi, "quantization_config": int4_config(group)}
    wrapper = {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "text_config": text,
        "vision_config": {"patch_size": 14, "vt_hidden_size": 8},
        "tie_word_embeddings": False,
    }
    write_folder(out / "k25", k25, wrapper, shards=4)

    # fp8: every Linear but lm_head as float8_e4m3fn with float32 block scales.
    fp8, fp8_effective = {}, {}
    for n, t in state.items():
        if is_linear(n):
            wq, s = fp8_quantize(t, block)
            module = n.removesuffix(".weight")
            fp8[n], fp8[f"{module}.weight_scale_inv"] = wq, s
            fp8_effective[n] = fp8_dequantize(wq, s, block)
        else:
            fp8[n] = fp8_effective[n] = bf16[n]
    fp8_config = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    write_folder(out / "fp8", fp8, {**kimi, "quantization_config": fp8_config})
    arrays["logits.fp8"] = hf_logits(cfg, fp8_effective, spec["tokens"])

    for name, folder in spec.get("tiny", {}).items():
        arrays[f"logits.tiny_{name}"] = logits_of_folder(Path(folder), spec["tiny_tokens"])
    np.savez(out / "outputs.npz", **arrays)
    print(f"built {len(arrays)} arrays")


def logits_of_folder(folder: Path, tokens) -> np.ndarray:
    """Reads a k2jax-written checkpoint with the formats' own tools; transformers' logits."""
    config = json.loads((folder / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    stored = {}
    for shard in sorted(set(index["weight_map"].values())):
        stored.update(load_file(folder / shard))
    weights = {}
    for n, t in stored.items():
        if n.endswith(".weight_packed"):
            module = n.removesuffix(".weight_packed")
            group = qc["config_groups"]["group_0"]["weights"]["group_size"]
            parts = {
                s: stored[f"{module}.{s}"]
                for s in ("weight_packed", "weight_scale", "weight_shape")
            }
            weights[f"{module}.weight"] = ct_decompress(parts, group)
        elif n.endswith(".weight_scale_inv"):
            module = n.removesuffix(".weight_scale_inv")
            block = qc["weight_block_size"]
            weights[f"{module}.weight"] = fp8_dequantize(stored[f"{module}.weight"], t, block)
        elif n.endswith((".weight_scale", ".weight_shape")) or n in weights:
            continue
        elif n.endswith(".weight") and f"{n.removesuffix('.weight')}.weight_scale_inv" in stored:
            continue  # decoded with its scale
        else:
            weights[n] = t.float()
    return hf_logits(config, weights, tokens)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--spec", required=True)
    b.add_argument("--out", required=True)
    args = ap.parse_args()
    build(json.loads(Path(args.spec).read_text()), Path(args.out))


if __name__ == "__main__":
    main()
