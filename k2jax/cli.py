"""The `k2jax` command: every subcommand's arguments, each parsed here and handed to one library
function. Nothing else of k2jax parses a command line.

    k2jax demo     the whole job on a CPU (k2jax.demo.demo)
    k2jax train    a run config → a trained run folder (k2jax.train.Trainer)
    k2jax convert  a Hugging Face checkpoint → sharded Orbax (k2jax.conversion.convert_checkpoint)
    k2jax chat     talk to a checkpoint or a fine-tune (k2jax.chat.chat)
    k2jax export   a run's adapters → a PEFT folder (k2jax.api.export_adapter)
    k2jax merge    a run's LoRA folded into its base (k2jax.api.merge_run)
    k2jax plan     per-device memory of a run on a mesh (k2jax.train.planner.plan_config)

Each command is a pair: `_<name>_args(parser)` declares its flags, `_<name>(args) -> int` checks
what only the command line can get wrong (flag values, an --out that would overwrite an input,
named by its flag) and calls the library. The library modules are imported inside those
functions, not at the top: `k2jax --help` must not start jax, and `k2jax plan` must set how many
CPU devices jax simulates before jax starts.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from k2jax.logs import VERBOSE_ENV, setup_logging, verbose_from_env


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default in --help, unless its help text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, [], argparse.SUPPRESS)
            or action.option_strings == []
        ):
            return text
        return f"{text} (default: %(default)s)"


VERBOSE_HELP = (
    f"also show the libraries' log lines and k2jax's debug lines (or set {VERBOSE_ENV}=1)"
)


def _no_existing_out(out: str, overwrite: bool) -> None:
    # Here rather than in the library, so that the message names the flags.
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it")


# --- demo -----------------------------------------------------------------------------------


def _demo_args(parser: argparse.ArgumentParser) -> None:
    from k2jax.demo import DEFAULT_STEPS

    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="folder for everything")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="train steps")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--images",
        action="store_true",
        help="the multimodal demo: a tiny Kimi-K2.5 with its vision tower on colour images "
        "(k2jax.demo_images; default --steps 40, --out runs/demo-images)",
    )


def _demo(args: argparse.Namespace) -> int:
    from k2jax.demo import DEFAULT_STEPS, demo

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.images:
        import k2jax.demo_images as demo_images

        steps = demo_images.DEFAULT_STEPS if args.steps == DEFAULT_STEPS else args.steps
        out = "runs/demo-images" if args.out == "runs/demo" else args.out
        result = demo_images.image_demo(out, steps=steps, progress=not args.no_progress)
        return 0 if result["learned"] else 1
    result = demo(
        args.out,
        steps=args.steps,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )
    return 0 if result["style_learned"] else 1


# --- train ----------------------------------------------------------------------------------


def _train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="FILE",
        help="run config (gin syntax; a path or a name in k2jax/configs); repeat to layer files. "
        "A LLaMA-Factory training .yaml/.yml is read instead, alone (k2jax.train.llamafactory)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set lora.rank=32 --set data.path=chats.jsonl",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the operative config (every knob) and exit without training",
    )


def _train(args: argparse.Namespace) -> int:
    # jax logs its backend discovery at INFO ("Unable to initialize backend 'tpu'"): noise here.
    logging.getLogger("jax").setLevel(logging.WARNING)
    from k2jax.train.config import RunConfig

    yaml_files = [c for c in args.config if str(c).endswith((".yaml", ".yml"))]
    if yaml_files and len(args.config) > 1:
        raise ValueError(
            f"--config {yaml_files[0]}: a LLaMA-Factory YAML is the only config file; "
            "change the rest with --set"
        )
    if yaml_files:
        from k2jax.train.llamafactory import run_config_from_yaml

        config = run_config_from_yaml(yaml_files[0], args.set)
    else:
        config = RunConfig.load(args.config, args.set)
    if args.print_config:
        print(config.to_gin(), end="")
        return 0
    # Before anything touches a device: on a multi-host launch every process joins first.
    from k2jax.sharding import initialize_distributed

    initialize_distributed()
    from k2jax.train.trainer import NonFiniteError, Trainer

    trainer = Trainer(config)
    try:
        history = trainer.fit()
    except NonFiniteError as e:
        print(f"k2jax train: {e}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    if history:
        last = history[-1]
        print(
            f"k2jax train: step {last['step']}: loss {last['loss']}; run folder "
            f"{config.train.run_dir}"
        )
    return 0


# --- convert --------------------------------------------------------------------------------


def _convert_args(parser: argparse.ArgumentParser) -> None:
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
        help="dtype of the other parameters",
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


def _convert(args: argparse.Namespace) -> int:
    import jax

    from k2jax.conversion.orbax_io import convert_checkpoint
    from k2jax.paths import check_output_path
    from k2jax.sharding import make_mesh, parse_mesh_spec

    # Before anything loads, and in the flags' names (convert_checkpoint checks it too).
    inputs = {"the Hugging Face checkpoint being converted, --hf-dir": args.hf_dir}
    check_output_path(args.out, inputs)
    check_output_path(f"{args.out}.partial", inputs, flag="--out's work folder")
    if args.item_gb <= 0:
        raise ValueError(f"--item-gb must be positive, got {args.item_gb}")
    mesh = None
    if args.mesh:
        sizes = parse_mesh_spec(args.mesh)
        n = math.prod(sizes.values())
        mesh = make_mesh(**sizes, devices=jax.devices()[:n] if n <= jax.device_count() else None)
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


# --- chat -----------------------------------------------------------------------------------


def _chat_args(parser: argparse.ArgumentParser) -> None:
    from k2jax.chat import TEMPLATES

    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PATH", help="checkpoint folder (HF layout + tokenizer)")
    src.add_argument(
        "--run", metavar="DIR", help="a k2jax training run: its base with the trained LoRA"
    )
    parser.add_argument("--step", type=int, help="checkpoint step of --run (default: newest)")
    parser.add_argument(
        "--adapter",
        metavar="DIR",
        help="a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to put on "
        "--model, e.g. one k2jax export wrote",
    )
    parser.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer folder (default: the model's)"
    )
    parser.add_argument(
        "--template", choices=TEMPLATES, help="chat template (default: the model's)"
    )
    parser.add_argument("--no-thinking", action="store_true", help="kimi_k25's instant mode")
    parser.add_argument("--system", help="a system prompt")
    parser.add_argument("--prompt", help="answer this one message and exit (no REPL)")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image shown with the first message (repeatable; a K2.5/K2.6 vision model)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest answer, tokens")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="keep the most likely tokens up to this mass"
    )
    parser.add_argument(
        "--min-p", type=float, default=0.0, help="drop tokens below this × the top probability"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="compute and parameter dtype",
    )


def _chat(args: argparse.Namespace) -> int:
    from k2jax.chat import chat
    from k2jax.generate import Sampling

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.adapter is not None and args.model is None:
        raise ValueError("--adapter goes with --model (a --run already has its LoRA)")
    chat(
        model=args.model,
        run=args.run,
        adapter=args.adapter,
        step=args.step,
        tokenizer=args.tokenizer,
        template=args.template,
        thinking=not args.no_thinking,
        dtype=args.dtype,
        system=args.system,
        prompt=args.prompt,
        sampling=Sampling(temperature=args.temperature, top_p=args.top_p, min_p=args.min_p),
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        images=args.image,
    )
    return 0


# --- export and merge -------------------------------------------------------------------------


def _run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR", help="a k2jax training run folder")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")


def _export_args(parser: argparse.ArgumentParser) -> None:
    _run_args(parser)
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


def _export(args: argparse.Namespace) -> int:
    from k2jax.api import export_adapter
    from k2jax.paths import check_output_path
    from k2jax.train.run import checkpoint_dir, load_run

    r = load_run(args.run, args.step)
    inputs = {
        "the run folder being exported, --run": args.run,
        "the run's checkpoint folder": checkpoint_dir(r.config, r.run_dir),
        "the run's base checkpoint": r.base_path,
    }
    check_output_path(args.out, inputs)
    _no_existing_out(args.out, args.overwrite)
    out = export_adapter(
        r,
        args.out,
        layout=args.layout,
        dtype=args.dtype,
        strict=not args.allow_lossy,
        overwrite=args.overwrite,
    )
    print(f"wrote {out} (step {r.step}, layout {args.layout})")
    return 0


def _merge_args(parser: argparse.ArgumentParser) -> None:
    _run_args(parser)
    parser.add_argument(
        "--base", metavar="PATH", help="base checkpoint folder (default: the one the run trained)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="merged checkpoint folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _merge(args: argparse.Namespace) -> int:
    from k2jax.api import merge_run
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
    _no_existing_out(args.out, args.overwrite)
    out = merge_run(r, args.out, base=base, overwrite=args.overwrite)
    print(f"wrote {out} (step {r.step}, format of {base})")
    return 0


# --- plan -----------------------------------------------------------------------------------


def _plan_args(parser: argparse.ArgumentParser) -> None:
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


def _simulate_cpu_devices(n: int) -> None:
    """Before jax starts: n CPU devices stand in for the mesh's GPUs."""
    if "jax" in sys.modules:
        import jax

        if jax.device_count() < n:
            raise ValueError(f"jax is already running with {jax.device_count()} devices (< {n})")
        return
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"


