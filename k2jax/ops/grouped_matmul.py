"""Grouped matmul: the expert GEMM of a mixture-of-experts layer, behind one interface.

    y[m] = x[m] · W[g(m)]ᵀ  (+ s · (x'[m] · A[g(m)]ᵀ) · B[g(m)]ᵀ  with LoRA)

Rows of `x` are sorted by expert: the first group_sizes[0] rows belong to expert 0, the next
group_sizes[1] to expert 1, and so on (groups may be empty). Rows past sum(group_sizes) are padding
and come out as zeros. Weights use the Hugging Face [out, in] layout stacked over experts, W [G, N, K],
either as a dense array or as an `Int4Weight` (int4 codes + group-32 scales). The optional per-expert
LoRA is A [G, r, K], B [G, N, r], scaled by `s`; it is computed as two small grouped matmuls beside
the frozen one, never as W + s·BA.

Column-block LoRA: `lora` may instead be a sequence of k adapters, adapter b covering the output
columns [b·N/k, (b+1)·N/k) with its own A_b [G, r_b, K], B_b [G, N/k, r_b], scale s_b and input x_b:

    y[m] = x[m] · W[g]ᵀ + concat_b( s_b · (x_b[m] · A_b[g]ᵀ) · B_b[g]ᵀ )        b = 0 … k−1

`lora_x` is then None (every adapter reads x), one array (every adapter reads it), or one array or
None (x) per block; a block may have no adapter (None). This is the experts' gate|up call: gate and
up share one fused base weight [G, 2F, K] but have separate adapters, lora=(lora_gate, lora_up),
each on its own input, lora_x=(x_gate, x_up). The alternative, one adapter with A = [A_gate; A_up]
[G, 2r, K] and a block-diagonal B [G, 2F, 2r], is the same function with half of B zeros (≈100 MB
per K2 layer, rebuilt every call, and a gradient of that size), and it makes both adapters read
one input, so PEFT's LoRA dropout — each adapter its own mask of its own input — could not be
reproduced. Gradients flow to x, to each lora_x given (an array read by several adapters gets
the sum), and to each A_b and B_b; one GroupedLora is the k = 1 case.

Implementations (chosen by `impl`):
  "xla"     the reference: dequantise, then `jax.lax.ragged_dot_general`. Exact, runs everywhere,
            and is the oracle every other implementation is tested against. On CUDA, ragged_dot is a
            dense masked expansion in this JAX (GPU_NOTES.md), so it is for CPU and tests only.
  "pallas"  the GPU kernel (k2jax/ops/gmm_pallas.py): Pallas for the Triton backend, dropless,
            per-tile INT4 dequantisation, LoRA fused (column blocks without zero blocks), its own
            VJP (W frozen: no W gradient). On a CPU backend it runs in Pallas interpret mode
            (slow; that is how the tests check it).
  "plan"    a memory-planning stand-in with the kernel's inputs, outputs and gradient shapes and
            almost no arithmetic (`grouped_matmul_plan`; for `k2jax plan` only).
  "auto"    "pallas" when JAX's default backend is a GPU, else "xla".

CE-LoRA (`ce`, lora.backward = "ce"): the forward is the same; the backward through the frozen W
is approximated by k2jax/ops/ce_backward.py's factors of each expert. The implementation is told
not to compute dy·W[g] itself (Pallas: `base_dx=False`; the reference: W's product reads a
stopped-gradient x) and `attach_grouped` adds the approximation, with the same implementation
for its three small grouped products; the LoRA terms keep their exact backward.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from k2jax.ops.ce_backward import GroupedFactors, attach_grouped
from k2jax.ops.gmm_pallas import grouped_matmul_pallas, lora_blocks
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
    """Per-expert LoRA factors: a [G, r, K], b [G, N, r]; the update is scale · x·aᵀ·bᵀ. As one
    of k column blocks (module docstring), b is [G, N/k, r] and the update covers its block."""

    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)


def grouped_matmul(
    x: jax.Array,
    w: jax.Array | Int4Weight,
    group_sizes: jax.Array,
    *,
    lora: GroupedLora | Sequence[GroupedLora | None] | None = None,
    lora_x: jax.Array | Sequence[jax.Array | None] | None = None,
    impl: str = "auto",
    preferred_element_type=None,
    ce: GroupedFactors | None = None,
) -> jax.Array:
    """y [M, N] for rows x [M, K] sorted by group, weights w [G, N, K]; see the module docstring.

    `lora` is one GroupedLora (b [G, N, r]) or k column blocks of them (b [G, N/k, r], or None
    for a block without an adapter); `lora_x` their input when it differs from `x` (LoRA
    dropout): one array for all, or one array or None per block. `preferred_element_type` is the
    accumulation/output dtype (default: x's dtype). `ce`: CE-LoRA's factors of w, for an
    approximated backward through it (module docstring).
    """
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul impl must be one of {IMPLS}, got {impl!r}")
    _check_shapes(x, w, group_sizes, lora, lora_x)
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    kw = dict(lora=lora, lora_x=lora_x)
    if impl == "plan":  # the stand-in's backward is shapes only, with or without `ce`
        y = grouped_matmul_plan(x, w, group_sizes, **kw)
    else:
        kw.update(preferred_element_type=preferred_element_type, base_dx=ce is None)
        gmm = grouped_matmul_pallas if impl == "pallas" else grouped_matmul_reference
        y = gmm(x, w, group_sizes, **kw)
    if ce is None:
        return y
    matmul = functools.partial(grouped_matmul, impl=impl)
    # the plan keeps the weights out of its program (grouped_matmul_plan), CE's rows included
    return attach_grouped(y, x, None if impl == "plan" else w, group_sizes, ce, matmul)


def grouped_matmul_reference(
    x, w, group_sizes, *, lora=None, lora_x=None, preferred_element_type=None, base_dx=True
) -> jax.Array:
    """The XLA reference: dequantise W, then ragged dots (see the module docstring). With
    `base_dx=False` no gradient flows to x through W's product (CE-LoRA adds its own)."""
    out_dtype = preferred_element_type or x.dtype
    w_dense = dequantize(w, x.dtype)
    y = jax.lax.ragged_dot_general(
        x if base_dx else jax.lax.stop_gradient(x),
        w_dense,
        group_sizes,
        _DIMS_NK,
        preferred_element_type=out_dtype,
    )
    adapters, inputs = lora_blocks(lora, lora_x)
    if not adapters:
        return y
    blocks = jnp.split(y, len(adapters), axis=1) if len(adapters) > 1 else [y]
    for i, (lo, lx) in enumerate(zip(adapters, inputs)):
        if lo is None:
            continue
        lx = x if lx is None else lx
        t = jax.lax.ragged_dot_general(
            lx, lo.a.astype(lx.dtype), group_sizes, _DIMS_NK, preferred_element_type=jnp.float32
        )
        t = (t * lo.scale).astype(lx.dtype)
        blocks[i] = blocks[i] + jax.lax.ragged_dot_general(
            t, lo.b.astype(lx.dtype), group_sizes, _DIMS_NK, preferred_element_type=out_dtype
        )
    return jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]


