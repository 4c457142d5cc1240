"""One parsed record -> its token examples: the chat template and masking knobs, plain texts, and
the policy for examples longer than a row (`data.overlong`).

**Plain text** (`formats.Text`: pre-training data, TRL's string prompt/completion) is the text's
tokens and `[EOS]`, all learned; a prompt before it is learned only with `train_on_prompt`.

**Over-long examples** (longer than `data.seq_len` tokens) follow `data.overlong`:

* "drop" — the stream skips the example and counts it as "too long" (the default; nothing is
  learned from a part of it).
* "split_turns" — a conversation is cut between turns into pieces that each fit, every piece
  with the system prompt (`chat.fit_turns`); one turn too long by itself is still dropped and
  counted as too long. Counted as "over-long cut at turns into pieces". A plain text is cut into
  consecutive `seq_len`-token pieces ("over-long text cut into pieces").
* "truncate" — LLaMA-Factory's `cutoff_len` rule on the example: the source (the tokens before
  the first learned one) and the target (the rest) share the row in proportion to their
  lengths, except that a target shorter than half the row is kept whole, and so is a source
  shorter than half; the source loses tokens from its start (the end, next to the answer, stays),
  the target from its end (the start of the answer stays), and the target keeps at least one
  token, so an answer is never removed whole. Counted as "over-long truncated".

An example is never cut inside an answer unless the policy says "truncate", and an example with
images is never cut by "truncate" or into text pieces (it stays whole, or is dropped as too long;
"split_turns" cuts between turns, each piece with its own images).

**Images** (kimi_k25; `k2jax.data.media`): with `ExampleSettings.images` (the checkpoint's
ImageProcessor) each image part is read and preprocessed when its example is built, and rides on
the example as a `Picture` (its patches and grid), in token order; a missing, unreadable or
oversized image is a DataError naming the record ("invalid image"). `check` looks at the files
without decoding them (they exist, can be read, and their header's size is allowed). Each note (these
counts, and a record's `formats.Parsed.notes`) rides on the example it belongs to (`Example.notes`)
and is counted by the stream when it passes that example, so counts resume exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

from k2jax.data.chat import ChatFormatError, ChatTemplate, EncodedChat, SplitExamples
from k2jax.data.chat import check_conversation as _check_conversation
from k2jax.data.chat import training_examples as _training_examples
from k2jax.data.formats import Conversation, Parsed, Text
from k2jax.data.images import MAX_PIXELS, ImageError, ImageProcessor
from k2jax.data.media import ImagePart, check_image, image_part, read_image
from k2jax.data.readers import DataError
from k2jax.data.tokenizer import KimiTokenizer

CUT = "over-long cut at turns into pieces (data.overlong)"
CUT_TEXT = "over-long text cut into pieces (data.overlong)"
TRUNCATED = "over-long truncated (data.overlong)"


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized example, where it came from, and the notes to count when it is passed."""

    chat: EncodedChat
    where: str
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ExampleSettings:
    """The knobs of `data` that shape examples (see DataConfig)."""

    template: ChatTemplate
    split: bool
    train_on_prompt: bool = False
    mask_history: bool = False
    seq_len: int | None = None  # None: no over-long policy (the caller drops long examples)
    overlong: Literal["drop", "split_turns", "truncate"] = "drop"
    images: ImageProcessor | None = None  # None: a text model; images are bad examples
    max_image_pixels: int = MAX_PIXELS


@dataclasses.dataclass(frozen=True)
class Picture:
    """One preprocessed image of an example: patches float32 [n, 3, P, P] and its grid (1, h, w)
    in patches (transformers' pixel_values and image_grid_thw rows)."""

    patches: np.ndarray
    grid: tuple[int, int, int]

    @property
    def num_patches(self) -> int:
        return len(self.patches)

    @classmethod
    def read(
        cls, part: ImagePart, processor: ImageProcessor, *, max_pixels: int = MAX_PIXELS
    ) -> Picture:
        """The image of `part` read and preprocessed by `processor` (ImageError naming it)."""
        patches, grid = processor.one(read_image(part, max_pixels=max_pixels))
        return cls(patches, tuple(grid))

    def pads(self, processor: ImageProcessor) -> int:
        """Its `<|media_pad|>` tokens: one per merged patch group."""
        return self.num_patches // processor.merge_size**2


def num_patches(pictures) -> int:
    return sum(p.num_patches for p in pictures)


