"""SFT data: JSONL conversations -> packed, shuffled, sharded, resumable batches of token rows.

**Input.** One conversation per line, in either of the two forms people have:

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
     "tools": [...]}                                               # OpenAI style
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
     "system": "...", "tools": [...]}                              # ShareGPT style

OpenAI messages may carry `name`, `reasoning_content`, `tool_calls` and `tool_call_id` (see
`k2jax.data.chat`). ShareGPT `from` is human/user, gpt/assistant, system, tool/observation
(a tool result), or function_call (an assistant tool call whose value is `{"name", "arguments"}` or
a list of them). `path` is one .jsonl file or a folder of them (sorted by name).

**Bad lines are never dropped silently.** Invalid UTF-8 or JSON, an unknown format or role, a
malformed message, missing content (`chat.check_conversation` says what each role needs; a
ShareGPT turn needs a `value`), a conversation without an assistant message, or an example longer
than `seq_len` is a `DataError` naming `file:line` and a reason. With `on_bad_example="error"` it
is raised; with "skip" it is logged (the first few one by one), counted by reason, and summarised
in the log at the end of every epoch (`PackedBatches.summary()`). An epoch without a single usable
example is always an error. The stream meets a line only when it packs it, which in training is
after the model is loaded and the step compiled; so `validate_data(config, progress=None)` finds
all of these but "too long" (which needs the tokenizer) in one pass of its own, at ~20,000
lines/s, and `Trainer.setup` calls it as soon as the DataConfig is built. With "error" it raises
the first bad line; with "skip" it logs them as the stream would and returns the counts
(`DataCheck`). Rejected alternative: a dry run of the stream itself, which would find the long
examples too, but costs a tokenizer and a full epoch of tokenizing before the first step.

**Memory.** The file is never loaded. One pass builds a line index (file id, byte offset, line
number per non-empty line: 20 bytes a line, 200 MB for ten million conversations); each epoch
visits the lines in a permutation drawn from `(seed, epoch)`, reading each line by seek. Rejected
alternative: a shuffle buffer. It needs no index, but shuffles only locally, and resuming would
need the buffer's contents in the checkpoint.

**Packing.** Each conversation becomes one or more examples (`chat.training_examples`; thinking
templates give one per user turn). Examples are packed greedily in visiting order into rows of
exactly `seq_len` tokens: an example goes into the open row if it fits, else the row is closed
(padded) and the example opens the next one (next-fit). A batch is `batch_size` consecutive rows,
as numpy arrays all shaped [rows, seq_len]:

    tokens       int32    the example tokens, 0 in padding
    targets      int32    targets[t] = tokens[t+1] if t+1 is in the same example, else 0
    loss_mask    float32  1.0 where targets[t] is an assistant token to learn (the chat mask of
                          token t+1, within the same example), else 0.0
    segment_ids  int32    1, 2, 3, ... for the examples of a row, 0 for padding
    positions    int32    0, 1, 2, ... restarting at every example

Rejected alternative: first-fit over a buffer of open rows. It fills rows better, but a row then
mixes examples from far apart in the visiting order, and the resume state would have to carry the
open rows. Next-fit wastes on average half an example per row and is trivially resumable.

**Hosts.** Every host reads the same lines and packs the same global rows; host `process_index` of
`process_count` keeps rows `[p·b, (p+1)·b)` of each global batch of `batch_size` rows
(b = batch_size / process_count), the layout `jax.make_array_from_process_local_data` expects for
a batch sharded over hosts. Every host thus yields the same number of batches (no host runs dry
and hangs a collective) and has the same `state()`. Rejected alternative: giving each host its own
lines. It saves the (cheap) redundant tokenizing, but hosts then pack different numbers of rows
and each needs its own resume state.

**Resume.** `state()` is a small JSON-serialisable dict: the position of the next example
(epoch, line position in the epoch's order, example within that line) and the current epoch's
counts. A row is closed only when the next example has been *looked at* and does not fit, and
looking does not consume it, so between batches no row is ever half-built: the next batch starts
a fresh row at exactly that example. `PackedBatches(config, tokenizer, state=saved)` therefore
continues with the same batches as an uninterrupted run. The state carries a fingerprint of the
files and of the settings that shape the example stream (template, split, seed, shuffle), so
resuming on changed data fails loudly instead of silently reading different lines; `batch_size`
and the number of hosts may change across a resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from k2jax.config import ConfigError, check_field_types
from k2jax.data.chat import (
    TEMPLATE_NAMES,
    ChatFormatError,
    EncodedChat,
    SplitExamples,
    check_conversation,
    get_template,
    training_examples,
)
from k2jax.data.tokenizer import KimiTokenizer

log = logging.getLogger(__name__)

_STATE_VERSION = 1
_LOG_FIRST_BAD = 10  # bad examples logged one by one per iterator or check; the rest counted


class DataError(ValueError):
    """A bad input line or example; the message starts with `file:line`.

    where: "file:line" (or "file:line (turn k)"); reason: a short category ("invalid JSON",
    "unknown role", "missing content", "no assistant turn", "too long", ...) used for the counts.
    """

    def __init__(self, where: str, reason: str, detail: str = ""):
        super().__init__(f"{where}: {reason}" + (f": {detail}" if detail else ""))
        self.where, self.reason = where, reason


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` section of a run config.

    path: a .jsonl file or a folder of .jsonl files.
    template: the chat template, matching the model: kimi_k2, kimi_k2_thinking or kimi_k25.
    thinking: kimi_k25 only; False renders K2.5's instant (non-thinking) mode.
    seq_len: tokens per packed row; longer examples are bad examples.
    batch_size: rows per step over all hosts (divisible by the number of hosts).
    seed, shuffle: the epoch permutation of lines is drawn from (seed, epoch); shuffle=False
      keeps file order.
    num_epochs: passes over the data; None repeats forever (the trainer counts steps).
    split_turns: one example per user turn; None does so where the template needs it.
    overlong: an example longer than seq_len is "drop"ped as a bad example (counted, or raised
      under on_bad_example="error"), or "split_turns": cut at turn boundaries into pieces that
      fit (each with the system prompt; `chat.fit_turns`), counted as "cut at turns" in the
      epoch summary; a single turn longer than seq_len is still dropped. Never cut inside a turn.
    on_bad_example: "skip" (log, count, summarise) or "error" (raise at the first).
    """

    path: str
    template: str = "kimi_k2"
    thinking: bool = True
    seq_len: int = 4096
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    split_turns: bool | None = None
    overlong: Literal["drop", "split_turns"] = "drop"
    on_bad_example: Literal["skip", "error"] = "skip"

    def __post_init__(self):
        check_field_types(self, "data")
        if not self.path:
            raise ConfigError("data.path: must name a .jsonl file or a folder of them")
        if self.template not in TEMPLATE_NAMES:
            raise ConfigError(
                f"data.template: expected one of {', '.join(TEMPLATE_NAMES)}, got {self.template!r}"
            )
        if self.template == "kimi_k2_thinking" and not self.thinking:
            raise ConfigError(
                "data.thinking: kimi_k2_thinking always thinks; False is for kimi_k25"
            )
        if self.seq_len < 8:
            raise ConfigError(f"data.seq_len: must be >= 8, got {self.seq_len}")
        if self.seed < 0:
            raise ConfigError(f"data.seed: must be >= 0, got {self.seed}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size: must be >= 1, got {self.batch_size}")
        if self.overlong not in ("drop", "split_turns"):
            raise ConfigError(
                f"data.overlong: expected 'drop' or 'split_turns', got {self.overlong!r}"
            )
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError(f"data.num_epochs: must be >= 1 or None, got {self.num_epochs}")


