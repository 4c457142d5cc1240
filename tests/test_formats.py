"""FP8 / INT4 decoding and quantization_config parsing against the formats' own tools.

One reference subprocess per module (tests/reference/formats_reference.py in .venv-ref) produces,
with compressed-tensors 0.20, torch and transformers: packed INT4 words for our codes, unpacked
codes for our words, a Kimi-K2-Thinking pack-quantized weight and its decompression, FP8 weights
with partial edge blocks and their dequantisation, and compressed-tensors' / transformers' verdicts
on which modules are quantized. Our results must match bit for bit.
"""

from __future__ import annotations

import copy
import json

import helpers
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from k2jax.conversion import formats
from k2jax.conversion.formats import (
    FP8,
    INT4,
    NONE,
    QuantizationConfigError,
    WeightFormat,
    dequantize_fp8_block,
    dequantize_int4,
    int4_from_hf,
    int4_to_hf,
    int4_weight_from_hf,
    pack_int4,
    parse_quantization,
    unpack_int4,
)
from k2jax.conversion.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from k2jax.quant import Int4Weight, dequantize, quantize_int4

# ---------------------------------------------------------------------------------------------
# Kimi's configs (K2_FACTS §1.1–1.3, §2.3). Written out here rather than taken from
# k2jax.testing (FP8_/INT4_QUANTIZATION_CONFIG, what the test checkpoints carry): these tests are
# the independent oracle for parse_quantization, so they must not share the library's copy.

K2_FP8 = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
K2T_IGNORE = [
    "lm_head",
    "re:.*self_attn.*",
    "re:.*shared_experts.*",
    "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
]
K25_IGNORE = list(K2T_IGNORE)
K26_IGNORE = [
    "re:.*self_attn.*",
    "re:.*shared_experts.*",
    "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
    "re:.*lm_head.*",
    "re:vision_tower.*",
    "re:mm_projector.*",
]


def ct_config(ignore=K2T_IGNORE, **weights) -> dict:
    """A compressed-tensors quantization_config as Kimi-K2-Thinking / K2.5 ship it."""
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
                    "group_size": 32,
                    "dynamic": False,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "actorder": None,
                    "block_structure": None,
                }
                | weights,
            }
        },
        "ignore": list(ignore),
    }


# Real module names (K2_FACTS §2.1), whether each is an nn.Linear, and whether Kimi's INT4
# checkpoints store it quantized: only the routed experts are.
MODULES = [
    ("model.embed_tokens", False, False),
    ("model.layers.0.self_attn.q_a_proj", True, False),
    ("model.layers.0.self_attn.q_b_proj", True, False),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa", True, False),
    ("model.layers.0.self_attn.kv_b_proj", True, False),
    ("model.layers.0.self_attn.o_proj", True, False),
    ("model.layers.0.mlp.gate_proj", True, False),
    ("model.layers.0.mlp.up_proj", True, False),
    ("model.layers.0.mlp.down_proj", True, False),
    ("model.layers.1.mlp.gate", False, False),
    ("model.layers.1.mlp.shared_experts.gate_proj", True, False),
    ("model.layers.1.mlp.shared_experts.up_proj", True, False),
    ("model.layers.1.mlp.shared_experts.down_proj", True, False),
    ("model.layers.1.mlp.experts.0.gate_proj", True, True),
    ("model.layers.1.mlp.experts.0.up_proj", True, True),
    ("model.layers.1.mlp.experts.0.down_proj", True, True),
    ("model.layers.37.self_attn.kv_b_proj", True, False),
    ("model.layers.60.mlp.experts.383.gate_proj", True, True),
    ("model.layers.60.mlp.experts.383.down_proj", True, True),
    ("model.layers.60.mlp.shared_experts.down_proj", True, False),
    ("lm_head", True, False),
]
# Exercises the finer points of compressed-tensors' rule: "re:" matches at the start only
# (re.match, not fullmatch or search), plain entries match whole names only.
CUSTOM_IGNORE = [
    "re:model\\.layers\\.1\\.",
    "re:experts\\.0",
    "model.layers.60",
    "model.layers.60.mlp.experts.383.down_proj",
]
FP8_SKIP_PATTERNS = [["lm_head"], ["model.layers.1"], ["re.*"], ["gate"], ["layers.*.self_attn"]]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats_ref")
    rng = np.random.default_rng(0)
    q2d = rng.integers(-8, 8, (48, 256)).astype(np.int8)
    q2d[0, :16] = np.arange(-8, 8)  # every code, in order, in row 0
    q3d = rng.integers(-8, 8, (3, 16, 64)).astype(np.int8)
    dense = {  # Kimi expert shapes with fewer output rows: gate/up [., 7168], down [., 2048]
        "dense.gate": rng.standard_normal((16, 7168)) * 0.02,
        "dense.down": rng.standard_normal((24, 2048)) * np.linspace(0.001, 0.1, 24)[:, None],
    }
    dense = {k: v.astype(ml_dtypes.bfloat16) for k, v in dense.items()}
    dense["dense.down"][3, 32:64] = 0  # an all-zero group
    inputs = {
        "q2d": q2d,
        "q3d": q3d,
        "ours_packed.q2d": pack_int4(q2d),
        "ours_packed.q3d": pack_int4(q3d),
        **dense,
    }
    write_safetensors(d / "inputs.safetensors", inputs)
    request = {
        "quantization_config": ct_config(),
        "dense_keys": list(dense),
        "fp8_block": [128, 128],
        "fp8_shapes": [[300, 200], [256, 384], [1, 129], [576, 7168]],
        "modules": [[name, linear] for name, linear, _ in MODULES],
        "ignore_lists": {"k2t": K2T_IGNORE, "k26": K26_IGNORE, "custom": CUSTOM_IGNORE},
        "fp8_skip_patterns": FP8_SKIP_PATTERNS,
    }
    helpers.write_json(d / "request.json", request)
    helpers.run_reference("formats_reference.py", "formats", d)
    out = SafetensorsFile(d / "outputs.safetensors")  # F8_E4M3 inside: our reader is needed
    return {
        "inputs": inputs,
        "out": {k: out.read(k) for k in out},
        "results": json.loads((d / "results.json").read_text()),
        "request": request,
    }


