"""QK-clip's per-head max logit in Pallas for the Triton (GPU) backend: no logits in HBM.

    max_logit[h] = max over b and visible (t, s) of
                   scale · (q_nope[b,t,h]·k_nope[b,s,h] + q_rope[b,t,h]·k_rope[b,s])

MuonClip needs this number per layer and head every step (K2_FACTS §5.2), and cuDNN's flash
attention, which computes the attention itself on GPU, does not expose logits. The XLA way
(`attention.max_logit_blocked`) materialises float32 [B, H, block, S] logit blocks: at K2 sizes
(H = 64, S = 4096) ≈17 GB of memory traffic per layer, and block·S·H·4 bytes of temporaries per
block (1.6 GB at S = 12,288) that also cap the longest sequence `k2jax plan` finds. This kernel is
the forward of flash attention without the softmax and V: each program holds a query tile in
registers, streams key tiles past it and keeps a running max; the only thing it writes is one
float per (batch, head, query block).

Grid and blocks
---------------
One program per (query block, batch row, head): grid (ceil(T/bq), B, H), axis 0 fastest, so
programs that run together share the head's keys in L2 (the shared rotary key k_rope[b] is read by
every head of the row). The query tile is q_nope[b, t0:t0+bq, h] [bq, Dn] and q_rope [bq, Dr]; the
loop over key blocks loads k_nope[b, s0:s0+bk, h] [bk, Dn] and k_rope[b, s0:s0+bk] [bk, Dr] — the
rotary key is one vector per position, read once per key tile and never broadcast to H heads — and
forms the [bq, bk] logits as two MMAs with float32 accumulation,

    logits = scale · (q_nope·k_nopeᵀ + q_rope·k_ropeᵀ)

exactly the two einsums of the XLA reference, so bf16 inputs give the same float32 products
(bf16 × bf16 is exact in float32); only the order of the float32 sums inside a dot may differ
(tests/test_max_logit_pallas.py: equal to `max_logit_blocked` within float32 rounding). float32
inputs use IEEE float32 MMAs (`Precision.HIGHEST`; Triton would use TF32). A head dim that is
not a power of two ≥ 16 (tl.dot's minimum) is zero-padded in XLA first, a copy that K2's Dn = 128
and Dr = 64 never need. Running max: one float per query row, `m = max(m, rowmax(masked
logits))` per key tile; at the end the program stores max(m). Query blocks are visited last-first
(the heaviest causal rows start first, which evens out the tail of the launch). Triton's max is
IEEE maxNum, so a NaN logit is ignored on GPU where XLA would return NaN; a NaN logit makes the
loss NaN, and the train step then skips the update and QK-clip altogether (k2jax/train/step.py).

Predicted cost (not measured): 2·B·H·(T·S/2)·(Dn + Dr) MMA flops at T = S, 0.21 TFLOP per K2
layer at S = 4096 (≈0.4 ms at 500 TFLOP/s, about half of cuDNN's attention forward there), with
HBM traffic of one read of q and k (≈0.2 GB) plus key tiles re-read per query block from L2,
against ≈17 GB for the XLA pass. The tiles (`Tiles`) are untuned starting points.

Masking and skipping
--------------------
Query t sees key s iff s ≤ q_index[b, t] and q_segment_ids[b, t] == kv_segment_ids[b, s] — the
mask of `attention.attention_mask`, so padding (segment 0) sees padding as in the reference, and
the cached/decoding form (T queries at positions q_index among S keys) is the same kernel. Rows
past T load q_index = −1 (they see nothing); columns past S are masked. A program loops only over
key blocks [0, ceil((max_t q_index[b, t] + 1) / bk)): for training (q_index = t) that is the
causal bound, keys beyond the query block's last position are never loaded, which halves the work
at T = S. Blocks hidden only by the segment mask are still computed (a packed row's earlier
documents): skipping them needs either a per-tile branch around the loads, which defeats Triton's
software pipelining of the key loop for the common unpacked row, or contiguous segments, which the
interface does not promise.

Partitioning
------------
A Pallas call is an opaque custom call to XLA's SPMD partitioner, which would all-gather its
operands and run the whole batch on every device. So the per-(b, h) max is wrapped in
`custom_partitioning`: batch and head dims stay sharded as they come (q_nope's sharding decides;
the other operands follow it), the sequence and feature dims are replicated, and each device runs
the kernel on its shard. The result [B, H] keeps that sharding; the max over B outside is a small
all-reduce that XLA inserts. (Rejected: `shard_map` over the rules table's "batch" and "heads"
axes — it would need the mesh and the logical axes inside an op and reshard whatever sharding
arrives.)

No gradient: QK-clip uses the number under stop_gradient, and the inputs are stop_gradient-ed here.
Pallas' Triton lowering addresses operands of ≤ 2³² bytes with i32 element offsets, so every
operand must have < 2³¹ elements (checked; q_nope at B = 1, S = 128k, H = 64 has 2³⁰). jax 0.12
warns that the Pallas Triton backend is deprecated; `attention.py` is the only caller, so another
backend can replace this module behind `attention(...)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding, PartitionSpec

from k2jax.ops.pallas_tiles import MIN_BLOCK, block_size, mask2d, masked_load

# Operands of ≤ 2³² bytes get i32 element offsets (gmm_pallas.py, "32-bit offsets").
_OFFSETS_I64_ABOVE = 2**32
_OFFSETS_I32_LIMIT = 2**31


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Query rows and key columns per tile, and Triton launch parameters (powers of two).

    Starting points, not timed on a GPU: per program a [bq, Dn + Dr] query tile and a [bq, bk]
    float32 logit tile, i.e. a flash-attention forward at head dim 192 without its [bq, Dv] output
    accumulator and softmax state. An offline compile of the K2-size IR for sm_90a (triton 3.9
    from PyPI, not jaxlib's own Triton) used wgmma for every tiling tried. At 128 × 64 tiles,
    8 warps and 2 stages take 102 registers per thread and 96 KiB of shared memory (two programs
    per SM); 4 warps and 3 stages 209 registers and 120 KiB (one program per SM); 128 × 128 tiles
    with 4 warps hit 255 registers and a 184-byte stack (spills).
    """

    bq: int = 128
    bk: int = 64
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        for name in ("bq", "bk"):
            v = getattr(self, name)
            if v < MIN_BLOCK or v & (v - 1):
                raise ValueError(f"Tiles.{name}={v} must be a power of two ≥ {MIN_BLOCK}")


