"""Image preprocessing (k2jax.data.images) against transformers' Kimi_K25 image processor.

tests/reference/image_reference.py writes generated image files with Pillow — PNG in every mode
(RGB, RGBA, gray, gray+alpha, palette with a transparent entry, RGB and gray key colours) and JPEG
(plain, and with an EXIF rotation) of several sizes and aspect ratios — and what transformers
makes of each: the RGB array of its `load_image` + `convert_to_rgb`, and the processor's
`pixel_values` / `image_grid_thw` with its defaults and with max_patches=64 (so that large
images are resized, and resized in both directions' ratios). Checks, all exact:

* decoding: `load_image` returns transformers' RGB bytes for every file;
* processing: `ImageProcessor` on that RGB array returns the processor's pixel values bit for bit
  and the same grid, for one image and for two in one call.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_reference

from k2jax.data.images import ImageError, ImageProcessor, load_image, resize_uint8


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    run_reference("image_reference.py", "build", "--out", out)
    with np.load(out / "outputs.npz") as f:
        arrays = {k: f[k] for k in f.files}
    names = (out / "names.txt").read_text().split()
    assert len(names) >= 12
    return out / "images", names, arrays


def test_decoding_matches_transformers(reference):
    folder, names, ref = reference
    for name in names:
        got = load_image(folder / name)
        assert got.dtype == np.uint8 and got.shape == ref[f"rgb.{name}"].shape, name
        assert np.array_equal(got, ref[f"rgb.{name}"]), name


@pytest.mark.parametrize("tag,kw", [("default", {}), ("small", {"max_patches": 64})])
def test_pixel_values_match_transformers(reference, tag, kw):
    _, names, ref = reference
    processor = ImageProcessor(**kw)
    resized = 0
    for name in names:
        rgb = ref[f"rgb.{name}"]
        pixels, grid = processor([rgb])
        assert np.array_equal(grid, ref[f"grid.{tag}.{name}"]), name
        assert pixels.dtype == np.float32
        assert np.array_equal(pixels, ref[f"pixels.{tag}.{name}"]), name
        assert processor.grid(*rgb.shape[:2]) == tuple(grid[0])
        P = processor.patch_size
        resized += grid[0, 1] * P < rgb.shape[0] or grid[0, 2] * P < rgb.shape[1]
    assert resized >= (1 if tag == "default" else 4)  # the resampling itself is exercised


def test_two_images_are_concatenated_in_order(reference):
    folder, _, ref = reference
    pixels, grid = ImageProcessor()([folder / "small.png", folder / "tall.png"])
    assert np.array_equal(grid, ref["grid.pair"]) and np.array_equal(pixels, ref["pixels.pair"])


def test_identity_resize_and_bad_files(tmp_path):
    import cv2

    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert resize_uint8(rgb, 20, 30) is rgb
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageError, match="notes.png: not an image OpenCV can decode"):
        load_image(tmp_path / "notes.png")
    cv2.imwrite(str(tmp_path / "deep.png"), np.zeros((4, 4, 3), np.uint16))
    with pytest.raises(ImageError, match="deep.png: uint16 pixels"):
        load_image(tmp_path / "deep.png")
    with pytest.raises(ImageError, match="RGB uint8"):
        ImageProcessor()([rgb.astype(np.float32)])
