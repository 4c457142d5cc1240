"""The familiar stack, measured on the same machine: HF transformers + PEFT LoRA training step.

Runs with torch (the GPU machine has torch, transformers and peft preinstalled; on CPU use the
reference environment .venv-ref with --tiny for a smoke test). Not imported by k2jax.

    python benchmarks/hf_peft_baseline.py --out hf.json                 # Kimi-K2 widths (GPU)
    .venv-ref/bin/python benchmarks/hf_peft_baseline.py --tiny --out /tmp/hf.json   # smoke test

The model is transformers' DeepseekV3ForCausalLM with Kimi-K2's widths (hidden 7168, 64 heads,
MLA ranks 1536/512, 128/64/128 head dims, vocab 163,840, expert width 2048) cut to 1 dense + 3 MoE
layers of 96 routed experts (the largest slice HF + PEFT can hold on one 80 GB GPU; GPU_NOTES.md),
random bf16 weights, LoRA r=16 on every linear: attention, dense MLP, shared experts (listed
explicitly: PEFT rewrites a bare "gate_proj" to the fused experts only) and the fused routed experts
(`target_parameters`). AdamW on the adapters, seq 4096, batch 1, no remat.

FLOPs per token (the same convention as k2jax's benchmark): 4 × active parameters (forward 2,
input-gradient 2; LoRA's own gradients are negligible) + attention 4 × 2 × seq × H × (dqk + dv) / 2
(causal: half the square), i.e. forward+backward of QK and PV.
"""

from __future__ import annotations

import argparse
import json
import time

K2_WIDTHS = dict(
    vocab_size=163840,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_attention_heads=64,
    num_key_value_heads=64,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_shared_experts=1,
    num_experts_per_tok=8,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.827,
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    max_position_embeddings=131072,
    rope_theta=50000.0,
    rope_scaling={
        "type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    num_nextn_predict_layers=0,
)
TINY_WIDTHS = dict(
    K2_WIDTHS,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
)

LINEARS = (
    r".*\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(gate_proj|up_proj|down_proj)"
    r"|mlp\.shared_experts\.(gate_proj|up_proj|down_proj))$"
)


def active_params_per_token(cfg) -> float:
    """Parameters a token passes through (routed: top-k experts only), embeddings excluded."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    qk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    attn = (
        d * cfg.q_lora_rank
        + cfg.q_lora_rank * h * qk
        + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + dv)
        + h * dv * d
    )
    dense = 3 * d * cfg.intermediate_size
    moe = 3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    n_dense = cfg.first_k_dense_replace
    n_moe = cfg.num_hidden_layers - n_dense
    router = d * cfg.n_routed_experts
    return (
        cfg.num_hidden_layers * attn + n_dense * dense + n_moe * (moe + router) + d * cfg.vocab_size
    )


def flops_per_token(cfg, seq: int) -> float:
    h, qk, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    attn = (
        cfg.num_hidden_layers * 4 * h * seq * (qk + dv)
    )  # fwd+bwd(input) of QKᵀ and PV, causal half
    return 4 * active_params_per_token(cfg) + attn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny widths (CPU smoke test)")
    ap.add_argument("--experts", type=int, default=96)
    ap.add_argument("--moe-layers", type=int, default=3)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=800.0)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    widths = TINY_WIDTHS if args.tiny else K2_WIDTHS
    cfg = DeepseekV3Config(
        **widths,
        num_hidden_layers=1 + args.moe_layers,
        first_k_dense_replace=1,
        n_routed_experts=args.experts,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
    lora = LoraConfig(
        r=16,
        lora_alpha=16,
        target_modules=LINEARS,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (1, args.seq), device=device)

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tps = args.seq / dt
    fpt = flops_per_token(cfg, args.seq)
    result = {
        "system": "hf_transformers+peft",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "experts": args.experts,
        "layers": f"1 dense + {args.moe_layers} MoE",
        "seq": args.seq,
        "step_s": dt,
        "tokens_per_s": tps,
        "flops_per_token": fpt,
        "mfu": tps * fpt / (args.peak_tflops * 1e12),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
        "trainable_params": sum(p.numel() for p in trainable),
        "final_loss": loss.item(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