# ---------------------------------------------------------------------------------------------
# INT4 against compressed-tensors


@pytest.mark.parametrize("key", ["q2d", "q3d"])
def test_int4_packing_matches_compressed_tensors(ref, key):
    q, out = ref["inputs"][key], ref["out"]
    theirs = out[f"ct_pack.{key}"]
    assert theirs.dtype == np.int32
    np.testing.assert_array_equal(pack_int4(q), theirs)  # our pack == pack_to_int32
    np.testing.assert_array_equal(unpack_int4(theirs, q.shape[-1]), q)  # our unpack of theirs
    np.testing.assert_array_equal(out[f"ct_unpack.{key}"], q)  # their unpack of ours


def test_int4_known_words():
    """Codes −8..7 in order pack to 0x76543210, 0xfedcba98 (compressed-tensors' layout)."""
    words = pack_int4(np.arange(-8, 8, dtype=np.int8)[None])
    assert [int(w) & 0xFFFFFFFF for w in words[0]] == [0x76543210, 0xFEDCBA98]
    np.testing.assert_array_equal(unpack_int4(words, 16)[0], np.arange(-8, 8))


@pytest.mark.parametrize("key", ["dense.gate", "dense.down"])
def test_int4_weight_matches_compressed_tensors_decompression(ref, key):
    out = ref["out"]
    packed, scale, shape = (
        out[f"ct.{key}.{s}"] for s in ("weight_packed", "weight_scale", "weight_shape")
    )
    assert (
        shape.dtype == np.int64 and scale.dtype == ml_dtypes.bfloat16
    )  # as compressed-tensors writes
    w = int4_weight_from_hf(packed, scale, shape, 32, name=key)
    assert isinstance(w, Int4Weight) and w.values.dtype == ml_dtypes.int4
    assert w.shape == ref["inputs"][key].shape and w.group_size == 32
    theirs = out[f"ct.{key}.weight"]
    assert theirs.dtype == ml_dtypes.bfloat16
    ours = np.asarray(dequantize(Int4Weight(jnp.asarray(w.values), jnp.asarray(w.scales))))
    np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16))
    codes, scales = int4_from_hf(packed, scale, shape.astype(np.int32), 32)  # Kimi's int32 shape
    host = dequantize_int4(codes, scales)
    np.testing.assert_array_equal(host.view(np.uint16), theirs.view(np.uint16))


