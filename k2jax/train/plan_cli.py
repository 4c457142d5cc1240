"""`k2jax plan`: per-device memory of a LoRA run on a mesh, computed on this CPU (no GPU needed).

    k2jax plan --config configs/kimi_k2_thinking.gin --mesh data=1,expert=8,tensor=1 \\
        --seq 4096 --device-memory-gb 141 [--batch N] [--max-seq] [--json]

`--config` is a model preset (configs/kimi_k2_thinking.gin) or a run config (configs/lora_sft.gin:
its compute, lora and optim sections are planned as configured; its architecture comes from
model.preset or from model.path's config.json). `--max-seq` searches the longest sequence that
fits. With `--json` the last line is one JSON object with at least `per_device_bytes` and `fits`.

The command sets how many CPU devices jax simulates (the mesh size) before jax starts; see
k2jax.train.planner for how the compiled CPU program stands in for the GPU one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="model preset or run config (gin; a path or a name in k2jax/configs)",
    )
    parser.add_argument(
        "--mesh", default="data=1,expert=8,tensor=1", help="data=..,expert=..,tensor=.."
    )
    parser.add_argument(
        "--seq",
        type=int,
        default=None,
        help="tokens per row (default: a run config's data.seq_len, else 4096)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="rows per step (default: a run config's data.batch_size, else data×expert)",
    )
    parser.add_argument("--device-memory-gb", type=float, default=80.0, help="memory per GPU, GiB")
    parser.add_argument(
        "--reserve", type=float, default=0.05, help="fraction kept free (default 0.05)"
    )
    parser.add_argument(
        "--moe-chunk-tokens",
        type=int,
        default=None,
        help="tokens per expert-parallel dispatch chunk (default: the config's, else 512)",
    )
    parser.add_argument(
        "--max-seq", action="store_true", help="find the longest sequence that fits"
    )
    parser.add_argument(
        "--remat",
        default=None,
        metavar="POLICY",
        help="remat policy to plan (one of ComputeConfig's REMAT_POLICIES), or 'all' for a "
        "table of every policy (default: the config's)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line"
    )


def _configs(path: str, overrides: list[str]):
    """(ModelConfig, compute, lora, optim, run) from a preset or a run config (run: the
    RunConfig, or None for a preset)."""
    from k2jax.config import (
        ConfigError,
        ModelConfig,
        find_config_file,
        load_model_config,
        parse_bindings,
    )
    from k2jax.model import ComputeConfig

    path = str(find_config_file(path))  # a path, or a packaged name such as lora_sft.gin
    text = Path(path).read_text()
    text_keys = {k for s, k, _, _ in parse_bindings(text, filename=path) if s == "model"}
    if "path" in text_keys or "preset" in text_keys:
        from k2jax.train.config import RunConfig

        run = RunConfig.load(path, overrides)
        if run.model.preset:
            model = load_model_config(run.model.preset)
        else:
            model = ModelConfig.from_hf_dir(run.model.path)
        return model, run.compute, run.lora, run.optim, run
    other = [o for o in overrides if not o.startswith("model.")]
    if other:
        raise ConfigError(
            f"--set {other[0]}: {path} is a model preset, which takes only model.* overrides; "
            "plan a run config (e.g. configs/lora_sft.gin) to change the lora, optim or compute "
            "sections"
        )
    try:
        model = load_model_config(path, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: not a model preset or run config: {e}") from None
    compute = ComputeConfig(dtype="bfloat16", param_dtype="bfloat16", experts="int4", remat="full")
    return model, compute, None, None, None


def run(args: argparse.Namespace) -> int:
    from k2jax.sharding.mesh import parse_mesh_spec

    sizes = parse_mesh_spec(args.mesh)
    n = math.prod(sizes.values())
    # Before jax starts: simulate the mesh's devices on the CPU.
    if "jax" in __import__("sys").modules:
        import jax

        if jax.device_count() < n:
            raise ValueError(f"jax is already running with {jax.device_count()} devices (< {n})")
    else:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"

    import dataclasses

    from k2jax.train.planner import GIB, largest_fitting_seq, plan

    model, compute, lora, optim, run_config = _configs(args.config, args.set)
    # A run config plans what it trains: its rows per step, microbatches and sequence length.
    batch, grad_accum, seq = args.batch, 1, args.seq
    if run_config is not None:
        batch = batch or run_config.data.batch_size
        grad_accum = run_config.train.grad_accum
        seq = seq or run_config.data.seq_len
    seq = seq or 4096
    chunk = args.moe_chunk_tokens
    if chunk is None:
        chunk = compute.moe_chunk_tokens or 512
    compute = dataclasses.replace(compute, moe_chunk_tokens=chunk)
    from k2jax.model.options import REMAT_POLICIES

    if args.remat not in (None, "all", *REMAT_POLICIES):
        raise ValueError(
            f"--remat must be one of {', '.join(REMAT_POLICIES)} or all, got {args.remat!r}"
        )
    policies = REMAT_POLICIES if args.remat == "all" else [args.remat or compute.remat]
    kw = dict(
        mesh_sizes=sizes,
        batch=batch,
        grad_accum=grad_accum,
        device_memory_gb=args.device_memory_gb,
        reserve_fraction=args.reserve,
        lora=lora,
        optim=optim,
    )
    results = {}
    for policy in policies:
        c = dataclasses.replace(compute, remat=policy)
        if args.max_seq:
            _, result = largest_fitting_seq(model, step=1024, compute=c, **kw)
            if result is None:
                print(f"{policy}: nothing fits, even 1024 tokens per row exceed the memory")
                result = plan(model, seq=1024, compute=c, **kw)
        else:
            result = plan(model, seq=seq, compute=c, **kw)
        results[policy] = result
        if len(policies) == 1:
            print(result.table())
            if args.max_seq:
                print(f"largest sequence that fits: {result.seq if result.fits else 0}")
    if len(policies) > 1:
        print(_policy_table(results, args.max_seq))
    if args.json:
        outs = {}
        for policy, result in results.items():
            outs[policy] = {**result.as_dict(), "per_device_gib": result.per_device_bytes / GIB}
            outs[policy]["remat"] = policy
        print(json.dumps(outs[policies[0]] if len(policies) == 1 else {"policies": outs}))
    return 0


def _policy_table(results: dict, max_seq: bool) -> str:
    """One line per remat policy: what the step holds and whether it fits."""
    from k2jax.train.planner import GIB

    seq_head = "longest seq" if max_seq else "seq"
    lines = [f"{'remat':<11}{seq_head:>12}{'temporaries':>14}{'total':>10}  fits"]
    for policy, r in results.items():
        seq = r.seq if (r.fits or not max_seq) else 0
        lines.append(
            f"{policy:<11}{seq:>12,}{r.temporaries / GIB:>11.2f} GiB{r.per_device_bytes / GIB:>7.2f} "
            f"GiB  {'yes' if r.fits else 'no'}"
        )
    return "\n".join(lines)
