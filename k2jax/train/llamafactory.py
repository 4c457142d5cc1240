"""LLaMA-Factory training YAML → RunConfig: `k2jax train --config my_lora_sft.yaml`.

A LLaMA-Factory LoRA SFT file is a flat mapping of its own argument names. Each key that has the
same meaning here is bound to an existing RunConfig field; every other key is either harmless and
accepted, or refused by name with the reason, so a run never silently differs from what the file
says. Then the `--set section.key=value` overrides apply, as for a gin file, and
`k2jax train --config x.yaml --print-config` shows the gin equivalent (`RunConfig.to_gin()`), which
can be saved and used instead of the YAML from then on.

    model_name_or_path             model.path (a local checkpoint folder; no downloads)
    dataset_dir / dataset          data.path: the named local files or folders (a comma list is
                                   several datasets); names of dataset_dir/dataset_info.json
                                   entries: data.path = dataset_dir, data.dataset = the names
    mix_strategy, interleave_probs data.mix_strategy, data.interleave_probs (same values)
    template                       data.template (kimi, kimi_k2 → kimi_k2; our own names as-is)
    cutoff_len                     data.seq_len, with data.overlong = "truncate" (LLaMA-Factory's
                                   rule: the prompt loses its start, the answer its end); rows
                                   are packed, each example masked apart (their packing: true)
    train_on_prompt, mask_history  data.train_on_prompt, data.mask_history
    val_size                       data.val_size (a fraction, or a count of records)
    lora_rank, lora_alpha,         lora.rank, lora.alpha (absent: 2 × rank, as LLaMA-Factory),
      lora_dropout, use_rslora       lora.dropout, lora.rslora
    lora_target                    lora.targets (all → every linear; else the HF module names)
    freeze_vision_tower / _multi_modal_projector: false → their linears in lora.targets too
    media_dir                      data.media_dir
    adapter_name_or_path           lora.init_from (a local PEFT adapter folder, continued: its
                                   rank, alpha and modules unless lora_* keys say otherwise)
    learning_rate                  optim.learning_rate
    optim, weight_decay,           optim.name = "adamw" (what LLaMA-Factory trains with; --set
      adam_beta1/2, adam_epsilon,    optim.name=muon for ours), weight_decay, b1/b2, eps,
      max_grad_norm                  grad_clip_norm
    lr_scheduler_type              schedule: cosine → cosine to 0; linear → wsd decaying over all
                                   steps after warmup (linear, to 0); constant_with_warmup → constant
    warmup_steps / warmup_ratio    schedule.warmup_steps / schedule.warmup_ratio (steps win)
    max_steps                      train.steps; the data repeats as needed (num_train_epochs is
                                   then ignored, as in transformers)
    num_train_epochs               without max_steps: data.num_epochs and train.steps = None, the
                                   steps counted from the data before training (default 3)
    per_device_train_batch_size ×  data.batch_size (rows per optimizer step, all devices)
      gradient_accumulation_steps    train.grad_accum = gradient_accumulation_steps
    logging_steps, save_steps,     log.every, checkpoint.every, checkpoint.keep
      save_total_limit, save_strategy (steps; no: checkpoint.every = 0, saved at the end only)
    output_dir                     train.run_dir
    resume_from_checkpoint         true/false: train.resume; a checkpoint of output_dir
                                   (<output_dir>/checkpoint-N, our <output_dir>/checkpoints/N):
                                   train.resume_step = N
    bf16                           compute.dtype (true: bfloat16, false: float32); fp16 refused
    seed                           train.seed and data.seed
    eval_dataset, eval_strategy,   eval.path (a local file or folder); eval.every = eval_steps
      eval_steps, val_size           (default logging_steps) when the strategy is steps, over
                                   eval_dataset or else the val_size split; no: no evaluation
    report_to, run_name            wandb → log.wandb (TensorBoard is always written);
                                   log.wandb_name

Batch size. LLaMA-Factory's global batch is per_device_train_batch_size ×
gradient_accumulation_steps × the number of GPUs. Ours, data.batch_size, is already that total,
the rows of one optimizer step, split into train.grad_accum microbatches. The devices that split a
batch are the data-parallel ones, mesh.data × mesh.expert (the tensor axis shares each row), so the
mesh overrides (`--set mesh.expert=8`) are read first and the product uses them. A row is a packed
row of cutoff_len tokens (LLaMA-Factory's `packing: true`); without packing their batch counts
examples, so the same numbers put more examples in a step here.

Defaults. A key the file leaves out means LLaMA-Factory's default where that changes what is
trained (lora_rank 8, lora_alpha 2 × rank, learning_rate 5e-5, lr_scheduler_type linear,
per_device_train_batch_size 8, cutoff_len 2048, num_train_epochs 3, AdamW's betas (0.9, 0.999));
bookkeeping keys (logging, checkpoints, dtypes) keep ours, and so does MuonClip's QK-clip
(optim.qk_clip_tau), which never acts on a released model's own logits.

Rejected alternative: emulating the keys whose meaning k2jax does not have (DeepSpeed configs,
bitsandbytes quantisation, other stages and PEFT methods) with the nearest setting: the run would
differ from the file without saying so; a refusal that names the gin setting to use is honest.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path
from typing import Any

from k2jax.config import ConfigError, bind_sections, parse_override
from k2jax.data.chat import TEMPLATE_NAMES
from k2jax.lora import ALL_TARGETS
from k2jax.train.config import SECTIONS, RunConfig

log = logging.getLogger(__name__)

TEMPLATES = {"kimi": "kimi_k2", **{name: name for name in TEMPLATE_NAMES}}
ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused", "adamw_hf")
MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")

# Keys whose values are read by `_map` below (the did-you-mean vocabulary includes these).
MAPPED = (
    "model_name_or_path",
    "adapter_name_or_path",
    "dataset",
    "dataset_dir",
    "mix_strategy",
    "interleave_probs",
    "template",
    "cutoff_len",
    "train_on_prompt",
    "mask_history",
    "val_size",
    "finetuning_type",
    "stage",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target",
    "freeze_vision_tower",
    "freeze_multi_modal_projector",
    "media_dir",
    "use_rslora",
    "learning_rate",
    "optim",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "logging_steps",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "output_dir",
    "resume_from_checkpoint",
    "bf16",
    "fp16",
    "seed",
    "eval_dataset",
    "eval_steps",
    "eval_strategy",
    "evaluation_strategy",
    "per_device_eval_batch_size",
    "report_to",
    "run_name",
)
# Accepted and ignored: they change nothing k2jax does (or k2jax does it its own way).
IGNORED = {
    "do_train": "always trains",
    "do_eval": "evaluation follows eval_strategy / eval_steps",
    "overwrite_cache": "no dataset cache",
    "preprocessing_num_workers": "tokenises on the fly",
    "dataloader_num_workers": "tokenises on the fly",
    "plot_loss": "the loss is in metrics.jsonl and TensorBoard",
    "overwrite_output_dir": "a run folder is never overwritten; train.resume continues it",
    "trust_remote_code": "no remote code is run",
    "ddp_timeout": "no torch.distributed",
    "save_only_model": "checkpoints hold only the LoRA and optimizer state",
    "flash_attn": "k2jax chooses the attention kernel itself (compute.attention_impl)",
    "enable_liger_kernel": "k2jax uses its own fused kernels",
    "gradient_checkpointing": "rematerialisation is compute.remat",
    "packing": "k2jax always packs, with per-example attention masks",
    "neat_packing": "k2jax always packs, with per-example attention masks",
    "streaming": "k2jax always streams its data files",
}
# Refused whatever the value (a falsy value of a switch is accepted: it asks for nothing).
REFUSED = {
    "use_kt": "KTransformers offload is not used: k2jax shards the experts over the mesh "
    "(mesh.expert)",
    "deepspeed": "k2jax shards with the mesh section (mesh.data / mesh.expert / mesh.tensor)",
    "fsdp": "k2jax shards with the mesh section (mesh.data / mesh.expert / mesh.tensor)",
    "fsdp_config": "k2jax shards with the mesh section (mesh.data / mesh.expert / mesh.tensor)",
    "quantization_bit": "no bitsandbytes/HQQ QLoRA; INT4 experts are compute.experts=int4",
    "quantization_method": "no bitsandbytes/HQQ QLoRA; INT4 experts are compute.experts=int4",
    "double_quantization": "no bitsandbytes QLoRA",
    "use_unsloth": "unsloth is a torch library",
    "use_dora": "DoRA is not supported",
    "pissa_init": "PiSSA initialisation is not supported",
    "loraplus_lr_ratio": "LoRA+ is not supported",
    "use_galore": "GaLore is not supported (full-rank training)",
    "use_badam": "BAdam is not supported (full-rank training)",
    "use_apollo": "APOLLO is not supported (full-rank training)",
    "additional_target": "only linears get LoRA; see train.train_router / train.train_norms",
    "create_new_adapter": "an adapter_name_or_path adapter is continued (lora.init_from); to "
    "stack a new one on it, merge it first (k2jax merge) and train on the merged model",
    "max_samples": "not supported: cut the data file, or hold records out with val_size",
    "pure_bf16": "the frozen base is compute.param_dtype; LoRA factors stay float32",
    "lr_scheduler_kwargs": "use the schedule section (--set schedule.final_fraction=...)",
    "max_grad_norm_kwargs": "not supported",
    "image_max_pixels": "images are sized by the checkpoint's preprocessor_config.json, as "
    "transformers' Kimi-K2.5 processor does (data.max_image_pixels only refuses larger files)",
    "video_max_pixels": "no video",
}
KNOWN = (*MAPPED, *IGNORED, *REFUSED)
# The key a field came from, so that a value our dataclasses reject is reported by its YAML name.
SOURCE = {
    "model.path": "model_name_or_path",
    "data.path": "dataset",
    "data.dataset": "dataset",
    "data.mix_strategy": "mix_strategy",
    "data.interleave_probs": "interleave_probs",
    "data.seq_len": "cutoff_len",
    "data.train_on_prompt": "train_on_prompt",
    "data.mask_history": "mask_history",
    "data.val_size": "val_size",
    "data.batch_size": "per_device_train_batch_size",
    "data.num_epochs": "num_train_epochs",
    "lora.rank": "lora_rank",
    "lora.alpha": "lora_alpha",
    "lora.dropout": "lora_dropout",
    "lora.init_from": "adapter_name_or_path",
    "optim.learning_rate": "learning_rate",
    "optim.weight_decay": "weight_decay",
    "optim.b1": "adam_beta1",
    "optim.b2": "adam_beta2",
    "optim.eps": "adam_epsilon",
    "optim.grad_clip_norm": "max_grad_norm",
    "schedule.warmup_steps": "warmup_steps",
    "schedule.warmup_ratio": "warmup_ratio",
    "train.steps": "max_steps",
    "train.grad_accum": "gradient_accumulation_steps",
    "train.run_dir": "output_dir",
    "train.resume_step": "resume_from_checkpoint",
    "log.every": "logging_steps",
    "log.wandb_name": "run_name",
    "checkpoint.every": "save_steps",
    "checkpoint.keep": "save_total_limit",
    "eval.every": "eval_steps",
}


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml  # PyYAML; a dependency (also flax's and orbax's)

    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict) or not all(isinstance(k, str) for k in doc):
        raise ConfigError(f"{path}: expected a mapping of LLaMA-Factory argument names to values")
    return doc


class _Reader:
    """Typed access to the file's keys; every error names the file and the key."""

    def __init__(self, path: Path, doc: dict[str, Any]):
        self.path, self.doc = path, doc

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {message}")

    def get(self, key: str, kind: type, default: Any = None) -> Any:
        if self.doc.get(key) is None:
            return default
        v = self.doc[key]
        # PyYAML reads YAML 1.1: `1e-4` (no dot) is a string; numbers written so are numbers here.
        if kind in (int, float) and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise self.error(key, f"expected a number, got {v!r}") from None
        if kind is int and isinstance(v, float) and v.is_integer():
            v = int(v)
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if kind is bool and isinstance(v, str) and v.lower() in ("true", "false"):
            v = v.lower() == "true"
        if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
            raise self.error(key, f"expected {kind.__name__}, got {v!r}")
        return v

    def names(self, key: str) -> list[str]:
        """A comma list (or a YAML list) of names."""
        v = self.doc.get(key)
        items = v if isinstance(v, list) else str(v).split(",")
        return [str(x).strip() for x in items if str(x).strip()]


