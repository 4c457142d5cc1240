"""Multimodal fine-tuning of a tiny Kimi-K2.5 (text model + MoonViT tower), end to end.

`k2jax train --config configs/tiny_vision_train.gin` on a tiny K2.5 checkpoint written by
`make_tiny_checkpoint(layout="k25", vision=True)` and the colour chats of `write_image_chats`
(only the image tells the answers apart): the loss falls. In process: the tower is frozen and
adapter-free by default, trained through LoRA when lora.targets name it; without images in the
data the tower is not loaded; `k2jax plan` counts it. (That the training path's per-row images
give transformers' logits is tests/test_vision.py's.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import ROOT

from k2jax.config import CONFIG_DIR, ConfigError
from k2jax.data.testing import write_image_chats
from k2jax.testing import make_tiny_checkpoint
from k2jax.train import Trainer
from k2jax.train.planner import plan_config

pytest.importorskip("cv2")
CONFIG = CONFIG_DIR / "tiny_vision_train.gin"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("k25")
    base = make_tiny_checkpoint(root / "base", format="int4", layout="k25", vision=True)
    chats = write_image_chats(root / "chats", 24)
    text = root / "text.jsonl"
    text.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            }
        )
        + "\n"
    )
    return root, base, chats, text


def _overrides(run_dir, base, data, *extra):
    return [
        f"model.path={str(base)!r}",
        f"data.path={str(data)!r}",
        f"train.run_dir={str(run_dir)!r}",
        "log.progress=False",
        "schedule.warmup_steps=0",
        *extra,
    ]


def test_multimodal_fine_tune_from_the_cli(files, tmp_path):
    _, base, chats, _ = files
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "k2jax.cli", "train", "--config", str(CONFIG)]
    for o in _overrides(run_dir, base, chats, "train.steps=12", "log.every=1"):
        args += ["--set", o]
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.4 * np.mean(losses[:3]), losses


def _trainer(files, tmp_path, *extra):
    _, base, chats, _ = files
    return Trainer.from_config(CONFIG, _overrides(tmp_path / "run", base, chats, *extra))


def test_tower_is_frozen_unless_lora_names_it(files, tmp_path):
    text_only = '("q_a_proj", "o_proj", "gate_proj")'
    with _trainer(files, tmp_path / "a", f"lora.targets={text_only}", "train.steps=2") as t:
        t.setup()
        assert t.vision is not None
        assert "vision_tower" in t.frozen and "vision_tower" not in t.state["trainable"]["lora"]
        before = jax.device_get(t.frozen["vision_tower"])
        t.fit()
        after = jax.device_get(t.frozen["vision_tower"])
        assert all(
            np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after))
        )
    with _trainer(files, tmp_path / "b", "train.steps=3") as t:
        t.setup()
        lora = t.state["trainable"]["lora"]
        assert set(lora["vision_tower"]["blocks"]) == {"wqkv", "wo", "fc0", "fc1"}
        assert set(lora["mm_projector"]) == {"proj_0", "proj_2"}
        t.fit()
        b = jax.device_get(t.state["trainable"]["lora"]["vision_tower"]["blocks"]["wqkv"]["lora_B"])
        assert np.abs(b).max() > 0  # B started at zero: the tower's adapters were trained


def test_tower_is_left_out_without_images_and_required_with_them(files, tmp_path):
    _, base, chats, text = files
    over = _overrides(tmp_path / "run", base, text, "train.steps=1")
    with Trainer.from_config(CONFIG, over) as t:
        t.setup()
        assert t.vision is None and "vision_tower" not in t.frozen
    k2 = make_tiny_checkpoint(tmp_path / "k2", format="int4", layout="k2")
    over = _overrides(tmp_path / "run2", k2, chats, "train.steps=1", "data.template='kimi_k25'")
    with pytest.raises(ConfigError, match="the data has 24 images, but the model has no vision"):
        Trainer.from_config(CONFIG, over).setup()


def test_plan_counts_the_vision_tower(files, tmp_path):
    _, base, chats, _ = files
    over = _overrides(tmp_path / "run", base, chats)
    [plan] = plan_config(
        str(CONFIG), over, mesh_sizes={"data": 1, "expert": 1, "tensor": 1}
    ).values()
    assert plan.image_patches == 64 and plan.vision_weights > 0
    assert plan.vision_weights < plan.bf16_weights
    assert "of which vision tower (64 patches/row)" in plan.table()


def test_generate_and_chat_with_images(files, tmp_path):
    """Greedy generation with an image: the KV-cached prefill takes the prompt's images, so
    each new token is the argmax of the full forward on the prompt so far, images included;
    `k2jax chat --image` answers the same."""
    import k2jax
    from k2jax.data.images import ImageProcessor

    _, base, chats, _ = files
    image = str(chats.parent / "image_0001.png")
    model = k2jax.load_model(base, dtype="float32")
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}],
        }
    ]
    out = model.generate(messages, max_new_tokens=3, temperature=0.0, template="kimi_k25")
    pixels, grid = ImageProcessor.from_dir(base)([image])
    ids = list(out.prompt_tokens)
    for token in out.tokens:
        logits = np.asarray(model.logits([ids], pixel_values=pixels, image_grid_thw=grid))
        assert int(logits[0, -1].argmax()) == token
        ids.append(token)
    text_only = model.generate("Colour?", max_new_tokens=3, temperature=0.0, template="kimi_k25")
    assert len(out.prompt_tokens) > len(text_only.prompt_tokens) + 4  # the image's tokens

    args = [sys.executable, "-m", "k2jax.cli", "chat", "--model", str(base), "--image", image]
    args += ["--prompt", "Colour?", "--temperature", "0", "--max-new-tokens", "3"]
    args += ["--dtype", "float32", "--template", "kimi_k25"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == out.text.strip()
    bad = [str(tmp_path / "nope.png") if a == image else a for a in args]
    missing = subprocess.run(bad, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "nope.png: no such file" in missing.stderr
