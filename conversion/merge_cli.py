"""`k2jax merge`: a training run's LoRA, QK-clip factors and fully trained parameters folded into
its base checkpoint, written in the base's format (see k2jax.conversion.merge).

    k2jax merge --run runs/my-run --out ckpt/merged          # base: the checkpoint the run used
    k2jax merge --run runs/my-run --base ckpt/K2T --out ckpt/merged

Refuses an --out that is, contains or lies inside the base checkpoint, the run folder or its
checkpoint folder, even with --overwrite (k2jax.paths).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR", help="a k2jax training run folder")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument(
        "--base", metavar="PATH", help="base checkpoint folder (default: the one the run trained)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="merged checkpoint folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from k2jax.conversion.merge import merge_lora
    from k2jax.paths import check_output_path
    from k2jax.train.run import checkpoint_dir, load_run

    r = load_run(args.run, args.step)
    base = args.base or r.base_path
    if base is None:
        raise ValueError(
            f"{args.run}: the run trained on the random preset {r.preset!r}; there is no base "
            "checkpoint to merge into (pass --base PATH if you have one)"
        )
    inputs = {
        "the base checkpoint, --base" if args.base else "the run's base checkpoint": base,
        "the run folder being merged, --run": args.run,
        "the run's checkpoint folder": checkpoint_dir(r.config, r.run_dir),
    }
    check_output_path(args.out, inputs)
    # Here rather than in merge_lora, so that the message names the flag.
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} already exists; pass --overwrite to replace it")
    out = merge_lora(
        base,
        r.model_config,
        r.lora_config,
        r.lora,
        r.qk_clip,
        args.out,
        trained_params=r.trained_params,
        overwrite=args.overwrite,
    )
    print(f"wrote {out} (step {r.step}, format of {base})")
    return 0
