"""One record in any common dataset form -> a conversation (or a plain text) in one shape.

A record is a dict (a JSON object, a CSV row, a Parquet/Arrow row; `k2jax.data.readers`). Without
a declared format, the first of these keys it has decides (`formatting = "auto"`):

| keys                         | form                      | becomes                                     |
|------------------------------|---------------------------|---------------------------------------------|
| `messages` / `conversations` | OpenAI (`role`/`content`) | the messages; `system`, `tools` keys too    |
|                              | or ShareGPT (`from`/`value`) per message                                |
| `prompt` + `completion`      | TRL prompt/completion     | message lists: prompt messages + completion |
|                              |                           | strings: plain text, loss on the completion |
| `instruction` (+ `output`)   | alpaca                    | [system], history pairs, user, assistant    |
| `text`                       | plain text                | continued pre-training: loss on every token |

An alpaca prompt is `instruction`, or `instruction + "\\n" + input` when `input` is not empty;
`history` is a list of `[prompt, response]` pairs before it, whose responses are learned too
(unless `data.mask_history`), as in LLaMA-Factory. TRL's string prompt/completion is a language
modelling pair without a chat template, as TRL trains it; its message lists use the template,
with the prompt's assistant messages (few-shot examples) not learned. A string where a list is
expected (`messages`, `history`, `tools` in a CSV or Parquet column) is read as JSON.

**Declared formats.** LLaMA-Factory's `dataset_info.json` names a dataset's `formatting`
("alpaca" or "sharegpt"), its `columns` (prompt, query, response, history, messages, system,
tools) and, for sharegpt, its `tags` (role_tag, content_tag, user_tag, assistant_tag,
observation_tag, function_tag, system_tag), with LLaMA-Factory's defaults for what is left out.
`RecordFormat.from_dataset_info` reads one entry; `data.formatting/columns/tags` say the same
for `data.path`. An alpaca entry whose columns name only `prompt` is LLaMA-Factory's pre-training
form: the prompt column is a plain text.

**Images** (Kimi-K2.5): image parts in OpenAI contents, or an `images` column (auto: the
`images` key; declared: `columns.images`) whose `<image>` placeholders in the messages' text
stand for its paths in order — both become image parts with absolute paths (`RecordFormat.
media_dir`; k2jax.data.media); a placeholder count that does not match is "invalid image".

**Nothing is ignored silently.** A message key k2jax does not know (see `MESSAGE_KEYS`) is a note
("unknown key 'x' in message 2") that the stream logs with the record's file:line and counts, or,
with `strict`, a bad record ("unknown key"). A record's columns that its form does not use are
returned (`Parsed.unused`) for the caller to warn about once per dataset. None-valued fields are
absent (columnar files fill missing struct fields with nulls), except a message's content.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from k2jax.data.media import attach_images
from k2jax.data.readers import DataError

# Message keys the chat templates read (k2jax.data.chat), OpenAI's names.
MESSAGE_KEYS = frozenset(
    {
        "role",
        "content",
        "name",
        "reasoning_content",
        "reasoning",
        "tool_calls",
        "tool_call_id",
        "weight",
        "train",
    }
)
COLUMN_KEYS = (
    "prompt",
    "query",
    "response",
    "history",
    "messages",
    "system",
    "tools",
    "images",
)
_UNSUPPORTED_COLUMNS = ("videos", "audios", "chosen", "rejected", "kto_tag")
TAG_KEYS = (
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "observation_tag",
    "function_tag",
    "system_tag",
)
# LLaMA-Factory's defaults (its data/README.md).
_ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
_SHAREGPT_COLUMNS = {"messages": "conversations"}
_SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
# The roles an undeclared ShareGPT list may use.
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
# dataset_info.json entry keys: read, or harmless at these values.
_INFO_KEYS = {"file_name", "formatting", "columns", "tags", "num_samples"}
_INFO_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "script_url", "cloud_file_name")
_INFO_DEFAULTS = {"ranking": False, "split": "train", "subset": None, "folder": None}


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A conversation in OpenAI form: `messages` as `chat` takes them, optional `tools`.

    prompt_messages: the first this many messages are the prompt (TRL prompt/completion): their
    assistant messages are not learned.
    """

    messages: list[dict[str, Any]]
    tools: list[Any] | None = None
    prompt_messages: int = 0


