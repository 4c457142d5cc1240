"""`k2jax merge`: a training run's LoRA, QK-clip factors and fully trained parameters folded into
its base checkpoint, written in the base's format (see k2jax.conversion.merge).

    k2jax merge --run runs/my-run --out ckpt/merged          # base: the checkpoint the run used
    k2jax merge --run runs/my-run --base ckpt/K2T --out ckpt/merged
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
    from k2jax.conversion.merge import merge_lora
    from k2jax.train.run import load_run

    r = load_run(args.run, args.step)
    base = args.base or r.base_path
    if base is None:
        raise ValueError(
            f"{args.run}: the run trained on the random preset {r.preset!r}; there is no base "
            "checkpoint to merge into (pass --base PATH if you have one)"
        )
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
