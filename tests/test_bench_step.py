"""The GPU benchmark's harness (benchmarks/bench_step.py) on the tiny preset, so that it cannot rot
between the rare sessions that have a GPU: the record of one timed step, the chunked random base,
the (c) projection's arithmetic and the HF+PEFT slice's widths."""

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks/bench_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_step", None)


def test_tiny_step_record(bench_step):
    T = 128
    r = bench_step.run_case("b", tiny=True, seq=T, steps=1, warmup=1)
    assert r["finite"] and np.isfinite(r["loss"])
    assert r["tokens_per_step"] == T and r["tokens_per_s"] == pytest.approx(T / r["step_s"])
    m = r["model"]
    assert (m["dense_layers"], m["moe_layers"], m["experts_dtype"]) == (1, 3, "int4")
    # The library's FLOP count: tokens·W + causal pairs · layers · 3·2·H·(Dqk + Dv).
    layers = m["dense_layers"] + m["moe_layers"]
    attn = T * (T + 1) // 2 * layers * 6 * m["num_attention_heads"]
    attn *= m["qk_head_dim"] + m["v_head_dim"]
    assert r["step_flops"] == pytest.approx(T * r["weight_flops_per_token"] + attn)
    assert r["mfu"] == pytest.approx(r["step_flops"] / (r["step_s"] * 800e12))


def test_the_ce_backward_can_be_timed(bench_step):
    """--lora-backward ce reaches the step's LoraConfig (the GPU run that times CE-LoRA, issue 19;
    test_ce_lora.py trains with it)."""
    args = argparse.Namespace(lora_backward="ce", ce_rank=8, ce_keep=0.25, ce_refresh=10)
    cfg = bench_step.slice_config(bench_step.CASES["b"], tiny=True)
    spec = bench_step.step_spec(cfg, expert_dtype="int4", lora=bench_step.lora_overrides(args))
    lora = spec.lora
    assert (lora.backward, lora.ce_rank, lora.ce_keep, lora.ce_refresh) == ("ce", 8, 0.25, 10)
    exact = argparse.Namespace(lora_backward="exact", ce_rank=8, ce_keep=0.25, ce_refresh=0)
    assert bench_step.lora_overrides(exact) is None


def _record(step_s, moe_layers, T=4096):
    return {
        "step_s": step_s,
        "tokens_per_step": T,
        "model": {"moe_layers": moe_layers},
        "trainable_params": {
            "moe_layer_routed": 0,
            "moe_layer_other": 1_000_000,
            "dense_layer": 2_000_000,
            "top": 0,
        },
    }


def test_projection_arithmetic(bench_step):
    full = bench_step.load_model_config("kimi_k2_thinking.gin")
    b, c = _record(0.50, 3), _record(0.30, 1)
    p = bench_step.project_8xh200(b, c, full, nvlink_gb_s=450.0)
    assert p["estimate"] is True
    assert p["t_moe_layer_s"] == pytest.approx(0.10)  # (0.5 − 0.3) / 2
    assert p["t_fixed_s"] == pytest.approx(0.20)  # 0.3 − 0.1
    assert p["t_compute_s"] == pytest.approx(0.20 + 60 * 0.10)
    a2a = 4096 * 8 * 7168 * 2 * 2 * 7 / 8 * 3  # bytes per MoE layer per GPU
    allreduce = 2 * 7 / 8 * 4 * (2_000_000 + 60 * 1_000_000) / 450e9
    comm = 60 * a2a * 1.25 / 450e9 + allreduce  # the exchange sends 1.25× the useful rows
    assert p["a2a_volume_ratio"] == pytest.approx(1.25)
    assert p["tokens_per_s_no_overlap"] == pytest.approx(8 * 4096 / (6.2 + comm))
    assert p["tokens_per_s_full_overlap"] == pytest.approx(8 * 4096 / max(6.2, comm))
    padded = 60 * a2a * 8 / 450e9 + allreduce
    assert p["tokens_per_s_padded_a2a_no_overlap"] == pytest.approx(8 * 4096 / (6.2 + padded))
    # (a)'s rates: E384 at 32k rows vs E48 at 262k rows (scaled to 32k), 2 forwards + 1 dx each.
    rows = [
        {"case": f"E{e}-{proj}", "impl": "pallas-int4", "M": m, "fwd_ms": f, "dx_ms": d}
        for e, m, proj, f, d in (
            (384, 32768, "gate_up", 10.0, 12.0),
            (384, 32768, "down", 5.0, 6.0),
            (48, 262144, "gate_up", 40.0, 48.0),
            (48, 262144, "down", 20.0, 24.0),
        )
    ]
    p = bench_step.project_8xh200(b, c, full, gmm_rows=rows)
    saving = (2 * 10 + 12 + 2 * 5 + 6 - (2 * 40 + 48 + 2 * 20 + 24) / 8) * 1e-3
    assert p["expert_gemm_saving_per_layer_s"] == pytest.approx(saving)
    t = 0.20 + 60 * (0.10 - saving)
    assert p["tokens_per_s_no_overlap_e48_gemm_rate"] == pytest.approx(8 * 4096 / (t + comm))


def test_hf_baseline_widths_are_the_preset(bench_step):
    assert bench_step.hf_width_mismatches() == []
