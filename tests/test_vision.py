"""Kimi-K2.5's vision tower and projector against transformers' kimi_k25 (torch reference env).

tests/reference/vision_reference.py builds one tiny random Kimi_K25ForConditionalGeneration
(float32), saves it under the released checkpoints' tensor names (and checks transformers reads
them back to the same logits), and computes its logits on prompts with images. Here
`k2jax.load_model(folder).logits(input_ids, pixel_values=..., image_grid_thw=...)` must give
the same logits (≤ 1e-5 relative): one image whose grid equals the learned position table, one
larger and one smaller than it (bicubic resampling both ways, non-square grids), two images of
different sizes in one prompt (block-diagonal attention), and a text-only prompt.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_HF_CONFIG, rel_err, run_reference, write_json

import k2jax
from k2jax.config import ConfigError
from k2jax.config.vision import VisionConfig
from k2jax.conversion.safetensors_io import CheckpointError, SafetensorsFile
from k2jax.conversion.vision_loader import expected_names
from k2jax.model.vision import grid_inputs, row_inputs
from k2jax.testing import make_tiny_checkpoint

P = 4  # patch size
IMAGE, START, END = 250, 251, 252
VISION = dict(
    patch_size=P,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    pos_emb_height=6,
    pos_emb_width=6,
    merge_kernel_size=[2, 2],
)
CONFIG = {
    "model_type": "kimi_k25",
    "text_config": {**TINY_HF_CONFIG, "model_type": "deepseek_v3"},
    "vision_config": VISION,
    "projection_hidden_size": 32,
    "image_token_id": IMAGE,
    "vision_start_token_id": START,
    "vision_end_token_id": END,
    "tie_word_embeddings": False,
}
GRIDS = {
    "same": [[1, 6, 6]],  # the table's own size: identity resampling
    "up": [[1, 8, 10]],
    "down": [[1, 4, 2]],
    "two": [[1, 4, 6], [1, 10, 8]],
}


def _case(rng, grids):
    ids, pixels = rng.integers(0, 240, 3).tolist(), []
    for _, h, w in grids:
        ids += [START] + [IMAGE] * (h * w // 4) + [END] + rng.integers(0, 240, 2).tolist()
        pixels.append(rng.normal(size=(h * w, 3, P, P)))
    return {
        "input_ids": [ids],
        "pixel_values": np.concatenate(pixels).tolist(),
        "image_grid_thw": grids,
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision")
    rng = np.random.default_rng(0)
    cases = {name: _case(rng, g) for name, g in GRIDS.items()}
    cases["text"] = {"input_ids": [rng.integers(0, 240, 9).tolist()]}
    config = {k: v for k, v in CONFIG.items() if k != "model_type"}
    spec = write_json(out / "spec.json", {"config": config, "cases": cases})
    run_reference("vision_reference.py", "build", "--spec", spec, "--out", out)
    with np.load(out / "outputs.npz") as f:
        logits = {k.removeprefix("logits."): f[k] for k in f.files}
    names = json.loads((out / "names.json").read_text())
    return out / "model", cases, logits, names


@pytest.fixture(scope="module")
def model(reference):
    return k2jax.load_model(reference[0], dtype="float32")


@pytest.mark.parametrize("case", [*GRIDS, "text"])
def test_logits_match_transformers(reference, model, case):
    _, cases, logits, _ = reference
    c = cases[case]
    kw = {}
    if "pixel_values" in c:
        kw = dict(pixel_values=c["pixel_values"], image_grid_thw=c["image_grid_thw"])
    got = np.asarray(model.logits(c["input_ids"], **kw))
    assert rel_err(got, logits[case]) <= 1e-5
    if kw:  # and the images matter: the image tokens' own embeddings give other logits
        assert rel_err(np.asarray(model.logits(c["input_ids"])), logits[case]) > 1e-2


def test_released_names_are_the_ones_read(reference, model):
    """The folder carries exactly the released tensor names (transformers reads them back in
    the reference); k2jax expects the same set for this config."""
    vision = {n for n in reference[3] if n.startswith(("vision_tower.", "mm_projector."))}
    assert vision == set(expected_names(model.vision))
    assert model.vision.image_token_id == IMAGE and model.vision.media_start_id == START


def test_vision_is_optional_and_required_on_demand(reference, tmp_path):
    text_only = k2jax.load_model(reference[0], dtype="float32", vision=False)
    assert text_only.vision is None and "vision_tower" not in text_only.params
    with pytest.raises(ValueError, match="no vision tower"):
        text_only.logits([[1, 2]], pixel_values=np.zeros((4, 48)), image_grid_thw=[[1, 2, 2]])
    folder = make_tiny_checkpoint(tmp_path / "k2", "bf16", tokenizer=False)
    with pytest.raises(CheckpointError, match="no vision tower to load"):
        k2jax.load_model(folder, dtype="float32", vision=True)


def test_bad_image_inputs_are_named(model):
    pixels = np.zeros((16, 3, P, P), np.float32)
    with pytest.raises(ValueError, match="3 image tokens .* the images need 4"):
        model.logits([[IMAGE] * 3 + [1]], pixel_values=pixels, image_grid_thw=[[1, 4, 4]])
    with pytest.raises(ValueError, match="implies 16 patches"):
        model.logits([[IMAGE] * 4], pixel_values=pixels[:8], image_grid_thw=[[1, 4, 4]])
    with pytest.raises(ValueError, match="does not split into 2×2"):
        model.logits([[IMAGE] * 4], pixel_values=pixels[:15], image_grid_thw=[[1, 3, 5]])
    with pytest.raises(ValueError, match="only still images"):
        model.logits([[IMAGE] * 4], pixel_values=pixels, image_grid_thw=[[2, 2, 4]])


def test_config_reads_both_spellings():
    """The released config's vt_* / init_pos_emb_* / media_placeholder_token_id keys and
    transformers' names describe the same tower; disagreeing values are an error."""
    released = {
        "model_type": "kimi_k25",
        "text_config": {"hidden_size": 64},
        "media_placeholder_token_id": IMAGE,
        "vision_config": {
            "patch_size": P,
            "vt_hidden_size": 32,
            "vt_num_hidden_layers": 2,
            "vt_num_attention_heads": 2,
            "vt_intermediate_size": 48,
            "init_pos_emb_height": 6,
            "init_pos_emb_width": 6,
            "init_pos_emb_time": 4,
            "merge_kernel_size": [2, 2],
            "mm_hidden_size": 32,
            "projector_ln_eps": 1e-5,
            "pos_emb_type": "divided_fixed",
            "merge_type": "sd2_tpool",
        },
    }
    a = VisionConfig.from_hf_dict(released)
    b = VisionConfig.from_hf_dict(CONFIG)
    assert (a.hidden_size, a.num_layers, a.pos_emb_height, a.image_token_id) == (
        b.hidden_size,
        b.num_layers,
        b.pos_emb_height,
        b.image_token_id,
    )
    clash = {**CONFIG, "vision_config": {**VISION, "vt_hidden_size": 64}}
    with pytest.raises(ConfigError, match="disagree"):
        VisionConfig.from_hf_dict(clash)
    gone = {**CONFIG, "vision_config": {k: v for k, v in VISION.items() if k != "hidden_size"}}
    with pytest.raises(ConfigError, match="hidden_size / vt_hidden_size"):
        VisionConfig.from_hf_dict(gone)
    other = {**CONFIG, "vision_config": {**VISION, "merge_type": "avgpool"}}
    with pytest.raises(ConfigError, match="only 'sd2_tpool'"):
        VisionConfig.from_hf_dict(other)


