"""Loading Kimi's checkpoint formats onto meshes, against the formats' own tools.

One reference subprocess (tests/reference/loader_reference.py, .venv-ref) writes, from one random
transformers DeepseekV3 model, the folders Kimi ships — bf16; K2-Thinking INT4 experts compressed
by compressed-tensors (pack_to_int32); K2-Instruct FP8 from torch.float8_e4m3fn with partial
edge blocks; the INT4 folder in K2.5's nested layout with vision tensors — and the logits
transformers computes on exactly the weights each encodes (float32). It also reads two folders
written by k2jax.testing.make_tiny_checkpoint with those tools. k2jax must load every folder and
reproduce the logits to 1e-5, keep INT4 codes bit-exact, place every leaf where the rules table
says on 8-device meshes, and refuse bad checkpoints with errors naming the file or tensor.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from helpers import TINY_HF_CONFIG, rel_err, run_reference, write_json

import k2jax
from k2jax.config import ConfigError, ModelConfig
from k2jax.conversion.formats import QuantizationConfigError
from k2jax.conversion.loader import HFCheckpoint, abstract_params, load_params
from k2jax.conversion.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from k2jax.model import ComputeConfig
from k2jax.sharding import logical_specs, make_mesh
from k2jax.testing import make_tiny_checkpoint

TOL = 1e-5
# Dims chosen so 32×32 FP8 blocks have partial edges (q_a rows 40, kv_a rows 24, kv_b cols 16)
# and every expert input width is a multiple of the INT4 group (32); 8 experts and 4 heads split
# over expert=4 × tensor=2.
CONFIG = {**TINY_HF_CONFIG, "q_lora_rank": 40, "moe_intermediate_size": 32}
TOKENS = np.random.default_rng(1).integers(0, 256, (8, 12))
TINY_TOKENS = np.random.default_rng(2).integers(0, 1024, (8, 6))
# transformers builds the MLA latent norms with eps 1e-6 whatever rms_norm_eps says (K2_FACTS §3.1)
HF_LATENT = {"latent_norm_eps": 1e-6}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader_ref")
    tiny = {f: str(make_tiny_checkpoint(out / f"tiny_{f}", format=f)) for f in ("int4", "fp8")}
    spec = {
        "config": CONFIG,
        "seed": 11,
        "tokens": TOKENS.tolist(),
        "group_size": 32,
        "fp8_block": [32, 32],
        "tiny": tiny,
        "tiny_tokens": TINY_TOKENS.tolist(),
    }
    ref_out = out / "ref"
    ref_out.mkdir()
    run_reference(
        "loader_reference.py",
        "build",
        "--spec",
        write_json(out / "spec.json", spec),
        "--out",
        ref_out,
    )
    return {
        "dir": ref_out,
        "tiny": {k: Path(v) for k, v in tiny.items()},
        "out": dict(np.load(ref_out / "outputs.npz", allow_pickle=False)),
    }


def _experts(model, proj="gate_up_proj"):
    return model.params["moe_layers"]["mlp"]["experts"][proj]


# ---------------------------------------------------------------------------------------------
# Logits against transformers


@pytest.mark.parametrize(
    "case, experts, expect_default",
    [
        ("bf16", None, "bf16"),
        ("int4", None, "int4"),  # K2-Thinking: experts stay INT4 by default
        ("int4", "bf16", "bf16"),  # ... or are dequantised on request
        ("fp8", None, "bf16"),
        ("k25", None, "int4"),  # K2.5 layout: nested config, prefix, vision tensors skipped
    ],
)
def test_logits_match_transformers(ref, case, experts, expect_default):
    model = k2jax.load_model(
        ref["dir"] / case, dtype="float32", experts=experts, config_overrides=HF_LATENT
    )
    assert model.compute.experts == expect_default
    if expect_default == "int4":
        assert _experts(model)["weight_q"].dtype == np.dtype(ml_dtypes.int4)
    want = ref["out"][f"logits.{'int4' if case == 'k25' else case}"]
    assert rel_err(model.logits(TOKENS), want) <= TOL


def _ct_codes(ref, layer, proj):
    """compressed-tensors' unpacked codes / scales for one layer, stacked like k2jax's leaves."""
    out = ref["out"]

    def get(e, p, what):
        return out[f"ct.model.layers.{layer}.mlp.experts.{e}.{p}.weight.{what}"]

    parts = ("gate_proj", "up_proj") if proj == "gate_up_proj" else (proj,)
    stack = {
        what: np.stack([np.concatenate([get(e, p, what) for p in parts]) for e in range(8)])
        for what in ("codes", "scale")
    }
    return stack["codes"], stack["scale"]


@pytest.mark.parametrize("case", ["int4", "k25", "bf16"])
def test_int4_codes_bit_exact_with_compressed_tensors(ref, case):
    """Unpacked INT4 codes and scales equal compressed-tensors' unpack_from_int32 and its scales;
    a bf16 checkpoint loaded with experts="int4" is quantised to the same codes and scales
    (compressed-tensors' rule, dividing in bf16)."""
    model = k2jax.load_model(ref["dir"] / case, experts="int4")
    for proj in ("gate_up_proj", "down_proj"):
        leaf = _experts(model, proj)
        q = np.asarray(leaf["weight_q"]).astype(np.int8)
        s = np.asarray(leaf["weight_scale"]).astype(np.float32)
        for layer in (1, 2):
            codes, scales = _ct_codes(ref, layer, proj)
            np.testing.assert_array_equal(q[layer - 1], codes, err_msg=f"{proj} {layer}")
            np.testing.assert_array_equal(s[layer - 1], scales, err_msg=f"{proj} {layer}")


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_tiny_checkpoints_match_what_hf_tools_read(ref, fmt):
    """make_tiny_checkpoint's folders, read by safetensors/compressed-tensors/transformers in the
    reference, give transformers the logits k2jax computes from them."""
    model = k2jax.load_model(ref["tiny"][fmt], dtype="float32", config_overrides=HF_LATENT)
    assert rel_err(model.logits(TINY_TOKENS), ref["out"][f"logits.tiny_{fmt}"]) <= TOL


def test_k25_vision_tensors_skipped_with_one_log_line(ref, caplog):
    cfg = ModelConfig.from_hf_dir(ref["dir"] / "k25")
    with caplog.at_level(logging.INFO, logger="k2jax.conversion.loader"):
        ckpt = HFCheckpoint(ref["dir"] / "k25", cfg)
        ckpt.plan(abstract_params(cfg, ComputeConfig(experts="int4")))
    lines = [r.getMessage() for r in caplog.records if "vision" in r.getMessage()]
    assert len(lines) == 1 and "skipping 3 vision/projector tensors" in lines[0]
    assert ckpt.prefix == "language_model." and ckpt.format.scope == "language_model."


# ---------------------------------------------------------------------------------------------
# Placement on meshes


def _leaves(params):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_same_params(got, want):
    want = _leaves(want)
    for key, x in _leaves(got).items():
        a, b = np.asarray(x), np.asarray(want[key])
        assert a.dtype == b.dtype, key
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=key)