# --------------------------------------------------------------------------------------------------
# Parsing one line
# --------------------------------------------------------------------------------------------------

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_call": "assistant",
}


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A conversation in OpenAI form: `messages` as `chat` takes them, optional `tools`."""

    messages: list[dict[str, Any]]
    tools: list[Any] | None = None


def parse_conversation(obj: Any, where: str) -> Conversation:
    """Normalises one parsed JSONL object (OpenAI or ShareGPT form) to a Conversation."""
    if not isinstance(obj, dict):
        raise DataError(
            where, "unknown format", f"expected a JSON object, got {type(obj).__name__}"
        )
    tools = obj.get("tools")
    if isinstance(tools, str):  # some exports store the tool list as a JSON string
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(
                where, "invalid tools", f"'tools' is a string but not JSON: {e.msg}"
            ) from None
    if tools is not None and not isinstance(tools, list):
        raise DataError(where, "invalid tools", "'tools' must be a list")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise DataError(where, "unknown format", "'messages' must be a list of objects")
        return Conversation([dict(m) for m in messages], tools or None)
    if "conversations" in obj:
        return Conversation(_from_sharegpt(obj, where), tools or None)
    raise DataError(
        where, "unknown format", "expected a 'messages' (OpenAI) or 'conversations' (ShareGPT) key"
    )


def _from_sharegpt(obj: dict, where: str) -> list[dict[str, Any]]:
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise DataError(where, "unknown format", "'conversations' must be a list")
    messages: list[dict[str, Any]] = []
    if isinstance(obj.get("system"), str) and obj["system"]:
        messages.append({"role": "system", "content": obj["system"]})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(where, "unknown format", f"conversations[{i}] must be an object")
        source = turn.get("from")
        role = _SHAREGPT_ROLES.get(source) if isinstance(source, str) else None
        if role is None:
            raise DataError(
                where,
                "unknown role",
                f"conversations[{i}].from = {source!r} (expected one of "
                f"{', '.join(_SHAREGPT_ROLES)})",
            )
        value = turn.get("value")
        if value is None:
            state = "null" if "value" in turn else "missing"
            raise DataError(
                where,
                "missing content",
                f'conversations[{i}].value is {state} (write "" for an empty message)',
            )
        if source == "function_call":
            calls = value
            if isinstance(value, str):
                try:
                    calls = json.loads(value)
                except json.JSONDecodeError as e:
                    raise DataError(
                        where, "invalid message", f"conversations[{i}] function_call: {e.msg}"
                    ) from None
            calls = calls if isinstance(calls, list) else [calls]
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        if not isinstance(value, str):
            raise DataError(where, "invalid message", f"conversations[{i}].value must be a string")
        message: dict[str, Any] = {"role": role, "content": value}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if key in turn:
                message[key] = turn[key]
        messages.append(message)
    return messages


def _parse_line(line: str, where: str) -> Conversation:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(where, "invalid JSON", f"{e.msg} at column {e.colno}") from None
    return parse_conversation(obj, where)


def check_line(line: str, where: str) -> None:
    """Raises the DataError that `conversation_examples` would raise for `line`, except "too
    long": the same parsing and `chat.check_conversation`, without a tokenizer."""
    conv = _parse_line(line, where)
    try:
        check_conversation(conv.messages)
    except ChatFormatError as e:
        raise DataError(where, e.reason, str(e)) from None


