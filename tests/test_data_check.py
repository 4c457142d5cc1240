"""The data check (`validate_data`): every line of the data checked before the tokenizer, the
model or the compiler is touched, with the stream's own reasons and counts."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from k2jax.data import DEMO_CHATS, DataCheck, validate_data
from k2jax.data import dataset as dataset_module
from k2jax.data.dataset import DataConfig, DataError, packed_batches
from k2jax.data.testing import write_tiny_tokenizer
from k2jax.data.tokenizer import KimiTokenizer

HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr, hello!"}]
GOOD = json.dumps({"messages": HI})

# One line of every kind the check finds, each with the reason the stream gives it.
BAD_LINES = {
    "invalid JSON": '{"messages": [',
    "unknown format": '{"txt": "hello"}',
    "unknown role": json.dumps({"messages": [{"role": "robot", "content": "x"}, HI[1]]}),
    "missing content": json.dumps({"messages": [{"role": "user"}, HI[1]]}),
    "no assistant turn": json.dumps({"messages": [HI[0]]}),
    "invalid message": json.dumps({"messages": [HI[0], {"role": "assistant", "content": 3}]}),
    "unanswerable tool result": json.dumps(
        {"messages": [HI[0], {"role": "tool", "content": "r"}, HI[1]]}
    ),
    "unsupported content": json.dumps(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]},
                HI[1],
            ]
        }
    ),
    "invalid tools": json.dumps({"tools": {"f": 1}, "messages": HI}),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    return KimiTokenizer.from_dir(path)


def write_lines(path, lines: list[str | bytes]):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **{"seq_len": 128, "batch_size": 2, **kw})


@pytest.fixture
def messy(tmp_path):
    """Good lines around one bad line of every kind, an invalid-UTF-8 line, blank lines, and an
    example too long for seq_len 128 (which only the tokenizing stream can find)."""
    long = json.dumps({"messages": [{"role": "user", "content": "word " * 300}, HI[1]]})
    lines: list[str | bytes] = [GOOD, "", "   "]
    for bad in BAD_LINES.values():
        lines += [bad, GOOD]
    lines += [b'{"messages": "\xff"}', long, GOOD]
    return write_lines(tmp_path / "messy.jsonl", lines)


def test_error_mode_raises_the_first_bad_line_before_any_tokenizer(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD] * 5000 + [BAD_LINES["unknown role"], "{"])
    with pytest.raises(DataError, match=r"d.jsonl:5001: unknown role: message 0: .*'robot'"):
        validate_data(cfg(path, on_bad_example="error"))


def test_skip_mode_counts_what_the_stream_will_skip(tok, messy, caplog):
    with caplog.at_level(logging.INFO, logger="k2jax.data.dataset"):
        check = validate_data(cfg(messy))
    records = list(caplog.records)
    expected = {reason: 1 for reason in BAD_LINES} | {"invalid UTF-8": 1}
    assert isinstance(check, DataCheck)
    assert check.skipped == expected
    assert (check.lines, check.usable) == (22, 12)  # blank lines are not lines
    # The stream skips exactly these lines, and the too-long example the check cannot see.
    it = packed_batches(cfg(messy, shuffle=False, num_epochs=1), tok)
    list(it)
    assert it.last_epoch_summary.endswith(
        "11 examples, 11 skipped ("
        + ", ".join(f"{r}: {n}" for r, n in sorted((expected | {"too long": 1}).items()))
        + ")"
    )
    # Each bad line is logged with its file:line, then the counts in one line.
    wheres = {e.where: e.reason for e in check.first_bad}
    assert wheres == {f"{messy}:{4 + 2 * k}": r for k, r in enumerate(BAD_LINES)} | {
        f"{messy}:22": "invalid UTF-8"
    }
    logged = [r.getMessage() for r in records]
    for where, reason in wheres.items():
        assert any(f"{where}: {reason}" in m for m in logged)
    assert logged[-1].startswith(
        "data check: 22 lines, 10 will be skipped (invalid JSON: 1, invalid UTF-8: 1, "
    )
    assert records[-1].levelno == logging.WARNING


def test_only_the_first_bad_lines_are_logged_one_by_one(tmp_path, caplog):
    path = write_lines(tmp_path / "d.jsonl", [GOOD] + ["{"] * 25)
    with caplog.at_level(logging.INFO, logger="k2jax.data.dataset"):
        check = validate_data(cfg(path))
    assert check.skipped == {"invalid JSON": 25} and len(check.first_bad) == 10
    assert sum(": invalid JSON: " in r.getMessage() for r in caplog.records) == 10
    assert any("further bad lines are only counted" in r.getMessage() for r in caplog.records)
    assert "26 lines, 25 will be skipped (invalid JSON: 25)" in caplog.records[-1].getMessage()


def test_the_check_leaves_the_stream_alone(tok, messy):
    c = cfg(messy, seed=3)
    before = packed_batches(c, tok)
    first = [next(before) for _ in range(3)]
    validate_data(c)
    after = packed_batches(c, tok)
    again = [next(after) for _ in range(3)]
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    assert before.state() == after.state()  # the same fingerprint and position


def test_no_usable_line_is_an_error_in_both_modes(tmp_path):
    bad = write_lines(tmp_path / "bad.jsonl", ["{", BAD_LINES["no assistant turn"]])
    with pytest.raises(DataError, match=r"no usable examples: data check: 2 lines, 2 will be"):
        validate_data(cfg(bad))
    with pytest.raises(DataError, match=r"bad.jsonl:1: invalid JSON"):
        validate_data(cfg(bad, on_bad_example="error"))
    empty = write_lines(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(DataError, match="no data"):
        validate_data(cfg(empty))
    with pytest.raises(DataError, match="not found"):
        validate_data(cfg(tmp_path / "missing.jsonl"))


def test_a_folder_names_each_file(tmp_path):
    write_lines(tmp_path / "a.jsonl", [GOOD, GOOD])
    write_lines(tmp_path / "b.jsonl", [GOOD, BAD_LINES["missing content"]])
    check = validate_data(cfg(tmp_path))
    assert (check.lines, check.skipped) == (4, {"missing content": 1})
    assert check.first_bad[0].where == f"{tmp_path / 'b.jsonl'}:2"


def test_demo_data_is_clean():
    check = validate_data(cfg(DEMO_CHATS))
    assert check.skipped == {} and check.lines == len(DEMO_CHATS.read_text().splitlines())
    assert check.summary().startswith(f"data check: {check.lines:,} lines (")


def test_progress_bar_only_for_large_inputs(tmp_path, monkeypatch, capsys):
    path = write_lines(tmp_path / "d.jsonl", [GOOD] * 50)
    validate_data(cfg(path), progress=True)
    assert "data check" not in capsys.readouterr().err  # below the size that gets a bar
    monkeypatch.setattr(dataset_module, "_PROGRESS_MIN_LINES", 10)
    validate_data(cfg(path), progress=True)
    assert "data check: 100%" in capsys.readouterr().err
    validate_data(cfg(path))  # None: stderr is not a terminal under pytest
    validate_data(cfg(path), progress=False)
    assert "data check" not in capsys.readouterr().err
