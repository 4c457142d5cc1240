"""The data knobs: what is learned (train_on_prompt, mask_history, per-message weight/train),
unknown keys (warned, or bad under data.strict), over-long examples (drop, split_turns,
truncate), mixtures of datasets and the val_size split — each deterministic and resumable."""

from __future__ import annotations

import collections
import json
import logging

import pytest
from helpers import same, segment_tokens, take

from k2jax.config import ConfigError
from k2jax.data.dataset import DataConfig, DataError, PackedBatches, validate_data
from k2jax.data.testing import write_tiny_tokenizer
from k2jax.data.tokenizer import KimiTokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    return KimiTokenizer.from_dir(path)


def user(text):
    return {"role": "user", "content": text}


def bot(text, **kw):
    return {"role": "assistant", "content": text, **kw}


def two_turns(first: dict | None = None, second: dict | None = None):
    return {
        "messages": [
            user("Hi"),
            bot("Arr!", **(first or {})),
            user("Bye"),
            bot("Ho!", **(second or {})),
        ]
    }


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def cfg(path, **kw) -> DataConfig:
    kw = {"seq_len": 128, "batch_size": 1, "template": "kimi_k2", **kw}
    return DataConfig(path=path if isinstance(path, tuple) else str(path), **kw)


@pytest.fixture
def learned(tmp_path, tok):
    """learned(record, **knobs) -> [(decoded target, weight)] of the record's first example."""

    def run(record, **kw):
        path = write_jsonl(tmp_path / "one.jsonl", [record])
        b = next(PackedBatches(cfg(path, num_epochs=1, **kw), tok))
        w = b["loss_mask"][0]
        return [(tok.decode([int(t)]), float(x)) for t, x in zip(b["targets"][0], w) if x > 0]

    return run


def text_of(pairs, weight=None):
    return "".join(t for t, w in pairs if weight is None or w == weight)


# --------------------------------------------------------------------------------------------------
# What is learned
# --------------------------------------------------------------------------------------------------


def test_default_train_on_prompt_and_mask_history(learned):
    assert text_of(learned(two_turns())) == "Arr!<|im_end|>Ho!<|im_end|>"
    assert text_of(learned(two_turns(), mask_history=True)) == "Ho!<|im_end|>"
    everything = text_of(learned(two_turns(), train_on_prompt=True))
    assert everything.startswith("system<|im_middle|>You are Kimi")  # all but the first token
    assert "<|im_user|>user<|im_middle|>Hi<|im_end|>" in everything
    assert everything.endswith("<|im_assistant|>assistant<|im_middle|>Ho!<|im_end|>")


def test_per_message_weight_and_train(learned, tmp_path, tok):
    assert text_of(learned(two_turns({"weight": 0}))) == "Ho!<|im_end|>"
    assert text_of(learned(two_turns({"train": False}))) == "Ho!<|im_end|>"
    half = learned(two_turns({"weight": 0.5}))
    assert text_of(half, 0.5) == "Arr!<|im_end|>" and text_of(half, 1.0) == "Ho!<|im_end|>"
    # With train_on_prompt a prompt message's weight counts too.
    record = {"messages": [{**user("Hi"), "weight": 0}, bot("Arr!")]}
    assert "Hi" not in text_of(learned(record, train_on_prompt=True))
    # Bad or contradictory values, a positive weight where nothing is learned, nothing at all
    # to learn: errors naming file:line, in the stream and in the data check alike.
    w = r"one.jsonl:1: invalid message: message 1 \(assistant\): weight must be a number >= 0"
    for record, kw, match in [
        (two_turns({"weight": -1}), {}, w),
        (two_turns({"weight": "1"}), {}, "weight must be a number"),
        (two_turns({"train": "yes"}), {}, "train must be true or false"),
        (two_turns({"train": False, "weight": 1}), {}, "train = False and weight = 1 disagree"),
        (
            {"messages": [{**user("Hi"), "train": True}, bot("Arr!")]},
            {},
            "learned only with data.train_on_prompt",
        ),
        (two_turns({"weight": 0}, {"train": False}), {}, "one.jsonl:1: nothing to learn"),
        (two_turns(None, {"weight": 0}), {"mask_history": True}, "nothing to learn"),
    ]:
        with pytest.raises(DataError, match=match):
            learned(record, on_bad_example="error", **kw)
        path = write_jsonl(tmp_path / "one.jsonl", [record])
        with pytest.raises(DataError, match=match):
            validate_data(cfg(path, on_bad_example="error", **kw))