def _local(r: _Reader, name: str) -> Path | None:
    folder = r.get("dataset_dir", str)
    candidates = [Path(folder) / name] if folder else [Path(name), Path("data") / name]
    return next((p for p in candidates if p.exists()), None)


def _data(r: _Reader, key: str) -> dict[str, Any]:
    """data.path (and data.dataset) for the datasets `key` names: local files or folders, or
    entries of dataset_dir/dataset_info.json (LLaMA-Factory's registry; default dataset_dir
    "data", as there)."""
    names = r.names(key)
    if not names:
        raise r.error(key, "required: a local data file or folder, or a dataset_info.json name")
    paths = [_local(r, n) for n in names]
    if all(paths):
        return {"path": str(paths[0]) if len(paths) == 1 else tuple(map(str, paths))}
    folder = Path(r.get("dataset_dir", str) or "data")
    info = folder / "dataset_info.json"
    if info.is_file() and not any(paths):
        return {"path": str(folder), "dataset": ",".join(names)}
    missing = [n for n, p in zip(names, paths) if p is None]
    why = (
        "mixes files with dataset_info.json names; use one kind"
        if info.is_file()
        else f"no such file or folder, and no {info} to name it (hub datasets are not downloaded)"
    )
    raise r.error(key, f"{', '.join(map(repr, missing))}: {why}")