def test_grid_inputs_layout():
    """Patches in raster order per image, images one after the other; each merged token takes
    its 2×2 block in raster order; the identity grid resamples with one-hot weights."""
    cfg = VisionConfig.from_hf_dict(CONFIG)
    g = grid_inputs([[1, 6, 6], [1, 2, 4]], cfg)
    assert g["segment"].tolist() == [0] * 36 + [1] * 8
    assert g["merge_index"][0].tolist() == [0, 1, 6, 7]
    assert g["merge_index"][9].tolist() == [36, 37, 40, 41]
    first = g["pos_weight"][:36]
    assert np.allclose(first.max(-1), 1.0) and np.allclose(first.sum(-1), 1.0)
    rows = g["pos_index"][np.arange(36), first.argmax(-1)]
    assert rows.tolist() == list(range(36))


def test_images_per_row_match_transformers(reference, model):
    """Two prompts in one batch, each row with its own images — the layout training uses
    (`row_inputs`: every row's patches zero-padded to one length, here with spare padding
    patches) — give each prompt's transformers logits."""
    _, cases, logits, _ = reference
    a, b = cases["same"], cases["two"]
    ids = [a["input_ids"][0], b["input_ids"][0]]
    T = max(map(len, ids))
    tokens = np.zeros((2, T), np.int32)
    for r, row in enumerate(ids):
        tokens[r, : len(row)] = row
    # through the public API: transformers' flat layout, images assigned to rows by their tokens
    got = np.asarray(
        model.logits(
            tokens,
            pixel_values=np.concatenate([a["pixel_values"], b["pixel_values"]]),
            image_grid_thw=a["image_grid_thw"] + b["image_grid_thw"],
        )
    )
    for r, case in enumerate(("same", "two")):
        assert rel_err(got[r, : len(ids[r])], logits[case][0]) <= 1e-5
    # the training layout: per-row arrays with more padding patches than any row needs
    F = 3 * P * P
    pixels = np.zeros((2, 160, F), np.float32)
    pixels[0, :36] = np.reshape(a["pixel_values"], (36, F))
    pixels[1, :104] = np.reshape(b["pixel_values"], (104, F))
    grids = np.zeros((2, 3, 3), np.int64)
    grids[0, 0], grids[1, :2] = a["image_grid_thw"][0], b["image_grid_thw"]
    images = row_inputs(pixels, grids, model.vision)
    rows = np.asarray(model._logits_fn(model.variables(), jnp.asarray(tokens), None, None, images))
    for r, case in enumerate(("same", "two")):
        assert rel_err(rows[r, : len(ids[r])], logits[case][0]) <= 1e-5