def _plan(args: argparse.Namespace) -> int:
    import json

    from k2jax.sharding.mesh import parse_mesh_spec

    sizes = parse_mesh_spec(args.mesh)
    _simulate_cpu_devices(math.prod(sizes.values()))
    from k2jax.train.planner import plan_config, policy_table

    results = plan_config(
        args.config,
        args.set,
        mesh_sizes=sizes,
        seq=args.seq,
        batch=args.batch,
        device_memory_gb=args.device_memory_gb,
        reserve_fraction=args.reserve,
        moe_chunk_tokens=args.moe_chunk_tokens,
        remat=args.remat,
        max_seq=args.max_seq,
    )
    for policy, result in results.items():
        if args.max_seq and not result.fits:
            print(f"{policy}: nothing fits, even 1024 tokens per row exceed the memory")
    if len(results) == 1:
        (result,) = results.values()
        print(result.table())
        if args.max_seq:
            print(f"largest sequence that fits: {result.seq if result.fits else 0}")
    else:
        print(policy_table(results, args.max_seq))
    if args.json:
        outs = {policy: result.as_json() for policy, result in results.items()}
        print(json.dumps(next(iter(outs.values())) if len(outs) == 1 else {"policies": outs}))
    return 0


# --- the command ----------------------------------------------------------------------------

