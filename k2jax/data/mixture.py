"""Which records an epoch visits, and in which order: one or several datasets, each split into
training and validation records, mixed by weight, shuffled by (seed, epoch).

**Datasets.** `data.path` names one dataset (a file or folder) or several (a list), read with
`data.formatting/columns/tags`; or it names a LLaMA-Factory `dataset_info.json` (the file, or
the folder holding it: LLaMA-Factory's dataset_dir) and `data.dataset` picks entries from it by
name ("a,b" or a list), each with its own formatting, columns, tags and `num_samples`.

**Splits.** Record r of a dataset is a validation record when a hash of r (splitmix64, no seed)
falls in the lowest `val_size` fraction (val_size < 1), or is among the `val_size` lowest
hashes (val_size >= 1: a count). It depends on nothing but r, so a validation record is never
trained on, whatever the seed, batch size or resume. `num_samples` (dataset_info.json) keeps the
records with the lowest hashes of another salt. Rejected alternative: the first or last records
as validation; files are often sorted by source or length.

**Mixing** (`data.mix_strategy`, LLaMA-Factory's names):

* "concat" — the datasets' records are one list, shuffled as a whole; a single dataset keeps
  exactly the order k2jax always drew: `default_rng([seed, epoch]).permutation(n)`.
* "interleave_under" / "interleave_over" — dataset d takes a share p_d of each epoch
  (`data.interleave_probs`, normalised; equal by default). An epoch is L slots, L = min_d (or
  max_d) n_d / p_d: it ends when the first dataset is used up (under), or when the last one is
  (over; the others are repeated, each pass a new permutation). Dataset d fills round(p_d · L) of
  the slots, spread at random (shuffle) or evenly (shuffle=False) over the epoch.

Everything is a pure function of (seed, epoch, position), so the stream's resume state stays a
position. Memory: one int64 (and, mixing, one int16) per slot of the current epoch.

**Blocks.** A Parquet file is read a row group at a time (`readers`), so its records are
shuffled as blocks and within each block (the order of the blocks random, then the order inside
each), never one row from each of a thousand row groups in turn.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from k2jax.data.formats import RecordFormat
from k2jax.data.readers import DataError, Records

_GOLDEN = 0x9E3779B97F4A7C15


def _hash(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of x + salt·φ: uint64, uniform, fixed across numpy versions (wrapping math)."""
    z = x.astype(np.uint64) + np.uint64((salt + 1) * _GOLDEN % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@dataclasses.dataclass
class Source:
    """One dataset: its records, how they map to examples, and the record numbers of the split
    in use (None: all of them, in order)."""

    name: str
    records: Records
    format: RecordFormat
    chosen: np.ndarray | None

    def __len__(self) -> int:
        return len(self.records) if self.chosen is None else len(self.chosen)

    def record(self, local: int) -> int:
        return local if self.chosen is None else int(self.chosen[local])

    def block_ids(self) -> np.ndarray | None:
        """The shuffle block of each chosen record (Parquet), or None."""
        starts = self.records.blocks()
        if starts is None:
            return None
        rec = np.arange(len(self.records)) if self.chosen is None else self.chosen
        return np.searchsorted(starts, rec, side="right") - 1


def dataset_specs(config) -> list[tuple[str, str, RecordFormat, int | None]]:
    """(name, path, format, num_samples) of each dataset `config` (a DataConfig) names."""
    paths = (config.path,) if isinstance(config.path, str) else tuple(config.path)
    media = getattr(config, "media_dir", None)
    if config.dataset is None:
        fmt = RecordFormat(
            config.formatting, dict(config.columns), dict(config.tags), config.strict
        )

        def folder(p: str) -> str:
            return media or str(Path(p) if Path(p).is_dir() else Path(p).parent)

        return [(p, p, dataclasses.replace(fmt, media_dir=folder(p)), None) for p in paths]
    if len(paths) != 1:
        raise DataError(", ".join(paths), "no data", "data.dataset needs one data.path")
    info = Path(paths[0])
    if info.is_dir():
        info = info / "dataset_info.json"
    if not info.is_file():
        raise DataError(str(info), "no data", "not found (data.dataset needs a dataset_info.json)")
    try:
        table = json.loads(info.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(str(info), "invalid JSON", str(e)) from None
    if not isinstance(table, dict):
        raise DataError(str(info), "invalid dataset_info.json", "expected an object of datasets")
    names = config.dataset.split(",") if isinstance(config.dataset, str) else config.dataset
    out = []
    for name in (n.strip() for n in names):
        if name not in table:
            raise DataError(
                str(info),
                "no data",
                f"no dataset {name!r} (it has {', '.join(map(repr, table)) or 'none'})",
            )
        try:
            file, fmt, num = RecordFormat.from_dataset_info(
                name, table[name], str(info), strict=config.strict
            )
        except ValueError as e:
            raise DataError(str(info), "invalid dataset_info.json", str(e)) from None
        fmt = dataclasses.replace(fmt, media_dir=media or str(info.parent))
        out.append((name, str(info.parent / file), fmt, num))
    return out


def open_sources(config, split: str = "train") -> list[Source]:
    """The datasets of `config`, each restricted to `split` ("train" or "validation")."""
    sources: list[Source] = []
    try:
        for name, path, fmt, num_samples in dataset_specs(config):
            records = Records.open(path)
            sources.append(Source(name, records, fmt, None))
            chosen = _split(len(records), num_samples, config.val_size, split, name)
            sources[-1].chosen = chosen
            if split == "train" and not len(sources[-1]):
                raise DataError(
                    name, "no data", f"no training records left (val_size {config.val_size:g})"
                )
        if not sum(map(len, sources)):
            raise DataError(describe(sources), "no data", f"no {split} records (data.val_size)")
    except BaseException:
        for s in sources:
            s.records.close()
        raise
    return sources


def _split(n: int, num_samples: int | None, val_size: float, split: str, name: str):
    if not n:
        raise DataError(name, "no data", "no records")
    if num_samples is None and not val_size:
        return None if split == "train" else np.zeros(0, np.int64)
    keep = np.arange(n, dtype=np.int64)
    if num_samples is not None:
        if num_samples > n:
            raise DataError(name, "no data", f"num_samples {num_samples} > its {n} records")
        keep = np.sort(np.argsort(_hash(keep, 1), kind="stable")[:num_samples])
    h = _hash(keep, 2)
    if val_size >= 1:
        if val_size >= len(keep):
            raise DataError(name, "no data", f"val_size {val_size:g} >= its {len(keep)} records")
        val = np.zeros(len(keep), bool)
        val[np.argsort(h, kind="stable")[: int(val_size)]] = True
    else:
        val = (h >> np.uint64(11)).astype(np.float64) / 2.0**53 < val_size
    return keep[val] if split == "validation" else keep[~val]


def _permute(rng: np.random.Generator, n: int, blocks: np.ndarray | None) -> np.ndarray:
    """A random order of n items; items of one block stay together (blocks shuffled, then the
    items within each)."""
    if blocks is None:
        return rng.permutation(n)
    rank = rng.permutation(int(blocks.max(initial=-1)) + 1)
    return np.lexsort((rng.random(n), rank[blocks]))


class EpochOrder:
    """(dataset, record) of each position of an epoch (see the module docstring)."""

    def __init__(self, sources: list[Source], config, *, validation: bool = False):
        self.sources = sources
        self.sizes = np.asarray([len(s) for s in sources], np.int64)
        self.shuffle = config.shuffle and not validation
        self.seed = config.seed
        self.mix = "concat" if validation else config.mix_strategy
        self._blocks = [s.block_ids() for s in sources] if self.shuffle else None
        self._cache: tuple[int, np.ndarray | None, np.ndarray] | None = None
        if self.mix == "concat":
            self.length = int(self.sizes.sum())
            self._offsets = np.cumsum([0, *self.sizes])
            return
        probs = config.interleave_probs or (1.0,) * len(sources)
        if len(probs) != len(sources):
            raise DataError(
                "data.interleave_probs",
                "invalid mixture",
                f"{len(probs)} probabilities for {len(sources)} datasets",
            )
        p = np.asarray(probs, np.float64) / sum(probs)
        used = p > 0
        ratio = self.sizes[used] / p[used]
        self.length = int(ratio.min() if self.mix == "interleave_under" else np.ceil(ratio.max()))
        counts = np.rint(p * self.length).astype(np.int64)
        if self.mix == "interleave_under":
            counts = np.minimum(counts, self.sizes)
        else:
            counts = np.where(used, np.maximum(counts, self.sizes), 0)
        self.counts = counts
        self.length = int(counts.sum())
        if not self.length:
            raise DataError(describe(sources), "no data", "the mixture has no records")

    def at(self, epoch: int, position: int) -> tuple[int, int]:
        """(dataset index, record number) at `position` of `epoch`."""
        d_of, local = self._epoch(epoch)
        if d_of is None:
            g = int(local[position]) if local is not None else position
            d = int(np.searchsorted(self._offsets, g, side="right")) - 1
            return d, self.sources[d].record(g - int(self._offsets[d]))
        d = int(d_of[position])
        return d, self.sources[d].record(int(local[position]))

    def _epoch(self, epoch: int):
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        if self.mix == "concat":
            d_of, local = None, None
            if self.shuffle:
                blocks = self._concat_blocks()
                local = _permute(np.random.default_rng([self.seed, epoch]), self.length, blocks)
        else:
            d_of, local = self._interleave(epoch)
        self._cache = (epoch, d_of, local)
        return d_of, local

    def _concat_blocks(self) -> np.ndarray | None:
        if all(b is None for b in self._blocks):
            return None  # exactly the permutation of one dataset's records
        out, base = [], 0
        for b, n in zip(self._blocks, self.sizes):
            b = np.arange(n) if b is None else b
            out.append(b + base)
            base += int(b.max(initial=-1)) + 1
        return np.concatenate(out)

    def _interleave(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        n_sets = len(self.sources)
        slots = np.repeat(np.arange(n_sets, dtype=np.int16), self.counts)
        if self.shuffle:
            slots = slots[np.random.default_rng([self.seed, epoch, n_sets]).permutation(len(slots))]
        else:  # evenly: the k-th record of dataset d at (k + 1/2) / count_d of the epoch
            key = np.concatenate([(np.arange(c) + 0.5) / c for c in self.counts if c])
            slots = slots[np.argsort(key, kind="stable")]
        local = np.empty(len(slots), np.int64)
        for d in range(n_sets):
            local[slots == d] = self._draws(epoch, d)
        return slots, local

    def _draws(self, epoch: int, d: int) -> np.ndarray:
        """The first counts[d] records of passes over dataset d, each a new permutation."""
        n, want, passes = int(self.sizes[d]), int(self.counts[d]), []
        for k in range(-(-want // n)):
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch, d, k])
                passes.append(_permute(rng, n, self._blocks[d]))
            else:
                passes.append(np.arange(n))
        return np.concatenate(passes)[:want] if passes else np.zeros(0, np.int64)


def fingerprint(sources: list[Source]) -> str:
    """The files' fingerprint: `Records.fingerprint()` for one dataset (so resume states saved
    before mixing existed still match), a hash of all of them for several."""
    if len(sources) == 1:
        return sources[0].records.fingerprint()
    import hashlib

    parts = [s.records.fingerprint() for s in sources]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def describe(sources: list[Source]) -> str:
    return ", ".join(s.name for s in sources)


def settings_of(config) -> dict[str, Any]:
    """The mixture settings that differ from the defaults (for the resume fingerprint)."""
    out: dict[str, Any] = {}
    if config.dataset is not None:
        out["dataset"] = config.dataset
    if config.val_size:
        out["val_size"] = config.val_size
    if config.mix_strategy != "concat":
        out["mix"] = [config.mix_strategy, config.interleave_probs]
    if config.formatting != "auto":
        out["format"] = [config.formatting, dict(config.columns), dict(config.tags)]
    return out
