"""`merge_lora`: LoRA, QK-clip factors and fully trained parameters folded into the base, written
in the base's format.

Bases are `k2jax.testing.make_tiny_checkpoint` folders (several shards, random weights that behave
like a trained model's) in each format; the fine-tune is a random rank-4 LoRA on every target,
per-head QK-clip factors ≠ 1 and a trained router and final norm. "The trained model" is the base
as `k2jax.load_model` reads it plus that fine-tune. Checks:

* float32 base: the merged folder, loaded with `k2jax.load_model`, gives the trained model's
  logits (≤ 1e-5); shard files, index, tensor names/dtypes/shapes, config and tokenizer files are
  those of the input.
* bf16 base: every merged weight is bf16(W + s·B·A, rows scaled) to within one bf16 rounding.
* INT4 base (compressed-tensors experts): every merged expert weight is within 0.55 × its group's
  new scale of W_deq + s·B·A (the tested bound: half a quantisation step, plus the bf16 rounding
  of the scale), and its codes are exactly compressed-tensors' min-max rule applied to that target.
* FP8 base (16×16 blocks, partial edge blocks): every merged linear is within e4m3 rounding
  (2⁻⁴·|w| + 2⁻¹⁰·scale_inv) of its target, with scale_inv = block max / 448.
* INT4, FP8 and K2.5's layout (INT4, `language_model.` prefix, vision tensors), reloaded with
  `k2jax.load_model`: the logits (≤ 1e-4) of the trained model with every weight rounded to its
  stored format — so the merged model differs from the trained one by that rounding alone. How far
  that rounding moves logits is not bounded here: on a random tiny model an ~8% per-weight INT4
  perturbation moves them by tens of percent through routing flips; the per-weight bounds above
  are the tested statement.
* Serving: the merged INT4 folder loaded by transformers' own `from_pretrained` (its
  compressed-tensors integration decompresses the experts; torch reference environment) gives
  those same rounded-trained-model logits (≤ 1e-4).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import rel_err, run_reference, write_json
from hf_tree import hf_tensors, host_params, tree_from_hf
from k2_checkpoints import random_lora, variable_shapes

import k2jax
from k2jax.config import CONFIG_DIR, load_model_config
from k2jax.conversion.formats import dequantize_fp8_block, dequantize_int4, int4_from_hf
from k2jax.conversion.merge import MergeError, merge_lora, quantize_fp8_block
from k2jax.conversion.safetensors_io import CheckpointIndex, write_sharded_checkpoint
from k2jax.lora import LoraConfig
from k2jax.model import ComputeConfig, Transformer
from k2jax.paths import OutputPathError
from k2jax.quant import quantize_int4
from k2jax.testing import make_tiny_checkpoint

F32 = ComputeConfig(dtype="float32", param_dtype="float32", remat="none")
LORA = LoraConfig(rank=4, alpha=8.0)
TOKENS = np.random.default_rng(3).integers(0, 1024, (2, 13))
BF16 = np.dtype(ml_dtypes.bfloat16)
BLOCK = (16, 16)


@pytest.fixture(scope="module")
def fine_tune():
    cfg = load_model_config(CONFIG_DIR / "tiny.gin")
    module = Transformer(cfg, F32, LORA)
    shapes = variable_shapes(module)
    rng = np.random.default_rng(2)

    lora = random_lora(shapes["lora"], rng)
    qk_clip = jax.tree.map(
        lambda x: np.where(rng.random(x.shape) < 0.3, 1.0, rng.uniform(0.4, 1.0, x.shape)).astype(
            np.float32
        ),
        shapes["qk_clip"],
    )
    return cfg, lora, qk_clip


def _base(tmp_path, fmt="bf16", **kw):
    """A base checkpoint and its parameters as a run trains on them (float32, experts dense)."""
    folder = make_tiny_checkpoint(tmp_path / "base", fmt, seed=1, fp8_block=BLOCK, **kw)
    return folder, host_params(k2jax.load_model(folder, dtype="float32", experts="bf16"))


def _trained(params):
    """Fully trained leaves: the router weights (permuted) and the final norm (scaled)."""
    return {
        "moe_layers": {
            "mlp": {"gate": {"weight": params["moe_layers"]["mlp"]["gate"]["weight"][::-1].copy()}}
        },
        "norm": {"weight": (params["norm"]["weight"] * 1.5).astype(np.float32)},
    }


def _overlay(params, trained):
    out = jax.tree.map(np.array, params)
    out["moe_layers"]["mlp"]["gate"]["weight"] = trained["moe_layers"]["mlp"]["gate"]["weight"]
    out["norm"]["weight"] = trained["norm"]["weight"]
    return out


def _logits(cfg, params, lora=None, qk_clip=None):
    module = Transformer(cfg, F32, LORA if lora is not None else None)
    variables = {"params": params}
    if lora is not None:
        variables["lora"] = lora
    if qk_clip is not None:
        variables["qk_clip"] = qk_clip
    fn = jax.jit(lambda v, t: module.apply(v, t, method=Transformer.logits))
    return np.asarray(fn(variables, jnp.asarray(TOKENS)))


def _adapters(tree, path=()):
    """(module path, {"lora_A", "lora_B"}) of every adapter in a LoRA (sub)tree."""
    if "lora_A" in tree:
        yield path, tree
        return
    for k, v in tree.items():
        yield from _adapters(v, (*path, k))


def _effective(cfg, params, lora, qk_clip, trained):
    """The trained model's weights in k2jax's tree: W + s·B·A, QK-clip rows scaled, overlay."""
    eff = _overlay(params, trained)
    for stack in ("dense_layers", "moe_layers"):
        for path, ab in _adapters(lora[stack]):
            # the merge's own float32 arithmetic (s·(B@A), then rows scaled), so that requantised
            # targets round alike: one e4m3 ulp is 6% of a weight
            delta = np.float32(LORA.scale) * (ab["lora_B"] @ ab["lora_A"])
            if path[:2] == ("mlp", "experts") and path[2] != "down_proj":
                w = eff[stack]["mlp"]["experts"]["gate_up_proj"]["weight"]
                F = w.shape[-2] // 2
                w[..., (slice(0, F) if path[2] == "gate_proj" else slice(F, 2 * F)), :] += delta
                continue
            node = eff[stack]
            for k in path:
                node = node[k]
            node["weight"] += delta
        H, Dn, Dr, Dv = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        )
        sc = np.asarray(qk_clip[stack]["self_attn"]["scales"])  # [L, 3, H]
        L = sc.shape[0]
        qb = eff[stack]["self_attn"]["q_b_proj"]["weight"].reshape(L, H, Dn + Dr, -1)
        qb[:, :, :Dn] *= sc[:, 0, :, None, None]
        qb[:, :, Dn:] *= sc[:, 1, :, None, None]
        kvb = eff[stack]["self_attn"]["kv_b_proj"]["weight"].reshape(L, H, Dn + Dv, -1)
        kvb[:, :, :Dn] *= sc[:, 2, :, None, None]
    return eff


def _read_all(folder):
    with CheckpointIndex(folder) as idx:
        return {n: np.array(idx.read(n)) for n in idx.names()}


def _stored(cfg, tree, fmt, expert_dtype=np.float32):
    """`tree` with every weight rounded as a checkpoint of format `fmt` stores it: routed experts
    by compressed-tensors' INT4 rule ("int4", dequantised to `expert_dtype`) or every linear but
    lm_head by FP8 16×16 blocks ("fp8"); the router bias float32; everything else bf16."""
    rounded = {}
    for name, w in hf_tensors(cfg, tree):
        if name.endswith("e_score_correction_bias"):
            rounded[name] = w
        elif fmt == "int4" and ".mlp.experts." in name:
            q = quantize_int4(w, 32)
            codes = np.asarray(q.values).astype(np.int8)
            deq = dequantize_int4(codes, np.asarray(q.scales), expert_dtype)
            rounded[name] = deq.astype(np.float32)
        elif fmt == "fp8" and name.endswith(("proj.weight", "mqa.weight")):
            q, s = quantize_fp8_block(w, BLOCK)
            rounded[name] = dequantize_fp8_block(q, s, BLOCK, np.float32)
        else:
            rounded[name] = w.astype(BF16).astype(np.float32)
    return tree_from_hf(cfg, tree, rounded)


def test_effective_weights_are_the_trained_model(fine_tune, tmp_path):
    """The test's own oracle (used for bf16/INT4/FP8 below) is the model the run trained."""
    cfg, lora, qk_clip = fine_tune
    _, params = _base(tmp_path, dtype="float32")
    trained = _trained(params)
    want = _logits(cfg, _overlay(params, trained), lora, qk_clip)
    assert rel_err(_logits(cfg, _effective(cfg, params, lora, qk_clip, trained)), want) <= 1e-5
    assert rel_err(_logits(cfg, params), want) > 0.1  # the fine-tune changes a lot


