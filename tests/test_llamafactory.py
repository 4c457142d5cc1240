"""A LLaMA-Factory training YAML read as a RunConfig (k2jax.train.llamafactory): the mapped fields,
`k2jax train --config x.yaml --print-config` round-tripping through RunConfig.load, and each
refusal naming its key. Config mapping only: nothing here trains."""

from __future__ import annotations

import re

import pytest

from k2jax.cli import main
from k2jax.config import ConfigError
from k2jax.lora import ALL_TARGETS
from k2jax.train.config import RunConfig
from k2jax.train.llamafactory import run_config_from_yaml

# Our own file in the shape of LLaMA-Factory's examples/train_lora/*_lora_sft.yaml.
SFT_YAML = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 16
lora_target: all

### dataset
dataset_dir: {data_dir}
dataset: chats.jsonl
template: kimi_k2
cutoff_len: 4096
overwrite_cache: true
preprocessing_num_workers: 8
dataloader_num_workers: 2

### output
output_dir: saves/kimi-k2/lora/sft
logging_steps: 5
save_steps: 100
save_total_limit: 2
plot_loss: true
overwrite_output_dir: true
report_to: none

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 4
learning_rate: 1e-4
max_steps: 300
num_train_epochs: 2.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
flash_attn: fa2
resume_from_checkpoint: null
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "Kimi-K2-Instruct").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chats.jsonl").write_text("{}\n")
    return tmp_path


def _write(files, extra: str = "", drop: tuple[str, ...] = ()) -> str:
    text = SFT_YAML.format(model=files / "Kimi-K2-Instruct", data_dir=files / "data")
    lines = [ln for ln in text.splitlines() if ln.split(":")[0] not in drop]
    path = files / "sft.yaml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return str(path)


def test_documented_keys_map_onto_run_config(files):
    cfg = run_config_from_yaml(_write(files), ["mesh.expert=8"])
    assert cfg.model.path == str(files / "Kimi-K2-Instruct")
    assert cfg.data.path == str(files / "data" / "chats.jsonl")
    assert (cfg.data.template, cfg.data.seq_len, cfg.data.num_epochs) == ("kimi_k2", 4096, 2)
    # LLaMA-Factory's global batch: per-device 2 × accumulation 4 × 8 data-parallel devices.
    assert (cfg.data.batch_size, cfg.train.grad_accum, cfg.mesh.expert) == (64, 4, 8)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (16, 32.0, 0.0)  # alpha 2 × rank
    assert cfg.lora.targets == ALL_TARGETS
    assert (cfg.optim.name, cfg.optim.learning_rate, cfg.optim.b2) == ("adamw", 1e-4, 0.999)
    assert (cfg.train.steps, cfg.train.run_dir) == (300, "saves/kimi-k2/lora/sft")
    assert (cfg.schedule.name, cfg.schedule.warmup_steps, cfg.schedule.final_fraction) == (
        "cosine",
        30,
        0.0,
    )
    assert (cfg.log.every, cfg.checkpoint.every, cfg.checkpoint.keep) == (5, 100, 2)
    assert cfg.compute.dtype == "bfloat16" and cfg.train.resume is True


def test_other_keys_and_overrides(files):
    extra = (
        "lora_alpha: 8\nlora_dropout: 0.05\nwarmup_steps: 7\nseed: 3\n"
        "eval_dataset: chats.jsonl\neval_strategy: steps\neval_steps: 50\n"
        "resume_from_checkpoint: false\n"
    )
    path = _write(files, extra, drop=("lora_target", "lr_scheduler_type", "resume_from_checkpoint"))
    cfg = run_config_from_yaml(path, ["lora.rank=4", "data.batch_size=3"])
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (4, 8.0, 0.05)
    assert cfg.data.batch_size == 3  # an override wins over the mapping
    # No lr_scheduler_type: transformers' linear decay to 0 after the warmup; warmup_steps wins.
    assert (cfg.schedule.name, cfg.schedule.decay_fraction, cfg.schedule.warmup_steps) == (
        "wsd",
        1.0,
        7,
    )
    assert (cfg.train.seed, cfg.data.seed, cfg.train.resume) == (3, 3, False)
    assert (cfg.eval.path, cfg.eval.every) == (str(files / "data" / "chats.jsonl"), 50)
    targets = _write(files, "lora_target: q_b_proj, o_proj\n", drop=("lora_target",))
    assert run_config_from_yaml(targets).lora.targets == ("q_b_proj", "o_proj")