def conversation_examples(
    line: str,
    where: str,
    tokenizer: KimiTokenizer,
    template: str,
    *,
    thinking: bool = True,
    split_turns: bool | None = None,
) -> list[tuple[EncodedChat, str]]:
    """The tokenized training examples of one JSONL line, each with its `file:line (turn k)`."""
    examples, _ = cut_examples(
        line, where, tokenizer, template, thinking=thinking, split_turns=split_turns
    )
    return examples


def cut_examples(
    line: str,
    where: str,
    tokenizer: KimiTokenizer,
    template: str,
    *,
    thinking: bool = True,
    split_turns: bool | None = None,
    max_len: int | None = None,
) -> tuple[list[tuple[EncodedChat, str]], frozenset[int]]:
    """`conversation_examples`, with examples longer than `max_len` cut at turn boundaries
    (data.overlong = "split_turns", `chat.fit_turns`); also returns the indices (into the
    list) of the first piece of each cut example."""
    conv = _parse_line(line, where)
    try:
        examples = training_examples(
            conv.messages,
            tokenizer,
            get_template(template, thinking=thinking),
            tools=conv.tools,
            split=split_turns,
            max_len=max_len,
        )
    except ChatFormatError as e:
        raise DataError(where, e.reason, str(e)) from None
    out, firsts = [], set()
    for k, ex in enumerate(examples):
        at = where if len(examples) == 1 else f"{where} (turn {k + 1})"
        if isinstance(ex, SplitExamples):
            firsts.add(len(out))
            n = len(ex.pieces)
            out += [(p, f"{at} (piece {i + 1} of {n})") for i, p in enumerate(ex.pieces)]
        else:
            out.append((ex, at))
    return out, frozenset(firsts)


