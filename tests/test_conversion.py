"""`k2jax convert`: HF checkpoint → sharded Orbax folder → any mesh; resumable, atomic, strict.

The reference for every converted folder is the same Hugging Face folder loaded directly
(tests/test_loader.py checks those loads against transformers and compressed-tensors): restored
parameters must equal it bit for bit on every mesh, and the logits on an expert=4 × tensor=2 mesh
must equal one device's. The folder is written on one mesh (expert=2 × tensor=4) and restored
onto others. Interrupting a conversion (a hook raising after N items, as Ctrl-C would) leaves no
output folder, and a rerun writes only the missing items and gives the same parameters.
Failures at the output — out of space (a real EFBIG from RLIMIT_FSIZE in a subprocess and a
simulated ENOSPC), permission — name the output and leave it absent. A process killed while the
work folder is being created (a subprocess exiting inside the manifest write), or a marked work
folder whose manifest is gone, restarts by itself; a folder in its place that is not ours is
refused and left as it is; an output that is, contains or lies inside the source is refused.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from helpers import rel_err

import k2jax
from k2jax.cli import main as cli_main
from k2jax.config import ConfigError, ModelConfig
from k2jax.conversion.loader import abstract_params, load_params
from k2jax.conversion.orbax_io import (
    MANIFEST_NAME,
    METADATA_NAME,
    WORK_MARKER,
    convert_checkpoint,
    read_metadata,
    restore_params,
)
from k2jax.conversion.safetensors_io import CheckpointError
from k2jax.model import ComputeConfig
from k2jax.sharding import make_mesh, param_shardings
from k2jax.testing import make_tiny_checkpoint

TOKENS = np.random.default_rng(3).integers(0, 1024, (8, 6))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    return {f: make_tiny_checkpoint(root / f"hf_{f}", format=f) for f in ("int4", "fp8", "bf16")}


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """The INT4 checkpoint converted on an expert=2 × tensor=4 mesh."""
    out = tmp_path_factory.mktemp("conv_out") / "k2t"
    convert_checkpoint(tiny["int4"], out, mesh=make_mesh(1, 2, 4), progress=False)
    return out


def _setup(folder, experts="int4", dtype="float32"):
    cfg = ModelConfig.from_hf_dir(folder)
    compute = ComputeConfig(dtype=dtype, param_dtype=dtype, experts=experts)
    return cfg, abstract_params(cfg, compute)


def _assert_same_params(got, want):
    flat_want = jax.tree.leaves(want)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], flat_want):
        a, b = np.asarray(x), np.asarray(y)
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(
            a.view(np.uint8), b.view(np.uint8), err_msg=jax.tree_util.keystr(path)
        )


@pytest.fixture(scope="module")
def direct(tiny):
    """The HF INT4 folder loaded directly onto one device (float32 params)."""
    cfg, abstract = _setup(tiny["int4"])
    return load_params(tiny["int4"], cfg, abstract)


def test_converted_folder_layout_and_metadata(converted, tiny):
    meta = read_metadata(converted)
    assert meta["experts"] == "int4" and meta["dtype"] == "bfloat16"
    assert meta["source"]["quantization"] == "int4"
    assert meta["source"]["path"] == str(tiny["int4"].resolve())
    assert meta["leaves"]["moe_layers/mlp/experts/gate_up_proj/weight_q"]["dtype"] == "int4"
    names = sorted(p.name for p in converted.iterdir())
    assert names == sorted(
        ["config.json", METADATA_NAME, "params", "tiktoken.model", "tokenizer_config.json"]
    )
    assert (converted / "config.json").read_bytes() == (tiny["int4"] / "config.json").read_bytes()
    assert not converted.with_name(converted.name + ".partial").exists()
    # stacked leaves are stored one layer per piece (name, layer, row range), unstacked whole
    pieces = [tuple(p) for item in meta["items"] for p in item["pieces"]]
    assert len(pieces) == len(set(pieces))
    assert ("moe_layers/mlp/experts/down_proj/weight_q", 1, None, None) in pieces
    assert ("embed_tokens/weight", None, None, None) in pieces


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_restore_onto_other_meshes_equals_direct_load(converted, direct, shape):
    """Written on expert=2 × tensor=4; restored onto 1 device, expert=8 and 2×2×2 with each
    leaf's own sharding, bit-identical to loading the HF folder (bf16 stored, cast to f32)."""
    _, abstract = _setup(converted)
    n = int(np.prod(shape))
    mesh = make_mesh(*shape, devices=jax.devices()[:n])
    shardings = param_shardings(abstract, mesh)
    params = restore_params(converted, abstract, shardings)
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        assert x.sharding == s
    _assert_same_params(params, direct)