def test_unknown_message_keys_are_warned_with_file_line_or_bad_under_strict(tmp_path, tok, caplog):
    odd = {"messages": [user("Hi"), bot("Arr!", mood="salty")]}
    path = write_jsonl(tmp_path / "d.jsonl", [two_turns(), odd, odd])
    with caplog.at_level(logging.WARNING, logger="k2jax.data.dataset"):
        check = validate_data(cfg(path))
        it = PackedBatches(cfg(path, shuffle=False, num_epochs=1), tok)
        list(it)
    assert check.notes == {"unknown key 'mood' in a message": 2} and check.usable == 3
    assert any(
        f"{path}:2: unknown key 'mood' in a message" in r.getMessage() for r in caplog.records
    )
    assert it.last_epoch_summary.endswith("3 examples, 2 unknown key 'mood' in a message")
    strict = PackedBatches(cfg(path, shuffle=False, num_epochs=1, strict=True), tok)
    list(strict)
    assert strict.last_epoch_summary.endswith("1 examples, 2 skipped (unknown key: 2)")
    with pytest.raises(DataError, match=r"d.jsonl:2: unknown key: messages\[1\] has 'mood'"):
        validate_data(cfg(path, strict=True, on_bad_example="error"))


def test_knob_combinations_that_cannot_mean_anything_are_refused(tmp_path):
    for kw, match in [
        ({"train_on_prompt": True, "mask_history": True}, "exclude each other"),
        ({"train_on_prompt": True, "template": "kimi_k2_thinking"}, "data.split_turns = False"),
        ({"val_size": 1.5}, "data.val_size"),
        ({"val_size": -0.1}, "data.val_size"),
        ({"interleave_probs": (1.0, 2.0)}, "needs an interleave_"),
        ({"mix_strategy": "interleave_under", "interleave_probs": (0.0, 0.0)}, "positive sum"),
    ]:
        with pytest.raises(ConfigError, match=match):
            cfg(tmp_path / "x.jsonl", **kw)
    cfg(tmp_path / "x.jsonl", train_on_prompt=True, template="kimi_k2_thinking", split_turns=False)


# --------------------------------------------------------------------------------------------------
# Over-long examples
# --------------------------------------------------------------------------------------------------


def test_truncate_keeps_the_prompt_end_and_the_answer_start(tmp_path, tok):
    prompt = " ".join(f"p{i}" for i in range(200))
    answer = " ".join(f"a{i}" for i in range(200))
    short = {"messages": [user(prompt), bot("ok")]}
    long = {"messages": [user("q"), bot(answer)]}
    both = {"messages": [user(prompt), bot(answer)]}
    path = write_jsonl(tmp_path / "d.jsonl", [short, long, both])
    c = cfg(path, shuffle=False, num_epochs=1, overlong="truncate", seq_len=96)
    it = PackedBatches(c, tok)
    batches = list(it)
    assert it.last_epoch_summary.endswith("3 examples, 3 over-long truncated (data.overlong)")
    texts = [tok.decode(s) for s in segment_tokens(batches)]
    assert all(len(s) == 96 for s in segment_tokens(batches))
    # A short answer is kept whole; the prompt loses its start.
    assert (
        texts[0].endswith("<|im_assistant|>assistant<|im_middle|>ok<|im_end|>")
        and "p0 " not in texts[0]
    )
    # A short prompt is kept whole; the answer keeps its start.
    assert (
        texts[1].startswith("<|im_system|>system")
        and "a0 a1" in texts[1]
        and "a199" not in texts[1]
    )
    # Both long: they share the row in proportion; neither is gone.
    assert "p199" in texts[2] and "a0" in texts[2] and "p0 " not in texts[2]
    learned = [b["loss_mask"][0].sum() for b in batches]
    assert all(x > 0 for x in learned)
    # The default drops and counts them instead.
    dropped = PackedBatches(cfg(path, shuffle=False, num_epochs=1, seq_len=96), tok)
    with pytest.raises(DataError, match="no usable examples.*too long: 3"):
        list(dropped)


def test_split_turns_cuts_a_long_text_into_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 300}, {"text": "short"}])
    it = PackedBatches(
        cfg(path, shuffle=False, num_epochs=1, overlong="split_turns", seq_len=64), tok
    )
    segs = segment_tokens(list(it))
    whole = [*tok.encode("word " * 300), tok.eos_id]
    assert [t for s in segs[:-1] for t in s] == whole and all(len(s) <= 64 for s in segs)
    assert "1 over-long text cut into pieces (data.overlong)" in it.last_epoch_summary


