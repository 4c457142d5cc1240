"""Records from data files by number, without loading a file: JSON lines, JSON arrays, CSV,
Parquet and Arrow.

Every reader is an index built in one streaming pass and a `read(i)` that fetches record `i`
alone, so the epoch permutation of `k2jax.data.dataset` can visit records in any order and
resume anywhere. What the index holds per record, and how a record is fetched:

| file            | detected by                           | index per record          | read(i)                  |
|-----------------|---------------------------------------|---------------------------|--------------------------|
| JSON lines      | `.jsonl`; `.json` not starting `[`    | byte offset, line number  | seek, readline, parse    |
| JSON array      | `.json` whose first byte is `[`       | byte span, line number    | seek, read span, parse   |
| CSV             | `.csv` (header row, comma, UTF-8)     | byte offset, line number  | seek, parse one record   |
| Parquet         | `.parquet`                            | (row group sizes only)    | decode its row group     |
| Arrow           | `.arrow` (IPC file or stream format)  | (none: memory-mapped)     | one-row slice            |

**JSON arrays** are split by a small scanner over 16 MiB chunks: a regular expression finds the
strings (skipped whole, escapes included) and the six structural bytes `[]{},`; the depth count
gives each top-level element's byte span. UTF-8 continuation bytes are all >= 0x80, so scanning
bytes is exact. Elements are parsed only when read (`json.loads` of the span), so a bad element
is a bad record with its line, not a failed file; only a file whose brackets do not balance is
rejected whole. Rejected alternative: `json.JSONDecoder.raw_decode` over chunks. It parses every
element at index time (the data check parses them again) and reports offsets in characters,
which would need re-encoding to seek by.

**CSV** is read with the standard library's `csv` module (no pandas): the index pass feeds it one
line at a time and notes where each record's first line starts, so quoted fields with newlines
are one record. Every value is a string; JSON-valued columns (`messages`, `history`, `tools`)
are decoded by `k2jax.data.formats`.

**Parquet and Arrow** need pyarrow (`pip install k2jax[data]`; JSON and CSV need nothing). A
Parquet file is compressed by row group, so a row costs decoding its whole group: the reader keeps
the last few groups decoded, and the epoch order visits a Parquet file block by block (`blocks`:
runs of row groups of >= 1,024 rows, shuffled as blocks and within each block) instead of row by
row. Memory is then a few row groups, whatever the file's size; a file written as one huge row
group is decoded whole (rewrite it with `pyarrow.parquet.write_table(..., row_group_size=1000)`;
a warning names such files). An Arrow file (`datasets.Dataset.save_to_disk` writes the stream
format) is memory-mapped: the OS pages in what is read, nothing is copied.

**Folders.** A folder is read file by file, sorted by name; a `datasets.save_to_disk` folder (a
`state.json` listing its `.arrow` files) in its own order. Files of no supported type are named
in a warning, never skipped silently; compressed files (`.gz`, `.zst`, ...) are an error, since
they cannot be read by offset.
"""

from __future__ import annotations

import array
import contextlib
import csv
import hashlib
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".lz4", ".7z")
_BLOCK_ROWS = 1024  # a Parquet shuffle block: consecutive row groups of at least this many rows
_BIG_ROW_GROUP = 512 << 20  # uncompressed bytes; a larger row group is warned about


class DataError(ValueError):
    """A bad input line or example; the message starts with `file:line`.

    where: "file:line" (or "file:line (turn k)", "file:row n"); reason: a short category
    ("invalid JSON", "unknown role", "missing content", "no assistant turn", "too long", ...) used
    for the counts.
    """

    def __init__(self, where: str, reason: str, detail: str = ""):
        super().__init__(f"{where}: {reason}" + (f": {detail}" if detail else ""))
        self.where, self.reason = where, reason