DEFAULT_TILES = Tiles()


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of one kernel call (hashable: it parameterises the kernel)."""

    t: int  # T queries
    s: int  # S keys
    dn: int  # Dn, nope head dim
    dr: int  # Dr, rope head dim
    bq: int
    bk: int
    scale: float
    cdt: jnp.dtype  # MMA operand dtype
    precision: lax.Precision | None


def _dot_nt(a, b, precision):
    """a [m, k] · b [n, k]ᵀ with a float32 accumulator."""
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _kernel(qn_ref, qr_ref, kn_ref, kr_ref, qseg_ref, kseg_ref, qidx_ref, out_ref, *, spec):
    bq, bk = spec.bq, spec.bk
    i = pl.cdiv(spec.t, bq) - 1 - pl.program_id(0)  # the last (heaviest) query block first
    b, h = pl.program_id(1), pl.program_id(2)

    t0 = i * bq
    rows = pl.ds(t0, bq)
    row_ok = t0 + jnp.arange(bq, dtype=jnp.int32) < spec.t if spec.t % bq else None
    qn = masked_load(qn_ref.at[b, rows, h, :], mask2d(row_ok, None, (bq, spec.dn)), 0)
    qr = masked_load(qr_ref.at[b, rows, h, :], mask2d(row_ok, None, (bq, spec.dr)), 0)
    qn, qr = qn.astype(spec.cdt), qr.astype(spec.cdt)
    q_seg = masked_load(qseg_ref.at[b, rows], row_ok, 0)
    q_idx = masked_load(qidx_ref.at[b, rows], row_ok, -1)  # rows past T see no key

    # Only key blocks up to the block's last visible position are loaded (causal skip).
    last = jnp.maximum(jnp.max(q_idx), -1)
    num_k_blocks = jnp.minimum(lax.div(last + bk, bk), pl.cdiv(spec.s, bk))

    def step(j, m):
        s0 = j * bk
        keys = pl.ds(s0, bk)
        cols = s0 + jnp.arange(bk, dtype=jnp.int32)
        col_ok = cols < spec.s if spec.s % bk else None
        kn = masked_load(kn_ref.at[b, keys, h, :], mask2d(col_ok, None, (bk, spec.dn)), 0)
        kr = masked_load(kr_ref.at[b, keys, :], mask2d(col_ok, None, (bk, spec.dr)), 0)
        k_seg = masked_load(kseg_ref.at[b, keys], col_ok, 0)
        logits = _dot_nt(qn, kn.astype(spec.cdt), spec.precision)
        logits = logits + _dot_nt(qr, kr.astype(spec.cdt), spec.precision)
        logits = logits * spec.scale
        visible = (q_seg[:, None] == k_seg[None, :]) & (cols[None, :] <= q_idx[:, None])
        if col_ok is not None:
            visible = visible & col_ok[None, :]
        return jnp.maximum(m, jnp.max(jnp.where(visible, logits, -jnp.inf), axis=1))

    m = lax.fori_loop(0, num_k_blocks, step, jnp.full((bq,), -jnp.inf, jnp.float32))
    plgpu.store(out_ref.at[b, h, i], jnp.max(m))


def _precision(cdt):
    # float32 operands: IEEE float32 MMAs (Triton would use TF32 by default); 16-bit: native.
    return lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None


def _compiler_params(tiles: Tiles):
    # `CompilerParams` in jax ≥ 0.7 (0.11.2 on the GPU machine, 0.12 in CI); older releases named
    # it `TritonCompilerParams`. Interpret mode ignores it.
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    return None if cls is None else cls(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _pad_last(*xs):
    d = xs[0].shape[-1]
    pad = max(MIN_BLOCK, pl.next_power_of_2(d)) - d
    if not pad:
        return xs
    return tuple(jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) for x in xs)


def _check_offsets(operands) -> None:
    """Raises unless every operand is addressed with i64 offsets or within 2³¹ elements."""
    for name, x in operands:
        nbytes = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        if nbytes <= _OFFSETS_I64_ABOVE and math.prod(x.shape) >= _OFFSETS_I32_LIMIT:
            raise ValueError(
                f"max_logit kernel: {name} {x.shape} {x.dtype} has ≥ 2**31 elements, which the "
                "Triton lowering addresses with 32-bit offsets; split the batch"
            )


def max_logit_per_row(
    q_nope,
    q_rope,
    k_nope,
    k_rope,
    q_segment_ids,
    kv_segment_ids,
    q_index,
    *,
    scale,
    tiles,
    interpret,
) -> jax.Array:
    """The kernel on one device's arrays: float32 [B, H], the max over each row's visible pairs
    of each head (−inf where a row sees nothing)."""
    # Head dims that are not a power of two ≥ 16 (tl.dot) are zero-padded: a copy, but only for
    # such shapes (K2: Dn = 128, Dr = 64 go in as they are); zeros add nothing to the logits.
    q_nope, k_nope = _pad_last(q_nope, k_nope)
    q_rope, k_rope = _pad_last(q_rope, k_rope)
    B, T, H, Dn = q_nope.shape
    S, Dr = k_nope.shape[1], q_rope.shape[-1]
    cdt = jnp.result_type(q_nope, q_rope, k_nope, k_rope)
    spec = _Spec(
        t=T,
        s=S,
        dn=Dn,
        dr=Dr,
        bq=block_size(T, tiles.bq),
        bk=block_size(S, tiles.bk),
        scale=float(scale),
        cdt=cdt,
        precision=_precision(cdt),
    )
    inputs = (
        q_nope,
        q_rope,
        k_nope,
        k_rope,
        q_segment_ids.astype(jnp.int32),
        kv_segment_ids.astype(jnp.int32),
        q_index.astype(jnp.int32),
    )
    num_q_blocks = pl.cdiv(T, spec.bq)
    out_shape = jax.ShapeDtypeStruct((B, H, num_q_blocks), jnp.float32)
    _check_offsets(zip(("q_nope", "q_rope", "k_nope", "k_rope", "out"), (*inputs[:4], out_shape)))
    per_block = pl.pallas_call(
        functools.partial(_kernel, spec=spec),
        out_shape=out_shape,
        grid=(num_q_blocks, B, H),
        compiler_params=_compiler_params(tiles),
        interpret=interpret,
        name="max_logit",
    )(*inputs)
    return jnp.max(per_block, axis=-1)


# --------------------------------------------------------------------------------------------
# Partitioning (module docstring): batch and heads as they come, everything else replicated
# --------------------------------------------------------------------------------------------


def _batch_head_axes(sharding):
    """(batch, heads) mesh axes of q_nope's [B, T, H, Dn] sharding (None: replicated)."""
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None, None
    spec = tuple(spec) + (None,) * (4 - len(spec))
    return spec[0], spec[2]


