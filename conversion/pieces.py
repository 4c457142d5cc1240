"""The unit of loading: the leaves of a params tree, cut into pieces, placed on a device mesh.

What is loaded is described once, by the model's abstract variables (`abstract_params`: shapes,
dtypes and logical axes, from `jax.eval_shape` of its init; no memory). `plan_leaves` turns them,
with a matching tree of shardings, into one `LeafPlan` per leaf: its key path, whole shape,
dtype, final sharding and, for the [L, ...] stacks of layers, the number of layers. Where the
values come from is the business of the readers above this module (loader.py for Hugging Face
folders, orbax_io.py for converted ones); this one only says how a leaf is cut and placed.

Pieces. A leaf is built in pieces (`LeafPlan.split`): one layer of a stacked leaf ([L, ...],
[L, E, ...]), and for the routed experts a range of rows of one layer (their row axis is never
sharded, so a row range is sharded like the whole layer and restores onto any mesh that holds the
layer), at most `max_piece_bytes` each. The same pieces are the unit of the converted Orbax format.

Placement. No array is ever assembled whole on one host or device. `build_array` creates a piece
with its final sharding from per-device slices, each read on its own (replicas share one read);
`assemble_leaf` starts the leaf as a sharded zero buffer and writes each piece into it by a jitted
`dynamic_update_slice` that donates the buffer (`place_piece`), so device memory holds the leaf
plus one piece and host memory one device's slice of one piece (for Kimi-K2's gate|up expert
stack on 8 devices at most 48 experts × 4096 × 7168 codes ≈ 1.4 GB, against 42 GB for a whole
device shard). Rejected: `jax.make_array_from_callback` on the whole leaf (it holds every device's
whole slice on the host at once) and `jnp.stack` of per-layer arrays (twice the leaf in device
memory). With a FiniteCheck (finite.py), the same jitted write also counts the piece's NaN / Inf.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from k2jax.config import ModelConfig
from k2jax.conversion.finite import FiniteCheck, count_spec, nonfinite, replicated
from k2jax.conversion.hf_names import STACKS
from k2jax.lora import ALL_TARGETS

__all__ = [
    "DEFAULT_PIECE_BYTES",
    "LINEAR_MODULES",
    "LeafPlan",
    "Piece",
    "abstract_params",
    "assemble_leaf",
    "build_array",
    "layer_sharding",
    "place_piece",
    "plan_leaves",
    "progress_bar",
]

# The modules that are nn.Linear in the HF model (what quantization configs target): the LoRA
# targets, the fused routed-expert gate|up stack and the output head.
LINEAR_MODULES = frozenset({*ALL_TARGETS, "gate_up_proj", "lm_head"})
# Largest piece built in one go when loading (an expert leaf's layer is cut into row ranges).
DEFAULT_PIECE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """One leaf of the params tree and how to read it.

    path:     the leaf's key path, e.g. ("moe_layers", "mlp", "experts", "gate_up_proj", "weight_q")
    shape:    the whole leaf's shape; dtype: its numpy dtype (ml_dtypes for bf16 / int4)
    sharding: its final sharding
    layers:   L for leaves stacked over layers (leading [L] axis), else None
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: jax.sharding.Sharding
    layers: int | None

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def module(self) -> tuple[str, ...]:
        return self.path[:-1]

    @property
    def leaf(self) -> str:
        return self.path[-1]

    @property
    def experts(self) -> bool:
        """Whether the leaf has an [E] axis (after the layer axis)."""
        return "experts" in self.module

    @property
    def linear(self) -> bool:
        """Whether the leaf is (part of) a Linear weight, i.e. possibly stored quantized."""
        return self.leaf in ("weight", "weight_q", "weight_scale") and (
            self.module[-1] in LINEAR_MODULES
        )

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """The shape of one layer (the whole leaf when not stacked)."""
        return self.shape[1:] if self.layers is not None else self.shape

    @property
    def layer_sharding(self) -> jax.sharding.Sharding:
        return layer_sharding(self.sharding, stacked=self.layers is not None)

    def layer_indices(self) -> list[int | None]:
        return [None] if self.layers is None else list(range(self.layers))

    def split(self, max_bytes: int) -> list[Piece]:
        """The leaf as pieces of at most `max_bytes` where it can be cut: one per layer, and an
        expert leaf's layer further into row ranges (its rows are never sharded, so a range of
        them is sharded like the whole layer and restores onto any mesh that holds the layer)."""
        chunks = 1
        if self.experts and len(self.layer_shape) == 3 and _spec_of(self.layer_sharding, 1) is None:
            layer_bytes = math.prod(self.layer_shape) * self.dtype.itemsize
            chunks = min(self.layer_shape[1], max(1, -(-layer_bytes // max_bytes)))
        out = []
        for layer in self.layer_indices():
            if chunks == 1:
                out.append(Piece(self, layer, None))
                continue
            n = self.layer_shape[1]
            step = -(-n // chunks)
            out += [Piece(self, layer, (r, min(n, r + step))) for r in range(0, n, step)]
        return out


@dataclasses.dataclass(frozen=True)
class Piece:
    """What is built (and, in a converted folder, stored) in one go: one layer of a leaf, or a
    range of its rows (axis 1 of an expert leaf's layer: [E, rows, in])."""

    leaf: LeafPlan
    layer: int | None
    rows: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.leaf.layer_shape)
        if self.rows is not None:
            shape[1] = self.rows[1] - self.rows[0]
        return tuple(shape)

    @property
    def sharding(self) -> jax.sharding.Sharding:
        return self.leaf.layer_sharding

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.leaf.dtype.itemsize

    @property
    def key(self) -> str | None:
        """Its name under the leaf in a converted item (None: the piece is the whole leaf)."""
        if self.layer is None:
            return None
        rows = "" if self.rows is None else f"_rows_{self.rows[0]}_{self.rows[1]}"
        return f"layer_{self.layer:03d}{rows}"

    def starts(self) -> tuple[int, ...]:
        """Where the piece goes in the whole leaf."""
        starts = [0] * len(self.leaf.shape)
        if self.layer is not None:
            starts[0] = self.layer
        if self.rows is not None:
            starts[len(self.leaf.shape) - len(self.leaf.layer_shape) + 1] = self.rows[0]
        return tuple(starts)

    def layer_index(self, index: tuple[slice, ...]) -> tuple[slice, ...]:
        """A slice of the piece as a slice of its whole layer."""
        if self.rows is None:
            return index
        r = index[1]
        return (index[0], slice(r.start + self.rows[0], r.stop + self.rows[0]), *index[2:])


def _spec_of(sharding, axis: int):
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)
        return spec[axis] if axis < len(spec) else None
    return None


@functools.lru_cache(maxsize=16)
def abstract_params(cfg: ModelConfig, compute, vision=None):
    """The boxed abstract "params" of a model (shapes, dtypes, logical axes; no memory), with
    the vision tower and projector when `vision` (a VisionConfig) is given.

    Cached per (config, compute, vision): tracing the model's init costs about a second."""
    from k2jax.model import Transformer
    from k2jax.model.transformer import init_variables

    model = Transformer(cfg, compute, vision=vision)
    return jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))["params"]