def test_restored_logits_on_expert4_tensor2_equal_single_device(converted, tiny):
    one = k2jax.load_model(tiny["int4"], dtype="float32")
    model = k2jax.load_model(converted, dtype="float32", mesh=make_mesh(1, 4, 2))
    assert model.compute.experts == "int4" and model.path == converted
    assert rel_err(model.logits(TOKENS), one.logits(TOKENS)) <= 1e-5


def test_cli_convert_fp8_to_int4_experts(tiny, tmp_path, capsys):
    """`k2jax convert` on an FP8 checkpoint with --experts int4: experts quantised on the way,
    the rest dequantised; equal to loading the FP8 folder directly with experts="int4"."""
    out = tmp_path / "k2i"
    args = ["--hf-dir", str(tiny["fp8"]), "--out", str(out), "--experts", "int4"]
    rc = cli_main(["convert", *args, "--mesh", "expert=2,tensor=4", "--no-progress"])
    assert rc == 0 and f"wrote {out}" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["experts"] == "int4" and meta["source"]["quantization"] == "fp8"
    cfg, abstract = _setup(tiny["fp8"], dtype="bfloat16")
    _assert_same_params(restore_params(out, abstract), load_params(tiny["fp8"], cfg, abstract))


def test_progress_bar_reports_bytes_and_tensors(tiny, tmp_path, capsys):
    convert_checkpoint(tiny["bf16"], tmp_path / "o", progress=True)
    err = capsys.readouterr().err
    assert "converting hf_bf16" in err and "tensors" in err and "100%" in err
    assert read_metadata(tmp_path / "o")["experts"] == "bf16"  # as stored


def test_interrupted_conversion_resumes_and_matches(tiny, direct, tmp_path):
    out = tmp_path / "k2t"
    written = []

    def interrupt_after_three(i):
        written.append(i)
        if len(written) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(
            tiny["int4"], out, max_item_bytes=20_000, after_item=interrupt_after_three
        )
    assert not out.exists()
    work = out.with_name("k2t.partial")
    state = json.loads((work / MANIFEST_NAME).read_text())
    n_items = len(state["plan"]["items"])
    assert state["done"] == [0, 1, 2] and n_items > 5
    # a layer of the 32 KiB expert stack is over the item size: stored as row ranges
    pieces = [p for item in state["plan"]["items"] for p in item["pieces"]]
    gate_up = "moe_layers/mlp/experts/gate_up_proj/weight_q"
    assert [
        gate_up,
        0,
        0,
        32,
    ] in pieces and [gate_up, 0, 32, 64] in pieces
    # a crash in the middle of writing an item leaves Orbax's temporary folder behind
    (work / "params" / "item_00003.orbax-checkpoint-tmp-1234").mkdir()
    # as a k2jax from before the marker left it: a readable manifest alone marks the folder ours
    (work / WORK_MARKER).unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in (work / "params").iterdir()}

    with pytest.raises(CheckpointError, match="different experts"):
        convert_checkpoint(tiny["int4"], out, max_item_bytes=20_000, experts="bf16")
    resumed = []
    convert_checkpoint(tiny["int4"], out, max_item_bytes=20_000, after_item=resumed.append)
    assert resumed == list(range(3, n_items))  # only the missing items were written
    for name in ("item_00000", "item_00001", "item_00002"):
        assert (out / "params" / name).stat().st_mtime_ns == stamps[name]
    assert not work.exists() and not (out / MANIFEST_NAME).exists()
    assert not list((out / "params").glob("*tmp*"))
    _, abstract = _setup(out)
    _assert_same_params(restore_params(out, abstract), direct)


