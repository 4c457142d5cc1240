"""Converted checkpoints: a Kimi model's parameters pre-decoded into sharded Orbax pieces.

    k2jax convert --hf-dir ckpt/Kimi-K2-Thinking --out ckpt/k2t --mesh expert=8
    model = k2jax.load_model("ckpt/k2t", mesh=make_mesh(data=2, expert=4))   # any mesh

Converting decodes the Hugging Face checkpoint once (FP8 dequantised, INT4 experts unpacked into
jnp.int4 codes + scales, names mapped, shapes checked) and stores the result with Orbax, so later
loads only read and place arrays. The folder:

    O/config.json, tokenizer files, ...   copied from the HF folder (O is a model folder: the
                                          trainer, `k2jax chat` and load_model take it as is)
    O/k2jax_checkpoint.json               what O holds: format version, experts format and
                                          dtype, source and its quantization, every leaf's
                                          shape and dtype, and which pieces each item holds
    O/params/item_00000/ ...              Orbax PyTree checkpoints (OCDBT), the pieces

Pieces and items. A piece (conversion/pieces.py `Piece`) is one layer of a stacked leaf
(`moe_layers/mlp/experts/down_proj/weight_q` of layer 7: [E, D, F]), a range of rows of one layer
of an expert leaf when the layer alone exceeds `max_item_bytes`, or a whole unstacked leaf
(`embed_tokens/weight`). An item is a standard Orbax checkpoint of consecutive pieces (in layer
order) holding at most `max_item_bytes` (only an unstacked leaf, e.g. the 2.3 GB embedding, can
be larger), as a nested dict that mirrors the params tree with `layer_007` (or
`layer_007_rows_0_2048`) keys under stacked leaves. Each piece is saved sharded over the
conversion mesh and carries no device layout into the file: restoring gives each item a target
tree of `ShapeDtypeStruct(shape, dtype, sharding=...)` for whatever mesh the loading run uses,
and Orbax reads for each device only its slice (tested: written on expert=2 × tensor=4, restored
onto 1 device, expert=8 and 2×2×2). A restored piece is written into its leaf by a donated
in-place update, as the HF loader does.

Why pieces rather than one Orbax tree of whole leaves: Orbax writes an array from a complete
`jax.Array` — there is no supported way to write a 60-layer stack a piece at a time (0.12's
"partial save" adds whole leaves, and is experimental v1 API) — so saving whole leaves would put
the entire model in memory at once: for K2-Thinking's expert stack alone 60 × 384 × 4096 × 7168
codes. Pieces bound conversion memory to two items, one being written while the next is read
(default 1 GiB each, against ~9.6 GB per safetensors shard of the released checkpoints), whatever
the model size. Grouping pieces into items keeps a small model fast (the tiny model is one item)
and the real one at some 600 items, not tens of thousands of checkpoints.

Resumable and atomic. The work happens in `O.partial` next to O, with a manifest of the plan
(source files and sizes, options, items) and of the items already written; Orbax writes each
item under a temporary name and renames it when complete. A rerun with the same source and
options skips finished items; O appears (one rename) only when every item, the metadata and the
copied files are in place. A failure — out of space, permission, interruption — leaves O absent
and O.partial resumable, and the error says so. O.partial is itself created whole: built as
`.O.partial.<random>.new` holding a marker file and the manifest, then renamed, so a process
killed at any moment leaves either no work folder (a rerun removes the temporary one) or one
marked as ours; a marked one whose manifest cannot be read is cleared and started over, while a
folder named O.partial without the marker is the user's and is refused, never deleted. O, and
O.partial, must lie outside the Hugging Face folder (k2jax.paths).

Non-finite weights. Each item's pieces have their NaN / Inf counted on the devices as they are
built (conversion/finite.py `FiniteCheck`) and the item is not written if any is found: the
error names the shards and tensors. Restoring counts them again, per item folder and leaf.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax

from k2jax.config import ConfigError
from k2jax.conversion.finite import FiniteCheck
from k2jax.conversion.hf_names import STACKS
from k2jax.conversion.loader import HFCheckpoint
from k2jax.conversion.pieces import (
    LeafPlan,
    Piece,
    abstract_params,
    place_piece,
    plan_leaves,
    progress_bar,
)
from k2jax.conversion.safetensors_io import INDEX_NAME, PICKLE_SUFFIXES, CheckpointError
from k2jax.paths import check_output_path

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_NAME",
    "convert_checkpoint",
    "is_converted",
    "read_metadata",
    "restore_params",
]

log = logging.getLogger(__name__)

FORMAT = "k2jax-params"
FORMAT_VERSION = 1
METADATA_NAME = "k2jax_checkpoint.json"
MANIFEST_NAME = "convert_manifest.json"
WORK_MARKER = ".k2jax-convert-work"  # in O.partial: the folder is ours to resume or clear
_WORK_TMP = ".new"  # suffix of a work folder being created (.O.partial.<random>.new)
PARAMS_DIR = "params"
DEFAULT_ITEM_BYTES = 1 << 30
_SIDE_FILE_LIMIT = 64 << 20  # config, tokenizer, chat template, remote code: small files only


def is_converted(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `convert_checkpoint`."""
    return (Path(path) / METADATA_NAME).is_file()