@pytest.mark.parametrize("key", ["dense.gate", "dense.down"])
def test_quantize_int4_against_compressed_tensors_compression(ref, key):
    """k2jax.quant.quantize_int4 + int4_to_hf against compressed-tensors' compressor.

    Scales agree bit for bit (absmax / 7.5 rounded to bf16). Codes agree except near rounding
    ties: compressed-tensors divides a bf16 weight by its scale *in bf16*, rounding the quotient
    before rounding to an integer, while quantize_int4 divides in float32 — so a quotient within
    bf16 precision of k + 0.5 may land one code apart. All-zero groups: compressed-tensors stores
    bf16 eps as the scale, quantize_int4 stores 0 (both decode to zeros).
    """
    out = ref["out"]
    x = ref["inputs"][key]
    q = quantize_int4(jnp.asarray(x), 32)
    stored = int4_to_hf(np.asarray(q.values), np.asarray(q.scales))
    np.testing.assert_array_equal(stored["weight_shape"], out[f"ct.{key}.weight_shape"])
    assert stored["weight_shape"].dtype == np.int32  # Kimi's files; compressed-tensors: int64

    ours_s = stored["weight_scale"].astype(np.float32)
    ct_s = out[f"ct.{key}.weight_scale"].astype(np.float32)
    zero_group = ours_s == 0
    np.testing.assert_array_equal(ours_s[~zero_group], ct_s[~zero_group])
    np.testing.assert_array_equal(ct_s[zero_group], float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps))

    ours_q = unpack_int4(stored["weight_packed"], x.shape[-1]).astype(np.int32)
    ct_q = unpack_int4(out[f"ct.{key}.weight_packed"], x.shape[-1]).astype(np.int32)
    quotient = x.astype(np.float32) / np.repeat(np.where(zero_group, 1, ours_s), 32, axis=1)
    near_tie = np.abs(np.abs(quotient - np.floor(quotient)) - 0.5) <= 2.0**-6
    assert np.abs(ours_q - ct_q).max() <= 1
    np.testing.assert_array_equal(ours_q[~near_tie], ct_q[~near_tie])


# ---------------------------------------------------------------------------------------------
# FP8 against torch / transformers


@pytest.mark.parametrize("case", range(4))
def test_fp8_dequant_matches_torch(ref, case, monkeypatch):
    out = ref["out"]
    w, s = out[f"fp8.{case}.weight"], out[f"fp8.{case}.weight_scale_inv"]
    assert w.dtype == ml_dtypes.float8_e4m3fn and s.dtype == np.float32
    assert s.shape == formats.fp8_scale_shape(w.shape)
    expected = out[f"fp8.{case}.expected_f32"]
    np.testing.assert_array_equal(out[f"fp8.{case}.transformers_f32"], expected)
    np.testing.assert_array_equal(dequantize_fp8_block(w, s, out_dtype=np.float32), expected)
    bf16 = dequantize_fp8_block(w, s)
    assert bf16.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        bf16.view(np.uint16), out[f"fp8.{case}.expected_bf16"].view(np.uint16)
    )
    monkeypatch.setattr(formats, "_FP8_CHUNK_ELEMENTS", 1)  # one 128-row block per chunk
    np.testing.assert_array_equal(dequantize_fp8_block(w, s, out_dtype=np.float32), expected)


def test_fp8_errors():
    w = np.zeros((300, 200), ml_dtypes.float8_e4m3fn)
    with pytest.raises(
        CheckpointError, match=r"q_b_proj: weight_scale_inv has shape \[2, 2\].*needs \[3, 2\]"
    ):
        dequantize_fp8_block(w, np.ones((2, 2), np.float32), name="q_b_proj")
    with pytest.raises(CheckpointError, match="dtype float32, expected float8_e4m3fn"):
        dequantize_fp8_block(w.astype(np.float32), np.ones((3, 2), np.float32))
    with pytest.raises(CheckpointError, match="expected a 2-D"):
        dequantize_fp8_block(w[0], np.ones((1, 2), np.float32))
    with pytest.raises(CheckpointError, match="weight_scale_inv dtype int32"):
        dequantize_fp8_block(w, np.ones((3, 2), np.int32))


# ---------------------------------------------------------------------------------------------
# Which modules are quantized


@pytest.mark.parametrize("key", ["k2t", "k26", "custom"])
def test_ignore_matching_agrees_with_compressed_tensors(ref, key):
    fmt = parse_quantization(
        {"quantization_config": ct_config(ref["request"]["ignore_lists"][key])}
    )
    ours = [fmt.is_quantized(name, linear=linear) for name, linear, _ in MODULES]
    assert ours == ref["results"]["is_match"][key]
    model_free = ref["results"]["model_free"][key]
    assert {n: fmt.is_quantized(n) for n, linear, _ in MODULES if linear} == model_free


def test_fp8_skip_rule_agrees_with_transformers(ref):
    for patterns in FP8_SKIP_PATTERNS:
        fmt = WeightFormat(FP8, block_size=(128, 128), ignore=tuple(patterns))
        theirs = ref["results"]["should_convert"][json.dumps(patterns)]
        for (name, _, _), convert in zip(MODULES, theirs):
            assert fmt.is_quantized(name) == (convert and name != "lm_head"), (patterns, name)


