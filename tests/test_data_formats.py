"""Data files in every supported form (JSON lines, JSON arrays, CSV, Parquet, Arrow), records in
every form (OpenAI, ShareGPT, alpaca, TRL, text), LLaMA-Factory's dataset_info.json, folders, and
exact resume for each reader. Every file is written by the test."""

from __future__ import annotations

import csv
import itertools
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import same, segment_tokens, take

from k2jax.data.chat import encode_chat
from k2jax.data.dataset import DataConfig, DataError, PackedBatches, validate_data
from k2jax.data.formats import RecordFormat, Text
from k2jax.data.readers import Records, _JsonArray
from k2jax.data.testing import write_tiny_tokenizer
from k2jax.data.tokenizer import KimiTokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    return KimiTokenizer.from_dir(path)


def chat(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f'Question {i}: "[{{,]}}" \\ é?'},
            {"role": "assistant", "content": f"Arr, {i}." + " ho" * (i % 5)},
        ]
    }


RECORDS = [chat(i) for i in range(30)]


def write(path, records, form: str):
    """`records` (dicts) in one file form."""
    if form == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif form == "json":  # pretty-printed: elements span lines
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False))
    elif form == "csv":
        keys = list(records[0])
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(keys)
            for r in records:
                w.writerow([v if isinstance(v, str) else json.dumps(v) for v in r.values()])
    elif form == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=4)
    elif form == "arrow":  # the stream format, as datasets.save_to_disk writes it
        table = pa.Table.from_pylist(records)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    return path


def cfg(path, **kw) -> DataConfig:
    kw = {"seq_len": 128, "batch_size": 2, "template": "kimi_k2", **kw}
    return DataConfig(path=str(path) if not isinstance(path, tuple) else path, **kw)


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["jsonl", "json", "csv", "parquet", "arrow"])
def test_every_file_form_reads_the_same_records(tmp_path, form, monkeypatch):
    monkeypatch.setattr(_JsonArray, "_CHUNK", 7)  # strings and elements straddle chunks
    records = [{"id": str(i), **chat(i)} for i in range(9)]
    r = Records.open(write(tmp_path / f"d.{form}", records, form))
    got = [r.read(i) for i in range(len(r))]
    if form == "csv":  # CSV values are strings; formats decodes the JSON-valued columns
        got = [{**g, "messages": json.loads(g["messages"])} for g in got]
    assert got == records
    if form == "json":  # each element's first line
        lines = (tmp_path / "d.json").read_text().splitlines()
        starts = [n for n, line in enumerate(lines, 1) if line == "  {"]
        assert [r.where(i) for i in range(len(r))] == [f"{tmp_path / 'd.json'}:{n}" for n in starts]
    if form == "parquet":
        assert r.where(5) == f"{tmp_path / 'd.parquet'}:row 5"
    r.close()


def test_json_array_edge_cases(tmp_path):
    (tmp_path / "empty.json").write_text(" [ ] ")
    with pytest.raises(DataError, match="no records"):
        PackedBatches(cfg(tmp_path / "empty.json"), None)
    # A .json file that does not start with "[" is JSON lines (as datasets reads it).
    (tmp_path / "lines.json").write_text(json.dumps(chat(1)) + "\n" + json.dumps(chat(2)) + "\n")
    assert len(Records.open(tmp_path / "lines.json")) == 2
    # A bad element is a bad record at its line; the others are read.
    (tmp_path / "one_bad.json").write_text('[\n{"messages": [1,]},\n' + json.dumps(chat(0)) + "\n]")
    r = Records.open(tmp_path / "one_bad.json")
    with pytest.raises(DataError, match=r"one_bad.json:2: invalid JSON"):
        r.read(0)
    assert r.read(1) == chat(0)


@pytest.mark.parametrize(
    "text, line, what",
    [
        ('[{"a": 1},\n{"b": "never ends}]', 2, "a string that never ends"),
        ('[{"a": 1},\n{"b": 2}', 2, "the top-level array never ends"),
        ('[{"a": 1}]\n\n{"b": 2}', 3, "data after the end of the top-level array"),
        ('[{"a": 1}] x', 1, "data after the array"),
        ('[{"a": 1},\n\n , {"b": 2}]', 3, "an empty array element"),
    ],
)
def test_a_broken_json_array_names_file_line_and_what(tmp_path, text, line, what):
    (tmp_path / "d.json").write_text(text)
    with pytest.raises(DataError, match=rf"d.json:{line}: invalid JSON: {what}"):
        Records.open(tmp_path / "d.json")


def test_csv_records_and_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n"two\nlines",ok\n\nshort\n"x","y"\n', encoding="utf-8")
    r = Records.open(path)
    assert [r.where(i) for i in range(len(r))] == [f"{path}:{n}" for n in (2, 5, 6)]
    assert r.read(0) == {"instruction": "two\nlines", "output": "ok"}
    with pytest.raises(DataError, match=r"d.csv:5: invalid CSV: 1 fields, the header has 2"):
        r.read(1)


