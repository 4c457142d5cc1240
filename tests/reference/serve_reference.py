"""Torch reference for serving a merged checkpoint; runs in .venv-ref (Python 3.11, torch,
transformers, compressed-tensors).

    python serve_reference.py logits --folder MERGED --tokens tokens.json --out out.npz

Loads a checkpoint folder the way a transformers user serves it — `from_pretrained` on the folder
itself, so its quantization_config engages transformers' compressed-tensors integration, which
reads `.weight_packed/.weight_scale/.weight_shape` and decompresses the routed experts — and writes
the float32 logits on the given tokens. transformers decompresses into the scales' dtype (bf16
for Kimi) and would then run the experts in bf16; the decompressed experts are upcast to float32
(exactly) so that the comparison sees the stored weights and not bf16 arithmetic. Nothing is decoded by hand here, unlike
loader_reference.logits_of_folder: this is the serving path, not the format check.

Kimi's config.json names `model_type: kimi_k2` with an `auto_map` to its own modeling code, which
transformers does not know without `trust_remote_code`; its architecture is DeepseekV3's (the
config's `architectures` says so, and vLLM / SGLang map it to their DeepseekV3 model), so the
config is read as a DeepseekV3Config.

out.npz (np.savez, no pickles): logits, and `expert_dtype` (the dtype name transformers holds
the decompressed experts in, as a 0-d string array). Loading with any missing, unexpected or
mismatched key is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from hf_model import require_all_loaded


def load(folder: Path) -> DeepseekV3ForCausalLM:
    config = json.loads((folder / "config.json").read_text())
    config.pop("auto_map", None)
    config["model_type"] = "deepseek_v3"
    model, info = DeepseekV3ForCausalLM.from_pretrained(
        folder,
        config=DeepseekV3Config.from_dict(config),
        dtype=torch.float32,
        output_loading_info=True,
    )
    require_all_loaded(info, f"{folder}")
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("logits")
    b.add_argument("--folder", required=True)
    b.add_argument("--tokens", required=True)
    b.add_argument("--out", required=True)
    args = ap.parse_args()
    model = load(Path(args.folder))
    tokens = torch.tensor(json.loads(Path(args.tokens).read_text()))
    experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    dtype = str(experts[0].gate_up_proj.dtype).removeprefix("torch.") if experts else "none"
    for m in experts:  # bf16 -> float32 is exact: the weights stay what was decompressed, and
        m.float()  # the experts compute in float32 like the rest, not in bf16
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float().numpy()
    np.savez(args.out, logits=logits, expert_dtype=np.array(dtype))
    print(f"logits {tuple(logits.shape)}; experts held as {dtype}")


if __name__ == "__main__":
    main()
