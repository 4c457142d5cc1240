"""No command destroys what it reads: k2jax.paths.check_output_path, and `k2jax export` /
`k2jax merge` refusing an --out that is, contains or lies inside the run folder, its checkpoint
folder or the base checkpoint — with and without --overwrite, leaving every input untouched — and
naming the --overwrite flag when --out merely exists.

The run folder is written directly (config.gin, model_config.json, one Orbax checkpoint of a
random LoRA through k2jax.train.Checkpointer, its checkpoint.dir outside the run folder), over a
tiny bf16 base: no training needed.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from k2_checkpoints import random_lora, variable_shapes

from k2jax.cli import main as cli_main
from k2jax.config import CONFIG_DIR, ConfigError, ModelConfig
from k2jax.model import ComputeConfig, Transformer
from k2jax.paths import OutputPathError, check_output_path
from k2jax.testing import make_tiny_checkpoint
from k2jax.train import Checkpointer, RunConfig
from k2jax.train.run import CONFIG_FILE, MODEL_CONFIG_FILE, model_config_to_json

# ---------------------------------------------------------------------------------------------
# check_output_path


def test_same_inside_and_containing_are_refused(tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    role = "the run folder being exported, --run"
    cases = {
        run: f"--out {run} is {role} {run}; writing there would destroy it: choose a folder "
        "outside it",
        run / "adapter": f"--out {run / 'adapter'} lies inside {role} {run}; writing there would "
        "change what it holds: choose a folder outside it",
        tmp_path / "runs": f"--out {tmp_path / 'runs'} contains {role} {run}; replacing it would "
        "destroy that: choose a folder that does not contain it",
        tmp_path: f"--out {tmp_path} contains {role}",
    }
    for out, message in cases.items():
        with pytest.raises(OutputPathError) as err:
            check_output_path(out, {role: run})
        assert str(err.value).startswith(message)
        assert isinstance(err.value, ConfigError) and isinstance(err.value, ValueError)
    # siblings, including one whose name starts like the input's, are fine; None is skipped
    for out in (tmp_path / "runs" / "x2", tmp_path / "runs" / "y" / "deeper", tmp_path / "z"):
        check_output_path(out, {role: run, "an optional input": None})


def test_relative_and_symlinked_spellings_are_resolved(tmp_path, monkeypatch):
    base = tmp_path / "ckpt" / "base"
    base.mkdir(parents=True)
    (tmp_path / "link").symlink_to(base)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputPathError, match=r"the merged folder ckpt/base/\.\./base is"):
        check_output_path(
            "ckpt/base/../base", {"the base checkpoint": base}, flag="the merged folder"
        )
    with pytest.raises(OutputPathError) as err:
        check_output_path("link/merged", {"the base checkpoint": "ckpt/base"})
    msg = str(err.value)
    assert msg.startswith("--out link/merged lies inside the base checkpoint ckpt/base")
    assert f"(link/merged resolves to {base / 'merged'});" in msg
    # the output may not exist yet, nor the folder it would be created in
    with pytest.raises(OutputPathError, match="lies inside"):
        check_output_path(tmp_path / "link" / "a" / "b", {"the base checkpoint": base})
    # an input given through a symlink is caught too
    with pytest.raises(OutputPathError) as err:
        check_output_path("ckpt/base", {"the base checkpoint": "link"})
    assert str(err.value).startswith(
        f"--out ckpt/base is the base checkpoint link (link resolves to {base}); writing there"
    )


def test_importing_paths_loads_no_jax():
    code = "import sys, k2jax.paths; assert 'jax' not in sys.modules, sorted(sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# k2jax export / k2jax merge


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(base, run folder, checkpoint folder): a tiny bf16 base and a run over it whose
    checkpoint.dir lies outside the run folder."""
    root = tmp_path_factory.mktemp("paths")
    base = make_tiny_checkpoint(root / "base", "bf16")
    run_dir, ckpt = root / "run", root / "ckpts"
    config = RunConfig.load(
        CONFIG_DIR / "tiny_train.gin",
        [
            f"train.run_dir={run_dir}",
            f"checkpoint.dir={ckpt}",
            f"model.path={base}",
            "model.preset=None",
            "model.tokenizer=None",
        ],
    )
    cfg = ModelConfig.from_hf_dir(base)
    shapes = variable_shapes(Transformer(cfg, ComputeConfig(), config.lora))
    lora = random_lora(shapes["lora"], np.random.default_rng(0))
    qk_clip = jax.tree.map(lambda x: np.ones(x.shape, np.float32), shapes["qk_clip"])
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(config.to_gin())
    (run_dir / MODEL_CONFIG_FILE).write_text(model_config_to_json(cfg))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    checkpointer = Checkpointer(ckpt, async_save=False)
    # export and merge read only the "train" item; the optimizer's entries (whichever the
    # trainer saves) are placeholders
    state = collections.defaultdict(lambda: np.zeros((), np.int32))
    state.update(trainable={"lora": lora}, qk_clip=qk_clip)
    checkpointer.save(1, state, {"data_state": {}})
    checkpointer.close()
    return base, run_dir, ckpt


def _snapshot(*folders):
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for folder in folders
        for p in sorted([folder, *folder.rglob("*")])
    }


ROLES = {
    "export": {
        "run": "the run folder being exported, --run",
        "ckpt": "the run's checkpoint folder",
        "base": "the run's base checkpoint",
    },
    "merge": {
        "run": "the run folder being merged, --run",
        "ckpt": "the run's checkpoint folder",
        "base": "the base checkpoint, --base",
    },
}


@pytest.mark.parametrize("command", ["export", "merge"])
@pytest.mark.parametrize(
    "out, relation, input",
    [
        ("run", "is", "run"),
        ("run/adapter", "lies inside", "run"),
        ("ckpt", "is", "ckpt"),
        ("ckpt/1", "lies inside", "ckpt"),
        ("base", "is", "base"),
        ("base/merged", "lies inside", "base"),
        ("root", "contains", None),
    ],
)
def test_out_on_an_input_is_refused_even_with_overwrite(run, capsys, command, out, relation, input):
    base, run_dir, ckpt = run
    folders = {"run": run_dir, "ckpt": ckpt, "base": base, "root": run_dir.parent}
    head, _, tail = out.partition("/")
    out = folders[head] / tail if tail else folders[head]
    before = _snapshot(base, run_dir, ckpt)
    for overwrite in ([], ["--overwrite"]):
        args = [command, "--run", str(run_dir), "--out", str(out), *overwrite]
        if command == "merge":
            args += ["--base", str(base)]
        assert cli_main(args) == 2
        err = capsys.readouterr().err
        if input is None:  # the first input it contains is named
            assert f"--out {out} contains the " in err, err
        else:
            role = ROLES[command][input]
            assert f"--out {out} {relation} {role} {folders[input]};" in err, err
        assert _snapshot(base, run_dir, ckpt) == before
        assert not (run_dir / "adapter").exists() and not (base / "merged").exists()


@pytest.mark.parametrize("command", ["export", "merge"])
def test_existing_out_names_the_overwrite_flag(run, tmp_path, capsys, command):
    _, run_dir, _ = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main([command, "--run", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already exists; pass --overwrite to replace it" in err
    assert "overwrite=True" not in err
    assert (out / "keep.txt").read_text() == "mine"


def test_export_overwrite_replaces_an_earlier_adapter(run, tmp_path, capsys):
    base, run_dir, _ = run
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("an earlier export")
    assert cli_main(["export", "--run", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert os.path.isabs(config["base_model_name_or_path"])