def _targets(r: _Reader) -> tuple[str, ...]:
    raw = r.get("lora_target", str, "all")
    names = tuple(t.strip() for t in raw.split(",") if t.strip())
    if names == ("all",):
        return ALL_TARGETS
    unknown = [t for t in names if t not in ALL_TARGETS]
    if unknown or not names:
        raise r.error(
            "lora_target",
            f"{', '.join(unknown) or repr(raw)}: not a Kimi-K2 linear; use all or a comma list of "
            f"{', '.join(ALL_TARGETS)}",
        )
    return names


def _lora(r: _Reader, model: str) -> dict[str, Any]:
    """The lora section: the lora_* keys, LLaMA-Factory's defaults, or — with
    adapter_name_or_path — the adapter's own rank, scale and modules (LLaMA-Factory continues
    the adapter as it is), each lora_* key still winning where given."""
    lora: dict[str, Any] = {}
    adapter = r.get("adapter_name_or_path", str)
    if adapter is not None:
        if "," in adapter:
            raise r.error("adapter_name_or_path", "one adapter only (merge the others first)")
        if not Path(adapter).is_dir():
            raise r.error(
                "adapter_name_or_path",
                f"{adapter!r} is not a local folder (k2jax downloads nothing)",
            )
        from k2jax.config import ModelConfig
        from k2jax.conversion.peft_load import AdapterError, read_peft

        try:
            found = read_peft(adapter, ModelConfig.from_hf_dir(model))
            own = found.lora_config(trained_only=False)  # header only: no factor is read
            found.close()
        except AdapterError as e:
            raise r.error("adapter_name_or_path", str(e)) from None
        lora = {"rank": own.rank, "alpha": own.alpha, "targets": own.targets, "init_from": adapter}
    rank = r.get("lora_rank", int, lora.get("rank", 8))
    if rank != lora.get("rank") or "lora_alpha" in r.doc:  # else the adapter's own alpha
        lora["alpha"] = r.get("lora_alpha", float, 2.0 * rank)
    lora["rank"] = rank
    lora["dropout"] = r.get("lora_dropout", float, 0.0)
    lora["rslora"] = r.get("use_rslora", bool, False)
    if "lora_target" in r.doc or "targets" not in lora:
        lora["targets"] = _targets(r)
    # LLaMA-Factory freezes both by default; unfrozen, their linears get adapters too
    for key, target in (
        ("freeze_vision_tower", "vision_tower.blocks.*"),
        ("freeze_multi_modal_projector", "mm_projector.*"),
    ):
        if not r.get(key, bool, True) and target not in lora["targets"]:
            lora["targets"] = (*lora["targets"], target)
    return lora