@pytest.mark.parametrize(
    "fmt, shape", [("fp8", (1, 4, 2)), ("int4", (2, 2, 2)), ("bf16", (1, 8, 1))]
)
def test_mesh_leaves_placed_by_the_rules_and_equal_one_device(ref, fmt, shape):
    """Every leaf is created with the rules table's sharding and each device holds exactly its
    slice, bit for bit (FP8 rows split over tensor=2 start inside a 32-row scale block; the
    model on such meshes equals one device given equal parameters: tests/test_sharding.py)."""
    folder = ref["dir"] / fmt
    cfg = ModelConfig.from_hf_dir(folder)
    compute = ComputeConfig(experts="int4" if fmt == "int4" else "bf16")
    abstract = abstract_params(cfg, compute)
    one = load_params(folder, cfg, abstract)
    mesh = make_mesh(*shape)
    from k2jax.sharding import param_shardings

    # small pieces: every expert layer is built as several row ranges
    shardings = param_shardings(abstract, mesh)
    sharded = load_params(folder, cfg, abstract, shardings=shardings, max_piece_bytes=4096)
    specs = jax.tree.leaves(logical_specs(abstract))
    for x, spec in zip(jax.tree.leaves(sharded), specs):
        assert x.sharding.spec == spec and x.sharding.mesh == mesh
    _assert_same_params(sharded, one)


def test_int4_on_expert4_tensor2_mesh_gives_single_device_logits(ref):
    folder = ref["tiny"]["int4"]
    one = k2jax.load_model(folder, dtype="float32")
    model = k2jax.load_model(folder, dtype="float32", mesh=make_mesh(1, 4, 2))
    assert model.compute.experts == "int4"
    assert rel_err(model.logits(TINY_TOKENS), one.logits(TINY_TOKENS)) <= TOL


# ---------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the file or tensor


