"""CE-LoRA (`lora.backward = "ce"`) against the exact backward: gradient fidelity and training
quality, measured on a CPU (issue 19, items 2 and 3; item 4's FLOPs: account_step.py).

    .venv/bin/python benchmarks/ce_lora.py fidelity --json benchmarks/results/ce_fidelity.json
    .venv/bin/python benchmarks/ce_lora.py quality --out benchmarks/results   # json + png

fidelity. Per adapter leaf (a module's lora_A / lora_B, each stacked layer apart), the cosine
similarity and the relative norm error ‖g_ce − g‖ / ‖g‖ of the LoRA gradient, with B moved off
zero (at B = 0 the gradient of A vanishes), on one batch:
  * `tiny` — configs/tiny.gin (random base, 1 dense + 2 MoE layers, width 64), the first packed
    batch of the demo chats, at the given knobs; and with carried rows (lora.ce_refresh ≥ 1) at
    the first knobs, rows chosen by the residual's row norms alone (a run's first N steps) and
    from the second batch's Σ dY² (a refreshed set, one batch stale);
  * `k2layer` — one dense layer at Kimi-K2 widths (hidden 7168, MLA q_lora 1536 / kv_lora 512,
    64 heads, MLP 18432; vocabulary cut to 1,024 to fit), float32, 256 random tokens. Its
    weights are random (N(0, 1/fan_in)): a flat singular spectrum, the worst case for a low-rank
    part; trained weights decay faster, so this bounds fidelity from below;
  * `k2moe` — one MoE layer at Kimi-K2 widths (hidden 7168, expert FFN 2048, one shared expert,
    the same MLA) with the routed experts cut to 16 (top-8 of them) to fit, INT4 experts, random
    weights, 256 random tokens: the routed experts' per-expert factors.

quality. The tiny random base trained with configs/tiny_train.gin (MuonClip, LoRA r=8 on every
linear) for `--steps` steps, exact vs CE at each knob setting (rows chosen per backward, and
carried with refresh periods 1, 10 and 50), on (a) the demo chats and (b)
generated arithmetic chats ("What is 37 + 58?" → "37 + 58 = 95."), both with a held-out eval
loss every 25 steps; the curves are plotted into ce_quality.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k2jax.config import CONFIG_DIR, load_model_config
from k2jax.data import DEMO_CHATS, DataConfig, KimiTokenizer, PackedBatches
from k2jax.data.testing import write_tiny_tokenizer
from k2jax.sharding import make_mesh
from k2jax.train import RunConfig, StepSpec, Trainer, build_program

TINY_TRAIN = CONFIG_DIR / "tiny_train.gin"
KNOBS = ((8, 0.125), (4, 0.05))  # (ce_rank, ce_keep) on the tiny model (width 64)
REFRESH = (1, 10, 50)  # lora.ce_refresh periods trained at KNOBS[0]
K2_KNOBS = ((64, 0.125), (256, 0.125))


def _program(cfg, *overrides):
    run = RunConfig.load(TINY_TRAIN, ["train.run_dir='unused'", *overrides])
    return build_program(StepSpec.from_run_config(run, cfg), make_mesh(devices=jax.devices()[:1]))


def _grads(program, batch, choose_on=None):
    """The LoRA gradients of `batch`. With carried rows (lora.ce_refresh ≥ 1): rows chosen by
    the residual's row norms, or — `choose_on`, another batch — from that batch's Σ dY²."""
    frozen, tparams = program.init_base(0)
    state = program.init_state(0, tparams)

    def loss(tr, score, frozen, qk, rows, mb):
        ce = None if rows is None else {"rows": rows, "score": score}
        sums, _ = program._apply_loss(tr, qk, frozen, mb, None, ce)
        return sums["loss_sum"] / sums["count"]

    trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if p[-1].key == "lora_B" else x, state["trainable"]
    )
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    ce = state.get("ce", {"rows": None, "score": None})
    if ce["rows"] is not None:  # step 0's choice: by rnorm (the scores are zero)
        ce = {**ce, "rows": program._carried_rows(True, ce, frozen)}
        if choose_on is not None:
            first = jax.tree.map(lambda x: x[0], program.device_batch(choose_on))
            score = grad(trainable, ce["score"], frozen, state["qk_clip"], ce["rows"], first)[1]
            ce = {**ce, "rows": program._carried_rows(True, {**ce, "score": score}, frozen)}
    mb = jax.tree.map(lambda x: x[0], program.device_batch(batch))
    grads = grad(trainable, ce["score"], frozen, state["qk_clip"], ce["rows"], mb)[0]["lora"]
    return {
        "/".join(str(k.key) for k in p): np.asarray(v, np.float64)
        for p, v in jax.tree_util.tree_flatten_with_path(grads)[0]
    }


def _compare(exact: dict, approx: dict) -> list[dict]:
    rows = []
    for name, g in exact.items():
        stacked = g.ndim > 2 and name.split("/")[0] in ("dense_layers", "moe_layers")
        for layer in range(g.shape[0]) if stacked else [None]:
            a = g[layer] if stacked else g
            b = approx[name][layer] if stacked else approx[name]
            norm = np.linalg.norm(a)
            cos = float(np.vdot(a, b) / (norm * np.linalg.norm(b))) if norm else float("nan")
            rows.append(
                {
                    "leaf": name if layer is None else f"{name}[{layer}]",
                    "cosine": cos,
                    "rel_error": float(np.linalg.norm(b - a) / norm) if norm else float("nan"),
                }
            )
    return rows


def _tiny_batches(n: int) -> list[dict]:
    folder = Path(tempfile.mkdtemp())
    write_tiny_tokenizer(folder)
    cfg = DataConfig(path=str(DEMO_CHATS), seq_len=128, batch_size=8)
    data = PackedBatches(cfg, KimiTokenizer.from_dir(folder))
    return [next(data) for _ in range(n)]


def _k2_layer():
    cfg = load_model_config(CONFIG_DIR / "kimi_k2_thinking.gin")
    return dataclasses.replace(cfg, num_hidden_layers=1, first_k_dense_replace=1, vocab_size=1024)


def _k2_moe_layer():
    cfg = load_model_config(CONFIG_DIR / "kimi_k2_thinking.gin")
    return dataclasses.replace(
        cfg, num_hidden_layers=1, first_k_dense_replace=0, vocab_size=1024, n_routed_experts=16
    )


def _random_batch(vocab: int, seq: int):
    ids = np.random.default_rng(0).integers(0, vocab, (1, seq + 1), dtype=np.int32)
    return {
        "tokens": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((1, seq), np.float32),
        "segment_ids": np.ones((1, seq), np.int32),
        "positions": np.arange(seq, dtype=np.int32)[None],
    }


def fidelity(args) -> dict:
    out = {}
    tiny, other = _tiny_batches(2)
    for name, cfg, batch, knobs, extra in (
        ("tiny", load_model_config(CONFIG_DIR / "tiny.gin"), tiny, KNOBS, ()),
        (
            "k2layer",
            _k2_layer(),
            _random_batch(1024, 256),
            K2_KNOBS,
            ("data.seq_len=256", "data.batch_size=1", "lora.rank=16"),
        ),
        (
            "k2moe",
            _k2_moe_layer(),
            _random_batch(1024, 256),
            K2_KNOBS,
            ("data.seq_len=256", "data.batch_size=1", "lora.rank=16", 'compute.experts="int4"'),
        ),
    ):
        if args.only and name != args.only:
            continue
        t0 = time.perf_counter()
        exact = _grads(_program(cfg, *extra), batch)
        out[name] = {}
        for rank, keep in knobs:
            ce = _ce(rank, keep)
            rows = _compare(exact, _grads(_program(cfg, *extra, *ce), batch))
            out[name][f"rank{rank}_keep{keep}"] = rows
            worst = min(r["cosine"] for r in rows)
            print(f"{name} rank {rank} keep {keep}: worst cosine {worst:.4f}", flush=True)
        if name == "tiny":  # carried rows: the first steps' choice, and a one-batch-stale one
            (rank, keep), ce = KNOBS[0], (*_ce(*KNOBS[0]), "lora.ce_refresh=1")
            program = _program(cfg, *extra, *ce)
            for label, choose_on in (("rnorm", None), ("other_batch", other)):
                rows = _compare(exact, _grads(program, batch, choose_on))
                out[name][f"rank{rank}_keep{keep}_carried_{label}"] = rows
                worst = min(r["cosine"] for r in rows)
                print(f"{name} carried rows ({label}): worst cosine {worst:.4f}", flush=True)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _ce(rank: int, keep: float, refresh: int = 0) -> tuple[str, ...]:
    return (
        'lora.backward="ce"',
        f"lora.ce_rank={rank}",
        f"lora.ce_keep={keep}",
        f"lora.ce_refresh={refresh}",
    )


def _arithmetic(folder: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 100, 2))
        messages = [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
        ]
        lines.append(json.dumps({"messages": messages}))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"arith_{seed}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(run_dir: Path, data: str, eval_path: str | None, steps: int, ce) -> dict:
    over = [
        f"train.run_dir={str(run_dir)!r}",
        f"data.path={data!r}",
        f"train.steps={steps}",
        "log.progress=False",
        "checkpoint.every=100000",
        "log.tensorboard=False",
        "eval.every=25",
        "eval.batches=4",
    ]
    over += [f"eval.path={eval_path!r}"] if eval_path else ["data.val_size=32"]
    if ce is not None:
        over += list(_ce(*ce))
    t0 = time.perf_counter()
    with Trainer.from_config(TINY_TRAIN, over) as t:
        records = t.fit()
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    return {
        "loss": [r["loss"] for r in records if "loss" in r],
        "eval": [(e["step"], e["eval_loss"]) for e in evals],
        "seconds": time.perf_counter() - t0,
    }


def quality(args) -> dict:
    root = Path(tempfile.mkdtemp())
    train = _arithmetic(root / "arith", 2000, 0)
    held = _arithmetic(root / "arith", 200, 1)
    datasets = {"demo chats": (str(DEMO_CHATS), None), "arithmetic": (str(train), str(held))}
    out = {}
    for dname, (data, held_out) in datasets.items():
        out[dname] = {}
        for ce in (None, *KNOBS, *((*KNOBS[0], n) for n in REFRESH)):
            label = "exact" if ce is None else f"ce rank {ce[0]} keep {ce[1]}"
            label += f" refresh {ce[2]}" if ce is not None and len(ce) > 2 else ""
            tag = label.replace(" ", "_")
            r = _run(root / f"{dname[:4]}_{tag}", data, held_out, args.steps, ce)
            out[dname][label] = r
            print(f"{dname} {label}: final eval {r['eval'][-1][1]:.4f} ({r['seconds']:.0f} s)")
    _plot(out, Path(args.out) / "ce_quality.png")
    return out


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(out), figsize=(6 * len(out), 4))
    for ax, (dname, runs) in zip(np.atleast_1d(axes), out.items()):
        for label, r in runs.items():
            (line,) = ax.plot(np.arange(1, len(r["loss"]) + 1), r["loss"], lw=0.8, label=label)
            steps, losses = zip(*r["eval"])
            ax.plot(steps, losses, "o--", color=line.get_color(), ms=3)
        ax.set(title=f"{dname}: train (lines), held-out (dots)", xlabel="step", ylabel="loss")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fidelity")
    f.add_argument("--json", type=Path, required=True)
    f.add_argument("--only", choices=("tiny", "k2layer", "k2moe"))
    q = sub.add_parser("quality")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    if args.cmd == "fidelity":
        rec = fidelity(args)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rec, indent=1))
    else:
        rec = quality(args)
        (args.out / "ce_quality.json").write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