def _schedule(r: _Reader) -> dict[str, Any]:
    warmup = r.get("warmup_steps", int, 0)
    ratio = r.get("warmup_ratio", float, 0.0)
    # as in transformers: warmup_steps > 0 wins over the ratio
    out: dict[str, Any] = {"warmup_steps": warmup, "warmup_ratio": 0.0 if warmup else ratio}
    kind = r.get("lr_scheduler_type", str, "linear")
    if kind == "cosine":
        return {"name": "cosine", **out, "final_fraction": 0.0}
    if kind == "linear":  # warmup, then linear decay to 0 over every remaining step
        return {
            "name": "wsd",
            **out,
            "decay_fraction": 1.0,
            "decay_shape": "linear",
            "final_fraction": 0.0,
        }
    if kind == "constant_with_warmup" or (kind == "constant" and not (warmup or ratio)):
        return {"name": "constant", **out}
    if kind == "constant":
        raise r.error(
            "lr_scheduler_type",
            "constant ignores the warmup in LLaMA-Factory; write constant_with_warmup",
        )
    raise r.error(
        "lr_scheduler_type",
        f"{kind!r} is not supported; use cosine, linear, constant or constant_with_warmup "
        "(or the schedule section: --set schedule.name=wsd)",
    )


def _resume(r: _Reader, out: dict) -> None:
    """resume_from_checkpoint: true/false, or a checkpoint of output_dir → train.resume_step."""
    value = r.doc.get("resume_from_checkpoint")
    if value is None:
        return
    if isinstance(value, bool) or str(value).lower() in ("true", "false"):
        out["train"]["resume"] = r.get("resume_from_checkpoint", bool)
        return
    path = Path(str(value))
    m = re.fullmatch(r"(?:checkpoint-)?(\d+)", path.name)
    run_dir = Path(out["train"].get("run_dir", SECTIONS["train"]().run_dir))
    parents = {run_dir.absolute(), (run_dir / "checkpoints").absolute()}
    if m is None or path.parent.absolute() not in parents:
        raise r.error(
            "resume_from_checkpoint",
            f"{value!r}: k2jax resumes its own checkpoints of output_dir ({run_dir}), named "
            f"{run_dir}/checkpoint-N or {run_dir}/checkpoints/N; a checkpoint of a torch run "
            "cannot be resumed (continue its adapter with adapter_name_or_path instead)",
        )
    out["train"].update(resume=True, resume_step=int(m.group(1)))


