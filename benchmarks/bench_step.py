"""One LoRA train step of a Kimi-K2-dimension slice on one GPU: tokens/s, step time, MFU, memory.

    python benchmarks/bench_step.py --case b --out b.json   # 1 dense + 3 MoE layers, 384 INT4 experts
    python benchmarks/bench_step.py --case c --out c.json   # 1 dense + 1 MoE layer (projection input)
    python benchmarks/bench_step.py --case d --out d.json   # hf_peft_baseline.py's slice, in k2jax
    .venv/bin/python benchmarks/bench_step.py --case b --tiny --out /tmp/b.json   # CPU smoke test

benchmarks/run_all.py runs the cases, each in its own process (one process = one clean peak-memory
reading and one out-of-memory that cannot take the other cases down), and projects (c) from them.

The slices. Every width comes from the preset, never from this file: (b) and (c) read
configs/kimi_k2_thinking.gin (hidden 7168, 64 heads, MLA ranks 1536/512, head dims 128+64 / 128,
384 routed experts of width 2048, top-8, one shared expert, vocab 163,840) and only cut the depth
(`dataclasses.replace`: num_hidden_layers = 1 + moe_layers, first_k_dense_replace = 1). (d) is the
slice benchmarks/hf_peft_baseline.py builds in transformers: its K2_WIDTHS are
configs/kimi_k2_instruct.gin's values (checked at run time, `hf_width_mismatches`), 1 dense + 3 MoE
layers of 96 routed experts held in bf16.

The run recipe is configs/lora_sft.gin's, unchanged except for one row per step (grad_accum 1):
bf16 activations, INT4 group-32 routed experts (bf16 for (d)), remat "full", kernels "auto" (the
Pallas grouped matmul and cuDNN attention on a GPU, XLA on a CPU), LoRA r=16 on every linear
including each routed expert, MuonClip (Muon with consistent RMS 0.2, QK-clip τ=100), gradient
clipping. The batch is one row of seq tokens holding one example (one causal segment).

Random base: `Program.init_base`, which draws every routed-expert stack one expert at a time
(k2jax/model/moe.py `_per_expert`), so its random-number temporaries are one expert's size.

Timing: compile (Program.prepare, timed separately), `warmup` steps, then `steps` steps each
ended by jax.block_until_ready; the step time is the median.

FLOPs are the library's one definition (k2jax/train/step.py, `Program.weight_flops_per_token` and
`Program.step_flops`), the PaLM "model FLOPs" convention (no remat recompute, useful tokens only):

    per token   W = Σ over matmul weights of 2·N forward + 2·N input gradient (+ 2·N weight
                gradient if trainable) = 4·N_frozen + 6·N_trainable, with N counted per token:
                every dense weight (attention, dense and shared MLP, router, LM head; not the
                embedding lookup), routed experts × top_k / n_routed_experts, LoRA factors as
                trainable weights
    per step    step_flops = tokens·W + pairs·L·3·2·H·(Dqk + Dv)   (attention: q·k and p·v per
                visible (query, key) pair, ×3 with the backward; pairs = T(T+1)/2 per causal row)
    MFU         step_flops / (step time · devices · 800e12)

At seq 4096 that is, per token: (b) W = 12.79 GFLOP + attention 1.01 = 13.80 GFLOP (56.5 TFLOP
per step; the LM head alone is 4.70 of it, the routed experts and their LoRA 4.29); (c) 9.24;
(d) 13.78.

800 TFLOP/s is the measured bf16 matmul ceiling of an H100/H200 through jax (GPU_NOTES.md), the
issue's reference; `mfu_datasheet` divides by `peak_flops(device, datasheet=True)` instead (989 for
H100/H200). Peak memory is device.memory_stats()["peak_bytes_in_use"] (None where the backend has
no statistics, e.g. CPU). jax cannot reset that statistic, so `peak_memory_set_by` says whether
the train step or the random init before it set it; `step_peak_estimate_bytes` (resident bytes
after init + the compiled step's temporaries + its non-aliased outputs) is the step's own figure.
`k2jax plan` (k2jax/train/planner.py) predicts 45.8 GiB for (b) and 38.4 GiB for (d) on one device.

`project_8xh200` turns (b) and (c) into the estimate of full Kimi-K2 on one 8-GPU node; its
docstring states the method. Only jax APIs present in jax 0.11.2 (the GPU machine's) are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _use_source_tree() -> None:
    """Makes `k2jax` importable from this checkout when it is not installed.

    The device machine runs the working tree as copied, without `pip install -e .`; pyproject.toml
    maps the top-level folders sharding/, conversion/ and configs/ to k2jax.sharding, ... and this
    applies the same mapping (what the editable install's finder does).
    """
    if importlib.util.find_spec("k2jax") is None:
        sys.path.insert(0, str(ROOT))
    import k2jax

    for sub in ("configs", "sharding", "conversion"):
        name = f"k2jax.{sub}"
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        spec = importlib.util.spec_from_file_location(
            name, ROOT / sub / "__init__.py", submodule_search_locations=[str(ROOT / sub)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(k2jax, sub, module)


_use_source_tree()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from k2jax.config import ModelConfig, load_model_config  # noqa: E402
from k2jax.sharding import make_mesh  # noqa: E402
from k2jax.train.config import RunConfig  # noqa: E402
from k2jax.train.state import path_keys  # noqa: E402
from k2jax.train.step import Program, StepSpec, build_program, peak_flops  # noqa: E402

PEAK_TFLOPS = 800.0  # the MFU reference: measured bf16 ceiling through jax (GPU_NOTES.md)
RUN_RECIPE = ROOT / "configs" / "lora_sft.gin"


@dataclasses.dataclass(frozen=True)
class Case:
    """One slice: preset file, MoE layers after the one dense layer, routed experts, their dtype."""

    what: str
    preset: str
    moe_layers: int
    experts: int | None = None  # None: the preset's
    expert_dtype: str = "int4"
    tiny_experts: int | None = None  # experts in the --tiny variant (None: the tiny preset's)


CASES = {
    "b": Case("K2 slice", "kimi_k2_thinking.gin", 3),
    "c": Case("K2 slice (split)", "kimi_k2_thinking.gin", 1),
    "d": Case(
        "HF+PEFT slice",
        "kimi_k2_instruct.gin",
        3,
        experts=96,
        expert_dtype="bf16",
        tiny_experts=4,
    ),
}
TINY_PRESET = "tiny.gin"
SEQ, TINY_SEQ = 4096, 256
# All-to-all bytes sent per exchange over the useful bytes, as `k2jax plan --json` counted them
# from the compiled K2-width step on 8 devices (RESULTS.md, issue 12): the capacity factor 1.25.
A2A_VOLUME_RATIO = 587_202_560 / 469_762_048


# --------------------------------------------------------------------------------------------------
# Building the slice
# --------------------------------------------------------------------------------------------------


def slice_config(case: Case, *, tiny: bool = False) -> ModelConfig:
    """The preset's architecture cut to 1 dense + `case.moe_layers` MoE layers."""
    cfg = load_model_config(TINY_PRESET if tiny else case.preset)
    changes = dict(num_hidden_layers=1 + case.moe_layers, first_k_dense_replace=1)
    experts = case.tiny_experts if tiny else case.experts
    if experts is not None:
        changes["n_routed_experts"] = experts
    return dataclasses.replace(cfg, **changes)


def step_spec(
    cfg: ModelConfig,
    *,
    expert_dtype: str,
    gmm_impl: str | None = None,
    attention_impl: str | None = None,
    lora: dict | None = None,
) -> StepSpec:
    """configs/lora_sft.gin's compute, LoRA, optimizer and schedule on `cfg`; one row per step.
    The kernel overrides are for diagnosis (the recipe's "auto" is what is measured); `lora`
    overrides LoraConfig fields, e.g. {"backward": "ce", "ce_rank": 64, "ce_keep": 0.125}."""
    run = RunConfig.load(RUN_RECIPE)
    if lora:
        run = dataclasses.replace(run, lora=dataclasses.replace(run.lora, **lora))
    compute = dataclasses.replace(run.compute, experts=expert_dtype)
    if gmm_impl is not None:
        compute = dataclasses.replace(compute, gmm_impl=gmm_impl)
    if attention_impl is not None:
        compute = dataclasses.replace(compute, attention_impl=attention_impl)
    run = dataclasses.replace(
        run, compute=compute, train=dataclasses.replace(run.train, grad_accum=1)
    )
    return StepSpec.from_run_config(run, cfg)


def _is_routed(keys: tuple[str, ...]) -> bool:
    return "experts" in keys and "shared_experts" not in keys


def random_batch(program: Program, *, rows: int, seq: int, seed: int = 0) -> tuple[dict, dict]:
    """(device batch, host batch): uniformly random tokens, one example per row, every target
    counted in the loss."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, program.spec.model.vocab_size, (rows, seq + 1), dtype=np.int32)
    host = {
        "tokens": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((rows, seq), np.float32),
        "segment_ids": np.ones((rows, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
    }
    return program.device_batch(host), host


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def _memory_stat(device, name: str) -> int | None:
    """device.memory_stats()[name], or None where the backend keeps no statistics (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without statistics raise or return None
        return None
    return int(stats[name]) if stats and name in stats else None


def _bytes(tree) -> int:
    """Bytes of an (abstract) tree, int4 at half a byte (as XLA packs it on GPU)."""
    total = 0
    for x in jax.tree.leaves(tree):
        n = math.prod(x.shape)
        total += (n + 1) // 2 if x.dtype == jnp.int4 else n * np.dtype(x.dtype).itemsize
    return total


def trainable_counts(program: Program) -> dict:
    """LoRA (+ trainable base) parameters: per MoE layer routed-expert vs the rest (replicated
    under expert parallelism), per dense layer, and outside the layer stacks."""
    out = {"moe_layer_routed": 0, "moe_layer_other": 0, "dense_layer": 0, "top": 0}
    tr = program.state_abstract["trainable"]
    for path, leaf in jax.tree_util.tree_flatten_with_path(tr)[0]:
        keys = path_keys(path)[1:]  # drop "lora"/"params"
        n = math.prod(leaf.shape)
        if keys[0] == "moe_layers":
            out["moe_layer_routed" if _is_routed(keys) else "moe_layer_other"] += n // leaf.shape[0]
        elif keys[0] == "dense_layers":
            out["dense_layer"] += n // leaf.shape[0]
        else:
            out["top"] += n
    return out


def run_case(
    case: Case | str,
    *,
    tiny: bool = False,
    seq: int | None = None,
    steps: int = 5,
    warmup: int = 2,
    peak_tflops: float = PEAK_TFLOPS,
    gmm_impl: str | None = None,
    attention_impl: str | None = None,
    lora: dict | None = None,
    seed: int = 0,
) -> dict:
    """Builds, compiles and times one case on one device; returns its record (see main)."""
    name = case if isinstance(case, str) else None
    case = CASES[case] if isinstance(case, str) else case
    seq = seq or (TINY_SEQ if tiny else SEQ)
    t_start = time.perf_counter()
    cfg = slice_config(case, tiny=tiny)
    spec = step_spec(
        cfg,
        expert_dtype=case.expert_dtype,
        gmm_impl=gmm_impl,
        attention_impl=attention_impl,
        lora=lora,
    )
    device = jax.devices()[0]
    mesh = make_mesh(devices=[device])
    program = build_program(spec, mesh)

    t0 = time.perf_counter()
    frozen, trainable_params = program.init_base(seed)
    state = program.init_state(seed, trainable_params)
    batch, host = random_batch(program, rows=1, seq=seq, seed=seed)
    jax.block_until_ready((frozen, state, batch))
    init_s = time.perf_counter() - t0
    init_peak = _memory_stat(device, "peak_bytes_in_use")
    resident = _memory_stat(device, "bytes_in_use")  # base + train state + batch
    compile_s = program.prepare(state, frozen, batch)
    compile_peak = _memory_stat(device, "peak_bytes_in_use")  # autotuning allocates too
    compiled = program.compiled_train_step(state, frozen, batch)

    for _ in range(warmup):
        state, metrics = program.train_step(state, frozen, batch)
        jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = program.train_step(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    metrics = jax.device_get(metrics)

    tokens = int((host["segment_ids"] > 0).sum())
    flops = float(program.step_flops(host["segment_ids"]))
    peak = peak_flops(device, peak_tflops)
    datasheet = peak_flops(device, datasheet=True)
    n_dev = mesh.devices.size
    mem = None
    if compiled is not None:
        try:
            ma = compiled.memory_analysis()
            mem = {
                "argument": int(ma.argument_size_in_bytes),
                "output": int(ma.output_size_in_bytes),
                "alias": int(ma.alias_size_in_bytes),
                "temp": int(ma.temp_size_in_bytes),
            }
        except Exception:  # not every backend reports it
            mem = None
    peak_bytes = _memory_stat(device, "peak_bytes_in_use")
    # The process peak may have been set by the random init rather than by the step (no jax API
    # resets it); then say so, and give the step's peak from its compiled memory analysis.
    peak_by = None
    if peak_bytes is not None:
        if peak_bytes > max(init_peak or 0, compile_peak or 0):
            peak_by = "train step"
        else:
            before = "init" if (init_peak or 0) >= (compile_peak or 0) else "compile"
            peak_by = f"{before} (the train step's own peak is lower)"
    step_estimate = None
    if mem is not None and resident is not None:
        step_estimate = resident + mem["temp"] + max(0, mem["output"] - mem["alias"])
    return {
        "case": name,
        "what": f"{case.what}: {cfg.num_dense_layers}+{cfg.num_moe_layers} layers, "
        f"{cfg.n_routed_experts} {spec.compute.experts} experts{', tiny' if tiny else ''}",
        "tiny": tiny,
        "device": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": {
            "preset": TINY_PRESET if tiny else case.preset,
            "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads,
            "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank,
            "qk_head_dim": cfg.qk_head_dim,
            "v_head_dim": cfg.v_head_dim,
            "intermediate_size": cfg.intermediate_size,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "n_routed_experts": cfg.n_routed_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "vocab_size": cfg.vocab_size,
            "dense_layers": cfg.num_dense_layers,
            "moe_layers": cfg.num_moe_layers,
            "experts_dtype": spec.compute.experts,
        },
        "recipe": {
            "compute": dataclasses.asdict(spec.compute),
            "lora_rank": spec.lora.rank,
            "lora_targets": list(spec.lora.targets),
            "lora_backward": spec.lora.backward,  # "ce": init_s includes computing the factors
            "ce_rank": spec.lora.ce_rank,
            "ce_keep": spec.lora.ce_keep,
            "ce_refresh": spec.lora.ce_refresh,
            "optimizer": spec.optim.name,
            "qk_clip_tau": spec.optim.qk_clip_tau,
        },
        "seq": seq,
        "rows": 1,
        "tokens_per_step": tokens,
        "steps_timed": steps,
        "warmup": warmup,
        "init_s": init_s,
        "compile_s": compile_s,
        "step_s": step_s,
        "step_s_all": times,
        "tokens_per_s": tokens / step_s,
        "weight_flops_per_token": program.weight_flops_per_token,
        "flops_per_token": flops / tokens,
        "step_flops": flops,
        "peak_tflops": peak_tflops,
        "mfu": flops / (step_s * n_dev * peak) if peak else None,
        "mfu_datasheet": flops / (step_s * n_dev * datasheet) if datasheet else None,
        "peak_memory_bytes": peak_bytes,
        "peak_memory_gb": peak_bytes / 1e9 if peak_bytes is not None else None,
        "peak_memory_set_by": peak_by,
        "resident_bytes_after_init": resident,
        "step_peak_estimate_bytes": step_estimate,
        "compiled_memory_bytes": mem,
        "base_bytes": _bytes(program.frozen_abstract),
        "trainable_params": trainable_counts(program),
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        "finite": bool(metrics["finite"]),
        "wall_s": time.perf_counter() - t_start,
    }


def hf_width_mismatches() -> list[str]:
    """Fields where hf_peft_baseline.py's K2_WIDTHS differ from case (d)'s preset (expected: none)."""
    spec = importlib.util.spec_from_file_location(
        "hf_peft_baseline", ROOT / "benchmarks" / "hf_peft_baseline.py"
    )
    hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hf)  # defines constants only; torch is imported inside its main()
    cfg = load_model_config(CASES["d"].preset)
    widths = dict(hf.K2_WIDTHS)
    rope = widths.pop("rope_scaling", {})
    renamed = {
        "rope_factor": rope.get("factor"),
        "rope_original_max_position_embeddings": rope.get("original_max_position_embeddings"),
        "rope_beta_fast": rope.get("beta_fast"),
        "rope_beta_slow": rope.get("beta_slow"),
        "rope_mscale": rope.get("mscale"),
        "rope_mscale_all_dim": rope.get("mscale_all_dim"),
    }
    out = []
    for key, value in {**widths, **renamed}.items():
        if hasattr(cfg, key) and getattr(cfg, key) != value:
            out.append(f"{key}: hf {value} vs {CASES['d'].preset} {getattr(cfg, key)}")
    return out


# --------------------------------------------------------------------------------------------------
# (c) The full-model projection
# --------------------------------------------------------------------------------------------------


def project_8xh200(
    b: dict,
    c: dict,
    full: ModelConfig,
    *,
    gpus: int = 8,
    nvlink_gb_s: float = 450.0,
    a2a_passes: int = 3,
    a2a_volume_ratio: float = A2A_VOLUME_RATIO,
    gmm_rows: list[dict] | None = None,
) -> dict:
    """AN ESTIMATE of full Kimi-K2 LoRA tokens/s on one node of `gpus` GPUs under expert=8, from
    the measured one-GPU slices b (1 dense + 3 MoE layers) and c (1 dense + 1 MoE layer).

    Per-layer split (the approximation): the MoE layers are one scanned body, so each costs the
    same; t_moe = (t_b − t_c) / 2 is one MoE layer's step time at T tokens (attention + router +
    experts + shared expert, forward, remat recompute and backward, plus that layer's share of the
    optimizer update), and t_fixed = t_c − t_moe is everything else (embedding, the dense layer,
    LM head + loss, the optimizer's other work, per-step overhead). Noise in either measurement
    goes into t_moe at ×1/2.

    Compute per GPU: each GPU runs its own T-token row (8 rows per step, as configs/lora_sft.gin),
    so attention, dense layer and LM head cost what they cost in (b). Under expert=8 a GPU holds
    48 of the 384 experts and receives the 8·T routed rows addressed to them: the same routed rows
    and the same expert FLOPs per own token as the one-GPU slice, spread over 8× fewer experts
    (683 rows per expert instead of 85). So t_compute = t_fixed + L_moe · t_moe (L_moe = 60). This
    is conservative twice over: the expert GEMMs run faster at 683 rows per expert (bench_gmm's E48
    vs E384 cases), and (b)'s t_moe includes Muon on 384 experts' LoRA factors where a GPU of the
    node updates 48. The variant `*_e48_gemm_rate` (only with (a)'s pallas-int4 rows) credits the
    first: it replaces the expert-GEMM time inside t_moe — 2 forwards (remat) + 1 input gradient
    of gate|up and down at E384, 32k rows, which is exactly (b)'s shape — by the same FLOPs at
    (a)'s E48 rate.

    All-to-all per MoE layer per GPU, bytes leaving the GPU: the useful T·top_k·hidden·2 (bf16)
    × `a2a_volume_ratio` (what the exchange sends over what is useful, as `k2jax plan --json`
    counts it from the compiled step: all_to_all_bytes_per_exchange / useful_bytes_per_exchange
    = 1.25 for the K2-width step on 8 devices, the capacity factor; common-case routing, no
    overflow round) × 2 (dispatch + combine) × 7/8 (the block for the GPU itself stays local) ×
    a2a_passes (3: forward, the forward recomputed by remat "full", backward). Over NVLink at
    `nvlink_gb_s` per direction per GPU (assumed 450 GB/s: H200/H100 NVLink 4, 900 GB/s
    bidirectional). Plus the all-reduce of the replicated (non-expert) LoRA gradients in float32,
    ring: 2·(P−1)/P · 4 B · N.
      no overlap:   t = t_compute + t_comm
      full overlap: t = max(t_compute, t_comm)  — the assumption that the exchanges hide under
                    the expert GEMMs: each device's tokens run as 2 independent sub-chunks
                    (ComputeConfig.moe_overlap_chunks), whose collectives XLA's latency-hiding
                    scheduler may overlap with the other sub-chunk's GEMMs; unmeasured
    `*_padded_a2a` is the previous dispatch (before issue 12): padded all_to_all buffers of A
    rows per peer, P× the useful bytes.

    tokens/s = gpus · T / t. Not counted: load imbalance between experts (real routing is less
    uniform than random weights), stragglers, host overheads of 8 processes.
    """
    if full.num_dense_layers != 1:
        raise ValueError("the projection assumes the full model has one dense layer, as the slices")
    T = b["tokens_per_step"]
    if c["tokens_per_step"] != T:
        raise ValueError("b and c must be timed at the same tokens per step")
    t_moe = (b["step_s"] - c["step_s"]) / (b["model"]["moe_layers"] - c["model"]["moe_layers"])
    t_fixed = c["step_s"] - c["model"]["moe_layers"] * t_moe
    L = full.num_moe_layers
    t_compute = t_fixed + L * t_moe
    D, K = full.hidden_size, full.num_experts_per_tok
    a2a_useful = T * K * D * 2 * 2 * (gpus - 1) / gpus * a2a_passes  # bytes per layer per GPU
    a2a_sent = a2a_useful * a2a_volume_ratio
    a2a_padded = a2a_useful * gpus
    bw = nvlink_gb_s * 1e9
    tr = b["trainable_params"]
    replicated = tr["top"] + full.num_dense_layers * tr["dense_layer"] + L * tr["moe_layer_other"]
    allreduce_s = 2 * (gpus - 1) / gpus * 4 * replicated / bw
    t_comm = L * a2a_sent / bw + allreduce_s
    t_comm_padded = L * a2a_padded / bw + allreduce_s
    tps = lambda t: gpus * T / t  # noqa: E731
    out = {
        "estimate": True,
        "method": "see bench_step.project_8xh200's docstring",
        "gpus": gpus,
        "moe_layers_full": L,
        "tokens_per_gpu_per_step": T,
        "t_moe_layer_s": t_moe,
        "t_fixed_s": t_fixed,
        "t_compute_s": t_compute,
        "nvlink_gb_s_per_direction": nvlink_gb_s,
        "a2a_passes": a2a_passes,
        "a2a_volume_ratio": a2a_volume_ratio,
        "a2a_bytes_per_token_per_layer": a2a_sent / T,
        "a2a_s_per_step": L * a2a_sent / bw,
        "lora_allreduce_s_per_step": allreduce_s,
        "replicated_trainable_params": replicated,
        "tokens_per_s_no_overlap": tps(t_compute + t_comm),
        "tokens_per_s_full_overlap": tps(max(t_compute, t_comm)),
        "tokens_per_s_padded_a2a_no_overlap": tps(t_compute + t_comm_padded),
    }
    gemm = _expert_gemm_saving(gmm_rows, T * K, forwards=2) if gmm_rows else None
    if gemm is not None and gemm < t_moe:
        t_c2 = t_fixed + L * (t_moe - gemm)
        out["expert_gemm_saving_per_layer_s"] = gemm
        out["tokens_per_s_no_overlap_e48_gemm_rate"] = tps(t_c2 + t_comm)
        out["tokens_per_s_full_overlap_e48_gemm_rate"] = tps(max(t_c2, t_comm))
    return out


def _expert_gemm_saving(rows: list[dict], routed_rows: int, *, forwards: int) -> float | None:
    """Seconds per MoE layer saved by running (b)'s expert GEMMs at E48 instead of E384 rates:
    `forwards` forward passes (forward + remat recompute) + 1 input gradient, gate|up and down."""
    ms = {(r["case"], r["impl"]): r for r in rows if r.get("impl") == "pallas-int4"}
    need = ("E384-gate_up", "E384-down", "E48-gate_up", "E48-down")
    if not all((n, "pallas-int4") in ms for n in need):
        return None

    def layer_s(prefix):
        total = 0.0
        for proj in ("gate_up", "down"):
            r = ms[(f"{prefix}-{proj}", "pallas-int4")]
            scale = routed_rows / r["M"]  # time ∝ rows at a fixed rows-per-expert regime
            total += (forwards * r["fwd_ms"] + r["dx_ms"]) * 1e-3 * scale
        return total

    return layer_s("E384") - layer_s("E48")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def lora_overrides(args) -> dict | None:
    """LoraConfig overrides from --lora-backward/--ce-rank/--ce-keep/--ce-refresh (None for
    "exact")."""
    if args.lora_backward == "exact":
        return None
    knobs = ("ce_rank", "ce_keep", "ce_refresh")
    return {"backward": "ce", **{k: getattr(args, k) for k in knobs}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=sorted(CASES), required=True)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument(
        "--tiny", action="store_true", help="the tiny preset at seq 256 (CPU smoke test)"
    )
    p.add_argument(
        "--seq", type=int, default=None, help=f"tokens per row (default {SEQ}; tiny {TINY_SEQ})"
    )
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    p.add_argument("--gmm-impl", default=None, help="override compute.gmm_impl (diagnosis)")
    p.add_argument("--attention-impl", default=None, help="override compute.attention_impl")
    p.add_argument(
        "--lora-backward", choices=("exact", "ce"), default="exact", help="lora.backward"
    )
    p.add_argument("--ce-rank", type=int, default=64, help="lora.ce_rank (with ce)")
    p.add_argument("--ce-keep", type=float, default=0.125, help="lora.ce_keep (with ce)")
    p.add_argument("--ce-refresh", type=int, default=0, help="lora.ce_refresh (with ce)")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        record = run_case(
            args.case,
            tiny=args.tiny,
            seq=args.seq,
            steps=args.steps,
            warmup=args.warmup,
            peak_tflops=args.peak_tflops,
            gmm_impl=args.gmm_impl,
            attention_impl=args.attention_impl,
            lora=lora_overrides(args),
        )
    except Exception as e:  # recorded, so that the caller's table says what went wrong
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"[:4000]  # XLA out-of-memory reports run long
        args.out.write_text(json.dumps({"case": args.case, "error": error}))
        return 1
    if args.case == "d":
        try:
            record["hf_width_mismatches"] = hf_width_mismatches()
        except Exception as e:  # a check, not a reason to lose the measurement
            record["hf_width_mismatches"] = f"not checked: {type(e).__name__}: {e}"
    args.out.write_text(json.dumps(record, indent=1))
    keys = ("tokens_per_s", "step_s", "compile_s", "flops_per_token", "mfu", "peak_memory_gb")
    print(json.dumps({k: record[k] for k in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
