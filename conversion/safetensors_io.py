"""Reading and writing safetensors files by hand: lazy, strict, and the one reader k2jax has.

The safetensors format (https://github.com/huggingface/safetensors) is deliberately simple:

    bytes [0, 8)        N, the header length: an unsigned 64-bit little-endian integer
    bytes [8, 8 + N)    the header: a UTF-8 JSON object (padded with spaces)
                          {"__metadata__": {"format": "pt", ...},            (optional, str → str)
                           "<tensor name>": {"dtype": "BF16",
                                             "shape": [7168, 2048],
                                             "data_offsets": [begin, end]},
                           ...}
    bytes [8 + N, EOF)  the data section: each tensor's elements, row-major, little-endian,
                        at [8 + N + begin, 8 + N + end)

There is no compression and no pickling: a tensor is a byte range, so a read is offset arithmetic
plus one of two ways of fetching the bytes, both through the one header parsed and checked here:

    read(name, rows)    a read-only view of the memory-mapped file: nothing is copied until used,
                        and the OS pages in only the rows touched (a host owning rows [a, b) of a
                        [163840, 7168] embedding reads just those pages).
    ..., mmap=False     the same bytes `pread` into a new array. The checkpoint loader reads so:
                        mapped pages of a 9 GB shard stay in the resident set while the file is
                        open, so the memory a conversion needs could not be measured or bounded
                        (pages still go through the page cache, which the kernel reclaims freely).

Why our own reader, and no `safetensors` import: safe_open's numpy and flax front ends raise on
F8_E4M3 (numpy has no such dtype: Kimi-K2-Instruct's FP8 shards), and the torch one would make
torch a core dependency (STYLE.md keeps it to the tests). Using safe_open for the other dtypes only
would mean two read paths, reads through its whole-file mapping (the resident-set problem above)
and errors that name neither file nor tensor ("incomplete metadata, file not fully covered"). The
format fits in a page, so we parse it here, with ml_dtypes for BF16 and FP8, and validate all the
header claims before trusting it: a corrupted or truncated shard of a 1 TB checkpoint must fail
with the file and tensor named, not with a reshape error (or wrong weights) an hour into a load.

Why our own writer: the same dtypes (BF16, F8_E4M3) have to be written from numpy, and a converter
that exports a 600 GB checkpoint needs two things safetensors' `save_file` does not give: tensors
streamed to disk one at a time (save_file serialises the whole file in memory first) and atomic
files (written under a temporary name, fsynced, renamed), so an interrupted or failed export
(disk full, quota) leaves no half-written file that a later load would trust.

    SafetensorsFile       one .safetensors file: keys(), info(name), read(name, rows=..., mmap=...)
    CheckpointIndex       a Hugging Face checkpoint folder: model.safetensors.index.json's
                          weight_map (tensor → shard) or a single model.safetensors
    write_safetensors     one file, atomic, streamed
    write_sharded_checkpoint  shards of at most max_shard_bytes + the index, as transformers does

Pickle-based weights (`pytorch_model.bin`, `*.pt`, `*.pth`, ...) are refused, never unpickled:
loading a pickle runs arbitrary code from the checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import math
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

__all__ = [
    "DTYPES",
    "CheckpointError",
    "CheckpointIndex",
    "MissingTensorError",
    "SafetensorsError",
    "SafetensorsFile",
    "TensorInfo",
    "write_safetensors",
    "write_sharded_checkpoint",
]

# safetensors dtype name → numpy dtype. Multi-byte types are spelled little-endian ("<") because
# that is the on-disk byte order; ml_dtypes' bf16 and fp8 types are native-order only, which is
# little-endian on every platform jax supports.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAME_OF_DTYPE: dict[np.dtype, str] = {dt: name for name, dt in DTYPES.items()}

# safetensors itself refuses headers above 100 MB; a garbage length field is caught here before
# we try to allocate it. (Kimi-K2.5's largest shard header is well under 1 MB.)
MAX_HEADER_BYTES = 100_000_000
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Weights stored with Python's pickle (torch.save and friends): refused, never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_WRITE_CHUNK = 64 << 20  # bytes handed to one os.write call


class CheckpointError(ValueError):
    """A checkpoint folder, file or tensor is not what it should be; the message names it."""


class SafetensorsError(CheckpointError):
    """A .safetensors file is malformed (truncated, bad header, inconsistent offsets, ...)."""


class MissingTensorError(CheckpointError, KeyError):
    """A tensor name that the file or checkpoint does not hold."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class TensorInfo(NamedTuple):
    """What a safetensors header says about one tensor (no data is read to get it).

    `offsets` is the [begin, end) byte range inside the data section (after the header).
    """

    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


