"""Kimi chat templates, rendered to text (for reading) and to token ids + a loss mask (for SFT).

Every Kimi model wraps each message in the same envelope (K2_FACTS §4.2):

    <|im_user|>user<|im_middle|>Hi<|im_end|><|im_assistant|>assistant<|im_middle|>Hello!<|im_end|>

`<|im_user|>` for user, `<|im_assistant|>` for assistant, `<|im_system|>` for everything else
(system, tool results, the tool declaration); the name between the role token and `<|im_middle|>`
is `message["name"]` or the role. On top of that envelope the three templates differ:

| template           | default system prompt | assistant body                  | generation prompt ends |
|--------------------|-----------------------|---------------------------------|------------------------|
| `kimi_k2`          | inserted              | content                         | `<|im_middle|>`        |
| `kimi_k2_thinking` | inserted              | `<think>{reasoning}</think>...` | `<|im_middle|>`        |
| `kimi_k25`         | none                  | `<think>{reasoning}</think>...` | `<think>` (thinking)   |
|                    |                       | `<think></think>...` (no think) | `<think></think>`      |

The default system prompt (`You are Kimi, an AI assistant created by Moonshot AI.`) is inserted
when the first message is not a system message, after the tool declaration. Tools are declared
first, as `<|im_system|>tool_declare<|im_middle|>{tools as compact JSON}<|im_end|>` (K2.5's own
tokenizer prefers a TypeScript-style rendering; we write its JSON fallback, keys sorted as its
`deep_sort_dict` does). An assistant's tool calls follow its content:

    <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0
    <|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>

(one line in reality). A call id already in Kimi's form `functions.{name}:{n}` is kept; any other id
(OpenAI's `call_abc...`) becomes `functions.{name}:{i}` with `i` the call's index in its message,
and the tool results that answer it are renamed to match, so the model learns ids its tool parser
(vLLM's kimi_k2) can read. A tool result renders as `## Return of {id}\\n{content}`.

**Reasoning and the history rule.** The thinking templates render the *current* turn's reasoning
but replace every earlier assistant message's reasoning with an empty `<think></think>`: the
official templates keep reasoning only after the last assistant message without tool calls. We
apply that rule to `messages[:-1]`, so when a conversation ends with the assistant's answer (an SFT
example) the answer keeps its reasoning; for a prompt (ending in a user or tool message) this is
exactly the official rule. Since a multi-turn conversation then shows different text for turn 1
depending on whether it is the last turn, it cannot be learned as one sequence: `split_turns`
makes one example per user turn, each learning only its own turn (`training_examples` does this
by default for the thinking templates). K2-Instruct has no reasoning channel; its template ignores
`reasoning_content`.

**Loss mask.** `encode_chat` returns token ids and a boolean mask that is True exactly on the
assistant tokens to learn: the body (think block, content, tool calls) and its closing
`<|im_end|>` — never the `<|im_assistant|>assistant<|im_middle|>` header, nor system, user, tool or
declaration turns. Structural tokens are emitted by id (`KimiTokenizer.encode_special`); every
content string is encoded as plain text, so a user typing `<|im_end|>` cannot end a turn. Text
between two structural tokens is encoded in one piece, which gives the same ids as tokenizing the
whole rendered string with Moonshot's tokenizer (specials split the text there too).

**What is learned** (the per-token loss weight, `EncodedChat.weights`). By default the
assistant messages selected by `train_on` (all of them, or those after the last user message)
are learned with weight 1 and every other token (system, user and tool turns, the tool
declaration, the default system prompt, assistant headers, answers not selected) with weight 0;
`train_on_prompt` gives those other tokens weight 1 too (LLaMA-Factory's flag). A message's own
`weight` (a number >= 0, OpenAI's fine-tuning field) or `train` (true/false: 1/0) multiplies all
of its tokens: `weight: 0` takes an answer out of the loss, 0.5 halves it. The loss is
sum(w · loss) / sum(w) over a batch (k2jax.model.loss), so fractional weights are honoured
exactly. A positive weight on a system/user/tool message without `train_on_prompt` would change
nothing and is an error, not a silent no-op.

**Images** (kimi_k25): image content parts render as the template's media block, none of it
learned (k2jax.data.media); `encode_chat(..., images=...)` reads each image for its pad count.
Pieces become ids in k2jax.data.encoded.

**Checks.** Everything rendering can reject (roles, field types, content parts, tool-call shapes,
tool results that answer no call) is checked in one place before anything is written, without a
tokenizer; `check_conversation` adds what a conversation needs to be trained on (content on every
message, something to learn in every assistant message, at least one of them). `training_examples`
applies both; the data check (`dataset.validate_data`) runs `check_conversation` on every line.

K2.5's default system prompt: Tinker's K2.5 renderer inserts K2's, the K2.5 Jinja template does
not (K2_FACTS §8.7); we follow the template.

Rejected alternative: running the checkpoint's own `chat_template.jinja` with jinja2. It needs the
file and a Jinja engine at training time, returns one string (the loss mask would have to be
recovered by rendering and tokenizing every prefix), and its tokenizer turns special-token text in
user content into special ids (`allowed_special="all"`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from k2jax.data.encoded import ChatFormatError, EncodedChat, ImageTokens, Piece, encode_pieces
from k2jax.data.media import ImagePart, image_part
from k2jax.data.tokenizer import KimiTokenizer

TEMPLATE_NAMES = ("kimi_k2", "kimi_k2_thinking", "kimi_k25")
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
ROLES = ("system", "user", "assistant", "tool")

_KIMI_CALL_ID = re.compile(r"functions\.\S+:\d+")


# --------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """What distinguishes one Kimi chat template from another (see the module docstring).

    reasoning: "none" — no think block (K2-Instruct); "current" — `<think>{reasoning}</think>` after
      the history boundary, `<think></think>` before it; "empty" — `<think></think>` everywhere
      (K2.5 with thinking off).
    """

    name: str
    default_system: str | None
    reasoning: Literal["none", "current", "empty"]
    generation_suffix: tuple[str, ...]  # special tokens after the generation prompt's header
    sort_tool_keys: bool

    @property
    def strips_history_reasoning(self) -> bool:
        """True if earlier turns render differently from the last one: SFT must split turns."""
        return self.reasoning == "current"


def get_template(name: str, *, thinking: bool = True) -> ChatTemplate:
    """The template `name` (one of TEMPLATE_NAMES); `thinking=False` is K2.5's instant mode."""
    if name == "kimi_k2":  # no reasoning channel: `thinking` changes nothing
        return ChatTemplate(name, DEFAULT_SYSTEM_PROMPT, "none", (), False)
    if name == "kimi_k2_thinking":
        if not thinking:
            raise ValueError("kimi_k2_thinking always thinks; thinking=False is for kimi_k25")
        return ChatTemplate(name, DEFAULT_SYSTEM_PROMPT, "current", (), False)
    if name == "kimi_k25":
        if thinking:
            return ChatTemplate(name, None, "current", ("<think>",), True)
        return ChatTemplate(name, None, "empty", ("<think>", "</think>"), True)
    raise ValueError(f"unknown chat template {name!r}; expected one of {', '.join(TEMPLATE_NAMES)}")