def read_metadata(folder: str | os.PathLike) -> dict:
    """The metadata of a converted folder, checked for format and version."""
    file = Path(folder) / METADATA_NAME
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found (not a converted k2jax checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a {FORMAT} metadata file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format version {meta.get('format_version')!r}; this k2jax reads version "
            f"{FORMAT_VERSION} (convert the Hugging Face checkpoint again)"
        )
    return meta


# ---------------------------------------------------------------------------------------------
# Plan


def _group_items(leaves: list[LeafPlan], max_item_bytes: int) -> list[list[Piece]]:
    """Pieces in layer order (unstacked leaves first), cut into items of ≤ max_item_bytes."""
    split = {leaf.name: leaf.split(max_item_bytes) for leaf in leaves}
    pieces = [p for leaf in leaves if leaf.layers is None for p in split[leaf.name]]
    depth = max((leaf.layers or 0) for leaf in leaves)
    for stack in STACKS:
        for layer in range(depth):
            for leaf in leaves:
                if leaf.path[0] == stack:
                    pieces += [p for p in split[leaf.name] if p.layer == layer]
    items: list[list[Piece]] = []
    size = 0
    for piece in pieces:
        if not items or (size and size + piece.nbytes > max_item_bytes):
            items.append([])
            size = 0
        items[-1].append(piece)
        size += piece.nbytes
    return items


def _encode(piece: Piece) -> list:
    rows = piece.rows or (None, None)
    return [piece.leaf.name, piece.layer, *rows]


def _decode(entry, by_name: dict[str, LeafPlan]) -> Piece:
    name, layer, r0, r1 = entry
    return Piece(by_name[name], layer, None if r0 is None else (r0, r1))


def _source_fingerprint(ckpt: HFCheckpoint) -> dict:
    files = {shard: (ckpt.folder / shard).stat().st_size for shard in ckpt.index.shards()}
    config = (ckpt.folder / "config.json").read_bytes()
    return {
        "path": str(ckpt.folder.resolve()),
        "config_sha256": hashlib.sha256(config).hexdigest(),
        "files": files,
        "bytes": sum(files.values()),
        "quantization": ckpt.format.method,
    }


def _tree_target(pieces: list[Piece], make):
    """A nested dict mirroring the params tree, make(piece) at each piece's place."""
    tree: dict = {}
    for piece in pieces:
        node = tree
        for k in piece.leaf.path[:-1]:
            node = node.setdefault(k, {})
        if piece.key is None:
            node[piece.leaf.leaf] = make(piece)
        else:
            node.setdefault(piece.leaf.leaf, {})[piece.key] = make(piece)
    return tree