# ---------------------------------------------------------------------------------------------
# Reading


def _parse_header(path: Path, raw: bytes, data_size: int) -> tuple[dict[str, TensorInfo], dict]:
    """Validates a header against the size of the data section; returns (tensors, metadata)."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(
            f"{path}: the header is not valid UTF-8 JSON ({e}); not a safetensors file, or corrupt"
        ) from None
    if not isinstance(header, dict):
        raise SafetensorsError(
            f"{path}: the header is a JSON {type(header).__name__}, expected an object"
        )
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsError(f"{path}: __metadata__ must be an object of strings to strings")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise SafetensorsError(
                f"{where}: header entry must be an object with dtype, shape and data_offsets, "
                f"got {entry!r:.200}"
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsError(
                f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})"
            )
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise SafetensorsError(f"{where}: shape must be a list of integers >= 0, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise SafetensorsError(
                f"{where}: data_offsets must be [begin, end] integers >= 0, got {offsets!r}"
            )
        begin, end = offsets
        if begin > end:
            raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
        if end > data_size:
            raise SafetensorsError(
                f"{where}: data ends at byte {end} of the data section, but the file holds only "
                f"{data_size} data bytes: the file is truncated or the header is corrupt"
            )
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise SafetensorsError(
                f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes, but dtype "
                f"{dtype} x shape {shape} needs {expected} bytes"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape), (begin, end))

    # No two tensors may share bytes (empty tensors occupy none and may sit anywhere).
    spans = sorted((t.offsets, n) for n, t in tensors.items() if t.nbytes)
    for ((_, prev_end), prev), ((begin, _), name) in itertools.pairwise(spans):
        if begin < prev_end:
            raise SafetensorsError(
                f"{path}: tensors {prev!r} and {name!r} overlap (bytes {begin}..{prev_end} of the "
                f"data section belong to both)"
            )
    return tensors, metadata


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class SafetensorsFile:
    """One .safetensors file, read lazily.

    Opening reads and validates only the header. `read` returns a read-only numpy view of the
    memory-mapped file: no bytes are read until they are used, and the OS may drop the pages
    again under memory pressure. Arrays handed out stay valid after `close()`; the mapping is
    released when the last of them is garbage collected.

        with SafetensorsFile(path) as f:
            for name in f.keys():
                print(name, f.info(name).dtype, f.info(name).shape)
            shard = f.read("model.embed_tokens.weight", rows=slice(0, 4096))
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < 8:
                    raise SafetensorsError(
                        f"{self.path}: {size} bytes, shorter than the 8-byte header length: "
                        "truncated or not a safetensors file"
                    )
                n = int.from_bytes(fh.read(8), "little")
                if n > size - 8:
                    raise SafetensorsError(
                        f"{self.path}: header length field says {n} bytes, but only {size - 8} "
                        "bytes follow it: truncated or not a safetensors file"
                    )
                if n > MAX_HEADER_BYTES:
                    raise SafetensorsError(
                        f"{self.path}: header length {n} exceeds the safetensors limit of "
                        f"{MAX_HEADER_BYTES} bytes: not a safetensors file, or corrupt"
                    )
                raw = fh.read(n)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        self._size = size
        self._data_start = 8 + n
        self._tensors, self.metadata = _parse_header(self.path, raw, size - self._data_start)
        self._keys = sorted(self._tensors, key=lambda name: self._tensors[name].offsets)
        self._mmap: np.memmap | None = None
        self._fd: int | None = None  # for mmap=False reads; opened on first use
        self._close_fd: weakref.finalize | None = None
        self._lock = threading.Lock()
        self._closed = False

    def keys(self) -> list[str]:
        """Tensor names in the order their data is stored (sequential reads follow it)."""
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> TensorInfo:
        """The header entry of `name`: dtype (safetensors name), shape, byte offsets."""
        try:
            return self._tensors[name]
        except KeyError:
            raise MissingTensorError(f"{self.path}: no tensor named {name!r}") from None

    def read(self, name: str, rows: slice | None = None, *, mmap: bool = True) -> np.ndarray:
        """Tensor `name`, or its rows `rows` (a step-1 slice of the first axis; the other rows are
        not touched): a read-only view of the memory-mapped file, or with `mmap=False` a new
        writable array filled by `pread` (see the module docstring)."""
        info = self.info(name)
        if self._closed:
            raise ValueError(f"{self.path}: read of {name!r} after close()")
        dtype = DTYPES[info.dtype]
        shape = info.shape
        begin = self._data_start + info.offsets[0]
        if rows is not None:
            if not isinstance(rows, slice) or rows.step not in (None, 1):
                raise ValueError(f"{self.path}: tensor {name!r}: rows must be a step-1 slice")
            if not shape:
                raise ValueError(f"{self.path}: tensor {name!r} is a scalar; it has no rows")
            start, stop, _ = rows.indices(shape[0])
            stop = max(start, stop)
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            begin += start * row_bytes
            shape = (stop - start, *shape[1:])
        if not mmap:
            return self._pread(name, np.empty(shape, dtype), begin)
        if math.prod(shape) == 0:
            empty = np.empty(shape, dtype)
            empty.flags.writeable = False
            return empty
        if self._mmap is None:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r")
            if len(mm) != self._size:
                raise SafetensorsError(
                    f"{self.path}: the file changed size ({self._size} -> {len(mm)} bytes) since "
                    "its header was read"
                )
            self._mmap = mm
        # A plain ndarray over the mapping (not an np.memmap subclass); read-only like the mapping.
        return np.ndarray(shape, dtype, buffer=self._mmap, offset=begin)

    def _pread(self, name: str, out: np.ndarray, begin: int) -> np.ndarray:
        """`out` filled with the file's bytes from `begin` on, through a descriptor opened on first
        use and closed by close() or with the object (CheckpointIndex forgets, never closes)."""
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
                self._close_fd = weakref.finalize(self, os.close, self._fd)
            fd = self._fd
        view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], begin + done)
            if n <= 0:
                raise SafetensorsError(
                    f"{self.path}: the file ends inside tensor {name!r} "
                    "(truncated after its header was read?)"
                )
            done += n
        return out

    def close(self) -> None:
        """Drops this object's mapping and descriptor; arrays already returned stay valid."""
        with self._lock:
            self._mmap = None
            if self._close_fd is not None:
                self._close_fd()
            self._fd = self._close_fd = None
            self._closed = True

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self)} tensors)"