# --------------------------------------------------------------------------------------------------
# Line index
# --------------------------------------------------------------------------------------------------


class LineIndex:
    """Byte offsets of the non-empty lines of one or more JSONL files, for random access."""

    _CHUNK = 1 << 24

    def __init__(self, files: list[Path], file_ids, offsets, line_numbers):
        self.files = files
        self.file_ids = np.asarray(file_ids, np.int32)
        self.offsets = np.asarray(offsets, np.int64)
        self.line_numbers = np.asarray(line_numbers, np.int64)
        self._handles: dict[int, Any] = {}

    @classmethod
    def build(cls, path: str | os.PathLike) -> LineIndex:
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl" and p.is_file())
            if not files:
                raise DataError(str(path), "no data", "the folder has no .jsonl files")
        elif path.is_file():
            files = [path]
        else:
            raise DataError(str(path), "no data", "not found (data.path)")
        ids, offs, nums = [], [], []
        for fid, file in enumerate(files):
            starts = cls._line_starts(file)
            ends = np.append(starts[1:], file.stat().st_size)
            # A line that is only "\n" has length 1; drop it (and the phantom line after a final
            # newline, which has length 0). Other blank lines are skipped when read.
            keep = np.flatnonzero(ends - starts > 1)
            ids.append(np.full(len(keep), fid, np.int32))
            offs.append(starts[keep])
            nums.append(keep + 1)
        return cls(files, np.concatenate(ids), np.concatenate(offs), np.concatenate(nums))

    @classmethod
    def _line_starts(cls, file: Path) -> np.ndarray:
        starts = [np.zeros(1, np.int64)]
        base = 0
        with file.open("rb") as f:
            while chunk := f.read(cls._CHUNK):
                newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
                starts.append(newlines.astype(np.int64) + base + 1)
                base += len(chunk)
        return np.concatenate(starts)

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, i: int) -> str:
        return f"{self.files[self.file_ids[i]]}:{self.line_numbers[i]}"

    def read(self, i: int) -> str:
        fid = int(self.file_ids[i])
        if fid not in self._handles:
            self._handles[fid] = self.files[fid].open("rb")
        f = self._handles[fid]
        f.seek(int(self.offsets[i]))
        raw = f.readline()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(self.where(i), "invalid UTF-8", str(e)) from None

    def fingerprint(self) -> str:
        sizes = [(p.name, p.stat().st_size) for p in self.files]
        return hashlib.sha256(json.dumps([sizes, len(self)]).encode()).hexdigest()[:16]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


# --------------------------------------------------------------------------------------------------
# Checking the data before training
# --------------------------------------------------------------------------------------------------

_PROGRESS_MIN_LINES = 10_000  # no progress bar below this many lines (the check takes < 0.1 s)


@dataclasses.dataclass(frozen=True)
class DataCheck:
    """What `validate_data` found in `path`.

    lines: the non-blank lines read; skipped: bad lines by reason (the stream will skip exactly
    these, plus any example longer than data.seq_len); first_bad: the first few of them.
    """

    path: str
    lines: int
    skipped: dict[str, int]
    first_bad: tuple[DataError, ...]
    seconds: float

    @property
    def usable(self) -> int:
        return self.lines - sum(self.skipped.values())

    def summary(self) -> str:
        text = f"data check: {self.lines:,} lines"
        if self.skipped:
            reasons = ", ".join(f"{r}: {n:,}" for r, n in sorted(self.skipped.items()))
            text += f", {sum(self.skipped.values()):,} will be skipped ({reasons})"
        return text + f" ({self.path}, {self.seconds:.1f} s)"