# --------------------------------------------------------------------------------------------------
# Mixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def two_sets(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"A{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"B{i}"} for i in range(30)])
    return (str(a), str(b))


def names(tok, batches):
    return [tok.decode(s)[: -len("[EOS]")] for s in segment_tokens(batches)]


@pytest.mark.parametrize(
    "strategy, probs, counts",
    [
        ("concat", None, {"A": 10, "B": 30}),
        ("interleave_under", None, {"A": 10, "B": 10}),  # ends when A runs out
        ("interleave_over", None, {"A": 30, "B": 30}),  # ends when B does: A three times
        ("interleave_under", (0.2, 0.8), {"A": 7, "B": 30}),  # L = int(min(50, 37.5))
    ],
)
def test_mixtures_take_each_dataset_by_its_share(tok, two_sets, strategy, probs, counts):
    c = cfg(two_sets, num_epochs=1, seed=2, mix_strategy=strategy, interleave_probs=probs)
    got = names(tok, list(PackedBatches(c, tok)))
    assert collections.Counter(x[0] for x in got) == counts
    if strategy == "interleave_over":
        assert collections.Counter(got)["A3"] == 3  # every A record in every pass
    assert got == names(tok, list(PackedBatches(c, tok)))  # deterministic


def test_an_unshuffled_interleave_is_even_and_mixtures_resume(tok, two_sets):
    c = cfg(two_sets, num_epochs=1, shuffle=False, mix_strategy="interleave_under")
    assert names(tok, list(PackedBatches(c, tok)))[:6] == ["A0", "B0", "A1", "B1", "A2", "B2"]
    c = cfg(
        two_sets, seed=4, batch_size=2, mix_strategy="interleave_over", interleave_probs=(1.0, 2.0)
    )
    straight = take(PackedBatches(c, tok), 40)  # more than an epoch
    first = PackedBatches(c, tok)
    head = take(first, 13)
    state = json.loads(json.dumps(first.state()))
    assert same(head + take(PackedBatches(c, tok, state=state), 27), straight)
    with pytest.raises(ValueError, match="saved for other data or settings"):
        PackedBatches(cfg(two_sets, seed=4, batch_size=2), tok, state=state)


# --------------------------------------------------------------------------------------------------
# The validation split
# --------------------------------------------------------------------------------------------------


def test_val_size_sets_records_aside_for_good(tok, two_sets):
    def split(path, split, **kw):
        c = cfg(path, num_epochs=1, **kw)
        return names(tok, list(PackedBatches(c, tok, split=split)))

    train = split(two_sets, "train", val_size=0.25, seed=1)
    val = split(two_sets, "validation", val_size=0.25, seed=1)
    assert not set(train) & set(val) and len(train) + len(val) == 40 and 4 <= len(val) <= 16
    assert val == sorted(val, key=lambda x: (x[0], int(x[1:])))  # file order
    assert set(split(two_sets, "train", val_size=0.25, seed=9)) == set(train)  # not by seed
    counted = split(two_sets[1], "validation", val_size=5)
    assert len(counted) == 5 and not set(counted) & set(split(two_sets[1], "train", val_size=5))
    with pytest.raises(ConfigError, match="needs data.val_size"):
        PackedBatches(cfg(two_sets), tok, split="validation")
    # Resume on the training split; a state of the unsplit data does not fit it.
    c = cfg(two_sets, val_size=0.25, seed=3, batch_size=2)
    straight = take(PackedBatches(c, tok), 12)
    first = PackedBatches(c, tok)
    head = take(first, 4)
    assert same(head + take(PackedBatches(c, tok, state=first.state()), 8), straight)
    with pytest.raises(ValueError, match="saved for other data or settings"):
        PackedBatches(cfg(two_sets, seed=3, batch_size=2), tok, state=first.state())


def test_eval_every_accepts_the_validation_split():
    from k2jax.config import CONFIG_DIR
    from k2jax.train.config import RunConfig

    with pytest.raises(ConfigError, match="needs eval.path .* or data.val_size"):
        RunConfig.load(CONFIG_DIR / "tiny_train.gin", ["eval.every=2"])
    rc = RunConfig.load(CONFIG_DIR / "tiny_train.gin", ["eval.every=2", "data.val_size=0.1"])
    assert rc.data.for_path("held_out.jsonl").val_size == 0.0