def _tree_get(tree, piece: Piece):
    node = tree
    for k in piece.leaf.path:
        node = node[k]
    return node if piece.key is None else node[piece.key]


# ---------------------------------------------------------------------------------------------
# Convert


def convert_checkpoint(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    experts: str | None = None,
    dtype: str = "bfloat16",
    mesh: jax.sharding.Mesh | None = None,
    max_item_bytes: int = DEFAULT_ITEM_BYTES,
    progress: bool | None = None,
    after_item: Callable[[int], None] | None = None,
    check_finite: bool = True,
) -> Path:
    """Converts a Hugging Face Kimi checkpoint folder into a k2jax Orbax folder `out`.

    experts: "int4" or "bf16" (default: as stored — INT4 for K2-Thinking / K2.5)
    dtype:   dtype of every other parameter ("bfloat16" or "float32")
    mesh:    devices to spread each piece over while writing (default: the first device)
    max_item_bytes: bytes of pieces per Orbax item (bounds memory; see the module docstring)
    after_item: called with each item's index once it is safely written (progress hooks, tests)
    check_finite: refuse to write an item holding NaN or Inf weights (CheckpointError naming
        the shards and tensors); False converts them as they are

    Resumes from `out`.partial when a previous run with the same source and options stopped.
    `out` and its work folder must lie outside `hf_dir`. Returns `out`.
    """
    import orbax.checkpoint as ocp

    from k2jax.model import ComputeConfig
    from k2jax.sharding import check_mesh_fits, param_shardings

    hf_dir, out = Path(hf_dir), Path(out)
    work = out.with_name(out.name + ".partial")
    source = {"the Hugging Face checkpoint being converted,": hf_dir}
    check_output_path(out, source, flag="the output folder")
    check_output_path(work, source, flag="the conversion's work folder")
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out or remove it first")
    if max_item_bytes < 1:
        raise ValueError(f"max_item_bytes must be positive, got {max_item_bytes}")
    with HFCheckpoint(hf_dir) as ckpt:
        experts = experts or ckpt.default_experts
        compute = ComputeConfig(dtype=dtype, param_dtype=dtype, experts=experts)
        abstract = abstract_params(ckpt.cfg, compute)
        shardings = None
        if mesh is not None:
            check_mesh_fits(mesh, ckpt.cfg)
            shardings = param_shardings(abstract, mesh)
        leaves = ckpt.plan(abstract, shardings)
        items = _group_items(leaves, max_item_bytes)
        plan = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "experts": experts,
            "dtype": dtype,
            "int4_group_size": compute.int4_group_size,
            "source": _source_fingerprint(ckpt),
            "leaves": {
                leaf.name: {
                    "shape": list(leaf.shape),
                    "dtype": str(leaf.dtype),
                    "layers": leaf.layers,
                }
                for leaf in leaves
            },
            "items": [
                {"dir": f"{PARAMS_DIR}/item_{i:05d}", "pieces": [_encode(p) for p in pieces]}
                for i, pieces in enumerate(items)
            ],
        }
        done = _open_work(work, plan)
        stats = {i: [ckpt.source_stats(p) for p in pieces] for i, pieces in enumerate(items)}
        total = sum(b for s in stats.values() for b, _ in s)
        n_tensors = sum(t for s in stats.values() for _, t in s)
        read = {"tensors": 0}
        check = ckpt.finite_check() if check_finite else None

        def build(piece):
            arr = ckpt.build_piece(piece)
            if check is not None:
                check.count(piece, arr)
            b, t = ckpt.source_stats(piece)
            bar.update(b)
            read["tensors"] += t
            bar.set_postfix_str(f"{read['tensors']}/{n_tensors} tensors", refresh=False)
            return arr

        pending: tuple[int, Path] | None = None  # the item Orbax is still writing
        with (
            progress_bar(total, f"converting {hf_dir.name}", progress) as bar,
            ocp.StandardCheckpointer() as checkpointer,
        ):
            for i in done:
                bar.update(sum(b for b, _ in stats[i]))
                read["tensors"] += sum(t for _, t in stats[i])

            def finish_pending():
                nonlocal pending
                if pending is not None:
                    with _output_errors(out, work):
                        checkpointer.wait_until_finished()
                    done.add(pending[0])
                    _write_manifest(work, plan, done)
                    if after_item is not None:
                        after_item(pending[0])
                    pending = None

            for i, pieces in enumerate(items):
                if i in done:
                    continue
                arrays = _tree_target(pieces, build)
                finish_pending()  # item i-1 is written while item i was read
                if check is not None:  # one fetch of small counts per item, before writing it
                    check.raise_if_any(
                        hf_dir,
                        f"{out} was not written (the items before are kept in {work}); repair "
                        "or download again the files named, or convert with check_finite=False "
                        "to keep the values as they are",
                    )
                path = work / plan["items"][i]["dir"]
                with _output_errors(out, work):
                    _remove(path)
                    checkpointer.save(path, arrays)
                pending = (i, path)
                del arrays
            finish_pending()
            with _output_errors(out, work):
                _finalize(work, out, hf_dir, plan)
    log.info("converted %s -> %s (%d items)", hf_dir, out, len(items))
    return out


