"""A LLaMA-Factory training YAML read as a RunConfig (k2jax.train.llamafactory): the mapped fields
(batch × accumulation × data-parallel devices, epochs, warmup ratio, val_size evaluation, datasets
by file or dataset_info.json name, resume from a checkpoint of output_dir, an adapter to continue,
W&B), `k2jax train --config x.yaml --print-config` round-tripping through RunConfig.load, and each
refusal naming its key. Config mapping only: nothing here trains."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import TINY_HF_CONFIG

from k2jax.cli import main
from k2jax.config import ConfigError, ModelConfig
from k2jax.conversion.peft import export_peft, known_paths, linear_shape
from k2jax.lora import ALL_TARGETS, LoraConfig
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
    config = {**TINY_HF_CONFIG, "model_type": "deepseek_v3"}
    (tmp_path / "Kimi-K2-Instruct" / "config.json").write_text(json.dumps(config))
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
    # cutoff_len: the row length, and LLaMA-Factory's truncation of longer examples
    assert (cfg.data.template, cfg.data.seq_len, cfg.data.overlong) == ("kimi_k2", 4096, "truncate")
    # max_steps wins over num_train_epochs (transformers): the data repeats
    assert (cfg.train.steps, cfg.data.num_epochs) == (300, None)
    # LLaMA-Factory's global batch: per-device 2 × accumulation 4 × 8 data-parallel devices.
    assert (cfg.data.batch_size, cfg.train.grad_accum, cfg.mesh.expert) == (64, 4, 8)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (16, 32.0, 0.0)  # alpha 2 × rank
    assert cfg.lora.targets == ALL_TARGETS
    assert (cfg.optim.name, cfg.optim.learning_rate, cfg.optim.b2) == ("adamw", 1e-4, 0.999)
    assert cfg.train.run_dir == "saves/kimi-k2/lora/sft"
    # warmup_ratio stays a ratio: of the 300 steps here, of the counted steps in an epoch run
    assert (cfg.schedule.name, cfg.schedule.warmup_ratio, cfg.schedule.final_fraction) == (
        "cosine",
        0.1,
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
    assert cfg.schedule.warmup_ratio == 0.0  # warmup_steps wins over the ratio, as there
    targets = _write(files, "lora_target: q_b_proj, o_proj\n", drop=("lora_target",))
    assert run_config_from_yaml(targets).lora.targets == ("q_b_proj", "o_proj")
    # K2.5 images: the vision tower and projector frozen unless unfrozen, as there
    assert run_config_from_yaml(_write(files, "freeze_vision_tower: true\n")).lora.targets == (
        ALL_TARGETS
    )
    vision = _write(
        files, "freeze_vision_tower: false\nfreeze_multi_modal_projector: false\nmedia_dir: pics\n"
    )
    cfg = run_config_from_yaml(vision)
    assert cfg.lora.targets == (*ALL_TARGETS, "vision_tower.blocks.*", "mm_projector.*")
    assert cfg.data.media_dir == "pics"


def test_epochs_without_max_steps_count_the_steps(files):
    cfg = run_config_from_yaml(_write(files, drop=("max_steps",)))
    assert (cfg.train.steps, cfg.data.num_epochs) == (None, 2)  # counted when the run starts
    default = run_config_from_yaml(_write(files, drop=("max_steps", "num_train_epochs")))
    assert default.data.num_epochs == 3  # transformers' num_train_epochs default


def test_data_knobs_evaluation_and_reporting(files):
    (files / "data" / "more.jsonl").write_text("{}\n")
    extra = (
        "val_size: 0.1\neval_strategy: steps\neval_steps: 20\nper_device_eval_batch_size: 1\n"
        "train_on_prompt: true\nmix_strategy: interleave_under\ninterleave_probs: 0.7,0.3\n"
        "report_to: [wandb, tensorboard]\nrun_name: k2-sft\nsave_strategy: 'no'\n"
    )
    cfg = run_config_from_yaml(
        _write(files, extra + "dataset: chats.jsonl,more.jsonl\n", drop=("dataset", "report_to"))
    )
    data = files / "data"
    assert cfg.data.path == (str(data / "chats.jsonl"), str(data / "more.jsonl"))
    assert (cfg.data.mix_strategy, cfg.data.interleave_probs) == ("interleave_under", (0.7, 0.3))
    assert (cfg.data.val_size, cfg.eval.path, cfg.eval.every) == (0.1, None, 20)
    assert (cfg.data.train_on_prompt, cfg.data.mask_history) == (True, False)
    assert (cfg.log.wandb, cfg.log.wandb_name, cfg.log.tensorboard) == (True, "k2-sft", True)
    assert cfg.checkpoint.every == 0  # save_strategy no: saved once, at the end
    # dataset_info.json names: the folder is data.path, the names data.dataset (k2jax.data)
    (data / "dataset_info.json").write_text('{"identity": {"file_name": "chats.jsonl"}}')
    named = run_config_from_yaml(_write(files, "dataset: identity\n", drop=("dataset",)))
    assert (named.data.path, named.data.dataset) == (str(data), "identity")


def test_resume_from_a_checkpoint_of_output_dir(files, tmp_path):
    out = tmp_path / "saves" / "sft"
    for name in (f"{out}/checkpoint-100", f"{out}/checkpoints/100"):
        extra = f"resume_from_checkpoint: {name}\noutput_dir: {out}\n"
        cfg = run_config_from_yaml(
            _write(files, extra, drop=("resume_from_checkpoint", "output_dir"))
        )
        assert (cfg.train.resume, cfg.train.resume_step) == (True, 100)


def _tiny_adapter(folder, rank=4, alpha=8.0, targets=("q_a_proj", "experts.down_proj")):
    """A PEFT adapter of the tiny HF config with random factors on `targets`, written by our
    export (numpy only: no model is built)."""
    mc = ModelConfig.from_hf_dict({**TINY_HF_CONFIG, "model_type": "deepseek_v3"})
    lora = LoraConfig(rank=rank, alpha=alpha, targets=targets)
    rng = np.random.default_rng(0)
    tree: dict = {}
    for path, layers in known_paths(mc).items():
        if not lora.applies_to(".".join(path[1:])):
            continue
        out_f, in_f = linear_shape(mc, path)
        lead = (layers, mc.n_routed_experts) if "experts" in path else (layers,)
        node = tree
        for k in path:
            node = node.setdefault(k, {})
        node["lora_A"] = rng.normal(size=(*lead, rank, in_f)).astype(np.float32)
        node["lora_B"] = rng.normal(size=(*lead, out_f, rank)).astype(np.float32)
    return export_peft(mc, lora, tree, None, folder)


def test_adapter_name_or_path_continues_the_adapter(files, tmp_path):
    adapter = _tiny_adapter(tmp_path / "adapter")
    extra = f"adapter_name_or_path: {adapter}\n"
    cfg = run_config_from_yaml(_write(files, extra, drop=("lora_rank", "lora_target")))
    # the adapter's own rank, scale and modules (the per-expert export's zero-filled gate/up
    # projections included: they start fresh in the run)
    assert (cfg.lora.init_from, cfg.lora.rank, cfg.lora.alpha) == (str(adapter), 4, 8.0)
    assert cfg.lora.targets == (
        "mlp.experts.down_proj",
        "mlp.experts.gate_proj",
        "mlp.experts.up_proj",
        "self_attn.q_a_proj",
    )
    # a lora_* key given still wins (and the run's set-up then names the mismatch)
    assert run_config_from_yaml(_write(files, extra, drop=("lora_target",))).lora.rank == 16
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text('{"r": 4}')
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ConfigError, match="a pickle .*never unpickles"):
        run_config_from_yaml(_write(files, f"adapter_name_or_path: {tmp_path / 'pickled'}\n"))


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
        ("create_new_adapter: true\n", (), "create_new_adapter: refused: an adapter"),
        ("fp16: true\n", ("bf16",), "fp16: float16 is not supported"),
        ("finetuning_type: full\n", ("finetuning_type",), "k2jax trains LoRA only"),
        ("stage: dpo\n", ("stage",), "only sft"),
        ("template: llama3\n", ("template",), "'llama3': a Kimi template is needed"),
        ("dataset: chats.jsonl,b.jsonl\n", ("dataset",), "'b.jsonl': no such file or folder"),
        ("dataset: alpaca_en_demo\n", ("dataset",), "no such file or folder, and no"),
        ("lora_target: q_proj,v_proj\n", ("lora_target",), "q_proj, v_proj: not a Kimi-K2 linear"),
        ("lr_scheduler_type: polynomial\n", ("lr_scheduler_type",), "'polynomial' is not"),
        ("num_train_epochs: 1.5\n", ("num_train_epochs", "max_steps"), "whole epochs"),
        ("lerning_rate: 1e-4\n", (), "did you mean learning_rate?"),
        ("lora_rnk: 4\n", (), "did you mean lora_rank,"),
        ("eval_steps: 10\n", (), "eval_steps: needs eval_dataset or val_size"),
        ("eval_strategy: epoch\n", (), "'epoch': only steps"),
        ("save_strategy: epoch\n", (), "'epoch': steps (every save_steps) or no"),
        ("report_to: mlflow\n", ("report_to",), "mlflow: k2jax writes TensorBoard"),
        ("val_size: 1.5\n", (), "val_size (→ data.val_size): data.val_size: a fraction"),
        (
            "resume_from_checkpoint: elsewhere/checkpoint-100\n",
            ("resume_from_checkpoint",),
            "k2jax resumes its own checkpoints of output_dir",
        ),
        ("cutoff_len: 4\n", ("cutoff_len",), "cutoff_len (→ data.seq_len): data.seq_len: must be"),
    ],
)
def test_refusals_name_the_key(files, extra, drop, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_config_from_yaml(_write(files, extra, drop))


def test_hub_ids_are_refused(files):
    hub = _write(
        files, "model_name_or_path: moonshotai/Kimi-K2-Instruct\n", ("model_name_or_path",)
    )
    with pytest.raises(ConfigError, match="not a local folder; k2jax downloads nothing"):
        run_config_from_yaml(hub)
    (files / "data" / "dataset_info.json").write_text("{}")
    mixed = _write(files, "dataset: chats.jsonl,identity\n", ("dataset",))
    with pytest.raises(ConfigError, match="mixes files with dataset_info.json names"):
        run_config_from_yaml(mixed)


def test_cli_reports_yaml_errors_without_traceback(files, capsys):
    path = _write(files, "deepspeed: ds.json\n")
    assert main(["train", "--config", path, "--print-config"]) == 2
    assert "deepspeed: refused" in capsys.readouterr().err
    assert main(["train", "--config", path, "--config", "tiny_train.gin"]) == 2
    assert "the only config file" in capsys.readouterr().err