@pytest.mark.parametrize(
    "config, prefix",
    [
        ({"quantization_config": ct_config(K2T_IGNORE)}, ""),  # K2-Thinking
        ({"text_config": {"quantization_config": ct_config(K25_IGNORE)}}, ""),  # K2.5, unprefixed
        ({"text_config": {"quantization_config": ct_config(K25_IGNORE)}}, "language_model."),
        ({"text_config": {"quantization_config": ct_config(K26_IGNORE)}}, "language_model."),
    ],
)
def test_kimi_int4_checkpoints_quantize_only_routed_experts(config, prefix):
    fmt = parse_quantization(config)
    assert fmt.method == INT4 and fmt.group_size == 32
    for name, linear, quantized in MODULES:
        assert fmt.is_quantized(prefix + name, linear=linear) == quantized, prefix + name
        want = ("weight_packed", "weight_scale", "weight_shape") if quantized else ("weight",)
        assert fmt.stored_suffixes(prefix + name, linear=linear) == want


def test_kimi_fp8_checkpoint_quantizes_every_linear_but_lm_head():
    fmt = parse_quantization({"quantization_config": K2_FP8, "torch_dtype": "bfloat16"})
    assert fmt == WeightFormat(FP8, block_size=(128, 128))
    for name, linear, _ in MODULES:
        assert fmt.is_quantized(name, linear=linear) == (linear and name != "lm_head"), name
    assert fmt.stored_suffixes("model.layers.0.self_attn.q_a_proj") == (
        "weight",
        "weight_scale_inv",
    )


def test_unquantized_config():
    fmt = parse_quantization({"model_type": "kimi_k2", "hidden_size": 64})
    assert fmt == WeightFormat(NONE)
    assert not fmt.is_quantized("model.layers.1.mlp.experts.0.gate_proj")
    assert parse_quantization({"text_config": {}}).method == NONE


# ---------------------------------------------------------------------------------------------
# quantization_config errors


def _mutated(path: str, value):
    """The K2-Thinking config with config["quantization_config"][path...] = value (None deletes)."""
    config = {"quantization_config": ct_config()}
    node = config["quantization_config"]
    *parents, leaf = path.split("/")
    for p in parents:
        node = node[p]
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return config


