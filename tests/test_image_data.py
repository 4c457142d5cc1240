"""Image+text SFT data (k2jax.data.media, chat, formats, examples, dataset) for Kimi-K2.5.

The rendering of image parts is written out by hand from K2.5's chat_template.jinja (its
render_content macro, rendered with transformers' template settings: each image becomes
`<|media_begin|>image<|media_content|><|media_pad|><|media_end|>` and a newline), and the pad
expansion is transformers' Kimi_K25Processor rule (one `<|media_pad|>` per merged patch group);
the pixel values are the ImageProcessor's, which tests/test_images.py checks against
transformers bit for bit. Checked here: both record forms (OpenAI parts, ShareGPT `images` +
`<image>`), no loss on image tokens, packed batches carrying each row's images in token order,
the per-row patch budget, exact resume, and bad images named by file and line.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from k2jax.data import DataConfig, DataError, KimiTokenizer, PackedBatches, validate_data
from k2jax.data.chat import ChatFormatError, encode_chat, render
from k2jax.data.formats import RecordFormat
from k2jax.data.images import ImageProcessor
from k2jax.data.testing import write_tiny_tokenizer

cv2 = pytest.importorskip("cv2")

IMG = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>\n"
U, A, E = "<|im_user|>user<|im_middle|>", "<|im_assistant|>assistant<|im_middle|>", "<|im_end|>"
PROC = ImageProcessor(max_patches=64)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    return KimiTokenizer.from_dir(path)


def _png(path, h, w, seed=0):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return img[..., ::-1]  # RGB


def _chat(image_parts, answer="A cat."):
    return [
        {"role": "user", "content": [*image_parts, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": answer},
    ]


def test_image_parts_render_as_the_k25_template(tmp_path):
    parts = [
        {"type": "image_url", "image_url": {"url": "file:///x/a.png"}},
        {"type": "image", "image": "b.png"},
    ]
    got = render(_chat(parts), "kimi_k25")
    assert got == f"{U}{IMG}{IMG}What is it?{E}{A}<think></think>A cat.{E}"
    # text between images, an image last, and in a system message
    messages = [
        {"role": "system", "content": [{"type": "image", "image": "s.png"}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": "a"}],
        },
        {"role": "assistant", "content": "ok"},
    ]
    assert render(messages, "kimi_k25") == (
        f"<|im_system|>system<|im_middle|>{IMG}{E}{U}Look:{IMG}{E}{A}<think></think>ok{E}"
    )


def test_pads_expand_per_merged_group_and_are_not_learned(tok):
    calls = []

    def images(part):
        calls.append(part.source)
        return {"a.png": 3, "b.png": 2}[part.source], part.source

    parts = [{"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"}]
    enc = encode_chat(_chat(parts), tok, "kimi_k25", images=images, train_on_prompt=True)
    pad = tok.encode_special("<|media_pad|>")
    assert calls == ["a.png", "b.png"] and enc.images == ("a.png", "b.png")
    assert int((enc.tokens == pad).sum()) == 5
    # the ids are those of the template's string with each image's pads repeated
    begin, end = tok.encode_special("<|media_begin|>"), tok.encode_special("<|media_end|>")
    starts, ends = np.flatnonzero(enc.tokens == begin), np.flatnonzero(enc.tokens == end)
    head = len(tok.encode("image")) + 1  # "image", <|media_content|>
    assert [int(e - s - 1) for s, e in zip(starts, ends)] == [head + 3, head + 2]
    # no token of an image block is learned, even with train_on_prompt
    block = np.zeros(len(enc), bool)
    for s, e in zip(starts, ends):
        block[s : e + 1] = True
    assert not enc.loss_mask[block].any() and enc.loss_mask[~block].all()


def test_images_need_the_k25_template_and_a_vision_model(tok):
    parts = [{"type": "image", "image": "a.png"}]
    with pytest.raises(ChatFormatError, match="kimi_k25 template"):
        render(_chat(parts), "kimi_k2_thinking")
    with pytest.raises(ChatFormatError, match="no vision tower"):
        encode_chat(_chat(parts), tok, "kimi_k25")
    with pytest.raises(ChatFormatError, match="still images only"):
        render(_chat([{"type": "video_url", "video_url": {"url": "v.mp4"}}]), "kimi_k25")


def test_sharegpt_images_replace_placeholders(tmp_path):
    fmt = RecordFormat(media_dir=str(tmp_path))
    rec = {
        "conversations": [
            {"from": "human", "value": "<image>Describe<image> both"},
            {"from": "gpt", "value": "Two."},
        ],
        "images": ["a.png", "sub/b.png"],
    }
    conv = fmt.parse(rec, "f.jsonl:3").example
    assert conv.messages[0]["content"] == [
        {"type": "image", "image": str(tmp_path / "a.png")},
        {"type": "text", "text": "Describe"},
        {"type": "image", "image": str(tmp_path / "sub/b.png")},
        {"type": "text", "text": " both"},
    ]
    with pytest.raises(DataError, match=r"f.jsonl:3: invalid image: 1 image\(s\) .* 2 <image>"):
        fmt.parse({**rec, "images": ["a.png"]}, "f.jsonl:3")
    declared = RecordFormat("sharegpt", {"images": "pics"}, media_dir=str(tmp_path))
    conv = declared.parse({"conversations": rec["conversations"], "pics": rec["images"]}, "x:1")
    conv = conv.example
    assert conv.messages[0]["content"][2]["image"] == str(tmp_path / "sub/b.png")


def test_sources_resolve_locally(tmp_path):
    fmt = RecordFormat(media_dir=str(tmp_path))
    parts = [
        {"type": "image_url", "image_url": {"url": "file:///abs/a%20b.png"}},
        {"type": "image_url", "image_url": "rel.png"},
        {"type": "image", "image": "/abs/c.png"},
    ]
    conv = fmt.parse({"messages": _chat(parts)}, "f:1").example
    got = [p["image"] for p in conv.messages[0]["content"][:3]]
    assert got == ["/abs/a b.png", str(tmp_path / "rel.png"), "/abs/c.png"]
    web = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
    with pytest.raises(DataError, match="f:1: invalid image: .*downloads nothing"):
        fmt.parse({"messages": _chat(web)}, "f:1")


def _write_data(tmp_path, records):
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _config(path, **kw):
    kw = {"template": "kimi_k25", "seq_len": 256, "batch_size": 2, "shuffle": False, **kw}
    return DataConfig(path=str(path), **kw)


def test_packed_batches_carry_each_rows_images(tmp_path, tok):
    a = _png(tmp_path / "a.png", 40, 60, 1)  # padded to 56×84: 4×6 patches
    b = _png(tmp_path / "b.png", 30, 30, 2)  # 4×4 patches
    encoded = base64.b64encode(cv2.imencode(".png", b[..., ::-1])[1].tobytes()).decode()
    records = [
        {"messages": _chat([{"type": "image", "image": "a.png"}])},
        {
            "messages": _chat(
                [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}}]
            )
        },
        {
            "conversations": [
                {"from": "human", "value": "<image><image>?"},
                {"from": "gpt", "value": "x"},
            ],
            "images": ["b.png", "a.png"],
        },
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    cfg = _config(_write_data(tmp_path, records), image_patches=40)
    check = validate_data(cfg)
    assert check.images == 4 and not check.skipped
    batch = next(PackedBatches(cfg, tok, images=PROC))
    assert batch["pixel_values"].shape == (2, 40, 3 * 14 * 14)
    assert batch["image_grid_thw"].shape == (2, 10, 3)
    pa, ga = PROC([a])
    pb, gb = PROC([b])
    assert (len(pa), len(pb)) == (24, 16)
    # row 0: a + b from the data URL (40 patches); record 3 (40 more) opens row 1
    assert batch["image_grid_thw"][0, :3].tolist() == [ga[0].tolist(), gb[0].tolist(), [0, 0, 0]]
    want = np.concatenate([pa, pb]).reshape(40, -1)
    assert np.array_equal(batch["pixel_values"][0], want)
    assert batch["image_grid_thw"][1, :2].tolist() == [gb[0].tolist(), ga[0].tolist()]
    pad = tok.encode_special("<|media_pad|>")
    for r in range(2):
        grids = batch["image_grid_thw"][r]
        assert (batch["tokens"][r] == pad).sum() == grids.prod(-1).sum() // 4
        # nothing predicts an image token, nor is predicted from inside an image
        assert not batch["loss_mask"][r][batch["targets"][r] == pad].any()


def test_patch_budget_and_resume(tmp_path, tok):
    _png(tmp_path / "a.png", 40, 60)
    records = [
        {"messages": _chat([{"type": "image", "image": "a.png"}], f"answer {i}")} for i in range(5)
    ]
    records.insert(2, {"messages": _chat([{"type": "image", "image": "a.png"}] * 2)})  # 48
    cfg = _config(_write_data(tmp_path, records), image_patches=40, num_epochs=2)
    stream = PackedBatches(cfg, tok, images=PROC)
    first = next(stream)
    # one 24-patch image per row: the budget, not the tokens, closes each row
    assert [int((g.prod(-1) > 0).sum()) for g in first["image_grid_thw"]] == [1, 1]
    state = stream.state()
    rest = list(stream)
    assert stream.last_epoch_summary.count("too many image patches") == 1
    again = list(PackedBatches(cfg, tok, images=PROC, state=state))
    assert len(again) == len(rest) > 0
    for x, y in zip(rest, again):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_bad_images_are_named_with_file_and_line(tmp_path, tok):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    huge = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (60000).to_bytes(4, "big") * 2 + b"\x08\x02"
    (tmp_path / "huge.png").write_bytes(huge + b"\x00" * 64)
    _png(tmp_path / "ok.png", 28, 28)
    records = [
        {"messages": _chat([{"type": "image", "image": "ok.png"}])},
        {"messages": _chat([{"type": "image", "image": "missing.png"}])},
        {"messages": _chat([{"type": "image", "image": "huge.png"}])},
        {"messages": _chat([{"type": "image", "image": "broken.png"}])},
    ]
    path = _write_data(tmp_path, records)
    check = validate_data(_config(path))
    # the cheap check finds the missing and the oversized file; the broken one needs decoding
    assert check.skipped == {"invalid image": 2}
    text = " ".join(map(str, check.first_bad))
    assert (
        f"{path}:2: invalid image: message 0: content[0]: {tmp_path}/missing.png: no such" in text
    )
    assert f"{path}:3: invalid image" in text and "60000×60000 pixels" in text
    with pytest.raises(DataError, match=f"{path}:2: invalid image"):
        validate_data(_config(path, on_bad_example="error"))
    stream = PackedBatches(_config(path, num_epochs=1), tok, images=PROC)
    list(stream)
    assert "3 skipped (invalid image: 3)" in stream.last_epoch_summary
    broken = _write_data(tmp_path / "b", [records[0], records[3]])
    with pytest.raises(DataError, match=f"{broken}:2: invalid image: .*broken.png: not an image"):
        list(
            PackedBatches(
                _config(broken, on_bad_example="error", media_dir=str(tmp_path)), tok, images=PROC
            )
        )
    # a text model: an image is a bad example, not silently dropped text
    with pytest.raises(DataError, match=f"{path}:1: unsupported content: .*no vision tower"):
        next(PackedBatches(_config(path, on_bad_example="error"), tok))
