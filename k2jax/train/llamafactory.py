"""LLaMA-Factory training YAML → RunConfig: `k2jax train --config my_lora_sft.yaml`.

A LLaMA-Factory LoRA SFT file is a flat mapping of its own argument names. Each key that has the
same meaning here is bound to an existing RunConfig field; every other key is either harmless and
accepted, or refused by name with the reason, so a run never silently differs from what the file
says. Then the `--set section.key=value` overrides apply, as for a gin file, and
`k2jax train --config x.yaml --print-config` shows the gin equivalent (`RunConfig.to_gin()`), which
can be saved and used instead of the YAML from then on.

    model_name_or_path             model.path (a local checkpoint folder; no downloads)
    dataset_dir / dataset          data.path = dataset_dir/dataset, one local .jsonl file or folder
    template                       data.template (kimi, kimi_k2 → kimi_k2; our own names as-is)
    cutoff_len                     data.seq_len (rows are packed, examples masked apart; an
                                   example longer than a row is skipped, not truncated)
    lora_rank, lora_alpha,         lora.rank, lora.alpha (absent: 2 × rank, as LLaMA-Factory),
      lora_dropout, use_rslora       lora.dropout, lora.rslora
    lora_target                    lora.targets (all → every linear; else the HF module names)
    learning_rate                  optim.learning_rate
    optim, weight_decay,           optim.name = "adamw" (what LLaMA-Factory trains with; --set
      adam_beta1/2, adam_epsilon,    optim.name=muon for ours), weight_decay, b1/b2, eps,
      max_grad_norm                  grad_clip_norm
    lr_scheduler_type              schedule: cosine → cosine to 0; linear → wsd decaying over all
                                   steps after warmup (linear, to 0); constant_with_warmup → constant
    warmup_steps / warmup_ratio    schedule.warmup_steps (ratio: round(ratio × max_steps))
    max_steps                      train.steps (required: we do not count the dataset's rows)
    num_train_epochs               data.num_epochs (integral only); training stops at whichever
                                   of max_steps and the last epoch comes first
    per_device_train_batch_size ×  data.batch_size (rows per optimizer step, all devices)
      gradient_accumulation_steps    train.grad_accum = gradient_accumulation_steps
    logging_steps, save_steps,     log.every, checkpoint.every, checkpoint.keep
      save_total_limit
    output_dir                     train.run_dir
    resume_from_checkpoint         train.resume (true/false; a checkpoint path is refused)
    bf16                           compute.dtype (true: bfloat16, false: float32); fp16 refused
    seed                           train.seed and data.seed
    eval_dataset, eval_strategy,   eval.path (as dataset); eval.every = eval_steps when the
      eval_steps                     strategy is steps (else 0: no evaluation, as there)
    val_size                       data.val_size (a fraction, or a count ≥ 1, held out; evaluated
                                   at eval_steps when there is no eval_dataset)
    train_on_prompt, mask_history  data.train_on_prompt, data.mask_history (same meaning)

Batch size. LLaMA-Factory's global batch is per_device_train_batch_size ×
gradient_accumulation_steps × the number of GPUs. Ours, data.batch_size, is already that total,
the rows of one optimizer step, split into train.grad_accum microbatches. The devices that split a
batch are the data-parallel ones, mesh.data × mesh.expert (the tensor axis shares each row), so the
mesh overrides (`--set mesh.expert=8`) are read first and the product uses them.

Defaults. A key the file leaves out means LLaMA-Factory's default where that changes what is
trained (lora_rank 8, lora_alpha 2 × rank, learning_rate 5e-5, lr_scheduler_type linear,
per_device_train_batch_size 8, cutoff_len 2048, AdamW's betas (0.9, 0.999)); bookkeeping keys
(logging, checkpoints, dtypes) keep ours, and so does MuonClip's QK-clip (optim.qk_clip_tau),
which never acts on a released model's own logits.

Rejected alternative: a k2jax-side emulation of every LLaMA-Factory key (dataset_info.json
names through the YAML, epoch-derived step counts). Each would be a second data path or a pass over the
data before training; a refusal that names the gin setting to use instead is smaller and honest.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any

from k2jax.config import ConfigError, bind_sections, parse_override
from k2jax.data.chat import TEMPLATE_NAMES
from k2jax.lora import ALL_TARGETS
from k2jax.train.config import SECTIONS, RunConfig

log = logging.getLogger(__name__)

TEMPLATES = {"kimi": "kimi_k2", **{name: name for name in TEMPLATE_NAMES}}
ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused", "adamw_hf")

# Keys whose values are read by `_map` below (the did-you-mean vocabulary includes these).
MAPPED = (
    "model_name_or_path",
    "dataset",
    "dataset_dir",
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
    "save_total_limit",
    "output_dir",
    "resume_from_checkpoint",
    "bf16",
    "fp16",
    "seed",
    "eval_dataset",
    "eval_steps",
    "eval_strategy",
    "per_device_eval_batch_size",
    "report_to",
)
# Accepted and ignored: they change nothing k2jax does (or k2jax does it its own way).
IGNORED = {
    "do_train": "always trains",
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
    "adapter_name_or_path": "starting from an existing adapter is not supported yet",
    "create_new_adapter": "starting from an existing adapter is not supported yet",
    "max_samples": "not supported yet: cut the .jsonl file instead",
    "mix_strategy": "one dataset only",
    "interleave_probs": "one dataset only",
    "streaming": "k2jax always streams the .jsonl lines",
    "pure_bf16": "the frozen base is compute.param_dtype; LoRA factors stay float32",
    "lr_scheduler_kwargs": "use the schedule section (--set schedule.final_fraction=...)",
    "max_grad_norm_kwargs": "not supported",
    "freeze_vision_tower": "text-only",
    "image_max_pixels": "text-only",
    "video_max_pixels": "text-only",
}
KNOWN = (*MAPPED, *IGNORED, *REFUSED)
# The key a field came from, so that a value our dataclasses reject is reported by its YAML name.
SOURCE = {
    "model.path": "model_name_or_path",
    "data.path": "dataset",
    "data.seq_len": "cutoff_len",
    "data.batch_size": "per_device_train_batch_size",
    "data.num_epochs": "num_train_epochs",
    "lora.rank": "lora_rank",
    "lora.alpha": "lora_alpha",
    "lora.dropout": "lora_dropout",
    "optim.learning_rate": "learning_rate",
    "optim.weight_decay": "weight_decay",
    "optim.b1": "adam_beta1",
    "optim.b2": "adam_beta2",
    "optim.eps": "adam_epsilon",
    "optim.grad_clip_norm": "max_grad_norm",
    "schedule.warmup_steps": "warmup_steps",
    "train.steps": "max_steps",
    "train.grad_accum": "gradient_accumulation_steps",
    "train.run_dir": "output_dir",
    "log.every": "logging_steps",
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


def _data_path(r: _Reader, key: str) -> str:
    name = r.get(key, str)
    if "," in name:
        raise r.error(key, f"{name!r}: several datasets are not supported yet; name one file")
    folder = r.get("dataset_dir", str)
    candidates = [Path(folder) / name] if folder else [Path(name), Path("data") / name]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        info = Path(folder or "data") / "dataset_info.json"
        why = (
            f"an entry of {info} (dataset_info.json names) is not supported yet"
            if info.is_file()
            else "no such file or folder (hub datasets are not downloaded)"
        )
        tried = ", ".join(str(p) for p in candidates)
        raise r.error(key, f"{name!r}: {why}; point it at a local .jsonl file or folder ({tried})")
    if path.is_file() and path.suffix != ".jsonl":
        raise r.error(
            key, f"{path}: k2jax reads .jsonl (one OpenAI- or ShareGPT-form conversation a line)"
        )
    return str(path)


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


def _schedule(r: _Reader, steps: int) -> dict[str, Any]:
    warmup = r.get("warmup_steps", int, 0)
    ratio = r.get("warmup_ratio", float, 0.0)
    if warmup == 0 and ratio:  # as in transformers: warmup_steps > 0 wins over the ratio
        if not 0.0 <= ratio < 1.0:
            raise r.error("warmup_ratio", f"must be in [0, 1), got {ratio}")
        warmup = round(ratio * steps)
    kind = r.get("lr_scheduler_type", str, "linear")
    if kind == "cosine":
        return {"name": "cosine", "warmup_steps": warmup, "final_fraction": 0.0}
    if kind == "linear":  # warmup, then linear decay to 0 over every remaining step
        return {
            "name": "wsd",
            "warmup_steps": warmup,
            "decay_fraction": 1.0,
            "decay_shape": "linear",
            "final_fraction": 0.0,
        }
    if kind == "constant_with_warmup" or (kind == "constant" and warmup == 0):
        return {"name": "constant", "warmup_steps": warmup}
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


def _map(r: _Reader, data_parallel: int) -> dict[str, dict[str, Any]]:
    """The file's keys as {section: {field: value}}; refusals raise ConfigError."""
    if r.get("stage", str, "sft") != "sft":
        raise r.error("stage", f"{r.doc['stage']!r}: only sft (supervised fine-tuning)")
    if r.get("finetuning_type", str, "lora") != "lora":
        raise r.error("finetuning_type", f"{r.doc['finetuning_type']!r}: k2jax trains LoRA only")
    if r.get("fp16", bool, False):
        raise r.error("fp16", "float16 is not supported; use bf16: true")
    if r.get("report_to", str, "none") not in ("none", "tensorboard"):
        raise r.error("report_to", "k2jax writes TensorBoard events (log.tensorboard) only")
    if r.get("eval_strategy", str, "no") not in ("steps", "no"):
        raise r.error("eval_strategy", "only steps (eval_steps) or no")

    model = r.get("model_name_or_path", str)
    if model is None:
        raise r.error("model_name_or_path", "required: a local checkpoint folder")
    if not Path(model).is_dir():
        raise r.error(
            "model_name_or_path",
            f"{model!r} is not a local folder; k2jax downloads nothing: fetch the checkpoint "
            "first (e.g. huggingface-cli download) and give its folder",
        )
    if r.get("dataset", str) is None:
        raise r.error("dataset", "required: a local .jsonl file or folder")
    template = r.get("template", str)
    if template is None or template not in TEMPLATES:
        raise r.error(
            "template", f"{template!r}: a Kimi template is needed: {', '.join(TEMPLATES)}"
        )
    steps = r.get("max_steps", int, -1)
    if steps <= 0:
        raise r.error(
            "max_steps",
            "required: k2jax counts optimizer steps and does not read the dataset ahead to turn "
            "num_train_epochs into steps; give max_steps",
        )

    per_device = r.get("per_device_train_batch_size", int, 8)
    accum = r.get("gradient_accumulation_steps", int, 1)
    data = {
        "path": _data_path(r, "dataset"),
        "template": TEMPLATES[template],
        "seq_len": r.get("cutoff_len", int, 2048),
        "batch_size": per_device * accum * data_parallel,
    }
    for key in ("train_on_prompt", "mask_history"):  # same names and meaning in data.*
        if (flag := r.get(key, bool)) is not None:
            data[key] = flag
    val_size = r.get("val_size", float, 0.0)
    if val_size:
        data["val_size"] = int(val_size) if val_size >= 1 else val_size
    epochs = r.get("num_train_epochs", float)
    if epochs is not None:
        if not epochs.is_integer():
            raise r.error("num_train_epochs", f"{epochs}: k2jax counts whole epochs only")
        data["num_epochs"] = int(epochs)

    rank = r.get("lora_rank", int, 8)
    lora = {
        "rank": rank,
        "alpha": r.get("lora_alpha", float, 2.0 * rank),
        "dropout": r.get("lora_dropout", float, 0.0),
        "rslora": r.get("use_rslora", bool, False),
        "targets": _targets(r),
    }
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

    train: dict[str, Any] = {"steps": steps, "grad_accum": accum}
    out = {"model": {"path": model}, "data": data, "lora": lora, "optim": optim, "train": train}
    out["schedule"] = _schedule(r, steps)
    if (run_dir := r.get("output_dir", str)) is not None:
        train["run_dir"] = run_dir
    resume = r.doc.get("resume_from_checkpoint")
    if isinstance(resume, str) and resume.lower() not in ("true", "false"):
        raise r.error(
            "resume_from_checkpoint",
            "a checkpoint path is not supported: k2jax resumes from the newest checkpoint in "
            "output_dir (true) or refuses a folder that has some (false)",
        )
    if (resume := r.get("resume_from_checkpoint", bool)) is not None:
        train["resume"] = resume
    if (seed := r.get("seed", int)) is not None:
        train["seed"] = seed
        data["seed"] = seed
    if (dtype := r.get("bf16", bool)) is not None:
        out["compute"] = {"dtype": "bfloat16" if dtype else "float32"}
    if (every := r.get("logging_steps", int)) is not None:
        out["log"] = {"every": every}
    checkpoint = {}
    if (every := r.get("save_steps", int)) is not None:
        checkpoint["every"] = every
    if (keep := r.get("save_total_limit", int)) is not None:
        checkpoint["keep"] = keep
    out["checkpoint"] = checkpoint
    every = r.get("eval_steps", int) or r.get("logging_steps", int, 500)  # as LLaMA-Factory
    steps_strategy = r.get("eval_strategy", str, "no") == "steps"
    if r.get("eval_dataset", str) is not None:
        out["eval"] = {"path": _data_path(r, "eval_dataset")}
        if steps_strategy:
            out["eval"]["every"] = every
    elif val_size:  # the held-out split of the training data (data.val_size)
        if steps_strategy:
            out["eval"] = {"every": every}
    elif r.get("eval_steps", int) is not None:
        raise r.error("eval_steps", "needs eval_dataset or val_size (data to evaluate on)")
    return out


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