def image_arrays(
    rows: list[list[Picture]], patches: int, n_rows: int, *, features: int, merge: int
) -> dict[str, np.ndarray]:
    """A batch's `pixel_values` float32 [n_rows, patches, features] and `image_grid_thw` int32
    [n_rows, patches // merge, 3] from each row's pictures (in token order; zero-padded); merge:
    patches per merged token (4)."""
    pixels = np.zeros((n_rows, patches, features), np.float32)
    grids = np.zeros((n_rows, max(1, patches // merge), 3), np.int32)
    for r, row in enumerate(rows):
        o = 0
        for k, p in enumerate(row):
            pixels[r, o : o + p.num_patches] = p.patches.reshape(p.num_patches, -1)
            grids[r, k] = p.grid
            o += p.num_patches
    return {"pixel_values": pixels, "image_grid_thw": grids}


def image_parts(conv: Conversation) -> list[ImagePart]:
    out = []
    for i, m in enumerate(conv.messages):
        content = m.get("content")
        for j, part in enumerate(content if isinstance(content, list) else ()):
            image = image_part(part, f"message {i}: content[{j}]")
            if image is not None:
                out.append(image)
    return out


def _check_images(conv: Conversation, where: str, s: ExampleSettings) -> None:
    try:
        parts = image_parts(conv)
    except ValueError as e:
        raise DataError(where, "unsupported content", str(e)) from None
    if parts and s.template.name != "kimi_k25":
        raise DataError(
            where,
            "unsupported content",
            f"{parts[0].where}: images need the kimi_k25 template (a K2.5/K2.6 model), not "
            f"{s.template.name}",
        )
    for part in parts:
        try:
            check_image(part, max_pixels=s.max_image_pixels)
        except ImageError as e:
            raise DataError(where, "invalid image", f"{part.where}: {e}") from None


def _image_reader(where: str, s: ExampleSettings):
    """The `images` callback of chat.encode_pieces for one record: reads and preprocesses each
    image once (a conversation split into turns meets an early image again)."""
    if s.images is None:
        return None
    seen: dict[str, tuple[int, Any]] = {}

    def read(part: ImagePart) -> tuple[int, Picture]:
        if part.source not in seen:
            try:
                picture = Picture.read(part, s.images, max_pixels=s.max_image_pixels)
            except ImageError as e:
                raise DataError(where, "invalid image", f"{part.where}: {e}") from None
            seen[part.source] = (picture.pads(s.images), picture)
        return seen[part.source]

    return read


def check(parsed: Parsed, where: str, s: ExampleSettings) -> None:
    """Raises the DataError `examples` would raise, short of tokenizing (so never "too long")."""
    ex = parsed.example
    if isinstance(ex, Text):
        if not ex.text:
            raise DataError(where, "missing content", "an empty text: nothing to learn")
        return
    _check_images(ex, where, s)
    try:
        _check_conversation(
            ex.messages,
            train_on_prompt=s.train_on_prompt,
            last_turn=s.mask_history or (not s.split and s.template.strips_history_reasoning),
            prompt_messages=ex.prompt_messages,
        )
    except ChatFormatError as e:
        raise DataError(where, e.reason, str(e)) from None


def examples(
    parsed: Parsed, where: str, tokenizer: KimiTokenizer, s: ExampleSettings
) -> list[Example]:
    """The examples of one record, over-long ones handled by `s.overlong` (module docstring)."""
    ex = parsed.example
    if isinstance(ex, Text):
        check(parsed, where, s)
        out = _text_examples(ex, where, tokenizer, s)
    else:
        out = _chat_examples(ex, where, tokenizer, s)
    if out and parsed.notes:
        out[0] = dataclasses.replace(out[0], notes=parsed.notes + out[0].notes)
    return out


def _chat_examples(conv: Conversation, where: str, tokenizer, s: ExampleSettings) -> list[Example]:
    try:
        encoded = _training_examples(
            conv.messages,
            tokenizer,
            s.template,
            tools=conv.tools,
            split=s.split,
            train_on_prompt=s.train_on_prompt,
            mask_history=s.mask_history,
            prompt_messages=conv.prompt_messages,
            max_len=s.seq_len if s.overlong == "split_turns" else None,
            images=_image_reader(where, s),
        )
    except ChatFormatError as e:
        raise DataError(where, e.reason, str(e)) from None
    out = []
    for k, item in enumerate(encoded):
        at = where if len(encoded) == 1 else f"{where} (turn {k + 1})"
        if isinstance(item, SplitExamples):
            n = len(item.pieces)
            out += [
                Example(p, f"{at} (piece {i + 1} of {n})", (CUT,) if i == 0 else ())
                for i, p in enumerate(item.pieces)
            ]
        else:
            out.append(_maybe_truncated(item, at, s))
    return out


def _text_examples(text: Text, where: str, tokenizer, s: ExampleSettings) -> list[Example]:
    prompt = tokenizer.encode(text.prompt) if text.prompt else []
    body = [*tokenizer.encode(text.text), tokenizer.eos_id]
    w = np.concatenate(
        [np.full(len(prompt), float(s.train_on_prompt), np.float32), np.ones(len(body), np.float32)]
    )
    ex = EncodedChat(np.asarray(prompt + body, np.int32), w > 0)
    if s.seq_len is None or len(ex) <= s.seq_len or s.overlong == "drop":
        return [Example(ex, where)]
    if s.overlong == "truncate":
        return [_maybe_truncated(ex, where, s)]
    pieces = [ex[i : i + s.seq_len] for i in range(0, len(ex), s.seq_len)]
    pieces = [p for p in pieces if p.loss_mask[1:].any()]  # a piece must predict something
    n = len(pieces)
    return [
        Example(p, f"{where} (piece {i + 1} of {n})", (CUT_TEXT,) if i == 0 else ())
        for i, p in enumerate(pieces)
    ]


def _maybe_truncated(ex: EncodedChat, where: str, s: ExampleSettings) -> Example:
    if s.overlong != "truncate" or s.seq_len is None or len(ex) <= s.seq_len or ex.images:
        return Example(ex, where)
    return Example(truncate(ex, s.seq_len), where, (TRUNCATED,))


def truncate(ex: EncodedChat, max_len: int) -> EncodedChat:
    """`ex` cut to `max_len` tokens by LLaMA-Factory's cutoff_len rule (module docstring)."""
    learned = np.flatnonzero(ex.loss_mask)
    a = int(learned[0]) if len(learned) else len(ex)
    source, target = a, len(ex) - a
    if 2 * target <= max_len:
        keep_target = target
    elif 2 * source <= max_len:
        keep_target = max_len - source
    else:
        keep_target = int(max_len * target / (source + target))
    keep_target = min(target, max_len, max(keep_target, 1))
    keep_source = min(source, max_len - keep_target)
    return EncodedChat.join([ex[a - keep_source : a], ex[a : a + keep_target]])
