"""SFT data: examples in any common form -> packed, shuffled, sharded, resumable token rows.

**Input.** `data.path` is a file, a folder, several of them, or a LLaMA-Factory
`dataset_info.json` with `data.dataset` naming entries (`k2jax.data.mixture`). Files are JSON
lines, JSON arrays, CSV, Parquet or Arrow (`k2jax.data.readers`), each record one example in one
of the forms people have (`k2jax.data.formats`): OpenAI `messages`, ShareGPT `conversations`,
alpaca `instruction`/`input`/`output`, TRL `prompt`/`completion`, or plain `text`:

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
     "tools": [...]}                                               # OpenAI style
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
     "system": "...", "tools": [...]}                              # ShareGPT style

OpenAI messages may carry `name`, `reasoning_content`, `tool_calls`, `tool_call_id`, and `weight`
or `train` (see `k2jax.data.chat`). ShareGPT `from` is human/user, gpt/assistant, system,
tool/observation (a tool result), or function_call (an assistant tool call whose value is
`{"name", "arguments"}` or a list of them). What is learned: `data.train_on_prompt`,
`data.mask_history` and the messages' weights (`k2jax.data.chat`); examples longer than a row:
`data.overlong` (`k2jax.data.examples`).

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

**Memory.** No file is ever loaded. One pass builds an index of each file's records (for JSON
lines: byte offset and line number, 16-20 bytes a record, 200 MB for ten million conversations;
`readers` for the other forms); each epoch visits the records in an order drawn from
`(seed, epoch)` (`mixture.EpochOrder`), reading each by seek. Rejected alternative: a shuffle
buffer. It needs no index, but shuffles only locally, and resuming would need the buffer's
contents in the checkpoint.

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

and, for a model with a vision tower (`PackedBatches(images=...)`), each row's images:
`pixel_values` [rows, data.image_patches, 3·P·P] and `image_grid_thw` [rows, image_patches / 4,
3], in token order and zero-padded; a row also closes when the next example's images would
exceed `data.image_patches`.

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
files and of the settings that shape the example stream (template, split, seed, shuffle, and
each newer knob when it is not at its default, so older states still resume), so resuming on
changed data fails loudly instead of silently reading different lines; `batch_size` and the
number of hosts may change across a resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np

from k2jax.config import ConfigError, check_field_types
from k2jax.data import examples as _examples
from k2jax.data.chat import TEMPLATE_NAMES, EncodedChat, get_template
from k2jax.data.examples import CUT, Example, ExampleSettings
from k2jax.data.formats import Conversation, RecordFormat
from k2jax.data.images import MAX_PIXELS, ImageProcessor
from k2jax.data.mixture import EpochOrder, Source, describe, open_sources, settings_of
from k2jax.data.mixture import fingerprint as _files_fingerprint
from k2jax.data.readers import DataError, LineIndex
from k2jax.data.tokenizer import KimiTokenizer

__all__ = ["DataCheck", "DataConfig", "DataError", "LineIndex", "PackedBatches", "validate_data"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1
_LOG_FIRST_BAD = 10  # bad examples (and notes) logged one by one per iterator or check


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` section of a run config.

    path: a data file or folder (.jsonl, .json, .csv, .parquet, .arrow), a list of them (mixed by
      mix_strategy), or, with `dataset`, a dataset_info.json (or the folder holding it).
    dataset: names in that dataset_info.json ("a,b" or a list), LLaMA-Factory's `dataset`.
    formatting, columns, tags: how `path`'s records map to examples (LLaMA-Factory's
      dataset_info.json keys; k2jax.data.formats); "auto" detects the form per record.
    template: the chat template, matching the model: kimi_k2, kimi_k2_thinking or kimi_k25.
    thinking: kimi_k25 only; False renders K2.5's instant (non-thinking) mode.
    seq_len: tokens per packed row; longer examples follow `overlong`.
    batch_size: rows per step over all hosts (divisible by the number of hosts).
    seed, shuffle: the epoch order of records is drawn from (seed, epoch); shuffle=False
      keeps file order.
    num_epochs: passes over the data; None repeats forever (the trainer counts steps).
    split_turns: one example per user turn; None does so where the template needs it.
    train_on_prompt: learn the prompt tokens too (LLaMA-Factory's flag; not with split turns).
    mask_history: learn only the last turn's answer (LLaMA-Factory's flag).
    overlong: an example longer than seq_len is "drop"ped as a bad example (counted, or raised
      under on_bad_example="error"); "split_turns": cut at turn boundaries into pieces that fit
      (each with the system prompt; `chat.fit_turns`; a plain text into seq_len pieces), a single
      turn longer than seq_len still dropped; "truncate": LLaMA-Factory's cutoff_len rule (the
      prompt loses its start, the answer its end, never all of it; k2jax.data.examples).
      Counted in the epoch summary. Never cut inside an answer unless "truncate".
    mix_strategy, interleave_probs: several datasets as one list ("concat") or interleaved by
      probability until the first ("interleave_under") or last ("interleave_over") runs out.
    val_size: the validation split: a fraction (< 1) or a count of each dataset's records, chosen
      by a hash of the record number; the training stream never sees them.
    strict: an unknown message key is a bad example ("unknown key") instead of a logged note.
    on_bad_example: "skip" (log, count, summarise) or "error" (raise at the first).
    media_dir: the folder relative image paths are in; None: the data file's folder (or
      dataset_info.json's). Images: k2jax.data.media.
    image_patches: vision patches per row (each image token is merge² = 4 of them); a row closes
      when the next example's images do not fit. None: seq_len · merge², as many as a row of
      image tokens could need. The vision tower's attention is dense in it: set it to what the
      images need (a 448×448 image is 1,024 patches).
    max_image_pixels: a larger image is a bad example ("invalid image"); Pillow's limit.
    """

    path: str | tuple[str, ...]
    dataset: str | tuple[str, ...] | None = None
    formatting: Literal["auto", "alpaca", "sharegpt"] = "auto"
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    template: str = "kimi_k2"
    thinking: bool = True
    seq_len: int = 4096
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    split_turns: bool | None = None
    train_on_prompt: bool = False
    mask_history: bool = False
    overlong: Literal["drop", "split_turns", "truncate"] = "drop"
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = "concat"
    interleave_probs: tuple[float, ...] | None = None
    val_size: float = 0.0
    strict: bool = False
    on_bad_example: Literal["skip", "error"] = "skip"
    media_dir: str | None = None
    image_patches: int | None = None
    max_image_pixels: int = MAX_PIXELS

    def __post_init__(self):
        check_field_types(self, "data")
        if not self.path:
            raise ConfigError("data.path: must name a data file or folder (or a list of them)")
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
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError(f"data.num_epochs: must be >= 1 or None, got {self.num_epochs}")
        if self.val_size < 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            raise ConfigError(
                f"data.val_size: a fraction in [0, 1) or a whole count, got {self.val_size}"
            )
        if self.interleave_probs is not None and (
            any(p < 0 for p in self.interleave_probs) or not sum(self.interleave_probs) > 0
        ):
            raise ConfigError("data.interleave_probs: must be >= 0 with a positive sum")
        if self.interleave_probs is not None and self.mix_strategy == "concat":
            raise ConfigError("data.interleave_probs: needs an interleave_* data.mix_strategy")
        if self.image_patches is not None and self.image_patches < 4:
            raise ConfigError(f"data.image_patches: must be >= 4 or None, got {self.image_patches}")
        if self.max_image_pixels < 1:
            raise ConfigError(f"data.max_image_pixels: must be >= 1, got {self.max_image_pixels}")
        if self.train_on_prompt and self.mask_history:
            raise ConfigError("data.mask_history and data.train_on_prompt exclude each other")
        if self.train_on_prompt and self.settings().split:
            raise ConfigError(
                "data.train_on_prompt: with split turns (data.split_turns, or a thinking "
                "template's default) each prompt would be learned once per later turn; set "
                "data.split_turns = False"
            )
        try:
            self.record_format()
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None

    def record_format(self) -> RecordFormat:
        return RecordFormat(self.formatting, dict(self.columns), dict(self.tags), self.strict)

    def settings(self) -> ExampleSettings:
        """What shapes the examples (k2jax.data.examples)."""
        t = get_template(self.template, thinking=self.thinking)
        split = t.strips_history_reasoning if self.split_turns is None else self.split_turns
        return ExampleSettings(
            t,
            split and not self.mask_history,
            self.train_on_prompt,
            self.mask_history,
            self.seq_len,
            self.overlong,
            max_image_pixels=self.max_image_pixels,
        )

    def for_path(self, path: str | tuple[str, ...], **changes) -> DataConfig:
        """These settings for other data (eval.path): no dataset_info names, mixture or split."""
        keep = {"dataset": None, "mix_strategy": "concat", "interleave_probs": None}
        return dataclasses.replace(self, path=path, val_size=0.0, **{**keep, **changes})


