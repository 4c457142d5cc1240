"""Torch-side reference for the checkpoint format tests; runs in .venv-ref (Python 3.11).

    python formats_reference.py safetensors DIR
    python formats_reference.py formats DIR

Everything here uses the formats' own tools — safetensors' torch reader/writer, compressed-tensors'
packing, compressor and name matching, torch's float8_e4m3fn and transformers' FP8 dequantisation —
so the k2jax tests compare our hand-written numpy code against them, not against itself.

`safetensors DIR`:
  reads DIR/ours.safetensors (written by k2jax) and every shard of the checkpoint DIR/sharded
  with safetensors' torch loader → DIR/ours_as_read.json (dtype, shape, values, metadata);
  writes DIR/theirs.safetensors with safetensors' torch writer (every dtype, seeded values, edge
  cases) and DIR/theirs.json with the values it wrote.

`formats DIR` (inputs DIR/request.json and DIR/inputs.safetensors, written by the test):
  INT4: compressed-tensors pack_to_int32 of the test's codes, unpack_from_int32 of k2jax's packed
  words; a Kimi-K2-Thinking pack-quantized weight built with PackedQuantizationCompressor.compress
  (scales from compressed-tensors' calculate_qparams) and its decompress output.
  FP8: float8_e4m3fn weights with 128×128 block scales (partial edge blocks), the explicit
  W.float() × scale_inv expansion and transformers' own _dequantize_fp8_weight.
  Matching: compressed-tensors is_match / match_quantizable_tensors and transformers
  should_convert_module on the test's module names.
  → DIR/outputs.safetensors (torch writer) and DIR/results.json.

JSON values are exact: bf16/fp8/f16 values are representable in float64, integers stay integers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def to_json(t: torch.Tensor) -> dict:
    values = t.to(torch.float64).tolist() if t.dtype in FLOATS + FP8 else t.tolist()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "values": values}


def read_with_safetensors(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    return {"metadata": metadata, "tensors": {k: to_json(v) for k, v in load_file(path).items()}}


def their_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    out: dict[str, torch.Tensor] = {}
    for dt in FLOATS:
        out[f"float.{dt}"] = (torch.randn(5, 7, generator=g) * 3).to(dt)
    out["float.specials.f32"] = torch.tensor([0.0, -0.0, 1e-40, -3.5e38, 1.0 / 3.0])
    for dt in FP8:
        x = (torch.randn(4, 6, generator=g) * 40).clamp(-448, 448)
        out[f"fp8.{dt}"] = x.to(dt)
    out["fp8.specials"] = torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0**-9, 0.01]).to(
        torch.float8_e4m3fn
    )
    for dt, lo, hi in [
        (torch.int8, -128, 127),
        (torch.uint8, 0, 255),
        (torch.int16, -(2**15), 2**15 - 1),
        (torch.uint16, 0, 2**16 - 1),
        (torch.int32, -(2**31), 2**31 - 1),
        (torch.uint32, 0, 2**32 - 1),
        (torch.int64, -(2**63), 2**63 - 1),
        (torch.uint64, 0, 2**64 - 1),
    ]:
        vals = torch.randint(max(lo, -1000), min(hi, 1000), (13,), generator=g).to(dt)
        out[f"int.{dt}"] = torch.cat([torch.tensor([lo, hi], dtype=dt), vals]).reshape(3, 5)
    out["bool"] = torch.tensor([[True, False, True], [False, False, True]])
    out["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    out["empty"] = torch.zeros(0, 3, dtype=torch.float32)
    out["rank3.bf16"] = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5).to(torch.bfloat16)
    return out


def cmd_safetensors(d: Path) -> None:
    result = {"ours": read_with_safetensors(d / "ours.safetensors"), "sharded": {}}
    index = json.loads((d / "sharded" / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        result["sharded"][shard] = read_with_safetensors(d / "sharded" / shard)
    (d / "ours_as_read.json").write_text(json.dumps(result))

    theirs = their_tensors()
    save_file(theirs, d / "theirs.safetensors", metadata={"format": "pt", "made_by": "torch"})
    (d / "theirs.json").write_text(json.dumps({k: to_json(v) for k, v in theirs.items()}))


def int4_cases(request: dict, inputs: dict, out: dict) -> None:
    from compressed_tensors.compressors import (
        PackedQuantizationCompressor,
        pack_to_int32,
        unpack_from_int32,
    )
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    for key in ("q2d", "q3d"):
        q = inputs[key]
        out[f"ct_pack.{key}"] = pack_to_int32(q, 4)
        out[f"ct_unpack.{key}"] = unpack_from_int32(inputs[f"ours_packed.{key}"], 4, q.shape)

    config = QuantizationConfig.model_validate(request["quantization_config"])
    scheme = config.config_groups["group_0"]
    args = scheme.weights
    for key in request["dense_keys"]:
        w = inputs[key]
        grouped = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
        scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        compressed = PackedQuantizationCompressor.compress(
            {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}, scheme
        )
        assert set(compressed) == {"weight_packed", "weight_scale", "weight_shape"}, compressed
        for name, t in compressed.items():
            out[f"ct.{key}.{name}"] = t
        out[f"ct.{key}.weight"] = PackedQuantizationCompressor.decompress(compressed, scheme)[
            "weight"
        ]


def fp8_cases(request: dict, out: dict) -> None:
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    b0, b1 = request["fp8_block"]
    g = torch.Generator().manual_seed(99)
    for i, (rows, cols) in enumerate(request["fp8_shapes"]):
        w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.1
        nr, nc = -(-rows // b0), -(-cols // b1)
        # Per-block scale = amax / 448 (DeepSeek's quantizer), varied so every block differs.
        pad = torch.zeros(nr * b0, nc * b1)
        pad[:rows, :cols] = w
        amax = pad.abs().reshape(nr, b0, nc, b1).amax(dim=(1, 3)).clamp(min=1e-12)
        scale_inv = (amax / 448.0).float()
        expanded = scale_inv.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
        wq = (w / expanded).clamp(-448, 448).to(torch.float8_e4m3fn)
        expected = wq.float() * expanded
        out[f"fp8.{i}.weight"] = wq
        out[f"fp8.{i}.weight_scale_inv"] = scale_inv
        out[f"fp8.{i}.expected_f32"] = expected
        out[f"fp8.{i}.expected_bf16"] = expected.to(torch.bfloat16)
        out[f"fp8.{i}.transformers_f32"] = _dequantize_fp8_weight(
            wq, scale_inv, [b0, b1], torch.float32
        )


def matching(request: dict) -> dict:
    from compressed_tensors.utils.match import is_match, match_quantizable_tensors
    from transformers.quantizers.quantizers_utils import should_convert_module

    linear, other = torch.nn.Linear(1, 1), torch.nn.Module()
    modules = request["modules"]
    results: dict = {"is_match": {}, "model_free": {}}
    for key, ignore in request["ignore_lists"].items():
        results["is_match"][key] = [
            is_match(name, linear if is_linear else other, ["Linear"], ignore)
            for name, is_linear in modules
        ]
        tensors = {f"{name}.weight": None for name, is_linear in modules if is_linear}
        hits = {m for m, _ in match_quantizable_tensors(tensors, ignore, ["Linear"])}
        results["model_free"][key] = {
            name: name in hits for name, is_linear in modules if is_linear
        }
    results["should_convert"] = {
        json.dumps(patterns): [should_convert_module(n, patterns) for n, _ in modules]
        for patterns in request["fp8_skip_patterns"]
    }
    return results


def cmd_formats(d: Path) -> None:
    request = json.loads((d / "request.json").read_text())
    inputs = load_file(d / "inputs.safetensors")
    out: dict[str, torch.Tensor] = {}
    int4_cases(request, inputs, out)
    fp8_cases(request, out)
    save_file({k: v.contiguous() for k, v in out.items()}, d / "outputs.safetensors")
    (d / "results.json").write_text(json.dumps(matching(request)))


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    {"safetensors": cmd_safetensors, "formats": cmd_formats}[command](folder)
