"""KV-cached sampling: prefill a prompt, then decode one token at a time, all under jit.

    from k2jax.generate import Sampling, generate_tokens
    out = generate_tokens(module, variables, [prompt_ids], max_new_tokens=64,
                          sampling=Sampling(temperature=0.6, top_p=0.95), stop_ids=(im_end,))

The cache is MLA's compressed one (k2jax.model.mla): per layer and token the normalised latent
c_kv [Rkv] and the rotated shared key k_rope [Dr] — 576 numbers per token and layer for Kimi-K2,
35× less than per-head keys and values (20,480). `Transformer.decode` writes a step's tokens into
the cache at their positions and attends over it with W_kvb absorbed into query and output.

The loop. `generate_tokens` compiles one program: a prefill of the (right-padded) prompts, then a
`lax.while_loop` that records the sampled token, marks rows that produced a stop token as done,
runs the one-token decode step and samples the next token; it stops after `max_new_tokens` or
when every row is done. `stream_tokens` runs the same prefill and step functions from Python, one
jitted step per token, so a chat can print text as it arrives (the while-loop program cannot hand
tokens out before it ends). Both split the PRNG key identically, so they produce the same tokens.

Shapes are bucketed (prompt length and cache length rounded up to `bucket`), so a chat whose
prompt grows by a few tokens per turn reuses compiled programs instead of recompiling each turn.
A right-padded prompt is exact: padding is written to cache slots past a row's end, and the row's
next real token overwrites a slot before any query can see it (queries see slots ≤ their position).
On a mesh the model runs as in training (expert-parallel MoE), with the batch padded to a multiple
of the device count.

Sampling (`Sampling`, applied in this order on float32 logits; the settings are traced values, so
changing them recompiles nothing): temperature 0 is greedy (argmax); otherwise logits are divided
by the temperature, then top-p keeps the smallest set of most likely tokens whose probability
reaches `top_p` (ties at the cut-off are kept) and min-p keeps tokens whose probability is at
least `min_p` × the largest probability; both filters look at the temperature-scaled distribution
(as transformers' and vLLM's samplers do) and a token must pass both. The most likely token always
passes, so the filtered distribution is never empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.config import ConfigError, check_field_types
from k2jax.model.transformer import Transformer, init_cache

__all__ = [
    "Generation",
    "Sampling",
    "TextStream",
    "filter_logits",
    "generate",
    "generate_tokens",
    "prompt_ids",
    "sample_tokens",
    "split_reasoning",
    "stream_tokens",
    "template_for",
]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (see the module docstring). temperature 0 = greedy."""

    temperature: float = 0.6
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        check_field_types(self, "sampling")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"sampling.min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature-scaled float32 logits with the tokens top-p / min-p reject set to −inf
    (greedy sampling: the logits unchanged)."""
    return _filter(logits_BV, _knobs(sampling))


def sample_tokens(logits_BV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token id per row [B] int32: argmax when greedy, else a draw from `filter_logits`."""
    return _sample(logits_BV, key, _knobs(sampling))


def _knobs(sampling: Sampling) -> jax.Array:
    # The settings are traced values, not compile-time constants: changing the temperature of a
    # chat does not recompile the decode step.
    return jnp.asarray([sampling.temperature, sampling.top_p, sampling.min_p], jnp.float32)


