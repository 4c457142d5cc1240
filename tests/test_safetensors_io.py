"""The hand-written safetensors reader/writer against safetensors' own torch front end.

One reference subprocess per module (tests/reference/formats_reference.py, .venv-ref): it reads
our files with `safetensors.torch.load_file` and writes its own with `save_file`; the values go
through JSON so neither side's byte handling can vouch for the other's. The rest checks the
errors for every kind of bad input (naming file and tensor, leaving nothing partial behind).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import helpers
import ml_dtypes
import numpy as np
import pytest

from k2jax.conversion import safetensors_io as sio
from k2jax.conversion.safetensors_io import (
    CheckpointError,
    CheckpointIndex,
    SafetensorsError,
    SafetensorsFile,
    write_safetensors,
    write_sharded_checkpoint,
)

# safetensors dtype name → torch's name for it (as the reference prints str(dtype)).
TORCH_NAME = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def sample_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """One or more tensors of every dtype, with extremes, specials, a scalar and empty shapes."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, dt in sio.DTYPES.items():
        if dt.kind == "b":
            out[name] = rng.random((3, 4)) > 0.5
        elif dt.kind in "iu":
            info = np.iinfo(dt)
            vals = rng.integers(max(info.min, -1000), min(info.max, 1000), 12, dtype=np.int64)
            vals = vals.astype(dt)
            vals[:2] = info.min, info.max
            out[name] = vals.reshape(3, 4)
        else:
            limit = float(ml_dtypes.finfo(dt).max) if "float8" in str(dt) else 1e3
            x = np.clip(rng.standard_normal((3, 5)) * 40, -limit, limit)
            out[name] = x.astype(dt)
    out["F32.specials"] = np.array([0.0, -0.0, 1e-40, -3.4e38, np.inf], np.float32)
    out["F8_E4M3.specials"] = np.array([0.0, -0.0, 448.0, -448.0, 2.0**-9], ml_dtypes.float8_e4m3fn)
    out["BF16.rank3"] = (np.arange(60, dtype=np.float32).reshape(3, 4, 5) / 7).astype(
        ml_dtypes.bfloat16
    )
    out["F32.scalar"] = np.array(1.25, np.float32)
    out["BF16.empty"] = np.zeros((0, 3), ml_dtypes.bfloat16)
    out["I8.odd"] = np.array([-1, 2, -3], np.int8)  # 3 bytes: the next tensor must still line up
    out["big.endian"] = np.arange(6, dtype=">i4").reshape(2, 3)  # written little-endian
    return out


def assert_values(array: np.ndarray, ref: dict, label: str) -> None:
    """`array` equals the reference's JSON values exactly (floats: value and sign of zero)."""
    assert list(array.shape) == ref["shape"], label
    if array.dtype.kind in "biu":
        assert array.tolist() == ref["values"], label
        return
    got = array.astype(np.float64)
    expected = np.array(ref["values"], np.float64).reshape(ref["shape"])
    np.testing.assert_array_equal(got, expected, err_msg=label)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(expected), err_msg=label)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("safetensors_ref")
    ours = sample_tensors()
    write_safetensors(d / "ours.safetensors", ours, metadata={"format": "pt", "note": "k2jax"})
    rng = np.random.default_rng(1)
    stream = [
        (f"layer.{i}.w", rng.standard_normal((8, 16)).astype(ml_dtypes.bfloat16)) for i in range(7)
    ]
    stream.append(
        ("layer.big", rng.standard_normal((40, 16)).astype(np.float32))
    )  # > max: own shard
    weight_map = write_sharded_checkpoint(d / "sharded", stream, max_shard_bytes=700)
    helpers.run_reference("formats_reference.py", "safetensors", d)
    return {
        "dir": d,
        "ours": ours,
        "stream": dict(stream),
        "weight_map": weight_map,
        "as_read": json.loads((d / "ours_as_read.json").read_text()),
        "theirs": json.loads((d / "theirs.json").read_text()),
    }


# ---------------------------------------------------------------------------------------------
# Against safetensors' own torch front end


def test_safetensors_reads_our_file(ref):
    as_read = ref["as_read"]["ours"]
    assert as_read["metadata"] == {"format": "pt", "note": "k2jax"}
    assert set(as_read["tensors"]) == set(ref["ours"])
    for name, array in ref["ours"].items():
        got = as_read["tensors"][name]
        st = sio._entry_of(name, array).dtype
        assert got["dtype"] == TORCH_NAME[st], name
        assert_values(array, got, name)


