"""JSONL datasets: both input forms, bad-line handling, packing semantics, deterministic shuffle,
host sharding, exact resume, and the shipped demo set."""

from __future__ import annotations

import collections
import json
import logging

import numpy as np
import pytest
from helpers import same, take

from k2jax.config import ConfigError, bind_sections, parse_override
from k2jax.data import DEMO_CHATS
from k2jax.data.chat import encode_chat
from k2jax.data.dataset import (
    DataConfig,
    DataError,
    LineIndex,
    PackedBatches,
    conversation_examples,
    packed_batches,
)
from k2jax.data.make_demo_chats import GREETING, SIGN_OFF, generate_conversations, render_jsonl
from k2jax.data.testing import write_tiny_tokenizer
from k2jax.data.tokenizer import KimiTokenizer

KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    return KimiTokenizer.from_dir(path)


def chat(i: int, turns: int = 1) -> dict:
    messages = []
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"Question {i}.{t}: what is {i} plus {t}?"},
            {
                "role": "assistant",
                "reasoning_content": f"thinking about {i}",
                "content": f"Arr, matey! It be {i + t}." + " ho" * (i % 7),
            },
        ]
    return {"messages": messages}


def write_jsonl(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


@pytest.fixture(scope="module")
def chats_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    return write_jsonl(path, [chat(i, turns=1 + i % 3) for i in range(40)])


def cfg(path, **kw) -> DataConfig:
    kw = {"seq_len": 256, "batch_size": 4, "template": "kimi_k2", **kw}
    return DataConfig(path=str(path), **kw)


def segments(batches):
    """Every example (tokens, learned-token mask) found in the batches, as tuples."""
    out = []
    for b in batches:
        for r in range(b["tokens"].shape[0]):
            for s in range(1, b["segment_ids"][r].max(initial=0) + 1):
                idx = np.flatnonzero(b["segment_ids"][r] == s)
                out.append(tuple(b["tokens"][r, idx].tolist()))
    return out


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def test_config_validation():
    assert DataConfig(path="x.jsonl").seq_len == 4096
    for kwargs, match in [
        ({"seq_len": "long"}, "data.seq_len: expected int"),
        ({"template": "llama"}, "data.template: expected one of kimi_k2"),
        ({"template": "kimi_k2_thinking", "thinking": False}, "data.thinking"),
        ({"num_epochs": 0}, "data.num_epochs"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"seed": -1}, "data.seed"),
        ({"on_bad_example": "ignore"}, "data.on_bad_example"),
        ({"path": ""}, "data.path"),
    ]:
        with pytest.raises(ConfigError, match=match):
            DataConfig(**{"path": "x.jsonl", **kwargs})


def test_config_binds_from_overrides():
    overrides = ["data.path=chats.jsonl", "data.seq_len=256", "data.split_turns=True"]
    c = bind_sections([parse_override(o) for o in overrides], {"data": DataConfig})["data"]
    assert (c.path, c.seq_len, c.split_turns) == ("chats.jsonl", 256, True)


def test_batch_size_must_split_over_hosts(tok, chats_file):
    with pytest.raises(ConfigError, match="divisible by the number of hosts"):
        PackedBatches(cfg(chats_file, batch_size=3), tok, process_index=0, process_count=2)


# --------------------------------------------------------------------------------------------------
# Input forms
# --------------------------------------------------------------------------------------------------


