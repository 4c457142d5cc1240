"""Torch reference for image preprocessing; runs in .venv-ref (Pillow, transformers' kimi_k25
image processor).

    python image_reference.py build --out DIR

Writes generated images with Pillow into DIR/images — PNG in RGB, RGBA (graded transparency),
gray, gray+alpha, palette-with-transparency and RGB / gray with a transparent key colour, JPEG plain and with an EXIF orientation, of
several sizes and aspect ratios — and, per file, what transformers makes of it:
`rgb.<name>` (transformers' `load_image` — EXIF transpose — then `convert_to_rgb`, as uint8) and,
with the processor's defaults and with max_patches=64 (so large images are resized), the
`pixel_values` and `image_grid_thw` of Kimi_K25ImageProcessor on that image (DIR/outputs.npz;
np.savez, no pickles).

The processor runs on torchvision, whose wheel here is a CUDA build whose compiled ops cannot
load next to the CPU torch (and, installed in site-packages, would break every `import
transformers`: scripts/setup keeps it in .venv-ref/extra, which only this script puts on its
path); its pure-Python image functions (all the processor uses: tensor
resize, pad, normalize) work. So torchvision is imported with the registration of those missing
compiled ops' fake kernels skipped — nothing else is changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.library

EXTRA = Path(__file__).resolve().parents[2] / ".venv-ref" / "extra"  # scripts/setup puts it there


def _import_torchvision():
    sys.path.insert(0, str(EXTRA))
    original = torch.library.register_fake

    def lenient(op, *args, **kwargs):
        def register(fn):
            try:
                return original(op, *args, **kwargs)(fn)
            except RuntimeError:  # "operator torchvision::... does not exist"
                return fn

        return register

    torch.library.register_fake = lenient
    try:
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = original


def _picture(rng, h, w) -> np.ndarray:
    """Smooth colour gradients plus noise: realistic for JPEG, edges for the resampling."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (h + w) * 255], -1)
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def write_images(folder: Path) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    names = []

    def save(name, image, **kw):
        image.save(folder / name, **kw)
        names.append(name)

    save("small.png", Image.fromarray(_picture(rng, 100, 150)))
    save("wide.png", Image.fromarray(_picture(rng, 60, 700)))
    save("tall.png", Image.fromarray(_picture(rng, 900, 130)))
    save("big.png", Image.fromarray(_picture(rng, 1900, 1850)))  # > 16384 patches: resized
    rgba = np.dstack([_picture(rng, 90, 120), rng.integers(0, 256, (90, 120), dtype=np.uint8)])
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    save("gray.png", Image.fromarray(_picture(rng, 70, 84)[..., 0], "L"))
    la = np.dstack([_picture(rng, 50, 64)[..., 1], rng.integers(0, 256, (50, 64), dtype=np.uint8)])
    save("gray_alpha.png", Image.fromarray(la, "LA"))
    pal = Image.fromarray(_picture(rng, 64, 80)).quantize(16)
    save("palette.png", pal, transparency=3)
    key = _picture(rng, 40, 56)
    key[5:9, 10:20] = (10, 20, 30)
    save("rgb_key.png", Image.fromarray(key), transparency=(10, 20, 30))
    save("gray_key.png", Image.fromarray(key[..., 0], "L"), transparency=10)
    save("photo.jpg", Image.fromarray(_picture(rng, 300, 420)), quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    save("rotated.jpg", Image.fromarray(_picture(rng, 120, 200)), quality=90, exif=exif)
    return names


def build(out: Path) -> None:
    _import_torchvision()
    from transformers.image_transforms import convert_to_rgb
    from transformers.image_utils import load_image
    from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor

    names = write_images(out / "images")
    processor = Kimi_K25ImageProcessor()
    arrays = {}
    for name in names:
        image = load_image(str(out / "images" / name))
        arrays[f"rgb.{name}"] = convert_to_rgb(image, return_numpy=True)
        for tag, kw in (("default", {}), ("small", {"max_patches": 64})):
            res = processor(images=[image], return_tensors="pt", **kw)
            arrays[f"pixels.{tag}.{name}"] = res["pixel_values"].numpy()
            arrays[f"grid.{tag}.{name}"] = res["image_grid_thw"].numpy()
    # two images in one call: concatenated in order
    pair = [load_image(str(out / "images" / n)) for n in ("small.png", "tall.png")]
    res = processor(images=pair, return_tensors="pt")
    arrays["pixels.pair"], arrays["grid.pair"] = (
        res["pixel_values"].numpy(),
        res["image_grid_thw"].numpy(),
    )
    np.savez(out / "outputs.npz", **arrays)
    (out / "names.txt").write_text("\n".join(names))
    print(f"{len(names)} images")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    args = ap.parse_args()
    build(Path(args.out))


if __name__ == "__main__":
    main()
