"""Images inside conversations (Kimi-K2.5 / K2.6): the content parts that name an image, where
its bytes are, and what it renders to.

**Two forms** name images in a record; `k2jax.data.formats` turns the second into the first:

* OpenAI content parts: `{"type": "image_url", "image_url": {"url": URL}}` (or `"image_url":
  URL`) and `{"type": "image", "image": PATH}`. A URL is `file:///abs/path.png`, a
  `data:image/...;base64,...` URL (what OpenAI's own fine-tuning files carry) or a path; http(s)
  is refused — k2jax reads nothing from the network.
* LLaMA-Factory / ShareGPT: an `images` list beside the messages, each `<image>` in a message's
  text standing for the next image of the list (LLaMA-Factory's `mm_plugin` rule: as many
  placeholders as images, or the record is bad). `"<image>What is it?"` becomes the parts
  [image, text "What is it?"].

A relative path is relative to the dataset's media folder (`data.media_dir`; by default the
folder of the data file, or of dataset_info.json for its datasets — LLaMA-Factory's
`media_dir` default), and is made absolute when the record is parsed.

**Rendering.** K2.5's chat_template.jinja (render_content) writes every image part as

    <|media_begin|>image<|media_content|><|media_pad|><|media_end|>\\n

— the newline is the template's own whitespace under transformers' `trim_blocks` and
`lstrip_blocks`, checked by rendering the released template with transformers' renderer — and
transformers' Kimi_K25Processor repeats `<|media_pad|>` once per merged patch group,
h·w / merge² for a grid of h×w patches (`ImageProcessor.grid`). The vision features replace those
pad embeddings in order (k2jax.model.transformer). No token of the image block is learned,
whatever `train_on_prompt` says: the pads are not text, and the markers are the template's.
Only the kimi_k25 template renders images.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from k2jax.data.images import (
    MAX_PIXELS,
    ImageError,
    check_pixels,
    decode_image,
    image_size,
    load_image,
)

__all__ = [
    "IMAGE_PLACEHOLDER",
    "ImagePart",
    "attach_images",
    "check_image",
    "image_part",
    "read_image",
]

IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's placeholder for the next of a record's images
_IMAGE_TYPES = ("image", "image_url")
_OTHER_MEDIA = ("video", "video_url", "input_audio", "audio")
_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ImagePart:
    """One image of a message: `source` is a path or a data: URL; `where` names it in errors
    ("message 1 (user): content[0]")."""

    source: str
    where: str

    def describe(self) -> str:
        return f"{self.source[:40]}..." if self.source.startswith("data:") else self.source


def _source_of(part: Mapping[str, Any]) -> Any:
    if part.get("type") == "image_url" or "image_url" in part:
        url = part.get("image_url")
        return url.get("url") if isinstance(url, Mapping) else url
    return part.get("image")


def image_part(part: Any, where: str) -> ImagePart | None:
    """The ImagePart of an image content part, None for any other part; ValueError for an image
    part without a source, or for video/audio parts."""
    if not isinstance(part, Mapping):
        return None
    kind = part.get("type")
    if kind in _OTHER_MEDIA:
        raise ValueError(f"{where} is {kind}; k2jax trains on text and still images only")
    if kind not in _IMAGE_TYPES:
        return None
    source = _source_of(part)
    if not isinstance(source, str) or not source:
        raise ValueError(
            f"{where}: an {kind} part needs a path or URL "
            '({"type": "image_url", "image_url": {"url": "file:///..."}} or '
            '{"type": "image", "image": "path"})'
        )
    return ImagePart(source, where)


def resolve(source: str, base: Path | None) -> str:
    """`source` as an absolute path, or the data: URL itself; ValueError for a remote URL."""
    if _DATA_URL.match(source):
        return source
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme == "file":
        parsed = urllib.parse.urlsplit(source)
        path = urllib.parse.unquote(parsed.netloc + parsed.path)
    elif len(scheme) > 1:  # one letter: a Windows drive, not a scheme
        raise ValueError(
            f"{source[:80]}: only local files, file:// and data:image/...;base64 URLs are read "
            "(k2jax downloads nothing)"
        )
    else:
        path = source
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return str(p)


def attach_images(
    messages: list[dict[str, Any]], images: Sequence[Any] | None, base: Path | None
) -> list[dict[str, Any]]:
    """`messages` with every image part's source resolved, and, given a record's `images` list,
    each `<image>` placeholder replaced by the next image as a part. ValueError naming the
    message for a count that does not match, a bad list or a remote URL."""
    if images is not None:
        if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
            raise ValueError("images must be a list of image paths")
        found = sum(
            m["content"].count(IMAGE_PLACEHOLDER)
            for m in messages
            if isinstance(m.get("content"), str)
        )
        if found != len(images):
            raise ValueError(
                f"{len(images)} image(s) in `images` but {found} {IMAGE_PLACEHOLDER} "
                "placeholder(s) in the messages; each placeholder stands for one image"
            )
    queue = list(images or ())
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if queue and isinstance(content, str) and IMAGE_PLACEHOLDER in content:
            parts: list[dict[str, Any]] = []
            for k, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
                if k:
                    parts.append({"type": "image", "image": queue.pop(0)})
                if text:
                    parts.append({"type": "text", "text": text})
            content = parts
        if isinstance(content, list):
            resolved = []
            for j, part in enumerate(content):
                image = image_part(part, f"message {i}: content[{j}]")
                if image is not None:
                    part = {"type": "image", "image": resolve(image.source, base)}
                resolved.append(part)
            content = resolved
        out.append({**m, "content": content} if content is not m.get("content") else m)
    return out


def _data_url_bytes(source: str) -> np.ndarray:
    try:
        raw = base64.b64decode(source[source.index(",") + 1 :], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{source[:40]}...: not valid base64 ({e})") from None
    return np.frombuffer(raw, np.uint8)


def read_image(part: ImagePart, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The image of `part` as RGB uint8 [H, W, 3]; ImageError naming the file."""
    if _DATA_URL.match(part.source):
        return decode_image(_data_url_bytes(part.source), part.describe(), max_pixels=max_pixels)
    return load_image(part.source, max_pixels=max_pixels)


def check_image(part: ImagePart, *, max_pixels: int = MAX_PIXELS) -> None:
    """Cheap checks of an image before training (no decoding): the file exists and can be read,
    and its header, when it states a size, is within `max_pixels`. ImageError otherwise."""
    if _DATA_URL.match(part.source):
        raw = _data_url_bytes(part.source).tobytes()
    else:
        path = Path(part.source)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 16)
        except OSError as e:
            raise ImageError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not raw:
        raise ImageError(f"{part.describe()}: an empty file")
    check_pixels(part.describe(), image_size(raw), max_pixels)
