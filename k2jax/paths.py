"""Output paths that cannot destroy the inputs they are computed from.

    check_output_path(args.out, {"the run folder being exported, --run": args.run})

Every command that writes a folder replaces it whole (written under a temporary name, then
renamed over the old one, which is deleted) or writes into it. Pointed at what it reads — the run
being exported, the base checkpoint being merged into, the Hugging Face folder being converted —
or at a folder around it, that would delete the input; pointed inside an input, it would change
what the input holds (a merge copies every file of its base, a later export reads the run's
checkpoint folder). So an output that is, contains or lies inside an input is refused, whatever
an overwrite flag says. Paths are compared absolute with symlinks resolved (also when the output
does not exist yet: its existing ancestors are resolved), and existing folders also by device
and inode, so a symlink, a bind mount or a relative spelling of the same folder is caught.

Imports nothing heavy (no jax), so a command can check its paths before it loads anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from k2jax.config import ConfigError

__all__ = ["OutputPathError", "check_output_path"]


class OutputPathError(ConfigError):
    """An output path is, contains or lies inside an input; the message names both."""


def check_output_path(
    output: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None],
    *,
    flag: str = "--out",
) -> None:
    """Raises OutputPathError when `output` is, contains or lies inside any of `inputs`.

    output: the folder (or file) about to be written; it need not exist.
    inputs: role → path of everything the command reads, the role written to read well before
        the path, e.g. {"the run folder being exported, --run": "runs/x"}; None paths (an
        optional input not given) are skipped.
    flag:   how the user named the output: a CLI flag ("--out"), a config key ("train.run_dir")
        or a plain description ("the output folder"); the message starts with it.

    The message names both paths and the input's role, e.g. "--out runs/x is the run folder
    being exported, --run runs/x; writing there would destroy it: choose a folder outside it".
    """
    out = _resolve(output)
    for role, path in inputs.items():
        if path is None:
            continue
        inp = _resolve(path)
        if _within(out, inp) and _within(inp, out):
            relation, why = "is", "writing there would destroy it"
        elif _within(inp, out):
            relation, why = "contains", "replacing it would destroy that"
        elif _within(out, inp):
            relation, why = "lies inside", "writing there would change what it holds"
        else:
            continue
        links = [
            f"{given} resolves to {real}"
            for given, real in ((output, out), (path, inp))
            if str(real) != os.path.abspath(given)
        ]
        resolved = f" ({', '.join(links)})" if links else ""
        raise OutputPathError(
            f"{flag} {output} {relation} {role} {path}{resolved}; {why}: choose a folder "
            f"{'that does not contain it' if relation == 'contains' else 'outside it'}"
        )


def _resolve(path: str | os.PathLike) -> Path:
    # strict=False: a path that does not exist yet keeps its tail, its existing ancestors resolve.
    return Path(os.path.abspath(path)).resolve()


def _within(inner: Path, outer: Path) -> bool:
    """Whether `inner` is `outer` or lies inside it (both resolved)."""
    return any(_same(p, outer) for p in (inner, *inner.parents))


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:  # the same folder under two names (bind mount, case-insensitive file system)
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: different
        return False
