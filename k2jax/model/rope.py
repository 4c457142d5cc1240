"""Rotary position embedding with YaRN scaling, in DeepSeek's interleaved-pair layout.

Frequencies (K2_FACTS §3.3; transformers `_compute_yarn_parameters`): for pair i of the
Dr = qk_rope_head_dim rotary dims, f_extra(i) = θ^(−2i/Dr) and f_inter(i) = f_extra(i)/factor. A
linear ramp between the correction dims of beta_fast and beta_slow blends them: pairs below `low`
keep the original frequency, pairs above `high` are divided by the factor. Kimi-K2 (factor 32,
β_fast 1) ramps over pairs 19..20; K2.5 (factor 64, β_fast 32) over 8..20.

Layout: the checkpoint's q_rope/k_rope dims are *interleaved pairs* (x0, x1), (x2, x3), ... each
rotated by one frequency (GPT-J style). Like transformers, we return the rotated pairs de-interleaved
([evens..., odds...]); q and k get the same permutation, so q·k is unchanged and the output matches
the reference element for element.

YaRN's attention temperature enters twice, as in the reference: cos/sin are multiplied by
`attention_factor` = mscale(s, mscale)/mscale(s, mscale_all_dim) (1.0 for every Kimi model), and
the softmax scale by mscale(s, mscale_all_dim)² (ModelConfig.softmax_scale).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.config import ModelConfig, yarn_mscale


def rope_parameters(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inv_freq float32 [Dr/2], attention_factor) for the config's rope type.

    Computed in float64 and rounded once to float32; transformers computes in float32, so the two
    agree to within one float32 ulp (tested).
    """
    dim = cfg.qk_rope_head_dim
    pos_freqs = cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv_freq_extra = 1.0 / pos_freqs
    if cfg.rope_type == "default":
        return inv_freq_extra.astype(np.float32), 1.0
    factor = cfg.rope_factor
    inv_freq_inter = 1.0 / (factor * pos_freqs)
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        attention_factor = yarn_mscale(factor, cfg.rope_mscale) / yarn_mscale(
            factor, cfg.rope_mscale_all_dim
        )
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(num_rotations):
        L0 = cfg.rope_original_max_position_embeddings
        return (dim * math.log(L0 / (num_rotations * 2 * math.pi))) / (2 * math.log(cfg.rope_theta))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extra_mask = 1.0 - ramp
    inv_freq = inv_freq_inter * (1.0 - extra_mask) + inv_freq_extra * extra_mask
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, attention_factor: float, dtype):
    """cos, sin [B, T, Dr/2] for integer positions [B, T], cast to the activation dtype."""
    f32 = jnp.promote_types(dtype, jnp.float32)
    freqs = positions.astype(f32)[..., None] * jnp.asarray(inv_freq, f32)
    cos = jnp.cos(freqs) * attention_factor
    sin = jnp.sin(freqs) * attention_factor
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs of x [B, T, (H,) Dr]; returns them de-interleaved.

    cos/sin are [B, T, Dr/2]; a head axis in x is broadcast over.
    """
    if x.ndim == cos.ndim + 1:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