def _shardings(mesh, arg_shapes):
    b, h = _batch_head_axes(arg_shapes[0].sharding)
    ns = lambda *names: NamedSharding(mesh, PartitionSpec(*names))  # noqa: E731
    per_head = ns(b, None, h, None)
    args = (per_head, per_head, per_head, ns(b, None, None), ns(b, None), ns(b, None), ns(b, None))
    return args, ns(b, h)


def _infer_sharding(scale, tiles, interpret, mesh, arg_shapes, result_shape):
    return _shardings(mesh, arg_shapes)[1]


def _partition(scale, tiles, interpret, mesh, arg_shapes, result_shape):
    args, out = _shardings(mesh, arg_shapes)
    lower = functools.partial(max_logit_per_row, scale=scale, tiles=tiles, interpret=interpret)
    return mesh, lower, out, args


@functools.partial(custom_partitioning, static_argnums=(7, 8, 9))
def _max_logit_sharded(qn, qr, kn, kr, q_seg, kv_seg, q_index, scale, tiles, interpret):
    return max_logit_per_row(
        qn, qr, kn, kr, q_seg, kv_seg, q_index, scale=scale, tiles=tiles, interpret=interpret
    )


_max_logit_sharded.def_partition(
    infer_sharding_from_operands=_infer_sharding,
    partition=_partition,
    sharding_rule="b t h d, b t h r, b s h d, b s r, b t, b s, b t -> b h",
    need_replication_factors=("t", "d", "r", "s"),  # in order of first appearance
)


def max_logit_pallas(
    q_nope: jax.Array,  # [B, T, H, Dn]
    q_rope: jax.Array,  # [B, T, H, Dr]
    k_nope: jax.Array,  # [B, S, H, Dn]
    k_rope: jax.Array,  # [B, S, Dr]   shared by all heads
    scale: float,
    q_segment_ids: jax.Array,  # [B, T]
    kv_segment_ids: jax.Array,  # [B, S]
    q_index: jax.Array | None = None,  # [B, T]; None: query t sits at key position t
    *,
    tiles: Tiles = DEFAULT_TILES,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-head max of the visible pre-softmax logits, float32 [H] (−inf for a head that sees
    nothing); the signature of `attention.max_logit_blocked`. No gradient.

    `interpret=None` runs the kernel in Pallas interpret mode when JAX's default backend is the
    CPU, compiled through Triton otherwise.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    B, T = q_nope.shape[:2]
    if q_index is None:
        q_index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    args = jax.lax.stop_gradient(
        (q_nope, q_rope, k_nope, k_rope, q_segment_ids, kv_segment_ids, q_index)
    )
    per_row = _max_logit_sharded(*args, float(scale), tiles, bool(interpret))
    return jnp.max(per_row, axis=0)