def _evaluation(r: _Reader, out: dict) -> None:
    strategy = r.get("eval_strategy", str) or r.get("evaluation_strategy", str, "no")
    if strategy not in ("steps", "no"):
        raise r.error("eval_strategy", f"{strategy!r}: only steps (every eval_steps) or no")
    if (val_size := r.get("val_size", float)) is not None:
        out["data"]["val_size"] = val_size
    held_out = r.get("eval_dataset", str) is not None
    if held_out:
        data = _data(r, "eval_dataset")
        if "dataset" in data or not isinstance(data["path"], str):
            raise r.error(
                "eval_dataset",
                "one local file or folder (dataset_info.json names and lists are for dataset)",
            )
        out["eval"] = {"path": data["path"]}
    if strategy == "steps":
        if not (held_out or val_size):
            raise r.error("eval_strategy", "steps needs eval_dataset or val_size (data to score)")
        # eval_steps defaults to logging_steps (transformers), whose own default is 500
        every = r.get("eval_steps", int) or r.get("logging_steps", int, 500)
        out.setdefault("eval", {})["every"] = every
    elif r.get("eval_steps", int) is not None and not (held_out or val_size):
        raise r.error("eval_steps", "needs eval_dataset or val_size (data to score)")


def _map(r: _Reader, data_parallel: int) -> dict[str, dict[str, Any]]:
    """The file's keys as {section: {field: value}}; refusals raise ConfigError."""
    if r.get("stage", str, "sft") != "sft":
        raise r.error("stage", f"{r.doc['stage']!r}: only sft (supervised fine-tuning)")
    if r.get("finetuning_type", str, "lora") != "lora":
        raise r.error("finetuning_type", f"{r.doc['finetuning_type']!r}: k2jax trains LoRA only")
    if r.get("fp16", bool, False):
        raise r.error("fp16", "float16 is not supported; use bf16: true")

    model = r.get("model_name_or_path", str)
    if model is None:
        raise r.error("model_name_or_path", "required: a local checkpoint folder")
    if not Path(model).is_dir():
        raise r.error(
            "model_name_or_path",
            f"{model!r} is not a local folder; k2jax downloads nothing: fetch the checkpoint "
            "first (e.g. huggingface-cli download) and give its folder",
        )
    template = r.get("template", str)
    if template is None or template not in TEMPLATES:
        raise r.error(
            "template", f"{template!r}: a Kimi template is needed: {', '.join(TEMPLATES)}"
        )
    per_device = r.get("per_device_train_batch_size", int, 8)
    accum = r.get("gradient_accumulation_steps", int, 1)
    data = {
        **_data(r, "dataset"),
        "template": TEMPLATES[template],
        "seq_len": r.get("cutoff_len", int, 2048),
        "overlong": "truncate",  # LLaMA-Factory's cutoff_len rule (k2jax.data.examples)
        "batch_size": per_device * accum * data_parallel,
    }
    for key in ("train_on_prompt", "mask_history"):
        if (value := r.get(key, bool)) is not None:
            data[key] = value
    if (media := r.get("media_dir", str)) is not None:
        data["media_dir"] = media
    if (mix := r.get("mix_strategy", str)) is not None:
        if mix not in MIX_STRATEGIES:
            raise r.error("mix_strategy", f"{mix!r}: one of {', '.join(MIX_STRATEGIES)}")
        data["mix_strategy"] = mix
    if r.doc.get("interleave_probs") is not None:
        try:
            data["interleave_probs"] = tuple(float(p) for p in r.names("interleave_probs"))
        except ValueError:
            raise r.error("interleave_probs", "expected numbers, e.g. 0.7,0.3") from None

    train: dict[str, Any] = {"grad_accum": accum}
    steps = r.get("max_steps", int, -1)
    epochs = r.get("num_train_epochs", float, 3.0)
    if steps > 0:  # transformers: max_steps overrides num_train_epochs, the data repeats
        train["steps"] = steps
        if "num_train_epochs" in r.doc:
            log.info("%s: num_train_epochs ignored: max_steps is set (as in transformers)", r.path)
    else:  # the steps of the epochs, counted from the data when the run starts
        if not epochs.is_integer() or epochs < 1:
            raise r.error(
                "num_train_epochs", f"{epochs}: k2jax counts whole epochs (or give max_steps)"
            )
        train["steps"] = None
        data["num_epochs"] = int(epochs)

    optim_name = r.get("optim", str, "adamw_torch")
    if optim_name not in ADAMW_NAMES:
        raise r.error("optim", f"{optim_name!r}: AdamW ({', '.join(ADAMW_NAMES)}) only")
    clip = r.get("max_grad_norm", float, 1.0)
    optim = {
        "name": "adamw",
        "learning_rate": r.get("learning_rate", float, 5e-5),
        "weight_decay": r.get("weight_decay", float, 0.0),
        "b1": r.get("adam_beta1", float, 0.9),
        "b2": r.get("adam_beta2", float, 0.999),
        "eps": r.get("adam_epsilon", float, 1e-8),
        "grad_clip_norm": clip if clip > 0 else None,
    }
    out = {
        "model": {"path": model},
        "data": data,
        "lora": _lora(r, model),
        "optim": optim,
        "train": train,
        "schedule": _schedule(r),
        "checkpoint": {},
        "log": {},
    }
    if (run_dir := r.get("output_dir", str)) is not None:
        train["run_dir"] = run_dir
    _resume(r, out)
    if (seed := r.get("seed", int)) is not None:
        train["seed"] = seed
        data["seed"] = seed
    if (dtype := r.get("bf16", bool)) is not None:
        out["compute"] = {"dtype": "bfloat16" if dtype else "float32"}
    if (every := r.get("logging_steps", int)) is not None:
        out["log"]["every"] = every
    _report(r, out["log"])
    save = r.get("save_strategy", str, "steps")
    if save not in ("steps", "no"):
        raise r.error("save_strategy", f"{save!r}: steps (every save_steps) or no")
    if save == "no":  # the end of the run is still saved: it is what the run produced
        out["checkpoint"]["every"] = 0
    elif (every := r.get("save_steps", int)) is not None:
        out["checkpoint"]["every"] = every
    if (keep := r.get("save_total_limit", int)) is not None:
        out["checkpoint"]["keep"] = keep
    _evaluation(r, out)
    return out