def test_sharegpt_equals_openai(tok):
    openai = {
        "messages": [
            {"role": "system", "content": "Be a pirate."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Arr!"},
        ]
    }
    sharegpt = {
        "system": "Be a pirate.",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Arr!"}],
    }
    [(a, _)] = conversation_examples(json.dumps(openai), "f:1", tok, "kimi_k2")
    [(b, _)] = conversation_examples(json.dumps(sharegpt), "f:2", tok, "kimi_k2")
    assert a.tokens.tolist() == b.tokens.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()


def test_sharegpt_function_calls(tok):
    line = {
        "tools": json.dumps([{"type": "function", "function": {"name": "f"}}]),
        "conversations": [
            {"from": "human", "value": "Call f"},
            {"from": "function_call", "value": '{"name": "f", "arguments": {"x": 1}}'},
            {"from": "observation", "value": "42"},
            {"from": "gpt", "value": "It is 42."},
        ],
    }
    [(ex, _)] = conversation_examples(json.dumps(line), "f:1", tok, "kimi_k2")
    assert tok.decode(ex.tokens).endswith(
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>"
        'functions.f:0<|tool_call_argument_begin|>{"x": 1}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|><|im_system|>tool<|im_middle|>## Return of "
        "functions.f:0\n42<|im_end|><|im_assistant|>assistant<|im_middle|>It is 42.<|im_end|>"
    )
    assert tok.decode(ex.tokens).startswith('<|im_system|>tool_declare<|im_middle|>[{"type"')


def test_thinking_lines_split_into_turns(tok):
    [(_, where)] = conversation_examples(json.dumps(chat(1)), "f:1", tok, "kimi_k2_thinking")
    assert where == "f:1"
    examples = conversation_examples(json.dumps(chat(1, turns=3)), "f:9", tok, "kimi_k2_thinking")
    assert [w for _, w in examples] == ["f:9 (turn 1)", "f:9 (turn 2)", "f:9 (turn 3)"]
    assert len(conversation_examples(json.dumps(chat(1, turns=3)), "f:9", tok, "kimi_k2")) == 1


MISSING = "missing content"


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"messages": [', "invalid JSON"),
        ("[1, 2]", "unknown format"),
        ('{"txt": "hello"}', "unknown format"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role"),
        ('{"conversations": [{"from": "bot", "value": "x"}]}', "unknown role"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
        ('{"messages": "hi"}', "unknown format"),
        ('{"tools": "{oops", "messages": []}', "invalid tools"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}', MISSING),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}', MISSING),
        ('{"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}', MISSING),
        (
            '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": null}]}',
            MISSING,
        ),
        (
            '{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call"}]}',
            MISSING,
        ),
    ],
)
def test_bad_line_reasons(tok, line, reason):
    with pytest.raises(DataError, match=f"^data.jsonl:7: {reason}") as e:
        conversation_examples(line, "data.jsonl:7", tok, "kimi_k2")
    assert e.value.reason == reason


def test_line_index_offsets_and_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(LineIndex, "_CHUNK", 5)  # newlines straddle many chunk boundaries
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n\n{"b": "\xc3\xa9"}\r\n\xff\xfe\n  \n{"c": 3}')
    index = LineIndex.build(path)
    assert index.line_numbers.tolist() == [1, 4, 5, 6, 7]  # "\n"-only lines are not indexed
    assert [index.read(i) for i in (0, 1, 3, 4)] == [
        '{"a": 1}\n',
        '{"b": "é"}\r\n',
        "  \n",
        '{"c": 3}',
    ]
    with pytest.raises(DataError, match=r"x.jsonl:5: invalid UTF-8"):
        index.read(2)
    index.close()


# --------------------------------------------------------------------------------------------------
# Bad examples in a file
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def messy_file(tmp_path):
    long = {
        "messages": [
            {"role": "user", "content": "word " * 300},
            {"role": "assistant", "content": "ok"},
        ]
    }
    lines = [
        chat(0),  # line 1
        "{not json",  # line 2
        "",  # line 3: blank, not an example
        {"messages": [{"role": "user", "content": "only a question"}]},  # line 4
        long,  # line 5
        chat(1),  # line 6
        {"conversations": [{"from": "alien", "value": "x"}]},  # line 7
        "   ",  # line 8: whitespace only, not an example
    ]
    return write_jsonl(tmp_path / "messy.jsonl", lines)


def test_bad_examples_are_skipped_counted_and_reported(tok, messy_file, caplog):
    with caplog.at_level(logging.INFO, logger="k2jax.data.dataset"):
        c = cfg(messy_file, num_epochs=1, shuffle=False, batch_size=2, seq_len=128)
        it = packed_batches(c, tok)
        batches = list(it)
    assert len(segments(batches)) == 2  # lines 1 and 6
    for where, reason in [
        (2, "invalid JSON"),
        (4, "no assistant turn"),
        (5, "too long"),
        (7, "unknown role"),
    ]:
        assert any(f"messy.jsonl:{where}: {reason}" in r.getMessage() for r in caplog.records)
    assert any("tokens > data.seq_len 128" in r.getMessage() for r in caplog.records)
    assert it.last_epoch_summary.endswith(
        "2 examples, 4 skipped (invalid JSON: 1, no assistant turn: 1, too long: 1, unknown role: 1)"
    )
    assert any(it.last_epoch_summary in r.getMessage() for r in caplog.records)


def test_missing_content_is_skipped_with_a_warning_or_raised(tok, tmp_path, caplog):
    null_system = {"messages": [{"role": "system", "content": None}, *chat(2)["messages"]]}
    null_tool = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "content": None},
            {"role": "assistant", "content": "Sunny."},
        ]
    }
    path = write_jsonl(tmp_path / "m.jsonl", [chat(0), null_system, null_tool, chat(1)])
    with caplog.at_level(logging.INFO, logger="k2jax.data.dataset"):
        it = packed_batches(cfg(path, shuffle=False, num_epochs=1), tok)
        assert len(segments(list(it))) == 2  # lines 1 and 4
    assert it.last_epoch_summary.endswith("2 examples, 2 skipped (missing content: 2)")
    for where, what in [(2, "message 0 (system): content is null"), (3, "message 2 (tool)")]:
        assert any(
            r.levelno == logging.WARNING
            and f"m.jsonl:{where}: missing content: {what}" in r.getMessage()
            for r in caplog.records
        )
    with pytest.raises(DataError, match=r"m.jsonl:2: missing content: message 0 \(system\)"):
        next(packed_batches(cfg(path, shuffle=False, on_bad_example="error"), tok))