@pytest.fixture
def tiny_copy(ref, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(ref["tiny"]["int4"], dst)
    return dst


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _rewrite_shard(folder, tensor, change):
    """Rewrites the shard holding `tensor` with change(tensors) applied."""
    shard = folder / _index(folder)["weight_map"][tensor]
    with SafetensorsFile(shard) as f:
        tensors = {k: np.array(f.read(k)) for k in f.keys()}  # noqa: SIM118
    change(tensors)
    write_safetensors(shard, tensors, {"format": "pt"})


def test_missing_shard(tiny_copy):
    (tiny_copy / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors.*does not exist"):
        k2jax.load_model(tiny_copy)


def test_index_names_tensor_absent_from_its_shard(tiny_copy):
    name = "model.layers.1.mlp.experts.3.up_proj.weight_packed"
    _rewrite_shard(tiny_copy, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as err:
        k2jax.load_model(tiny_copy)
    assert name in str(err.value) and "does not contain" in str(err.value)


def test_tensor_missing_from_the_checkpoint(tiny_copy):
    name = "model.layers.2.self_attn.kv_b_proj.weight"
    index = _index(tiny_copy)
    del index["weight_map"][name]
    _rewrite_shard(tiny_copy, name, lambda t: t.pop(name))
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        k2jax.load_model(tiny_copy)


def test_shape_disagreeing_with_config(tiny_copy):
    name = "model.layers.0.self_attn.q_a_proj.weight"

    def change(t):
        t[name] = t[name][:, :-8].copy()

    _rewrite_shard(tiny_copy, name, change)
    with pytest.raises(CheckpointError) as err:
        k2jax.load_model(tiny_copy)
    assert f"{name!r} has shape [32, 56], but config.json implies [32, 64]" in str(err.value)


def test_int4_weight_shape_disagreeing_with_config(tiny_copy):
    name = "model.layers.2.mlp.experts.5.down_proj.weight_shape"
    _rewrite_shard(tiny_copy, name, lambda t: t.update({name: np.asarray([64, 64], np.int32)}))
    with pytest.raises(CheckpointError, match=f"{name}.*says \\[64, 64\\].*implies \\[64, 32\\]"):
        k2jax.load_model(tiny_copy)


def test_tensor_with_no_place(tiny_copy):
    name = "model.layers.1.mlp.experts.8.up_proj.weight"  # tiny has experts 0..7
    _rewrite_shard(
        tiny_copy,
        "model.norm.weight",
        lambda t: t.update({name: np.zeros((32, 64), ml_dtypes.bfloat16)}),
    )
    index = _index(tiny_copy)
    index["weight_map"][name] = index["weight_map"]["model.norm.weight"]
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{name!r} has no place"):
        k2jax.load_model(tiny_copy)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda qc: qc.update(quant_method="gptq"), "quant_method 'gptq' is not supported"),
        (lambda qc: qc.update(format="marlin-24"), "format 'marlin-24' is not supported"),
        (
            lambda qc: qc["config_groups"]["group_0"]["weights"].update(symmetric=False),
            "asymmetric INT4 stores zero points",
        ),
    ],
    ids=["method", "format", "asymmetric"],
)
def test_unsupported_quantization_config(tiny_copy, edit, fragment):
    _config(tiny_copy, lambda c: edit(c["quantization_config"]))
    with pytest.raises(QuantizationConfigError) as err:
        k2jax.load_model(tiny_copy)
    assert fragment in str(err.value) and str(tiny_copy / "config.json") in str(err.value)


def test_zero_point_tensor_refused(tiny_copy):
    name = "model.layers.1.mlp.experts.0.gate_proj.weight_zero_point"
    _rewrite_shard(
        tiny_copy,
        "model.norm.weight",
        lambda t: t.update({name: np.zeros((4, 2), np.int32)}),
    )
    index = _index(tiny_copy)
    index["weight_map"][name] = index["weight_map"]["model.norm.weight"]
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{name!r}: asymmetric INT4"):
        k2jax.load_model(tiny_copy)


def test_group_size_not_dividing_in_features(tiny_copy):
    _config(
        tiny_copy,
        lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
            group_size=48
        ),
    )
    with pytest.raises(CheckpointError) as err:
        k2jax.load_model(tiny_copy)
    msg = str(err.value)
    assert "weight_packed" in msg and "not divisible by the INT4 group size 48" in msg


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_truncated_or_corrupt_shard(tiny_copy, damage):
    shard = tiny_copy / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"\x00{" * 8)
    with pytest.raises(CheckpointError) as err:
        k2jax.load_model(tiny_copy)
    assert str(shard) in str(err.value)


def test_pickle_weights_refused_never_unpickled(tmp_path):
    sentinel = tmp_path / "UNPICKLED"

    class Trap:  # unpickling this would create the sentinel file
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    folder = tmp_path / "ckpt"
    make_tiny_checkpoint(folder, format="bf16", shards=1)
    for f in folder.glob("model*"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    with pytest.raises(CheckpointError) as err:
        k2jax.load_model(folder)
    assert "pytorch_model.bin" in str(err.value) and "never unpickles" in str(err.value)
    assert not sentinel.exists()


def test_int4_group_must_match_the_model(ref):
    with pytest.raises(CheckpointError, match="INT4 group size is 32 but the model holds"):
        k2jax.load_model(
            ref["tiny"]["int4"], compute=ComputeConfig(experts="int4", int4_group_size=16)
        )


def test_not_a_kimi_config(tiny_copy):
    _config(tiny_copy, lambda c: c.update(model_type="llama"))
    with pytest.raises(ConfigError, match="not a Kimi-K2-family model"):
        k2jax.load_model(tiny_copy)
