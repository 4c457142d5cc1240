"""KV-cached generation with the MLA compressed cache, sampling filters, `K2Model.generate` and
`k2jax chat`.

The model is the tiny Kimi-K2 model with non-trivial random weights, a random rank-4 LoRA on every
target (so the absorbed kv_b_proj adapter is exercised) and QK-clip factors ≠ 1. The oracle is the
training path's full forward pass (`Transformer.logits`): cached decode logits must equal it
(≤ 1e-5, float32), and greedy generation must equal step-by-step recomputation (argmax of the full
forward logits of the growing sequence) for 20 tokens, for two prompts of different lengths in
one right-padded batch.
"""

from __future__ import annotations

import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err
from k2_checkpoints import random_lora, random_params, variable_shapes, write_checkpoint

import k2jax
from k2jax.api import K2Model
from k2jax.chat import ChatSession
from k2jax.cli import main
from k2jax.config import CONFIG_DIR, ConfigError, load_model_config
from k2jax.data.chat import encode_chat
from k2jax.data.testing import write_tiny_tokenizer
from k2jax.data.tokenizer import KimiTokenizer
from k2jax.generate import (
    Sampling,
    TextStream,
    filter_logits,
    generate_tokens,
    prompt_ids,
    sample_tokens,
    split_reasoning,
    stream_tokens,
    template_for,
)
from k2jax.lora import LoraConfig
from k2jax.model import ComputeConfig, Transformer
from k2jax.model.transformer import init_cache

F32 = ComputeConfig(dtype="float32", param_dtype="float32", remat="none")
LORA = LoraConfig(rank=4, alpha=8.0)
GREEDY = Sampling(temperature=0.0)
WIDTH = 96  # every full forward pass runs on [1, WIDTH] (causal: a prefix's logits are exact)
N_NEW = 20


@pytest.fixture(scope="module")
def tiny():
    cfg = load_model_config(CONFIG_DIR / "tiny.gin")
    module = Transformer(cfg, F32, LORA)
    shapes = variable_shapes(module)
    rng = np.random.default_rng(4)

    variables = {
        "params": random_params(cfg, seed=5),
        "lora": random_lora(shapes["lora"], rng),
        "qk_clip": jax.tree.map(
            lambda x: rng.uniform(0.4, 1.0, x.shape).astype(np.float32), shapes["qk_clip"]
        ),
    }
    full = jax.jit(lambda v, t: module.apply(v, t, method=Transformer.logits))
    return cfg, module, variables, full


def test_lora_and_qk_clip_change_the_model(tiny):
    """Otherwise the parity tests below would not show that decode applies them."""
    _, _, v, full = tiny
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 1024, (1, WIDTH)))
    ref = full(v, tokens)
    no_lora = {**v, "lora": jax.tree.map(np.zeros_like, v["lora"])}
    assert rel_err(full(no_lora, tokens), ref) > 0.05
    no_clip = {**v, "qk_clip": jax.tree.map(np.ones_like, v["qk_clip"])}
    assert rel_err(full(no_clip, tokens), ref) > 0.05


def test_cached_decode_equals_full_forward(tiny):
    cfg, module, v, full = tiny
    rng = np.random.default_rng(1)
    lengths = [6, 10]
    buf = rng.integers(0, cfg.vocab_size, (2, WIDTH)).astype(np.int32)
    decode = jax.jit(
        lambda v, c, t, p: module.apply(
            {**v, "cache": c}, t, p, method=Transformer.decode, mutable=["cache"]
        )
    )
    # prefill the right-padded prompts (row 0 has 4 padding tokens), then one token per step
    cache = init_cache(cfg, 2, 24, jnp.float32)
    prompt = buf[:, :10].copy()
    prompt[0, 6:] = 0
    logits, mut = decode(v, cache, prompt, np.broadcast_to(np.arange(10), (2, 10)))
    cache = mut["cache"]
    refs = [np.asarray(full(v, buf[i : i + 1]))[0] for i in range(2)]
    for i, n in enumerate(lengths):
        assert rel_err(logits[i, :n], refs[i][:n]) <= 1e-5
    for step in range(6):
        pos = np.asarray([[n + step] for n in lengths])
        tok = np.take_along_axis(buf, pos, axis=1)
        logits, mut = decode(v, cache, tok, pos)
        cache = mut["cache"]
        for i in range(2):
            assert rel_err(logits[i, 0], refs[i][pos[i, 0]]) <= 1e-5, (step, i)
    assert cache["moe_layers"]["self_attn"]["c_kv"].shape == (2, 2, 24, cfg.kv_lora_rank)
    assert cache["moe_layers"]["self_attn"]["k_rope"].shape == (2, 2, 24, cfg.qk_rope_head_dim)