def _describe_path(path: str | tuple[str, ...]) -> str:
    return path if isinstance(path, str) else ", ".join(path)


# --------------------------------------------------------------------------------------------------
# One JSON line (kept for callers and tests that hold a line)
# --------------------------------------------------------------------------------------------------


def _line_examples(line: str, where: str, settings: ExampleSettings, tokenizer) -> list[Example]:
    parsed = RecordFormat().parse(_parse_json(line, where), where)
    return _examples.examples(parsed, where, tokenizer, settings)


def _parse_json(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(where, "invalid JSON", f"{e.msg} at column {e.colno}") from None


def _settings(template, thinking, split_turns, max_len=None) -> ExampleSettings:
    t = get_template(template, thinking=thinking)
    split = t.strips_history_reasoning if split_turns is None else split_turns
    overlong = "split_turns" if max_len is not None else "drop"
    return ExampleSettings(t, split, seq_len=max_len, overlong=overlong)


def check_line(line: str, where: str) -> None:
    """Raises the DataError that `conversation_examples` would raise for `line`, except "too
    long": the same parsing and checks, without a tokenizer."""
    parsed = RecordFormat().parse(_parse_json(line, where), where)
    _examples.check(parsed, where, _settings("kimi_k2", True, None))


def conversation_examples(
    line: str,
    where: str,
    tokenizer: KimiTokenizer,
    template: str,
    *,
    thinking: bool = True,
    split_turns: bool | None = None,
) -> list[tuple[EncodedChat, str]]:
    """The tokenized training examples of one JSON line, each with its `file:line (turn k)`."""
    s = _settings(template, thinking, split_turns)
    return [(e.chat, e.where) for e in _line_examples(line, where, s, tokenizer)]


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
    s = _settings(template, thinking, split_turns, max_len)
    out = _line_examples(line, where, s, tokenizer)
    firsts = frozenset(k for k, e in enumerate(out) if CUT in e.notes)
    return [(e.chat, e.where) for e in out], firsts


# --------------------------------------------------------------------------------------------------
# Checking the data before training
# --------------------------------------------------------------------------------------------------

_PROGRESS_MIN_LINES = 10_000  # no progress bar below this many lines (the check takes < 0.1 s)


@dataclasses.dataclass(frozen=True)
class DataCheck:
    """What `validate_data` found in `path`.

    lines: the non-blank records read; skipped: bad records by reason (the stream will skip
    exactly these, plus any example longer than data.seq_len); first_bad: the first few of them;
    notes: what the stream will log and count without skipping (unknown message keys, ...).
    """

    path: str
    lines: int
    skipped: dict[str, int]
    first_bad: tuple[DataError, ...]
    seconds: float
    notes: dict[str, int] = dataclasses.field(default_factory=dict)
    images: int = 0  # image parts in the usable records

    @property
    def usable(self) -> int:
        return self.lines - sum(self.skipped.values())

    def summary(self) -> str:
        text = f"data check: {self.lines:,} lines"
        if self.images:
            text += f" ({self.images:,} images)"
        if self.skipped:
            reasons = ", ".join(f"{r}: {n:,}" for r, n in sorted(self.skipped.items()))
            text += f", {sum(self.skipped.values()):,} will be skipped ({reasons})"
        if self.notes:
            text += ", notes (" + ", ".join(f"{r}: {n:,}" for r, n in sorted(self.notes.items()))
            text += ")"
        return text + f" ({self.path}, {self.seconds:.1f} s)"


class _Notices:
    """Logs the first few bad records and notes one by one, then only counts them; warns once per
    dataset about a column its records' form does not use."""

    def __init__(self, prefix: str):
        self.prefix, self.logged, self._unused = prefix, 0, set()

    def say(self, text: str) -> None:
        self.logged += 1
        if self.logged <= _LOG_FIRST_BAD:
            log.warning("%s%s", self.prefix, text)
            if self.logged == _LOG_FIRST_BAD:
                log.warning("%sfurther bad lines are only counted (notes too)", self.prefix)

    def unused(self, source: Source, columns: tuple[str, ...], where: str) -> None:
        for c in columns:
            if (source.name, c) not in self._unused:
                self._unused.add((source.name, c))
                log.warning(
                    "%s%s: column %r is not used by its record's form (first at %s)",
                    self.prefix,
                    source.name,
                    c,
                    where,
                )


def validate_data(config: DataConfig, *, progress: bool | None = None) -> DataCheck:
    """One cheap pass over every record of `config.path`, before anything expensive.

    Each non-blank record goes through the stream's own checks short of tokenizing: UTF-8, JSON,
    a known form, roles, message fields, content, tool calls and results, weights, an answer to
    learn. With `on_bad_example="error"` the first bad record is raised as a DataError
    ("file:line: reason: detail"); with "skip" the first few are logged one by one, all are
    counted by reason and the counts logged. Data without one good record is an error either way.
    Notes (unknown message keys) are logged and counted alike; with data.strict they are bad.
    The stream is not touched: its batches and resume fingerprint are the same with or without a
    check. Records are read through the readers' indexes (no file is loaded). Every record of
    every dataset is checked, validation records (data.val_size) included.

    progress: a tqdm bar on stderr for inputs of 10,000 records or more; None shows it only when
    stderr is a terminal.

    A function of the config rather than a `PackedBatches` method: it needs no tokenizer, so a
    trainer can run it before loading one (or a model), and a command can run it alone. (It
    builds its own indexes; that is a small part of its time.)

    Speed: ~21,000 lines/s of CPU time (~24 MB/s) on a generated 200,000-line, 230 MB JSONL file
    of 1-3 turn chats (OpenAI with reasoning, with tool calls, ShareGPT): 9.3 s of CPU, 10-15 s
    of wall time on one core of a shared 2-core VM; a third of it is `json.loads`. Ten million
    such lines would take ~8 minutes there; a terabyte model takes longer to load.
    """
    start = time.perf_counter()
    sources = open_sources(dataclasses.replace(config, val_size=0.0))  # every record
    settings = config.settings()
    total = sum(len(s) for s in sources)
    show = total >= _PROGRESS_MIN_LINES and (
        progress if progress is not None else sys.stderr.isatty()
    )
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="data check", unit="line", unit_scale=True, file=sys.stderr)
    blank, skipped, notes, first_bad, images = 0, {}, {}, [], 0
    say = _Notices("data check: ")
    done = 0
    try:
        for source in sources:
            for i in range(len(source)):
                done += 1
                if bar is not None and done % 4096 == 0:
                    bar.update(4096)
                where = source.records.where(i)
                try:
                    obj = source.records.read(i)
                    if obj is None:  # as in the stream: a blank line is no example
                        blank += 1
                        continue
                    parsed = source.format.parse(obj, where)
                    _examples.check(parsed, where, settings)
                except DataError as e:
                    if config.on_bad_example == "error":
                        raise
                    skipped[e.reason] = skipped.get(e.reason, 0) + 1
                    if len(first_bad) < _LOG_FIRST_BAD:
                        first_bad.append(e)
                    say.say(f"bad line, will be skipped: {e}")
                    continue
                say.unused(source, parsed.unused, where)
                if isinstance(parsed.example, Conversation):
                    images += len(_examples.image_parts(parsed.example))
                for note in parsed.notes:
                    notes[note] = notes.get(note, 0) + 1
                    say.say(f"{where}: {note}")
        if bar is not None:
            bar.update(total - bar.n)
    finally:
        if bar is not None:
            bar.close()
        for s in sources:
            s.records.close()
    check = DataCheck(
        _describe_path(config.path),
        total - blank,
        skipped,
        tuple(first_bad),
        time.perf_counter() - start,
        notes,
        images,
    )
    if not check.lines:
        raise DataError(check.path, "no data", "no non-empty lines")
    if not check.usable:
        raise DataError(check.path, "no usable examples", check.summary())
    if skipped or notes:
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
    position: int = 0  # index into the epoch's visiting order of records
    sub: int = 0  # example within that record (turns, pieces)
    examples: int = 0  # usable examples consumed in this epoch
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
    notes: dict[str, int] = dataclasses.field(default_factory=dict)  # note -> count