def _report(r: _Reader, log_section: dict) -> None:
    raw = r.doc.get("report_to")
    names = set(r.names("report_to")) if raw is not None else {"none"}
    if "all" in names:
        names = {"wandb", "tensorboard"}
    other = names - {"none", "tensorboard", "wandb"}
    if other:
        raise r.error(
            "report_to",
            f"{', '.join(sorted(other))}: k2jax writes TensorBoard events (log.tensorboard) and, "
            "if asked, Weights & Biases (wandb)",
        )
    if "wandb" in names:
        log_section["wandb"] = True
    if (name := r.get("run_name", str)) is not None:
        log_section["wandb_name"] = name


def _check_keys(r: _Reader) -> None:
    for key, value in r.doc.items():
        if key in REFUSED and value not in (None, False, "", 0, "none", "false"):
            raise r.error(key, f"refused: {REFUSED[key]}")
        if key in IGNORED:
            log.info("%s: %s ignored: %s", r.path, key, IGNORED[key])
        elif key not in KNOWN:
            close = difflib.get_close_matches(key, KNOWN, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise r.error(key, f"unknown LLaMA-Factory key{hint}")
        if key == "per_device_eval_batch_size":
            log.info("%s: %s ignored: evaluation uses data.batch_size rows", r.path, key)


def run_config_from_yaml(
    path: str | os.PathLike, overrides: tuple[str, ...] | list[str] = ()
) -> RunConfig:
    """A LLaMA-Factory training YAML as a RunConfig; `section.key=value` overrides apply after."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    r = _Reader(path, _load_yaml(path))
    _check_keys(r)
    extra = [parse_override(o) for o in overrides]
    # The mesh comes only from the overrides; its data-parallel size scales the batch.
    mesh = bind_sections([b for b in extra if b[0] == "mesh"], {"mesh": SECTIONS["mesh"]})["mesh"]
    mapped = _map(r, data_parallel=mesh.data * mesh.expert)
    bindings = [
        (section, key, value, f"{path}: {SOURCE.get(f'{section}.{key}', '')} (→ {section}.{key})")
        for section, fields in mapped.items()
        for key, value in fields.items()
    ]
    return RunConfig(**bind_sections(bindings + extra, SECTIONS))