class CheckpointIndex:
    """The tensors of a Hugging Face checkpoint folder, wherever they are stored.

    A sharded checkpoint has `model.safetensors.index.json` whose `weight_map` names the shard
    file of every tensor ({"model.norm.weight": "model-00062-of-00064.safetensors", ...}); a small
    one is a single `model.safetensors`. The index is read at construction and every shard it
    names must exist; shards are opened (header only) on first use, and the index keeps at most
    `max_open_files` of them, forgetting the least recently used — a 64-shard checkpoint read
    layer by layer keeps a handful open (a forgotten file closes its descriptor when collected,
    its mapping with the last view). `validate()` checks the whole index against the shard
    headers up front. Safe to use from several threads.
    """

    def __init__(self, folder: str | os.PathLike, *, max_open_files: int = 16):
        self.folder = Path(folder)
        if max_open_files < 1:
            raise ValueError("max_open_files must be at least 1")
        self.max_open_files = max_open_files
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a directory")
        self.index_path: Path | None = self.folder / INDEX_NAME
        self._open: collections.OrderedDict[str, SafetensorsFile] = collections.OrderedDict()
        self._lock = threading.Lock()
        if self.index_path.is_file():
            self.weight_map = self._read_index(self.index_path)
        elif (self.folder / SINGLE_NAME).is_file():
            self.index_path = None
            single = SafetensorsFile(self.folder / SINGLE_NAME)
            self.weight_map = dict.fromkeys(single.keys(), SINGLE_NAME)
            self._open[SINGLE_NAME] = single
        else:
            raise CheckpointError(_no_weights_message(self.folder))

    def _read_index(self, path: Path) -> dict[str, str]:
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{path}: expected an object with a 'weight_map' of tensor name -> shard file"
            )
        if not weight_map:
            raise CheckpointError(f"{path}: the weight_map is empty")
        for shard in dict.fromkeys(weight_map.values()):
            if Path(shard).name != shard or shard in (".", ".."):
                raise CheckpointError(
                    f"{path}: shard {shard!r} is not a plain file name in the checkpoint folder"
                )
            if not (self.folder / shard).is_file():
                n = sum(1 for v in weight_map.values() if v == shard)
                raise CheckpointError(
                    f"{path} maps {n} tensors to shard {shard!r}, but {self.folder / shard} does "
                    "not exist (incomplete download?)"
                )
        return weight_map

    def names(self) -> list[str]:
        """Every tensor name, in the order of the index (or of the single file's data)."""
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def __iter__(self):
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def shards(self) -> list[str]:
        """The distinct shard file names, in order of first appearance."""
        return list(dict.fromkeys(self.weight_map.values()))

    def shard_of(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            where = self.index_path or self.folder / SINGLE_NAME
            raise MissingTensorError(f"{where}: no tensor named {name!r}") from None

    def _file(self, shard: str) -> SafetensorsFile:
        with self._lock:
            f = self._open.get(shard)
            if f is not None:
                self._open.move_to_end(shard)
                return f
            f = SafetensorsFile(self.folder / shard)
            self._open[shard] = f
            while len(self._open) > self.max_open_files:
                # Forget the least recently used file; it is not closed, since another thread
                # may still be reading through it. Its mapping goes away with the last reference.
                self._open.popitem(last=False)
            return f

    def _entry(self, name: str) -> tuple[SafetensorsFile, str]:
        shard = self.shard_of(name)
        f = self._file(shard)
        if name not in f:
            raise CheckpointError(
                f"{self.index_path} maps tensor {name!r} to shard {shard!r}, but "
                f"{f.path} does not contain it (index and shards are out of sync)"
            )
        return f, name

    def info(self, name: str) -> TensorInfo:
        f, name = self._entry(name)
        return f.info(name)

    def read(self, name: str, rows: slice | None = None, *, mmap: bool = True) -> np.ndarray:
        """Tensor `name` (or its rows `rows`) as SafetensorsFile.read gives it: a read-only,
        memory-mapped view, or with `mmap=False` a new array of its own."""
        f, name = self._entry(name)
        return f.read(name, rows=rows, mmap=mmap)

    def validate(self) -> None:
        """Opens every shard's header and checks that it holds every tensor the index gives it.

        Costs one header read per shard (under a second for Kimi's 64 shards); `read`/`info`
        perform the same check lazily for the tensors they touch.
        """
        by_shard: dict[str, list[str]] = collections.defaultdict(list)
        for name, shard in self.weight_map.items():
            by_shard[shard].append(name)
        for shard, names in by_shard.items():
            f = self._file(shard)
            missing = [n for n in names if n not in f]
            if missing:
                raise CheckpointError(
                    f"{self.index_path} maps {len(missing)} tensors to shard {shard!r} that "
                    f"{f.path} does not contain, e.g. {missing[:3]}"
                )

    @property
    def open_shards(self) -> list[str]:
        """The shard files currently held open (least recently used first)."""
        return list(self._open)

    def close(self) -> None:
        with self._lock:
            for f in self._open.values():
                f.close()
            self._open.clear()

    def __enter__(self) -> CheckpointIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointIndex({str(self.folder)!r}, {len(self)} tensors in {len(self.shards())} files)"


def _no_weights_message(folder: Path) -> str:
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES) or f.endswith(".bin.index.json")]
    shards = [f for f in files if f.endswith(".safetensors")]
    if shards:
        return (
            f"{folder}: has {len(shards)} .safetensors files ({', '.join(shards[:3])}, ...) but "
            f"neither {INDEX_NAME} nor {SINGLE_NAME}; the index says which tensor is in which shard"
        )
    if pickles:
        return (
            f"{folder}: holds only pickle-based weights ({', '.join(pickles[:5])}). k2jax reads "
            "safetensors only and never unpickles (loading a pickle runs code from the file). "
            "Convert them to safetensors in a trusted environment first, e.g. transformers' "
            "save_pretrained(..., safe_serialization=True)."
        )
    return (
        f"{folder}: no weights found (no {INDEX_NAME}, no {SINGLE_NAME}); files present: "
        f"{files[:10] or 'none'}"
    )


