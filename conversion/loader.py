"""Loading a Hugging Face checkpoint folder straight onto a device mesh, in any Kimi format.

What it reads. A folder with `config.json` and safetensors weights (an index + shards, or one
file) in one of the three forms Kimi ships (K2_FACTS §2): plain bf16/fp32, FP8 blocks
(K2-Instruct: `weight` + `weight_scale_inv`) or compressed-tensors INT4 experts (K2-Thinking,
K2.5: `weight_packed` / `weight_scale` / `weight_shape`). `parse_quantization` reads which from
config.json (K2.5 nests it in `text_config` and prefixes every text tensor with
`language_model.`); the vision tower and projector of K2.5 are skipped with one log line, rotary
`inv_freq` buffers are ignored, everything else must have its place in the model and the shape
the config implies — a mismatch is an error naming the tensor, raised before any array is built.

What it builds. The "params" tree described by the model's abstract variables (one description
of every weight: shapes, dtypes and — through the rules table — shardings). Each stored tensor is
decoded on the host into what its leaf holds: FP8 is dequantised to the parameter dtype; INT4
experts go unchanged into `weight_q` (jnp.int4 codes) and `weight_scale` when the model holds
experts INT4, or are dequantised when it holds them dense (`experts="bf16"`); a dense checkpoint
loaded with INT4 experts is quantised with compressed-tensors' rule (k2jax.quant.quantize_int4).

How it places. Every leaf is created with its final sharding, in pieces of at most
`max_piece_bytes`, from per-device slices each of which reads only the HF tensors (and rows) that
intersect that device's slice (pieces.py: `LeafPlan`, `Piece`, `assemble_leaf`). Reads go
through `CheckpointIndex.read(..., mmap=False)`: `pread` into arrays we own rather than views of
the memory map, so the resident memory of a load is the slices being built and can be bounded
(safetensors_io.py). This module is the HF side only: which stored tensors feed an entry of a
leaf (`hf_names.slot_to_hf` plus the storage form), the checks, and the decoding.

Non-finite weights. By default every float piece's NaN/Inf values are counted on the devices
as it is placed and a non-zero count is a CheckpointError naming the tensors (conversion/finite.py;
`check_finite=False` loads them anyway).

`abstract_params` (pieces.py) is re-exported here: it describes what `load_params` fills.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from k2jax.config import ModelConfig, read_hf_config
from k2jax.conversion.finite import FiniteCheck
from k2jax.conversion.formats import (
    FP8,
    INT4,
    NONE,
    WeightFormat,
    dequantize_fp8_block,
    dequantize_int4,
    fp8_scale_shape,
    parse_quantization,
    unpack_int4,
)
from k2jax.conversion.hf_names import SKIPPED_PREFIXES, ParamSlot, is_ignored, slot_to_hf
from k2jax.conversion.pieces import (
    DEFAULT_PIECE_BYTES,
    LeafPlan,
    Piece,
    abstract_params,
    assemble_leaf,
    build_array,
    plan_leaves,
    progress_bar,
)
from k2jax.conversion.safetensors_io import CheckpointError, CheckpointIndex
from k2jax.conversion.vision_loader import find_vision
from k2jax.quant import quantize_int4

__all__ = [
    "CheckpointError",
    "HFCheckpoint",
    "abstract_params",
    "default_experts",
    "load_params",
    "quantize_host",
]

log = logging.getLogger(__name__)

K25_PREFIX = "language_model."
_FLOAT_DTYPES = ("F32", "BF16", "F16")
_SCALE_DTYPES = ("F32", "BF16", "F16")


def default_experts(fmt: WeightFormat, cfg: ModelConfig) -> str:
    """How experts are held by default: "int4" when the checkpoint stores them INT4, else
    "bf16" (dense)."""
    if fmt.method != INT4 or cfg.num_moe_layers == 0:
        return "bf16"
    module = f"model.layers.{cfg.first_k_dense_replace}.mlp.experts.0.down_proj"
    return "int4" if fmt.is_quantized(module) else "bf16"


# ---------------------------------------------------------------------------------------------
# The checkpoint


@dataclasses.dataclass(frozen=True)
class _Module:
    """One stored weight (or plain tensor) of the checkpoint: its name and storage form."""

    name: str  # HF name without K2.5's prefix and without the suffix, e.g. model.layers.3.mlp.gate
    method: str  # NONE (plain tensor), FP8 or INT4
    out_features: int | None = None  # rows and columns of a Linear weight
    in_features: int | None = None


class HFCheckpoint:
    """A Hugging Face checkpoint folder, checked against a model config and ready to read.

        ckpt = HFCheckpoint("ckpt/Kimi-K2-Thinking")
        ckpt.default_experts                      # "int4"
        params = ckpt.load(abstract_params, shardings)

    Construction reads config.json, the index and every shard header (not the data).
    """

    def __init__(self, folder: str | os.PathLike, cfg: ModelConfig | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a checkpoint folder")
        self.config_json = read_hf_config(self.folder)
        source = str(self.folder / "config.json")
        self.cfg = cfg or ModelConfig.from_hf_dict(self.config_json, source=source)
        self.format = parse_quantization(self.config_json, source=source)
        self.index = CheckpointIndex(self.folder)
        self.index.validate()
        self._checked_int4: set[str] = set()
        self._groups: dict[tuple[str, ...], int] = {}  # INT4 group size of the model's leaves

        names = self.index.names()
        wrapped = self.config_json.get("model_type") == "kimi_k25"
        self.prefix = K25_PREFIX if wrapped or any(n.startswith(K25_PREFIX) for n in names) else ""
        skipped = [n for n in names if n.startswith(SKIPPED_PREFIXES)]
        # the vision tower is read by conversion/vision_loader.py, when it is complete
        self.vision, self.vision_problem = find_vision(self.config_json, names, source=source)
        if skipped and self.vision is None:
            log.info(
                "%s: skipping %d vision/projector tensors (%s...): not part of the text model "
                "(no usable vision tower: %s)",
                self.folder,
                len(skipped),
                skipped[0],
                self.vision_problem,
            )
        self._stored = {n for n in names if not n.startswith(SKIPPED_PREFIXES)}

    @property
    def default_experts(self) -> str:
        return default_experts(self.format, self.cfg)

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.folder)!r}, format={self.format.method})"

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Tensor `name` (or its rows) in a new array of its own (pread; see the docstring)."""
        return self.index.read(name, rows, mmap=False)

    # -- names ----------------------------------------------------------------------------------
    def stored_name(self, name: str) -> str:
        return self.prefix + name

    def _module(self, leaf: LeafPlan, layer: int | None, expert: int | None, part: int | None):
        """The stored module feeding one entry of a leaf."""
        suffix = "weight" if leaf.linear else leaf.leaf
        slot = ParamSlot(leaf.module, suffix, layer, expert, part)
        full = slot_to_hf(slot, self.cfg)
        if not leaf.linear:
            return _Module(full, NONE)
        name = full.removesuffix(".weight")
        out_f, in_f = leaf.layer_shape[-2], leaf.layer_shape[-1]
        if leaf.leaf == "weight_scale":
            in_f = self._int4_in_features(leaf)
        if part is not None:
            out_f //= 2
        method = self.format.method if self.format.is_quantized(name) else NONE
        return _Module(name, method, out_f, in_f)

    def _int4_in_features(self, leaf: LeafPlan) -> int:
        # weight_scale's sibling weight_q has the input width; the model's group size links them.
        return leaf.layer_shape[-1] * self._model_group(leaf)

    def _model_group(self, leaf: LeafPlan) -> int:
        return self._groups[leaf.module]

    def modules_of(
        self, leaf: LeafPlan, layer: int | None
    ) -> Iterator[tuple[int | None, int | None, _Module]]:
        """(expert, part, module) for every stored module feeding one layer of a leaf."""
        experts = range(leaf.layer_shape[0]) if leaf.experts else [None]
        parts = (0, 1) if leaf.module[-1] == "gate_up_proj" else (None,)
        for e in experts:
            for p in parts:
                yield e, p, self._module(leaf, layer, e, p)

    def stored_tensors(self, mod: _Module) -> dict[str, str]:
        """suffix → stored tensor name of one module."""
        if mod.method == NONE and mod.out_features is None:  # a plain tensor, name complete
            return {"": self.stored_name(mod.name)}
        suffixes = {
            NONE: ("weight",),
            FP8: ("weight", "weight_scale_inv"),
            INT4: ("weight_packed", "weight_scale", "weight_shape"),
        }[mod.method]
        return {s: self.stored_name(f"{mod.name}.{s}") for s in suffixes}

    # -- checks ---------------------------------------------------------------------------------
    def check(self, leaves: Sequence[LeafPlan]) -> None:
        """Every tensor the leaves need exists with the right dtype and shape, and every stored
        tensor has a place. Raises CheckpointError naming the first offending tensor."""
        self._groups = {}
        for leaf in leaves:
            if leaf.leaf == "weight_scale":
                sibling = next(x for x in leaves if x.path == (*leaf.module, "weight_q"))
                self._groups[leaf.module] = sibling.layer_shape[-1] // leaf.layer_shape[-1]
        expected: set[str] = set()
        where = self.index.index_path or self.folder
        zero_points = [n for n in self._stored if n.endswith(("weight_zero_point", "weight_g_idx"))]
        if zero_points:
            raise CheckpointError(
                f"{where}: tensor {min(zero_points)!r}: asymmetric INT4 (zero points) and "
                "activation ordering (g_idx) are not supported"
            )
        for leaf in leaves:
            for layer in leaf.layer_indices():
                for _, _, mod in self.modules_of(leaf, layer):
                    tensors = self.stored_tensors(mod)
                    missing = [t for t in tensors.values() if t not in self._stored]
                    if missing:
                        raise CheckpointError(self._missing_message(where, missing[0], mod))
                    if not expected.isdisjoint(tensors.values()):
                        continue  # weight_q and weight_scale read the same module
                    expected.update(tensors.values())
                    self._check_module(leaf, mod, tensors)
        extra = sorted(
            n
            for n in self._stored - expected
            if not is_ignored(n) and not self._beyond_last_layer(n)
        )
        if extra:
            raise CheckpointError(
                f"{where}: tensor {extra[0]!r} has no place in a Kimi-K2 text model with this "
                f"config.json ({len(extra)} such tensors; is config.json the checkpoint's own?)"
            )

    def _beyond_last_layer(self, name: str) -> bool:
        """DeepSeek-V3 checkpoints carry a multi-token-prediction layer after the last one."""
        name = name.removeprefix(self.prefix)
        if not name.startswith("model.layers."):
            return False
        layer = name.split(".")[2]
        return layer.isdigit() and int(layer) >= self.cfg.num_hidden_layers

    def _missing_message(self, where, missing: str, mod: _Module) -> str:
        base = self.stored_name(mod.name)
        found = sorted(n for n in self._stored if n.startswith(base + "."))
        hint = ""
        if found:
            hint = (
                f"; found {found} instead: config.json's quantization_config "
                f"({self.format.method}) does not describe how this checkpoint stores it"
            )
        zp = [n for n in found if n.endswith("weight_zero_point")]
        if zp:
            hint = f"; found {zp[0]!r}: asymmetric INT4 (zero points) is not supported"
        return f"{where}: missing tensor {missing!r}{hint}"

    def _check_module(self, leaf: LeafPlan, mod: _Module, tensors: dict[str, str]) -> None:
        infos = {s: self.index.info(t) for s, t in tensors.items()}

        def fail(suffix, what):
            raise CheckpointError(f"{self.folder}: tensor {tensors[suffix]!r} {what}")

        def expect(suffix, shape, dtypes):
            info = infos[suffix]
            if list(info.shape) != list(shape):
                fail(suffix, f"has shape {list(info.shape)}, but config.json implies {list(shape)}")
            if info.dtype not in dtypes:
                fail(suffix, f"has dtype {info.dtype}, expected one of {list(dtypes)}")

        if mod.out_features is None:  # plain tensor: the leaf's per-entry shape
            shape = leaf.layer_shape[1:] if leaf.experts else leaf.layer_shape
            expect("", shape, _FLOAT_DTYPES)
            return
        out_f, in_f = mod.out_features, mod.in_features
        if mod.method == NONE:
            expect("weight", (out_f, in_f), _FLOAT_DTYPES)
        elif mod.method == FP8:
            expect("weight", (out_f, in_f), ("F8_E4M3",))
            expect(
                "weight_scale_inv",
                fp8_scale_shape((out_f, in_f), self.format.block_size),
                _SCALE_DTYPES,
            )
        else:
            g = self.format.group_size
            if in_f % g:
                fail(
                    "weight_packed",
                    f"holds {in_f} input features, not divisible by the INT4 group size {g}",
                )
            if leaf.leaf in ("weight_q", "weight_scale") and self._model_group(leaf) != g:
                raise CheckpointError(
                    f"{self.folder}: the checkpoint's INT4 group size is {g} but the model "
                    f"holds experts in groups of {self._model_group(leaf)} "
                    "(compute.int4_group_size); they must agree"
                )
            expect("weight_packed", (out_f, in_f // 8), ("I32",))
            expect("weight_scale", (out_f, in_f // g), _SCALE_DTYPES)
            expect("weight_shape", (2,), ("I32", "I64"))

    def _check_int4_shape(self, mod: _Module, tensors: dict[str, str]) -> None:
        if mod.name in self._checked_int4:
            return
        stored = self._read(tensors["weight_shape"])
        if [int(x) for x in stored] != [mod.out_features, mod.in_features]:
            raise CheckpointError(
                f"{self.folder}: tensor {tensors['weight_shape']!r} says "
                f"{[int(x) for x in stored]}, but config.json implies "
                f"{[mod.out_features, mod.in_features]}"
            )
        self._checked_int4.add(mod.name)

    # -- decoding -------------------------------------------------------------------------------
    def _dense_rows(self, mod: _Module, rows: slice, dtype) -> np.ndarray:
        """Rows of a Linear weight as a dense array of `dtype`, whatever its storage."""
        t = self.stored_tensors(mod)
        if mod.method == NONE:
            return self._read(t["weight"], rows).astype(dtype)
        if mod.method == FP8:
            b0 = self.format.block_size[0]
            lo = rows.start // b0 * b0  # whole scale blocks, cropped after dequantisation
            hi = min(mod.out_features, -(-rows.stop // b0) * b0)
            w = self._read(t["weight"], slice(lo, hi))
            s = self._read(t["weight_scale_inv"], slice(lo // b0, -(-hi // b0)))
            dense = dequantize_fp8_block(
                w, s, self.format.block_size, dtype, name=self.stored_name(mod.name)
            )
            return dense[rows.start - lo : rows.stop - lo]
        codes, scales = self._int4_rows(mod, rows)
        return dequantize_int4(codes, scales, dtype)

    def _int4_rows(self, mod: _Module, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        """Rows of a stored INT4 weight: (int8 codes [rows, in], scales [rows, in/g])."""
        t = self.stored_tensors(mod)
        self._check_int4_shape(mod, t)
        packed = self._read(t["weight_packed"], rows)
        codes = unpack_int4(packed, mod.in_features, name=t["weight_packed"])
        return codes, self._read(t["weight_scale"], rows)

    def _codes_rows(self, mod: _Module, rows: slice, which: str, group: int) -> np.ndarray:
        """weight_q (int8 codes) or weight_scale rows of a Linear weight, quantising a dense or
        FP8 one with compressed-tensors' rule."""
        if mod.method == INT4:
            if which == "weight_scale":
                t = self.stored_tensors(mod)
                self._check_int4_shape(mod, t)
                return self._read(t["weight_scale"], rows)
            return self._int4_rows(mod, rows)[0]
        source_dtype = np.float32 if mod.method == FP8 else None
        t = self.stored_tensors(mod)
        if source_dtype is None:  # quantise in the stored dtype, as compressed-tensors does
            w = self._read(t["weight"], rows)
        else:
            w = self._dense_rows(mod, rows, source_dtype)
        codes, scales = quantize_host(w, group)
        return codes if which == "weight_q" else scales

    def _fill(self, out: np.ndarray, leaf: LeafPlan, layer, expert, index) -> None:
        """out[...] = leaf[layer, expert][index], for one (layer, expert) entry (index over its
        own dims); written in place so a device's slice is assembled without extra copies."""
        if not leaf.linear:
            mod = self._module(leaf, layer, expert, None)
            name = self.stored_tensors(mod)[""]
            arr = self._read(name, index[0] if index else None)
            out[...] = arr[(slice(None), *index[1:])] if index else arr
            return
        rows, cols = index[-2], index[-1]
        fused = leaf.module[-1] == "gate_up_proj"
        height = leaf.layer_shape[-2] // 2 if fused else leaf.layer_shape[-2]
        for part in (0, 1) if fused else (None,):
            row0 = (part or 0) * height
            lo, hi = max(rows.start, row0), min(rows.stop, row0 + height)
            if lo >= hi:
                continue
            mod = self._module(leaf, layer, expert, part)
            local = slice(lo - row0, hi - row0)
            if leaf.leaf == "weight":
                block = self._dense_rows(mod, local, leaf.dtype)
            else:
                block = self._codes_rows(mod, local, leaf.leaf, self._model_group(leaf))
            out[lo - rows.start : hi - rows.start] = block[:, cols]

    def read_slice(self, leaf: LeafPlan, layer: int | None, index: tuple[slice, ...]) -> np.ndarray:
        """One device's slice `index` of one layer of a leaf, as a host array of the leaf dtype."""
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, leaf.layer_shape))
        out = np.empty(tuple(s.stop - s.start for s in index), leaf.dtype)
        if not leaf.experts:
            self._fill(out, leaf, layer, None, index)
            return out
        experts, rest = index[0], index[1:]
        for j, e in enumerate(range(experts.start, experts.stop)):
            self._fill(out[j], leaf, layer, e, rest)
        return out

    def source_stats(self, piece: Piece) -> tuple[int, int]:
        """(bytes, tensors) of the stored data a piece reads: bytes in proportion to its rows,
        each tensor counted in the piece that reads its first row (for progress and speed)."""
        leaf = piece.leaf
        nbytes = count = 0.0
        fused = leaf.module[-1] == "gate_up_proj"
        for _, part, mod in self.modules_of(leaf, piece.layer):
            tensors = self.stored_tensors(mod)
            if mod.method == INT4 and leaf.leaf == "weight_scale":
                tensors = {"weight_scale": tensors["weight_scale"]}
            elif mod.method == INT4 and leaf.leaf == "weight_q":
                tensors = {k: v for k, v in tensors.items() if k != "weight_scale"}
            size = sum(self.index.info(t).nbytes for t in tensors.values())
            if piece.rows is None:
                nbytes, count = nbytes + size, count + len(tensors)
                continue
            height = leaf.layer_shape[1] // 2 if fused else leaf.layer_shape[1]
            lo = (part or 0) * height
            r0, r1 = piece.rows
            nbytes += size * max(0, min(r1, lo + height) - max(r0, lo)) / height
            count += len(tensors) if r0 <= lo < r1 else 0
        return round(nbytes), int(count)

    # -- placement ------------------------------------------------------------------------------
    def build_piece(self, piece: Piece) -> jax.Array:
        """One piece as a jax.Array with the sharding of its layer (see `build_array`)."""
        return build_array(
            piece.shape,
            piece.sharding,
            lambda index: self.read_slice(piece.leaf, piece.layer, piece.layer_index(index)),
        )

    def plan(self, abstract_params, shardings=None) -> list[LeafPlan]:
        """LeafPlans for the params tree, checked against the checkpoint."""
        leaves = plan_leaves(abstract_params, shardings)
        self.check(leaves)
        return leaves

    def load(
        self,
        abstract_params,
        shardings=None,
        *,
        progress: bool | None = None,
        max_piece_bytes: int = DEFAULT_PIECE_BYTES,
        check_finite: bool = True,
    ):
        """The params tree, every leaf created with its final sharding (default: one device).

        check_finite: raise a CheckpointError naming the shards and tensors if any weight is NaN
        or Inf (counted on the devices while loading; see the module docstring)."""
        leaves = self.plan(abstract_params, shardings)
        pieces = {leaf.name: leaf.split(max_piece_bytes) for leaf in leaves}
        total = sum(self.source_stats(p)[0] for ps in pieces.values() for p in ps)
        check = self.finite_check() if check_finite else None
        with progress_bar(total, f"loading {self.folder.name}", progress) as bar:

            def build(piece):
                arr = self.build_piece(piece)
                bar.update(self.source_stats(piece)[0])
                return arr

            arrays = [assemble_leaf(leaf, pieces[leaf.name], build, check) for leaf in leaves]
        if check is not None:
            check.raise_if_any(
                self.folder,
                "repair or download again the files named, or pass check_finite=False to load "
                "them anyway",
            )
        treedef = jax.tree.structure(nn.unbox(abstract_params))
        return jax.tree.unflatten(treedef, arrays)

    def finite_check(self) -> FiniteCheck:
        """A FiniteCheck whose labels name the stored tensors (and their shard files) that a
        count came from."""
        return FiniteCheck(self._source_label)

    def _source_label(self, piece: Piece, entry: int, half: int) -> str:
        leaf = piece.leaf
        fused = leaf.module[-1] == "gate_up_proj"
        mod = self._module(
            leaf, piece.layer, entry if leaf.experts else None, half if fused else None
        )
        tensors = self.stored_tensors(mod)
        if mod.method == INT4:  # the codes are integers: only the scales can be non-finite
            names = [tensors["weight_scale"]]
        else:  # the tensor, or FP8's weight and the weight_scale_inv it is decoded with
            names = list(tensors.values())
        files = dict.fromkeys(str(self.folder / self.index.shard_of(n)) for n in names)
        return f"{' / '.join(map(repr, names))} in {', '.join(files)}"


def load_params(
    folder: str | os.PathLike,
    cfg: ModelConfig,
    abstract_params,
    *,
    shardings=None,
    progress: bool | None = None,
    max_piece_bytes: int = DEFAULT_PIECE_BYTES,
    check_finite: bool = True,
) -> dict:
    """Loads the "params" collection described by `abstract_params` (boxed or plain
    ShapeDtypeStructs, as from `jax.eval_shape(init_variables(...))["params"]`) from a Hugging
    Face checkpoint folder. `shardings`: a matching tree of NamedShardings (default: the first
    local device). `progress`: a tqdm bar (None: only on a terminal). `max_piece_bytes`: the
    most built in one go (bounds the transient memory beside the params). `check_finite`: refuse
    NaN / Inf weights (HFCheckpoint.load)."""
    with HFCheckpoint(folder, cfg) as ckpt:
        return ckpt.load(
            abstract_params,
            shardings,
            progress=progress,
            max_piece_bytes=max_piece_bytes,
            check_finite=check_finite,
        )


_quantize_int4 = jax.jit(quantize_int4, static_argnums=(1, 2))


def quantize_host(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, bf16 scales) of a dense weight by k2jax.quant.quantize_int4 (compressed-
    tensors' rule, in w's dtype), computed on the host's CPU device."""
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        q = _quantize_int4(jnp.asarray(w), group, jnp.bfloat16)
        return np.asarray(q.values).astype(np.int8), np.asarray(q.scales)