def test_float32_merge_reloads_to_the_trained_model(fine_tune, tmp_path):
    cfg, lora, qk_clip = fine_tune
    base, params = _base(tmp_path, dtype="float32", shards=4)
    trained = _trained(params)
    (base / "chat_template.jinja").write_text("{{ messages }}")
    out = merge_lora(base, cfg, LORA, lora, qk_clip, tmp_path / "merged", trained_params=trained)
    merged = k2jax.load_model(out, dtype="float32")
    want = _logits(cfg, _overlay(params, trained), lora, qk_clip)
    assert rel_err(merged.logits(TOKENS), want) <= 1e-5

    # same files, same index, same tensors in the same shards; the rest copied
    files = sorted(p.name for p in base.iterdir())
    assert sorted(p.name for p in out.iterdir()) == files
    assert len([f for f in files if f.endswith(".safetensors")]) == 4
    for name in (
        "model.safetensors.index.json",
        "config.json",
        "tiktoken.model",
        "chat_template.jinja",
    ):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    with CheckpointIndex(base) as a, CheckpointIndex(out) as b:
        assert a.weight_map == b.weight_map
        for n in a.names():
            assert a.info(n).dtype == b.info(n).dtype and a.info(n).shape == b.info(n).shape
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bf16_merge_rounds_the_target_once(fine_tune, tmp_path):
    cfg, lora, qk_clip = fine_tune
    base, params = _base(tmp_path)  # bf16: the loaded float32 values are the stored ones
    trained = _trained(params)
    out = merge_lora(base, cfg, LORA, lora, qk_clip, tmp_path / "merged", trained_params=trained)
    want = dict(hf_tensors(cfg, _effective(cfg, params, lora, qk_clip, trained)))
    got, before = _read_all(out), _read_all(base)
    changed = 0
    for name, w in want.items():
        assert got[name].dtype == before[name].dtype, name
        np.testing.assert_allclose(
            got[name].astype(np.float32), w, rtol=2**-8, atol=1e-30, err_msg=name
        )
        changed += not np.array_equal(got[name], before[name])
    # every linear but lm_head (all targets), the router weights and the final norm
    assert changed == sum(1 for n in want if "_proj" in n) + cfg.num_moe_layers + 1


