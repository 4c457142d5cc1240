"""Torch reference for the parity tests; runs in .venv-ref (Python 3.11, torch CPU, transformers).

    python hf_model.py build --spec spec.json --out DIR

For every case in the spec it builds a transformers DeepseekV3ForCausalLM from the case's HF config
with seeded random, non-trivial weights (norm weights around 1, a random router bias, weights scaled
so activations are O(1)), saves it with `save_pretrained` (safetensors, float32) to DIR/<name>/ckpt,
runs the forward pass in float32 on the case's tokens and writes DIR/<name>/outputs.npz with the
logits, the loss for labels = tokens, and the inputs/outputs of every component captured with
forward hooks (layer i's norms, attention, router, experts, MLP/MoE, whole layer; rotary cos/sin).

Only numpy arrays are written (np.savez; read back with allow_pickle=False).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def require_all_loaded(info: dict, what: str) -> None:
    """Exit with the keys `from_pretrained(..., output_loading_info=True)` did not match."""
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise SystemExit(f"{what}: transformers did not load every tensor: {bad} {info}")


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(2.0 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def capture(model, outputs: dict) -> list:
    handles = []

    def grab(key, with_input=True):
        def hook(module, args, kwargs, out):
            inp = args[0] if args else next(iter(kwargs.values()))
            if with_input:
                outputs[key + ".in"] = inp
            if isinstance(out, tuple):
                for j, o in enumerate(out):
                    if isinstance(o, torch.Tensor):
                        outputs[f"{key}.out{j}"] = o
            else:
                outputs[key + ".out"] = out

        return hook

    for i, layer in enumerate(model.model.layers):
        p = f"layers.{i}"
        handles.append(layer.register_forward_hook(grab(p), with_kwargs=True))
        for sub in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"):
            handles.append(
                getattr(layer, sub).register_forward_hook(grab(f"{p}.{sub}"), with_kwargs=True)
            )
        for sub in ("q_a_layernorm", "kv_a_layernorm"):
            mod = getattr(layer.self_attn, sub)
            handles.append(
                mod.register_forward_hook(grab(f"{p}.self_attn.{sub}"), with_kwargs=True)
            )
        if hasattr(layer.mlp, "gate"):
            handles.append(
                layer.mlp.gate.register_forward_hook(grab(f"{p}.mlp.gate"), with_kwargs=True)
            )
    handles.append(model.model.norm.register_forward_hook(grab("norm"), with_kwargs=True))

    def rotary_hook(module, args, out):
        outputs["rotary.cos"], outputs["rotary.sin"] = out

    handles.append(model.model.rotary_emb.register_forward_hook(rotary_hook))
    return handles


def build(spec: dict, out_dir: Path) -> None:
    torch.set_grad_enabled(False)
    for case in spec["cases"]:
        cfg = DeepseekV3Config(**case["config"])
        torch.manual_seed(case["seed"])
        model = DeepseekV3ForCausalLM(cfg).float().eval()
        randomize(model, case["seed"])
        ckpt = out_dir / case["name"] / "ckpt"
        model.save_pretrained(ckpt)
        tokens = torch.tensor(case["tokens"], dtype=torch.long)
        captured: dict = {}
        handles = capture(model, captured)
        out = model(input_ids=tokens, labels=tokens)
        for h in handles:
            h.remove()
        arrays = {
            k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in captured.items()
        }
        arrays["logits"] = out.logits.float().numpy()
        arrays["loss"] = np.asarray(out.loss.item(), np.float64)
        arrays["tokens"] = tokens.numpy()
        for key, extra in case.get("extra_tokens", {}).items():
            arrays[f"logits.{key}"] = model(input_ids=torch.tensor(extra)).logits.float().numpy()
        rot = model.model.rotary_emb
        arrays["rotary.inv_freq"] = rot.inv_freq.float().numpy()
        arrays["rotary.attention_scaling"] = np.asarray(rot.attention_scaling, np.float64)
        arrays["softmax_scale"] = np.asarray(model.model.layers[0].self_attn.scaling, np.float64)
        np.savez(out_dir / case["name"] / "outputs.npz", **arrays)
        print(f"built {case['name']}: {len(arrays)} arrays")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--spec", required=True)
    b.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.cmd == "build":
        build(json.loads(Path(args.spec).read_text()), Path(args.out))


if __name__ == "__main__":
    main()