W = "config_groups/group_0/weights/"
BAD_CONFIGS = {
    "unknown method": (
        {"quantization_config": {"quant_method": "gptq", "bits": 4}},
        "quant_method 'gptq' is not supported",
    ),
    "missing method": ({"quantization_config": {}}, "quant_method None is not supported"),
    "unknown format": (_mutated("format", "marlin-24"), "format 'marlin-24' is not supported"),
    "float-quantized": (_mutated("format", "float-quantized"), "expected 'pack-quantized'"),
    "asymmetric": (
        _mutated(W + "symmetric", False),
        "symmetric is False, expected True (asymmetric",
    ),
    "num_bits 8": (_mutated(W + "num_bits", 8), "num_bits is 8, expected 4"),
    "float type": (_mutated(W + "type", "float"), "type is 'float', expected 'int'"),
    "channel strategy": (
        _mutated(W + "strategy", "channel"),
        "strategy is 'channel', expected 'group'",
    ),
    "actorder": (_mutated(W + "actorder", "group"), "actorder 'group': activation ordering"),
    "no group size": (_mutated(W + "group_size", None), "group_size must be a positive integer"),
    "group size 12": (_mutated(W + "group_size", 12), "group_size 12 is not a multiple of 8"),
    "dynamic": (_mutated(W + "dynamic", True), "dynamic True"),
    "activations": (
        _mutated("config_groups/group_0/input_activations", {"num_bits": 8}),
        "input_activations are quantized",
    ),
    "status frozen": (_mutated("quantization_status", "frozen"), "not stored compressed"),
    "kv cache": (_mutated("kv_cache_scheme", {"num_bits": 8}), "kv_cache_scheme is set"),
    "no groups": (_mutated("config_groups", {}), "config_groups must be a non-empty object"),
    "no weights": (_mutated("config_groups/group_0/weights", None), "missing (weight quantization"),
    "bad regex": (_mutated("ignore", ["re:model.(layers"]), "bad regex 're:model.(layers'"),
    "fp8 e5m2": (
        {"quantization_config": {**K2_FP8, "fmt": "e5m2"}},
        "fmt 'e5m2' is not supported",
    ),
    "fp8 per-tensor": (
        {"quantization_config": {**K2_FP8, "weight_block_size": None}},
        "only block-scaled FP8",
    ),
    "fp8 bad block": (
        {"quantization_config": {**K2_FP8, "weight_block_size": [128]}},
        "two positive integers",
    ),
    "fp8 ue8m0": (
        {"quantization_config": {**K2_FP8, "scale_fmt": "ue8m0"}},
        "scale_fmt 'ue8m0' is not supported",
    ),
    "top and text differ": (
        {"quantization_config": K2_FP8, "text_config": {"quantization_config": ct_config()}},
        "differ",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_quantization_configs(case):
    config, fragment = BAD_CONFIGS[case]
    with pytest.raises(QuantizationConfigError) as err:
        parse_quantization(copy.deepcopy(config), source="/ckpt/config.json")
    assert fragment in str(err.value)
    assert str(err.value).startswith("/ckpt/config.json: ")


def test_nested_config_error_names_text_config():
    config = {
        "text_config": {"quantization_config": _mutated(W + "num_bits", 8)["quantization_config"]}
    }
    with pytest.raises(
        QuantizationConfigError, match=r"text_config\.quantization_config\.config_groups"
    ):
        parse_quantization(config)


# ---------------------------------------------------------------------------------------------
# INT4 tensor checks


def _stored(out_f=16, in_f=64, group=32, seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(-8, 8, (out_f, in_f)).astype(np.int8)
    scales = rng.random((out_f, in_f // group)).astype(ml_dtypes.bfloat16)
    return codes, scales, int4_to_hf(codes, scales)


def test_int4_roundtrip_and_shape_dtypes():
    codes, scales, hf = _stored()
    for shape_dtype in (np.int32, np.int64):
        got_codes, got_scales = int4_from_hf(
            hf["weight_packed"], hf["weight_scale"], hf["weight_shape"].astype(shape_dtype), 32
        )
        np.testing.assert_array_equal(got_codes, codes)
        assert got_scales is hf["weight_scale"] or np.array_equal(got_scales, scales)
    np.testing.assert_array_equal(pack_int4(codes.astype(ml_dtypes.int4)), hf["weight_packed"])
    w = int4_weight_from_hf(hf["weight_packed"], hf["weight_scale"], hf["weight_shape"], 32)
    np.testing.assert_array_equal(w.values.astype(np.int8), codes)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda h: h.update(weight_shape=np.array([16.0, 64.0])), "expected 2 int32/int64 values"),
        (
            lambda h: h.update(weight_shape=np.array([16, 64, 1], np.int32)),
            "expected 2 int32/int64",
        ),
        (lambda h: h.update(weight_shape=np.array([16, 0], np.int32)), "not a valid shape"),
        (
            lambda h: h.update(weight_shape=np.array([16, 48], np.int32)),
            "not divisible by the group size 32",
        ),
        (
            lambda h: h.update(weight_shape=np.array([16, 128], np.int32)),
            "needs [16, 16] (8 INT4 codes",
        ),
        (lambda h: h.update(weight_packed=h["weight_packed"][:8]), "needs [16, 8]"),
        (lambda h: h.update(weight_packed=h["weight_packed"].astype(np.int64)), "expected int32"),
        (lambda h: h.update(weight_scale=h["weight_scale"][:, :1]), "group size 32 needs [16, 2]"),
        (lambda h: h.update(weight_scale=h["weight_scale"].astype(np.int8)), "expected bfloat16"),
    ],
)
def test_int4_from_hf_errors_name_the_tensor(mutate, fragment):
    _, _, hf = _stored()
    mutate(hf)
    name = "model.layers.1.mlp.experts.7.up_proj"
    with pytest.raises(CheckpointError) as err:
        int4_from_hf(hf["weight_packed"], hf["weight_scale"], hf["weight_shape"], 32, name=name)
    assert name in str(err.value) and fragment in str(err.value)


def test_pack_unpack_errors():
    with pytest.raises(ValueError, match=r"outside the INT4 range \[-8, 7\]"):
        pack_int4(np.full((2, 8), 8, np.int8))
    with pytest.raises(ValueError, match="not divisible by 8"):
        pack_int4(np.zeros((2, 12), np.int8))
    with pytest.raises(CheckpointError, match="does not pack 72 input features"):
        unpack_int4(np.zeros((2, 8), np.int32), 72)
    with pytest.raises(CheckpointError, match="expected int32"):
        unpack_int4(np.zeros((2, 8), np.uint32), 64)
