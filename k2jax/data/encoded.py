"""Tokenized conversations: rendered pieces → token ids, loss weights and images.

`k2jax.data.chat` renders a conversation into `Piece`s (special tokens by name, text, and image
placeholders with their loss weights); `encode_pieces` turns them into an `EncodedChat`.
Structural tokens are emitted by id; adjacent text pieces of one weight are encoded in one piece,
which gives the ids of tokenizing the whole rendered string with Moonshot's tokenizer (specials
split the text there too); an image's `<|media_pad|>` piece becomes as many pads as the image has
merged patch groups (k2jax.data.media), with what the `images` callback returned kept in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from k2jax.data.media import ImagePart
from k2jax.data.tokenizer import KimiTokenizer


class ChatFormatError(ValueError):
    """A conversation cannot be rendered; `reason` is a short category for bad-example counts."""

    def __init__(self, message: str, reason: str = "invalid message"):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of the rendered conversation: a special token (by name) or plain text.

    weight: the loss weight of this piece's tokens (0: not learned).
    image: set on an image's `<|media_pad|>` piece, which stands for one pad per merged patch
      group of that image (k2jax.data.media).
    """

    text: str
    special: bool
    weight: float
    image: ImagePart | None = None


@dataclasses.dataclass(frozen=True)
class EncodedChat:
    """One tokenized conversation.

    tokens: int32 [L] token ids.
    loss_mask: bool [L]; True where token i is learned (weight > 0). (In a packed batch the
      model predicts token i+1 at position i, so there the mask is shifted by one.)
    weights: float32 [L] loss weights, or None: the mask's 0/1.
    images: what `encode_pieces`' `images` callback returned for each image, in token order.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    weights: np.ndarray | None = None
    images: tuple[Any, ...] = ()

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def loss_weights(self) -> np.ndarray:
        """float32 [L]: the weights, or the mask as 0/1."""
        return self.weights if self.weights is not None else self.loss_mask.astype(np.float32)

    def __getitem__(self, s: slice) -> EncodedChat:
        if self.images:  # a cut could split an image's tokens from its pixels
            raise ValueError("an example with images cannot be sliced")
        w = None if self.weights is None else self.weights[s]
        return EncodedChat(self.tokens[s], self.loss_mask[s], w)

    @classmethod
    def join(cls, parts: Sequence[EncodedChat]) -> EncodedChat:
        w = None
        if any(p.weights is not None for p in parts):
            w = np.concatenate([p.loss_weights for p in parts])
        return cls(
            np.concatenate([p.tokens for p in parts]),
            np.concatenate([p.loss_mask for p in parts]),
            w,
            tuple(im for p in parts for im in p.images),
        )


ImageTokens = Callable[[ImagePart], tuple[int, Any]]  # image -> (its pad tokens, payload)


def encode_pieces(
    pieces: Sequence[Piece], tokenizer: KimiTokenizer, images: ImageTokens | None = None
) -> EncodedChat:
    """Token ids and loss mask of rendered pieces; adjacent text pieces are encoded together.

    images: for each image piece, (number of `<|media_pad|>` tokens, payload kept in
    `EncodedChat.images`) — k2jax.data.examples reads and preprocesses the image there. None:
    images are an error (a model without a vision tower).
    """
    ids: list[int] = []
    weights: list[float] = []
    payloads: list[Any] = []
    i = 0
    while i < len(pieces):
        p = pieces[i]
        if p.special:
            n = 1
            if p.image is not None:
                if images is None:
                    raise ChatFormatError(
                        f"{p.image.where}: an image, but this model has no vision tower "
                        "(images need a Kimi-K2.5/K2.6 checkpoint)",
                        "unsupported content",
                    )
                n, payload = images(p.image)
                payloads.append(payload)
            ids += [tokenizer.encode_special(p.text)] * n
            weights += [p.weight] * n
            i += 1
            continue
        j = i
        while j < len(pieces) and not pieces[j].special and pieces[j].weight == p.weight:
            j += 1
        chunk = tokenizer.encode("".join(q.text for q in pieces[i:j]))
        ids += chunk
        weights += [p.weight] * len(chunk)
        i = j
    w = np.asarray(weights, np.float32)
    binary = bool(np.isin(w, (0.0, 1.0)).all())
    return EncodedChat(np.asarray(ids, np.int32), w > 0, None if binary else w, tuple(payloads))
