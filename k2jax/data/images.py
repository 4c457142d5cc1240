"""Images → `pixel_values` [N, 3, P, P] and `image_grid_thw` [I, 3], as transformers' Kimi_K25
image processor makes them (checked bit for bit in tests/test_images.py).

For each image, in order:

1. Decode to RGB uint8 [H, W, 3] (`load_image`) as transformers' `load_image` does with Pillow
   for a file: EXIF orientation applied, gray made RGB, an alpha channel dropped (Pillow's
   convert("RGB"), not a composite — except that a PNG whose tRNS chunk names one transparent
   colour has every pixel of that colour turned white, because Pillow keeps the colour in the
   converted image's info and the processor's convert_to_rgb composites it). The decoder is OpenCV's (the `images` extra; see
   pyproject.toml for why not Pillow); on the tested PNG and JPEG files both decode to the same
   bytes.
2. Size (`navit_size`): scale down — never up — so that the image has at most `max_patches`
   patches of P×P and at most `max_side` pixels per side; then pad the bottom and right edges
   with zeros to a multiple of merge·P, so the grid splits into 2×2 merges.
3. Resize with torchvision's CPU path for uint8 bicubic with antialiasing (`resize_uint8`): a
   separable filter (Keys cubic, a = −0.5, widened by the scale when shrinking — PIL's method) with
   int16 weights at the largest precision that fits, a horizontal then a vertical pass, each
   rounded and clamped to uint8. Reproduced exactly, integer for integer.
4. Normalise: (x − 127.5) / 127.5 in float32 (transformers fuses rescale 1/255 with mean and std
   0.5 into this), and cut into P×P patches in raster order.

The processor's settings come from the checkpoint's preprocessor_config.json when it names them
(`size.max_height`, `max_patches`, `patch_size`, `merge_size`, `image_mean`, `image_std`), else
transformers' defaults for kimi_k25 (512, 16384, 14, 2, 0.5, 0.5).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "MAX_PIXELS",
    "ImageError",
    "ImageProcessor",
    "check_pixels",
    "decode_image",
    "image_size",
    "load_image",
    "navit_size",
    "resize_uint8",
]


class ImageError(ValueError):
    """An image could not be used; the message names the file and what was wrong."""


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    patch_size: int = 14
    merge_size: int = 2
    max_patches: int = 16384
    max_side: int = 512
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> ImageProcessor:
        """From a checkpoint's preprocessor_config.json (transformers' keys), or the defaults."""
        file = Path(folder) / "preprocessor_config.json"
        if not file.exists():
            return cls()
        try:
            cfg = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ImageError(f"{file}: not valid JSON ({e})") from None
        kw = {}
        size = cfg.get("size") or {}
        if "max_height" in size:
            if size.get("max_width", size["max_height"]) != size["max_height"]:
                raise ImageError(f"{file}: size.max_height and max_width must be equal")
            kw["max_side"] = int(size["max_height"])
        for key, field in (("patch_size", "patch_size"), ("merge_size", "merge_size")):
            if key in cfg:
                kw[field] = int(cfg[key])
        if "max_patches" in cfg:
            kw["max_patches"] = int(cfg["max_patches"])
        for key, field in (("image_mean", "mean"), ("image_std", "std")):
            if key in cfg:
                v = cfg[key]
                kw[field] = tuple(float(x) for x in (v if isinstance(v, list) else [v] * 3))
        return cls(**kw)

    def __call__(self, images: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """(pixel_values float32 [N, 3, P, P], image_grid_thw int64 [I, 3]) of images given as
        file paths or RGB uint8 arrays [H, W, 3]."""
        pixels, grids = [], []
        for image in images:
            rgb = load_image(image) if isinstance(image, (str, os.PathLike)) else image
            patches, grid = self.one(np.asarray(rgb))
            pixels.append(patches)
            grids.append(grid)
        return np.concatenate(pixels), np.asarray(grids, np.int64)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(1, h, w) patches of an image of this size (its merged tokens: h·w / merge²)."""
        _, (ph, pw) = navit_size(
            height, width, self.patch_size, self.merge_size, self.max_patches, self.max_side
        )
        return 1, ph // self.patch_size, pw // self.patch_size

    def one(self, rgb: np.ndarray) -> tuple[np.ndarray, list[int]]:
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ImageError(f"expected an RGB uint8 image [H, W, 3], got {rgb.dtype} {rgb.shape}")
        P = self.patch_size
        (h, w), (ph, pw) = navit_size(
            *rgb.shape[:2], P, self.merge_size, self.max_patches, self.max_side
        )
        x = resize_uint8(rgb, h, w)
        x = np.pad(x, ((0, ph - h), (0, pw - w), (0, 0)))
        mean = np.float32(255.0) * np.asarray(self.mean, np.float32)
        std = np.float32(255.0) * np.asarray(self.std, np.float32)
        x = (x.astype(np.float32) - mean) / std  # [ph, pw, 3]
        gh, gw = ph // P, pw // P
        patches = x.reshape(gh, P, gw, P, 3).transpose(0, 2, 4, 1, 3).reshape(gh * gw, 3, P, P)
        return np.ascontiguousarray(patches), [1, gh, gw]