def test_print_config_is_gin_that_loads_back(files, capsys, tmp_path):
    path = _write(files)
    assert main(["train", "--config", path, "--set", "mesh.data=2", "--print-config"]) == 0
    gin = tmp_path / "run.gin"
    gin.write_text(capsys.readouterr().out)
    assert RunConfig.load(gin) == run_config_from_yaml(path, ["mesh.data=2"])
    assert RunConfig.load(gin).data.batch_size == 16


@pytest.mark.parametrize(
    "extra, drop, message",
    [
        ("deepspeed: ds_z3_config.json\n", (), "deepspeed: refused: k2jax shards"),
        ("use_kt: true\n", (), "use_kt: refused: KTransformers"),
        ("quantization_bit: 4\n", (), "quantization_bit: refused"),
        ("fp16: true\n", ("bf16",), "fp16: float16 is not supported"),
        ("finetuning_type: full\n", ("finetuning_type",), "k2jax trains LoRA only"),
        ("stage: dpo\n", ("stage",), "only sft"),
        ("template: llama3\n", ("template",), "'llama3': a Kimi template is needed"),
        ("dataset: a.jsonl,b.jsonl\n", ("dataset",), "several datasets are not supported yet"),
        ("dataset: alpaca_en_demo\n", ("dataset",), "no such file or folder"),
        ("lora_target: q_proj,v_proj\n", ("lora_target",), "q_proj, v_proj: not a Kimi-K2 linear"),
        ("lr_scheduler_type: polynomial\n", ("lr_scheduler_type",), "'polynomial' is not"),
        ("num_train_epochs: 1.5\n", ("num_train_epochs",), "whole epochs only"),
        ("", ("max_steps",), "max_steps: required"),
        ("lerning_rate: 1e-4\n", (), "did you mean learning_rate?"),
        ("eval_steps: 10\n", (), "eval_steps: needs eval_dataset"),
        ("resume_from_checkpoint: saves/x/checkpoint-100\n", ("resume_from_checkpoint",), "path"),
        ("cutoff_len: 4\n", ("cutoff_len",), "cutoff_len (→ data.seq_len): data.seq_len: must be"),
    ],
)
def test_refusals_name_the_key(files, extra, drop, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_config_from_yaml(_write(files, extra, drop))


def test_hub_ids_and_dataset_info_names_are_refused(files):
    hub = _write(
        files, "model_name_or_path: moonshotai/Kimi-K2-Instruct\n", ("model_name_or_path",)
    )
    with pytest.raises(ConfigError, match="not a local folder; k2jax downloads nothing"):
        run_config_from_yaml(hub)
    (files / "data" / "dataset_info.json").write_text("{}")
    named = _write(files, "dataset: identity\n", ("dataset",))
    with pytest.raises(ConfigError, match="dataset_info.json names.*not supported yet"):
        run_config_from_yaml(named)


def test_cli_reports_yaml_errors_without_traceback(files, capsys):
    path = _write(files, "deepspeed: ds.json\n")
    assert main(["train", "--config", path, "--print-config"]) == 2
    assert "deepspeed: refused" in capsys.readouterr().err
    assert main(["train", "--config", path, "--config", "tiny_train.gin"]) == 2
    assert "the only config file" in capsys.readouterr().err


def test_masking_knobs_and_val_size_map_onto_data(files):
    """train_on_prompt, mask_history and val_size have the same meaning in data.*; val_size with
    eval_strategy steps evaluates the held-out split every eval_steps."""
    extra = "mask_history: true\nval_size: 0.1\neval_strategy: steps\neval_steps: 7\n"
    rc = run_config_from_yaml(_write(files, extra))
    assert (rc.data.train_on_prompt, rc.data.mask_history, rc.data.val_size) == (False, True, 0.1)
    assert rc.eval.every == 7 and rc.eval.path is None
    assert run_config_from_yaml(_write(files, "train_on_prompt: true\n")).data.train_on_prompt
