"""NaN / Inf inside checkpoint weights: refused at load, at conversion and at restore, naming the
file, the tensor (or leaf) and the count; `check_finite=False` loads them as they are.

Tiny checkpoints (k2jax.testing.make_tiny_checkpoint) in each format get non-finite values
written into stored tensors: a bf16 norm and attention weight, an FP8 weight code (e4m3's NaN)
and an FP8 weight_scale_inv, an INT4 expert's bf16 weight_scale (its codes cannot be
non-finite). The counts are the decoded values that are non-finite: one FP8 NaN code is one
value, an Inf block scale its whole block, a NaN INT4 scale its group of 32 weights once
dequantised.
"""

from __future__ import annotations

import json
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

import k2jax
from k2jax.config import ModelConfig
from k2jax.conversion.loader import abstract_params, load_params
from k2jax.conversion.orbax_io import convert_checkpoint
from k2jax.conversion.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from k2jax.model import ComputeConfig
from k2jax.sharding import make_mesh, param_shardings
from k2jax.testing import make_tiny_checkpoint

NORM = "model.norm.weight"
Q_A = "model.layers.2.self_attn.q_a_proj.weight"
SCALE = "model.layers.1.mlp.experts.3.up_proj.weight_scale"  # the up half of gate_up_proj


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("finite")
    return {
        f: make_tiny_checkpoint(root / f, format=f, fp8_block=(16, 16))
        for f in ("bf16", "fp8", "int4")
    }


def _shard(folder, tensor):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][tensor]


def _poison(folder, tensor, index, value):
    """Writes `value` at `index` of a stored tensor (its shard rewritten); returns the shard."""
    shard = _shard(folder, tensor)
    with SafetensorsFile(shard) as f:
        tensors = {k: np.array(f.read(k)) for k in f.keys()}  # noqa: SIM118
    tensors[tensor][index] = np.asarray(value).astype(tensors[tensor].dtype)
    write_safetensors(shard, tensors, {"format": "pt"})
    return shard


def _copy(clean, fmt, tmp_path):
    return shutil.copytree(clean[fmt], tmp_path / fmt)


def _load_error(folder, **kw) -> str:
    with pytest.raises(CheckpointError) as err:
        k2jax.load_model(folder, **kw)
    return str(err.value)


def test_bf16_nan_and_inf_named_with_shard_and_count(clean, tmp_path):
    folder = _copy(clean, "bf16", tmp_path)
    norm_shard = _poison(folder, NORM, 5, np.nan)
    q_a_shard = _poison(folder, Q_A, (0, slice(0, 3)), -np.inf)
    msg = _load_error(folder)
    assert msg.startswith(f"{folder}: NaN or Inf in the weights of 2 tensors")
    assert f"'{NORM}' in {norm_shard}: 1 non-finite value" in msg
    assert f"'{Q_A}' in {q_a_shard}: 3 non-finite values" in msg
    assert "check_finite=False" in msg
    # the same on an 8-device mesh (counts reduced on the devices, replicated, fetched once)
    assert _load_error(folder, mesh=make_mesh(1, 4, 2)) == msg
    # opting out loads the values as they are
    model = k2jax.load_model(folder, check_finite=False)
    assert np.isnan(np.asarray(model.params["norm"]["weight"], np.float32)[5])


