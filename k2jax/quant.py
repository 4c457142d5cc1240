"""Quantized weight containers and (de)quantisation.

Kimi-K2-Thinking and K2.5 ship their routed experts as compressed-tensors `pack-quantized` INT4:
symmetric, one bf16 scale per group of 32 consecutive *input* features, W[o, i] = q[o, i] ·
scale[o, i // 32], q ∈ [−8, 7] (K2_FACTS §2.3). k2jax keeps those experts INT4 in device memory:

    Int4Weight.values  jnp.int4  [..., out, in]        (the unpacked codes, HF [out, in] layout)
    Int4Weight.scales  bf16      [..., out, in // group]

`jnp.int4` is a real XLA type (two codes per byte in HBM), so a 384-expert stack costs half a byte
per weight and a GPU kernel can load it tile by tile. The XLA reference path simply dequantises
(`dequantize`) before its matmul; the GPU kernel (k2jax/ops) dequantises per tile in registers and
never writes a bf16 copy of the stack.

Rejected alternative: keeping the int32-packed words of the checkpoint. They are the same bytes,
but every consumer would re-implement nibble shifts; `jnp.int4` lets XLA do it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

INT4_MIN, INT4_MAX = -8, 7


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weight:
    """Group-wise symmetric INT4 weight: values int4 [..., N, K], scales [..., N, K // group]."""

    values: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def group_size(self) -> int:
        return self.values.shape[-1] // self.scales.shape[-1]

    @property
    def dtype(self):
        return self.scales.dtype


def dequantize(w: Int4Weight | jax.Array, dtype=None) -> jax.Array:
    """The dense weight (values × per-group scale) in `dtype` (default: the scales' dtype).

    The product is formed in float32 and rounded once, so a bf16 result equals compressed-tensors'
    own dequantisation (which multiplies in the scale dtype: q is exact in bf16, the product of two
    bf16 numbers rounded to bf16 is the same either way).
    """
    if not isinstance(w, Int4Weight):
        return w if dtype is None else w.astype(dtype)
    dtype = dtype or w.scales.dtype
    *lead, n, k = w.values.shape
    g = w.group_size
    q = w.values.astype(jnp.float32).reshape(*lead, n, k // g, g)
    out = q * w.scales.astype(jnp.float32)[..., None]
    return out.reshape(*lead, n, k).astype(dtype)


def quantize_int4(w, group_size: int = 32, scale_dtype=jnp.bfloat16) -> Int4Weight:
    """Quantises a dense weight [..., N, K] with compressed-tensors' symmetric min-max rule.

    scale = max|w| over the group / 7.5 (compressed-tensors `calculate_qparams`: bit range 15 / 2),
    q = clamp(round(w / scale), −8, 7), the quotient rounded to w's dtype first (a bf16 weight is
    divided in bf16, as compressed-tensors does). Used for merging LoRA back into an INT4
    checkpoint and for making test checkpoints; numpy or jax arrays in, jax arrays out.
    """
    w = jnp.asarray(w)
    # compressed-tensors divides in the weight's own dtype: a bf16 quotient is rounded to bf16
    # before it is rounded to an integer, which decides near-ties differently from float32.
    w_dtype = w.dtype if jnp.issubdtype(w.dtype, jnp.floating) else jnp.float32
    w = w.astype(jnp.float32)
    *lead, n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not divisible by the INT4 group size {group_size}")
    wg = w.reshape(*lead, n, k // group_size, group_size)
    absmax = jnp.max(jnp.abs(wg), axis=-1)
    scale = (absmax / ((INT4_MAX - INT4_MIN) / 2)).astype(scale_dtype)
    # Divide by the scale as stored (rounded to its dtype), as compressed-tensors does.
    s32 = scale.astype(jnp.float32)
    safe = jnp.where(s32 == 0, 1.0, s32)
    quotient = (wg / safe[..., None]).astype(w_dtype).astype(jnp.float32)
    q = jnp.clip(jnp.round(quotient), INT4_MIN, INT4_MAX)
    return Int4Weight(values=q.reshape(*lead, n, k).astype(jnp.int4), scales=scale)


def random_int4(key, shape, group_size: int = 32, scale: float = 0.02, dtype=jnp.bfloat16):
    """A random Int4Weight whose dequantised values have roughly `scale` standard deviation."""
    kv, ks = jax.random.split(key)
    values = jax.random.randint(kv, shape, INT4_MIN, INT4_MAX + 1).astype(jnp.int4)
    n_groups = shape[-1] // group_size
    s = scale / 4.6 * jax.random.uniform(ks, (*shape[:-1], n_groups), minval=0.5, maxval=1.5)
    return Int4Weight(values=values, scales=s.astype(dtype))


def int4_numpy(values: np.ndarray) -> np.ndarray:
    """int8 codes in [−8, 7] → the `ml_dtypes.int4` numpy dtype that jnp.int4 arrays use on host."""
    return values.astype(jnp.int4)