def test_parquet_is_read_by_row_group_and_shuffled_by_block(tmp_path, tok):
    records = [chat(i) for i in range(3000)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=300)
    r = Records.open(path)
    assert r.blocks().tolist() == [0, 1200, 2400]  # >= 1,024 rows a block
    from k2jax.data.mixture import EpochOrder, open_sources

    c = cfg(path, seed=3)
    order = EpochOrder(open_sources(c), c)
    visit = [order.at(0, p)[1] for p in range(3000)]
    assert sorted(visit) == list(range(3000)) and visit != list(range(3000))
    blocks = [v // 1200 for v in visit]  # each block visited in one run
    assert sum(a != b for a, b in itertools.pairwise(blocks)) == 2


# --------------------------------------------------------------------------------------------------
# Record forms
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def one(tmp_path, tok):
    """one(record, **data knobs) -> the single example's (tokens, loss weights)."""

    def run(record, **kw):
        path = tmp_path / "one.jsonl"
        path.write_text(json.dumps(record) + "\n")
        b = next(PackedBatches(cfg(path, num_epochs=1, batch_size=1, **kw), tok))
        n = int((b["segment_ids"][0] > 0).sum())
        return b["tokens"][0, :n].tolist(), b["loss_mask"][0, : n - 1].tolist()

    return run


def expected(tok, messages, **kw):
    ex = encode_chat(messages, tok, "kimi_k2", **kw)
    return ex.tokens.tolist(), ex.loss_weights[1:].tolist()


SYSTEM = {"role": "system", "content": "Be brief."}


def test_alpaca_is_system_history_then_instruction_and_input(tok, one):
    record = {
        "instruction": "Add",
        "input": "2 and 3",
        "output": "5",
        "system": "Be brief.",
        "history": [["Hi", "Hello"]],
    }
    messages = [
        SYSTEM,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Add\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert one(record) == expected(tok, messages)


def test_trl_prompt_completion_messages_learn_the_completion_only(tok, one):
    shots = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]
    record = {
        "prompt": [*shots, {"role": "user", "content": "2+2"}],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    tokens, weights = one(record)
    messages = [*shots, {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    want_tokens, _ = expected(tok, messages)
    assert tokens == want_tokens
    learned = tok.decode([t for t, w in zip(tokens[1:], weights) if w])
    assert learned == "4<|im_end|>"  # not the few-shot answer "2"


def test_trl_strings_and_text_are_plain_language_modelling(tok, one):
    tokens, weights = one({"prompt": "The sea is", "completion": " wide."})
    assert tokens == [*tok.encode("The sea is"), *tok.encode(" wide."), tok.eos_id]
    n_prompt = len(tok.encode("The sea is"))
    assert weights == [0.0] * (n_prompt - 1) + [1.0] * (len(tokens) - n_prompt)
    tokens, weights = one({"text": "The sea is wide."})
    assert tokens == [*tok.encode("The sea is wide."), tok.eos_id] and set(weights) == {1.0}
    assert RecordFormat().parse({"text": "t", "id": 1}, "w").unused == ("id",)


def test_declared_sharegpt_tags_map_roles(tok, one, tmp_path):
    record = {
        "dialog": [
            {"speaker": "boss", "says": "Be brief."},
            {"speaker": "me", "says": "Hi"},
            {"speaker": "bot", "says": "Hello"},
        ]
    }
    tags = {
        "role_tag": "speaker",
        "content_tag": "says",
        "user_tag": "me",
        "assistant_tag": "bot",
        "system_tag": "boss",
    }
    messages = [
        SYSTEM,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    got = one(record, formatting="sharegpt", columns={"messages": "dialog"}, tags=tags)
    assert got == expected(tok, messages)
    bad = {"dialog": [{"speaker": "stranger", "says": "x"}]}
    with pytest.raises(
        DataError,
        match=r"one.jsonl:1: unknown role: dialog\[0\].speaker = 'stranger' \(expected one of me, bot",
    ):
        one(
            bad,
            formatting="sharegpt",
            columns={"messages": "dialog"},
            tags=tags,
            on_bad_example="error",
        )


def test_a_format_mapping_is_checked_where_it_is_given(tmp_path):
    for kw, match in [
        ({"columns": {"prompt": "q"}}, "need a declared formatting"),
        ({"formatting": "alpaca", "columns": {"videos": "v"}}, "still images only"),
        ({"formatting": "alpaca", "columns": {"promt": "q"}}, "unknown key 'promt'"),
        ({"formatting": "sharegpt", "tags": {"role": "r"}}, "unknown key 'role'"),
        ({"formatting": "markdown"}, "data.formatting: expected"),
    ]:
        with pytest.raises(Exception, match=match):
            cfg(tmp_path / "x.jsonl", **kw)


# --------------------------------------------------------------------------------------------------
# dataset_info.json and folders
# --------------------------------------------------------------------------------------------------


def write_dataset_info(folder):
    """A dataset_info.json in the shape LLaMA-Factory's data/README.md documents, with one alpaca
    entry (renamed columns), one sharegpt entry (OpenAI tags) and one pre-training entry."""
    alpaca = [{"q": f"Say {i}", "a": f"{i}!", "sys": "Be brief."} for i in range(6)]
    write(folder / "alpaca.json", alpaca, "json")
    write(folder / "chats.parquet", RECORDS[:6], "parquet")
    write(folder / "pt.jsonl", [{"text": f"Document {i}."} for i in range(6)], "jsonl")
    info = {
        "my_alpaca": {
            "file_name": "alpaca.json",
            "columns": {"prompt": "q", "response": "a", "system": "sys"},
        },
        "my_chats": {
            "file_name": "chats.parquet",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        },
        "my_pt": {"file_name": "pt.jsonl", "columns": {"prompt": "text"}},
        "on_the_hub": {"hf_hub_url": "someone/something"},
        "pairs": {"file_name": "alpaca.json", "ranking": True},
    }
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return folder / "dataset_info.json"


def test_dataset_info_json_names_datasets(tmp_path, tok):
    info = write_dataset_info(tmp_path)
    for path in (info, tmp_path):  # the file, or the folder holding it (dataset_dir)
        c = cfg(path, dataset="my_alpaca, my_chats,my_pt", shuffle=False, num_epochs=1)
        it = PackedBatches(c, tok)
        segs = segment_tokens(list(it))
        assert len(segs) == 18
        assert it.last_epoch_summary.startswith(
            "epoch 0 of my_alpaca, my_chats, my_pt: 18 examples"
        )
    first = tok.decode(segs[0])
    assert (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Say 0"
        in first
    )
    assert tok.decode(segs[-1]) == "Document 5.[EOS]"
    assert validate_data(cfg(info, dataset=("my_chats",))).lines == 6
    for name, match in [
        ("nothing", r"no dataset 'nothing' \(it has 'my_alpaca'"),
        ("on_the_hub", "hf_hub_url: k2jax reads local files only"),
        ("pairs", "ranking = True is not supported"),
    ]:
        with pytest.raises(DataError, match=match):
            PackedBatches(cfg(info, dataset=name), tok)


def test_a_folder_reads_every_supported_file_and_names_the_rest(tmp_path, tok, caplog):
    write(tmp_path / "a.jsonl", RECORDS[:2], "jsonl")
    write(tmp_path / "b.json", RECORDS[2:4], "json")
    write(tmp_path / "c.parquet", RECORDS[4:6], "parquet")
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING, logger="k2jax.data.readers"):
        it = PackedBatches(cfg(tmp_path, shuffle=False, num_epochs=1, batch_size=1), tok)
    assert any(
        "not read" in r.getMessage() and "README.md, sub/" in r.getMessage() for r in caplog.records
    )
    want = [tuple(encode_chat(r["messages"], tok, "kimi_k2").tokens.tolist()) for r in RECORDS[:6]]
    assert segment_tokens(list(it)) == want
    (tmp_path / "d.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="compressed files cannot be read by offset: d.jsonl.gz"):
        PackedBatches(cfg(tmp_path), tok)
    (tmp_path / "d.jsonl.gz").unlink()
    (tmp_path / "dataset_info.json").write_text("{}")
    with pytest.raises(
        DataError, match="has a dataset_info.json: name its datasets with data.dataset"
    ):
        PackedBatches(cfg(tmp_path), tok)
    (tmp_path / "x.txt").write_text("{}\n")
    with pytest.raises(DataError, match=r"x.txt: unsupported file: expected one of .jsonl"):
        PackedBatches(cfg(tmp_path / "x.txt"), tok)


# --------------------------------------------------------------------------------------------------
# Resume, for every reader
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["json", "csv", "parquet", "arrow"])
def test_every_form_streams_and_resumes_like_json_lines(tmp_path, tok, form):
    jsonl = write(tmp_path / "d.jsonl", RECORDS, "jsonl")
    other = write(tmp_path / f"d.{form}", RECORDS, form)
    plain = list(PackedBatches(cfg(jsonl, shuffle=False, num_epochs=1), tok))
    assert same(list(PackedBatches(cfg(other, shuffle=False, num_epochs=1), tok)), plain)
    c = cfg(other, seed=5)
    straight = take(PackedBatches(c, tok), 12)  # crosses epoch ends
    first = PackedBatches(c, tok)
    head = take(first, 5)
    state = json.loads(json.dumps(first.state()))
    assert same(head + take(PackedBatches(c, tok, state=state), 7), straight)


def test_text_record_type_is_checked():
    with pytest.raises(DataError, match=r"w: invalid message: 'text' must be a string"):
        RecordFormat().parse({"text": 3}, "w")
    assert RecordFormat().parse({"text": "x"}, "w").example == Text("x")


def test_csv_cells_decode_json_and_empty_cells_are_absent(tmp_path, tok):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output", "history"])
        w.writerow(["Add", "", "5", ""])
        w.writerow(["Add", "2 and 3", "5", json.dumps([["Hi", "Hello"]])])
    it = PackedBatches(cfg(path, shuffle=False, num_epochs=1, batch_size=1), tok)
    first, second = (tok.decode(s) for s in segment_tokens(list(it)))
    assert "<|im_user|>user<|im_middle|>Add<|im_end|>" in first
    assert "Hi<|im_end|><|im_assistant|>assistant<|im_middle|>Hello" in second