@pytest.mark.parametrize("fmt,layout", [("int4", "k2"), ("fp8", "k2"), ("int4", "k25")])
def test_quantized_merge_reloads_to_the_rounded_trained_model(fine_tune, tmp_path, fmt, layout):
    """Reloaded with `k2jax.load_model`, the merged checkpoint gives the logits of the trained
    model with each weight rounded to its stored format (≤ 1e-4: the test's and the merge's
    float32 targets may round one bf16 ulp apart)."""
    cfg, lora, qk_clip = fine_tune
    base, params = _base(tmp_path, fmt, layout=layout)
    trained = _trained(params)
    out = merge_lora(base, cfg, LORA, lora, qk_clip, tmp_path / "merged", trained_params=trained)
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    targets = _effective(cfg, params, lora, qk_clip, trained)
    merged = k2jax.load_model(out, dtype="float32")
    assert rel_err(merged.logits(TOKENS), _logits(cfg, _stored(cfg, targets, fmt))) <= 1e-4
    if layout == "k25":  # prefixed names kept; the vision tower copied untouched
        got, before = _read_all(out), _read_all(base)
        assert set(got) == set(before)
        vision = [n for n in before if not n.startswith("language_model.")]
        assert vision and all(np.array_equal(got[n], before[n]) for n in vision)


