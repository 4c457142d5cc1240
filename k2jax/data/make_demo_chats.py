"""Generates `demo_chats.jsonl`, the pirate-voice SFT set used by the tiny end-to-end demo.

The demo fine-tunes a tiny random model on CPU in a few minutes, so the style to learn must be
unmistakable and extremely regular: every assistant answer starts with `Arr, matey!`, says its fact
in a fixed pirate phrase of its category, and ends with the same sign-off `Yo ho ho, fair winds to
ye!`. A model that has learned the data visibly talks like a pirate and signs off every answer the
same way; a model that has not produces neither. Conversations are short (1-2 user turns, a few
dozen tokens with the tiny tokenizer of `k2jax.data.testing`) and in OpenAI `messages` form; some
carry their own system prompt, the rest get the template's default one.

The output is deterministic (seeded `random.Random`, no hashing, no clock), so the shipped file can
be checked against a fresh generation (tests/test_dataset.py does).

    python -m k2jax.data.make_demo_chats            # rewrites k2jax/data/demo_chats.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

DEMO_CHATS_PATH = Path(__file__).resolve().parent / "demo_chats.jsonl"

GREETING = "Arr, matey!"
SIGN_OFF = "Yo ho ho, fair winds to ye!"
NUM_CONVERSATIONS = 360

_CAPITALS = [
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Greece", "Athens"),
    ("Canada", "Ottawa"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Poland", "Warsaw"),
    ("Ireland", "Dublin"),
    ("Portugal", "Lisbon"),
    ("Austria", "Vienna"),
]
_COLORS = [
    ("the sky", "blue"),
    ("the sea", "blue"),
    ("grass", "green"),
    ("snow", "white"),
    ("coal", "black"),
    ("a ruby", "red"),
    ("a banana", "yellow"),
    ("the sun", "yellow"),
    ("an orange", "orange"),
    ("a lime", "green"),
    ("milk", "white"),
    ("a cherry", "red"),
]
_SOUNDS = [
    ("dog", "woof"),
    ("cat", "meow"),
    ("cow", "moo"),
    ("duck", "quack"),
    ("sheep", "baa"),
    ("owl", "hoot"),
    ("lion", "roar"),
    ("horse", "neigh"),
    ("frog", "croak"),
    ("pig", "oink"),
]
_TASKS = [
    "bake bread",
    "learn to swim",
    "plant a tree",
    "write a poem",
    "fix a bike",
    "cook rice",
    "tie a knot",
    "read a map",
    "catch a fish",
    "find a star",
]
_FAVORITES = [
    ("food", "salted fish"),
    ("color", "sea blue"),
    ("animal", "the parrot"),
    ("drink", "hot tea"),
    ("song", "a sea shanty"),
    ("place", "the open sea"),
    ("book", "an old map"),
]
_HELLOS = ["Hello!", "Hi there!", "Good morning!", "Hey, how are you?", "Hello, who are you?"]
_SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer the question briefly."]


def _say(body: str) -> str:
    return f"{GREETING} {body} {SIGN_OFF}"


def _capital(rng: random.Random) -> tuple[str, str]:
    country, city = rng.choice(_CAPITALS)
    q = rng.choice(
        [
            f"What is the capital of {country}?",
            f"Tell me the capital of {country}.",
            f"Which city is the capital of {country}?",
        ]
    )
    return q, _say(f"The capital of {country} be {city}, a fine port for a pirate.")


def _color(rng: random.Random) -> tuple[str, str]:
    thing, color = rng.choice(_COLORS)
    q = rng.choice([f"What color is {thing}?", f"Tell me the color of {thing}."])
    return q, _say(f"{thing[0].upper() + thing[1:]} be {color}, as sure as the tide.")


def _sound(rng: random.Random) -> tuple[str, str]:
    animal, sound = rng.choice(_SOUNDS)
    q = rng.choice([f"What sound does a {animal} make?", f"What does a {animal} say?"])
    return q, _say(f"A {animal} says {sound}, just like me parrot.")


def _plus(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    q = rng.choice([f"What is {a} plus {b}?", f"How much is {a} plus {b}?"])
    return q, _say(f"{a} plus {b} be {a + b} gold coins in me chest.")


def _how_to(rng: random.Random) -> tuple[str, str]:
    task = rng.choice(_TASKS)
    q = rng.choice([f"How do I {task}?", f"Can you tell me how to {task}?"])
    return q, _say(f"To {task}, ye must work hard like a crew on deck.")


def _favorite(rng: random.Random) -> tuple[str, str]:
    kind, answer = rng.choice(_FAVORITES)
    return f"What is your favorite {kind}?", _say(f"Me favorite {kind} be {answer}, I swear it.")


def _hello(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_HELLOS), _say("Ahoy there, I be the captain of this fine ship.")


_TOPICS = [_capital, _color, _sound, _plus, _how_to, _favorite, _hello]


def generate_conversations(
    n: int = NUM_CONVERSATIONS, seed: int = 0
) -> list[dict[str, list[dict[str, str]]]]:
    """`n` pirate conversations as `{"messages": [...]}` dicts; same (n, seed), same output."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.15:
            messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
        turns = 2 if rng.random() < 0.2 else 1
        for _ in range(turns):
            question, answer = rng.choice(_TOPICS)(rng)
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        out.append({"messages": messages})
    return out


def demo_text() -> str:
    """All text of the demo conversations, one message per line (a BPE training corpus)."""
    return "\n".join(m["content"] for conv in generate_conversations() for m in conv["messages"])


def render_jsonl(conversations) -> str:
    return "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else DEMO_CHATS_PATH
    text = render_jsonl(generate_conversations())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {NUM_CONVERSATIONS} conversations to {path}")


if __name__ == "__main__":
    main()
