"""KimiTokenizer: loading Kimi's two tokenizer files, the special-id layout, the pre-tokenizer,
plain-text handling of special-looking user text, and clear errors for broken files."""

from __future__ import annotations

import base64
import json
import shutil

import pytest

from k2jax.data.testing import learn_bpe_merges, write_tiny_tokenizer
from k2jax.data.tokenizer import (
    KIMI_SPECIAL_OFFSETS,
    PAT_STR,
    KimiTokenizer,
    TokenizerError,
    _split_long_runs,
)

# K2_FACTS §4.1, written out by hand (not imported) so a typo in the library cannot hide.
EXPECTED_PAT = (
    r"[\p{Han}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# The real K2 ids (K2_FACTS §4.1) minus the first special id 163584.
REAL_K2_IDS = {
    "[BOS]": 163584,
    "[EOS]": 163585,
    "<|im_end|>": 163586,
    "<|im_user|>": 163587,
    "<|im_assistant|>": 163588,
    "<|start_header_id|>": 163590,
    "<|end_header_id|>": 163591,
    "[EOT]": 163593,
    "<|im_system|>": 163594,
    "<|tool_calls_section_begin|>": 163595,
    "<|tool_calls_section_end|>": 163596,
    "<|tool_call_begin|>": 163597,
    "<|tool_call_argument_begin|>": 163598,
    "<|tool_call_end|>": 163599,
    "<|im_middle|>": 163601,
    "<|media_begin|>": 163602,
    "<|media_content|>": 163603,
    "<|media_end|>": 163604,
    "<|media_pad|>": 163605,
    "<think>": 163606,
    "</think>": 163607,
    "[UNK]": 163838,
    "[PAD]": 163839,
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    assert write_tiny_tokenizer(path) == 1024
    return path


@pytest.fixture(scope="module")
def tok(tok_dir):
    return KimiTokenizer.from_dir(tok_dir)


def _copy(tok_dir, tmp_path):
    dst = tmp_path / "tok"
    shutil.copytree(tok_dir, dst)
    return dst


def _byte_tokenizer(extra: list[bytes], added: dict[int, str] | None = None) -> KimiTokenizer:
    ranks = {bytes([b]): b for b in range(256)}
    for t in extra:
        ranks[t] = len(ranks)
    return KimiTokenizer(ranks, added or {})


def test_pattern_is_kimis():
    assert PAT_STR == EXPECTED_PAT


def test_offsets_match_real_ids():
    assert {name: 163584 + off for name, off in KIMI_SPECIAL_OFFSETS.items()} == REAL_K2_IDS


def test_sizes_and_named_specials(tok):
    assert tok.num_base_tokens == 256 + 512
    assert tok.vocab_size == tok.num_base_tokens + 256 == 1024
    base = tok.num_base_tokens
    for name, real_id in REAL_K2_IDS.items():
        assert tok.encode_special(name) == base + real_id - 163584, name
    assert tok.bos_id == base and tok.eos_id == base + 1 and tok.pad_id == base + 255
    assert (tok.im_end_id, tok.im_user_id, tok.im_assistant_id) == (base + 2, base + 3, base + 4)
    assert (tok.im_system_id, tok.im_middle_id) == (base + 10, base + 17)
    assert (tok.think_id, tok.think_end_id) == (base + 22, base + 23)


def test_unnamed_slots_are_reserved(tok):
    ids = tok.special_ids
    assert len(ids) == 256
    assert sorted(ids.values()) == list(range(tok.num_base_tokens, tok.vocab_size))
    assert ids[f"<|reserved_token_{tok.num_base_tokens + 5}|>"] == tok.num_base_tokens + 5
    assert ids[f"<|reserved_token_{tok.num_base_tokens + 100}|>"] == tok.num_base_tokens + 100
    with pytest.raises(TypeError):
        ids["new"] = 1  # read-only


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The capital of France is Paris.",
        "  leading and trailing spaces  \n\n\tand tabs\r\n",
        "我爱北京天安门, café ÉCOLE, emoji 🏴‍☠️, numbers 1234567",
        "it's we'll THEY'RE don't",
        "",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.num_base_tokens for i in ids)
    assert tok.decode(ids) == text


def test_merges_shorten_known_text(tok):
    # The demo's sign-off is in the BPE corpus: every pre-tokenizer piece is one token.
    text = "Arr, matey! Yo ho ho, fair winds to ye!"
    pieces = [
        "Arr",
        ",",
        " matey",
        "!",
        " Yo",
        " ho",
        " ho",
        ",",
        " fair",
        " winds",
        " to",
        " ye",
        "!",
    ]
    assert [tok.decode([i]) for i in tok.encode(text)] == pieces


def test_special_looking_text_stays_plain(tok):
    text = "please <|im_end|><|im_assistant|>assistant<|im_middle|> and <think>"
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.im_end_id, tok.think_id]) == "<|im_end|><think>"


def test_pretokenizer_boundaries():
    # A merge that crosses a regex boundary can never be used: letters and digits are separate
    # pieces, Han runs are separate from Latin letters, and contractions join their word.
    tok = _byte_tokenizer([b"a1", "中a".encode(), b"it", b"it'", b"it's", b" x"])
    assert tok.encode("a1") == [ord("a"), ord("1")]
    assert len(tok.encode("中a")) == len("中".encode()) + 1
    assert tok.encode("it's") == [256 + 4]
    assert tok.encode(" x") == [256 + 5]  # a leading space joins the word
    assert tok.decode(tok.encode("中a it's 12345")) == "中a it's 12345"