def navit_size(height, width, patch_size, merge_size, max_patches, max_side):
    """((resized h, w), (padded h, w)) — transformers' kimi_k25 `navit_resize`, arithmetic and
    all (floats as Python computes them)."""
    ph = max(1.0, height // patch_size)
    pw = max(1.0, width // patch_size)
    scale = min(
        1.0,
        math.sqrt(max_patches / (ph * pw)),
        (max_side * patch_size) / height,
        (max_side * patch_size) / width,
    )
    h = min(max(1, int(height * scale)), max_side * patch_size)
    w = min(max(1, int(width * scale)), max_side * patch_size)
    f = merge_size * patch_size
    return (h, w), ((f - h % f) % f + h, (f - w % f) % f + w)


def _filter_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(first input index [out], int weights [out, K], precision bits) of one resize pass."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    a = -0.5

    def cubic(x):
        x = np.abs(x)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = (((x - 5) * x + 8) * x - 4) * a
        return np.where(x < 1, near, np.where(x < 2, far, 0.0))

    center = scale * (np.arange(out_size) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first
    j = np.arange(count.max())
    w = np.where(
        j[None] < count[:, None], cubic((j[None] + first[:, None] - center[:, None] + 0.5) * inv), 0
    )
    w = w / w.sum(1, keepdims=True)
    bits = 0
    while bits < 21 and int(0.5 + w.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    scaled = w * (1 << bits)
    return first, np.where(scaled < 0, scaled - 0.5, scaled + 0.5).astype(np.int64), bits


def _resize_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    first, weights, bits = _filter_weights(x.shape[axis], out_size)
    x = np.moveaxis(x, axis, 0)
    taps = np.minimum(first[:, None] + np.arange(weights.shape[1]), x.shape[0] - 1)
    acc = np.full((out_size, *x.shape[1:]), 1 << (bits - 1), np.int64)
    expand = (slice(None),) + (None,) * (x.ndim - 1)
    for k in range(weights.shape[1]):  # one tap at a time: memory of one output, not K
        acc += x[taps[:, k]].astype(np.int64) * weights[:, k][expand]
    return np.moveaxis(np.clip(acc >> bits, 0, 255).astype(np.uint8), 0, axis)


def resize_uint8(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's antialiased bicubic resize of a uint8 [H, W, C] image (module docstring)."""
    x = rgb
    if x.shape[1] != width:
        x = _resize_axis(x, width, 1)
    if x.shape[0] != height:
        x = _resize_axis(x, height, 0)
    return x


# Pillow's DecompressionBombError threshold (2 × Image.MAX_IMAGE_PIXELS): transformers' loader
# refuses larger images, and so do we — before decoding when the header says the size.
MAX_PIXELS = 2 * 89_478_485


def load_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3] (module docstring, step 1). A missing, unreadable,
    unsupported or oversized (> max_pixels) file is an ImageError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise ImageError(f"{path}: cannot be read ({e.strerror or e})") from None
    return decode_image(data, str(path), max_pixels=max_pixels)


def decode_image(data: np.ndarray, name: str, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes (uint8 [n]) as RGB uint8 [H, W, 3]; `name` is what errors call it."""
    try:
        import cv2
    except ImportError:
        raise ImageError(
            f"{name}: reading images needs OpenCV: pip install 'k2jax[images]'"
        ) from None
    raw = data.tobytes()
    check_pixels(name, image_size(raw), max_pixels)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ImageError(f"{name}: not an image OpenCV can decode (PNG, JPEG, WebP, BMP, ...)")
    check_pixels(name, (img.shape[1], img.shape[0]), max_pixels)
    if img.dtype != np.uint8:
        raise ImageError(f"{name}: {img.dtype} pixels; only 8-bit images are supported")
    if img.ndim == 3 and img.shape[2] not in (2, 3, 4):
        raise ImageError(f"{name}: {img.shape[2]} channels; expected gray, RGB or RGBA")
    # IMREAD_COLOR applies the EXIF orientation (IMREAD_UNCHANGED does not), like Pillow's
    # exif_transpose in transformers' load_image, turns gray into three equal channels and drops
    # an alpha channel, like its convert("RGB")
    rgb = np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])
    key = _png_transparent_colour(raw)
    if key is not None:  # module docstring, step 1
        rgb[(rgb == np.asarray(key, np.uint8)).all(-1)] = 255
    return rgb


def check_pixels(name: str, size: tuple[int, int] | None, max_pixels: int) -> None:
    """ImageError when an image of (width, height) `size` has more than `max_pixels` pixels
    (None: the size is not known, nothing to check)."""
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageError(
            f"{name}: {size[0]}×{size[1]} pixels is more than the {max_pixels:,} allowed "
            "(an oversized image; shrink it first)"
        )


def image_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR or a JPEG's frame header, without decoding; None for
    other formats or a header it cannot find."""
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR":
        return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    if raw[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(raw):
        if raw[pos] != 0xFF:
            return None
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(raw[pos + 2 : pos + 4], "big")
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC): precision, height, width
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and pos + 9 <= len(raw):
            h = int.from_bytes(raw[pos + 5 : pos + 7], "big")
            w = int.from_bytes(raw[pos + 7 : pos + 9], "big")
            return w, h
        pos += 2 + length
    return None


def _png_transparent_colour(raw: bytes) -> tuple[int, int, int] | None:
    """The one colour a PNG's tRNS chunk makes transparent, as Pillow reports it after
    convert("RGB") (info["transparency"]): a palette PNG's first fully transparent entry, an
    RGB or gray PNG's key colour; None for other files. transformers' convert_to_rgb then
    composites every pixel of exactly that colour onto white."""
    if raw[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    chunks, pos = {}, 8
    while pos + 8 <= len(raw):
        length = int.from_bytes(raw[pos : pos + 4], "big")
        kind = raw[pos + 4 : pos + 8]
        chunks.setdefault(kind, raw[pos + 8 : pos + 8 + length])
        if kind == b"IDAT" or kind == b"IEND":
            break
        pos += 12 + length
    ihdr, trns = chunks.get(b"IHDR", b""), chunks.get(b"tRNS")
    if len(ihdr) < 13 or trns is None:
        return None
    kind = ihdr[9]
    if kind != 3 and ihdr[8] != 8:  # key colours of 16-bit or sub-byte gray: not handled
        return None
    if kind == 3:  # palette: the first entry with alpha 0
        i, plte = trns.find(b"\0"), chunks.get(b"PLTE", b"")
        if i < 0 or len(plte) < 3 * i + 3:
            return None
        return tuple(plte[3 * i : 3 * i + 3])
    if kind == 2 and len(trns) >= 6:  # RGB key colour, stored as 16-bit samples
        return trns[1], trns[3], trns[5]
    if kind == 0 and len(trns) >= 2:  # gray key value
        return trns[1], trns[1], trns[1]
    return None