def test_int4_merge_serves_in_transformers(fine_tune, tmp_path):
    """The merged INT4 checkpoint, loaded as a transformers user serves it (`from_pretrained` on
    the folder; compressed-tensors decompresses the experts, to bf16 as their scales are bf16;
    tests/reference/serve_reference.py), gives the fine-tune's logits up to the re-quantisation:
    those of the trained model with every weight rounded to its stored format (≤ 1e-4), the
    re-quantisation being bounded per weight by the test below. (On this random tiny model that
    rounding alone moves logits by ~80% relative through routing flips — see the module
    docstring — so a logits bound against the unrounded fine-tune would state nothing.)"""
    cfg, lora, qk_clip = fine_tune
    base, params = _base(tmp_path, "int4")
    trained = _trained(params)
    out = merge_lora(base, cfg, LORA, lora, qk_clip, tmp_path / "merged", trained_params=trained)
    npz = tmp_path / "served.npz"
    tokens = write_json(tmp_path / "tokens.json", TOKENS.tolist())
    run_reference("serve_reference.py", "logits", "--folder", out, "--tokens", tokens, "--out", npz)
    with np.load(npz) as f:
        served, expert_dtype = f["logits"], str(f["expert_dtype"])
    assert expert_dtype == "bfloat16"
    targets = _effective(cfg, params, lora, qk_clip, trained)
    rounded = _stored(cfg, targets, "int4", expert_dtype=BF16)
    assert rel_err(served, _logits(cfg, rounded)) <= 1e-4
    assert rel_err(served, _logits(cfg, params)) > 0.1  # and that is not the base model


def test_int4_merge_requantizes_with_the_compressed_tensors_rule(fine_tune, tmp_path):
    cfg, lora, qk_clip = fine_tune
    base, params = _base(tmp_path, "int4")
    trained = _trained(params)
    out = merge_lora(base, cfg, LORA, lora, qk_clip, tmp_path / "merged", trained_params=trained)
    before, got = _read_all(base), _read_all(out)
    assert set(got) == set(before)
    want = dict(hf_tensors(cfg, _effective(cfg, params, lora, qk_clip, trained)))
    n_experts = 0
    for name in got:
        if not name.endswith(".weight_packed"):
            continue
        m = name.removesuffix(".weight_packed")
        codes, scale = int4_from_hf(
            got[name], got[m + ".weight_scale"], got[m + ".weight_shape"], 32
        )
        assert got[m + ".weight_scale"].dtype == BF16
        target = want[m + ".weight"]
        err = np.abs(dequantize_int4(codes, scale, np.float32) - target)
        assert np.all(err <= 0.55 * np.repeat(scale.astype(np.float32), 32, axis=1)), m
        q = quantize_int4(target, 32)
        np.testing.assert_array_equal(codes, np.asarray(q.values).astype(np.int8))
        n_experts += 1
    assert n_experts == 3 * cfg.n_routed_experts * cfg.num_moe_layers


def test_fp8_merge_requantizes_per_block(fine_tune, tmp_path):
    cfg, lora, qk_clip = fine_tune
    base, params = _base(tmp_path, "fp8")
    trained = _trained(params)
    out = merge_lora(base, cfg, LORA, lora, qk_clip, tmp_path / "merged", trained_params=trained)
    got = _read_all(out)
    want = dict(hf_tensors(cfg, _effective(cfg, params, lora, qk_clip, trained)))
    scaled = [n.removesuffix("_scale_inv") for n in got if n.endswith("_scale_inv")]
    assert len(scaled) == sum(1 for n in want if "proj" in n)  # every linear but lm_head
    for m in scaled:
        q, s = got[m], got[m + "_scale_inv"]
        assert q.dtype == ml_dtypes.float8_e4m3fn and s.dtype == np.float32
        target = want[m]
        w = dequantize_fp8_block(q, s, BLOCK, np.float32)
        s_full = np.repeat(np.repeat(s, 16, 0), 16, 1)[: w.shape[0], : w.shape[1]]
        assert np.all(np.abs(w - target) <= 2**-4 * np.abs(target) + 2**-10 * s_full), m
        padded = np.pad(np.abs(target), [(0, -n % 16) for n in target.shape])
        blockmax = padded.reshape(s.shape[0], 16, s.shape[1], 16).max(axis=(1, 3))
        np.testing.assert_allclose(s * 448, blockmax, rtol=1e-6)


