"""Kimi's tiktoken tokenizer, read from a checkpoint folder without transformers.

A Kimi checkpoint ships its tokenizer as two files (K2_FACTS §4.1):

* `tiktoken.model` — the byte-level BPE vocabulary: one line per token, `<base64 bytes> <rank>`.
  The rank is the token id *and* the merge priority (lower merges first). K2 has 163,584 of them.
* `tokenizer_config.json` — `added_tokens_decoder` names the special tokens: `{"163584":
  {"content": "[BOS]", ...}, ...}`.

The special ids are the 256 ids right after the base vocabulary, `[num_base, num_base + 256)`;
those that `added_tokens_decoder` does not name are called `<|reserved_token_{id}|>`, exactly as
Moonshot's `tokenization_kimi.py` does. So K2's vocabulary is 163,584 + 256 = 163,840 ids, the
embedding's row count. The special ids are never hard-coded here: `im_end_id`, `think_id`, ... are
looked up by name, so a tokenizer whose config lacks `<think>` (K2-Instruct-0905) fails with a clear
message only where a template actually needs it.

Text is split by Kimi's 8-alternative pre-tokenizer regex (`PAT_STR`, verbatim from K2_FACTS §4.1;
tiktoken's Rust regex engine supports the `&&` class intersections in it) and each piece is BPE'd.

**Specials in user data stay text.** `encode(text)` treats text that merely *looks* like a special
token (`"<|im_end|>"` typed by a user) as ordinary characters. Moonshot's `encode` defaults to
`allowed_special="all"`, which would let a dataset line forge turn boundaries; the chat templates in
`k2jax.data.chat` therefore emit every structural token by id (`encode_special`) and pass only
content through `encode`. For content without special-token text both give the same ids.

We read `tiktoken.model` ourselves instead of calling `tiktoken.load.load_tiktoken_bpe`: that
function caches even local files by path in a temp dir (stale after a file changes; see
ECOSYSTEM_NOTES) and its errors do not say which line is broken.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import types
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import tiktoken

# Kimi's pre-tokenizer (tokenization_kimi.py `pat_str`), the 8 alternatives joined by "|":
# Han runs; words with optional leading punctuation/space (two case patterns, English
# contractions); 1-3 digits; punctuation runs; newline runs; trailing spaces; other spaces.
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

NUM_RESERVED_SPECIAL_TOKENS = 256

# The named special tokens of the K2 family and their offset from the first special id
# (K2_FACTS §4.1: [BOS] = 163584 = num_base + 0, ..., [PAD] = 163839 = num_base + 255).
# Used by `k2jax.data.testing` to write tokenizers of the same layout; loading never assumes them.
KIMI_SPECIAL_OFFSETS: dict[str, int] = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_end|>": 2,
    "<|im_user|>": 3,
    "<|im_assistant|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "[EOT]": 9,
    "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11,
    "<|tool_calls_section_end|>": 12,
    "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14,
    "<|tool_call_end|>": 15,
    "<|im_middle|>": 17,
    "<|media_begin|>": 18,
    "<|media_content|>": 19,
    "<|media_end|>": 20,
    "<|media_pad|>": 21,
    "<think>": 22,
    "</think>": 23,
    "[UNK]": 254,
    "[PAD]": 255,
}

# tiktoken panics on very long inputs and is quadratic on long runs without whitespace
# (tiktoken issue 195); Moonshot's encode() splits at these sizes, and so do we.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed, or a token/id does not exist; names the file."""


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Reads a tiktoken vocabulary file: lines `<base64 token> <rank>`, blank lines ignored.

    Checks what tiktoken silently assumes: ranks are exactly 0..n-1 (each once), tokens are
    unique, and every single byte is a token (a byte-level BPE can encode any text).
    """
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: not found (a Kimi checkpoint keeps its vocabulary there)")
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2:
                raise TokenizerError(
                    f"{path}:{lineno}: expected '<base64 token> <rank>', got {raw[:80]!r}"
                )
            try:
                token = base64.b64decode(fields[0], validate=True)
                rank = int(fields[1])
            except (binascii.Error, ValueError):
                raise TokenizerError(
                    f"{path}:{lineno}: cannot parse {raw[:80]!r} as '<base64 token> <rank>'"
                ) from None
            if token in ranks:
                raise TokenizerError(f"{path}:{lineno}: token {token!r} appears twice")
            if rank in seen_ranks or rank < 0:
                raise TokenizerError(f"{path}:{lineno}: rank {rank} is repeated or negative")
            ranks[token] = rank
            seen_ranks.add(rank)
    if not ranks:
        raise TokenizerError(f"{path}: empty vocabulary")
    if max(seen_ranks) != len(ranks) - 1:
        raise TokenizerError(
            f"{path}: ranks must be 0..{len(ranks) - 1} without gaps (max rank is "
            f"{max(seen_ranks)}); the special ids start right after them"
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{path}: not a byte-level vocabulary: {len(missing)} single bytes have no token "
            f"(first: 0x{missing[0]:02x})"
        )
    return ranks


def read_added_tokens(path: str | os.PathLike) -> tuple[dict[int, str], dict]:
    """Reads `added_tokens_decoder` (id -> content) and the whole JSON of tokenizer_config.json."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: not found (it names the special tokens)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    decoder = cfg.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{path}: added_tokens_decoder must be an object id -> token")
    out: dict[int, str] = {}
    for key, entry in decoder.items():
        try:
            token_id = int(key)
        except ValueError:
            raise TokenizerError(
                f"{path}: added_tokens_decoder key {key!r} is not an integer id"
            ) from None
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str) or not content:
            raise TokenizerError(
                f"{path}: added_tokens_decoder[{key!r}] needs a non-empty string 'content'"
            )
        out[token_id] = content
    return out, cfg


