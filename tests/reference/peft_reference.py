"""Torch reference for k2jax's PEFT export; runs in .venv-ref (torch CPU, transformers, peft).

    python peft_reference.py --spec spec.json --out DIR

Builds a transformers DeepseekV3ForCausalLM from spec["config"] with the seeded non-trivial weights
of hf_model.py, saves it with `save_pretrained` to DIR/base (float32 safetensors), and writes
DIR/logits.npz: "base" (the model alone on spec["tokens"]) and, for every adapter folder in
spec["adapters"] (name → path), the logits after `PeftModel.from_pretrained(model, path)` —
PEFT 0.21's own loading, including its transformers-v5 MoE conversion. A loading warning about
missing or unexpected adapter keys is an error: an adapter PEFT loads only partly must not pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_model import randomize

BAD_WARNINGS = ("missing", "unexpected", "not found", "did not match any", "but no ")
# PEFT warns about every rank/alpha pattern on a *parameter* target (it only checks module
# targets); those patterns are applied nevertheless (the fused adapter's shapes prove it).
HARMLESS = ("rank_pattern keys did not match", "alpha_pattern keys did not match")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    out = Path(args.out)
    torch.set_grad_enabled(False)

    cfg = DeepseekV3Config(**spec["config"])
    torch.manual_seed(spec["seed"])
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    randomize(model, spec["seed"])
    model.save_pretrained(out / "base")
    tokens = torch.tensor(spec["tokens"], dtype=torch.long)
    logits = {"base": model(input_ids=tokens).logits.float().numpy()}

    for name, path in spec["adapters"].items():
        fresh = DeepseekV3ForCausalLM.from_pretrained(out / "base", dtype=torch.float32).eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(fresh, path)
        for w in caught:
            text = str(w.message)
            if any(b in text.lower() for b in BAD_WARNINGS) and not any(
                h in text for h in HARMLESS
            ):
                raise SystemExit(f"adapter {name}: PEFT warned while loading: {text}")
        logits[name] = peft_model(input_ids=tokens).logits.float().numpy()
        n = sum(1 for k in peft_model.state_dict() if ".lora_A." in k)
        print(f"{name}: {n} LoRA A factors in the PEFT model")
    np.savez(out / "logits.npz", **logits)


if __name__ == "__main__":
    main()
