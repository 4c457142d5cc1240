"""`k2jax export`: a training run's adapters as a PEFT adapter folder (see k2jax.conversion.peft).

    k2jax export --run runs/my-run --format peft --out adapters/my              # per-expert names
    k2jax export --run runs/my-run --format peft --layout fused --out adapters/my-fused

Refuses a run whose QK-clip factors are not all 1 or that trained base parameters in full (an
adapter cannot carry them; `k2jax merge` can), unless --allow-lossy. Refuses an --out that is,
contains or lies inside the run folder, its checkpoint folder or its base checkpoint, even with
--overwrite (k2jax.paths).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR", help="a k2jax training run folder")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--format", choices=("peft",), default="peft", help="adapter format")
    parser.add_argument("--out", required=True, metavar="DIR", help="adapter folder to write")
    parser.add_argument(
        "--layout",
        choices=("per-expert", "fused"),
        default="per-expert",
        help="routed experts: per-expert names (vLLM, PEFT) or transformers-5 fused parameters",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="adapter tensor dtype"
    )
    parser.add_argument(
        "--allow-lossy",
        action="store_true",
        help="export the adapters even if QK-clip factors or fully trained parameters are lost",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from k2jax.conversion.peft import export_peft
    from k2jax.paths import check_output_path
    from k2jax.train.run import checkpoint_dir, load_run

    r = load_run(args.run, args.step)
    inputs = {
        "the run folder being exported, --run": args.run,
        "the run's checkpoint folder": checkpoint_dir(r.config, r.run_dir),
        "the run's base checkpoint": r.base_path,
    }
    check_output_path(args.out, inputs)
    # Here rather than in export_peft, so that the message names the flag.
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} already exists; pass --overwrite to replace it")
    out = export_peft(
        r.model_config,
        r.lora_config,
        r.lora,
        r.qk_clip,
        args.out,
        layout=args.layout,
        dtype=args.dtype,
        trained_params=r.trained_params,
        base_model_name_or_path=r.base_path,
        strict=not args.allow_lossy,
        overwrite=args.overwrite,
    )
    print(f"wrote {out} (step {r.step}, layout {args.layout})")
    return 0
