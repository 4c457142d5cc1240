"""The `k2jax` command line: --help shows defaults, quiet logs by default (--verbose for the
libraries'), log lines around progress bars, and an in-process command leaves logging as it was."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from helpers import ROOT

from k2jax import cli, logs
from k2jax.cli import build_parser, main


def _help(command: str) -> str:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return sub.format_help()


@pytest.mark.parametrize(
    "command, shown",
    [
        ("chat", ["(default: 0.6)", "(default: 512)", "(default: bfloat16)"]),
        ("export", ["(default: per-expert)", "(default: float32)"]),
        ("demo", ["(default: runs/demo)", "(default: 32)"]),
        ("plan", ["(default: 80.0)", "(default: data=1,expert=8,tensor=1)"]),
        ("convert", ["(default: bfloat16)", "(default: 2)"]),
    ],
)
def test_help_shows_defaults(command, shown):
    text = " ".join(_help(command).split())  # argparse wraps lines
    for s in shown:
        assert s in text, (command, s)
    assert "--verbose" in text and logs.VERBOSE_ENV in text


def test_quiet_by_default_verbose_on_request(capsys, monkeypatch):
    """Library INFO lines (Orbax narrates through absl) are held back unless --verbose or
    K2JAX_VERBOSE; k2jax's own INFO lines and everyone's warnings are shown."""
    seen = {}

    def fake_run(args):
        logging.getLogger("absl").info("Finished saving checkpoint")
        logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
        logging.getLogger("orbax").warning("an orbax warning")
        logging.getLogger("k2jax.train.trainer").info("step 1/2 loss 1.0")
        seen["verbose"] = args.verbose
        return 0

    help_text, plan_args, _ = cli.COMMANDS["plan"]
    monkeypatch.setitem(cli.COMMANDS, "plan", (help_text, plan_args, fake_run))
    before = (list(logging.getLogger().handlers), logging.getLogger("absl").level)
    assert main(["plan", "--config", "tiny.gin"]) == 0
    err = capsys.readouterr().err
    assert "step 1/2 loss 1.0" in err and "an orbax warning" in err
    assert "Finished saving" not in err and "Unable to initialize" not in err
    assert (list(logging.getLogger().handlers), logging.getLogger("absl").level) == before
    for argv, env in (
        (["plan", "--verbose"], None),
        (["--verbose", "plan"], None),
        (["plan"], "1"),
    ):
        if env:
            monkeypatch.setenv(logs.VERBOSE_ENV, env)
        assert main([*argv, "--config", "tiny.gin"]) == 0
        err = capsys.readouterr().err
        assert "Finished saving" in err and seen["verbose"] is True, (argv, env)
    monkeypatch.delenv(logs.VERBOSE_ENV)


def test_log_lines_go_around_the_progress_bar(monkeypatch):
    written = []
    monkeypatch.setattr("tqdm.tqdm.write", staticmethod(lambda s, file=None: written.append(s)))
    with logs.setup_logging():
        logging.getLogger("k2jax.x").info("a line")
        logging.getLogger("k2jax.x").warning("careful")
    assert written == ["a line", "warning: k2jax.x: careful"]


def test_cli_module_runs_as_a_script():
    out = subprocess.run(
        [sys.executable, "-m", "k2jax.cli", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "COMMAND" in out.stdout
