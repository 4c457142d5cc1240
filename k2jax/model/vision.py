"""Kimi-K2.5's vision side in Flax: the MoonViT tower, the 2×2 patch merger and the projector.

    patches [N, 3·P·P] ─ patch_embed.proj ─ + pos_emb (resampled to each image's grid)
        ─ blocks × L: x + wo(attn(norm0(x))),  x + mlp.fc1(gelu_tanh(mlp.fc0(norm1(x))))
        ─ final_layernorm ─ 2×2 merge [M, 4, Dv] ─ mm_projector: pre_norm, proj.0, gelu, proj.2
        → image features [M, D] that replace the M <|media_pad|> tokens of the prompt.

Images of different sizes are packed into one sequence of N patches (raster order per image,
images one after another, as transformers' Kimi_K25 image processor emits `pixel_values`
[N, 3, P, P]); attention is block-diagonal — a patch sees the patches of its own image only.

Everything that depends on the images' grids (`image_grid_thw`, [I, 3] of (t, h, w) patches) is
computed on the host by `grid_inputs`, so the jitted model sees only arrays of static shape:

* `pos_index`, `pos_weight` [N, 16]: the bicubic resampling of the learned [Hp, Wp, Dv] position
  table to each image's (h, w) grid, as 16 taps per patch — `F.interpolate(mode="bicubic",
  align_corners=False)` (Keys kernel, a = −0.75, border-clamped), which both Moonshot's code and
  transformers use (a grid equal to the table's size gets the identity weights);
* `pos_hw` [N, 2]: each patch's (row, column) for the 2-D rotary embedding;
* `segment` [N]: the image each patch belongs to (the block-diagonal mask);
* `merge_index` [M, 4]: the four patches of every merged token, (kh, kw) in raster order.

The model takes them per row of the batch (`row_inputs`: [B, N, ...], each row's images packed
and zero-padded to N patches, padding patches in a segment of their own), so a training batch's
images split over the mesh with their rows and every row's image tokens take the features of its
own images, in order. `split_rows` turns transformers' layout — one [N, 3, P, P] for the whole
batch — into that.

Layout of wqkv. The released checkpoints keep Moonshot's complex-number rotary layout: within a
head, rows (2j, 2j+1) of q and k are one rotated pair, turned by the angle w·f_i (j = 2i) or
h·f_i (j = 2i+1), f_i = θ^(−4i/head_dim). transformers permutes those rows at load time to use its
rotate-half form (PermuteForRope); k2jax keeps the released layout and rotates interleaved pairs
— the same attention, and the weights stay byte-for-byte the checkpoint's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from k2jax.config.vision import VisionConfig
from k2jax.lora import LoraConfig
from k2jax.model.layers import Linear
from k2jax.model.options import ComputeConfig, accum_dtype

__all__ = ["MoonViT", "Projector", "grid_inputs", "layer_norm", "row_inputs", "split_rows"]

_TAPS = np.arange(-1, 3)  # bicubic: floor−1 .. floor+2


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bicubic taps into a `side`-long table for positions `index` of an axis of `size`
    (align_corners=False, border clamp), in float32 like torch."""
    src = (index.astype(np.float32) + np.float32(0.5)) * np.float32(side / size) - np.float32(0.5)
    floor = np.floor(src)
    taps = np.clip(floor.astype(np.int64)[:, None] + _TAPS, 0, side - 1)
    d = np.abs(src[:, None] - floor[:, None] - _TAPS.astype(np.float32))
    a = np.float32(-0.75)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return taps, np.where(d <= 1, near, far).astype(np.float32)