def _filter(logits_BV, knobs):
    temperature, top_p, min_p = knobs[0], knobs[1], knobs[2]
    logits = logits_BV.astype(jnp.float32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    probs = jax.nn.softmax(scaled, axis=-1)
    sorted_p = -jnp.sort(-probs, axis=-1)
    # a token is kept if the mass of the tokens strictly more likely than it is < top_p
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    n_keep = jnp.sum(before < top_p, axis=-1, keepdims=True)  # ≥ 1
    cutoff = jnp.take_along_axis(sorted_p, jnp.maximum(n_keep, 1) - 1, axis=-1)
    keep = (probs >= cutoff) | (top_p >= 1)
    keep &= probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(temperature > 0, jnp.where(keep, scaled, -jnp.inf), logits)


def _sample(logits_BV, key, knobs):
    greedy = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    drawn = jax.random.categorical(key, _filter(logits_BV, knobs), axis=-1).astype(jnp.int32)
    return jnp.where(knobs[0] > 0, drawn, greedy)


# ---------------------------------------------------------------------------------------------
# Prefill, step and the fused loop (module and settings static; variables are traced)


def _prefill(
    module: Transformer, variables, tokens_BP, lengths_B, key, knobs, max_len, images=None
):
    B, P = tokens_BP.shape
    cache = init_cache(module.cfg, B, max_len, module.compute.jnp_dtype)
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    logits, mutated = module.apply(
        {**variables, "cache": cache},
        tokens_BP,
        positions,
        lengths_B - 1,
        images,
        method=Transformer.decode,
        mutable=["cache"],
    )
    key, sub = jax.random.split(key)
    return mutated["cache"], _sample(logits, sub, knobs), key


def _step(module: Transformer, variables, cache, token_B, position_B, key, knobs):
    logits, mutated = module.apply(
        {**variables, "cache": cache},
        token_B[:, None],
        position_B[:, None],
        method=Transformer.decode,
        mutable=["cache"],
    )
    key, sub = jax.random.split(key)
    return mutated["cache"], _sample(logits[:, 0], sub, knobs), key


_prefill_jit = jax.jit(_prefill, static_argnames=("module", "max_len"))
_step_jit = jax.jit(_step, static_argnames=("module",), donate_argnames=("cache",))


@functools.partial(jax.jit, static_argnames=("module", "max_len", "max_new_tokens"))
def _generate_loop(
    module, variables, tokens_BP, lengths_B, key, knobs, stop, max_len, max_new_tokens, images
):
    """Tokens [B, max_new_tokens] int32; −1 after a row's stop token (or where it stopped).
    `stop` [n] int32: stop ids, padded with −1 (which no token equals)."""
    B = tokens_BP.shape[0]
    cache, token, key = _prefill(
        module, variables, tokens_BP, lengths_B, key, knobs, max_len, images
    )

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, out, cache, token, done, key = state
        out = out.at[:, i].set(jnp.where(done, -1, token))
        done = done | jnp.isin(token, stop)
        cache, token, key = _step(module, variables, cache, token, lengths_B + i, key, knobs)
        return i + 1, out, cache, token, done, key

    out = jnp.full((B, max_new_tokens), -1, jnp.int32)
    state = (jnp.int32(0), out, cache, token, jnp.zeros((B,), bool), key)
    return jax.lax.while_loop(cond, body, state)[1]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@contextlib.contextmanager
def _on_mesh(mesh):
    """Runs the model on `mesh` the way training does (k2jax.sharding.use_mesh: expert-parallel
    MoE, activations sharded by the rules table), so routed experts stay where they live instead
    of being gathered. `_prepare` pads the batch to a multiple of the mesh size for it (the MoE
    splits tokens over every device); the extra rows repeat the last prompt and are dropped."""
    if mesh is None or mesh.size == 1:
        yield
        return
    from k2jax.sharding import use_mesh

    with use_mesh(mesh):
        yield


def _prepare(module: Transformer, prompts, max_new_tokens: int, bucket: int, mesh=None):
    cfg = module.cfg
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    if not prompts:
        raise ValueError("no prompts given")
    rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    for i, r in enumerate(rows):
        if r.size == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token")
        if r.min() < 0 or r.max() >= cfg.vocab_size:
            raise ValueError(f"prompt {i}: token ids must be in [0, {cfg.vocab_size})")
    longest = max(r.size for r in rows)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({cfg.max_position_embeddings})"
        )
    P = _round_up(longest, bucket)
    if mesh is not None and mesh.size > 1:
        rows += [rows[-1]] * (_round_up(len(rows), mesh.size) - len(rows))
    tokens = np.zeros((len(rows), P), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : r.size] = r
    lengths = np.asarray([r.size for r in rows], np.int32)
    return tokens, lengths, _round_up(P + max_new_tokens, bucket)