def _json(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(where, "invalid JSON", f"{e.msg} at column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise DataError(where, "invalid UTF-8", str(e)) from None


# --------------------------------------------------------------------------------------------------
# JSON lines
# --------------------------------------------------------------------------------------------------


class LineIndex:
    """Byte offsets of the non-empty lines of one or more JSONL files, for random access."""

    _CHUNK = 1 << 24

    def __init__(self, files: list[Path], file_ids, offsets, line_numbers):
        self.files = files
        self.file_ids = np.asarray(file_ids, np.int32)
        self.offsets = np.asarray(offsets, np.int64)
        self.line_numbers = np.asarray(line_numbers, np.int64)
        self._handles: dict[int, Any] = {}

    @classmethod
    def build(cls, path: str | Path) -> LineIndex:
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl" and p.is_file())
            if not files:
                raise DataError(str(path), "no data", "the folder has no .jsonl files")
        elif path.is_file():
            files = [path]
        else:
            raise DataError(str(path), "no data", "not found (data.path)")
        ids, offs, nums = [], [], []
        for fid, file in enumerate(files):
            starts = cls._line_starts(file)
            ends = np.append(starts[1:], file.stat().st_size)
            # A line that is only "\n" has length 1; drop it (and the phantom line after a final
            # newline, which has length 0). Other blank lines are skipped when read.
            keep = np.flatnonzero(ends - starts > 1)
            ids.append(np.full(len(keep), fid, np.int32))
            offs.append(starts[keep])
            nums.append(keep + 1)
        return cls(files, np.concatenate(ids), np.concatenate(offs), np.concatenate(nums))

    @classmethod
    def _line_starts(cls, file: Path) -> np.ndarray:
        starts = [np.zeros(1, np.int64)]
        base = 0
        with file.open("rb") as f:
            while chunk := f.read(cls._CHUNK):
                newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
                starts.append(newlines.astype(np.int64) + base + 1)
                base += len(chunk)
        return np.concatenate(starts)

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, i: int) -> str:
        return f"{self.files[self.file_ids[i]]}:{self.line_numbers[i]}"

    def read(self, i: int) -> str:
        fid = int(self.file_ids[i])
        if fid not in self._handles:
            self._handles[fid] = self.files[fid].open("rb")
        f = self._handles[fid]
        f.seek(int(self.offsets[i]))
        raw = f.readline()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(self.where(i), "invalid UTF-8", str(e)) from None

    def fingerprint(self) -> str:
        return _fingerprint(self.files, len(self))

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


class _JsonLines:
    """One JSON-lines file; a blank line reads as None (no record)."""

    kind = "JSON lines"

    def __init__(self, file: Path):
        self._index = LineIndex.build(file)
        self.file = file

    def __len__(self) -> int:
        return len(self._index)

    def where(self, i: int) -> str:
        return self._index.where(i)

    def read(self, i: int) -> Any:
        text = self._index.read(i)
        return _json(text, self.where(i)) if text.strip() else None

    def close(self) -> None:
        self._index.close()


# --------------------------------------------------------------------------------------------------
# JSON arrays
# --------------------------------------------------------------------------------------------------

# A complete string (escapes included), one of the structural bytes, or a lone quote: the start
# of a string that continues in the next chunk.
_JSON_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]|"', re.S)


