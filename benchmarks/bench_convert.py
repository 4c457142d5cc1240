"""Converts a generated multi-GB INT4 checkpoint and reports throughput and peak host memory.

    .venv/bin/python benchmarks/bench_convert.py [--gb 3] [--shards 3] [--item-mb 256]
        [--workdir /tmp/bench_convert] [--results benchmarks/RESULTS.md]

The checkpoint is a Kimi-K2-width slice in K2-Thinking's format, written by
k2jax.testing.make_tiny_checkpoint: hidden 7168, experts of width 2048 (compressed-tensors INT4,
group 32, packed int32 + bf16 scales, exactly as K2-Thinking stores them), one dense layer, a few
MoE layers with as many experts as the requested size needs, and a small vocabulary and attention
(they are not what conversion time or memory depends on). The conversion runs in a fresh process
(`k2jax convert`'s library function, default mesh: one CPU device) and is measured from outside:

  MB/s     checkpoint bytes (all shards) / wall time of the whole conversion, including the
           process's start, the plan and header checks, and the final rename
  peak RSS the child's VmHWM (peak resident set, anonymous and file-backed pages alike),
           compared with the largest shard file (the budget: ~2x) and with the RSS of a process
           that only imports jax and k2jax and builds the plan (the fixed cost)

The shards were just written, so they are read from the page cache: the MB/s is the decode +
Orbax write speed, not the disk's read speed. The result is written to the "Conversion (CPU)"
section of --results (the rest of the file is kept). Not a test; CPU only; nothing runs on import.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Conversion (CPU)"

CHILD = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.time()
    import jax
    from k2jax.conversion.orbax_io import convert_checkpoint
    hf, out, item_bytes, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if mode == "convert":
        convert_checkpoint(hf, out, max_item_bytes=item_bytes, progress=False)
    else:  # baseline: everything but building and writing pieces
        from k2jax.conversion.loader import HFCheckpoint, abstract_params
        from k2jax.model import ComputeConfig
        with HFCheckpoint(hf) as ckpt:
            ckpt.plan(abstract_params(ckpt.cfg, ComputeConfig(experts="int4")))
    # VmHWM, not ru_maxrss: exec keeps the parent's high-water mark in ru_maxrss
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(json.dumps({"seconds": time.time() - t0, "maxrss_kb": hwm}))
    """
)


def bench_config(gb: float, moe_layers: int):
    """A K2-width ModelConfig whose INT4 checkpoint is about `gb` GB."""
    from k2jax.config import ModelConfig

    d, f = 7168, 2048
    expert_bytes = 3 * (f * d // 2 + f * (d // 32) * 2) + 0  # packed codes + bf16 scales
    per_layer = max(8, round(gb * 1e9 / (moe_layers * expert_bytes) / 8) * 8)
    return ModelConfig(
        vocab_size=4096,
        hidden_size=d,
        intermediate_size=f,
        moe_intermediate_size=f,
        num_hidden_layers=1 + moe_layers,
        num_attention_heads=8,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=per_layer,
        n_shared_experts=1,
        num_experts_per_tok=8,
        routed_scaling_factor=2.827,
        first_k_dense_replace=1,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        rope_type="yarn",
        rope_factor=64.0,
        rope_beta_fast=1.0,
        rope_beta_slow=1.0,
        rope_mscale_all_dim=1.0,
        max_position_embeddings=262144,
    )


def run_child(mode: str, hf: Path, out: Path, item_bytes: int) -> dict:
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(hf), str(out), str(item_bytes), mode],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=ROOT,
    )
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def write_results(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION in old:
        head, rest = old.split(SECTION, 1)
        tail = rest[rest.find("\n## ") :] if "\n## " in rest else ""
        new = head + text + tail
    else:
        new = old.rstrip("\n") + "\n\n" + text
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=3.0, help="checkpoint size to generate (GB)")
    ap.add_argument("--moe-layers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--item-mb", type=int, default=256, help="max_item_bytes of the conversion")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_convert"))
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()

    import jax

    from k2jax.testing import make_tiny_checkpoint

    cfg = bench_config(args.gb, args.moe_layers)
    hf, out = args.workdir / "hf", args.workdir / "converted"
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    t0 = time.time()
    make_tiny_checkpoint(hf, format="int4", config=cfg, shards=args.shards, tokenizer=False)
    gen_s = time.time() - t0
    files = sorted(hf.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    largest = max(f.stat().st_size for f in files)
    print(f"generated {total / 1e9:.2f} GB in {len(files)} shards ({gen_s:.0f} s)", flush=True)

    item_bytes = args.item_mb << 20
    base = run_child("baseline", hf, out, item_bytes)
    conv = run_child("convert", hf, out, item_bytes)
    out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    items = len(json.loads((out / "k2jax_checkpoint.json").read_text())["items"])
    rss = conv["maxrss_kb"] * 1024
    mbs = total / 1e6 / conv["wall"]
    row = {
        "checkpoint_gb": total / 1e9,
        "shards": len(files),
        "largest_shard_gb": largest / 1e9,
        "experts_per_layer": cfg.n_routed_experts,
        "moe_layers": cfg.num_moe_layers,
        "item_mb": args.item_mb,
        "items": items,
        "convert_s": conv["wall"],
        "mb_per_s": mbs,
        "peak_rss_gb": rss / 1e9,
        "peak_rss_over_largest_shard": rss / largest,
        "baseline_rss_gb": base["maxrss_kb"] * 1024 / 1e9,
        "output_gb": out_bytes / 1e9,
    }
    print(json.dumps(row, indent=1))

    date = datetime.date.today().isoformat()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = f"""{SECTION}

`benchmarks/bench_convert.py --gb {args.gb:g} --moe-layers {args.moe_layers} --shards {args.shards} \
--item-mb {args.item_mb}` — {date}, {cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM (shared
with other jobs), jax {jax.__version__}, Python {platform.python_version()}.

A generated K2-Thinking-format INT4 checkpoint (hidden 7168, expert width 2048, {cfg.n_routed_experts}
experts × {cfg.num_moe_layers} MoE layers + 1 dense layer) converted to Orbax on one CPU device in a
fresh process; shards read from the page cache (just written).

| checkpoint | shards (largest) | items | time | throughput | peak RSS | RSS / largest shard | import + plan RSS |
|---|---|---|---|---|---|---|---|
| {total / 1e9:.2f} GB | {len(files)} ({largest / 1e9:.2f} GB) | {items} × ≤ {args.item_mb} MiB | \
{conv["wall"]:.0f} s | {mbs:.0f} MB/s | {rss / 1e9:.2f} GB | {rss / largest:.2f}× | \
{row["baseline_rss_gb"]:.2f} GB |

Output {out_bytes / 1e9:.2f} GB (Orbax compresses the codes a little). Peak RSS counts every
resident page of the process (the jax runtime itself is the "import + plan" column); the
conversion holds at most two items (one being written while the next is built) whatever the
checkpoint size, so the ratio to the shard size falls as shards grow to the released
checkpoints' ~9.6 GB (`--item-gb`, default 1, sets the item size of `k2jax convert`).
"""
    write_results(args.results, text)
    print(f"wrote {args.results}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