def _row_images(module: Transformer, pictures, rows: int):
    """The per-row `images` of `rows` prompts from each prompt's pictures (k2jax.data.examples:
    patches and grid, in token order); the mesh's extra rows repeat the last prompt's. None
    when no prompt has an image."""
    if pictures is None or not any(pictures):
        return None
    if module.vision is None:
        raise ValueError("the prompt has images, but this model has no vision tower")
    from k2jax.data.examples import image_arrays, num_patches
    from k2jax.model.vision import row_inputs

    pictures = list(pictures) + [pictures[-1]] * (rows - len(pictures))
    v = module.vision
    n = max(v.merge_size, *(num_patches(row) for row in pictures))
    arrays = image_arrays(pictures, n, rows, features=v.patch_features, merge=v.merge_size)
    pixels, grids = arrays["pixel_values"], arrays["image_grid_thw"]
    return jax.tree.map(jnp.asarray, row_inputs(pixels, grids, v))


def generate_tokens(
    module: Transformer,
    variables: dict,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    bucket: int = 64,
    mesh: jax.sharding.Mesh | None = None,
    pictures=None,
) -> list[tuple[list[int], str]]:
    """Generates for each prompt; returns (new tokens, finish reason) per prompt.

    `variables`: {"params", optionally "lora", "qk_clip"} as `module.apply` takes them (the module
    must carry the LoRA config when "lora" is given). The stop token that ended a row is not
    included; the finish reason is "stop" (a stop id was produced) or "length". `mesh`: the mesh
    the parameters live on (see `_on_mesh`). `pictures`: each prompt's images (a list of
    k2jax.data.examples.Picture per prompt, in the order of its image tokens), for a model with
    a vision tower.
    """
    tokens, lengths, max_len = _prepare(module, prompts, max_new_tokens, bucket, mesh)
    images = _row_images(module, pictures, len(tokens))
    stop = [int(s) for s in stop_ids]
    stop += [-1] * (_round_up(max(len(stop), 1), 4) - len(stop))  # few shapes, few compiles
    with _on_mesh(mesh):
        out = _generate_loop(
            module,
            variables,
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            jax.random.key(seed),
            _knobs(sampling),
            jnp.asarray(stop, jnp.int32),
            max_len,
            max_new_tokens,
            images,
        )
    results = []
    stop = set(int(s) for s in stop_ids)
    for row in np.asarray(out)[: len(prompts)].tolist():
        new: list[int] = []
        reason = "length"
        for t in row:
            if t < 0:
                break
            if t in stop:
                reason = "stop"
                break
            new.append(t)
        results.append((new, reason))
    return results


def stream_tokens(
    module: Transformer,
    variables: dict,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    bucket: int = 64,
    mesh: jax.sharding.Mesh | None = None,
    pictures=None,
) -> Iterator[int]:
    """Yields the new tokens of one prompt as they are sampled (the stop token included last);
    `pictures`: the prompt's images, as in `generate_tokens`."""
    tokens, lengths, max_len = _prepare(module, [prompt], max_new_tokens, bucket, mesh)
    images = _row_images(module, None if pictures is None else [pictures], len(tokens))
    stop = set(int(s) for s in stop_ids)
    lengths = jnp.asarray(lengths)
    knobs = _knobs(sampling)
    with _on_mesh(mesh):
        cache, token, key = _prefill_jit(
            module,
            variables,
            jnp.asarray(tokens),
            lengths,
            jax.random.key(seed),
            knobs,
            max_len,
            images,
        )
    for i in range(max_new_tokens):
        t = int(token[0])
        yield t
        if t in stop or i + 1 == max_new_tokens:
            return
        with _on_mesh(mesh):
            cache, token, key = _step_jit(module, variables, cache, token, lengths + i, key, knobs)


# ---------------------------------------------------------------------------------------------
# Prompts and text


@dataclasses.dataclass
class Generation:
    """The result of `K2Model.generate`: `text` (None without a tokenizer), the new `tokens`
    (without the stop token), the `prompt_tokens`, and `finish_reason` ("stop" or "length")."""

    text: str | None
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str

    def __str__(self) -> str:
        return self.text if self.text is not None else str(self.tokens)


class TextStream:
    """Turns a growing list of token ids into text increments for printing.

    A multi-byte character split across tokens decodes to U+FFFD until its last byte arrives, so
    text ending in U+FFFD is held back until the next token (or `flush`).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        new, self.emitted = text[len(self.emitted) :], text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return new


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of generated assistant text: what precedes `</think>` (without a
    leading `<think>`) and what follows it; ("", text) when there is no `</think>`."""
    if "</think>" not in text:
        return "", text
    reasoning, answer = text.split("</think>", 1)
    return reasoning.removeprefix("<think>"), answer


