"""The memory planner: will a LoRA run of a model fit a given mesh of GPUs? No GPU needed.

`plan(...)` builds the *real* training program of k2jax.train (the same jitted step, shardings and
optimizer a run uses) on abstract parameters — no weights are read or allocated — and compiles it
ahead of time for the requested mesh with CPU devices standing in for the GPUs. Per device it
reports:

    int4 weights        routed experts' int4 codes (half a byte each) + their bf16 group scales
    bf16 weights        every other frozen base weight (attention, dense/shared MLP, router, ...)
    lora                the trainable adapters (float32 masters) and any trainable base weights
    optimizer           optimizer state (Muon momentum, AdamW moments) for the trainable leaves
    other state         step counters, QK-clip factors, RNG, the batch
    temporaries         XLA's peak working memory of the step (activations, gradients, all-to-all
                        buffers), from the compiled executable's memory analysis
    total               arguments + temporaries + outputs that do not alias an argument (the state
                        is donated, so the new state reuses the old buffers)

and a verdict: total ≤ device memory − reserve (CUDA context, allocator fragmentation).

It also counts the expert-parallel exchange from the compiled program's all-to-all instructions
(`exchange_stats`): the activation bytes one device sends per exchange (one MoE layer's forward
dispatch of all its tokens; elements of the float all-to-alls × the activation dtype's size,
since XLA:CPU may widen bf16 collectives), beside the useful bytes — its n·K (token, expert)
rows of D — and what one overflow round adds when routing is uneven.

Two substitutions make the CPU compile report the GPU program's memory. The grouped matmul and the
attention are compiled as shape-faithful stand-ins (`impl="plan"`, k2jax/ops): on GPU they are
kernels whose only buffers are their outputs, while their CPU lowerings (Pallas in interpret mode,
or XLA's dense expansions) would allocate what the GPU never does. And int4 is counted at half a
byte, as XLA packs it on GPU. Everything else — the decoder scan and its rematerialisation, the
expert-parallel all-to-all buffers, the chunked loss, the optimizer — is the real program.

Rejected alternative: a hand-written formula of activation sizes. It goes stale with every change
of the model code; compiling the real step cannot.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

GIB = 2**30


@dataclasses.dataclass
class PlanResult:
    mesh: dict[str, int]
    seq: int
    batch: int
    moe_chunk_tokens: int
    remat: str
    device_memory_bytes: int
    reserve_bytes: int
    int4_weights: int
    bf16_weights: int
    lora: int
    optimizer: int
    other_state: int
    temporaries: int
    per_device_bytes: int
    fits: bool
    compiled_argument_bytes: int
    compiled_output_bytes: int
    compiled_alias_bytes: int
    all_to_all_bytes_per_exchange: int = 0
    useful_bytes_per_exchange: int = 0
    overflow_round_bytes: int = 0
    # how each row's tokens are laid out (k2jax/model/context_parallel.py) and over how many
    # devices one row's sequence is split
    context_parallel: str = "none"
    context_degree: int = 1
    # K2.5's vision tower and projector (part of bf16_weights) and the image patches per row
    vision_weights: int = 0
    image_patches: int = 0
    # lora.backward = "ce"'s frozen factors (part of bf16_weights; k2jax/ops/ce_backward.py)
    ce_factors: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def as_json(self) -> dict:
        """`k2jax plan --json`'s object: every field, plus the total in GiB."""
        return {**self.as_dict(), "per_device_gib": self.per_device_bytes / GIB}

    def table(self) -> str:
        rows = [
            ("int4 weights (experts)", self.int4_weights),
            ("bf16 weights (rest of base)", self.bf16_weights),
            *(
                [
                    (
                        f"  of which vision tower ({self.image_patches:,} patches/row)",
                        self.vision_weights,
                    )
                ]
                if self.image_patches
                else []
            ),
            *([("  of which CE-LoRA factors", self.ce_factors)] if self.ce_factors else []),
            ("LoRA (+ trainable base), fp32", self.lora),
            ("optimizer state", self.optimizer),
            ("other state + batch", self.other_state),
            ("temporaries (compiled peak)", self.temporaries),
            ("total per device", self.per_device_bytes),
            ("device memory", self.device_memory_bytes),
        ]
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"mesh {mesh}  seq {self.seq}  batch {self.batch}  "
            f"moe_chunk_tokens {self.moe_chunk_tokens or 'all'}  remat {self.remat}"
        ]
        if self.context_degree > 1:
            lines.append(
                f"  context parallel {self.context_parallel!r}: each row's sequence split over "
                f"{self.context_degree} devices ({self.seq // self.context_degree:,} tokens each)"
            )
        lines += [f"  {name:<32}{b / GIB:10.2f} GiB" for name, b in rows]
        if self.useful_bytes_per_exchange:
            ratio = self.all_to_all_bytes_per_exchange / self.useful_bytes_per_exchange
            lines.append(
                f"  expert all-to-all per exchange  {self.all_to_all_bytes_per_exchange / GIB:10.3f}"
                f" GiB  ({ratio:.2f}× the {self.useful_bytes_per_exchange / GIB:.3f} GiB of routed"
                f" rows; an overflow round adds {self.overflow_round_bytes / GIB:.3f} GiB)"
            )
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  verdict: {verdict} (reserve {self.reserve_bytes / GIB:.1f} GiB)")
        if not self.fits and self.context_degree == 1 and self.mesh.get("expert", 1) > 1:
            lines.append(
                f"  advice: fewer rows per step (--batch {self.mesh.get('data', 1)}) split each "
                f"row's sequence over the {self.mesh['expert']} expert devices "
                "(compute.context_parallel, README 'Long context')"
            )
        return "\n".join(lines)