def validate_data(config: DataConfig, *, progress: bool | None = None) -> DataCheck:
    """One cheap pass over every line of `config.path`, before anything expensive.

    Each non-blank line goes through the stream's own checks (`check_line`) short of tokenizing:
    UTF-8, JSON, a known format, roles, message fields, content, tool calls and results, an
    assistant message. With `on_bad_example="error"` the first bad line is raised as a DataError
    ("file:line: reason: detail"); with "skip" the first few are logged one by one, all are
    counted by reason and the counts logged. A file without one good line is an error either way.
    The stream is not touched: its batches and resume fingerprint are the same with or without a
    check. Lines are read through a `LineIndex` (the file is never loaded).

    progress: a tqdm bar on stderr for inputs of 10,000 lines or more; None shows it only when
    stderr is a terminal.

    A function of the config rather than a `PackedBatches` method: it needs no tokenizer, so a
    trainer can run it before loading one (or a model), and a command can run it alone. (It
    builds its own line index; that is a small part of its time.)

    Speed: ~21,000 lines/s of CPU time (~24 MB/s) on a generated 200,000-line, 230 MB file of
    1-3 turn chats (OpenAI with reasoning, with tool calls, ShareGPT): 9.3 s of CPU, 10-15 s of
    wall time on one core of a shared 2-core VM; a third of it is `json.loads`. Ten million such
    lines would take ~8 minutes there; a terabyte model takes longer to load.
    """
    start = time.perf_counter()
    index = LineIndex.build(config.path)
    if not len(index):
        raise DataError(config.path, "no data", "no non-empty lines")
    show = len(index) >= _PROGRESS_MIN_LINES and (
        progress if progress is not None else sys.stderr.isatty()
    )
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(index), desc="data check", unit="line", unit_scale=True, file=sys.stderr
        )
    blank, skipped, first_bad = 0, {}, []
    try:
        for i in range(len(index)):
            if bar is not None and i % 4096 == 4095:
                bar.update(4096)
            try:
                text = index.read(i)
                if not text.strip():  # as in the stream: a blank line is no example
                    blank += 1
                    continue
                check_line(text, index.where(i))
            except DataError as e:
                if config.on_bad_example == "error":
                    raise
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                if len(first_bad) < _LOG_FIRST_BAD:
                    first_bad.append(e)
                    log.warning("data check: bad line, will be skipped: %s", e)
                elif sum(skipped.values()) == _LOG_FIRST_BAD + 1:
                    log.warning("data check: further bad lines are only counted")
        if bar is not None:
            bar.update(len(index) - bar.n)
    finally:
        if bar is not None:
            bar.close()
        index.close()
    lines = len(index) - blank
    check = DataCheck(config.path, lines, skipped, tuple(first_bad), time.perf_counter() - start)
    if not check.usable:
        raise DataError(config.path, "no usable examples", check.summary())
    if skipped:
        log.warning("%s", check.summary())
    else:
        log.info("%s", check.summary())
    return check


# --------------------------------------------------------------------------------------------------
# Packed, resumable batches
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Cursor:
    """A point in the example stream, with the counts of the current epoch up to it."""

    epoch: int = 0
    position: int = 0  # index into the epoch's visiting order of lines
    sub: int = 0  # example within that line (turns)
    examples: int = 0  # usable examples consumed in this epoch
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
    cut: int = 0  # over-long examples cut at turn boundaries (data.overlong = "split_turns")