# ---------------------------------------------------------------------------------------------
# Writing


class _Entry(NamedTuple):
    name: str
    value: object  # numpy array, memmap view, or anything np.asarray accepts (a jax.Array)
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    nbytes: int


def _entry_of(name, value) -> _Entry:
    """Describes a tensor to write from its shape and dtype alone; the data is fetched (e.g. a
    jax.Array copied to host) only when its turn to be written comes."""
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise ValueError(f"invalid tensor name {name!r}")
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        value = np.asarray(value)
    dt = np.dtype(value.dtype)
    if dt.kind in "biuf" and dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    st = _NAME_OF_DTYPE.get(dt)
    if st is None:
        hint = " (pack INT4 codes into int32 first: formats.pack_int4)" if "int4" in str(dt) else ""
        raise TypeError(
            f"tensor {name!r}: dtype {value.dtype} has no safetensors equivalent{hint}; "
            f"supported: {', '.join(str(d) for d in _NAME_OF_DTYPE)}"
        )
    shape = tuple(int(d) for d in value.shape)
    return _Entry(name, value, st, shape, math.prod(shape) * dt.itemsize)


def _plan(tensors: Mapping[str, np.ndarray]) -> list[_Entry]:
    """The tensors in storage order.

    Ordered like safetensors' own writer — widest dtype first, then by name — so every tensor
    starts at a multiple of its item size (the header is padded to 8 bytes), which keeps
    memory-mapped views aligned.
    """
    entries = [_entry_of(name, value) for name, value in tensors.items()]
    entries.sort(key=lambda e: (-DTYPES[e.dtype].itemsize, e.name))
    return entries


