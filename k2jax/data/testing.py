"""A tiny but real Kimi-format tokenizer for tests, tiny checkpoints and the CPU demo.

`write_tiny_tokenizer(folder)` writes the same two files a Kimi checkpoint has — `tiktoken.model`
and `tokenizer_config.json` — so everything downstream (`KimiTokenizer.from_dir`, the chat
templates, the dataset, the tiny checkpoint writer) runs the production code path, only with a
vocabulary of ~1,000 ids instead of 163,840 that a tiny model can embed.

The vocabulary is built the way real BPE vocabularies are: the 256 single bytes (ids 0-255, in
byte order) followed by `num_merges` merges learned by byte-pair encoding on a built-in corpus,
after splitting it with Kimi's own pre-tokenizer regex. The corpus is a short English text plus
the demo conversations (`k2jax.data.make_demo_chats`), so the demo's pirate phrases become a few
tokens each and its examples fit a 128-token row. Ties between equally frequent pairs are broken
by the pair's bytes, so the files are byte-for-byte deterministic.

The special ids follow Kimi's layout exactly: 256 slots after the base vocabulary, the named ones
at their documented offsets (`KIMI_SPECIAL_OFFSETS`: [BOS] at +0, <|im_end|> at +2, ... [PAD] at
+255; K2's real ids are 163584 + offset, K2_FACTS §4.1), the rest reserved.
"""

from __future__ import annotations

import base64
import collections
import functools
import itertools
import json
import os
from pathlib import Path

import regex

from k2jax.data.make_demo_chats import demo_text
from k2jax.data.tokenizer import KIMI_SPECIAL_OFFSETS, NUM_RESERVED_SPECIAL_TOKENS, PAT_STR

# The tool-call and think tokens are `special: false` in Kimi's config (so they survive
# skip_special_tokens decoding, K2_FACTS §4.1); we write the same flags.
_NOT_SKIPPED = {
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<think>",
    "</think>",
}