def test_fp8_nan_code_and_inf_scale(clean, tmp_path):
    folder = _copy(clean, "fp8", tmp_path)
    weight = "model.layers.0.self_attn.o_proj.weight"
    scale = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
    _poison(folder, weight, (3, 7), np.nan)  # e4m3fn's NaN code
    shard = _poison(folder, scale, (0, 0), np.inf)
    msg = _load_error(folder)
    assert (
        f"'{weight}' / '{weight}_scale_inv' in {_shard(folder, weight)}: 1 non-finite value;" in msg
    )
    # kv_b_proj is [128, 32]: its first 16×16 block decodes to 256 infinite values
    kv_b = scale.removesuffix("_scale_inv")
    assert f"'{kv_b}' / '{scale}' in {shard}: 256 non-finite values" in msg


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf × 0 codes
@pytest.mark.parametrize("experts", ["int4", "bf16"])
def test_int4_scales_counted_per_expert_and_gate_up_half(clean, tmp_path, experts):
    """Held INT4 a bad scale is one value of weight_scale; dequantised (experts="bf16") it is its
    group of 32 weights. Either way the stored weight_scale is named, not the codes, and a
    fused gate|up layer cut into row ranges names the right half of the right expert."""
    folder = _copy(clean, "int4", tmp_path)
    gate = "model.layers.2.mlp.experts.5.gate_proj.weight_scale"
    shard = _poison(folder, SCALE, (2, 0), np.nan)
    _poison(folder, gate, (31, 1), np.inf)
    cfg = ModelConfig.from_hf_dir(folder)
    abstract = abstract_params(cfg, ComputeConfig(experts=experts))
    shardings = param_shardings(abstract, make_mesh(1, 4, 2))
    with pytest.raises(CheckpointError) as err:
        load_params(folder, cfg, abstract, shardings=shardings, max_piece_bytes=4096)
    msg = str(err.value)
    n = "1 non-finite value" if experts == "int4" else "32 non-finite values"
    assert (
        f"of 2 tensors ('{SCALE}' in {shard}: {n}; '{gate}' in {_shard(folder, gate)}: {n})" in msg
    )
    assert "weight_packed" not in msg


def test_the_check_changes_no_value(clean):
    """Counting happens in the program that writes each piece into its leaf: the leaves (INT4,
    cut into row ranges, on a mesh) are bit for bit those of an unchecked load."""
    folder = clean["int4"]
    cfg = ModelConfig.from_hf_dir(folder)
    abstract = abstract_params(cfg, ComputeConfig(experts="int4"))
    shardings = param_shardings(abstract, make_mesh(1, 4, 2))
    kw = {"shardings": shardings, "max_piece_bytes": 4096}
    checked = load_params(folder, cfg, abstract, **kw)
    unchecked = load_params(folder, cfg, abstract, check_finite=False, **kw)
    for a, b in zip(jax.tree.leaves(checked), jax.tree.leaves(unchecked)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_many_bad_tensors_listed_first_few_then_how_many_more(clean, tmp_path):
    folder = _copy(clean, "bf16", tmp_path)
    names = [f"model.layers.{i}.{n}.weight" for i in range(3) for n in ("input_layernorm",)]
    names += [f"model.layers.{i}.post_attention_layernorm.weight" for i in range(3)] + [NORM]
    for name in names:
        _poison(folder, name, 0, np.inf)
    msg = _load_error(folder)
    assert f"in the weights of {len(names)} tensors" in msg
    assert len(re.findall(r"1 non-finite value", msg)) == 5
    assert f"; and {len(names) - 5} more)" in msg


def test_conversion_refuses_then_restore_refuses_what_was_converted_anyway(clean, tmp_path):
    folder = _copy(clean, "int4", tmp_path)
    _poison(folder, NORM, 1, np.nan)
    _poison(folder, SCALE, (0, 1), np.inf)
    out = tmp_path / "k2t"
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(folder, out, progress=False, max_item_bytes=20_000)
    msg = str(err.value)
    assert f"{folder}: NaN or Inf" in msg and f"'{NORM}'" in msg
    assert f"{out} was not written" in msg and not out.exists()

    convert_checkpoint(folder, out, progress=False, max_item_bytes=20_000, check_finite=False)
    msg = _load_error(out, mesh=make_mesh(1, 2, 4))
    assert msg.startswith(f"{out}: NaN or Inf in the weights of 2 tensors")
    assert re.search(rf"{out}/params/item_\d+: norm/weight: 1 non-finite value", msg)
    leaf = "moe_layers/mlp/experts/gate_up_proj/weight_scale/layer_000"
    assert re.search(rf"{out}/params/item_\d+: {leaf}[_\w]*: 1 non-finite value", msg)
    model = k2jax.load_model(out, check_finite=False)
    assert not np.isfinite(np.asarray(model.params["norm"]["weight"], np.float32)[1])


_ = ml_dtypes  # registers e4m3 / bf16 so _poison can cast to the stored dtypes
