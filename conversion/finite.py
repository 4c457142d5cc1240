"""Non-finite weights: NaN / Inf counted on the devices while a checkpoint is loaded.

A NaN or Inf in a checkpoint (a bad FP8 code, a damaged scale, a corrupt download) loads like any
value and only shows as garbage output. So the loaders (conversion/loader.py for Hugging Face
folders, orbax_io.py for converted ones) count every float piece's non-finite values where the
piece lives — per expert, and per gate/up half of a fused leaf — in the same jitted program that
writes the piece into its leaf (`pieces.place_piece`; a whole-leaf piece gets `nonfinite_counts`
of its own): a reduction on the devices instead of a second pass over a terabyte on the host. The
small count arrays are fetched once at the end (`FiniteCheck.raise_if_any`), and a non-zero count
is a CheckpointError naming the files and tensors. INT4 codes are integers; only their scales are
checked, and FP8 values are checked after decoding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.conversion.safetensors_io import CheckpointError

if TYPE_CHECKING:
    from k2jax.conversion.pieces import LeafPlan, Piece

__all__ = ["FiniteCheck", "count_spec", "nonfinite", "nonfinite_counts", "replicated"]


class FiniteCheck:
    """Collects the non-finite counts of the float pieces of a load (small device arrays, see
    `nonfinite_counts`) and fetches them all at once in `raise_if_any`.

    label(piece, entry, half) names where a count comes from, e.g. "'<tensor>' in <shard file>":
    entry indexes the piece's experts (0 for a leaf without them), half the gate/up halves of a
    fused leaf (0 otherwise). Counts with the same label are added up.
    """

    def __init__(self, label: Callable[[Piece, int, int], str]):
        self.label = label
        self._counts: list[tuple[Piece, jax.Array]] = []

    def add(self, piece: Piece, counts: jax.Array | None) -> None:
        if counts is not None:
            self._counts.append((piece, counts))

    def count(self, piece: Piece, arr: jax.Array) -> None:
        """Counts the non-finite values of `arr`, the built or restored piece."""
        self.add(piece, nonfinite_counts(piece, arr))

    def raise_if_any(self, where, advice: str, shown: int = 5) -> None:
        """Raises CheckpointError if any counted piece held a NaN or Inf: `where` (the folder)
        first, then the first `shown` labels with their counts, "and N more", then `advice`."""
        pieces, arrays = zip(*self._counts) if self._counts else ((), ())
        self._counts = []
        found: dict[str, int] = {}
        for piece, counts in zip(pieces, jax.device_get(list(arrays))):
            for entry, half in zip(*np.nonzero(counts)):
                key = self.label(piece, int(entry), int(half))
                found[key] = found.get(key, 0) + int(counts[entry, half])
        if not found:
            return
        listed = "; ".join(
            f"{k}: {n} non-finite value{'s' if n > 1 else ''}"
            for k, n in list(found.items())[:shown]
        )
        more = f"; and {len(found) - shown} more" if len(found) > shown else ""
        raise CheckpointError(
            f"{where}: NaN or Inf in the weights of {len(found)} tensor"
            f"{'s' if len(found) > 1 else ''} ({listed}{more}). A model loaded with them computes "
            f"NaN and its output is garbage; {advice}"
        )


def nonfinite_counts(piece: Piece, arr: jax.Array) -> jax.Array | None:
    """The non-finite values of `arr` (the built piece) as a small int32 array [E or 1, 2 or 1]
    — per expert, and per gate/up half of a fused leaf — computed on the piece's devices and
    replicated over them; None for integer codes, which cannot be non-finite."""
    spec = count_spec(piece.leaf)
    if spec is None:
        return None
    return _counter(piece.sharding, spec)(arr, piece.rows[0] if piece.rows else 0)


def count_spec(leaf: LeafPlan) -> tuple[bool, int | None] | None:
    """(counted per expert, half height of a fused gate|up layer) of a float leaf, else None."""
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        return None
    fused = leaf.module[-1] == "gate_up_proj"
    return leaf.experts, leaf.layer_shape[-2] // 2 if fused else None


def nonfinite(x, row0, spec):
    """[E or 1, 1 or 2] non-finite counts of a piece whose rows start at row `row0` of its layer
    (see nonfinite_counts)."""
    experts, height = spec
    bad = ~jnp.isfinite(x)
    if not experts:
        bad = bad[None]
    axes = tuple(range(1, bad.ndim))
    if height is None:
        return jnp.sum(bad, axes, dtype=jnp.int32)[:, None]
    up = row0 + jax.lax.broadcasted_iota(jnp.int32, bad.shape, bad.ndim - 2) >= height
    halves = [jnp.sum(bad & ~up, axes, dtype=jnp.int32), jnp.sum(bad & up, axes, dtype=jnp.int32)]
    return jnp.stack(halves, -1)


@functools.lru_cache(maxsize=256)
def _counter(sharding, spec):
    return jax.jit(lambda x, row0: nonfinite(x, row0, spec), out_shardings=replicated(sharding))


def replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    # Replicated counts can be fetched by every process of a multi-host run.
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding
