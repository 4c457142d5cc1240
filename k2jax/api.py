"""The notebook-facing entry point: `k2jax.load_model(path)` → a model you can call.

    model = k2jax.load_model("ckpt/Kimi-K2-Thinking", mesh=k2jax.sharding.make_mesh(expert=8))
    logits = model.logits(tokens)          # [B, T] int → [B, T, vocab] float32

`load_model` takes a Hugging Face folder in any of Kimi's formats (bf16, FP8, INT4 experts; K2.5's
nested layout) or a folder written by `k2jax convert` (recognised by its k2jax_checkpoint.json),
and places every parameter straight onto the mesh (k2jax.conversion).

`K2Model` holds the config, the frozen parameters ("params"), optionally LoRA adapters ("lora"),
and the jitted functions that use them. It is a thin convenience layer over the functional model
(k2jax.model.Transformer), which training uses directly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.config import ModelConfig
from k2jax.config.vision import VisionConfig
from k2jax.lora import LoraConfig
from k2jax.model import ComputeConfig, Transformer


@dataclasses.dataclass
class K2Model:
    config: ModelConfig
    compute: ComputeConfig
    params: dict
    lora: dict | None = None
    lora_config: LoraConfig | None = None
    mesh: jax.sharding.Mesh | None = None
    path: Path | None = None  # the folder it was loaded from (tokenizer, chat template)
    qk_clip: dict | None = None  # MuonClip's per-head factors of a fine-tune (k2jax.model.mla)
    vision: VisionConfig | None = None  # K2.5's vision tower, when loaded (params hold it)

    @property
    def module(self) -> Transformer:
        # inference: the exact backward (lora.backward = "ce" changes only training's)
        lora = self.lora_config.exact if self.lora else None
        return Transformer(self.config, self.compute, lora, vision=self.vision)

    def variables(self) -> dict:
        v = {"params": self.params}
        if self.lora:
            v["lora"] = self.lora
        if self.qk_clip:
            v["qk_clip"] = self.qk_clip
        return v

    @property
    def _logits_fn(self):
        lora = self.lora_config.exact if self.lora else None
        return _logits_program(self.config, self.compute, lora, self.vision)

    def logits(
        self, tokens, positions=None, segment_ids=None, *, pixel_values=None, image_grid_thw=None
    ) -> jax.Array:
        """[B, T] token ids → [B, T, vocab] float32 logits (positions/segments for packed rows).

        Images (a K2.5 checkpoint with its vision tower): `pixel_values` [N, 3, P, P] (or
        [N, 3·P·P]) and `image_grid_thw` [I, 3], as transformers' Kimi_K25 image processor
        returns them; the prompt holds one image token per merged patch group of each image.
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        if int(jnp.max(tokens)) >= self.config.vocab_size or int(jnp.min(tokens)) < 0:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        images = self._images(tokens, pixel_values, image_grid_thw)
        if self.mesh is None:
            return self._logits_fn(self.variables(), tokens, positions, segment_ids, images)
        from k2jax.sharding import spec_for, use_mesh

        # Rows split over data × expert when they divide evenly, else every device sees them all.
        rows = self.mesh.shape["data"] * self.mesh.shape["expert"]
        spec = spec_for(("batch", "seq")) if tokens.shape[0] % rows == 0 else None
        batch = jax.sharding.NamedSharding(self.mesh, spec or jax.sharding.PartitionSpec())
        tokens, positions, segment_ids = (
            None if x is None else jax.device_put(jnp.asarray(x), batch)
            for x in (tokens, positions, segment_ids)
        )
        with use_mesh(self.mesh):
            return self._logits_fn(self.variables(), tokens, positions, segment_ids, images)

    def _images(self, tokens, pixel_values, image_grid_thw) -> dict | None:
        """The `images` argument of Transformer (k2jax.model.vision), checked against the prompt."""
        if pixel_values is None and image_grid_thw is None:
            return None
        if self.vision is None:
            raise ValueError(
                "images were given, but this model has no vision tower (a Kimi-K2.5 / K2.6 "
                "checkpoint folder with vision_tower.* tensors loads one)"
            )
        if pixel_values is None or image_grid_thw is None:
            raise ValueError("pass pixel_values and image_grid_thw together")
        from k2jax.model.vision import split_rows

        return split_rows(np.asarray(tokens), pixel_values, image_grid_thw, self.vision)

    def generate(
        self,
        prompt,
        max_new_tokens: int = 256,
        *,
        temperature: float = 0.6,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int = 0,
        stop: Sequence[int] | None = None,
        tokenizer=None,
        template: str | None = None,
        thinking: bool = True,
        chat: bool = True,
    ):
        """Samples a continuation with the KV cache; returns a `k2jax.generate.Generation`
        (`.text`, `.tokens`, `.prompt_tokens`, `.finish_reason`).

        prompt: a string (one user message, rendered with the chat template; raw text with
            chat=False), a list of OpenAI-style messages, or a list of token ids. With the
            vision tower, messages may show images: {"type": "image", "image": "cat.png"}
            (or an OpenAI image_url part with a file:// or data: URL), preprocessed with the
            checkpoint's preprocessor_config.json.
        temperature 0 is greedy; top_p / min_p filter the tempered distribution (k2jax.generate).
        Generation stops at <|im_end|> or [EOS] (or the ids in `stop`) or after max_new_tokens.
        tokenizer: a KimiTokenizer or a folder holding one; default: the checkpoint folder.
        template: "kimi_k2", "kimi_k2_thinking" or "kimi_k25"; default: the checkpoint's.
        """
        from k2jax.data.tokenizer import KimiTokenizer
        from k2jax.generate import Sampling, generate, template_for

        folder = self.path
        if tokenizer is None and folder is not None and (Path(folder) / "tiktoken.model").exists():
            tokenizer = folder
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = KimiTokenizer.from_dir(tokenizer)
        if template is None:
            template = template_for(folder) if folder is not None else "kimi_k2"
        images = None
        if self.vision is not None:
            from k2jax.data.images import ImageProcessor

            images = ImageProcessor.from_dir(folder) if folder is not None else ImageProcessor()
        return generate(
            self.module,
            self.variables(),
            prompt,
            max_new_tokens=max_new_tokens,
            sampling=Sampling(temperature=temperature, top_p=top_p, min_p=min_p),
            seed=seed,
            stop_ids=stop,
            tokenizer=tokenizer,
            template=template,
            thinking=thinking,
            chat=chat,
            mesh=self.mesh,
            images=images,
        )


@functools.lru_cache(maxsize=32)
def _logits_program(
    config: ModelConfig,
    compute: ComputeConfig,
    lora: LoraConfig | None,
    vision: VisionConfig | None = None,
):
    """One jitted logits function per architecture, shared by every K2Model that has it (a
    second model of the same shape does not compile again)."""
    module = Transformer(config, compute, lora, vision=vision)
    return jax.jit(
        lambda v, t, p, s, images=None: module.apply(v, t, p, s, images, method=Transformer.logits)
    )


def load_finetune(
    run_dir,
    *,
    step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    dtype: str = "bfloat16",
) -> K2Model:
    """A training run's model: its base checkpoint (config.model.path) with the run's trained
    LoRA, QK-clip factors and trained base leaves, from its newest checkpoint (or `step`).
    `run_dir` is a run folder or a `k2jax.train.Run` already read by `load_run`.

        tuned = k2jax.load_finetune("runs/my-run")
        tuned.generate("Hello", max_new_tokens=32)
    """
    run = _as_run(run_dir, step)
    if run.base_path is None:
        raise ValueError(
            f"{run_dir}: the run trained on the random preset {run.preset!r}, not a checkpoint "
            "folder; there is no base model to load"
        )
    overrides = {}
    if run.model_config.latent_norm_eps is not None:
        overrides["latent_norm_eps"] = run.model_config.latent_norm_eps
    base = load_model(run.base_path, mesh=mesh, dtype=dtype, config_overrides=overrides)
    lora, qk_clip = run.lora, run.qk_clip
    if mesh is not None:  # the adapters go where the rules table puts them, like the base
        from k2jax.model.transformer import init_variables
        from k2jax.sharding import param_shardings

        module = Transformer(base.config, base.compute, run.lora_config.exact, vision=base.vision)
        boxed = jax.eval_shape(
            lambda: init_variables(module, jax.random.key(0), lora_rng=jax.random.key(1))
        )
        lora = jax.device_put(lora, param_shardings(boxed["lora"], mesh))
        qk_clip = jax.device_put(qk_clip, param_shardings(boxed["qk_clip"], mesh))
    return dataclasses.replace(
        base,
        params=_overlay(base.params, run.trained_params),
        lora=lora,
        lora_config=run.lora_config,
        qk_clip=qk_clip,
    )


def load_adapter(model: K2Model, adapter: str | os.PathLike) -> K2Model:
    """`model` with a PEFT adapter folder's LoRA (adapter_config.json +
    adapter_model.safetensors, e.g. one `k2jax export` or PEFT wrote) on top: its rank, scale and
    the modules it trains; every name and shape checked against the model's config, nothing
    unpickled (k2jax.conversion.peft_load). Placed like the base (on its mesh, if it has one).

        tuned = k2jax.load_adapter(k2jax.load_model("ckpt/Kimi-K2-Instruct"), "adapters/mine")
    """
    import flax.linen as nn

    from k2jax.conversion.peft_load import read_peft
    from k2jax.model.transformer import init_variables

    found = read_peft(adapter, model.config)
    try:
        lora_config = found.lora_config()
        module = Transformer(model.config, model.compute, lora_config)
        boxed = jax.eval_shape(
            lambda: init_variables(module, jax.random.key(0), lora_rng=jax.random.key(1))
        )["lora"]
        shapes = nn.unbox(boxed)

        def leaf(path, x):
            keys = tuple(k.key for k in path)
            if keys[:-1] not in found.names:  # a stack the adapter leaves alone: no update
                return np.zeros(x.shape, np.float32)
            return found.block(keys[:-1], keys[-1], x.shape)

        lora = jax.tree_util.tree_map_with_path(leaf, shapes)
    finally:
        found.close()
    if model.mesh is not None:
        from k2jax.sharding import param_shardings

        lora = jax.device_put(lora, param_shardings(boxed, model.mesh))
    else:
        lora = jax.device_put(lora)
    return dataclasses.replace(model, lora=lora, lora_config=lora_config)


def _overlay(params, trained):
    """`params` with the fully trained leaves of `trained` put in (cast to the base's dtype)."""
    if not trained:
        return params
    out = dict(params)
    for k, v in trained.items():
        if isinstance(v, dict):
            out[k] = _overlay(out[k], v)
        else:
            out[k] = jax.device_put(v.astype(out[k].dtype), out[k].sharding)
    return out


def load_model(
    path: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype: str = "bfloat16",
    experts: str | None = None,
    compute: ComputeConfig | None = None,
    config_overrides: dict | None = None,
    progress: bool | None = None,
    check_finite: bool = True,
    vision: bool | None = None,
) -> K2Model:
    """Loads a checkpoint folder: Hugging Face (config.json + safetensors, bf16 / FP8 / INT4,
    K2 or K2.5 layout) or converted by `k2jax convert` (Orbax).

    mesh: place every parameter on this mesh by the sharding rules (default: the first device).
    dtype: compute and parameter dtype ("bfloat16" or "float32").
    experts: "bf16" or "int4", how routed experts are held (default: as stored — INT4 for
        K2-Thinking / K2.5, bf16 for FP8 and bf16 checkpoints; a converted folder keeps the
        format it was converted to).
    compute: a full ComputeConfig instead of dtype/experts.
    config_overrides: ModelConfig fields to change after reading config.json, e.g.
        {"latent_norm_eps": 1e-6} to reproduce the reference code's latent-norm eps.
    progress: a progress bar (default: only on a terminal).
    check_finite: refuse weights holding NaN or Inf (a CheckpointError naming the files and
        tensors); False loads them as they are.
    vision: Kimi-K2.5's vision tower and projector — None loads them when the folder has a
        complete tower (else the text model, with a log line saying why), True requires them,
        False skips them.
    """
    from k2jax.conversion.checkpoint import read_checkpoint

    cfg, compute, params = read_checkpoint(
        path,
        mesh=mesh,
        dtype=dtype,
        experts=experts,
        compute=compute,
        config_overrides=config_overrides,
        progress=progress,
        check_finite=check_finite,
        vision=vision,
    )
    vcfg = None
    if "vision_tower" in params:
        from k2jax.config import read_hf_config

        vcfg = VisionConfig.from_hf_dict(read_hf_config(path), source=str(Path(path)))
    return K2Model(cfg, compute, params, mesh=mesh, path=Path(path), vision=vcfg)


def _as_run(run, step: int | None):
    from k2jax.train.run import Run, load_run

    return run if isinstance(run, Run) else load_run(run, step)


def export_adapter(
    run,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    layout: str = "per-expert",
    dtype: str = "float32",
    strict: bool = True,
    overwrite: bool = False,
) -> Path:
    """A training run's adapters as a PEFT adapter folder (`k2jax export`; k2jax.conversion.peft).

    run: a run folder or a `k2jax.train.Run` (then `step` is ignored); step: its checkpoint
    (default: the newest). layout "per-expert" names every routed expert as vLLM and PEFT
    expect, "fused" as transformers 5's fused expert parameters. strict refuses a run whose
    QK-clip factors are not all 1 or that trained base parameters in full (an adapter cannot
    carry them; `merge_run` can).
    """
    from k2jax.conversion.peft import export_peft

    r = _as_run(run, step)
    vision = None
    if r.base_path is not None and any(
        k in (r.lora or {}) for k in ("vision_tower", "mm_projector")
    ):
        from k2jax.conversion.vision_loader import checkpoint_vision

        vision = checkpoint_vision(r.base_path)[0]
    return export_peft(
        r.model_config,
        r.lora_config,
        r.lora,
        r.qk_clip,
        out,
        layout=layout,
        dtype=dtype,
        trained_params=r.trained_params,
        base_model_name_or_path=None if r.base_path is None else str(r.base_path),
        strict=strict,
        overwrite=overwrite,
        vision=vision,
    )


def merge_run(
    run,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """A training run's LoRA, QK-clip factors and fully trained parameters folded into its base
    checkpoint (`base`, default: the one the run trained), written in that checkpoint's format
    (`k2jax merge`; k2jax.conversion.merge)."""
    from k2jax.conversion.merge import merge_lora

    r = _as_run(run, step)
    base = base or r.base_path
    if base is None:
        raise ValueError(
            f"{r.run_dir}: the run trained on the random preset {r.preset!r}; there is no base "
            "checkpoint to merge into (pass base=PATH if you have one)"
        )
    return merge_lora(
        base,
        r.model_config,
        r.lora_config,
        r.lora,
        r.qk_clip,
        out,
        trained_params=r.trained_params,
        overwrite=overwrite,
    )
