"""Mixed-precision contractions that run on every backend.

    y = einsum_acc("btd,vd->btv", h_bf16, w_bf16)     # float32 result, float32 accumulation

Low-precision operands with a float32 accumulator and output are what GPUs (and TPUs) do
natively, and what `jnp.einsum(..., preferred_element_type=jnp.float32)` asks for. XLA:CPU cannot
run every such dot: a bf16 × bf16 → f32 dot that it does not fuse into one of its matmul fusions
fails at run time with "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32"
(seen with jax 0.12 on the MLA decode's per-head query absorption, `bthd,hdc->bthc`). So on the
CPU backend the operands are widened to the accumulation dtype first. The numbers are the same:
the product of two bf16 (or fp16) values is exact in float32, and the sum accumulates in float32
either way; only the CPU pays for the widened copies, and CPU runs are small.

The rejected alternative, a float32 default dtype on CPU, would hide the bug from users who ask
for bf16 and leave every other bf16 path (generate, load_finetune, notebooks) to fail later.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def accum_dtype(*operands) -> jnp.dtype:
    """float32, or wider if an operand is wider (float64 numerics checks)."""
    return jnp.promote_types(jnp.result_type(*operands), jnp.float32)


def einsum_acc(spec: str, *operands: jax.Array, precision=None) -> jax.Array:
    """`jnp.einsum(spec, *operands)` accumulated in and returned as `accum_dtype(*operands)`."""
    acc = accum_dtype(*operands)
    if jax.default_backend() == "cpu":
        operands = tuple(x.astype(acc) for x in operands)
    return jnp.einsum(spec, *operands, preferred_element_type=acc, precision=precision)
