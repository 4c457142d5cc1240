"""PEFT export: peft 0.21 loads k2jax's adapters onto transformers' DeepseekV3 and reproduces
k2jax's logits with the same adapters (max|Δ| / max|logits| ≤ 1e-4, float32).

One reference subprocess (tests/reference/peft_reference.py) builds the base model with
`save_pretrained`, loads every adapter exported here with `PeftModel.from_pretrained` (failing on
any missing/unexpected-key warning) and writes its logits. k2jax loads the same base folder and
runs the LoRA trees the adapters were exported from. Adapters: every target (rank 4), a subset
with rsLoRA (rank 3, only `up` of the routed gate/up pair, so the fused layout has a rank-r
gate_up adapter and the per-expert layout zero-filled gate/down), and routed down_proj + o_proj
only (the fused down_proj adapter is then the only wrapper, not nested) — each in both layouts.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest
from helpers import TINY_HF_CONFIG, rel_err, run_reference, write_json

import k2jax
from k2jax.config import ModelConfig
from k2jax.conversion.peft import LAYOUTS, ExportError, export_peft, lora_slots
from k2jax.conversion.safetensors_io import SafetensorsFile
from k2jax.lora import LoraConfig
from k2jax.model import ComputeConfig, Transformer
from k2jax.model.transformer import init_variables
from k2jax.paths import OutputPathError

TOL = 1e-4

CONFIG = TINY_HF_CONFIG
TOKENS = np.random.default_rng(7).integers(0, 256, (2, 11)).tolist()
F32 = ComputeConfig(dtype="float32", param_dtype="float32", remat="none")

LORAS = {
    "all": LoraConfig(rank=4, alpha=8.0),
    "subset": LoraConfig(
        rank=3,
        alpha=5.0,
        rslora=True,
        targets=(
            "q_b_proj",
            "kv_b_proj",
            "experts.up_proj",
            "shared_experts.down_proj",
            "mlp.gate_proj",
        ),
    ),
    "down": LoraConfig(rank=2, alpha=2.0, targets=("experts.down_proj", "o_proj")),
}
ADAPTERS = [f"{name}-{layout}" for name in LORAS for layout in LAYOUTS]


def model_config() -> ModelConfig:
    return ModelConfig.from_hf_dict({**CONFIG, "model_type": "deepseek_v3"})


def random_lora(cfg: ModelConfig, lora: LoraConfig, seed: int) -> dict:
    """A LoRA tree of the model's shapes with non-zero A and B (B = 0 would test nothing)."""
    module = Transformer(cfg, F32, lora)
    shapes = jax.eval_shape(
        lambda: init_variables(module, jax.random.key(0), lora_rng=jax.random.key(1))
    )
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if path[-1].key == "lora_A":
            return (rng.normal(size=x.shape) / np.sqrt(x.shape[-1])).astype(np.float32)
        return (0.3 * rng.normal(size=x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, nn.unbox(shapes)["lora"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("peft")
    cfg = model_config()
    trees = {name: random_lora(cfg, lc, seed) for seed, (name, lc) in enumerate(LORAS.items())}
    paths = {}
    for name in ADAPTERS:
        lora_name, layout = name.split("-", 1)
        paths[name] = export_peft(
            cfg, LORAS[lora_name], trees[lora_name], None, out / name, layout=layout
        )
    spec = {
        "config": CONFIG,
        "seed": 3,
        "tokens": TOKENS,
        "adapters": {k: str(v) for k, v in paths.items()},
    }
    run_reference("peft_reference.py", "--spec", write_json(out / "spec.json", spec), "--out", out)
    base = k2jax.load_model(out / "base", dtype="float32")
    logits = dict(np.load(out / "logits.npz", allow_pickle=False))
    return cfg, trees, paths, base, logits


def test_base_matches_reference(exported):
    _, _, _, base, logits = exported
    assert rel_err(base.logits(TOKENS), logits["base"]) <= 1e-5


@pytest.mark.parametrize("name", ADAPTERS)
def test_peft_reproduces_k2jax_logits(exported, name):
    _, trees, _, base, logits = exported
    lora_name = name.split("-")[0]
    model = dataclasses.replace(base, lora=trees[lora_name], lora_config=LORAS[lora_name])
    ours = model.logits(TOKENS)
    assert rel_err(ours, logits[name]) <= TOL
    # ...and the adapter matters: the base alone is far from it
    assert rel_err(logits["base"], logits[name]) > 1e-2


def _tensors(path):
    with SafetensorsFile(path / "adapter_model.safetensors") as f:
        return {k: f.info(k) for k in f}


def test_per_expert_names_cover_every_expert(exported):
    """vLLM's DeepSeek loader wants lora_A/lora_B of gate, up and down for every expert."""
    cfg, _, paths, _, _ = exported
    infos = _tensors(paths["subset-per-expert"])
    r, D, F = 3, cfg.hidden_size, cfg.moe_intermediate_size
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        for e in range(cfg.n_routed_experts):
            p = f"base_model.model.model.layers.{i}.mlp.experts.{e}"
            for proj, (out_f, in_f) in {
                "gate_proj": (F, D),
                "up_proj": (F, D),
                "down_proj": (D, F),
            }.items():
                assert infos[f"{p}.{proj}.lora_A.weight"].shape == (r, in_f)
                assert infos[f"{p}.{proj}.lora_B.weight"].shape == (out_f, r)
    assert all(i.dtype == "F32" for i in infos.values())
    assert not any("experts.base_layer" in k or k.endswith("experts.lora_A.weight") for k in infos)


def test_fused_layout_names_and_shapes(exported):
    cfg, _, paths, _, _ = exported
    E, D, F, r = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, 4
    infos = _tensors(paths["all-fused"])
    p = "base_model.model.model.layers.1.mlp.experts"
    assert infos[f"{p}.base_layer.lora_A.weight"].shape == (E * 2 * r, D)  # gate_up, rank 2r
    assert infos[f"{p}.base_layer.lora_B.weight"].shape == (2 * F, 2 * r * E)
    assert infos[f"{p}.lora_A.weight"].shape == (E * r, F)  # down_proj, the outer wrapper
    assert infos[f"{p}.lora_B.weight"].shape == (D, r * E)
    assert not any(".experts.0." in k for k in infos)


def test_adapter_config(exported):
    _, _, paths, _, _ = exported
    conf = json.loads((paths["all-per-expert"] / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8
    assert conf["use_rslora"] is False and conf["lora_dropout"] == 0.0
    # dense and shared MLPs as parameters, so PEFT's MoE rewrite of *_proj targets can't drop them
    assert conf["target_modules"] == sorted(
        [
            "q_a_proj",
            "q_b_proj",
            "kv_a_proj_with_mqa",
            "kv_b_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    assert set(conf["target_parameters"]) == {
        f"{m}.{p}.weight"
        for m in ("mlp", "shared_experts")
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    fused = json.loads((paths["all-fused"] / "adapter_config.json").read_text())
    assert fused["rank_pattern"] == {r"mlp\.experts\.gate_up_proj": 8}
    assert fused["alpha_pattern"] == {r"mlp\.experts\.gate_up_proj": 16}
    assert "mlp.experts.gate_up_proj" in fused["target_parameters"]
    # rsLoRA is written as plain LoRA with the same scale: alpha' = (alpha/√r)·r
    sub = json.loads((paths["subset-fused"] / "adapter_config.json").read_text())
    assert sub["use_rslora"] is False
    assert sub["lora_alpha"] == pytest.approx(5.0 / np.sqrt(3) * 3)
    assert sub["rank_pattern"] == {}  # only up_proj: the fused adapter keeps rank r


def test_lora_slots_are_hf_modules(exported):
    cfg, trees, _, _, _ = exported
    slots = lora_slots(cfg, trees["down"])
    assert {s.module for s in slots if s.expert == 5 and s.layer == 0} == {
        "model.layers.1.mlp.experts.5.down_proj"
    }
    assert "model.layers.0.self_attn.o_proj" in {s.module for s in slots}


def test_refuses_what_an_adapter_cannot_carry(exported, tmp_path):
    cfg, trees, _, _, _ = exported
    lc, tree = LORAS["down"], trees["down"]
    clipped = {"moe_layers": {"self_attn": {"scales": np.ones((2, 3, 4), np.float32)}}}
    clipped["moe_layers"]["self_attn"]["scales"][1, 0, 2] = 0.8
    with pytest.raises(ExportError, match="QK-clip"):
        export_peft(cfg, lc, tree, clipped, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    trained = {"moe_layers": {"mlp": {"gate": {"weight": np.zeros((2, 8, 64), np.float32)}}}}
    with pytest.raises(ExportError, match="trained in full"):
        export_peft(cfg, lc, tree, None, tmp_path / "a", trained_params=trained)
    # all-ones factors are no clipping at all
    export_peft(
        cfg, lc, tree, {"moe_layers": {"self_attn": {"scales": np.ones((2, 3, 4))}}}, tmp_path / "b"
    )
    with pytest.warns(UserWarning, match="LOSSY"):
        export_peft(cfg, lc, tree, clipped, tmp_path / "c", strict=False)
    assert (tmp_path / "c" / "adapter_model.safetensors").is_file()


def test_errors_and_overwrite(exported, tmp_path):
    cfg, trees, _, _, _ = exported
    lc, tree = LORAS["down"], trees["down"]
    export_peft(cfg, lc, tree, None, tmp_path / "x", dtype="bfloat16")
    assert {i.dtype for i in _tensors(tmp_path / "x").values()} == {"BF16"}
    with pytest.raises(FileExistsError):
        export_peft(cfg, lc, tree, None, tmp_path / "x")
    export_peft(cfg, lc, tree, None, tmp_path / "x", overwrite=True)
    bad = jax.tree.map(lambda x: x, tree)
    bad["moe_layers"]["self_attn"]["o_proj"]["lora_B"] = np.zeros((2, 64, 5), np.float32)
    with pytest.raises(ExportError, match="o_proj"):
        export_peft(cfg, lc, bad, None, tmp_path / "y")
    with pytest.raises(ValueError, match="layout"):
        export_peft(cfg, lc, tree, None, tmp_path / "y", layout="sharded")
    assert not (tmp_path / "y").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean export warns about nothing
        export_peft(cfg, lc, tree, None, tmp_path / "z")


def test_base_model_path_is_absolute_and_never_the_output(tmp_path, monkeypatch):
    """A local base folder is written as its absolute path (the adapter then finds it from any
    working directory); a hub name as given. The adapter folder cannot be the base."""
    cfg = model_config()
    lc = LORAS["down"]
    tree = random_lora(cfg, lc, 0)
    (tmp_path / "ckpt" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    out = export_peft(cfg, lc, tree, None, "a", base_model_name_or_path="ckpt/base")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(tmp_path.resolve() / "ckpt" / "base")
    out = export_peft(cfg, lc, tree, None, "b", base_model_name_or_path="moonshotai/Kimi-K2")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == "moonshotai/Kimi-K2"
    for target in ("ckpt/base", "ckpt"):
        with pytest.raises(OutputPathError, match=f"the adapter folder {target} (is|contains)"):
            export_peft(
                cfg, lc, tree, None, target, base_model_name_or_path="ckpt/base", overwrite=True
            )
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["base"]


def test_kv_b_proj_adapter_warns_for_vllm(exported, tmp_path, caplog):
    """vLLM never applies a kv_b_proj adapter (README "Serve your fine-tune"): an export with a
    non-zero kv_b_proj part says so; one without kv_b_proj (or with it all zero) does not."""
    cfg, trees, _, _, _ = exported
    caplog.set_level("WARNING", logger="k2jax.conversion.peft")
    export_peft(cfg, LORAS["subset"], trees["subset"], None, tmp_path / "with")
    assert "vLLM never applies a kv_b_proj adapter" in caplog.text
    caplog.clear()
    export_peft(cfg, LORAS["down"], trees["down"], None, tmp_path / "without")
    zeroed = jax.tree.map(np.array, trees["subset"])
    for stack in ("dense_layers", "moe_layers"):
        zeroed[stack]["self_attn"]["kv_b_proj"]["lora_B"][...] = 0
    export_peft(cfg, LORAS["subset"], zeroed, None, tmp_path / "zero")
    assert "kv_b_proj" not in caplog.text