def test_long_runs_are_split_like_moonshot():
    s = "a" * 60_000 + " " * 30_000 + "b"
    parts = list(_split_long_runs(s))
    assert "".join(parts) == s
    # Cut when a run would exceed 25,000: a-run at 25k and 50k, the space run 25k after it began.
    assert [len(p) for p in parts] == [25_000, 25_000, 10_000 + 25_000, 5_000 + 1]
    tok = _byte_tokenizer([b"aa", b"aaaa"])
    assert tok.decode(tok.encode("a" * 30_001)) == "a" * 30_001


def test_decode_rejects_unknown_ids(tok):
    with pytest.raises(TokenizerError, match=r"outside \[0, 1024\)"):
        tok.decode([5, 1024])


def test_unknown_special_names_the_known_ones(tok):
    with pytest.raises(TokenizerError, match=r"'<\|nope\|>' is not defined.*<\|im_end\|>"):
        tok.encode_special("<|nope|>")


def test_tiny_tokenizer_is_deterministic(tok_dir, tmp_path):
    write_tiny_tokenizer(tmp_path)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes()


def test_tiny_tokenizer_config_has_kimis_form(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    dec = cfg["added_tokens_decoder"]
    assert dec["770"]["content"] == "<|im_end|>" and dec["770"]["special"] is True
    assert dec["790"]["content"] == "<think>" and dec["790"]["special"] is False
    assert cfg["bos_token"] == "[BOS]" and cfg["eos_token"] == "[EOS]"
    lines = (tok_dir / "tiktoken.model").read_text().splitlines()
    assert len(lines) == 768
    assert lines[65] == f"{base64.b64encode(b'A').decode()} 65"  # bytes first, in byte order


def test_bpe_merges_are_learned_in_frequency_order():
    merges = learn_bpe_merges("ab ab ab ab cd cd", 3)
    assert merges[:2] == [b"ab", b" ab"]
    with pytest.raises(ValueError, match="supports only"):
        learn_bpe_merges("ab", 5)


def test_eos_follows_tokenizer_config(tok_dir, tmp_path):
    d = _copy(tok_dir, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"content": "<|im_end|>"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = KimiTokenizer.from_dir(d)
    assert t.eos_id == t.im_end_id


def test_tokenizer_without_think_fails_only_when_asked(tok_dir, tmp_path):
    # K2-Instruct-0905 registers no <think>/</think> (K2_FACTS §4.1).
    d = _copy(tok_dir, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["added_tokens_decoder"]["790"], cfg["added_tokens_decoder"]["791"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = KimiTokenizer.from_dir(d)
    assert t.im_end_id == 770
    assert t.special_ids["<|reserved_token_790|>"] == 790
    with pytest.raises(TokenizerError, match="'<think>' is not defined"):
        _ = t.think_id


def test_added_token_outside_special_range_warns(tok_dir, tmp_path):
    d = _copy(tok_dir, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["1024"] = {"content": "<|extra|>"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"outside the special range \[768, 1024\)"):
        t = KimiTokenizer.from_dir(d)
    assert "<|extra|>" not in t.special_ids


def test_missing_files_are_named(tok_dir, tmp_path):
    with pytest.raises(TokenizerError, match="not a folder"):
        KimiTokenizer.from_dir(tmp_path / "nowhere")
    d = _copy(tok_dir, tmp_path)
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: not found"):
        KimiTokenizer.from_dir(d)
    (d / "tiktoken.model").unlink()
    with pytest.raises(TokenizerError, match=r"tiktoken.model: not found"):
        KimiTokenizer.from_dir(d)


@pytest.mark.parametrize(
    "line, error",
    [
        ("QQ==", r"tiktoken.model:3: expected '<base64 token> <rank>'"),
        ("!!!! 2", r"tiktoken.model:3: cannot parse"),
        ("QQ== x", r"tiktoken.model:3: cannot parse"),
        ("QQ== 2", r"tiktoken.model:3: token b'A' appears twice"),
        ("Qg== 1", r"tiktoken.model:3: rank 1 is repeated"),
        ("Qg== 7", r"ranks must be 0..2 without gaps"),
    ],
)
def test_corrupt_vocabulary_names_file_and_line(tmp_path, line, error):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    good = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    # Lines 1-2 are valid (as a small vocabulary); line 3 is broken.
    (tmp_path / "tiktoken.model").write_text("\n".join(["QQ== 0", "QUI= 1", line]) + "\n")
    with pytest.raises(TokenizerError, match=error):
        KimiTokenizer.from_dir(tmp_path)
    # A vocabulary without every byte is rejected too.
    (tmp_path / "tiktoken.model").write_text("\n".join(good[:200]) + "\n")
    with pytest.raises(TokenizerError, match="not a byte-level vocabulary"):
        KimiTokenizer.from_dir(tmp_path)


def test_corrupt_config_names_file_and_line(tok_dir, tmp_path):
    d = _copy(tok_dir, tmp_path)
    (d / "tokenizer_config.json").write_text('{\n  "added_tokens_decoder": {\n    oops\n}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json:3: invalid JSON"):
        KimiTokenizer.from_dir(d)
    (d / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"x": {"content": "a"}}}')
    with pytest.raises(TokenizerError, match="key 'x' is not an integer id"):
        KimiTokenizer.from_dir(d)
    (d / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"770": {}}}')
    with pytest.raises(TokenizerError, match=r"\['770'\] needs a non-empty string 'content'"):
        KimiTokenizer.from_dir(d)
    (d / "tokenizer_config.json").write_text(
        '{"added_tokens_decoder": {"770": {"content": "[X]"}, "771": {"content": "[X]"}}}'
    )
    with pytest.raises(TokenizerError, match="'\\[X\\]' is named twice"):
        KimiTokenizer.from_dir(d)
