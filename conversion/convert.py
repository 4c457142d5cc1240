"""`k2jax convert`: a Hugging Face Kimi checkpoint → a sharded Orbax folder (see orbax_io).

    k2jax convert --hf-dir ckpt/Kimi-K2-Thinking --out ckpt/k2t [--experts int4|bf16]
                  [--mesh data=1,expert=8,tensor=1] [--dtype bfloat16]

Thin on purpose: argument parsing here, the work in k2jax.conversion.orbax_io. jax is imported
only when the command runs.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-dir", required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument(
        "--experts",
        choices=("int4", "bf16"),
        default=None,
        help="how routed experts are stored (default: as in the checkpoint)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="dtype of the other parameters (default: bfloat16)",
    )
    parser.add_argument(
        "--mesh",
        default=None,
        help="devices to spread the pieces over while writing, e.g. expert=8 (default: one device)",
    )
    parser.add_argument(
        "--item-gb",
        type=float,
        default=2.0,
        help="GB of parameters per Orbax item; bounds host memory (default: 2)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import jax

    from k2jax.conversion.orbax_io import convert_checkpoint
    from k2jax.paths import check_output_path
    from k2jax.sharding import make_mesh, parse_mesh_spec

    # Before anything loads, and in the flags' names (convert_checkpoint checks it too).
    inputs = {"the Hugging Face checkpoint being converted, --hf-dir": args.hf_dir}
    check_output_path(args.out, inputs)
    check_output_path(f"{args.out}.partial", inputs, flag="--out's work folder")

    mesh = None
    if args.mesh:
        sizes = parse_mesh_spec(args.mesh)
        n = sizes["data"] * sizes["expert"] * sizes["tensor"]
        mesh = make_mesh(**sizes, devices=jax.devices()[:n] if n <= jax.device_count() else None)
    if args.item_gb <= 0:
        raise ValueError(f"--item-gb must be positive, got {args.item_gb}")
    out = convert_checkpoint(
        args.hf_dir,
        args.out,
        experts=args.experts,
        dtype=args.dtype,
        mesh=mesh,
        max_item_bytes=int(args.item_gb * 2**30),
        progress=False if args.no_progress else None,
    )
    print(f"wrote {out}")
    return 0
