"""ModelConfig from config.json in every form the family ships, presets, and the config-file loader."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from k2jax.config import (
    CONFIG_DIR,
    ConfigError,
    ModelConfig,
    load_config,
    load_model_config,
    parse_override,
    to_gin,
)
from k2jax.lora import LoraConfig
from k2jax.model.rope import rope_parameters

# Kimi-K2-Instruct's config.json as released (K2_FACTS §1.1), in the original `rope_scaling` form.
K2_INSTRUCT_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 131072,
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 163840,
}


def k25_json():
    """Kimi-K2.5: the LLM in text_config, re-serialised by transformers 5 (`rope_parameters`)."""
    text = {k: v for k, v in K2_INSTRUCT_JSON.items() if k not in ("rope_scaling", "rope_theta")}
    text.update(
        model_type="deepseek_v3",
        rms_norm_eps=1e-5,
        max_position_embeddings=262144,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 50000.0,
            "factor": 64.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )
    return {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "text_config": text,
        "vision_config": {"patch_size": 14, "vt_hidden_size": 1152},
        "media_placeholder_token_id": 163605,
    }


def test_k2_instruct_config_json_equals_preset():
    from_json = ModelConfig.from_hf_dict(K2_INSTRUCT_JSON)
    preset = load_model_config(CONFIG_DIR / "kimi_k2_instruct.gin")
    assert from_json == dataclasses.replace(preset, pad_token_id=None)
    assert from_json.num_moe_layers == 60 and from_json.num_dense_layers == 1
    assert from_json.qk_head_dim == 192


def test_k25_text_config_with_rope_parameters_equals_preset():
    from_json = ModelConfig.from_hf_dict(k25_json())
    preset = load_model_config(CONFIG_DIR / "kimi_k25.gin")
    assert from_json.rope_beta_fast == 32.0 and from_json.rope_factor == 64.0
    assert from_json.rms_norm_eps == 1e-5
    assert from_json == dataclasses.replace(preset, pad_token_id=None, model_type="deepseek_v3")


def test_kimi_k2_thinking_preset():
    c = load_model_config(CONFIG_DIR / "kimi_k2_thinking.gin")
    assert (c.rms_norm_eps, c.rope_factor, c.max_position_embeddings) == (1e-5, 64.0, 262144)
    assert c.hidden_size == 7168 and c.n_routed_experts == 384  # inherited from K2-Instruct


def test_softmax_scale_values():
    """K2_FACTS §3.2: 0.1308608 for factor 32, 0.1446796 for factor 64."""
    k2 = ModelConfig.from_hf_dict(K2_INSTRUCT_JSON)
    assert k2.softmax_scale == pytest.approx(0.1308608, abs=5e-8)
    k25 = ModelConfig.from_hf_dict(k25_json())
    assert k25.softmax_scale == pytest.approx(0.1446796, abs=5e-8)


@pytest.mark.parametrize(
    "make, low, high",
    [
        (lambda: ModelConfig.from_hf_dict(K2_INSTRUCT_JSON), 19, 20),
        (lambda: ModelConfig.from_hf_dict(k25_json()), 8, 20),
    ],
)
def test_yarn_ramp_bounds(make, low, high):
    """Pairs ≤ low keep θ^(−2i/64); pairs ≥ high are divided by the factor (K2_FACTS §3.3)."""
    c = make()
    inv_freq, attention_factor = rope_parameters(c)
    extra = 1.0 / c.rope_theta ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(inv_freq[: low + 1], extra[: low + 1], rtol=1e-7)
    np.testing.assert_allclose(inv_freq[high:], extra[high:] / c.rope_factor, rtol=1e-7)
    mid = slice(low + 1, high)
    assert np.all(inv_freq[mid] < extra[mid]) and np.all(inv_freq[mid] > extra[mid] / c.rope_factor)
    assert attention_factor == 1.0  # mscale == mscale_all_dim


def test_config_errors_name_the_key():
    bad = dict(K2_INSTRUCT_JSON, scoring_func="softmax")
    with pytest.raises(ConfigError, match="scoring_func"):
        ModelConfig.from_hf_dict(bad)
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        ModelConfig.from_hf_dict(dict(K2_INSTRUCT_JSON, model_type="llama"))
    missing = {k: v for k, v in K2_INSTRUCT_JSON.items() if k != "hidden_size"}
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf_dict(missing)
    with pytest.raises(ConfigError, match="model.hidden_size: expected int"):
        ModelConfig.from_hf_dict(dict(K2_INSTRUCT_JSON, hidden_size="7168"))
    with pytest.raises(ConfigError, match="n_group"):
        ModelConfig.from_hf_dict(dict(K2_INSTRUCT_JSON, n_group=5))
    with pytest.raises(ConfigError, match="rope_scaling type 'dynamic'"):
        ModelConfig.from_hf_dict(
            dict(K2_INSTRUCT_JSON, rope_scaling={"type": "dynamic", "factor": 2.0})
        )


def test_read_config_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        ModelConfig.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "kimi_k2",\n "hidden_size": }')
    with pytest.raises(ConfigError, match="invalid JSON at line 2"):
        ModelConfig.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(K2_INSTRUCT_JSON))
    assert ModelConfig.from_hf_dir(tmp_path).hidden_size == 7168


SECTIONS = {"model": ModelConfig, "lora": LoraConfig}


def test_gin_file_unknown_key_names_file_and_line(tmp_path):
    f = tmp_path / "run.gin"
    f.write_text("include 'tiny.gin'\n\nlora.rank = 8\nlora.rnak = 4\n")
    with pytest.raises(ConfigError, match=r"run.gin:4: 'lora' has no key 'rnak'"):
        load_config(f, SECTIONS)


def test_unknown_keys_and_sections_get_a_did_you_mean(tmp_path):
    """difflib's closest names, as section.key; none when nothing is close."""
    for override, hint in (
        ("lora.rnak=4", "'lora' has no key 'rnak'; did you mean lora.rank?"),
        ("lora.dropuot=0.1", "did you mean lora.dropout?"),
        ("lora.init_frm=x", "did you mean lora.init_from?"),
        ("lorra.rank=4", "unknown section 'lorra' (in lorra.rank); did you mean lora?"),
    ):
        with pytest.raises(ConfigError, match=re.escape(hint)):
            load_config("tiny.gin", SECTIONS, [override])
    with pytest.raises(ConfigError, match=r"has no key 'zzz'$"):
        load_config("tiny.gin", SECTIONS, ["lora.zzz=1"])