def _shard_bytes(x) -> int:
    """Bytes one device holds of the abstract array x (int4 at half a byte)."""
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    n = math.prod(shape)
    if x.dtype == jnp.int4:
        return (n + 1) // 2
    return n * np.dtype(x.dtype).itemsize


def _tree_bytes(tree, shardings) -> int:
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings)
    return sum(
        _shard_bytes(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))
        for x, s in zip(leaves, shards)
    )


def plan(
    model_cfg,
    *,
    mesh_sizes: dict[str, int],
    seq: int,
    batch: int | None = None,
    device_memory_gb: float = 80.0,
    reserve_fraction: float = 0.05,
    lora=None,
    optim=None,
    compute=None,
    grad_accum: int = 1,
    vision=None,
    image_patches: int | None = None,
) -> PlanResult:
    """Compiles the LoRA train step of `model_cfg` for the mesh and reports per-device bytes.

    batch defaults to one sequence per data-parallel shard (data × expert rows). vision: K2.5's
    VisionConfig, to plan a run with images — `image_patches` per row (data.image_patches;
    None: seq · merge², the data's default).
    """
    from k2jax.lora import LoraConfig
    from k2jax.model import ComputeConfig
    from k2jax.model.context_parallel import resolve as resolve_context
    from k2jax.optim import OptimConfig, ScheduleConfig
    from k2jax.sharding.mesh import check_mesh_fits, make_mesh
    from k2jax.sharding.rules import use_mesh
    from k2jax.train.step import Program, StepSpec

    n_dev = math.prod(mesh_sizes.values())
    if jax.device_count() < n_dev:
        raise ValueError(
            f"the plan needs {n_dev} (CPU) devices but jax has {jax.device_count()}; "
            "run it through `k2jax plan`, which sets the device count before jax starts"
        )
    mesh = make_mesh(**mesh_sizes, devices=jax.devices()[:n_dev])
    check_mesh_fits(mesh, model_cfg)
    batch = batch or mesh_sizes["data"] * mesh_sizes["expert"]
    if batch % grad_accum:
        raise ValueError(f"batch {batch} must be divisible by grad_accum {grad_accum}")
    compute = compute or ComputeConfig(dtype="bfloat16", param_dtype="bfloat16", experts="int4")
    mode = resolve_context(compute.context_parallel, batch // grad_accum, mesh_sizes)
    compute = dataclasses.replace(
        compute, gmm_impl="plan", attention_impl="plan", context_parallel=mode
    )
    spec = StepSpec(
        model=model_cfg,
        compute=compute,
        lora=lora or LoraConfig(rank=16),
        optim=optim or OptimConfig(),
        schedule=ScheduleConfig(),
        total_steps=1000,
        grad_accum=grad_accum,
        vision=vision,
    )
    program = Program(spec, mesh)
    with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    state = jax.tree.map(with_sharding, program.state_abstract, program.state_shardings)
    frozen = jax.tree.map(with_sharding, program.frozen_abstract, program.frozen_shardings)
    micro = batch // grad_accum
    batch_abs = {
        k: jax.ShapeDtypeStruct(
            (grad_accum, micro, seq),
            jnp.float32 if k == "loss_mask" else jnp.int32,
            sharding=program.batch_sharding,
        )
        for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    }
    patches = 0
    if vision is not None:
        patches = image_patches or seq * vision.merge_size
        shapes = {
            "pixel_values": ((patches, vision.patch_features), jnp.float32),
            "pos_index": ((patches, 16), jnp.int32),
            "pos_weight": ((patches, 16), jnp.float32),
            "pos_hw": ((patches, 2), jnp.int32),
            "segment": ((patches,), jnp.int32),
            "merge_index": ((patches // vision.merge_size, vision.merge_size), jnp.int32),
        }
        for k, (shape, dt) in shapes.items():
            batch_abs[k] = jax.ShapeDtypeStruct(
                (grad_accum, micro, *shape), dt, sharding=program.image_shardings[k]
            )
    with use_mesh(mesh):
        compiled = program._train_step.lower(state, frozen, batch_abs).compile()
    ma = compiled.memory_analysis()

    is_int4 = lambda path: path[-1] in ("weight_q", "weight_scale")  # noqa: E731
    int4 = bf16 = vision_b = ce_b = 0
    for (path, x), s in zip(
        jax.tree_util.tree_flatten_with_path(program.frozen_abstract)[0],
        jax.tree.leaves(program.frozen_shardings),
    ):
        b = _shard_bytes(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s))
        keys = tuple(getattr(k, "key", k) for k in path)
        if is_int4(keys):
            int4 += b
        else:
            bf16 += b
            vision_b += b if keys[0] in ("vision_tower", "mm_projector") else 0
            ce_b += b if keys[-1].startswith("ce_") else 0
    sh = program.state_shardings
    lora_b = _tree_bytes(program.state_abstract["trainable"], sh["trainable"])
    opt_b = _tree_bytes(program.state_abstract["opt_state"], sh["opt_state"])
    rest = {k: v for k, v in program.state_abstract.items() if k not in ("trainable", "opt_state")}
    other = _tree_bytes(rest, {k: sh[k] for k in rest}) + sum(
        _shard_bytes(x) for x in batch_abs.values()
    )
    a2a = exchange_stats(
        compiled.as_text(),
        activation_bytes=np.dtype(compute.jnp_dtype).itemsize,
        memory_chunks=_memory_chunks(model_cfg, compute, mesh_sizes, micro, seq),
    )
    tokens_per_device = micro * seq // n_dev
    useful = (
        tokens_per_device
        * model_cfg.num_experts_per_tok
        * model_cfg.hidden_size
        * np.dtype(compute.jnp_dtype).itemsize
        if model_cfg.num_moe_layers and n_dev > 1
        else 0
    )
    temps = int(ma.temp_size_in_bytes)
    unaliased_out = max(0, int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes))
    total = int4 + bf16 + lora_b + opt_b + other + temps + unaliased_out
    mem = int(device_memory_gb * GIB)
    reserve = int(mem * reserve_fraction)
    return PlanResult(
        mesh=dict(mesh_sizes),
        seq=seq,
        batch=batch,
        moe_chunk_tokens=compute.moe_chunk_tokens,
        remat=compute.remat,
        device_memory_bytes=mem,
        reserve_bytes=reserve,
        int4_weights=int4,
        bf16_weights=bf16,
        lora=lora_b,
        optimizer=opt_b,
        other_state=other,
        temporaries=temps + unaliased_out,
        per_device_bytes=total,
        fits=total <= mem - reserve,
        compiled_argument_bytes=int(ma.argument_size_in_bytes),
        compiled_output_bytes=int(ma.output_size_in_bytes),
        compiled_alias_bytes=int(ma.alias_size_in_bytes),
        all_to_all_bytes_per_exchange=a2a["per_exchange"],
        useful_bytes_per_exchange=useful,
        overflow_round_bytes=a2a["overflow_round"],
        context_parallel=mode,
        context_degree={"none": 1, "expert": mesh_sizes["expert"]}.get(
            mode, mesh_sizes["data"] * mesh_sizes["expert"]
        ),
        vision_weights=vision_b,
        image_patches=patches,
        ce_factors=ce_b,
    )


_A2A = re.compile(r"=\s*(\(.*?\)|\S+)\s+all-to-all\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def exchange_stats(hlo_text: str, *, activation_bytes: int, memory_chunks: int = 1) -> dict:
    """Bytes of the MoE's forward dispatch all-to-alls, from compiled HLO text.

    Counted: all-to-all instructions of floating element type whose op name lies in the
    `moe_dispatch` scope (k2jax/model/expert_parallel.py), not under a transpose (the backward)
    and deduplicated by (sub-chunk, shape) — the forward and its rematerialised recompute are the
    same exchange. per_exchange = Σ over the sub-chunks of one layer × `memory_chunks`;
    overflow_round = the same for the instructions inside the overflow loop (one round).
    """
    from k2jax.model.expert_parallel import DISPATCH_SCOPE, OVERFLOW_SCOPE

    seen: dict[str, dict[tuple, int]] = collections.defaultdict(dict)
    for line in hlo_text.splitlines():
        m = _A2A.search(line)
        name = _OP_NAME.search(line)
        if m is None or name is None:
            continue
        op = name.group(1)
        if f"{DISPATCH_SCOPE}/" not in op or "transpose(" in op:
            continue
        elements = 0
        for dtype, dims in _SHAPE.findall(m.group(1)):
            if dtype.startswith(("f", "bf")):
                elements += math.prod(int(d) for d in dims.split(",") if d)
        if not elements:
            continue
        chunk = re.search(r"moe_chunk_(\d+)", op)
        kind = "overflow_round" if f"{OVERFLOW_SCOPE}/" in op else "per_exchange"
        key = (chunk.group(1) if chunk else "", m.group(1))
        seen[kind][key] = elements * activation_bytes
    return {
        kind: sum(seen[kind].values()) * memory_chunks
        for kind in ("per_exchange", "overflow_round")
    }


def _memory_chunks(model_cfg, compute, mesh_sizes, micro: int, seq: int) -> int:
    """How many memory chunks (ComputeConfig.moe_chunk_tokens) a device's MoE tokens run in."""
    n = micro * seq // math.prod(mesh_sizes.values())
    c = compute.moe_chunk_tokens
    return n // c if 0 < c < n else 1


def _seq_step(compute, mesh_sizes, batch: int | None, grad_accum: int = 1) -> int:
    """The granularity of `--max-seq`: a multiple of 1024 that gives every device a whole number
    of MoE memory chunks (few rows split over many devices need longer steps)."""
    n_dev = math.prod(mesh_sizes.values())
    micro = (batch or mesh_sizes["data"] * mesh_sizes["expert"]) // grad_accum
    step = 1024
    while compute.moe_chunk_tokens and (micro * step) % (n_dev * compute.moe_chunk_tokens):
        step *= 2
    return step


def largest_fitting_seq(model_cfg, *, step: int = 1024, max_seq: int | None = None, **kw):
    """The longest sequence (a multiple of `step`) whose plan fits, by bisection; with its plan."""
    hi_cap = max_seq or model_cfg.max_position_embeddings
    lo, lo_plan = 0, None
    hi = step
    # grow until it does not fit (or the cap), then bisect
    while hi <= hi_cap:
        p = plan(model_cfg, seq=hi, **kw)
        if not p.fits:
            break
        lo, lo_plan = hi, p
        hi *= 2
    hi = min(hi, hi_cap + step)
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        p = plan(model_cfg, seq=mid, **kw)
        if p.fits:
            lo, lo_plan = mid, p
        else:
            hi = mid
    return lo, lo_plan


def configs_from_file(path: str, overrides: list[str]):
    """(ModelConfig, compute, lora, optim, run) from a model preset or a run config (run: the
    RunConfig, or None for a preset). A preset takes only model.* overrides."""
    from pathlib import Path

    from k2jax.config import (
        ConfigError,
        ModelConfig,
        find_config_file,
        load_model_config,
        parse_bindings,
    )
    from k2jax.model import ComputeConfig

    path = str(find_config_file(path))  # a path, or a packaged name such as lora_sft.gin
    text = Path(path).read_text()
    text_keys = {k for s, k, _, _ in parse_bindings(text, filename=path) if s == "model"}
    if "path" in text_keys or "preset" in text_keys:
        from k2jax.train.config import RunConfig

        run = RunConfig.load(path, overrides)
        if run.model.preset:
            model = load_model_config(run.model.preset)
        else:
            model = ModelConfig.from_hf_dir(run.model.path)
        return model, run.compute, run.lora, run.optim, run

    other = [o for o in overrides if not o.startswith("model.")]
    if other:
        raise ConfigError(
            f"--set {other[0]}: {path} is a model preset, which takes only model.* overrides; "
            "plan a run config (e.g. configs/lora_sft.gin) to change the lora, optim or compute "
            "sections"
        )
    try:
        model = load_model_config(path, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: not a model preset or run config: {e}") from None
    compute = ComputeConfig(dtype="bfloat16", param_dtype="bfloat16", experts="int4", remat="full")
    return model, compute, None, None, None


def _run_vision(run):
    """The vision tower a run config would train with images: the one its checkpoint's
    config.json describes (the weights need not be there), unless model.vision = False. A plan
    cannot see whether the data has images, so it counts the tower whenever there is one."""
    if run.model.path is None or run.model.vision is False:
        return None
    from k2jax.config import ConfigError, read_hf_config
    from k2jax.config.vision import VisionConfig

    config_json = read_hf_config(run.model.path)
    if config_json.get("model_type") != "kimi_k25" or "vision_config" not in config_json:
        if run.model.vision:
            raise ConfigError(f"model.vision = True, but {run.model.path} has no vision_config")
        return None
    return VisionConfig.from_hf_dict(config_json, source=f"{run.model.path}/config.json")


def plan_config(
    config: str,
    overrides: list[str] = (),
    *,
    mesh_sizes: dict[str, int],
    seq: int | None = None,
    batch: int | None = None,
    device_memory_gb: float = 80.0,
    reserve_fraction: float = 0.05,
    moe_chunk_tokens: int | None = None,
    remat: str | None = None,
    max_seq: bool = False,
) -> dict[str, PlanResult]:
    """`k2jax plan`: the plan of a model preset or a run config on a mesh, per remat policy.

    A run config plans what it trains: its rows per step, microbatches and sequence length (seq
    and batch override them; a preset plans seq 4096, one row per data×expert shard). remat is a
    policy of REMAT_POLICIES, "all" (one plan per policy) or None (the config's). With max_seq
    each plan is of the longest sequence that fits (a plan at 1024 tokens when none does, its
    `fits` False).
    """
    from k2jax.model.options import REMAT_POLICIES

    model, compute, lora, optim, run_config = configs_from_file(config, list(overrides))
    grad_accum = 1
    vision, image_patches = None, None
    if run_config is not None:
        batch = batch or run_config.data.batch_size
        grad_accum = run_config.train.grad_accum
        seq = seq or run_config.data.seq_len
        vision = _run_vision(run_config)
        image_patches = run_config.data.image_patches
    seq = seq or 4096
    if moe_chunk_tokens is None:
        moe_chunk_tokens = compute.moe_chunk_tokens or 512
    compute = dataclasses.replace(compute, moe_chunk_tokens=moe_chunk_tokens)
    if remat not in (None, "all", *REMAT_POLICIES):
        raise ValueError(
            f"--remat must be one of {', '.join(REMAT_POLICIES)} or all, got {remat!r}"
        )
    policies = REMAT_POLICIES if remat == "all" else [remat or compute.remat]
    kw = dict(
        mesh_sizes=mesh_sizes,
        batch=batch,
        grad_accum=grad_accum,
        device_memory_gb=device_memory_gb,
        reserve_fraction=reserve_fraction,
        lora=lora,
        optim=optim,
        vision=vision,
        image_patches=image_patches,
    )
    results = {}
    for policy in policies:
        c = dataclasses.replace(compute, remat=policy)
        result = None
        if max_seq:
            _, result = largest_fitting_seq(
                model, step=_seq_step(c, mesh_sizes, batch, grad_accum), compute=c, **kw
            )
        results[policy] = result or plan(model, seq=1024 if max_seq else seq, compute=c, **kw)
    return results


def policy_table(results: dict[str, PlanResult], max_seq: bool) -> str:
    """One line per remat policy: what the step holds and whether it fits."""
    seq_head = "longest seq" if max_seq else "seq"
    lines = [f"{'remat':<11}{seq_head:>12}{'temporaries':>14}{'total':>10}  fits"]
    for policy, r in results.items():
        seq = r.seq if (r.fits or not max_seq) else 0
        lines.append(
            f"{policy:<11}{seq:>12,}{r.temporaries / GIB:>11.2f} GiB{r.per_device_bytes / GIB:>7.2f} "
            f"GiB  {'yes' if r.fits else 'no'}"
        )
    return "\n".join(lines)