def _recompute_greedy(full, v, prompt, n=N_NEW):
    """Greedy decoding by full recomputation: argmax of the growing sequence's last logits."""
    buf = np.zeros((1, WIDTH), np.int32)
    buf[0, : len(prompt)] = prompt
    out = []
    for i in range(n):
        logits = np.asarray(full(v, jnp.asarray(buf)))[0, len(prompt) + i - 1]
        out.append(int(np.argmax(logits)))
        buf[0, len(prompt) + i] = out[-1]
    return out


def _prompts(cfg):
    rng = np.random.default_rng(2)
    return [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 9)]


def test_greedy_generation_equals_recomputation(tiny):
    cfg, module, v, full = tiny
    prompts = _prompts(cfg)
    results = generate_tokens(module, v, prompts, max_new_tokens=N_NEW, sampling=GREEDY)
    for prompt, (tokens, reason) in zip(prompts, results):
        assert reason == "length" and len(tokens) == N_NEW
        assert tokens == _recompute_greedy(full, v, prompt)
        assert len(set(tokens)) > 3  # not a degenerate repetition
    # the streaming loop runs the same prefill/step functions
    streamed = stream_tokens(module, v, prompts[1], max_new_tokens=N_NEW, sampling=GREEDY)
    assert list(streamed) == results[1][0]

    # a stop token ends its row only; the stop token is not returned
    stop = results[0][0][3]
    stopped = generate_tokens(
        module, v, prompts, max_new_tokens=N_NEW, sampling=GREEDY, stop_ids=[stop]
    )
    assert stopped[0] == (results[0][0][:3], "stop")
    cut = results[1][0].index(stop) if stop in results[1][0] else N_NEW
    assert stopped[1] == (results[1][0][:cut], "stop" if cut < N_NEW else "length")
    streamed = stream_tokens(
        module, v, prompts[0], max_new_tokens=N_NEW, sampling=GREEDY, stop_ids=[stop]
    )
    assert list(streamed) == results[0][0][:4]  # the stop token is yielded, then it ends


def test_sampling_is_seeded(tiny):
    cfg, module, v, _ = tiny
    prompts = _prompts(cfg)
    s = Sampling(temperature=1.0, top_p=0.9)
    a = generate_tokens(module, v, prompts, max_new_tokens=N_NEW, sampling=s, seed=1)
    b = generate_tokens(module, v, prompts, max_new_tokens=N_NEW, sampling=s, seed=1)
    c = generate_tokens(module, v, prompts, max_new_tokens=N_NEW, sampling=s, seed=2)
    assert a == b and a != c
    streamed = stream_tokens(module, v, prompts[0], max_new_tokens=N_NEW, sampling=s, seed=1)
    assert list(streamed) == a[0][0]


PROBS = np.asarray([0.5, 0.25, 0.15, 0.1])


def _kept(sampling, probs=PROBS):
    out = filter_logits(jnp.log(jnp.asarray(probs))[None], sampling)[0]
    return [int(i) for i in np.flatnonzero(np.isfinite(np.asarray(out)))]


def test_top_p_and_min_p_filters():
    assert _kept(Sampling(1.0, top_p=0.45)) == [0]
    assert _kept(Sampling(1.0, top_p=0.7)) == [0, 1]
    assert _kept(Sampling(1.0, top_p=0.8)) == [0, 1, 2]
    assert _kept(Sampling(1.0, top_p=1.0)) == [0, 1, 2, 3]
    assert _kept(Sampling(1.0, min_p=0.4)) == [0, 1]  # p >= 0.2
    assert _kept(Sampling(1.0, min_p=0.25)) == [0, 1, 2]  # p >= 0.125
    assert _kept(Sampling(1.0, min_p=1.0)) == [0]
    assert _kept(Sampling(1.0, top_p=0.8, min_p=0.4)) == [0, 1]  # both must pass
    # filters see the tempered distribution: T=0.5 squares and renormalises the probabilities
    # (0.658, 0.164, 0.059, 0.026), so top-p 0.8 keeps two tokens and min-p 0.2 only one
    assert _kept(Sampling(0.5, top_p=0.8)) == [0, 1]
    assert _kept(Sampling(0.5, min_p=0.2)) == [0, 1]
    assert _kept(Sampling(0.5, min_p=0.3)) == [0]
    # ties at the cut-off are kept
    assert _kept(Sampling(1.0, top_p=0.5), np.asarray([0.4, 0.2, 0.2, 0.2])) == [0, 1, 2, 3]