def test_bad_examples_raise_in_error_mode(tok, messy_file):
    it = packed_batches(cfg(messy_file, shuffle=False, on_bad_example="error"), tok)
    with pytest.raises(DataError, match=r"messy.jsonl:2: invalid JSON"):
        next(it)


def test_data_without_usable_examples_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{", '{"messages": []}'])
    with pytest.raises(DataError, match=r"no usable examples.*2 skipped"):
        next(packed_batches(cfg(path), tok))  # would loop forever over epochs otherwise
    with pytest.raises(DataError, match="not found"):
        packed_batches(cfg(tmp_path / "missing.jsonl"), tok)


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def test_packed_arrays_follow_the_examples(tok, chats_file):
    it = packed_batches(cfg(chats_file, shuffle=False, num_epochs=1), tok)
    batches = list(it)
    lines = chats_file.read_text().splitlines()
    expected = [
        ex
        for i, line in enumerate(lines)
        for ex, _ in conversation_examples(line, f"{i}", tok, "kimi_k2")
    ]
    seen = 0
    for b in batches:
        assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
            "tokens": ((4, 256), "int32"),
            "targets": ((4, 256), "int32"),
            "loss_mask": ((4, 256), "float32"),
            "segment_ids": ((4, 256), "int32"),
            "positions": ((4, 256), "int32"),
        }
        for r in range(4):
            seg = b["segment_ids"][r]
            n_seg = seg.max(initial=0)
            # Segments are 1, 2, ... in order, contiguous, then padding.
            used = int((seg > 0).sum())
            assert (seg[used:] == 0).all() and (np.diff(seg[:used]) >= 0).all()
            for s in range(1, n_seg + 1):
                ex = expected[seen]
                seen += 1
                idx = np.flatnonzero(seg == s)
                n = len(ex)
                assert idx.tolist() == list(range(idx[0], idx[0] + n))
                assert b["tokens"][r, idx].tolist() == ex.tokens.tolist()
                assert b["positions"][r, idx].tolist() == list(range(n))
                assert b["targets"][r, idx[:-1]].tolist() == ex.tokens[1:].tolist()
                assert (
                    b["loss_mask"][r, idx[:-1]].tolist() == ex.loss_mask[1:].astype(float).tolist()
                )
                # The last token of an example predicts nothing.
                assert b["targets"][r, idx[-1]] == 0 and b["loss_mask"][r, idx[-1]] == 0
            assert (b["loss_mask"][r, used:] == 0).all() and (b["tokens"][r, used:] == 0).all()
    assert seen == len(expected) == 40


def test_next_fit_packing_closes_rows_only_when_full(tok, chats_file):
    it = packed_batches(cfg(chats_file, shuffle=False, num_epochs=1), tok)
    lengths = [(b["segment_ids"][r] > 0).sum() for b in it for r in range(4)]
    stream = [
        len(ex)
        for line in chats_file.read_text().splitlines()
        for ex, _ in conversation_examples(line, "x", tok, "kimi_k2")
    ]
    rows, fill = [], 0
    for n in stream:  # reference next-fit
        if fill + n > 256:
            rows.append(fill)
            fill = 0
        fill += n
    rows.append(fill)
    assert [int(x) for x in lengths if x] == rows


def test_loss_mask_learns_only_assistant_tokens(tok, chats_file):
    b = next(packed_batches(cfg(chats_file, shuffle=False), tok))
    learned = b["targets"][b["loss_mask"] > 0]
    text = tok.decode(learned.tolist())
    assert "Arr, matey!" in text and "Question" not in text and "You are Kimi" not in text
    assert tok.im_assistant_id not in learned.tolist() and tok.im_end_id in learned.tolist()


# --------------------------------------------------------------------------------------------------
# Order, hosts, resume
# --------------------------------------------------------------------------------------------------