def test_output_exists_refused(converted, tiny):
    with pytest.raises(FileExistsError, match=str(converted)):
        convert_checkpoint(tiny["int4"], converted)


def test_out_of_space_names_output_and_leaves_nothing(tiny, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", no_space)
    out = tmp_path / "o"
    with pytest.raises(OSError) as err:
        convert_checkpoint(tiny["int4"], out)
    assert err.value.errno == errno.ENOSPC
    msg = str(err.value)
    assert f"could not write {out}" in msg and "No space left" in msg and "rerun resumes" in msg
    assert not out.exists()


def test_permission_error_at_output(tiny, tmp_path, monkeypatch):
    real_rename = os.rename

    def denied(src, dst):
        if str(dst) == str(tmp_path / "o"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", denied)
    with pytest.raises(OSError) as err:
        convert_checkpoint(tiny["bf16"], tmp_path / "o")
    assert err.value.errno == errno.EACCES and str(tmp_path / "o") in str(err.value)
    assert not (tmp_path / "o").exists() and (tmp_path / "o.partial").exists()


def test_real_file_size_limit_failure(tiny, tmp_path):
    """A real failed write: RLIMIT_FSIZE makes the kernel refuse Orbax's data file (EFBIG)."""
    out = tmp_path / "o"
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from k2jax.conversion.orbax_io import convert_checkpoint
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        try:
            convert_checkpoint({str(tiny["int4"])!r}, {str(out)!r}, progress=False)
        except OSError as e:
            print("ERRNO", e.errno, e)
            sys.exit(0)
        sys.exit("the conversion did not fail")
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ERRNO {errno.EFBIG}" in proc.stdout and f"could not write {out}" in proc.stdout
    assert not out.exists()


def test_restore_checks_model_and_files(converted, tmp_path):
    with pytest.raises(ConfigError, match="converted with experts='int4'"):
        k2jax.load_model(converted, experts="bf16")
    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    meta = json.loads((broken / METADATA_NAME).read_text())
    shutil.rmtree(broken / meta["items"][0]["dir"])
    _, abstract = _setup(broken)
    with pytest.raises(CheckpointError, match="item_00000: missing"):
        restore_params(broken, abstract)
    meta["format_version"] = 99
    (broken / METADATA_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        k2jax.load_model(broken)


# ---------------------------------------------------------------------------------------------
# The work folder: killed at any moment, the rerun resumes or restarts by itself


def _snapshot(folder):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _assert_complete(out, tiny):
    """`out` is a clean converted folder equal to loading the HF folder directly."""
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # nothing left beside it
    assert not (out / MANIFEST_NAME).exists() and not (out / WORK_MARKER).exists()
    assert all(p.name.startswith("item_") for p in (out / "params").iterdir())
    cfg, abstract = _setup(tiny["bf16"], experts="bf16")
    _assert_same_params(restore_params(out, abstract), load_params(tiny["bf16"], cfg, abstract))


def test_killed_while_creating_the_work_folder_restarts_by_itself(tiny, tmp_path):
    """Killed after the work folder's creation began and before its manifest was written (the
    process exits inside the manifest write; no clean-up runs): no o.partial exists, only a
    marked temporary folder, which the rerun removes before converting."""
    out = tmp_path / "o"
    script = textwrap.dedent(
        f"""
        import os
        from k2jax.conversion import orbax_io
        orbax_io._write_manifest = lambda *args: os._exit(9)
        orbax_io.convert_checkpoint({str(tiny["bf16"])!r}, {str(out)!r}, progress=False)
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert not (tmp_path / "o.partial").exists()
    [left] = tmp_path.iterdir()
    assert left.name.startswith(".o.partial.") and (left / WORK_MARKER).is_file()
    convert_checkpoint(tiny["bf16"], out, progress=False)
    _assert_complete(out, tiny)


def test_manifest_write_failing_leaves_no_work_folder(tiny, tmp_path, monkeypatch):
    from k2jax.conversion import orbax_io

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(orbax_io, "_write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tiny["bf16"], tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    convert_checkpoint(tiny["bf16"], tmp_path / "o", progress=False)
    _assert_complete(tmp_path / "o", tiny)


@pytest.mark.parametrize("state", ["no manifest", "torn manifest", "older k2jax"])
def test_half_made_work_folder_is_cleared_and_restarted(tiny, tmp_path, caplog, state):
    """Our work folder without a readable manifest — marked, or the empty params/ an older
    k2jax left when killed right after creating it — is cleared with a log line and converted
    again from scratch; leftover temporary work folders of ours are removed."""
    work = tmp_path / "o.partial"
    (work / "params" / "item_00000").mkdir(parents=True)
    (work / "params" / "item_00000" / "stale").write_text("from the killed run")
    (work / WORK_MARKER).write_text("")
    if state == "torn manifest":
        (work / MANIFEST_NAME).write_text('{"plan": {"format": "k2j')
    if state == "older k2jax":
        shutil.rmtree(work / "params" / "item_00000")
        (work / WORK_MARKER).unlink()
    leftover = tmp_path / ".o.partial.a1b2c3.new"
    (leftover / "params").mkdir(parents=True)
    (leftover / WORK_MARKER).write_text("")
    with caplog.at_level(logging.INFO, logger="k2jax.conversion.orbax_io"):
        convert_checkpoint(tiny["bf16"], tmp_path / "o", progress=False)
    assert f"{work}: work folder of an interrupted conversion without a readable" in caplog.text
    assert "starting over" in caplog.text
    _assert_complete(tmp_path / "o", tiny)


def test_folder_in_the_work_folders_place_that_is_not_ours_is_refused(tiny, tmp_path):
    work = tmp_path / "o.partial"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    mine = tmp_path / ".o.partial.mine.new"  # named like our temporary folders, but unmarked
    mine.mkdir()
    (mine / "keep.txt").write_text("mine too")
    before = _snapshot(tmp_path)
    for folder in (work, tmp_path / "empty.partial"):
        folder.mkdir(exist_ok=True)
        with pytest.raises(CheckpointError) as err:
            convert_checkpoint(tiny["bf16"], folder.with_suffix(""), progress=False)
        msg = str(err.value)
        assert f"{folder} exists but was not made by k2jax convert" in msg
        assert "move or remove it, or choose another --out" in msg
    (tmp_path / "empty.partial").rmdir()
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["is", "inside", "contains", "work"])
def test_output_overlapping_the_source_is_refused(tiny, tmp_path, capsys, where):
    """`k2jax convert` never writes where it reads: an --out that is, lies inside or contains
    the HF folder, or whose work folder (OUT.partial) is the HF folder, is refused before
    anything is written."""
    src = tmp_path / "src"
    hf = src / "ck.partial"
    shutil.copytree(tiny["bf16"], hf)
    out = {"is": hf, "inside": hf / "k2t", "contains": src, "work": src / "ck"}[where]
    before = _snapshot(tmp_path)
    rc = cli_main(["convert", "--hf-dir", str(hf), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    role = f"the Hugging Face checkpoint being converted, --hf-dir {hf}"
    expected = {
        "is": f"--out {out} is {role}; writing there would destroy it",
        "inside": f"--out {out} lies inside {role}; writing there would change",
        "contains": f"--out {out} contains {role}; replacing it would destroy that",
        "work": f"--out's work folder {src / 'ck.partial'} is {role};",
    }[where]
    assert expected in err
    assert _snapshot(tmp_path) == before
