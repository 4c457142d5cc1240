"""The `k2jax` command. Thin on purpose: it parses arguments and calls library functions.

Each command lives in the module that implements it, as a pair of functions:
`add_arguments(parser)` and `run(args) -> int`. This file only lists them; nothing heavy is imported
until a command runs (so `k2jax plan` can still set how many CPU devices jax simulates).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from k2jax.logs import VERBOSE_ENV, setup_logging, verbose_from_env

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "k2jax.demo",
        "the whole job on a CPU in minutes: tiny INT4 checkpoint, LoRA, PEFT export, chat",
    ),
    "train": ("k2jax.train.cli", "LoRA-train from a run config (gin files + --set overrides)"),
    "convert": (
        "k2jax.conversion.convert",
        "convert a Hugging Face Kimi checkpoint to sharded Orbax",
    ),
    "chat": ("k2jax.chat", "chat with a checkpoint or a fine-tune (REPL on stdin, or --prompt)"),
    "export": ("k2jax.conversion.export_cli", "write a run's LoRA as a PEFT adapter folder"),
    "merge": ("k2jax.conversion.merge_cli", "fold a run's LoRA into its base checkpoint"),
    "plan": (
        "k2jax.train.plan_cli",
        "per-device memory of a LoRA run on a mesh (no GPU needed)",
    ),
}


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k2jax",
        description="LoRA fine-tuning of the Kimi-K2 family in JAX.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpFormatter
        )
        # After the command too (`k2jax train --verbose ...`); SUPPRESS keeps a top-level -v.
        p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = args.verbose or verbose_from_env()
    mod = importlib.import_module(args._module)
    with setup_logging(args.verbose):
        try:
            return int(mod.run(args) or 0)
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