class PackedBatches(Iterator[dict[str, np.ndarray]]):
    """Iterator of packed SFT batches for this host (see the module docstring).

    Each batch: dict of numpy arrays [batch_size // process_count, seq_len] — tokens, targets,
    segment_ids, positions (int32) and loss_mask (float32: each learned token's weight, 1.0 unless
    a message says otherwise). Iteration ends after `num_epochs` (the last batch padded with
    empty rows) or never if `num_epochs` is None.

    split: "train", or "validation" — the records data.val_size set aside, in file order.
    images: the checkpoint's ImageProcessor, for a model with a vision tower: images in the
      data are read, and each batch also has `pixel_values` float32 [rows, data.image_patches,
      3·P·P] (each row's images' patches, in token order, zero-padded) and `image_grid_thw`
      int32 [rows, image_patches // merge², 3] (their grids, zero rows after the last). None:
      images in the data are bad examples.
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer: KimiTokenizer,
        *,
        process_index: int = 0,
        process_count: int = 1,
        state: Mapping[str, Any] | None = None,
        split: Literal["train", "validation"] = "train",
        images: ImageProcessor | None = None,
    ):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if config.batch_size % process_count:
            raise ConfigError(
                f"data.batch_size ({config.batch_size}) must be divisible by the number of "
                f"hosts ({process_count})"
            )
        if split == "validation" and not config.val_size:
            raise ConfigError("a validation split needs data.val_size > 0")
        self.config = config
        self.split = split
        self._tokenizer = tokenizer
        self._rows_per_host = config.batch_size // process_count
        self._first_row = process_index * self._rows_per_host
        self._settings = dataclasses.replace(config.settings(), images=images)
        self._images = images
        self._patch_cap = 0
        if images is not None:
            self._patch_cap = config.image_patches or config.seq_len * images.merge_size**2
        self._sources = open_sources(config, split)
        self._order = EpochOrder(self._sources, config, validation=split == "validation")
        self._fingerprint = self._make_fingerprint()
        self._cursor = _Cursor()
        self._batches = 0
        self._record: tuple[tuple[int, int], list[Example] | DataError] | None = None
        self._say = _Notices("data: ")
        self.last_epoch_summary: str | None = None  # summary() of the last finished epoch
        if state is not None:
            self._restore(state)

    # State -------------------------------------------------------------------------------------
    def _make_fingerprint(self) -> str:
        c = self.config
        settings: list[Any] = [c.template, c.thinking, self._settings.split, c.seed, c.shuffle]
        # Appended only when set, so states saved before these knobs existed still resume.
        if c.overlong != "drop":
            settings.append(c.overlong)
        extra = settings_of(c) | {
            k: v
            for k, v in [
                ("train_on_prompt", c.train_on_prompt),
                ("mask_history", c.mask_history),
                ("strict", c.strict),
                ("split", self.split != "train" and self.split),
                ("media_dir", c.media_dir),
                ("image_patches", self._patch_cap),
            ]
            if v
        }
        if extra:
            settings.append(extra)
        return (
            f"{_files_fingerprint(self._sources)}-"
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
            "notes": dict(c.notes),
            "batches": self._batches,
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        try:
            version, fingerprint = state["version"], state["fingerprint"]
            notes = {str(k): int(v) for k, v in dict(state.get("notes", {})).items()}
            if state.get("cut"):  # states saved when the only note was this count
                notes[CUT] = int(state["cut"])
            cursor = _Cursor(
                int(state["epoch"]),
                int(state["position"]),
                int(state["sub"]),
                int(state["examples"]),
                {str(k): int(v) for k, v in dict(state["skipped"]).items()},
                notes,
            )
            batches = int(state["batches"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed data state {state!r:.200}: {e}") from None
        if version != _STATE_VERSION:
            raise ValueError(f"data state version {version} is not {_STATE_VERSION}")
        if fingerprint != self._fingerprint:
            raise ValueError(
                f"the data state was saved for other data or settings (fingerprint {fingerprint}, "
                f"now {self._fingerprint}): {_describe_path(self.config.path)} or data.template/"
                "thinking/split_turns/overlong/seed/shuffle (or another data knob) changed since "
                "the checkpoint"
            )
        if not 0 <= cursor.position <= self._order.length:
            raise ValueError(f"data state position {cursor.position} is beyond the data")
        self._cursor, self._batches = cursor, batches

    @property
    def batches_yielded(self) -> int:
        return self._batches

    # Example stream ----------------------------------------------------------------------------
    def _record_examples(self) -> list[Example] | DataError:
        key = (self._cursor.epoch, self._cursor.position)
        if self._record is None or self._record[0] != key:
            d, i = self._order.at(*key)
            source = self._sources[d]
            where = source.records.where(i)
            value: list[Example] | DataError = []
            try:
                obj = source.records.read(i)
                if obj is not None:  # None: a blank line, no example
                    parsed = source.format.parse(obj, where)
                    self._say.unused(source, parsed.unused, where)
                    value = _examples.examples(parsed, where, self._tokenizer, self._settings)
            except DataError as e:
                value = e
            self._record = (key, value)
        return self._record[1]

    def _bad(self, error: DataError) -> None:
        if self.config.on_bad_example == "error":
            raise error
        skipped = self._cursor.skipped
        skipped[error.reason] = skipped.get(error.reason, 0) + 1
        self._say.say(f"skipping bad example {error}")

    def _pass(self, example: Example) -> None:
        """Moves past `example` (packed or skipped), counting its notes."""
        c = self._cursor
        for note in example.notes:
            c.notes[note] = c.notes.get(note, 0) + 1
            if not note.endswith("(data.overlong)"):  # the summary says those
                self._say.say(f"{example.where}: {note}")
        c.sub += 1

    def _peek(self) -> Example | None:
        """The next usable example (not consumed), skipping bad ones; None after the last epoch."""
        while True:
            c = self._cursor  # replaced at an epoch end
            if self.config.num_epochs is not None and c.epoch >= self.config.num_epochs:
                return None
            if c.position >= self._order.length:
                self._end_epoch()
                continue
            examples = self._record_examples()
            if isinstance(examples, DataError):
                self._bad(examples)
                c.position, c.sub = c.position + 1, 0
                continue
            if c.sub >= len(examples):
                c.position, c.sub = c.position + 1, 0
                continue
            example = examples[c.sub]
            if len(example.chat) > self.config.seq_len:
                self._bad(
                    DataError(
                        example.where,
                        "too long",
                        f"{len(example.chat)} tokens > data.seq_len {self.config.seq_len}",
                    )
                )
                self._pass(example)
                continue
            if _patches(example.chat) > self._patch_cap:
                self._bad(
                    DataError(
                        example.where,
                        "too many image patches",
                        f"{_patches(example.chat)} patches > data.image_patches {self._patch_cap}",
                    )
                )
                self._pass(example)
                continue
            return example

    def _end_epoch(self) -> None:
        c = self._cursor
        if c.examples == 0:
            raise DataError(
                _describe_path(self.config.path),
                "no usable examples",
                f"epoch {c.epoch}: {self.summary()}",
            )
        self.last_epoch_summary = self.summary()
        log.info("data: %s", self.last_epoch_summary)
        self._cursor = _Cursor(epoch=c.epoch + 1)

    def summary(self) -> str:
        """Counts of the current epoch so far: usable examples, notes (over-long examples cut
        or truncated, unknown keys) and skipped ones by reason."""
        c = self._cursor
        what = describe(self._sources) + (" (validation)" if self.split != "train" else "")
        text = f"epoch {c.epoch} of {what}: {c.examples} examples"
        for note, n in sorted(c.notes.items()):
            text += f", {n} {note}"
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
        used = patches = 0
        while (example := self._peek()) is not None:
            if used + len(example.chat) > self.config.seq_len:
                break
            if patches + _patches(example.chat) > self._patch_cap:
                break
            row.append(example.chat)
            used += len(example.chat)
            patches += _patches(example.chat)
            self._pass(example)
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
                loss_mask[r, o : o + n - 1] = ex.loss_weights[1:]
                segment_ids[r, o : o + n] = k + 1
                positions[r, o : o + n] = np.arange(n)
                o += n
        out = {
            "tokens": tokens,
            "targets": targets,
            "loss_mask": loss_mask,
            "segment_ids": segment_ids,
            "positions": positions,
        }
        if self._images is not None:
            pictures = [[p for ex in row for p in ex.images] for row in rows]
            P, merge = self._images.patch_size, self._images.merge_size**2
            out.update(
                _examples.image_arrays(
                    pictures, self._patch_cap, shape[0], features=3 * P * P, merge=merge
                )
            )
        return out

    def close(self) -> None:
        for s in self._sources:
            s.records.close()


def _patches(chat: EncodedChat) -> int:
    return _examples.num_patches(chat.images)


def packed_batches(
    config: DataConfig,
    tokenizer: KimiTokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    state: Mapping[str, Any] | None = None,
    split: Literal["train", "validation"] = "train",
    images: ImageProcessor | None = None,
) -> PackedBatches:
    """`PackedBatches(...)`: the batches of `config` for one host, optionally resumed from `state`."""
    return PackedBatches(
        config,
        tokenizer,
        process_index=process_index,
        process_count=process_count,
        state=state,
        split=split,
        images=images,
    )