def test_sample_frequencies():
    logits = jnp.log(jnp.asarray(PROBS))
    n = 40000
    batch = jnp.tile(logits[None], (n, 1))

    def freq(sampling, seed=0):
        ids = np.asarray(sample_tokens(batch, jax.random.key(seed), sampling))
        return np.bincount(ids, minlength=4) / n

    np.testing.assert_allclose(freq(Sampling(1.0)), PROBS, atol=0.01)
    tempered = PROBS**0.5 / np.sum(PROBS**0.5)
    np.testing.assert_allclose(freq(Sampling(2.0)), tempered, atol=0.01)
    np.testing.assert_allclose(freq(Sampling(1.0, top_p=0.7)), [2 / 3, 1 / 3, 0, 0], atol=0.01)
    np.testing.assert_allclose(
        freq(Sampling(1.0, min_p=0.25)), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0], atol=0.01
    )
    assert np.array_equal(
        np.asarray(sample_tokens(batch[:3], jax.random.key(0), GREEDY)), [0, 0, 0]
    )


def test_sampling_validation():
    for bad in (
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=-0.1),
        dict(min_p=2.0),
    ):
        with pytest.raises(ConfigError):
            Sampling(**bad)
    assert Sampling(temperature=0).greedy


# ---------------------------------------------------------------------------------------------
# Text: K2Model.generate, streaming decode, templates, chat


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(folder)
    return KimiTokenizer.from_dir(folder)


def test_k2model_generate(tiny, tokenizer):
    cfg, _, v, full = tiny
    model = K2Model(cfg, F32, v["params"], lora=v["lora"], lora_config=LORA)
    messages = [{"role": "user", "content": "Where is the ship?"}]
    out = model.generate(messages, N_NEW, temperature=0.0, tokenizer=tokenizer, stop=[])
    want_prompt = encode_chat(messages, tokenizer, "kimi_k2", add_generation_prompt=True).tokens
    assert out.prompt_tokens == want_prompt.tolist()
    variables = {**v, "qk_clip": jax.tree.map(np.ones_like, v["qk_clip"])}  # K2Model: no clip
    assert out.tokens == _recompute_greedy(full, variables, out.prompt_tokens)
    assert out.text == tokenizer.decode(out.tokens) and str(out) == out.text
    assert out.finish_reason == "length"
    same = model.generate(
        "Where is the ship?", N_NEW, temperature=0.0, tokenizer=tokenizer, stop=[]
    )
    assert same.tokens == out.tokens
    stopped = model.generate(
        messages, N_NEW, temperature=0.0, tokenizer=tokenizer, stop=[out.tokens[2]]
    )
    assert (stopped.tokens, stopped.finish_reason) == (out.tokens[:2], "stop")
    raw = model.generate(out.prompt_tokens, N_NEW, temperature=0.0)  # ids in, no tokenizer
    assert raw.tokens == out.tokens and raw.text is None
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate("hi", 4)
    with pytest.raises(ValueError, match="token ids"):
        model.generate([cfg.vocab_size + 5], 4)


def test_text_stream_holds_back_split_characters(tokenizer):
    ids = tokenizer.encode("a 中")
    pieces = TextStream(tokenizer)
    out = [pieces.push(i) for i in ids]
    assert "".join(out) + pieces.flush() == "a 中"
    assert "\ufffd" not in "".join(out)
    assert len(ids) > 2 and out[-2:] == ["", "中"]  # the character's bytes are separate tokens


def test_split_reasoning_and_template_for(tmp_path):
    assert split_reasoning("<think>hmm</think>Yes.") == ("hmm", "Yes.")
    assert split_reasoning("hmm</think>Yes.") == ("hmm", "Yes.")
    assert split_reasoning("Yes.") == ("", "Yes.")
    assert template_for(tmp_path) == "kimi_k2"
    (tmp_path / "chat_template.jinja").write_text("{% if x %}<think>{% endif %}")
    assert template_for(tmp_path) == "kimi_k2_thinking"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "kimi_k25"}))
    assert template_for(tmp_path) == "kimi_k25"


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    cfg, _, v, _ = tiny
    return write_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny", cfg, v["params"], fmt="float32"
    )


