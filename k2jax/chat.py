"""`k2jax chat`: talk to a checkpoint, or to a fine-tune, in the terminal.

    k2jax chat --model ckpt/Kimi-K2-Thinking            # the base model
    k2jax chat --run runs/my-run                         # the run's base + its LoRA and QK-clip
    k2jax chat --model DIR --adapter adapters/mine       # a checkpoint + a PEFT adapter folder
    k2jax chat --model DIR --prompt "Hello"              # one answer, no REPL (scripts, tests)
    k2jax chat --model K25 --image cat.png --prompt "What is this?"   # images (K2.5 / K2.6)
    printf 'Hi\\nAnd then?\\n' | k2jax chat --model DIR  # turns from a pipe

Each line read from stdin is a user turn; the whole conversation is rendered with the model's
chat template (k2jax.data.chat) and answered with KV-cached sampling (k2jax.generate), the text
printed as it is generated. `/reset` starts a new conversation, `/quit` (or end of input) exits.
With a thinking template the reasoning is shown and kept out of the history, as the templates do.
`--image PATH` (repeatable) shows images in the first user turn to a model with a vision tower.

`ChatSession` is the same loop as a library object (a notebook can drive it). Nothing heavy is
imported until a model is loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

TEMPLATES = ("kimi_k2", "kimi_k2_thinking", "kimi_k25")
HELP = "/reset starts a new conversation, /quit exits"


class ChatSession:
    """A conversation with one model: `reply(text)` answers and remembers; `reset()` forgets."""

    def __init__(
        self,
        module,
        variables: dict,
        tokenizer,
        *,
        template: str = "kimi_k2",
        thinking: bool = True,
        system: str | None = None,
        sampling=None,
        max_new_tokens: int = 512,
        seed: int = 0,
        images=None,
    ):
        from k2jax.generate import Sampling

        self.images = images  # the ImageProcessor of a model with a vision tower
        self.module, self.variables, self.tokenizer = module, variables, tokenizer
        self.template, self.thinking, self.system = template, thinking, system
        self.sampling = sampling if sampling is not None else Sampling()
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.stop_ids = (tokenizer.im_end_id, tokenizer.eos_id)
        self.reset()

    @classmethod
    def from_loaded(cls, loaded: dict, **kwargs) -> ChatSession:
        """A session on what `load` returned (kwargs: system, sampling, max_new_tokens, seed)."""
        from k2jax.data.tokenizer import KimiTokenizer

        return cls(
            loaded["module"],
            loaded["variables"],
            KimiTokenizer.from_dir(loaded["tokenizer"]),
            template=loaded["template"],
            thinking=loaded["thinking"],
            images=loaded["images"],
            **kwargs,
        )

    def reset(self) -> None:
        self.messages: list[dict] = []
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.turn = 0

    def reply(self, text: str, write: Callable[[str], object] | None = None, *, images=()) -> str:
        """Answers `text` (streamed to `write` piece by piece) and returns the generated text;
        `images`: image file paths shown before the text (a model with a vision tower)."""
        from k2jax.generate import TextStream, prompt_inputs, split_reasoning, stream_tokens

        if images and self.images is None:
            raise ValueError("images need a model with a vision tower (a Kimi-K2.5/K2.6 folder)")
        content = text
        if images:
            content = [
                *({"type": "image", "image": str(p)} for p in images),
                {"type": "text", "text": text},
            ]
        messages = [*self.messages, {"role": "user", "content": content}]
        ids, pictures = prompt_inputs(
            messages,
            self.tokenizer,
            template=self.template,
            thinking=self.thinking,
            images=self.images,
        )
        stream = TextStream(self.tokenizer)
        generated = []
        for token in stream_tokens(
            self.module,
            self.variables,
            ids,
            max_new_tokens=self.max_new_tokens,
            sampling=self.sampling,
            seed=self.seed + self.turn,
            stop_ids=self.stop_ids,
            pictures=pictures,
        ):
            if token in self.stop_ids:
                break
            generated.append(token)
            piece = stream.push(token)
            if write is not None and piece:
                write(piece)
        rest = stream.flush()
        if write is not None and rest:
            write(rest)
        answer = self.tokenizer.decode(generated)
        reasoning, content = split_reasoning(answer)
        reply = {"role": "assistant", "content": content}
        if reasoning:
            reply["reasoning_content"] = reasoning
        self.messages = [*messages, reply]
        self.turn += 1
        return answer


def load(
    model: str | None = None,
    run: str | None = None,
    *,
    step: int | None = None,
    tokenizer: str | None = None,
    template: str | None = None,
    thinking: bool = True,
    dtype: str = "bfloat16",
    adapter: str | None = None,
) -> dict:
    """What a ChatSession needs for a checkpoint folder (`model`, with a PEFT `adapter` folder
    on top if given) or a training run (`run`, its base with the trained LoRA, QK-clip factors
    and trained base leaves): a dict of module, variables, tokenizer folder, template and
    thinking."""
    from k2jax.api import load_adapter, load_model
    from k2jax.generate import template_for

    if (model is None) == (run is None):
        raise ValueError("pass exactly one of a checkpoint folder (model) or a run folder (run)")
    if adapter is not None and model is None:
        raise ValueError("an adapter goes on a checkpoint folder (model), not on a run")
    if model is not None:
        loaded = load_model(model, dtype=dtype)
        if adapter is not None:
            loaded = load_adapter(loaded, adapter)
        return dict(
            module=loaded.module,
            variables=loaded.variables(),
            tokenizer=tokenizer or model,
            template=template or template_for(model),
            thinking=thinking,
            images=_processor(loaded),
        )

    from k2jax.api import load_finetune
    from k2jax.train.run import load_run

    r = load_run(run, step)
    tuned = load_finetune(r, dtype=dtype)
    tokenizer = tokenizer or r.tokenizer_dir
    if tokenizer is None:
        raise ValueError(f"{run}: the run names no tokenizer; pass --tokenizer DIR")
    return dict(
        module=tuned.module,
        variables=tuned.variables(),
        tokenizer=tokenizer,
        template=template or r.config.data.template,  # what the run trained on
        thinking=r.config.data.thinking and thinking,
        images=_processor(tuned),
    )


def _processor(model):
    """The ImageProcessor of a loaded model with a vision tower, else None."""
    if model.vision is None:
        return None
    from k2jax.data.images import ImageProcessor

    return ImageProcessor.from_dir(model.path)


def chat(
    model: str | None = None,
    run: str | None = None,
    *,
    step: int | None = None,
    tokenizer: str | None = None,
    template: str | None = None,
    thinking: bool = True,
    dtype: str = "bfloat16",
    system: str | None = None,
    prompt: str | None = None,
    sampling=None,
    max_new_tokens: int = 512,
    seed: int = 0,
    adapter: str | None = None,
    images=(),
) -> None:
    """`k2jax chat`: answers `prompt` and returns, or runs the REPL on stdin (each line a user
    turn; /reset, /quit), printing the answers to stdout as they are generated. The model is a
    checkpoint folder (`model`, optionally with a PEFT `adapter`) or a training run (`run`),
    loaded as `load` does. `images`: image files shown in the first user turn."""
    from pathlib import Path

    from k2jax.generate import Sampling

    for image in images:  # a typo is said before a terabyte loads
        if not Path(image).is_file():
            raise FileNotFoundError(f"--image {image}: no such file")

    loaded = load(
        model,
        run,
        step=step,
        tokenizer=tokenizer,
        template=template,
        thinking=thinking,
        dtype=dtype,
        adapter=adapter,
    )
    template = loaded["template"]
    session = ChatSession.from_loaded(
        loaded,
        system=system,
        sampling=sampling or Sampling(),
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    if images and loaded["images"] is None:
        raise ValueError("--image needs a model with a vision tower (a Kimi-K2.5/K2.6 folder)")
    pending = list(images)  # shown with the first user turn

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if prompt is not None:
        session.reply(prompt, write, images=pending)
        write("\n")
        return
    interactive = sys.stdin.isatty()
    print(f"k2jax chat ({template}): {HELP}", file=sys.stderr)
    while True:
        if interactive:
            write("> ")
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            session.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text}: {HELP}", file=sys.stderr)
            continue
        session.reply(text, write, images=pending)
        pending = []
        write("\n")