def _token_name(value, default: str) -> str:
    """tokenizer_config.json writes bos/eos either as a string or as {"content": ...}."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return default


class KimiTokenizer:
    """Kimi's tiktoken BPE plus its 256 special ids.

    Build with `KimiTokenizer.from_dir(checkpoint_dir)`; or from parts (tests, tiny models) with
    `KimiTokenizer(ranks, added_tokens)`. Ids: `[0, num_base_tokens)` are BPE tokens,
    `[num_base_tokens, vocab_size)` the specials; `vocab_size = num_base_tokens + 256`.
    """

    def __init__(
        self,
        mergeable_ranks: Mapping[bytes, int],
        added_tokens: Mapping[int, str],
        *,
        bos_token: str = "[BOS]",
        eos_token: str = "[EOS]",
        source: str = "<in memory>",
    ):
        self.source = source
        self._num_base = len(mergeable_ranks)
        first, end = self._num_base, self._num_base + NUM_RESERVED_SPECIAL_TOKENS
        outside = sorted(i for i in added_tokens if not first <= i < end)
        if outside:
            # Moonshot's tokenizer ignores these too (one 3P copy reserves 258 ids, K2_FACTS §8.4).
            warnings.warn(
                f"{source}: added tokens with ids {outside[:4]} lie outside the special range "
                f"[{first}, {end}) and are ignored",
                stacklevel=2,
            )
        specials: dict[str, int] = {}
        for i in range(first, end):
            name = added_tokens.get(i, f"<|reserved_token_{i}|>")
            if name in specials:
                raise TokenizerError(f"{source}: special token {name!r} is named twice")
            specials[name] = i
        self._specials = types.MappingProxyType(specials)
        self._special_names = {i: n for n, i in specials.items()}
        self._bos_token, self._eos_token = bos_token, eos_token
        self._enc = tiktoken.Encoding(
            name=f"kimi:{source}",
            pat_str=PAT_STR,
            mergeable_ranks=dict(mergeable_ranks),
            special_tokens=specials,
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> KimiTokenizer:
        """Loads `tiktoken.model` + `tokenizer_config.json` from a checkpoint folder."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: not a folder (expected a checkpoint folder)")
        ranks = read_tiktoken_ranks(path / "tiktoken.model")
        added, cfg = read_added_tokens(path / "tokenizer_config.json")
        return cls(
            ranks,
            added,
            bos_token=_token_name(cfg.get("bos_token"), "[BOS]"),
            eos_token=_token_name(cfg.get("eos_token"), "[EOS]"),
            source=str(path),
        )

    # Sizes ---------------------------------------------------------------------------------------
    @property
    def num_base_tokens(self) -> int:
        """Number of BPE tokens (163,584 for K2); also the first special id."""
        return self._num_base

    @property
    def vocab_size(self) -> int:
        """All ids, BPE + 256 specials (163,840 for K2): the embedding's row count."""
        return self._num_base + NUM_RESERVED_SPECIAL_TOKENS

    # Encoding ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ordinary text; special-token-looking text is encoded as plain characters."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids: list[int] = []
        for i in range(0, len(text), _MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i : i + _MAX_ENCODE_CHARS]):
                ids += self._enc.encode_ordinary(piece)
        return ids

    def encode_special(self, name: str) -> int:
        """The id of one special token by name, e.g. `encode_special("<|im_end|>")`."""
        try:
            return self._specials[name]
        except KeyError:
            named = [n for n in self._specials if not n.startswith("<|reserved_token_")]
            raise TokenizerError(
                f"{self.source}: special token {name!r} is not defined by this tokenizer "
                f"(its tokenizer_config.json names: {', '.join(named)})"
            ) from None

    @property
    def special_ids(self) -> Mapping[str, int]:
        """Read-only mapping special-token name -> id (all 256, reserved ones included)."""
        return self._specials

    def is_special(self, token_id: int) -> bool:
        return self._num_base <= token_id < self.vocab_size

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; specials appear as their names, broken UTF-8 as U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(
                f"{self.source}: token ids {bad[:4]} are outside [0, {self.vocab_size})"
            )
        return self._enc.decode(ids, errors="replace")

    def token_name(self, token_id: int) -> str:
        """A readable name for one id: the special's name, or the decoded bytes' repr."""
        if self.is_special(token_id):
            return self._special_names[token_id]
        return repr(self._enc.decode_single_token_bytes(token_id))[2:-1]

    # Named ids -----------------------------------------------------------------------------------
    @property
    def bos_id(self) -> int:
        """`bos_token` of tokenizer_config.json ([BOS]). Kimi's chat templates never emit it."""
        return self.encode_special(self._bos_token)

    @property
    def eos_id(self) -> int:
        """`eos_token` of tokenizer_config.json ([EOS]); chat turns end with `im_end_id`."""
        return self.encode_special(self._eos_token)

    @property
    def pad_id(self) -> int:
        return self.encode_special("[PAD]")

    @property
    def im_end_id(self) -> int:
        return self.encode_special("<|im_end|>")

    @property
    def im_user_id(self) -> int:
        return self.encode_special("<|im_user|>")

    @property
    def im_assistant_id(self) -> int:
        return self.encode_special("<|im_assistant|>")

    @property
    def im_system_id(self) -> int:
        return self.encode_special("<|im_system|>")

    @property
    def im_middle_id(self) -> int:
        return self.encode_special("<|im_middle|>")

    @property
    def think_id(self) -> int:
        return self.encode_special("<think>")

    @property
    def think_end_id(self) -> int:
        return self.encode_special("</think>")

    def __repr__(self) -> str:
        return (
            f"KimiTokenizer({self.source!r}, num_base_tokens={self._num_base}, "
            f"vocab_size={self.vocab_size})"
        )


def _split_long_runs(s: str) -> Iterable[str]:
    """Splits `s` so no piece has more than _MAX_RUN_CHARS consecutive (non-)whitespace chars.

    The same cut points as Moonshot's `_split_whitespaces_or_nonwhitespaces`.
    """
    if len(s) <= _MAX_RUN_CHARS:
        yield s
        return
    run_len, run_is_space, start = 0, s[0].isspace(), 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > _MAX_RUN_CHARS:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]