# name -> (one-line help, arguments, run)
COMMANDS = {
    "demo": (
        "the whole job on a CPU in minutes: tiny INT4 checkpoint, LoRA, PEFT export, chat",
        _demo_args,
        _demo,
    ),
    "train": (
        "LoRA-train from a run config (gin files or a LLaMA-Factory YAML, + --set overrides)",
        _train_args,
        _train,
    ),
    "convert": (
        "convert a Hugging Face Kimi checkpoint to sharded Orbax",
        _convert_args,
        _convert,
    ),
    "chat": (
        "chat with a checkpoint or a fine-tune (REPL on stdin, or --prompt)",
        _chat_args,
        _chat,
    ),
    "export": ("write a run's LoRA as a PEFT adapter folder", _export_args, _export),
    "merge": ("fold a run's LoRA into its base checkpoint", _merge_args, _merge),
    "plan": ("per-device memory of a LoRA run on a mesh (no GPU needed)", _plan_args, _plan),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k2jax",
        description="LoRA fine-tuning of the Kimi-K2 family in JAX.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpFormatter
        )
        # After the command too (`k2jax train --verbose ...`); SUPPRESS keeps a top-level -v.
        p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
        add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = args.verbose or verbose_from_env()
    run = COMMANDS[args.command][2]
    with setup_logging(args.verbose):
        try:
            return int(run(args) or 0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except (ValueError, OSError) as e:  # our errors say what and where; no traceback
            if args.verbose:
                raise
            print(f"k2jax {args.command}: error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
