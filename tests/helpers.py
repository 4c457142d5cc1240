"""Shared test helpers (imported by test modules as `helpers`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"
REF_DIR = ROOT / "tests" / "reference"

# jit compiler options for Pallas kernels in interpret mode: each kernel becomes an XLA loop that
# takes ~1 s to compile at full optimisation; the tests' tiny problems run in milliseconds either
# way.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Kimi-K2's YaRN block, as its config.json writes it (K2_FACTS §1).
K2_YARN = {
    "type": "yarn",
    "factor": 32.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 1.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
# A tiny DeepseekV3/Kimi-K2 config.json (the transformers reference's form) that the parity,
# loader and export tests vary: MLA with YaRN, one dense layer, 8 experts of which 2 per token, a
# shared expert, 4 heads (so expert=4 × tensor=2 meshes split it).
TINY_HF_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.827,
    norm_topk_prob=True,
    rms_norm_eps=1e-6,  # transformers' latent norms always use 1e-6 (K2_FACTS §3.1)
    max_position_embeddings=131072,
    rope_theta=50000.0,
    rope_scaling=K2_YARN,
    num_nextn_predict_layers=0,
    tie_word_embeddings=False,
)


def run_reference(script: str, *args: str, timeout: float = 600) -> str:
    """Runs tests/reference/<script> in the torch reference environment (.venv-ref, Python 3.11).

    Never skips: a missing environment is an error telling how to build it.
    """
    if not REF_PYTHON.exists():
        raise RuntimeError(
            f"{REF_PYTHON} not found: the torch reference environment is built by scripts/setup"
        )
    proc = subprocess.run(
        [str(REF_PYTHON), str(REF_DIR / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"reference script {script} {' '.join(map(str, args))} failed "
            f"(exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc.stdout


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=1))
    return path


def rel_err(actual, expected) -> float:
    """max |actual − expected| / max |expected| (the parity metric of the issues)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def python_exe() -> str:
    return sys.executable


# Packed data batches (tests of k2jax.data) -------------------------------------------------------
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def take(it, n):
    """The next n items of an iterator."""
    return [next(it) for _ in range(n)]


def same(a, b) -> bool:
    """Two lists of batches hold the same arrays."""
    return len(a) == len(b) and all(
        all(np.array_equal(x[k], y[k]) for k in BATCH_KEYS) for x, y in zip(a, b)
    )


def segment_tokens(batches) -> list[tuple[int, ...]]:
    """The tokens of every packed example in the batches, in order."""
    out = []
    for b in batches:
        for r in range(b["tokens"].shape[0]):
            for s in range(1, b["segment_ids"][r].max(initial=0) + 1):
                out.append(tuple(b["tokens"][r, b["segment_ids"][r] == s].tolist()))
    return out