def grouped_matmul_plan(x, w, group_sizes, *, lora=None, lora_x=None) -> jax.Array:
    """A memory-planning stand-in for the GPU kernel (`k2jax plan` only; NOT a matmul).

    Same inputs, outputs and gradient outputs as the Pallas kernel (every `lora` / `lora_x` form)
    and, like it, no temporaries beyond them — but almost no arithmetic, so a CPU compile of the
    train step reports the GPU program's memory. (Compiling the real kernel for CPU runs it in
    interpret mode, which materialises dequantised weights, and the XLA reference is a dense
    [G, M, N] expansion.)
    """
    # The weights are not inputs of the stand-in (only their shape is): the real kernel reads
    # them in place, while XLA:CPU would copy int4 stacks to int8 to slice them in the layer loop.
    n = w.shape[1]
    adapters, inputs = lora_blocks(lora, lora_x)

    @jax.custom_vjp
    def f(x, inputs, adapters):
        return jnp.broadcast_to(jnp.sum(x, axis=1, keepdims=True), (x.shape[0], n)).astype(x.dtype)

    def fwd(x, inputs, adapters):
        return f(x, inputs, adapters), (x, inputs, adapters)

    def bwd(res, dy):
        x, inputs, adapters = res
        row = jnp.sum(dy.astype(jnp.float32), axis=1, keepdims=True)
        dx = jnp.broadcast_to(row, x.shape).astype(x.dtype)
        d_inputs = tuple(
            None if v is None else jnp.broadcast_to(row, v.shape).astype(v.dtype) for v in inputs
        )
        total = jnp.sum(row)
        d_adapters = tuple(
            None
            if lo is None
            else GroupedLora(
                a=jnp.broadcast_to(total, lo.a.shape).astype(lo.a.dtype),
                b=jnp.broadcast_to(total, lo.b.shape).astype(lo.b.dtype),
                scale=lo.scale,
            )
            for lo in adapters
        )
        return dx, d_inputs, d_adapters

    f.defvjp(fwd, bwd)
    return f(x, inputs, adapters)


def _check_shapes(x, w, group_sizes, lora, lora_x):
    w_shape = w.shape
    if x.ndim != 2 or len(w_shape) != 3:
        raise ValueError(f"grouped_matmul wants x [M, K] and w [G, N, K], got {x.shape}, {w_shape}")
    g, n, k = w_shape
    if x.shape[1] != k:
        raise ValueError(f"grouped_matmul: x has K={x.shape[1]} but w has K={k}")
    if group_sizes.shape != (g,):
        raise ValueError(f"grouped_matmul: group_sizes {group_sizes.shape} != ({g},)")
    adapters, inputs = lora_blocks(lora, lora_x)
    if adapters and n % len(adapters):
        raise ValueError(f"grouped_matmul: N={n} does not split into {len(adapters)} blocks")
    for lo, lx in zip(adapters, inputs):
        if lo is None:
            continue
        r, nb = lo.a.shape[1], n // len(adapters)
        if lo.a.shape != (g, r, k) or lo.b.shape != (g, nb, r):
            raise ValueError(
                f"grouped_matmul: LoRA shapes a {lo.a.shape}, b {lo.b.shape} do not match "
                f"w {w_shape} in {len(adapters)} column block(s) (want a [G, r, K], "
                f"b [G, N/blocks, r])"
            )
        if lx is not None and lx.shape != x.shape:
            raise ValueError(f"grouped_matmul: lora_x {lx.shape} != x {x.shape}")