def _header_bytes(plan: list[_Entry], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for e in plan:
        header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    for i in range(0, len(view), _WRITE_CHUNK):
        chunk = view[i : i + _WRITE_CHUNK]
        while len(chunk):
            n = os.write(fd, chunk)
            chunk = chunk[n:]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on every platform/filesystem; the rename itself has happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Runs write(fd) on a temporary file next to `path`, then fsyncs and renames it into place.

    On any failure the temporary file is removed; an OSError is re-raised naming `path`.
    """
    tmp = None
    fd = -1
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o644)
        write(fd)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        raise OSError(
            e.errno, f"could not write {path}: {e.strerror or e}; no partial file was left"
        ) from e
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Renames the finished folder `tmp` to `out_dir`, replacing an existing one: the old folder
    is moved aside first and deleted only once the new one is in place."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes `tensors` as one safetensors file at `path`, atomically.

    Only the header is built in memory; each tensor's bytes are then written straight from its
    array (memory-mapped inputs are streamed from disk). The file appears under its final name
    only once complete and fsynced; on error (including OSError such as ENOSPC) nothing is left
    behind and the error names `path`. Supported dtypes: see `DTYPES` (bf16 and fp8 as ml_dtypes).
    """
    path = Path(path)
    plan = _plan(tensors)
    header = _header_bytes(plan, metadata)

    def write(fd: int) -> None:
        _write_all(fd, header)
        for e in plan:
            if e.nbytes:
                # (ascontiguousarray turns 0-d into 1-d arrays; the byte count is what matters)
                data = np.ascontiguousarray(np.asarray(e.value), dtype=DTYPES[e.dtype])
                if data.nbytes != e.nbytes:
                    raise ValueError(f"tensor {e.name!r} changed size while being written")
                _write_all(fd, data.reshape(-1).view(np.uint8))

    _atomic_write(path, write)
    return path


def write_sharded_checkpoint(
    folder: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
    prefix: str = "model",
    overwrite: bool = False,
) -> dict[str, str]:
    """Writes (name, array) pairs as a Hugging Face sharded checkpoint; returns the weight_map.

    Tensors fill shards in the order given; a shard is closed when the next tensor would take it
    past `max_shard_bytes` (a larger tensor gets a shard of its own), so at most one shard's
    arrays are held in memory — pass a generator to convert a large model. Files are named as
    transformers names them: `{prefix}-00001-of-00003.safetensors` plus
    `{prefix}.safetensors.index.json` (weight_map and metadata.total_size), or a single
    `{prefix}.safetensors` without an index when everything fits in one shard.

    Every file is written atomically, and if anything fails the files this call wrote are
    removed. A folder that already holds safetensors weights is refused unless `overwrite`, in
    which case the old weight files not replaced by new ones are deleted once the new checkpoint
    is complete. `metadata` (default {"format": "pt"}, which older transformers versions require)
    is stored in every shard.
    """
    folder = Path(folder)
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    metadata = {"format": "pt"} if metadata is None else metadata
    index_name = f"{prefix}.safetensors.index.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"could not create checkpoint folder {folder}: {e.strerror}") from e
    old = sorted(
        p for p in folder.iterdir() if p.name.endswith(".safetensors") or p.name == index_name
    )
    if old and not overwrite:
        raise FileExistsError(
            f"{folder} already holds a checkpoint ({', '.join(p.name for p in old[:3])}); "
            "pass overwrite=True to replace it"
        )

    written: list[Path] = []  # every file this call created, for clean-up on failure
    shards: list[tuple[Path, list[str]]] = []
    seen: set[str] = set()
    total = 0
    pending: dict[str, object] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        tmp = folder / f".{prefix}-part{len(shards) + 1:05d}.safetensors.partial"
        written.append(tmp)
        write_safetensors(tmp, pending, metadata)
        shards.append((tmp, list(pending)))
        pending, pending_bytes = {}, 0

    try:
        for name, value in tensors:
            if name in seen:
                raise ValueError(f"tensor {name!r} given twice")
            seen.add(name)
            entry = _entry_of(name, value)  # a bad dtype fails before this tensor is written
            if pending and pending_bytes + entry.nbytes > max_shard_bytes:
                flush()
            pending[name] = entry.value
            pending_bytes += entry.nbytes
            total += entry.nbytes
        if pending:
            flush()
        if not shards:
            raise ValueError(f"no tensors to write to {folder}")

        # Every shard is complete under a temporary name; write the index the same way, then
        # rename everything into place (renames within a folder do not run out of space).
        n = len(shards)
        finals = [
            folder
            / (f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i:05d}-of-{n:05d}.safetensors")
            for i in range(1, n + 1)
        ]
        weight_map = {
            name: final.name for final, (_, names) in zip(finals, shards) for name in names
        }
        renames = [(tmp, final) for (tmp, _), final in zip(shards, finals)]
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            text = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
            tmp_index = folder / f".{index_name}.partial"
            written.append(tmp_index)
            _atomic_write(tmp_index, lambda fd: _write_all(fd, text))
            renames.append((tmp_index, folder / index_name))
        for tmp, final in renames:
            try:
                os.replace(tmp, final)
            except OSError as e:
                raise OSError(e.errno, f"could not rename {tmp} to {final}: {e.strerror}") from e
            written[written.index(tmp)] = final
    except BaseException:
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink()
        raise

    keep = {p.name for p in written}
    for p in old:
        if p.name not in keep:
            p.unlink()
    _fsync_dir(folder)
    return weight_map
