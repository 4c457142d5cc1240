"""SFT data for Kimi models: tokenizer, chat templates, JSONL datasets, packing.

* `tokenizer` — `KimiTokenizer`: Kimi's tiktoken BPE + 256 special ids, from a checkpoint folder.
* `chat` — the kimi_k2 / kimi_k2_thinking / kimi_k25 templates: text, token ids and loss mask
  (`encoded`: pieces → ids; `media`: images in messages; `images`: pixels, as transformers).
* `readers` — JSON lines, JSON arrays, CSV, Parquet, Arrow: records by number, no file loaded.
* `formats` — OpenAI, ShareGPT, alpaca, TRL prompt/completion, plain text, LLaMA-Factory's
  dataset_info.json columns/tags -> one conversation (or text) shape.
* `examples` — a record's token examples: masking knobs, over-long policy (data.overlong).
* `mixture` — datasets, their val_size split, mixing and the epoch order.
* `dataset` — `DataConfig` and `PackedBatches`: records -> shuffled, packed, host-sharded,
  resumable numpy batches; `validate_data`: every record checked before training.
* `testing` — `write_tiny_tokenizer`: a small real vocabulary in Kimi's file layout.
* `DEMO_CHATS` — the shipped pirate-style demo set (written by `make_demo_chats`).
"""

from pathlib import Path

from k2jax.data.chat import (
    DEFAULT_SYSTEM_PROMPT,
    TEMPLATE_NAMES,
    ChatFormatError,
    ChatTemplate,
    EncodedChat,
    check_conversation,
    encode_chat,
    get_template,
    render,
    split_turns,
    training_examples,
)
from k2jax.data.dataset import (
    DataCheck,
    DataConfig,
    DataError,
    PackedBatches,
    packed_batches,
    validate_data,
)
from k2jax.data.tokenizer import KimiTokenizer, TokenizerError

DEMO_CHATS = Path(__file__).resolve().parent / "demo_chats.jsonl"

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "DEMO_CHATS",
    "TEMPLATE_NAMES",
    "ChatFormatError",
    "ChatTemplate",
    "DataCheck",
    "DataConfig",
    "DataError",
    "EncodedChat",
    "KimiTokenizer",
    "PackedBatches",
    "TokenizerError",
    "check_conversation",
    "encode_chat",
    "get_template",
    "packed_batches",
    "render",
    "split_turns",
    "training_examples",
    "validate_data",
]