class _JsonArray:
    """One file holding a JSON array of records, split into elements by `_spans`."""

    kind = "JSON array"
    _CHUNK = 1 << 24

    def __init__(self, file: Path):
        self.file = file
        self.starts, self.ends, self.lines = self._spans(file)
        self._handle = None

    @classmethod
    def _spans(cls, file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, end, line) of every top-level element: its bytes are file[start:end]."""
        starts, ends, lines = array.array("q"), array.array("q"), array.array("q")
        buf, base = b"", 0  # buf[0] is at file offset base
        line, counted = 1, 0  # the line number at file offset `counted`
        depth, closed = 0, None  # closed: the offset after the final "]"
        first = None  # (offset, line) of the current element's first token
        elem_start = 0  # the offset after the "[" or "," before the current element

        def line_at(offset: int) -> int:
            nonlocal line, counted
            if offset > counted:
                line += buf.count(b"\n", counted - base, offset - base)
                counted = offset
            return line

        def fail(offset: int, detail: str):
            return DataError(f"{file}:{line_at(offset)}", "invalid JSON", detail)

        def add(end: int) -> None:
            if first is not None:
                start, at_line = first
            else:  # no string or bracket in it: a scalar, or nothing at all
                if elem_start >= base and not buf[elem_start - base : end - base].strip():
                    if not starts and closing:  # "[]": no element
                        return
                    raise fail(end, "an empty array element (a stray comma?)")
                start, at_line = elem_start, line_at(elem_start)
            starts.append(start)
            ends.append(end)
            lines.append(at_line)

        with file.open("rb") as f:
            while True:
                chunk = f.read(cls._CHUNK)
                eof = not chunk
                buf += chunk
                keep = len(buf)  # the bytes of buf that are scanned
                for m in _JSON_TOKENS.finditer(buf):
                    tok, at = m.group(), base + m.start()
                    if closed is not None:
                        raise fail(at, "data after the end of the top-level array")
                    if tok == b'"' and not eof:  # a string running past the chunk: read on
                        keep = m.start()
                        break
                    if tok == b'"':
                        raise fail(at, "a string that never ends")
                    if depth == 0:
                        if tok != b"[" or buf[: m.start()].strip():
                            raise fail(at, "expected a JSON array of records or JSON lines")
                        depth, elem_start = 1, at + 1
                        continue
                    if depth == 1 and first is None and tok not in (b",", b"]"):
                        first = (at, line_at(at))
                    closing = depth == 1 and tok == b"]"
                    if tok in (b"[", b"{"):
                        depth += 1
                    elif tok in (b"]", b"}"):
                        depth -= 1
                        if closing:
                            add(at)
                            closed = at + 1
                    elif depth == 1:  # the comma after an element
                        add(at)
                        first, elem_start = None, at + 1
                if closed is not None:
                    tail = buf[max(closed - base, 0) :]
                    if tail.strip():
                        raise fail(base + len(buf) - len(tail.lstrip()), "data after the array")
                line_at(base + keep)
                buf, base = buf[keep:], base + keep
                if eof:
                    break
        if closed is None:
            raise fail(base + len(buf), "the top-level array never ends" if depth else "no array")
        return (
            np.frombuffer(starts, np.int64),
            np.frombuffer(ends, np.int64),
            np.frombuffer(lines, np.int64),
        )

    def __len__(self) -> int:
        return len(self.starts)

    def where(self, i: int) -> str:
        return f"{self.file}:{self.lines[i]}"

    def read(self, i: int) -> Any:
        if self._handle is None:
            self._handle = self.file.open("rb")
        self._handle.seek(int(self.starts[i]))
        raw = self._handle.read(int(self.ends[i] - self.starts[i]))
        if not raw.strip():
            raise DataError(self.where(i), "invalid JSON", "an empty array element")
        return _json(raw, self.where(i))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


# --------------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _csv_fields_unlimited():
    """The csv module refuses fields over 128 KiB by default (a module-wide setting): lift it
    while reading, so long documents are read, and put it back."""
    old = csv.field_size_limit(sys.maxsize)
    try:
        yield
    finally:
        csv.field_size_limit(old)


class _Csv:
    """One CSV file with a header row; each record a dict of column -> string."""

    kind = "CSV"

    def __init__(self, file: Path):
        self.file = file
        offsets, lines = array.array("q"), array.array("q")
        self.header: list[str] = []
        with file.open("rb") as f, _csv_fields_unlimited():
            for offset, line, row in self._records(f, 0, 1):
                if not self.header:
                    self.header = [c.lstrip("\ufeff") if not k else c for k, c in enumerate(row)]
                    continue
                offsets.append(offset)
                lines.append(line)
        if not self.header:
            raise DataError(str(file), "no data", "an empty CSV file (no header row)")
        self.offsets = np.frombuffer(offsets, np.int64)
        self.lines = np.frombuffer(lines, np.int64)
        self._handle = None

    @staticmethod
    def _records(f, offset: int, line: int):
        """(offset, line number, fields) of each non-blank record from the current position."""
        seen: list[tuple[int, int]] = []  # (offset, line) of the lines read for this record

        def lines():
            nonlocal offset, line
            for raw in f:
                seen.append((offset, line))
                offset, line = offset + len(raw), line + 1
                yield raw.decode("utf-8", "surrogateescape")

        for row in csv.reader(lines()):
            start, seen[:] = seen[0], []
            if row:  # a blank line is no record
                yield start[0], start[1], row

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, i: int) -> str:
        return f"{self.file}:{self.lines[i]}"

    def read(self, i: int) -> dict[str, str]:
        if self._handle is None:
            self._handle = self.file.open("rb")
        self._handle.seek(int(self.offsets[i]))
        with _csv_fields_unlimited():
            _, _, row = next(self._records(self._handle, int(self.offsets[i]), int(self.lines[i])))
        if len(row) != len(self.header):
            raise DataError(
                self.where(i),
                "invalid CSV",
                f"{len(row)} fields, the header has {len(self.header)}",
            )
        try:
            return {
                k: v.encode("utf-8", "surrogateescape").decode("utf-8")
                for k, v in zip(self.header, row)
            }
        except UnicodeDecodeError as e:
            raise DataError(self.where(i), "invalid UTF-8", str(e)) from None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


# --------------------------------------------------------------------------------------------------
# Parquet and Arrow (pyarrow)
# --------------------------------------------------------------------------------------------------


def _pyarrow(file: Path):
    try:
        import pyarrow as pa
        import pyarrow.parquet  # makes pa.parquet
    except ImportError:
        raise DataError(
            str(file),
            "unsupported file",
            "reading Parquet and Arrow needs pyarrow: pip install 'k2jax[data]' (or pyarrow)",
        ) from None
    return pa


class _Parquet:
    """One Parquet file, decoded a row group at a time (the last few kept)."""

    kind = "Parquet"

    def __init__(self, file: Path):
        self.file = file
        self._pa = _pyarrow(file)
        try:
            self._pf = self._pa.parquet.ParquetFile(file)
        except self._pa.ArrowException as e:
            raise DataError(str(file), "invalid Parquet", str(e)) from None
        md = self._pf.metadata
        sizes = [md.row_group(k).num_rows for k in range(md.num_row_groups)]
        self.group_starts = np.cumsum([0, *sizes], dtype=np.int64)
        big = max((md.row_group(k).total_byte_size for k in range(md.num_row_groups)), default=0)
        if big > _BIG_ROW_GROUP:
            log.warning(
                "%s: a row group of %.1f GiB is decoded whole to read one row of it; rewrite the "
                "file with smaller row groups (pyarrow.parquet.write_table(..., "
                "row_group_size=1000))",
                file,
                big / 2**30,
            )
        # Blocks of whole row groups with >= _BLOCK_ROWS rows each (the shuffle unit).
        block_starts, rows = [0], 0
        for k, n in enumerate(sizes[:-1]):
            rows += n
            if rows >= _BLOCK_ROWS:
                block_starts.append(int(self.group_starts[k + 1]))
                rows = 0
        self.block_starts = np.asarray(block_starts, np.int64)
        per_block = np.diff(np.searchsorted(self.group_starts, [*block_starts, len(self)]))
        self._keep = int(per_block.max(initial=1)) + 1  # decoded row groups kept
        self._cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.group_starts[-1])

    def where(self, i: int) -> str:
        return f"{self.file}:row {i}"

    def read(self, i: int) -> dict[str, Any]:
        k = int(np.searchsorted(self.group_starts, i, side="right")) - 1
        table = self._cache.pop(k, None)
        if table is None:
            try:
                table = self._pf.read_row_group(k)
            except self._pa.ArrowException as e:
                raise DataError(self.where(i), "invalid Parquet", str(e)) from None
            if len(self._cache) >= self._keep:
                self._cache.pop(next(iter(self._cache)))
        self._cache[k] = table  # most recently used last
        return table.slice(i - int(self.group_starts[k]), 1).to_pylist()[0]

    def close(self) -> None:
        self._cache.clear()
        self._pf.close()


class _Arrow:
    """One Arrow IPC file (file or stream format), memory-mapped."""

    kind = "Arrow"

    def __init__(self, file: Path):
        self.file = file
        pa = _pyarrow(file)
        self._source = pa.memory_map(str(file))
        try:
            try:
                self._table = pa.ipc.open_file(self._source).read_all()
            except pa.ArrowInvalid:  # not the file format: the stream format datasets writes
                self._source.seek(0)
                self._table = pa.ipc.open_stream(self._source).read_all()
        except pa.ArrowException as e:
            self._source.close()
            raise DataError(str(file), "invalid Arrow", str(e)) from None

    def __len__(self) -> int:
        return self._table.num_rows

    def where(self, i: int) -> str:
        return f"{self.file}:row {i}"

    def read(self, i: int) -> dict[str, Any]:
        return self._table.slice(i, 1).to_pylist()[0]

    def close(self) -> None:
        pass  # the table keeps the map alive; both go with the reader


# --------------------------------------------------------------------------------------------------
# A file, a folder, several
# --------------------------------------------------------------------------------------------------


def open_file(file: Path):
    """The reader for one file, by its suffix (and, for .json, its first byte)."""
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return _JsonLines(file)
    if suffix == ".json":
        with file.open("rb") as f:
            head = f.read(4096).lstrip()
            while not head and (more := f.read(4096)):
                head = more.lstrip()
        return _JsonArray(file) if head.startswith(b"[") else _JsonLines(file)
    if suffix == ".csv":
        return _Csv(file)
    if suffix == ".parquet":
        return _Parquet(file)
    if suffix == ".arrow":
        return _Arrow(file)
    raise DataError(
        str(file),
        "unsupported file",
        f"expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        + (
            " (compressed files cannot be read by offset: decompress it)"
            if _compressed(file)
            else ""
        ),
    )


def _compressed(file: Path) -> bool:
    return any(s.lower() in _COMPRESSED for s in file.suffixes)


def data_files(path: str | Path) -> list[Path]:
    """The files `path` names: itself, or a folder's supported files (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(str(path), "no data", "not found (data.path)")
    listed = _saved_dataset_files(path)
    if listed is not None:
        return listed
    if (path / "dataset_info.json").is_file():
        raise DataError(
            str(path),
            "no data",
            "the folder has a dataset_info.json: name its datasets with data.dataset (or point "
            "data.path at the data files)",
        )
    entries = sorted(path.iterdir())
    files = [p for p in entries if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES]
    compressed = [p.name for p in entries if p.is_file() and _compressed(p)]
    if compressed:
        raise DataError(
            str(path),
            "unsupported file",
            f"compressed files cannot be read by offset: {', '.join(compressed)} (decompress "
            "them, or move them out of the folder)",
        )
    other = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in files]
    if other:
        log.warning(
            "%s: not read (not %s): %s", path, "/".join(SUPPORTED_SUFFIXES), ", ".join(other)
        )
    if not files:
        raise DataError(
            str(path), "no data", f"the folder has no {'/'.join(SUPPORTED_SUFFIXES)} files"
        )
    return files