@pytest.fixture(scope="module")
def tuned(reference, model):
    """A random LoRA on text attention and on every vision linear of the reference model (B
    non-zero, so every adapter changes the logits)."""
    import dataclasses

    import flax.linen as nn
    import jax

    from k2jax.lora import LoraConfig
    from k2jax.model.transformer import init_variables

    targets = ("q_a_proj", "kv_b_proj", "o_proj", "vision_tower.blocks.*", "mm_projector.*")
    lora_config = LoraConfig(rank=2, alpha=4.0, targets=targets)
    module = dataclasses.replace(model.module, lora=lora_config)
    v = nn.unbox(jax.eval_shape(lambda: init_variables(module, jax.random.key(0))))
    rng = np.random.default_rng(1)
    lora = jax.tree.map(
        lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), v["lora"]
    )
    return dataclasses.replace(model, lora=lora, lora_config=lora_config)


def test_vision_adapters_export_to_peft_and_merge(reference, model, tuned, tmp_path):
    """The trained model's logits with images are what PEFT computes on transformers'
    Kimi_K25ForConditionalGeneration with the exported adapter (wqkv unfused, rope rows
    permuted, transformers' module names), and what the merged checkpoint computes in k2jax."""
    from k2jax.conversion.merge import merge_lora
    from k2jax.conversion.peft import export_peft

    folder, cases, base_logits, _ = reference
    adapter = export_peft(
        tuned.config, tuned.lora_config, tuned.lora, None, tmp_path / "adapter", vision=tuned.vision
    )
    names = set(SafetensorsFile(adapter / "adapter_model.safetensors").keys())
    assert "base_model.model.model.vision_tower.layers.1.attn.k_proj.lora_B.weight" in names
    assert "base_model.model.model.mm_projector.out_proj.lora_A.weight" in names
    assert "base_model.model.model.language_model.layers.2.self_attn.o_proj.lora_A.weight" in names
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "attn.proj" in config["target_modules"] and "proj" not in config["target_modules"]

    spec = write_json(tmp_path / "spec.json", {"cases": cases})
    out = tmp_path / "peft.npz"
    run_reference(
        "vision_reference.py",
        "peft",
        "--model",
        folder,
        "--adapter",
        adapter,
        "--spec",
        spec,
        "--out",
        out,
    )
    merged = k2jax.load_model(
        merge_lora(folder, tuned.config, tuned.lora_config, tuned.lora, None, tmp_path / "merged"),
        dtype="float32",
    )
    with np.load(out) as f:
        for case, c in cases.items():
            kw = {}
            if "pixel_values" in c:
                kw = dict(pixel_values=c["pixel_values"], image_grid_thw=c["image_grid_thw"])
            ours = np.asarray(tuned.logits(c["input_ids"], **kw))
            # test_export.py's tolerance for PEFT (measured here: up to 2.5e-5, the three
            # unfused q/k/v adapters and PEFT's separate base + LoRA sums round differently)
            assert rel_err(ours, f[f"logits.{case}"]) <= 1e-4, case
            assert rel_err(ours, base_logits[case]) > 1e-2, case  # the adapters matter
            assert rel_err(np.asarray(merged.logits(c["input_ids"], **kw)), ours) <= 1e-4, case