_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A ship sails on the sea, and the crew sings
while the wind blows from the west. What is the weather like today? It is sunny and warm,
with a light breeze. Please tell me the time, the date and the name of this city.
You are Kimi, an AI assistant created by Moonshot AI.
I think the answer is 42, but let me check: 6 times 7 equals 42. Yes, that is right.
The user asked a question and the assistant gave an answer. The tool returned a result.
system user assistant tool tool_declare functions.get_weather:0 ## Return of
{"city": "Paris"} {"type":"function","function":{"name":"get_weather","parameters":{}}}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2025. Punctuation: , . ; : ! ? ' " ( ) [ ] { } - _
"""


def default_corpus() -> str:
    """The built-in BPE corpus: general English plus the demo conversations."""
    return _ENGLISH + demo_text()


def learn_bpe_merges(text: str, num_merges: int) -> list[bytes]:
    """Learns `num_merges` byte-pair merges on `text`; returns the new tokens in rank order.

    Pieces come from Kimi's pre-tokenizer regex (the `regex` module's V1 mode understands its `&&`
    class intersections), so no merge crosses a boundary tiktoken will split at. Pair counts are
    updated incrementally, touching only the pieces that contain the merged pair. Results are
    cached per (text, num_merges) within the process.
    """
    return list(_learn_bpe_merges(text, num_merges))


@functools.lru_cache(maxsize=4)
def _learn_bpe_merges(text: str, num_merges: int) -> tuple[bytes, ...]:
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    pieces = collections.Counter(
        m.encode("utf-8") for m in regex.findall(PAT_STR, text, flags=regex.V1)
    )
    words = [[bytes([b]) for b in piece] for piece in pieces]
    freqs = list(pieces.values())
    pair_counts: collections.Counter = collections.Counter()
    where: dict[tuple[bytes, bytes], set[int]] = collections.defaultdict(set)
    for wi, w in enumerate(words):
        for pair in itertools.pairwise(w):
            pair_counts[pair] += freqs[wi]
            where[pair].add(wi)

    vocab = {bytes([b]) for b in range(256)}
    merges: list[bytes] = []
    while len(merges) < num_merges:
        if not pair_counts:
            raise ValueError(
                f"the corpus supports only {len(merges)} merges, {num_merges} were asked for"
            )
        # Most frequent pair; ties broken by the pair's bytes (deterministic).
        best = min(pair_counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merged = best[0] + best[1]
        if merged not in vocab:  # two different pairs can spell the same bytes
            vocab.add(merged)
            merges.append(merged)
        for wi in sorted(where.pop(best)):
            w, f = words[wi], freqs[wi]
            for pair in itertools.pairwise(w):
                pair_counts[pair] -= f
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
                if pair != best:
                    where[pair].discard(wi)
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for pair in itertools.pairwise(out):
                pair_counts[pair] += f
                where[pair].add(wi)
    return tuple(merges)


def write_tiny_tokenizer(
    path: str | os.PathLike, *, num_merges: int = 512, corpus: str | None = None
) -> int:
    """Writes `tiktoken.model` + `tokenizer_config.json` (Kimi's layout) into folder `path`.

    The vocabulary is 256 byte tokens + `num_merges` learned merges + 256 special ids; returns
    that total (the embedding size a model needs): 1024 with the default 512 merges.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    merges = learn_bpe_merges(default_corpus() if corpus is None else corpus, num_merges)
    tokens = [bytes([b]) for b in range(256)] + merges
    lines = [f"{base64.b64encode(t).decode('ascii')} {rank}\n" for rank, t in enumerate(tokens)]
    (path / "tiktoken.model").write_text("".join(lines), encoding="ascii")

    num_base = len(tokens)
    decoder = {
        str(num_base + offset): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": name not in _NOT_SKIPPED,
        }
        for name, offset in sorted(KIMI_SPECIAL_OFFSETS.items(), key=lambda kv: kv[1])
    }
    config = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [
            "<|im_end|>",
            "<|im_user|>",
            "<|im_assistant|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "[EOT]",
            "<|im_system|>",
            "<|im_middle|>",
        ],
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1048576,
        "tokenizer_class": "TikTokenTokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return num_base + NUM_RESERVED_SPECIAL_TOKENS


# Colours of `write_image_chats`, as RGB.
IMAGE_CHAT_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 40),
}
_IMAGE_QUESTIONS = ("What colour is this?", "Which colour do you see?", "Name the colour.")


def write_image_chats(folder: str | os.PathLike, n: int = 32, *, seed: int = 0) -> Path:
    """Writes `n` small image+text chats into `folder`: PNG files of one colour of
    IMAGE_CHAT_COLOURS with noise, of random sizes and aspect ratios (28–112 pixels a side), and
    `chats.jsonl` whose user turns show the image (an OpenAI image part, a path relative to the
    folder) and ask its colour, answered "It is {colour}.". Only the image tells the answers
    apart, so a falling loss means the model reads the images. Returns the JSONL path.

    Needs OpenCV (the `images` extra) to write the PNG files."""
    import cv2
    import numpy as np

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(IMAGE_CHAT_COLOURS)
    lines = []
    for i in range(n):
        colour = names[i % len(names)]
        h, w = (int(x) for x in rng.integers(28, 113, 2))
        rgb = np.asarray(IMAGE_CHAT_COLOURS[colour], np.int16)
        pixels = np.clip(rgb + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
        file = f"image_{i:04d}.png"
        if not cv2.imwrite(str(folder / file), pixels[..., ::-1]):
            raise OSError(f"{folder / file}: could not be written")
        question = _IMAGE_QUESTIONS[int(rng.integers(len(_IMAGE_QUESTIONS)))]
        user = [{"type": "image", "image": file}, {"type": "text", "text": question}]
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": f"It is {colour}."},
        ]
        lines.append(json.dumps({"messages": messages}))
    out = folder / "chats.jsonl"
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)
    return out