def _saved_dataset_files(folder: Path) -> list[Path] | None:
    """The .arrow files of a `datasets.Dataset.save_to_disk` folder (its state.json lists them,
    in order), or None for any other folder."""
    state = folder / "state.json"
    try:
        listed = json.loads(state.read_text(encoding="utf-8"))["_data_files"]
        return [folder / d["filename"] for d in listed]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fingerprint(files: list[Path], n: int) -> str:
    sizes = [(p.name, p.stat().st_size) for p in files]
    return hashlib.sha256(json.dumps([sizes, n]).encode()).hexdigest()[:16]


class Records:
    """The records of one or more files, numbered 0..len-1 across them in order.

    read(i): the parsed record (a dict for every supported form; None for a blank JSON line), or
    a DataError naming `where(i)`. blocks(): the first record of each shuffle block, or None when
    every record may be visited alone (no Parquet file).
    """

    def __init__(self, files: list[Path]):
        self.files = files
        self._readers: list[Any] = []
        try:
            for f in files:
                self._readers.append(open_file(f))
        except BaseException:
            self.close()
            raise
        self._starts = np.cumsum([0, *map(len, self._readers)], dtype=np.int64)

    @classmethod
    def open(cls, path: str | Path) -> Records:
        return cls(data_files(path))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _at(self, i: int) -> tuple[Any, int]:
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._readers[k], i - int(self._starts[k])

    def where(self, i: int) -> str:
        reader, j = self._at(i)
        return reader.where(j)

    def read(self, i: int) -> Any:
        reader, j = self._at(i)
        return reader.read(j)

    def kinds(self) -> list[str]:
        return [r.kind for r in self._readers]

    def blocks(self) -> np.ndarray | None:
        if not any(isinstance(r, _Parquet) for r in self._readers):
            return None
        out = []
        for r, start in zip(self._readers, self._starts):
            starts = r.block_starts if isinstance(r, _Parquet) else np.arange(len(r))
            out.append(starts[starts < len(r)] + start)
        return np.concatenate(out)

    def fingerprint(self) -> str:
        """Names and sizes of the files and the record count: the same value `LineIndex` gives
        for JSONL files, so resume states saved before other forms existed still match."""
        return _fingerprint(self.files, len(self))

    def close(self) -> None:
        for r in self._readers:
            r.close()