def template_for(folder) -> str:
    """The chat template of a checkpoint folder: "kimi_k25" for model_type kimi_k25; else
    "kimi_k2_thinking" if its chat template (chat_template.jinja or tokenizer_config.json) writes
    think blocks; else "kimi_k2"."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    if config.get("model_type") == "kimi_k25":
        return "kimi_k25"
    texts = []
    if (folder / "chat_template.jinja").is_file():
        texts.append((folder / "chat_template.jinja").read_text(errors="replace"))
    try:
        tc = json.loads((folder / "tokenizer_config.json").read_text())
        if isinstance(tc.get("chat_template"), str):
            texts.append(tc["chat_template"])
    except (OSError, json.JSONDecodeError):
        pass
    return "kimi_k2_thinking" if any("<think>" in t for t in texts) else "kimi_k2"


def prompt_ids(
    prompt, tokenizer=None, *, template="kimi_k2", thinking=True, chat=True
) -> list[int]:
    """Token ids of a prompt: a list of ids as is; a list of OpenAI-style messages rendered with
    the chat template and a generation prompt; a string as one user message (or, with
    chat=False, as raw text). Images in the messages need `prompt_inputs`."""
    return prompt_inputs(prompt, tokenizer, template=template, thinking=thinking, chat=chat)[0]


def prompt_inputs(
    prompt, tokenizer=None, *, template="kimi_k2", thinking=True, chat=True, images=None
) -> tuple[list[int], list]:
    """(token ids, pictures) of a prompt (see `prompt_ids`): messages may hold image parts
    (k2jax.data.media: local paths, file:// or data: URLs), read and preprocessed by `images`,
    the checkpoint's ImageProcessor; pictures are in the order of their image tokens."""
    from k2jax.data.chat import encode_chat, get_template

    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (pass tokenizer=... or token ids)")
        if not chat:
            return tokenizer.encode(prompt)
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, np.ndarray):
        prompt = prompt.tolist()
    prompt = list(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        if tokenizer is None:
            raise ValueError("chat messages need a tokenizer (pass tokenizer=...)")
        t = get_template(template, thinking=thinking)
        enc = encode_chat(
            prompt, tokenizer, t, add_generation_prompt=True, images=_image_reader(images)
        )
        return enc.tokens.tolist(), list(enc.images)
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
        raise ValueError("prompt must be a string, a list of token ids or a list of message dicts")
    return [int(t) for t in prompt], []


def _image_reader(processor):
    """chat.encode_pieces' `images` callback for a prompt: the image read (relative paths from
    the working directory), preprocessed, and its pad count."""
    if processor is None:
        return None
    from k2jax.data.examples import Picture
    from k2jax.data.media import ImagePart, resolve

    def read(part):
        picture = Picture.read(ImagePart(resolve(part.source, None), part.where), processor)
        return picture.pads(processor), picture

    return read


def generate(
    module: Transformer,
    variables: dict,
    prompt,
    *,
    max_new_tokens: int = 256,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    tokenizer=None,
    template: str = "kimi_k2",
    thinking: bool = True,
    chat: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    images=None,
) -> Generation:
    """One prompt in (see `prompt_inputs`; `images`: the ImageProcessor for image parts), one
    `Generation` out. Stops at `stop_ids` (default: the tokenizer's <|im_end|> and [EOS]; none
    without a tokenizer) or after max_new_tokens."""
    ids, pictures = prompt_inputs(
        prompt, tokenizer, template=template, thinking=thinking, chat=chat, images=images
    )
    if stop_ids is None:
        stop_ids = (tokenizer.im_end_id, tokenizer.eos_id) if tokenizer is not None else ()
    [(new, reason)] = generate_tokens(
        module,
        variables,
        [ids],
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        stop_ids=stop_ids,
        mesh=mesh,
        pictures=[pictures],
    )
    text = tokenizer.decode(new) if tokenizer is not None else None
    return Generation(text, new, ids, reason)