class PackedBatches(Iterator[dict[str, np.ndarray]]):
    """Iterator of packed SFT batches for this host (see the module docstring).

    Each batch: dict of numpy arrays [batch_size // process_count, seq_len] — tokens, targets,
    segment_ids, positions (int32) and loss_mask (float32). Iteration ends after `num_epochs`
    (the last batch padded with empty rows) or never if `num_epochs` is None.
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer: KimiTokenizer,
        *,
        process_index: int = 0,
        process_count: int = 1,
        state: Mapping[str, Any] | None = None,
    ):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if config.batch_size % process_count:
            raise ConfigError(
                f"data.batch_size ({config.batch_size}) must be divisible by the number of "
                f"hosts ({process_count})"
            )
        self.config = config
        self._tokenizer = tokenizer
        self._rows_per_host = config.batch_size // process_count
        self._first_row = process_index * self._rows_per_host
        self._template = get_template(config.template, thinking=config.thinking)
        self._split = (
            self._template.strips_history_reasoning
            if config.split_turns is None
            else config.split_turns
        )
        self._index = LineIndex.build(config.path)
        if not len(self._index):
            raise DataError(config.path, "no data", "no non-empty lines")
        self._fingerprint = self._make_fingerprint()
        self._cursor = _Cursor()
        self._batches = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation)
        self._line: tuple[tuple[int, int], list | DataError] | None = None
        self._line_cut: frozenset[int] = frozenset()  # first pieces of cut examples in _line
        self._logged_bad = 0
        self.last_epoch_summary: str | None = None  # summary() of the last finished epoch
        if state is not None:
            self._restore(state)

    # State -------------------------------------------------------------------------------------
    def _make_fingerprint(self) -> str:
        c = self.config
        settings = [c.template, c.thinking, self._split, c.seed, c.shuffle]
        if c.overlong != "drop":  # (appended only when set: earlier states still resume)
            settings.append(c.overlong)
        return (
            f"{self._index.fingerprint()}-"
            + hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:8]
        )

    def state(self) -> dict[str, Any]:
        """Where to resume: the next example to pack (no row is open between batches)."""
        c = self._cursor
        return {
            "version": _STATE_VERSION,
            "fingerprint": self._fingerprint,
            "epoch": c.epoch,
            "position": c.position,
            "sub": c.sub,
            "examples": c.examples,
            "skipped": dict(c.skipped),
            "cut": c.cut,
            "batches": self._batches,
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        try:
            version, fingerprint = state["version"], state["fingerprint"]
            cursor = _Cursor(
                int(state["epoch"]),
                int(state["position"]),
                int(state["sub"]),
                int(state["examples"]),
                {str(k): int(v) for k, v in dict(state["skipped"]).items()},
                int(state.get("cut", 0)),  # absent in states saved before data.overlong
            )
            batches = int(state["batches"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed data state {state!r:.200}: {e}") from None
        if version != _STATE_VERSION:
            raise ValueError(f"data state version {version} is not {_STATE_VERSION}")
        if fingerprint != self._fingerprint:
            raise ValueError(
                f"the data state was saved for other data or settings (fingerprint {fingerprint}, "
                f"now {self._fingerprint}): {self.config.path} or data.template/thinking/"
                "split_turns/overlong/seed/shuffle changed since the checkpoint"
            )
        if not 0 <= cursor.position <= len(self._index):
            raise ValueError(f"data state position {cursor.position} is beyond the data")
        self._cursor, self._batches = cursor, batches

    @property
    def batches_yielded(self) -> int:
        return self._batches

    # Example stream ----------------------------------------------------------------------------
    def _line_at(self, epoch: int, position: int) -> int:
        if not self.config.shuffle:
            return position
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.config.seed, epoch])
            self._order = (epoch, rng.permutation(len(self._index)))
        return int(self._order[1][position])

    def _line_examples(self) -> list[tuple[EncodedChat, str]] | DataError:
        key = (self._cursor.epoch, self._cursor.position)
        if self._line is None or self._line[0] != key:
            i = self._line_at(*key)
            where = self._index.where(i)
            try:
                text = self._index.read(i)
                value: list | DataError = []
                firsts: frozenset[int] = frozenset()
                if text.strip():
                    value, firsts = cut_examples(
                        text,
                        where,
                        self._tokenizer,
                        self.config.template,
                        thinking=self.config.thinking,
                        split_turns=self._split,
                        max_len=self.config.seq_len
                        if self.config.overlong == "split_turns"
                        else None,
                    )
                self._line_cut = firsts
            except DataError as e:
                value = e
            self._line = (key, value)
        return self._line[1]

    def _bad(self, error: DataError) -> None:
        if self.config.on_bad_example == "error":
            raise error
        skipped = self._cursor.skipped
        skipped[error.reason] = skipped.get(error.reason, 0) + 1
        self._logged_bad += 1
        if self._logged_bad <= _LOG_FIRST_BAD:
            log.warning("skipping bad example %s", error)
            if self._logged_bad == _LOG_FIRST_BAD:
                log.warning("further bad examples are counted in the epoch summary only")

    def _peek(self) -> tuple[EncodedChat, str] | None:
        """The next usable example (not consumed), skipping bad ones; None after the last epoch."""
        while True:
            c = self._cursor  # replaced at an epoch end
            if self.config.num_epochs is not None and c.epoch >= self.config.num_epochs:
                return None
            if c.position >= len(self._index):
                self._end_epoch()
                continue
            examples = self._line_examples()
            if isinstance(examples, DataError):
                self._bad(examples)
                c.position, c.sub = c.position + 1, 0
                continue
            if c.sub >= len(examples):
                c.position, c.sub = c.position + 1, 0
                continue
            example, where = examples[c.sub]
            if len(example) > self.config.seq_len:
                self._bad(
                    DataError(
                        where,
                        "too long",
                        f"{len(example)} tokens > data.seq_len {self.config.seq_len}",
                    )
                )
                c.sub += 1
                continue
            return example, where

    def _end_epoch(self) -> None:
        c = self._cursor
        if c.examples == 0:
            raise DataError(
                self.config.path, "no usable examples", f"epoch {c.epoch}: {self.summary()}"
            )
        self.last_epoch_summary = self.summary()
        log.info("data: %s", self.last_epoch_summary)
        self._cursor = _Cursor(epoch=c.epoch + 1)

    def summary(self) -> str:
        """Counts of the current epoch so far: usable examples and skipped ones by reason."""
        c = self._cursor
        text = f"epoch {c.epoch} of {self.config.path}: {c.examples} examples"
        if c.cut:
            text += f", {c.cut} over-long cut at turns into pieces (data.overlong)"
        if c.skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(c.skipped.items()))
            text += f", {sum(c.skipped.values())} skipped ({reasons})"
        return text

    def _next_row(self) -> list[EncodedChat] | None:
        """The next row of examples (next-fit), or None when the data is exhausted.

        The example that does not fit stays at the cursor (peeked, not consumed) and opens the
        next row; every example fits an empty row (longer ones are skipped as bad).
        """
        row: list[EncodedChat] = []
        used = 0
        while (item := self._peek()) is not None:
            example = item[0]
            if used + len(example) > self.config.seq_len:
                break
            row.append(example)
            used += len(example)
            if self._cursor.sub in self._line_cut:  # counted once, at its first piece
                self._cursor.cut += 1
            self._cursor.sub += 1
            self._cursor.examples += 1
        return row or None

    # Batches -----------------------------------------------------------------------------------
    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows: list[list[EncodedChat]] = []
        while len(rows) < self.config.batch_size:
            row = self._next_row()
            if row is None:
                break
            rows.append(row)
        if not rows:
            raise StopIteration
        self._batches += 1
        return self._arrays(rows[self._first_row : self._first_row + self._rows_per_host])

    def _arrays(self, rows: list[list[EncodedChat]]) -> dict[str, np.ndarray]:
        shape = (self._rows_per_host, self.config.seq_len)
        tokens = np.zeros(shape, np.int32)
        targets = np.zeros(shape, np.int32)
        loss_mask = np.zeros(shape, np.float32)
        segment_ids = np.zeros(shape, np.int32)
        positions = np.zeros(shape, np.int32)
        for r, row in enumerate(rows):
            o = 0
            for k, ex in enumerate(row):
                n = len(ex)
                tokens[r, o : o + n] = ex.tokens
                targets[r, o : o + n - 1] = ex.tokens[1:]
                loss_mask[r, o : o + n - 1] = ex.loss_mask[1:]
                segment_ids[r, o : o + n] = k + 1
                positions[r, o : o + n] = np.arange(n)
                o += n
        return {
            "tokens": tokens,
            "targets": targets,
            "loss_mask": loss_mask,
            "segment_ids": segment_ids,
            "positions": positions,
        }

    def close(self) -> None:
        self._index.close()


def packed_batches(
    config: DataConfig,
    tokenizer: KimiTokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    state: Mapping[str, Any] | None = None,
) -> PackedBatches:
    """`PackedBatches(...)`: the batches of `config` for one host, optionally resumed from `state`."""
    return PackedBatches(
        config, tokenizer, process_index=process_index, process_count=process_count, state=state
    )