@dataclasses.dataclass(frozen=True)
class Text:
    """A plain text learned whole (pre-training), after an optional prompt learned only with
    data.train_on_prompt (TRL's string prompt/completion)."""

    text: str
    prompt: str = ""


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A record in one shape: the example, notes to log and count, and the unused columns."""

    example: Conversation | Text
    notes: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """How the records of one dataset map to examples (see the module docstring).

    formatting: "auto" (by keys, per record), "alpaca" or "sharegpt". columns, tags: LLaMA-
    Factory's names (`COLUMN_KEYS`, `TAG_KEYS`) -> the record's; only with a declared formatting.
    strict: an unknown message key is a bad record instead of a note.
    media_dir: the folder relative image paths are in (k2jax.data.media); None: the working
      directory.
    """

    formatting: Literal["auto", "alpaca", "sharegpt"] = "auto"
    columns: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    strict: bool = False
    media_dir: str | None = None

    def __post_init__(self):
        where = "data.formatting"
        if self.formatting not in ("auto", "alpaca", "sharegpt"):
            raise ValueError(
                f"{where}: expected 'auto', 'alpaca' or 'sharegpt', got {self.formatting!r}"
            )
        for what, got, known in (
            ("columns", self.columns, COLUMN_KEYS),
            ("tags", self.tags, TAG_KEYS),
        ):
            for key, value in got.items():
                if key in _UNSUPPORTED_COLUMNS:
                    raise ValueError(
                        f"{what}.{key}: k2jax trains SFT on text and still images only (no "
                        "audio, video or preference pairs)"
                    )
                if key not in known:
                    raise ValueError(f"{what}: unknown key {key!r} (known: {', '.join(known)})")
                if not isinstance(value, str) or not value:
                    raise ValueError(f"{what}.{key}: expected a column/key name, got {value!r}")
        if self.formatting == "auto" and (self.columns or self.tags):
            raise ValueError("columns and tags need a declared formatting (alpaca or sharegpt)")
        if self.formatting == "alpaca" and self.tags:
            raise ValueError("tags are for the sharegpt formatting")

    @classmethod
    def from_dataset_info(cls, name: str, entry: Any, source: str, *, strict: bool = False):
        """(file_name, RecordFormat, num_samples) of one dataset_info.json entry; ValueError
        naming `source` and the dataset for what k2jax cannot honour."""
        at = f"{source}: dataset {name!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{at}: expected an object")
        for key in _INFO_HUB_KEYS:
            if entry.get(key):
                raise ValueError(f"{at}: {key}: k2jax reads local files only (no downloads)")
        for key, value in entry.items():
            if key in _INFO_KEYS or key in _INFO_HUB_KEYS:
                continue
            if key in _INFO_DEFAULTS:
                if value != _INFO_DEFAULTS[key]:
                    raise ValueError(
                        f"{at}: {key} = {value!r} is not supported (k2jax trains SFT on local files)"
                    )
                continue
            raise ValueError(f"{at}: unknown key {key!r}")
        if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            raise ValueError(f"{at}: needs file_name (a file or folder beside dataset_info.json)")
        num = entry.get("num_samples")
        if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
            raise ValueError(f"{at}: num_samples must be a positive integer, got {num!r}")
        try:
            fmt = cls(
                entry.get("formatting", "alpaca"),
                dict(entry.get("columns") or {}),
                dict(entry.get("tags") or {}),
                strict,
            )
        except (ValueError, TypeError) as e:
            raise ValueError(f"{at}: {e}") from None
        return entry["file_name"], fmt, num

    # Parsing ------------------------------------------------------------------------------------
    def parse(self, obj: Any, where: str) -> Parsed:
        """The record `obj` as a Conversation or Text; DataError naming `where`."""
        if not isinstance(obj, dict):
            raise DataError(
                where, "unknown format", f"expected a JSON object, got {type(obj).__name__}"
            )
        obj = {k: v for k, v in obj.items() if v is not None}
        notes: list[str] = []
        if self.formatting == "alpaca":
            columns = {**_ALPACA_COLUMNS, **self.columns}
            if set(self.columns) == {"prompt"}:  # LLaMA-Factory's pre-training form
                return self._done(
                    Text(_string(obj, columns["prompt"], where)), obj, {columns["prompt"]}, notes
                )
            example, used = self._alpaca(obj, columns, where, notes)
        elif self.formatting == "sharegpt":
            columns = {**_SHAREGPT_COLUMNS, **self.columns}
            tags = {**_SHAREGPT_TAGS, **self.tags}
            example, used = self._chat(obj, columns, tags, where, notes)
        else:
            example, used = self._auto(obj, where, notes)
        if isinstance(example, Conversation):
            example = self._images(example, obj, used, where)
        return self._done(example, obj, used, notes)

    def _images(self, conv: Conversation, obj: dict, used: set, where: str) -> Conversation:
        """The conversation with its images attached and their paths resolved (media.py)."""
        column = self.columns.get("images") if self.formatting != "auto" else "images"
        images = _json_list(obj, column, where) if column and column in obj else None
        if column in obj:
            used.add(column)
        has_parts = any(isinstance(m.get("content"), list) for m in conv.messages)
        if images is None and not has_parts:
            return conv
        base = Path(self.media_dir) if self.media_dir else None
        try:
            messages = attach_images(conv.messages, images, base)
        except ValueError as e:
            raise DataError(where, "invalid image", str(e)) from None
        return dataclasses.replace(conv, messages=messages)

    @staticmethod
    def _done(example, obj, used, notes) -> Parsed:
        return Parsed(example, tuple(notes), tuple(k for k in obj if k not in used))

    def _auto(self, obj: dict, where: str, notes: list[str]):
        for key in ("messages", "conversations"):
            if key in obj:
                columns = {"messages": key, "system": "system", "tools": "tools"}
                return self._chat(obj, columns, None, where, notes)
        if "prompt" in obj and "completion" in obj:
            return self._prompt_completion(obj, where, notes)
        if "instruction" in obj:
            columns = {
                **_ALPACA_COLUMNS,
                "system": "system",
                "history": "history",
                "tools": "tools",
            }
            return self._alpaca(obj, columns, where, notes)
        if "text" in obj:
            return Text(_string(obj, "text", where)), {"text"}
        raise DataError(
            where,
            "unknown format",
            "expected one of the keys messages (OpenAI), conversations (ShareGPT), prompt + "
            "completion (TRL), instruction (alpaca) or text (plain text); got "
            + (", ".join(map(repr, list(obj)[:8])) or "an empty object"),
        )

    def _alpaca(self, obj, columns, where, notes):
        c = columns
        prompt = _string(obj, c["prompt"], where)
        query = obj.get(c["query"], "")
        if not isinstance(query, str):
            raise DataError(where, "invalid message", f"{c['query']!r} must be a string")
        if c["response"] not in obj:
            raise DataError(where, "missing content", f"no {c['response']!r} (the response)")
        response = _string(obj, c["response"], where)
        messages: list[dict[str, Any]] = []
        system = obj.get(c["system"]) if "system" in c else None
        if system:
            if not isinstance(system, str):
                raise DataError(where, "invalid message", f"{c['system']!r} must be a string")
            messages.append({"role": "system", "content": system})
        history = _json_list(obj, c.get("history"), where) or []
        for k, pair in enumerate(history):
            if not (
                isinstance(pair, (list, tuple))
                and len(pair) == 2
                and all(isinstance(x, str) for x in pair)
            ):
                raise DataError(
                    where,
                    "invalid message",
                    f"{c['history']}[{k}] must be a [prompt, response] pair of strings",
                )
            messages += [
                {"role": "user", "content": pair[0]},
                {"role": "assistant", "content": pair[1]},
            ]
        messages.append({"role": "user", "content": prompt + ("\n" + query if query else "")})
        messages.append({"role": "assistant", "content": response})
        used = {c[k] for k in ("prompt", "query", "response", "system", "history") if k in c}
        tools = self._tools(obj, c.get("tools"), where)
        if "tools" in c:
            used.add(c["tools"])
        return Conversation(messages, tools), used

    def _prompt_completion(self, obj, where, notes):
        prompt, completion = obj["prompt"], obj["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return Text(completion, prompt), {"prompt", "completion"}
        prompt = _json_list(obj, "prompt", where)
        completion = _json_list(obj, "completion", where)
        head = self._messages(prompt, None, where, notes, "prompt")
        tail = self._messages(completion, None, where, notes, "completion", offset=len(head))
        tools = self._tools(obj, "tools", where)
        return Conversation(head + tail, tools, prompt_messages=len(head)), {
            "prompt",
            "completion",
            "tools",
        }

    def _chat(self, obj, columns, tags, where, notes):
        key = columns["messages"]
        if key not in obj:
            raise DataError(where, "unknown format", f"no {key!r} (the messages column)")
        messages = self._messages(_json_list(obj, key, where), tags, where, notes, key)
        used = {key}
        system_col = columns.get("system")
        if system_col and system_col in obj:
            used.add(system_col)
            system = obj[system_col]
            if not isinstance(system, str):
                raise DataError(where, "invalid message", f"{system_col!r} must be a string")
            if system and messages and messages[0]["role"] == "system":
                notes.append(
                    f"the {system_col!r} column is not used: the first message is a system message"
                )
            elif system:
                messages.insert(0, {"role": "system", "content": system})
        tools = None
        if columns.get("tools"):
            used.add(columns["tools"])
            tools = self._tools(obj, columns["tools"], where)
        return Conversation(messages, tools), used

    def _messages(self, items, tags, where, notes, what, offset=0) -> list[dict[str, Any]]:
        """OpenAI messages from a list of OpenAI or ShareGPT ones (`tags`: declared ShareGPT)."""
        if not isinstance(items, list):
            raise DataError(where, "unknown format", f"{what!r} must be a list of messages")
        out = []
        for i, item in enumerate(items):
            at = f"{what}[{i}]"
            if not isinstance(item, dict):
                raise DataError(where, "unknown format", f"{at} must be an object")
            item = {k: v for k, v in item.items() if v is not None or k in ("content", "value")}
            if tags is not None:
                message = self._tagged(item, tags, where, at)
            elif "role" in item:
                message = dict(item)
            elif "from" in item:
                message = self._tagged(item, None, where, at)
            else:
                raise DataError(where, "unknown format", f"{at} has neither 'role' nor 'from'")
            for key in [k for k in message if k not in MESSAGE_KEYS]:
                if self.strict:
                    raise DataError(
                        where,
                        "unknown key",
                        f"{at} has {key!r} (known: {', '.join(sorted(MESSAGE_KEYS))}; "
                        "data.strict is set)",
                    )
                notes.append(f"unknown key {key!r} in a message")
                del message[key]
            out.append(message)
        return out

    def _tagged(self, item, tags, where, at) -> dict[str, Any]:
        """One ShareGPT message in OpenAI form. tags None: the undeclared form (from/value and
        the usual role names)."""
        role_tag, content_tag = (
            (tags["role_tag"], tags["content_tag"]) if tags else ("from", "value")
        )
        source = item.get(role_tag)
        if tags:
            roles = {
                tags["user_tag"]: "user",
                tags["assistant_tag"]: "assistant",
                tags["observation_tag"]: "tool",
                tags["function_tag"]: "function_call",
                tags["system_tag"]: "system",
            }
        else:
            roles = {**_SHAREGPT_ROLES, "function_call": "function_call"}
        role = roles.get(source) if isinstance(source, str) else None
        if role is None:
            raise DataError(
                where,
                "unknown role",
                f"{at}.{role_tag} = {source!r} (expected one of {', '.join(map(str, roles))})",
            )
        if content_tag not in item or item[content_tag] is None:
            state = "null" if content_tag in item else "missing"
            raise DataError(
                where,
                "missing content",
                f'{at}.{content_tag} is {state} (write "" for an empty message)',
            )
        value = item[content_tag]
        rest = {k: v for k, v in item.items() if k not in (role_tag, content_tag)}
        if role == "function_call":
            calls = value
            if isinstance(value, str):
                try:
                    calls = json.loads(value)
                except json.JSONDecodeError as e:
                    raise DataError(
                        where, "invalid message", f"{at} function call: {e.msg}"
                    ) from None
            calls = calls if isinstance(calls, list) else [calls]
            return {"role": "assistant", "content": "", "tool_calls": calls, **rest}
        if not isinstance(value, str):
            raise DataError(where, "invalid message", f"{at}.{content_tag} must be a string")
        return {"role": role, "content": value, **rest}

    @staticmethod
    def _tools(obj, column, where) -> list[Any] | None:
        tools = obj.get(column) if column else None
        if isinstance(tools, str):  # some exports store the tool list as a JSON string
            try:
                tools = json.loads(tools) if tools.strip() else None
            except json.JSONDecodeError as e:
                raise DataError(
                    where, "invalid tools", f"{column!r} is a string but not JSON: {e.msg}"
                ) from None
        if tools is not None and not isinstance(tools, list):
            raise DataError(where, "invalid tools", f"{column!r} must be a list")
        return tools or None


def _string(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if value is None:
        raise DataError(where, "missing content", f"{key!r} is missing or null")
    if not isinstance(value, str):
        raise DataError(
            where, "invalid message", f"{key!r} must be a string, got {type(value).__name__}"
        )
    return value


def _json_list(obj: dict, key: str | None, where: str) -> list | None:
    """obj[key] as a list: a list, or a string holding a JSON list (CSV, some Parquet)."""
    if key is None or key not in obj:
        return None
    value = obj[key]
    if isinstance(value, str) and not value.strip():  # an empty CSV cell
        return None
    if isinstance(value, str):
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
    if not isinstance(value, list):
        raise DataError(
            where, "unknown format", f"{key!r} must be a list (or a JSON string of one)"
        )
    return value