def test_gin_file_wrong_type_and_unknown_section(tmp_path):
    f = tmp_path / "run.gin"
    f.write_text("include 'tiny.gin'\nlora.rank = 'abc'\n")
    with pytest.raises(ConfigError, match=r"run.gin:2: lora.rank: expected int, got 'abc'"):
        load_config(f, SECTIONS)
    f.write_text("include 'tiny.gin'\noptimiser.lr = 1e-4\n")
    with pytest.raises(ConfigError, match="unknown section 'optimiser'"):
        load_config(f, SECTIONS)


def test_gin_overrides_macros_and_roundtrip(tmp_path):
    f = tmp_path / "run.gin"
    f.write_text("include 'tiny.gin'\nRANK = 8\nlora.rank = %RANK\nlora.alpha = 16\n")
    out = load_config(f, SECTIONS, overrides=["lora.rank=32", "model.num_hidden_layers=5"])
    assert out["lora"].rank == 32 and out["lora"].alpha == 16.0
    assert isinstance(out["lora"].alpha, float)  # ints are accepted for float fields
    assert out["model"].num_hidden_layers == 5 and out["model"].hidden_size == 64
    # the operative config written back parses to the same values
    g = tmp_path / "operative.gin"
    g.write_text(to_gin("model", out["model"]) + to_gin("lora", out["lora"]))
    assert load_config(g, SECTIONS) == out
    with pytest.raises(ConfigError, match="lora.rank: expected int, got 'big'"):
        load_config(f, SECTIONS, overrides=["lora.rank=big"])
    with pytest.raises(ConfigError, match="section.key"):
        parse_override("rank=4")
    assert parse_override("data.path=chats.jsonl")[2] == "chats.jsonl"  # bare words are strings


def test_missing_required_keys(tmp_path):
    f = tmp_path / "partial.gin"
    f.write_text("model.hidden_size = 64\n")
    with pytest.raises(ConfigError, match="missing required keys: model.vocab_size"):
        load_config(f, {"model": ModelConfig})


def test_lora_config_validation():
    assert LoraConfig(rank=8, alpha=16).scale == 2.0
    assert LoraConfig(rank=16, alpha=16, rslora=True).scale == 4.0
    with pytest.raises(ConfigError, match="matches no linear"):
        LoraConfig(targets=("q_proj",))
    lc = LoraConfig(targets=("experts.gate_proj", "shared_experts.*"))
    assert lc.applies_to("mlp.experts.gate_proj")
    assert not lc.applies_to("mlp.gate_proj")
    assert lc.applies_to("mlp.shared_experts.down_proj")
    assert not lc.applies_to("self_attn.q_a_proj")