def _open_work(work: Path, plan: dict) -> set[int]:
    """Creates the work folder, or resumes it; returns the items already written.

    Ours is a folder with WORK_MARKER (or, written before the marker existed, a manifest of a
    k2jax plan): it is resumed, or cleared and started over when its manifest cannot be read (a
    process killed while it was created or finished). A folder without either is not ours and
    is refused. Leftovers of a creation that was killed are removed.
    """
    for tmp in work.parent.glob(f".{glob.escape(work.name)}.*{_WORK_TMP}"):
        if tmp.is_dir() and ((tmp / WORK_MARKER).is_file() or not any(tmp.iterdir())):
            log.info("removing %s, left by a conversion killed while it started", tmp)
            _remove(tmp)
    if work.exists():
        state = _read_manifest(work)
        if state is None:
            if not (work / WORK_MARKER).is_file() and not _left_by_old_k2jax(work):
                raise CheckpointError(
                    f"{work} exists but was not made by k2jax convert (no {WORK_MARKER} or "
                    f"readable {MANIFEST_NAME} inside), and the conversion needs this name for "
                    "its work folder: move or remove it, or choose another --out"
                )
            log.warning(
                "%s: work folder of an interrupted conversion without a readable %s; clearing "
                "it and starting over",
                work,
                MANIFEST_NAME,
            )
            _remove(work)
        else:
            old, done = state["plan"], {int(i) for i in state["done"]}
            if old != plan:
                keys = [k for k in plan if old.get(k) != plan[k]]
                raise CheckpointError(
                    f"{work} holds an interrupted conversion with different {', '.join(keys)}; "
                    "rerun with the same source and options to resume it, or remove it to start "
                    "over"
                )
            # Orbax's temporary folders of an item interrupted mid-write are dropped (that item
            # is not in `done` and is written again), and so are torn manifest writes.
            for tmp in (work / PARAMS_DIR).glob("*.orbax-checkpoint-tmp*"):
                _remove(tmp)
            for tmp in work.glob(f".{MANIFEST_NAME}.*.tmp"):
                _remove(tmp)
            log.info(
                "resuming %s: %d of %d items already written", work, len(done), len(plan["items"])
            )
            return done
    # Built whole under a temporary name, then renamed: `work` never exists without its marker.
    try:
        work.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{work.name}.", suffix=_WORK_TMP, dir=work.parent))
    except OSError as e:
        raise OSError(e.errno, f"cannot create {work}: {e.strerror}") from None
    try:
        (tmp / WORK_MARKER).write_text("the work folder of a `k2jax convert` (resumable)\n")
        (tmp / PARAMS_DIR).mkdir()
        _write_manifest(tmp, plan, set())
        os.rename(tmp, work)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"cannot create {work}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return set()