def _as_template(template: str | ChatTemplate) -> ChatTemplate:
    return template if isinstance(template, ChatTemplate) else get_template(template)


# --------------------------------------------------------------------------------------------------
# Rendering into pieces
# --------------------------------------------------------------------------------------------------


def _content(content: Any, where: str) -> tuple[str, tuple[str | ImagePart, ...]]:
    """(text, parts) of a message's content: a string, None, or a list of OpenAI text and image
    parts (k2jax.data.media). parts is () when there is no image, else text and ImageParts in
    order; text is the text parts joined."""
    if content is None:
        return "", ()
    if isinstance(content, str):
        return content, ()
    if isinstance(content, list):
        out: list[str | ImagePart] = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                out.append(part)
                continue
            try:
                image = image_part(part, f"{where}: content[{i}]")
            except ValueError as e:
                raise ChatFormatError(str(e), "unsupported content") from None
            if image is not None:
                out.append(image)
            elif (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                out.append(part["text"])
            else:
                raise ChatFormatError(
                    f"{where}: content[{i}] must be a string, a {{'type': 'text', 'text': ...}} "
                    f"or an image part, got {part!r:.80}"
                )
        text = "".join(p for p in out if isinstance(p, str))
        return text, (tuple(out) if any(isinstance(p, ImagePart) for p in out) else ())
    raise ChatFormatError(f"{where}: content must be a string, a list of parts or null")


def _reasoning_and_content(msg: Mapping[str, Any], where: str) -> tuple[str, str]:
    """(reasoning, content) of an assistant message.

    Reasoning comes from `reasoning_content` (or `reasoning`), or, if neither is given, from a
    content that starts with `<think>...</think>` (the DeepSeek-R1 style many datasets use).
    """
    content, _ = _content(msg.get("content"), where)
    for key in ("reasoning_content", "reasoning"):
        value = msg.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise ChatFormatError(f"{where}: {key} must be a string")
            return value, content
    if content.startswith("<think>") and "</think>" in content:
        reasoning, rest = content[len("<think>") :].split("</think>", 1)
        return reasoning, rest
    return "", content


def _has_reasoning(msg: Mapping[str, Any]) -> bool:
    return msg.get("reasoning_content") is not None or msg.get("reasoning") is not None


def _tool_arguments(args: Any, where: str) -> str:
    if isinstance(args, str):
        return args
    try:  # the templates' `tojson`: default separators, non-ASCII kept
        return json.dumps(args, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ChatFormatError(f"{where}: arguments are not JSON-serialisable: {e}") from None


@dataclasses.dataclass(slots=True)  # not frozen: built for every message of a data check
class _Turn:
    """One checked message in the form the renderer writes it.

    name: the text between the role token and `<|im_middle|>`. content: text (a tool result's
    without its `## Return of` line). calls: an assistant's tool calls as (rendered id, arguments
    text). call_id: the rendered id a tool result answers.
    """

    role: str
    name: str
    content: str
    reasoning: str = ""
    calls: tuple[tuple[str, str], ...] = ()
    call_id: str = ""
    weight: float = 1.0  # the message's own `weight` / `train`
    parts: tuple[str | ImagePart, ...] = ()  # text and images in order, when it has images


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[_Turn]:
    """Every message checked and put in render form; raises ChatFormatError.

    This is everything rendering can reject, done without a tokenizer: roles, field types,
    content parts, tool-call shapes, and tool results that answer no call. `render_pieces` renders
    from its result; `check_conversation` (and through it the data check) adds the training rules.
    """
    _check_roles(messages)
    return _turns(messages)


def _check_roles(messages: Sequence[Mapping[str, Any]]) -> None:
    """The list, the roles, names and who may call tools, over all messages before anything else:
    a conversation with a bad role is "unknown role" whatever else is wrong with it."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatFormatError("messages must be a non-empty list", "invalid message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"message {i}: expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(
                f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})",
                "unknown role",
            )
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise ChatFormatError(f"message {i} ({role}): name must be a string")
        if m.get("tool_calls") and role != "assistant":
            raise ChatFormatError(f"message {i} ({role}): only assistant messages have tool_calls")


def _message_weight(m: Mapping[str, Any], where: str) -> float:
    """A message's `weight` (a number >= 0) or `train` (a bool); 1 when it has neither."""
    weight, train = m.get("weight"), m.get("train")
    if train is not None and not isinstance(train, bool):
        raise ChatFormatError(f"{where}: train must be true or false, got {train!r}")
    if weight is not None and (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ChatFormatError(f"{where}: weight must be a number >= 0, got {weight!r}")
    if weight is not None and train is not None and (weight > 0) != train:
        raise ChatFormatError(f"{where}: train = {train} and weight = {weight} disagree")
    if weight is not None:
        return float(weight)
    return 0.0 if train is False else 1.0


def _turns(messages: Sequence[Mapping[str, Any]]) -> list[_Turn]:
    """The messages (roles already checked) in render form: content, reasoning, tool calls and
    the ids tool results answer, each checked."""
    turns: list[_Turn] = []
    id_map: dict[str, str] = {}  # original tool-call id -> rendered id
    pending: list[str] = []  # rendered ids of the latest tool calls not yet answered
    for i, m in enumerate(messages):
        role = m["role"]
        where = f"message {i} ({role})"
        name = m.get("name") or role
        weight = _message_weight(m, where)
        if role == "assistant":
            reasoning, content = _reasoning_and_content(m, where)
            _, parts = _content(m.get("content"), where)
            if parts:  # a `<think>` in content is not split off around images
                reasoning = reasoning if _has_reasoning(m) else ""
                content = "".join(p for p in parts if isinstance(p, str))
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ChatFormatError(f"{where}: tool_calls must be a list")
            rendered = []
            for j, call in enumerate(calls):
                call_id, args = _tool_call(call, j, f"{where} tool_calls[{j}]")
                orig = call.get("id")
                if isinstance(orig, str) and orig:
                    id_map[orig] = call_id
                rendered.append((call_id, args))
            if rendered:
                pending = [call_id for call_id, _ in rendered]
            turns.append(
                _Turn(role, name, content, reasoning, tuple(rendered), weight=weight, parts=parts)
            )
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if call_id is None or call_id == "":
                if not pending:
                    raise ChatFormatError(
                        f"{where}: no tool_call_id, and no earlier tool call is left to answer",
                        "unanswerable tool result",
                    )
                call_id = pending[0]
            elif not isinstance(call_id, str):
                raise ChatFormatError(f"{where}: tool_call_id must be a string")
            else:
                call_id = id_map.get(call_id, call_id)
            if call_id in pending:
                pending.remove(call_id)
            content, parts = _content(m.get("content"), where)
            turns.append(_Turn(role, name, content, call_id=call_id, weight=weight, parts=parts))
        else:
            content, parts = _content(m.get("content"), where)
            turns.append(_Turn(role, name, content, weight=weight, parts=parts))
    return turns


def check_conversation(
    messages: Sequence[Mapping[str, Any]],
    *,
    train_on_prompt: bool = False,
    last_turn: bool = False,
    prompt_messages: int = 0,
) -> None:
    """Raises ChatFormatError unless `messages` is a conversation to train on.

    Everything `training_examples` rejects, without a tokenizer (so without the length): what
    rendering rejects (`render_pieces`), plus the training rules:

    * a system, user or tool message needs `content` (a string, text parts, or "" for an
      explicitly empty one): missing or null content is "missing content";
    * an assistant message needs something to learn: content text, a reasoning, or tool_calls. A
      null or missing content is fine beside tool_calls or a reasoning (OpenAI's form allows it
      with tool_calls); with neither it is "missing content", and so is an empty one;
    * at least one assistant message ("no assistant turn"), after the first `prompt_messages`;
    * something learned: an answer with a positive weight (after the last user message, with
      `last_turn`), or `train_on_prompt` ("nothing to learn"); a positive weight on a message
      that is not an answer needs `train_on_prompt` ("invalid message").

    Rendering a prompt (`render`, `encode_chat`) does not apply these rules: a chat history may
    hold an empty reply.
    """
    _check_roles(messages)
    if not any(m["role"] == "assistant" for m in messages[prompt_messages:]):
        raise ChatFormatError(
            "the conversation has no assistant message"
            + (" in its completion" if prompt_messages else ""),
            "no assistant turn",
        )
    turns = _turns(messages)
    for i, (m, turn) in enumerate(zip(messages, turns)):
        absent = "missing" if "content" not in m else "null" if m["content"] is None else "empty"
        if turn.role == "assistant":
            if not (turn.content or turn.reasoning or turn.calls):
                raise ChatFormatError(
                    f"message {i} (assistant): content is {absent} and there is no "
                    "reasoning_content or tool_calls: nothing to learn",
                    "missing content",
                )
        elif m.get("content") is None:
            raise ChatFormatError(
                f"message {i} ({turn.role}): content is {absent} (expected a string, "
                'text parts, or "" for an empty message)',
                "missing content",
            )
    last_user = max((i for i, t in enumerate(turns) if t.role == "user"), default=-1)
    answers = [
        t
        for i, t in enumerate(turns)
        if t.role == "assistant" and i >= prompt_messages and (not last_turn or i > last_user)
    ]
    if not train_on_prompt:
        if not any(t.weight > 0 for t in answers):
            raise ChatFormatError(
                "every answer to learn has weight 0 (or train: false)", "nothing to learn"
            )
        for i, (m, t) in enumerate(zip(messages, turns)):
            if t.role != "assistant" and ("weight" in m or "train" in m) and t.weight > 0:
                raise ChatFormatError(
                    f"message {i} ({t.role}): a positive weight/train on a {t.role} message is "
                    "learned only with data.train_on_prompt"
                )


def render_pieces(
    messages: Sequence[Mapping[str, Any]],
    template: str | ChatTemplate,
    *,
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = False,
    train_on: Literal["auto", "all_assistant", "last_turn"] = "auto",
    train_on_prompt: bool = False,
    prompt: Sequence[bool] | None = None,
) -> list[Piece]:
    """Renders OpenAI-style `messages` into special/text pieces with loss weights.

    messages: dicts with `role` (system/user/assistant/tool), `content` (str, text parts or None),
      optional `name`; assistants may have `reasoning_content` and `tool_calls`
      (`[{"id", "function": {"name", "arguments"}}]`); tools have `tool_call_id`.
    tools: the OpenAI `tools` list, declared in a `tool_declare` turn.
    train_on: which assistant messages are learned. "last_turn": those after the last user
      message; "all_assistant": all; "auto": "last_turn" for templates that strip history
      reasoning, else "all_assistant".
    train_on_prompt: every token that is not a learned answer gets weight 1 too, not 0.
    prompt: True for the messages that are part of the prompt whatever their role (TRL's
      prompt/completion): their assistant messages are not answers.
    Each message's tokens are then multiplied by its own weight (see the module docstring).
    """
    t = _as_template(template)
    turns = _check_messages(messages)
    if train_on == "auto":
        train_on = "last_turn" if t.strips_history_reasoning else "all_assistant"
    if train_on not in ("all_assistant", "last_turn"):
        raise ValueError(
            f"train_on must be 'auto', 'all_assistant' or 'last_turn', not {train_on!r}"
        )
    last_user = max((i for i, m in enumerate(turns) if m.role == "user"), default=-1)
    # History boundary: reasoning is kept only after the last assistant message without tool calls
    # among messages[:-1] (see the module docstring).
    boundary = max(
        (i for i, m in enumerate(turns[:-1]) if m.role == "assistant" and not m.calls),
        default=-1,
    )

    pieces: list[Piece] = []
    other = 1.0 if train_on_prompt else 0.0  # the weight of what is not a learned answer

    def special(name: str, learn: float = other) -> None:
        pieces.append(Piece(name, True, learn))

    def text(s: str, learn: float = other) -> None:
        if s:
            pieces.append(Piece(s, False, learn))

    def header(role_token: str, name: str, w: float = other) -> None:
        special(role_token, w)
        text(name, w)
        special("<|im_middle|>", w)

    def content_of(m: _Turn, w: float) -> None:
        """A message's content: its text, or its text and images (k2jax.data.media)."""
        if not m.parts:
            text(m.content, w)
            return
        if t.name != "kimi_k25":
            raise ChatFormatError(
                f"{m.parts[0].where if isinstance(m.parts[0], ImagePart) else m.role}: images "
                f"need the kimi_k25 template (a K2.5/K2.6 model), not {t.name}",
                "unsupported content",
            )
        for p in m.parts:
            if isinstance(p, str):
                text(p, w)
                continue
            special("<|media_begin|>", 0.0)
            text("image", 0.0)
            special("<|media_content|>", 0.0)
            pieces.append(Piece("<|media_pad|>", True, 0.0, p))
            special("<|media_end|>", 0.0)
            text("\n", w)

    if tools:
        if not isinstance(tools, Sequence) or isinstance(tools, str):
            raise ChatFormatError("tools must be a list of tool declarations")
        try:
            body = json.dumps(
                list(tools), ensure_ascii=False, separators=(",", ":"), sort_keys=t.sort_tool_keys
            )
        except (TypeError, ValueError) as e:
            raise ChatFormatError(f"tools are not JSON-serialisable: {e}") from None
        header("<|im_system|>", "tool_declare")
        text(body)
        special("<|im_end|>")
    if t.default_system is not None and turns[0].role != "system":
        header("<|im_system|>", "system")
        text(t.default_system)
        special("<|im_end|>")

    for i, m in enumerate(turns):
        w = other * m.weight
        if m.role == "assistant":
            answer = (train_on == "all_assistant" or i > last_user) and not (prompt and prompt[i])
            learn = (1.0 if answer else other) * m.weight
            header("<|im_assistant|>", m.name, w)
            if t.reasoning != "none":
                special("<think>", learn)
                if t.reasoning == "current" and i > boundary:
                    text(m.reasoning, learn)
                special("</think>", learn)
            content_of(m, learn)
            if m.calls:
                special("<|tool_calls_section_begin|>", learn)
                for call_id, args in m.calls:
                    special("<|tool_call_begin|>", learn)
                    text(call_id, learn)
                    special("<|tool_call_argument_begin|>", learn)
                    text(args, learn)
                    special("<|tool_call_end|>", learn)
                special("<|tool_calls_section_end|>", learn)
            special("<|im_end|>", learn)
        elif m.role == "tool":
            header("<|im_system|>", m.name, w)
            text(f"## Return of {m.call_id}\n", w)
            content_of(m, w)
            special("<|im_end|>", w)
        else:
            header("<|im_user|>" if m.role == "user" else "<|im_system|>", m.name, w)
            content_of(m, w)
            special("<|im_end|>", w)

    if add_generation_prompt:
        header("<|im_assistant|>", "assistant", 0.0)
        for s in t.generation_suffix:
            special(s, 0.0)
    return pieces


def _tool_call(call: Any, index: int, where: str) -> tuple[str, str]:
    """(rendered id, arguments text) of one tool call in OpenAI or flat {name, arguments} form."""
    if not isinstance(call, Mapping):
        raise ChatFormatError(f"{where}: expected an object")
    fn = call.get("function", call)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatFormatError(f"{where}: needs function.name (a non-empty string)")
    call_id = call.get("id")
    if not (isinstance(call_id, str) and _KIMI_CALL_ID.fullmatch(call_id)):
        call_id = f"functions.{fn['name']}:{index}"
    return call_id, _tool_arguments(fn.get("arguments", {}), where)


def render(
    messages: Sequence[Mapping[str, Any]],
    template: str | ChatTemplate,
    *,
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as one string, special tokens written by name (for reading and tests)."""
    return "".join(
        p.text
        for p in render_pieces(
            messages, template, tools=tools, add_generation_prompt=add_generation_prompt
        )
    )


# --------------------------------------------------------------------------------------------------
# Token ids and loss mask
# --------------------------------------------------------------------------------------------------


def encode_chat(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: KimiTokenizer,
    template: str | ChatTemplate,
    *,
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = False,
    train_on: Literal["auto", "all_assistant", "last_turn"] = "auto",
    train_on_prompt: bool = False,
    prompt: Sequence[bool] | None = None,
    images: ImageTokens | None = None,
) -> EncodedChat:
    """Token ids + loss mask of a conversation (see `render_pieces` for the arguments;
    `images`: see `encode_pieces`)."""
    pieces = render_pieces(
        messages,
        template,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        train_on=train_on,
        train_on_prompt=train_on_prompt,
        prompt=prompt,
    )
    return encode_pieces(pieces, tokenizer, images)


def prefix_ends(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Where each prefix of `split_turns` ends (an index into `messages`)."""
    starts = _turn_starts(messages)[1:]
    out = []
    for end in [*starts, len(messages)]:
        begin = max((s for s in starts if s < end), default=0)
        if any(m.get("role") == "assistant" for m in messages[begin:end]):
            out.append(end)
    return out


def split_turns(messages: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """One prefix of `messages` per user turn that the assistant answers.

    A turn is a user message and everything up to the next user message (assistant replies, tool
    calls and results). Prefix k ends where turn k ends; a turn without an assistant message
    (e.g. a trailing question) gives no prefix. Leading system messages belong to every prefix.
    """
    return [list(messages[:end]) for end in prefix_ends(messages)]


def _turn_starts(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the user messages: where each turn begins."""
    return [i for i, m in enumerate(messages) if m.get("role") == "user"]


def fit_turns(
    messages: Sequence[Mapping[str, Any]],
    encode: Callable[[list[int]], EncodedChat],
    max_len: int,
    *,
    last_turn: bool,
) -> list[EncodedChat] | None:
    """A conversation longer than `max_len` tokens cut at turn boundaries (never inside one).

    `encode(indices)` tokenizes the messages at those indices. The messages before the first
    user turn (system prompts) head every piece. With `last_turn` (an example that learns only
    its last turn) the oldest turns are dropped until it fits: one piece, the answer and as much
    of its history as fits. Otherwise the turns are grouped greedily into consecutive pieces that
    each fit, so every assistant message is learned exactly once. None when a single turn (with
    the head) does not fit: nothing of it can be learned without cutting inside an answer.
    """
    starts = _turn_starts(messages)
    if not starts:
        return None
    head = list(range(starts[0]))
    turns = [list(range(a, b)) for a, b in itertools.pairwise([*starts, len(messages)])]
    if last_turn:
        for first in range(1, len(turns)):
            ex = encode(head + [i for t in turns[first:] for i in t])
            if len(ex) <= max_len:
                return [ex]
        return None
    pieces, i = [], 0
    while i < len(turns):
        best = None
        for j in range(i + 1, len(turns) + 1):  # the longest run of turns from i that fits
            ex = encode(head + [k for t in turns[i:j] for k in t])
            if len(ex) > max_len:
                break
            best = (j, ex)
        if best is None:
            return None
        i, ex = best
        if ex.loss_mask.any():  # a run of turns without an answer teaches nothing
            pieces.append(ex)
    return pieces


def training_examples(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: KimiTokenizer,
    template: str | ChatTemplate,
    *,
    tools: Sequence[Any] | None = None,
    split: bool | None = None,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    prompt_messages: int = 0,
    max_len: int | None = None,
    images: ImageTokens | None = None,
) -> list[EncodedChat | SplitExamples]:
    """The SFT examples of one conversation.

    split: True — one example per user turn (`split_turns`), each learning only its last turn;
      False — one example; None — split exactly when the template strips history reasoning
      (kimi_k2_thinking, kimi_k25 with thinking). Without splitting, a stripping template learns
      only the last turn (earlier turns show no reasoning there); other templates learn every
      assistant message.
    train_on_prompt: learn every token (LLaMA-Factory's flag); not with split turns, where each
      turn's prompt would be learned once per later turn.
    mask_history: learn only the last turn's answer (LLaMA-Factory's flag): one example, never
      split.
    prompt_messages: the first this many messages are the prompt (TRL prompt/completion).
    max_len: an example longer than this is cut at turn boundaries (`fit_turns`) and given as
      one `SplitExamples` of its pieces; when it cannot be (one turn is too long by itself) it
      stays as it is, for the caller to count as too long. None: never cut.
    images: reads an image (see `encode_pieces`); each example reads its own images, so a
      conversation split into turns reads an early image once per later turn.
    A per-turn example whose answer has weight 0 is left out (`check_conversation` makes sure
    something is learned).
    """
    t = _as_template(template)
    if split is None:
        split = t.strips_history_reasoning
    split = split and not mask_history
    if train_on_prompt and split:
        raise ValueError(
            "train_on_prompt with split turns would learn each prompt once per later turn: "
            "set split_turns=False (or mask_history)"
        )
    # Whether an example learns only its last turn (a stripping template's "auto" does too).
    last_turn = split or mask_history or t.strips_history_reasoning
    check_conversation(
        messages,
        train_on_prompt=train_on_prompt,
        last_turn=last_turn and not split,
        prompt_messages=prompt_messages,
    )
    train_on = "last_turn" if last_turn else "all_assistant"

    def encode(indices: list[int]) -> EncodedChat:
        return encode_chat(
            [messages[i] for i in indices],
            tokenizer,
            t,
            tools=tools,
            train_on=train_on,
            train_on_prompt=train_on_prompt,
            prompt=[i < prompt_messages for i in indices] if prompt_messages else None,
            images=images,
        )

    out: list[EncodedChat | SplitExamples] = []
    for end in prefix_ends(messages) if split else [len(messages)]:
        ex = encode(list(range(end)))
        if not ex.loss_mask.any():  # this turn's answer has weight 0
            continue
        if max_len is not None and len(ex) > max_len:
            fitted = fit_turns(messages[:end], encode, max_len, last_turn=last_turn)
            if fitted:
                out.append(SplitExamples(fitted))
                continue
        out.append(ex)
    return out


@dataclasses.dataclass(frozen=True)
class SplitExamples:
    """The pieces `fit_turns` cut one over-long example into (training_examples with max_len)."""

    pieces: list[EncodedChat]