def test_errors_leave_nothing_behind(fine_tune, tmp_path):
    cfg, lora, qk_clip = fine_tune
    base, _ = _base(tmp_path, dtype="float32", tokenizer=False)
    out = tmp_path / "merged"
    merge_lora(base, cfg, LORA, lora, None, out)
    with pytest.raises(FileExistsError):
        merge_lora(base, cfg, LORA, lora, None, out)
    with pytest.raises(ValueError, match="its own base"):
        merge_lora(base, cfg, LORA, lora, None, base, overwrite=True)
    other = dataclasses.replace(cfg, num_hidden_layers=4)
    with pytest.raises(MergeError, match="num_hidden_layers"):
        merge_lora(base, other, LORA, lora, None, tmp_path / "x")
    bad_clip = {"moe_layers": {"self_attn": {"scales": np.full((2, 3, 5), 0.5, np.float32)}}}
    with pytest.raises(MergeError, match="scales"):
        merge_lora(base, cfg, LORA, lora, bad_clip, tmp_path / "x")
    with pytest.raises(MergeError, match="trained_params"):
        merge_lora(
            base,
            cfg,
            LORA,
            None,
            None,
            tmp_path / "x",
            trained_params={"wat": {"weight": np.ones(3)}},
        )
    # a base missing tensors the fine-tune changes
    stored = _read_all(base)
    keep = {n: v for n, v in stored.items() if "layers.2.self_attn.o_proj" not in n}
    assert len(keep) < len(stored)
    broken = tmp_path / "broken"
    write_sharded_checkpoint(broken, sorted(keep.items()), max_shard_bytes=1 << 40)
    (broken / "config.json").write_bytes((base / "config.json").read_bytes())
    with pytest.raises(MergeError, match="layers.2.self_attn.o_proj"):
        merge_lora(broken, cfg, LORA, lora, None, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # overwrite replaces a previous merge (here: QK-clip alone)
    merge_lora(base, cfg, LORA, None, qk_clip, out, overwrite=True)
    name = "model.layers.0.self_attn.q_b_proj.weight"
    assert not np.array_equal(_read_all(out)[name], stored[name])
    name = "model.layers.0.self_attn.q_a_proj.weight"
    assert np.array_equal(_read_all(out)[name], stored[name])


@pytest.mark.parametrize("where", ["is", "lies inside", "contains"])
def test_out_on_the_base_is_refused_even_with_overwrite(fine_tune, tmp_path, where):
    """merge_lora never writes where it reads: the base, a folder inside it (a later merge would
    copy it as part of the base), or a folder around it — whatever `overwrite` says."""
    cfg, lora, qk_clip = fine_tune
    base = make_tiny_checkpoint(tmp_path / "ckpts" / "base", "bf16", seed=1, tokenizer=False)
    out = {"is": base, "lies inside": base / "merged", "contains": tmp_path / "ckpts"}[where]
    files = sorted(tmp_path.rglob("*"))
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in files}
    for overwrite in (False, True):
        with pytest.raises(OutputPathError) as err:
            merge_lora(base, cfg, LORA, lora, qk_clip, out, overwrite=overwrite)
        prefix = f"the merged checkpoint folder {out} {where} its own base checkpoint, {base};"
        assert str(err.value).startswith(prefix)
        assert sorted(tmp_path.rglob("*")) == files
        assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in files} == before