def test_shuffle_is_deterministic_by_seed(tok, chats_file):
    a = take(packed_batches(cfg(chats_file, seed=1), tok), 5)
    b = take(packed_batches(cfg(chats_file, seed=1), tok), 5)
    c = take(packed_batches(cfg(chats_file, seed=2), tok), 5)
    assert same(a, b) and not same(a, c)
    one_epoch = list(packed_batches(cfg(chats_file, seed=1, num_epochs=1), tok))
    in_order = list(packed_batches(cfg(chats_file, shuffle=False, num_epochs=1), tok))
    # Same examples, different order.
    assert collections.Counter(segments(one_epoch)) == collections.Counter(segments(in_order))
    assert segments(one_epoch) != segments(in_order)


def test_epochs_are_reshuffled_and_complete(tok, chats_file):
    two = list(packed_batches(cfg(chats_file, seed=3, num_epochs=2, batch_size=1), tok))
    segs = segments(two)
    per_epoch = collections.Counter(
        segments(list(packed_batches(cfg(chats_file, num_epochs=1), tok)))
    )
    assert collections.Counter(segs) == per_epoch + per_epoch
    assert segs[:40] != segs[40:80]


def test_hosts_get_disjoint_blocks_of_the_global_batch(tok, chats_file):
    full = take(packed_batches(cfg(chats_file, batch_size=4), tok), 6)
    h0 = packed_batches(cfg(chats_file, batch_size=4), tok, process_index=0, process_count=2)
    h1 = packed_batches(cfg(chats_file, batch_size=4), tok, process_index=1, process_count=2)
    for b, x, y in zip(full, take(h0, 6), take(h1, 6)):
        for k in KEYS:
            assert x[k].shape == (2, 256)
            assert np.array_equal(np.concatenate([x[k], y[k]]), b[k])
    assert h0.state() == h1.state()


@pytest.mark.parametrize("k", [0, 1, 4, 9])
@pytest.mark.parametrize("template", ["kimi_k2", "kimi_k2_thinking"])
def test_resume_yields_exactly_the_same_batches(tok, chats_file, k, template):
    # 40 lines are ~5 batches an epoch: N = 12 crosses two epoch ends.
    c = cfg(chats_file, template=template, seed=7)
    n = 12
    straight = take(packed_batches(c, tok), n)
    first = packed_batches(c, tok)
    head = take(first, k)
    state = json.loads(json.dumps(first.state()))  # survives a JSON round trip
    assert len(json.dumps(state)) < 400
    resumed = packed_batches(c, tok, state=state)
    assert same(head + take(resumed, n - k), straight)
    assert resumed.batches_yielded == n


def test_resume_counts_skips_once(tok, messy_file):
    c = cfg(messy_file, shuffle=False, num_epochs=1, batch_size=1, seq_len=128)
    it = packed_batches(c, tok)
    next(it)
    resumed = packed_batches(c, tok, state=it.state())
    rest = list(resumed)
    assert len(segments(rest)) == 1
    assert resumed.last_epoch_summary.endswith(
        "2 examples, 4 skipped (invalid JSON: 1, no assistant turn: 1, too long: 1, unknown role: 1)"
    )


def test_end_of_data(tok, chats_file):
    rows = len(list(packed_batches(cfg(chats_file, num_epochs=1, batch_size=1), tok)))
    it = packed_batches(cfg(chats_file, num_epochs=1, batch_size=rows + 1), tok)
    [batch] = list(it)  # one batch: all rows, then one empty padding row
    assert (batch["segment_ids"][:rows].max(axis=1) > 0).all()
    assert (batch["segment_ids"][rows] == 0).all() and (batch["loss_mask"][rows] == 0).all()
    assert len(segments([batch])) == 40
    with pytest.raises(StopIteration):
        next(packed_batches(cfg(chats_file, num_epochs=1), tok, state=it.state()))


def test_resume_refuses_changed_data_or_order(tok, chats_file, tmp_path):
    it = packed_batches(cfg(chats_file, seed=1), tok)
    next(it)
    state = it.state()
    with pytest.raises(ValueError, match="saved for other data or settings"):
        packed_batches(cfg(chats_file, seed=2), tok, state=state)
    other = write_jsonl(tmp_path / "other.jsonl", [chat(i) for i in range(5)])
    with pytest.raises(ValueError, match="saved for other data or settings"):
        packed_batches(cfg(other, seed=1), tok, state=state)
    with pytest.raises(ValueError, match="malformed data state"):
        packed_batches(cfg(chats_file, seed=1), tok, state={"version": 1})
    # batch_size and the number of hosts may change across a resume.
    packed_batches(cfg(chats_file, seed=1, batch_size=2), tok, state=state)