def _read_manifest(work: Path) -> dict | None:
    """The work folder's manifest ({"plan", "done"}), or None when missing or unreadable."""
    try:
        state = json.loads((work / MANIFEST_NAME).read_text())
        ok = state["plan"].get("format") == FORMAT and all(int(i) >= 0 for i in state["done"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # ValueError: bad JSON
        return None
    return state if ok else None


def _left_by_old_k2jax(work: Path) -> bool:
    """Whether `work` holds only an empty params/: what a k2jax without the marker left when it
    was killed between creating the folder and writing its manifest (nothing to lose)."""
    entries = list(work.iterdir())
    params = work / PARAMS_DIR
    return entries == [params] and params.is_dir() and not any(params.iterdir())


def _write_manifest(work: Path, plan: dict, done: set[int]) -> None:
    _atomic_write_text(work / MANIFEST_NAME, json.dumps({"plan": plan, "done": sorted(done)}))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _finalize(work: Path, out: Path, hf_dir: Path, plan: dict) -> None:
    """Metadata and side files into the work folder, then one rename makes `out` appear."""
    for src in sorted(hf_dir.iterdir()):
        name = src.name
        weights = name.endswith((".safetensors", *PICKLE_SUFFIXES)) or name == INDEX_NAME
        if name.startswith(".") or weights or name.endswith(".index.json") or not src.is_file():
            continue
        if src.stat().st_size > _SIDE_FILE_LIMIT:
            log.warning(
                "not copying %s (%d bytes): not a config or tokenizer file", src, src.stat().st_size
            )
            continue
        shutil.copyfile(src, work / name)
    meta = {
        **plan,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    _atomic_write_text(work / METADATA_NAME, json.dumps(meta, indent=1) + "\n")
    # The manifest and the marker go after the rename: a kill in between leaves a complete `out`
    # with two stray files, where the other order would leave a work folder to start over.
    os.rename(work, out)
    (out / MANIFEST_NAME).unlink()
    (out / WORK_MARKER).unlink(missing_ok=True)  # absent in a folder begun by an older k2jax
    with contextlib.suppress(OSError):
        fd = os.open(out.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


@contextlib.contextmanager
def _output_errors(out: Path, work: Path):
    """Failures writing the output become OSErrors naming it; the work folder stays resumable."""
    try:
        yield
    except OSError as e:
        raise OSError(
            e.errno,
            f"could not write {out}: {e.strerror or e}; {out} was not created, the work so far "
            f"is kept in {work} and a rerun resumes it",
        ) from e
    except (KeyboardInterrupt, CheckpointError, ConfigError):
        raise
    except Exception as e:
        # Orbax reports tensorstore write failures (ENOSPC, EFBIG, EACCES) as ValueError or
        # RuntimeError with the OS error code in the text.
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code is None and not isinstance(e, (ValueError, RuntimeError)):
            raise
        eno = int(code.group(1)) if code else errno.EIO
        raise OSError(
            eno,
            f"could not write {out}: {os.strerror(eno)} ({str(e)[:300]}); {out} was not "
            f"created, the work so far is kept in {work} and a rerun resumes it",
        ) from e


# ---------------------------------------------------------------------------------------------
# Restore


def restore_params(
    folder: str | os.PathLike,
    abstract_params,
    shardings=None,
    *,
    progress: bool | None = None,
    check_finite: bool = True,
):
    """The params tree described by `abstract_params` from a converted folder, each leaf with
    its sharding from `shardings` (default: the first local device); float leaves are cast to
    the requested dtype, INT4 codes stay codes. check_finite: raise a CheckpointError naming
    the item folders and leaves if any weight is NaN or Inf (counted on the devices)."""
    import orbax.checkpoint as ocp

    folder = Path(folder)
    meta = read_metadata(folder)
    leaves = plan_leaves(abstract_params, shardings)
    by_name = {leaf.name: leaf for leaf in leaves}
    _check_leaves(folder, meta, leaves)

    items = [[_decode(e, by_name) for e in item["pieces"]] for item in meta["items"]]
    covered = dict.fromkeys(by_name, 0)
    for piece in (p for item in items for p in item):
        covered[piece.leaf.name] += math.prod(piece.shape)
    for leaf in leaves:
        if covered[leaf.name] != math.prod(leaf.shape):
            raise CheckpointError(
                f"{folder / METADATA_NAME}: the items do not hold all of {leaf.name} "
                f"({covered[leaf.name]} of {math.prod(leaf.shape)} values)"
            )
    buffers: dict[str, jax.Array] = {}
    for leaf in leaves:
        if not any(p.leaf is leaf and p.shape == leaf.shape for item in items for p in item):
            buffers[leaf.name] = jax.numpy.zeros(leaf.shape, leaf.dtype, device=leaf.sharding)
    total = sum(p.nbytes for item in items for p in item)

    def target(piece):
        return jax.ShapeDtypeStruct(piece.shape, piece.leaf.dtype, sharding=piece.sharding)

    item_of = {p: folder / entry["dir"] for entry, item in zip(meta["items"], items) for p in item}

    def label(piece, entry, half):  # the item folder and the piece's name in it
        return f"{item_of[piece]}: {'/'.join(filter(None, (piece.leaf.name, piece.key)))}"

    check = FiniteCheck(label) if check_finite else None

    with (
        progress_bar(total, f"loading {folder.name}", progress) as bar,
        ocp.StandardCheckpointer() as ck,
    ):
        for entry, pieces in zip(meta["items"], items):
            path = folder / entry["dir"]
            if not path.is_dir():
                raise CheckpointError(f"{path}: missing (the converted checkpoint is incomplete)")
            restored = ck.restore(path, _tree_target(pieces, target))
            for piece in pieces:
                arr = _tree_get(restored, piece)
                name = piece.leaf.name
                if name not in buffers:  # the piece is the whole leaf
                    buffers[name] = arr
                    if check is not None:
                        check.count(piece, arr)
                else:
                    buffers[name] = place_piece(buffers[name], piece, arr, check)
                bar.update(piece.nbytes)
            del restored
    if check is not None:
        check.raise_if_any(
            folder,
            "convert the Hugging Face checkpoint again (its own load names the tensors), or pass "
            "check_finite=False to load them anyway",
        )
    tree = jax.tree.structure(nn.unbox(abstract_params))
    return jax.tree.unflatten(tree, [buffers[leaf.name] for leaf in leaves])


def _check_leaves(folder: Path, meta: dict, leaves: list[LeafPlan]) -> None:
    stored = meta["leaves"]
    wanted = {leaf.name for leaf in leaves}
    if set(stored) != wanted:
        only_stored = sorted(set(stored) - wanted)
        only_wanted = sorted(wanted - set(stored))
        hint = ""
        if any("weight_q" in n for n in only_stored) or any("weight_q" in n for n in only_wanted):
            hint = (
                f" (it was converted with experts={meta['experts']!r}: load it with that, or "
                "convert again with the other --experts)"
            )
        example = (only_stored or only_wanted)[0]
        raise CheckpointError(
            f"{folder}: the converted parameters do not match the model{hint}; e.g. "
            f"{example!r} is {'only in the checkpoint' if only_stored else 'missing'}"
        )
    for leaf in leaves:
        s = stored[leaf.name]
        if list(s["shape"]) != list(leaf.shape):
            raise CheckpointError(
                f"{folder}: {leaf.name} has shape {s['shape']} in the checkpoint, but the model "
                f"(config.json) needs {list(leaf.shape)}"
            )
        if (s["dtype"] == "int4") != (str(leaf.dtype) == "int4"):
            raise CheckpointError(
                f"{folder}: {leaf.name} is {s['dtype']}, model wants {leaf.dtype}"
            )
