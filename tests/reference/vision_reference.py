"""Torch reference for Kimi-K2.5's vision tower; runs in .venv-ref (transformers' kimi_k25).

    python vision_reference.py build --spec spec.json --out DIR

From one transformers Kimi_K25ForConditionalGeneration with seeded random weights (float32) it
writes DIR/model: the checkpoint as the released K2.5 / K2.6 folders name their tensors.
transformers' `save_pretrained` writes three names differently from the release (its reverse
renames also turn the language model's `layers` into `blocks`, and put `encoder.` into the patch
embedding's and `model.` into the projector norm's names); those are renamed back, and the folder
is read again with `from_pretrained` — it must reproduce the model's logits exactly, which shows
the names are the ones transformers reads from a released checkpoint.

Then, for every case of the spec (input_ids, pixel_values [N, 3, P, P], image_grid_thw), it writes
the float32 logits transformers computes (DIR/outputs.npz: logits.<case>; np.savez, no pickles).

    python vision_reference.py peft --model DIR/model --adapter ADAPTER --spec spec.json --out F

loads that folder with `from_pretrained`, puts the PEFT adapter folder on it with PEFT's own
`PeftModel.from_pretrained` (a warning about missing or unexpected adapter keys is an error) and
writes the cases' logits to F (logits.<case>).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).parent))
from hf_model import randomize, require_all_loaded

# transformers 5.23's save_pretrained name -> the released checkpoints' name
RELEASED = (
    ("language_model.model.blocks.", "language_model.model.layers."),
    ("vision_tower.encoder.patch_embed.", "vision_tower.patch_embed."),
    ("model.mm_projector.", "mm_projector."),
)


def released_name(name: str) -> str:
    for old, new in RELEASED:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def randomize_vision(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("model.vision_tower.", "model.mm_projector.")):
                continue
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "position_embeddings" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def run(model, case: dict) -> np.ndarray:
    kw = {"input_ids": torch.tensor(case["input_ids"])}
    if case.get("pixel_values") is not None:
        kw["pixel_values"] = torch.tensor(np.asarray(case["pixel_values"], np.float32))
        kw["image_grid_thw"] = torch.tensor(case["image_grid_thw"])
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def build(spec: dict, out: Path) -> None:
    config = Kimi_K25Config(**spec["config"])
    torch.manual_seed(0)
    model = Kimi_K25ForConditionalGeneration(config).float().eval()
    randomize(model.model.language_model, spec.get("seed", 0))
    randomize(model.lm_head, spec.get("seed", 0) + 1)
    randomize_vision(model, spec.get("seed", 0) + 2)
    arrays = {f"logits.{name}": run(model, case) for name, case in spec["cases"].items()}

    folder = out / "model"
    model.save_pretrained(folder)
    files = sorted(folder.glob("*.safetensors"))
    index = {"metadata": {}, "weight_map": {}}
    for file in files:
        tensors = {released_name(k): v for k, v in load_file(file).items()}
        save_file(tensors, file, {"format": "pt"})
        index["weight_map"].update(dict.fromkeys(tensors, file.name))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    names = sorted(index["weight_map"])
    (out / "names.json").write_text(json.dumps(names, indent=1))

    reread, info = Kimi_K25ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    require_all_loaded(info, "the released names")
    for name, case in spec["cases"].items():
        again = run(reread.eval(), case)
        if not np.array_equal(again, arrays[f"logits.{name}"]):
            raise SystemExit(f"case {name}: the re-read folder gives other logits")
    np.savez(out / "outputs.npz", **arrays)
    print(f"built {len(arrays)} cases, {len(names)} tensors")


def peft(model_dir: Path, adapter: Path, spec: dict, out: Path) -> None:
    import warnings

    from peft import PeftModel

    model = Kimi_K25ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = PeftModel.from_pretrained(model.eval(), adapter).eval()
    for w in caught:
        text = str(w.message).lower()
        if any(bad in text for bad in ("missing", "unexpected", "not found", "did not match")):
            raise SystemExit(f"PEFT loaded the adapter only partly: {w.message}")
    arrays = {f"logits.{name}": run(tuned, case) for name, case in spec["cases"].items()}
    np.savez(out, **arrays)
    print(f"{len(arrays)} cases with the adapter")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--spec", required=True)
    b.add_argument("--out", required=True)
    p = sub.add_parser("peft")
    for flag in ("--model", "--adapter", "--spec", "--out"):
        p.add_argument(flag, required=True)
    args = ap.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    if args.cmd == "build":
        build(spec, Path(args.out))
    else:
        peft(Path(args.model), Path(args.adapter), spec, Path(args.out))


if __name__ == "__main__":
    main()