def _checked_grid(image_grid_thw, cfg: VisionConfig) -> np.ndarray:
    grid = np.asarray(image_grid_thw, dtype=np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3 or not len(grid):
        raise ValueError(f"image_grid_thw must be [images, 3] (t, h, w), got shape {grid.shape}")
    kh, kw = cfg.merge_kernel
    for i, (t, h, w) in enumerate(grid.tolist()):
        if t != 1:
            raise ValueError(f"image {i}: t = {t}; only still images (t = 1) are supported")
        if h <= 0 or w <= 0 or h % kh or w % kw:
            raise ValueError(
                f"image {i}: a grid of {h}×{w} patches does not split into {kh}×{kw} merges"
            )
    return grid


def grid_inputs(image_grid_thw, cfg: VisionConfig) -> dict[str, np.ndarray]:
    """The host-side arrays of a batch of images (module docstring), from [I, 3] (t, h, w)."""
    grid = _checked_grid(image_grid_thw, cfg)
    kh, kw = cfg.merge_kernel
    index, weight, hw, segment, merge = [], [], [], [], []
    start = 0
    for i, (_, h, w) in enumerate(grid.tolist()):
        rows, cols = np.divmod(np.arange(h * w), w)
        h_taps, h_w = _axis_taps(rows, h, cfg.pos_emb_height)
        w_taps, w_w = _axis_taps(cols, w, cfg.pos_emb_width)
        index.append((h_taps[:, :, None] * cfg.pos_emb_width + w_taps[:, None, :]).reshape(-1, 16))
        weight.append((h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 16))
        hw.append(np.stack([rows, cols], -1))
        segment.append(np.full(h * w, i))
        ids = np.arange(start, start + h * w).reshape(h // kh, kh, w // kw, kw)
        merge.append(ids.transpose(0, 2, 1, 3).reshape(-1, kh * kw))
        start += h * w
    return {
        "pos_index": np.concatenate(index).astype(np.int32),
        "pos_weight": np.concatenate(weight).astype(np.float32),
        "pos_hw": np.concatenate(hw).astype(np.int32),
        "segment": np.concatenate(segment).astype(np.int32),
        "merge_index": np.concatenate(merge).astype(np.int32),
    }


def row_inputs(pixel_values_BNF, image_grid_thw_BI3, cfg: VisionConfig) -> dict[str, np.ndarray]:
    """The model's `images` for a batch of rows: each row's patches [B, N, F] (its images one
    after another, zero-padded to N) and grids [B, I, 3] (zero rows after its last image) →
    `grid_inputs` per row, padded to N patches and N // merge merged tokens. Padding patches
    form their own segment (−1), so they never mix with an image's patches; padding merged tokens
    are never picked (a row has exactly as many image tokens as its images' merged tokens)."""
    pixels = np.asarray(pixel_values_BNF, np.float32)
    grids = np.asarray(image_grid_thw_BI3, np.int64)
    if pixels.ndim != 3 or grids.ndim != 3 or grids.shape[-1] != 3 or len(grids) != len(pixels):
        raise ValueError(
            f"expected pixel_values [rows, patches, features] and image_grid_thw [rows, images, "
            f"3], got shapes {pixels.shape} and {grids.shape}"
        )
    B, N, _ = pixels.shape
    M = N // cfg.merge_size
    out = {
        "pos_index": np.zeros((B, N, 16), np.int32),
        "pos_weight": np.zeros((B, N, 16), np.float32),
        "pos_hw": np.zeros((B, N, 2), np.int32),
        "segment": np.full((B, N), -1, np.int32),
        "merge_index": np.zeros((B, M, cfg.merge_size), np.int32),
    }
    for b in range(B):
        real = grids[b][grids[b].prod(-1) > 0]
        if not len(real):
            continue
        g = grid_inputs(real, cfg)
        n, m = len(g["segment"]), len(g["merge_index"])
        if n > N:
            raise ValueError(f"row {b}: its images have {n} patches, more than the {N} given")
        for key, value in g.items():
            out[key][b, : n if key != "merge_index" else m] = value
    out["pixel_values"] = pixels
    return out


def split_rows(tokens_BT, pixel_values, image_grid_thw, cfg: VisionConfig):
    """transformers' layout — all images' patches [N, F] and grids [I, 3] for the whole batch —
    → `row_inputs`' per-row arrays: image i belongs to the row that holds its image tokens
    (images in token order). ValueError when the tokens and images do not agree."""
    tokens = np.asarray(tokens_BT)
    grids = _checked_grid(image_grid_thw, cfg)
    pixels = np.asarray(pixel_values, np.float32)
    pixels = pixels.reshape(len(pixels), -1)
    patches = grids.prod(-1)
    if pixels.shape[0] != patches.sum() or pixels.shape[1] != cfg.patch_features:
        raise ValueError(
            f"pixel_values has shape {np.shape(pixel_values)}; image_grid_thw implies "
            f"{patches.sum()} patches of 3×{cfg.patch_size}×{cfg.patch_size}"
        )
    per_row = (tokens == cfg.image_token_id).sum(-1)
    want = patches // cfg.merge_size
    if per_row.sum() != want.sum():
        raise ValueError(
            f"the prompt has {per_row.sum()} image tokens (id {cfg.image_token_id}); the images "
            f"need {want.sum()} (one per {cfg.merge_kernel[0]}×{cfg.merge_kernel[1]} patches)"
        )
    ends = np.cumsum(want)
    row_of = np.searchsorted(np.cumsum(per_row), ends - 1, side="right")
    firsts = np.concatenate([[0], ends[:-1]])
    if (np.searchsorted(np.cumsum(per_row), firsts, side="right") != row_of).any():
        raise ValueError("an image's tokens are split over two rows of the prompt")
    starts = np.concatenate([[0], np.cumsum(patches)])
    B = len(tokens)
    n = max(int(patches[row_of == b].sum()) for b in range(B))
    count = max(int((row_of == b).sum()) for b in range(B))
    out_pixels = np.zeros((B, max(n, cfg.merge_size), pixels.shape[1]), np.float32)
    out_grids = np.zeros((B, max(count, 1), 3), np.int64)
    for b in range(B):
        o = 0
        for k, i in enumerate(np.flatnonzero(row_of == b)):
            out_pixels[b, o : o + patches[i]] = pixels[starts[i] : starts[i + 1]]
            out_grids[b, k] = grids[i]
            o += patches[i]
    return row_inputs(out_pixels, out_grids, cfg)


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm over the last axis in float32 (at least), back to x's dtype."""
    x32 = x.astype(accum_dtype(x.dtype))
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(y.dtype) + bias.astype(y.dtype)).astype(x.dtype)


class LayerNorm(nn.Module):
    eps: float
    compute: ComputeConfig
    axis_name: str = "vision_embed"

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        part = lambda init: nn.with_logical_partitioning(init, (self.axis_name,))  # noqa: E731
        dt = self.compute.jnp_param_dtype
        w = self.param("weight", part(nn.initializers.ones), (d,), dt)
        b = self.param("bias", part(nn.initializers.zeros), (d,), dt)
        return layer_norm(x, w, b, self.eps)


def _rotate_pairs(x_BNHD, angles_BND2):
    """Rotates interleaved pairs (x[2j], x[2j+1]) of every head by angles[..., j], in float32."""
    *lead, H, D = x_BNHD.shape
    x = x_BNHD.astype(jnp.float32).reshape(*lead, H, D // 2, 2)
    cos, sin = jnp.cos(angles_BND2)[..., None, :], jnp.sin(angles_BND2)[..., None, :]
    x0, x1 = x[..., 0], x[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)
    return out.reshape(*lead, H, D).astype(x_BNHD.dtype)


class Block(nn.Module):
    """One MoonViT encoder block (pre-norm attention and MLP, biases everywhere), on rows
    [B, N, Dv] of packed images."""

    cfg: VisionConfig
    compute: ComputeConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x_BND, angles_BND2, mask_BNN):
        c, kw = self.cfg, dict(compute=self.compute, lora=self.lora, bias=True)
        B, N, D = x_BND.shape
        H, hd = c.num_heads, c.head_dim
        h = LayerNorm(1e-5, self.compute, name="norm0")(x_BND)
        qkv = Linear(3 * D, ("vision_qkv", "vision_embed"), name="wqkv", **kw)(h)
        q, k, v = (t.reshape(B, N, H, hd) for t in jnp.split(qkv, 3, axis=-1))
        q, k = _rotate_pairs(q, angles_BND2), _rotate_pairs(k, angles_BND2)
        acc = accum_dtype(q.dtype)
        logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=acc) * hd**-0.5
        logits = jnp.where(mask_BNN[:, None], logits, jnp.finfo(acc).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("bhnm,bmhd->bnhd", probs, v, preferred_element_type=acc).astype(q.dtype)
        wo = Linear(D, ("vision_embed", "vision_embed"), name="wo", **kw)
        x_BND = x_BND + wo(o.reshape(B, N, D))
        h = LayerNorm(1e-5, self.compute, name="norm1")(x_BND)
        h = Linear(c.intermediate_size, ("vision_mlp", "vision_embed"), name="fc0", **kw)(h)
        h = nn.gelu(h, approximate=c.hidden_act == "gelu_pytorch_tanh")
        return x_BND + Linear(D, ("vision_embed", "vision_mlp"), name="fc1", **kw)(h), None


class MoonViT(nn.Module):
    """The vision tower: rows of patches [B, N, 3·P·P] and `row_inputs` → merged
    [B, M, merge, Dv]."""

    cfg: VisionConfig
    compute: ComputeConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, patches_BNF, grid):
        c = self.cfg
        dt = self.compute.jnp_dtype
        # the stride-P convolution of the checkpoint is this matmul on flattened (c, kh, kw) patches
        x = Linear(
            c.hidden_size,
            ("vision_embed", "vision_patch"),
            self.compute,
            bias=True,
            name="patch_embed_proj",
        )(patches_BNF.astype(dt))
        table = self.param(
            "pos_emb",
            nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vision_pos", "vision_pos", "vision_embed")
            ),
            (c.pos_emb_height, c.pos_emb_width, c.hidden_size),
            self.compute.jnp_param_dtype,
        ).reshape(-1, c.hidden_size)
        taps = jnp.take(table, grid["pos_index"], axis=0).astype(jnp.float32)  # [B, N, 16, Dv]
        pos = jnp.einsum("bnk,bnkd->bnd", grid["pos_weight"], taps)
        x = x + pos.astype(x.dtype)

        quarter = c.head_dim // 4
        inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, 2 * quarter, 2) / (2 * quarter)))
        hw = grid["pos_hw"].astype(jnp.float32)
        # pair 2i turns by column·f_i, pair 2i+1 by row·f_i (module docstring)
        angles = jnp.stack([hw[..., 1:2] * inv_freq, hw[..., 0:1] * inv_freq], -1)
        angles = angles.reshape(*hw.shape[:-1], -1)
        seg = grid["segment"]
        # a padding patch (segment −1) sees only itself: no row of the softmax is empty
        same = seg[:, :, None] == seg[:, None, :]
        mask = same & (seg[:, :, None] >= 0) | jnp.eye(seg.shape[1], dtype=bool)
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0, "lora": 0, "ce_rows": 0, "ce_score": 0},
            split_rngs={"params": True, "lora": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = blocks(c, self.compute, self.lora, name="blocks")(x, angles, mask)
        x = LayerNorm(1e-5, self.compute, name="final_layernorm")(x)
        return jax.vmap(lambda xr, idx: jnp.take(xr, idx, axis=0))(x, grid["merge_index"])


class Projector(nn.Module):
    """mm_projector: LayerNorm per patch, the merged patches concatenated, Linear–GELU–Linear."""

    cfg: VisionConfig
    compute: ComputeConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, merged_BMKD):
        c, kw = self.cfg, dict(compute=self.compute, lora=self.lora, bias=True)
        x = LayerNorm(c.projection_eps, self.compute, name="pre_norm")(merged_BMKD)
        x = x.reshape(*x.shape[:-2], -1)
        width = x.shape[-1]
        x = Linear(width, ("vision_mlp", "vision_mlp"), name="proj_0", **kw)(x)
        x = nn.gelu(x, approximate=False)
        return Linear(c.text_hidden_size, ("embed", "vision_mlp"), name="proj_2", **kw)(x)