def _chat(monkeypatch, capsys, argv, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert main(["chat", *argv]) == 0
    return capsys.readouterr().out


def test_chat_cli(tokenizer, checkpoint, monkeypatch, capsys):
    args = ["--model", str(checkpoint), "--dtype", "float32", "--temperature", "0"]
    args += ["--max-new-tokens", "10"]
    model = k2jax.load_model(checkpoint, dtype="float32")  # what the command loads

    def answer(messages):
        ids = prompt_ids(messages, tokenizer)
        stop = (tokenizer.im_end_id, tokenizer.eos_id)
        new = stream_tokens(
            model.module, model.variables(), ids, max_new_tokens=10, sampling=GREEDY, stop_ids=stop
        )
        return tokenizer.decode([t for t in new if t not in stop])

    one = _chat(monkeypatch, capsys, [*args, "--prompt", "Ahoy there"])
    first = answer([{"role": "user", "content": "Ahoy there"}])
    assert one == first + "\n"

    # two turns through stdin: the second answer sees the first exchange; /reset forgets it
    stdin = "Ahoy there\n\nWhat now?\n/reset\nWhat now?\n/quit\nignored\n"
    out = _chat(monkeypatch, capsys, args, stdin)
    history = [
        {"role": "user", "content": "Ahoy there"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "What now?"},
    ]
    second = answer(history)
    fresh = answer([{"role": "user", "content": "What now?"}])
    assert second != fresh  # the history matters, so the check below means something
    assert out == f"{first}\n{second}\n{fresh}\n"


def test_chat_session_keeps_answers_without_reasoning(tiny, tokenizer):
    _cfg, module, v, _ = tiny
    session = ChatSession(
        module, v, tokenizer, template="kimi_k25", sampling=GREEDY, max_new_tokens=6
    )
    streamed = []
    text = session.reply("Hi", streamed.append)
    assert "".join(streamed) == text
    reasoning, content = split_reasoning(text)
    assert session.messages[-1]["content"] == content
    assert session.messages[-1].get("reasoning_content", "") == reasoning
    session.reset()
    assert session.messages == []


def test_chat_cli_errors(checkpoint, monkeypatch, capsys, tmp_path):
    assert main(["chat", "--model", str(tmp_path)]) == 2  # not a checkpoint: a one-line error
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["chat"])  # --model or --run is required
    assert dataclasses.is_dataclass(Sampling())


def test_generate_on_a_mesh(checkpoint, tokenizer):
    """Parameters sharded over (expert 4, tensor 2) of the 8 simulated devices: generation runs
    the expert-parallel MoE (the batch padded to the mesh) and samples the same tokens."""
    plain = k2jax.load_model(checkpoint, dtype="float32")
    sharded = k2jax.load_model(
        checkpoint, dtype="float32", mesh=k2jax.sharding.make_mesh(expert=4, tensor=2)
    )
    a = plain.generate("Ahoy there", 12, temperature=0.0)
    b = sharded.generate("Ahoy there", 12, temperature=0.0)
    assert a.tokens == b.tokens and a.text == b.text == tokenizer.decode(a.tokens)


def test_bfloat16_on_cpu(checkpoint, monkeypatch, capsys):
    """The defaults are bfloat16: XLA:CPU cannot run some unfused bf16×bf16→f32 dots (the MLA
    decode's absorbed query, "Unsupported element type for DotThunk::Execute"), so k2jax's
    mixed-precision contractions widen their operands on CPU (k2jax/ops/einsum.py). Generation,
    logits on a mesh and the chat command all run in bf16 here, and agree with float32 closely."""
    bf16 = k2jax.load_model(checkpoint)  # dtype="bfloat16", the default
    f32 = k2jax.load_model(checkpoint, dtype="float32")
    out = bf16.generate("Ahoy there", 6, temperature=0.0)
    assert len(out.tokens) == 6 and "\x00" not in out.text
    tokens = [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert rel_err(bf16.logits(tokens), f32.logits(tokens)) < 0.1  # bf16 rounding, not garbage
    sharded = k2jax.load_model(checkpoint, mesh=k2jax.sharding.make_mesh(expert=4, tensor=2))
    assert len(sharded.generate("Ahoy there", 6, temperature=0.0).tokens) == 6
    text = _chat(monkeypatch, capsys, ["--model", str(checkpoint), "--prompt", "Hi"])
    assert text.endswith("\n") and "\x00" not in text