def test_safetensors_reads_our_shards(ref):
    sharded = ref["as_read"]["sharded"]
    files = sorted(set(ref["weight_map"].values()))
    # 256-byte tensors, two per 700-byte shard; the 2560-byte one gets a shard of its own.
    assert sorted(sharded) == files == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    for shard, content in sharded.items():
        assert content["metadata"] == {"format": "pt"}
        for name, got in content["tensors"].items():
            assert ref["weight_map"][name] == shard
            assert_values(ref["stream"][name], got, name)
    assert sum(len(c["tensors"]) for c in sharded.values()) == len(ref["stream"])
    index = json.loads((ref["dir"] / "sharded" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == ref["weight_map"]
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in ref["stream"].values())


def test_we_read_safetensors_file(ref):
    with SafetensorsFile(ref["dir"] / "theirs.safetensors") as f:
        assert f.metadata == {"format": "pt", "made_by": "torch"}
        assert set(f.keys()) == set(ref["theirs"])
        for name, want in ref["theirs"].items():
            info = f.info(name)
            assert TORCH_NAME[info.dtype] == want["dtype"], name
            assert list(info.shape) == want["shape"], name
            assert_values(f.read(name), want, name)
        seen = {f.info(n).dtype for n in f}
    assert seen == set(sio.DTYPES), "the reference must exercise every dtype"


# ---------------------------------------------------------------------------------------------
# Reader behaviour


def test_roundtrip_bit_exact_and_aligned(tmp_path):
    tensors = sample_tensors(3)
    path = write_safetensors(tmp_path / "x.safetensors", tensors)
    with SafetensorsFile(path) as f:
        assert len(f) == len(tensors)
        for name, array in tensors.items():
            got = f.read(name)
            assert got.shape == array.shape, name
            assert got.dtype == sio.DTYPES[sio._entry_of(name, array).dtype], name
            assert got.tobytes() == np.ascontiguousarray(array, got.dtype).tobytes(), name
            begin = f._data_start + f.info(name).offsets[0]
            assert begin % got.dtype.itemsize == 0, f"{name} is not aligned in the file"
        keys = f.keys()
        assert [f.info(k).offsets[0] for k in keys] == sorted(f.info(k).offsets[0] for k in keys)
    for k in range(1, 9):  # header lengths of every residue mod 8: the data must start aligned
        path = write_safetensors(tmp_path / f"{k}.safetensors", {"n" * k: np.ones(2, np.float64)})
        with SafetensorsFile(path) as f:
            assert f._data_start % 8 == 0
            np.testing.assert_array_equal(f.read("n" * k), np.ones(2))


def test_write_jax_arrays(tmp_path):
    import jax.numpy as jnp

    x = jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4)
    path = write_safetensors(tmp_path / "j.safetensors", {"x": x, "y": jnp.zeros(2, jnp.int32)})
    with SafetensorsFile(path) as f:
        assert f.info("x")[:2] == ("BF16", (3, 4))
        np.testing.assert_array_equal(f.read("x"), np.asarray(x))
        assert f.read("y").dtype == np.int32


def test_read_is_lazy_view_and_rows(tmp_path):
    w = np.arange(10 * 6, dtype=np.float32).reshape(10, 6).astype(ml_dtypes.bfloat16)
    path = write_safetensors(tmp_path / "w.safetensors", {"w": w, "s": np.float32(3.0)})
    f = SafetensorsFile(path)
    full = f.read("w")
    assert not full.flags.owndata and not full.flags.writeable  # a view of the read-only mapping
    with pytest.raises(ValueError):
        full[0, 0] = 1
    np.testing.assert_array_equal(full, w)
    for rows in [
        slice(3, 7),
        slice(None, 2),
        slice(8, None),
        slice(-3, -1),
        slice(4, 4),
        slice(9, 50),
    ]:
        part = f.read("w", rows=rows)
        np.testing.assert_array_equal(part, w[rows])
        assert part.size == 0 or not part.flags.owndata
    with pytest.raises(ValueError, match="step-1 slice"):
        f.read("w", rows=slice(0, 10, 2))
    with pytest.raises(ValueError, match="scalar"):
        f.read("s", rows=slice(0, 1))
    assert f.read("s").shape == () and f.read("s") == 3.0
    with pytest.raises(KeyError, match=r"w\.safetensors: no tensor named 'nope'"):
        f.read("nope")
    f.close()
    np.testing.assert_array_equal(full, w)  # arrays outlive close()
    with pytest.raises(ValueError, match="after close"):
        f.read("w")