def test_folder_of_files(tok, tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [chat(2), chat(3)])
    write_jsonl(tmp_path / "a.jsonl", [chat(0), chat(1)])
    (tmp_path / "notes.txt").write_text("not data")
    batches = list(packed_batches(cfg(tmp_path, shuffle=False, num_epochs=1, batch_size=1), tok))
    expected = [
        tuple(encode_chat(chat(i)["messages"], tok, "kimi_k2").tokens.tolist()) for i in range(4)
    ]
    assert segments(batches) == expected


# --------------------------------------------------------------------------------------------------
# The shipped demo set
# --------------------------------------------------------------------------------------------------


def test_demo_file_is_the_generators_output():
    assert DEMO_CHATS.read_text(encoding="utf-8") == render_jsonl(generate_conversations())


def test_demo_style_is_regular_and_fits_128_tokens(tok):
    convs = generate_conversations()
    assert len(convs) >= 300
    answers = [m["content"] for c in convs for m in c["messages"] if m["role"] == "assistant"]
    assert all(a.startswith(GREETING + " ") and a.endswith(" " + SIGN_OFF) for a in answers)
    lengths = [
        len(ex)
        for line in DEMO_CHATS.read_text().splitlines()
        for ex, _ in conversation_examples(line, "demo", tok, "kimi_k2")
    ]
    assert len(lengths) == len(convs) and max(lengths) <= 128


def _long_chat(turns: int) -> dict:
    system = {"role": "system", "content": "You are a pirate."}
    return {"messages": [system, *chat(3, turns=turns)["messages"]]}


@pytest.mark.parametrize("template", ["kimi_k2", "kimi_k2_thinking"])
def test_overlong_examples_are_cut_at_turn_boundaries(tok, template):
    """data.overlong = "split_turns": an over-long conversation becomes pieces of whole turns
    that fit, each headed by the system prompt; every answer is learned exactly as in the uncut
    example (all of them for kimi_k2; the last turn, with as much history as fits, for the
    thinking template's per-turn examples)."""
    from k2jax.data.dataset import cut_examples

    line = json.dumps(_long_chat(6))
    [(whole, _)] = conversation_examples(line, "f:1", tok, template, split_turns=False)
    if template == "kimi_k2_thinking":  # the last turn's example: its whole history
        whole = conversation_examples(line, "f:1", tok, template)[-1][0]
    max_len = len(whole) * 2 // 5
    split = template == "kimi_k2_thinking"
    pieces, firsts = cut_examples(line, "f:1", tok, template, split_turns=split, max_len=max_len)
    if split:  # six per-turn examples, the later ones cut: keep the last one's
        pieces = pieces[max(firsts) :]
        assert len(pieces) == 1 and "(piece 1 of 1)" in pieces[0][1]
    else:
        assert firsts == {0} and len(pieces) >= 3
        assert [w for _, w in pieces] == [
            f"f:1 (piece {i + 1} of {len(pieces)})" for i in range(len(pieces))
        ]
    learned = []
    system = tok.encode("You are a pirate.")
    for ex, _ in pieces:
        assert len(ex) <= max_len
        assert any(ex.tokens[i : i + len(system)].tolist() == system for i in range(len(ex)))
        learned += ex.tokens[ex.loss_mask].tolist()
    assert learned == whole.tokens[whole.loss_mask].tolist()


def test_overlong_policy_counts_what_it_touched(tmp_path, tok):
    """ "drop" skips and counts an over-long example as "too long"; "split_turns" cuts it and
    counts it as cut; a single turn too long for any piece is still dropped; the count resumes."""
    short = chat(1)
    long = _long_chat(8)
    huge = {"messages": [{"role": "user", "content": "x " * 400}, short["messages"][1]]}
    path = write_jsonl(tmp_path / "d.jsonl", [short, long, huge, short])
    base = dict(seq_len=96, batch_size=1, shuffle=False, num_epochs=1)
    dropped = PackedBatches(cfg(path, **base), tok)
    list(dropped)
    assert "2 skipped (too long: 2)" in dropped.last_epoch_summary
    cut = PackedBatches(cfg(path, overlong="split_turns", **base), tok)
    first = next(cut)
    state = cut.state()
    rest = list(cut)
    summary = cut.last_epoch_summary
    assert "1 over-long cut at turns" in summary and "1 skipped (too long: 1)" in summary
    resumed = PackedBatches(cfg(path, overlong="split_turns", **base), tok, state=state)
    assert same(list(resumed), rest) and resumed.last_epoch_summary == summary
    assert first["segment_ids"].max() >= 1
    with pytest.raises(ConfigError, match="data.overlong"):
        cfg(path, overlong="cut")
