"""Grouped matmul: the expert GEMM of a mixture-of-experts layer, behind one interface.

    y[m] = x[m] · W[g(m)]ᵀ  (+ s · (x'[m] · A[g(m)]ᵀ) · B[g(m)]ᵀ  with LoRA)

Rows of `x` are sorted by expert: the first group_sizes[0] rows belong to expert 0, the next
group_sizes[1] to expert 1, and so on (groups may be empty). Rows past sum(group_sizes) are padding
and come out as zeros. Weights use the Hugging Face [out, in] layout stacked over experts, W [G, N, K],
either as a dense array or as an `Int4Weight` (int4 codes + group-32 scales). The optional per-expert
LoRA is A [G, r, K], B [G, N, r], scaled by `s`; it is computed as two small grouped matmuls beside
the frozen one, never as W + s·BA.

Implementations (chosen by `impl`):
  "xla"     the reference: dequantise, then `jax.lax.ragged_dot_general`. Exact, runs everywhere,
            and is the oracle every other implementation is tested against. On CUDA, ragged_dot is a
            dense masked expansion in this JAX (GPU_NOTES.md), so it is for CPU and tests only.
  "pallas"  the GPU kernel (k2jax/ops/gmm_pallas.py): Pallas for the Triton backend, dropless,
            per-tile INT4 dequantisation, LoRA fused, its own VJP (W frozen: no W gradient). On a
            CPU backend it runs in Pallas interpret mode (slow; that is how the tests check it).
  "auto"    "pallas" when JAX's default backend is a GPU, else "xla".
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from k2jax.ops.gmm_pallas import grouped_matmul_pallas
from k2jax.quant import Int4Weight, dequantize

# x [M, K] · W [G, N, K] -> [M, N]: contract x's dim 1 with W's dim 2; x's dim 0 is ragged.
_DIMS_NK = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)

IMPLS = ("auto", "xla", "pallas", "plan")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupedLora:
    """Per-expert LoRA factors: a [G, r, K], b [G, N, r]; the update is scale · x·aᵀ·bᵀ."""

    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)


def grouped_matmul(
    x: jax.Array,
    w: jax.Array | Int4Weight,
    group_sizes: jax.Array,
    *,
    lora: GroupedLora | None = None,
    lora_x: jax.Array | None = None,
    impl: str = "auto",
    preferred_element_type=None,
) -> jax.Array:
    """y [M, N] for rows x [M, K] sorted by group, weights w [G, N, K]; see the module docstring.

    `lora_x` is the LoRA input when it differs from `x` (LoRA dropout); `preferred_element_type`
    is the accumulation/output dtype (default: x's dtype).
    """
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul impl must be one of {IMPLS}, got {impl!r}")
    _check_shapes(x, w, group_sizes, lora)
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    if impl == "plan":
        return grouped_matmul_plan(x, w, group_sizes, lora=lora, lora_x=lora_x)
    if impl == "pallas":
        return grouped_matmul_pallas(
            x,
            w,
            group_sizes,
            lora=lora,
            lora_x=lora_x,
            preferred_element_type=preferred_element_type,
        )
    return grouped_matmul_reference(
        x, w, group_sizes, lora=lora, lora_x=lora_x, preferred_element_type=preferred_element_type
    )


def grouped_matmul_reference(
    x, w, group_sizes, *, lora=None, lora_x=None, preferred_element_type=None
) -> jax.Array:
    """The XLA reference: dequantise W, then ragged dots (see the module docstring)."""
    out_dtype = preferred_element_type or x.dtype
    w_dense = dequantize(w, x.dtype)
    y = jax.lax.ragged_dot_general(
        x, w_dense, group_sizes, _DIMS_NK, preferred_element_type=out_dtype
    )
    if lora is not None:
        lx = x if lora_x is None else lora_x
        t = jax.lax.ragged_dot_general(
            lx, lora.a.astype(lx.dtype), group_sizes, _DIMS_NK, preferred_element_type=jnp.float32
        )
        t = (t * lora.scale).astype(lx.dtype)
        y = y + jax.lax.ragged_dot_general(
            t, lora.b.astype(lx.dtype), group_sizes, _DIMS_NK, preferred_element_type=out_dtype
        )
    return y


def grouped_matmul_plan(x, w, group_sizes, *, lora=None, lora_x=None) -> jax.Array:
    """A memory-planning stand-in for the GPU kernel (`k2jax plan` only; NOT a matmul).

    Same inputs, outputs and gradient outputs as the Pallas kernel and, like it, no temporaries
    beyond them — but almost no arithmetic, so a CPU compile of the train step reports the GPU
    program's memory. (Compiling the real kernel for CPU runs it in interpret mode, which
    materialises dequantised weights, and the XLA reference is a dense [G, M, N] expansion.)
    """
    # The weights are not inputs of the stand-in (only their shape is): the real kernel reads
    # them in place, while XLA:CPU would copy int4 stacks to int8 to slice them in the layer loop.
    n = w.shape[1]

    @jax.custom_vjp
    def f(x, lx, lora):
        return jnp.broadcast_to(jnp.sum(x, axis=1, keepdims=True), (x.shape[0], n)).astype(x.dtype)

    def fwd(x, lx, lora):
        return f(x, lx, lora), (x, lx, lora)

    def bwd(res, dy):
        x, lx, lora = res
        row = jnp.sum(dy.astype(jnp.float32), axis=1, keepdims=True)
        dx = jnp.broadcast_to(row, x.shape).astype(x.dtype)
        dlx = None if lx is None else jnp.broadcast_to(row, lx.shape).astype(lx.dtype)
        dlora = None
        if lora is not None:
            total = jnp.sum(row)
            dlora = GroupedLora(
                a=jnp.broadcast_to(total, lora.a.shape).astype(lora.a.dtype),
                b=jnp.broadcast_to(total, lora.b.shape).astype(lora.b.dtype),
                scale=lora.scale,
            )
        return dx, dlx, dlora

    f.defvjp(fwd, bwd)
    return f(x, lora_x, lora)


def _check_shapes(x, w, group_sizes, lora):
    w_shape = w.shape
    if x.ndim != 2 or len(w_shape) != 3:
        raise ValueError(f"grouped_matmul wants x [M, K] and w [G, N, K], got {x.shape}, {w_shape}")
    g, _, k = w_shape
    if x.shape[1] != k:
        raise ValueError(f"grouped_matmul: x has K={x.shape[1]} but w has K={k}")
    if group_sizes.shape != (g,):
        raise ValueError(f"grouped_matmul: group_sizes {group_sizes.shape} != ({g},)")
    if lora is not None:
        r = lora.a.shape[1]
        if lora.a.shape != (g, r, k) or lora.b.shape != (g, w_shape[1], r):
            raise ValueError(
                f"grouped_matmul: LoRA shapes a {lora.a.shape}, b {lora.b.shape} do not match "
                f"w {w_shape} (want a [G, r, K], b [G, N, r])"
            )