def test_file_changed_after_open(tmp_path):
    path = write_safetensors(tmp_path / "w.safetensors", {"w": np.zeros(64, np.float32)})
    f = SafetensorsFile(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 16)
    with pytest.raises(SafetensorsError, match=r"w\.safetensors: the file changed size"):
        f.read("w")


def test_pread_reads_own_arrays_and_names_a_truncated_tensor(tmp_path):
    w = np.arange(10 * 6, dtype=np.float32).reshape(10, 6).astype(ml_dtypes.float8_e4m3fn)
    path = write_safetensors(tmp_path / "model.safetensors", {"w": w, "z": np.zeros(8, np.float32)})
    with CheckpointIndex(tmp_path) as ckpt:
        for rows in [None, slice(3, 7), slice(8, None), slice(4, 4)]:
            part = ckpt.read("w", rows, mmap=False)
            assert part.flags.owndata and part.flags.writeable  # never a view of a mapping
            np.testing.assert_array_equal(part, w if rows is None else w[rows])
    f = SafetensorsFile(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 16)
    with pytest.raises(
        SafetensorsError, match=r"model\.safetensors: the file ends inside tensor 'w'"
    ):
        f.read("w", mmap=False)  # stored last (widest dtype first), so cut by the truncation
    f.close()


def _craft(path: Path, header: dict, data: bytes = b"", length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_FILES = {
    "truncated": (
        lambda p: p.write_bytes(
            write_safetensors(
                p, {"a": np.zeros(4, np.float32), "b": np.ones(4, np.int8)}
            ).read_bytes()[:-2]
        ),
        ["truncated", "'b'"],
    ),
    "shorter than 8 bytes": (lambda p: p.write_bytes(b"\x05\x00"), ["shorter than the 8-byte"]),
    "header length beyond file": (
        lambda p: _craft(p, {"a": _entry()}, b"\0" * 8, length=10_000),
        ["header length field says 10000 bytes"],
    ),
    "header not JSON": (
        lambda p: p.write_bytes((6).to_bytes(8, "little") + b"{oops}"),
        ["not valid UTF-8 JSON"],
    ),
    "header not an object": (lambda p: _craft(p, [1, 2]), ["JSON list, expected an object"]),
    "unknown dtype": (
        lambda p: _craft(p, {"w": _entry(dtype="F4")}, b"\0" * 8),
        ["'w'", "unsupported dtype 'F4'"],
    ),
    "offsets beyond data": (
        lambda p: _craft(p, {"w": _entry(offsets=(8, 16))}, b"\0" * 8),
        ["'w'", "only 8 data bytes", "truncated"],
    ),
    "offsets reversed": (
        lambda p: _craft(p, {"w": _entry(offsets=(8, 0))}, b"\0" * 8),
        ["'w'", "end before they begin"],
    ),
    "byte count mismatch": (
        lambda p: _craft(p, {"w": _entry(dtype="BF16", shape=(3,), offsets=(0, 8))}, b"\0" * 8),
        ["'w'", "span 8 bytes", "BF16 x shape [3] needs 6 bytes"],
    ),
    "overlap": (
        lambda p: _craft(
            p, {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, b"\0" * 12
        ),
        ["'a' and 'b' overlap"],
    ),
    "negative dim": (
        lambda p: _craft(p, {"w": _entry(shape=(-2,))}, b"\0" * 8),
        ["'w'", "shape must be a list of integers >= 0"],
    ),
    "missing offsets": (
        lambda p: _craft(p, {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
        ["'w'", "dtype, shape and data_offsets"],
    ),
    "bad metadata": (
        lambda p: _craft(p, {"__metadata__": {"a": 1}}),
        ["__metadata__ must be an object of strings"],
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_malformed_file_errors_name_file_and_tensor(tmp_path, case):
    make, fragments = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(SafetensorsError) as err:
        SafetensorsFile(path)
    msg = str(err.value)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg


# ---------------------------------------------------------------------------------------------
# CheckpointIndex


def _sharded(folder: Path, n_tensors=6, max_shard_bytes=300) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    tensors = {f"t{i}": rng.standard_normal((4, 8)).astype(np.float32) for i in range(n_tensors)}
    write_sharded_checkpoint(folder, tensors.items(), max_shard_bytes=max_shard_bytes)
    return tensors


def test_index_lazy_bounded_and_correct(tmp_path):
    tensors = _sharded(tmp_path)  # 128 bytes each, two per shard → 3 shards
    with CheckpointIndex(tmp_path, max_open_files=2) as ckpt:
        assert ckpt.open_shards == []  # nothing opened until used
        assert ckpt.names() == list(tensors) and len(ckpt) == 6 and "t3" in ckpt
        assert ckpt.shards() == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        assert ckpt.shard_of("t5") == "model-00003-of-00003.safetensors"
        for _ in range(2):
            for name, array in tensors.items():
                assert ckpt.info(name) == ("F32", (4, 8), ckpt.info(name).offsets)
                np.testing.assert_array_equal(ckpt.read(name), array)
                np.testing.assert_array_equal(ckpt.read(name, rows=slice(1, 3)), array[1:3])
                assert len(ckpt.open_shards) <= 2
        ckpt.validate()
        with pytest.raises(KeyError, match="no tensor named 'zz'"):
            ckpt.read("zz")
    assert ckpt.open_shards == []


def test_index_single_file(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"b": np.ones(3, np.int8), "a": np.zeros(2)})
    ckpt = CheckpointIndex(tmp_path)
    assert ckpt.index_path is None and sorted(ckpt.names()) == ["a", "b"]
    assert ckpt.shard_of("a") == "model.safetensors"
    np.testing.assert_array_equal(ckpt.read("b"), np.ones(3, np.int8))


def test_index_missing_shard(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        CheckpointIndex(tmp_path)
    msg = str(err.value)
    assert "model-00002-of-00003.safetensors" in msg and "model.safetensors.index.json" in msg
    assert "does not exist" in msg


def test_index_names_tensor_absent_from_its_shard(tmp_path):
    _sharded(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    ckpt = CheckpointIndex(tmp_path)
    for call in (lambda: ckpt.read("ghost"), lambda: ckpt.info("ghost"), ckpt.validate):
        with pytest.raises(CheckpointError) as err:
            call()
        msg = str(err.value)
        assert "ghost" in msg and "model-00001-of-00003.safetensors" in msg
        assert str(index_path) in msg


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path):
    sentinel = tmp_path / "UNPICKLED"

    class Trap:  # unpickling this would create the sentinel file
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        CheckpointIndex(tmp_path)
    msg = str(err.value)
    assert "pytorch_model.bin" in msg and "never unpickles" in msg and str(tmp_path) in msg
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "files, fragment",
    [
        ({}, "no weights found"),
        ({"config.json": "{}"}, "no weights found"),
        ({"model-00001-of-00002.safetensors": ""}, "neither model.safetensors.index.json"),
        ({"model.safetensors.index.json": "{not json"}, "not valid JSON"),
        (
            {"model.safetensors.index.json": '{"metadata": {}}'},
            "expected an object with a 'weight_map'",
        ),
        ({"model.safetensors.index.json": '{"weight_map": {}}'}, "weight_map is empty"),
        (
            {"model.safetensors.index.json": '{"weight_map": {"a": "../x.safetensors"}}'},
            "not a plain file name",
        ),
    ],
)
def test_index_folder_errors(tmp_path, files, fragment):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(CheckpointError) as err:
        CheckpointIndex(tmp_path)
    assert fragment in str(err.value) and str(tmp_path) in str(err.value)


def test_index_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        CheckpointIndex(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# Writer failures leave nothing behind


def _fail_writes_under(monkeypatch, folder: Path, after_bytes: int = 0) -> None:
    """Makes os.write raise ENOSPC for files under `folder` once `after_bytes` have been written."""
    real_write = os.write
    written = {"n": 0}

    def write(fd, data):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(str(folder)):
            if written["n"] + len(data) > after_bytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written["n"] += len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_write_out_of_space_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"old": np.arange(4, dtype=np.int32)})
    before = path.read_bytes()
    _fail_writes_under(monkeypatch, tmp_path, after_bytes=100)
    with pytest.raises(OSError) as err:
        write_safetensors(path, {"new": np.zeros((64, 64), np.float32)})
    assert err.value.errno == errno.ENOSPC
    assert str(path) in str(err.value) and "No space left" in str(err.value)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]  # no temporary file left
    assert path.read_bytes() == before  # the old file is untouched


def test_write_real_kernel_failure_file_size_limit(tmp_path):
    """A real failed write(2): RLIMIT_FSIZE makes the kernel refuse bytes past 4 KiB (EFBIG),
    which works as root too, where read-only directories would not stop the write."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        import numpy as np
        from k2jax.conversion.safetensors_io import write_safetensors
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            write_safetensors({str(tmp_path / "big.safetensors")!r}, {{"w": np.zeros(100_000, np.float32)}})
        except OSError as e:
            print("ERRNO", e.errno, e)
            sys.exit(0)
        sys.exit("the write did not fail")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        f"ERRNO {errno.EFBIG}" in proc.stdout and str(tmp_path / "big.safetensors") in proc.stdout
    )
    assert os.listdir(tmp_path) == []


def test_write_into_a_file_instead_of_folder(tmp_path):
    (tmp_path / "plain").write_text("x")
    target = tmp_path / "plain" / "w.safetensors"
    with pytest.raises(OSError) as err:
        write_safetensors(target, {"w": np.zeros(3)})
    assert str(target) in str(err.value)
    assert os.listdir(tmp_path) == ["plain"]


@pytest.mark.parametrize(
    "bad", [np.zeros(2, np.complex64), np.array([object()]), np.zeros(8, ml_dtypes.int4)]
)
def test_write_unsupported_dtype(tmp_path, bad):
    with pytest.raises(TypeError, match="tensor 'bad': dtype"):
        write_safetensors(tmp_path / "x.safetensors", {"ok": np.zeros(2), "bad": bad})
    with pytest.raises(TypeError, match="tensor 'bad': dtype"):
        write_sharded_checkpoint(
            tmp_path / "ck",
            [("ok", np.zeros(100)), ("ok2", np.zeros(100)), ("bad", bad)],  # "ok" is written
            max_shard_bytes=10,
        )
    assert os.listdir(tmp_path) == ["ck"] and os.listdir(tmp_path / "ck") == []


def test_sharded_write_failure_removes_every_shard(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    # Enough for the first shard (header + 2 × 128 bytes), not for the second.
    _fail_writes_under(monkeypatch, folder, after_bytes=600)
    tensors = [(f"t{i}", np.zeros((4, 8), np.float32)) for i in range(6)]
    with pytest.raises(OSError) as err:
        write_sharded_checkpoint(folder, tensors, max_shard_bytes=300)
    assert err.value.errno == errno.ENOSPC and str(folder) in str(err.value)
    assert os.listdir(folder) == []


def test_sharded_write_refuses_existing_and_overwrites(tmp_path):
    _sharded(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_sharded_checkpoint(tmp_path, [("x", np.ones(2))], max_shard_bytes=100)
    with pytest.raises(ValueError, match="'x' given twice"):
        write_sharded_checkpoint(
            tmp_path, [("x", np.ones(2)), ("x", np.ones(2))], max_shard_bytes=100, overwrite=True
        )
    assert len(CheckpointIndex(tmp_path).shards()) == 3  # the failed call changed nothing
    weight_map = write_sharded_checkpoint(
        tmp_path, [("x", np.ones(2))], max_shard_bytes=100, overwrite=True
    )
    assert weight_map == {"x": "model.safetensors"}
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # stale shards gone
    ckpt = CheckpointIndex(tmp_path)
    np.testing.assert_array_equal(ckpt.read("x"), np.ones(2))


def test_shard_sizes_respect_the_limit(tmp_path):
    sizes = [100, 250, 40, 60, 900, 10, 10, 280]  # bytes (int8 tensors)
    weight_map = write_sharded_checkpoint(
        tmp_path,
        [(f"t{i}", np.zeros(n, np.int8)) for i, n in enumerate(sizes)],
        max_shard_bytes=300,
    )
    per_shard: dict[str, int] = {}
    for i, n in enumerate(sizes):
        per_shard[weight_map[f"t{i}"]] = per_shard.get(weight_map[f"t{i}"], 0) + n
    assert list(per_shard.values()) == [100, 250 + 40, 60, 900, 10 + 10 + 280]
    assert len(per_shard) == 5 and all(f.endswith("-of-00005.safetensors") for f in per_shard)