def layer_sharding(sharding: jax.sharding.Sharding, *, stacked: bool) -> jax.sharding.Sharding:
    """The sharding of one layer of a stacked leaf: the leaf's, without the leading axis."""
    if not stacked:
        return sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)[1:]
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise TypeError(f"unsupported sharding {sharding!r}: use a NamedSharding or a single device")


def plan_leaves(abstract_params, shardings=None) -> list[LeafPlan]:
    """LeafPlans for an abstract params tree (boxed or plain ShapeDtypeStructs)."""
    abstract = nn.unbox(abstract_params)
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    if shardings is None:
        device = jax.local_devices()[0]
        flat_shardings = [jax.sharding.SingleDeviceSharding(device)] * len(flat)
    else:
        flat_shardings = jax.tree.leaves(shardings)
        if len(flat_shardings) != len(flat):
            raise ValueError("shardings must have the structure of the params tree")
    plans = []
    for (path, spec), sharding in zip(flat, flat_shardings):
        keys = tuple(str(p.key) for p in path)
        layers = spec.shape[0] if keys[0] in STACKS else None
        plans.append(LeafPlan(keys, tuple(spec.shape), np.dtype(spec.dtype), sharding, layers))
    return plans


# ---------------------------------------------------------------------------------------------
# Host → devices, one slice at a time


def build_array(shape, sharding, read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """A jax.Array of `shape` with `sharding`, each addressable device's slice from read(index).

    Devices holding the same slice (replicas) share one read. The host copy of a slice is
    dropped as soon as it is on its devices, so the host holds one slice at a time.
    """
    by_index: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
        by_index.setdefault(tuple((s.start, s.stop) for s in key), []).append(device)
    arrays = []
    for bounds, devices in by_index.items():
        host = read(tuple(slice(a, b) for a, b in bounds))
        for device in devices:
            arrays.append(jax.device_put(host, device))
        jax.block_until_ready(arrays[-len(devices) :])  # host copy no longer needed
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def assemble_leaf(
    leaf: LeafPlan, pieces: Sequence[Piece], build, check: FiniteCheck | None = None
) -> jax.Array:
    """The whole leaf from build(piece) arrays: a leaf in one piece is that piece; otherwise the
    pieces are written one by one into a donated, sharded buffer (device memory: the leaf plus
    one piece). With `check`, every piece's non-finite values are counted into it."""
    if len(pieces) == 1 and pieces[0].shape == leaf.shape:
        arr = build(pieces[0])
        if check is not None:
            check.count(pieces[0], arr)
        return arr
    buf = jnp.zeros(leaf.shape, leaf.dtype, device=leaf.sharding)
    for piece in pieces:
        buf = place_piece(buf, piece, build(piece), check)
    return buf


def place_piece(buf: jax.Array, piece: Piece, arr: jax.Array, check: FiniteCheck | None = None):
    """`buf` (the piece's whole leaf, donated) with `arr` written at the piece's place; with
    `check`, the piece's non-finite values are counted in the same program."""
    leaf = piece.leaf
    spec = count_spec(leaf) if check is not None else None
    setter = _piece_setter(leaf.sharding, leaf.layers is not None, spec)
    if spec is None:
        return setter(buf, arr, piece.starts())
    buf, counts = setter(buf, arr, piece.starts())
    check.add(piece, counts)
    return buf


@functools.lru_cache(maxsize=256)
def _piece_setter(sharding, stacked: bool, spec):
    def set_piece(buf, piece, starts):
        row0 = starts[-2] if len(starts) > 1 else 0  # where a fused gate|up piece's rows start
        counts = None if spec is None else nonfinite(piece, row0, spec)
        if stacked:
            piece = piece[None]
        buf = jax.lax.dynamic_update_slice(buf, piece, starts)
        return buf if spec is None else (buf, counts)

    out = sharding if spec is None else (sharding, replicated(sharding))
    return jax.jit(set_piece, donate_argnums=0, out_shardings=out)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool | None):
    """A tqdm bar counting `total` bytes (of stored data read), closed on exit; `enabled`
    None shows it only on a terminal."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None if enabled is None else not enabled,
    )
    try:
        yield bar
    finally:
        bar.close()


_ = ml_dtypes  # bf16 / int4 numpy dtypes must be registered before arrays are allocated
