"""The compiled training program: state init, the train step, the eval step, and their shardings.

One train step (`Program.train_step(state, frozen, batch) -> (state, metrics)`):

    1. the batch [M, b, T] holds M = grad_accum microbatches of b rows; a lax.scan runs each
       through `Transformer.loss` and sums the LoRA (+ trainable base) gradients of the *summed*
       token loss in float32, with the loss sums, the per-head max logits (max) and expert loads
       (M = 1, the common case, skips the scan)
    2. gradients and loss are divided once by the total number of loss tokens: the step equals
       one big batch, whatever M is (and whatever the mesh is)
    3. NaN/inf guard: if the loss or the gradient norm is not finite, the update is skipped
       (lax.cond), `nonfinite.streak` counts it; the loop stops after K in a row
    4. otherwise: optax update (clipping, Muon/AdamW), then QK-clip on the "qk_clip" factors from
       the step's max logits against per-head thresholds, set at the first applied step to
       max(τ·m², that step's max logit) (k2jax.optim.qk_clip explains why)
    5. with CE-LoRA's carried rows (lora.ce_refresh = N ≥ 1): steps 0, 1, N+1, 2N+1, … choose
       the kept rows, ahead of 1, from the Σ dY² accumulated since the last choice (step 0,
       before any gradient: by the residual's row norms; `_carried_rows`); the step's own
       Σ dY² is the gradient of the "ce_score" probes, summed in 1 like the LoRA gradients
       and added to the state's sum unless the step is skipped

Compute runs in `compute.dtype` (bf16 in production) while the LoRA factors and trainable base
weights stay float32 masters (the model casts them per matmul). Rematerialisation follows
`compute.remat` (the scanned decoder layers are wrapped in `nn.remat`).

Shardings. Everything comes from the logical-axis rules (k2jax.sharding): frozen parameters and
LoRA factors from their declared axis names, optimizer-state leaves from the LoRA leaf they belong
to (`state.opt_state_shardings`), the batch [M, b, T] as (None, rows, sequence) — rows over
data × expert, or with context parallelism (`compute.context_parallel`, resolved against the
batch by `StepSpec.from_run_config`) each row's sequence over expert or data × expert — and
scalars replicated. Steps are jitted with these as explicit in/out shardings
and the state is donated, so the step is in-place and the layout never drifts.

Programs are cached per (StepSpec, mesh): a notebook that makes a second Trainer, or a test that
makes three, compiles once.

MFU. Model FLOPs of a step, counted per non-padding token (the convention of the PaLM paper's
"model FLOPs": no rematerialisation recompute, only useful tokens):

    weights    2·N per matmul weight in the forward pass; the backward pass needs the gradient
               w.r.t. activations (2·N) for every weight, and w.r.t. the weight (2·N) only for
               trainable ones: 6·N_trainable + 4·N_frozen, N counted per token = all dense
               weights (attention, dense/shared MLP, router, LM head; not the embedding lookup)
               + K/E of the routed experts, LoRA factors likewise (x·Aᵀ, then ·Bᵀ)
    attention  2·H·(Dqk + Dv) per visible (query, key) pair and layer forward (q·k, p·v), ×3 with
               the backward; visible pairs counted exactly from the segment ids (causal within
               each packed example)

The usual 6·N rule would count weight gradients a frozen base never computes, and report a LoRA
run ~1.5× better than the hardware did. MFU = model FLOPs / (step time × devices × peak FLOP/s).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k2jax.config import ConfigError, ModelConfig
from k2jax.config.vision import VisionConfig
from k2jax.lora import LoraConfig
from k2jax.model import ComputeConfig, Transformer
from k2jax.model.context_parallel import resolve as resolve_context
from k2jax.model.transformer import init_variables
from k2jax.ops.ce_backward import choose_rows, grouped_factors
from k2jax.ops.ce_backward import factors as ce_factors
from k2jax.optim import (
    OptimConfig,
    ScheduleConfig,
    expert_major,
    logit_scale_factor,
    make_optimizer,
    make_schedule,
    set_thresholds,
    unset_thresholds,
    update_qk_clip,
)
from k2jax.quant import Int4Weight
from k2jax.sharding import logical_specs, spec_for, token_axes, use_mesh
from k2jax.train.state import (
    at_path,
    merge_params,
    opt_state_shardings,
    path_keys,
    split_params,
    trainable_predicate,
)

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
# With a vision tower: the per-row image arrays of k2jax.model.vision.row_inputs, which
# `device_batch` builds from the data's pixel_values and image_grid_thw.
IMAGE_KEYS = ("pixel_values", "pos_index", "pos_weight", "pos_hw", "segment", "merge_index")
# Model aux outputs combined over microbatches by max (the rest add up).
MAX_AUX = ("max_logit", "exchange_rounds")


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything that shapes the compiled program (hashable: programs are cached on it)."""

    model: ModelConfig
    compute: ComputeConfig
    lora: LoraConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    total_steps: int
    grad_accum: int = 1
    z_loss: float = 0.0
    train_router: bool = False
    train_norms: bool = False
    vision: VisionConfig | None = None  # K2.5's vision tower and projector, frozen unless LoRA

    @classmethod
    def from_run_config(
        cls,
        run,
        model: ModelConfig,
        total_steps: int | None = None,
        vision: VisionConfig | None = None,
    ) -> StepSpec:
        """The spec of a RunConfig (k2jax.train.config) for the architecture `model`.
        total_steps: the run's length when train.steps is None (counted from its epochs).
        vision: the checkpoint's vision tower, when the run trains with images."""
        t = run.train
        total_steps = t.steps if total_steps is None else total_steps
        if total_steps is None:
            raise ConfigError(
                "train.steps = None (sized by data.num_epochs): the program needs the counted "
                "number of steps (k2jax.train.start.count_steps)"
            )
        mesh = {"data": run.mesh.data, "expert": run.mesh.expert}
        mode = resolve_context(
            run.compute.context_parallel, run.data.batch_size // t.grad_accum, mesh
        )
        return cls(
            model=model,
            compute=dataclasses.replace(run.compute, context_parallel=mode),
            lora=run.lora,
            optim=run.optim,
            schedule=run.schedule,
            total_steps=total_steps,
            grad_accum=t.grad_accum,
            z_loss=t.z_loss,
            train_router=t.train_router,
            train_norms=t.train_norms,
            vision=vision,
        )


@functools.lru_cache(maxsize=8)
def build_program(spec: StepSpec, mesh: Mesh) -> Program:
    """The (cached) compiled program of `spec` on `mesh`."""
    return Program(spec, mesh)


class Program:
    """Model, optimizer, abstract trees, shardings and jitted functions of one training setup."""

    def __init__(self, spec: StepSpec, mesh: Mesh):
        self.spec, self.mesh = spec, mesh
        self.model = Transformer(spec.model, spec.compute, spec.lora, vision=spec.vision)
        self.predicate = trainable_predicate(router=spec.train_router, norms=spec.train_norms)
        boxed = jax.eval_shape(
            lambda: init_variables(self.model, jax.random.key(0), lora_rng=jax.random.key(0))
        )
        specs = logical_specs(boxed)
        abstract = nn.unbox(boxed)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        ns = lambda s: NamedSharding(mesh, s)  # noqa: E731

        frozen_abs, tparams_abs = split_params(abstract["params"], self.predicate)
        frozen_specs, tparams_specs = split_params(specs["params"], self.predicate)
        if spec.train_router and "moe_layers" not in tparams_abs:
            raise ValueError("train.train_router: this model has no MoE router")
        f32 = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32)  # noqa: E731
        self.frozen_abstract = frozen_abs
        self.frozen_shardings = jax.tree.map(ns, frozen_specs)
        self.full_params_shardings = jax.tree.map(ns, specs["params"])
        trainable_abs = {"lora": abstract["lora"], "params": jax.tree.map(f32, tparams_abs)}
        trainable_sh = {
            "lora": jax.tree.map(ns, specs["lora"]),
            "params": jax.tree.map(ns, tparams_specs),
        }
        self.schedule = make_schedule(spec.schedule, spec.optim.learning_rate, spec.total_steps)
        self.optimizer = make_optimizer(spec.optim, self.schedule, trainable_abs)
        opt_abs = jax.eval_shape(self.optimizer.init, trainable_abs)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        self.state_abstract = {
            "step": scalar,
            "trainable": trainable_abs,
            "opt_state": opt_abs,
            "qk_clip": abstract["qk_clip"],
            "qk_thresholds": abstract_thresholds(abstract),
            "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
            "nonfinite": {"streak": scalar, "total": scalar},
        }
        # lora.ce_refresh ≥ 1: the carried kept rows and the Σ dY² accumulated since their choice
        self.carries_rows = "ce_rows" in abstract
        if self.carries_rows:
            self.state_abstract["ce"] = {"rows": abstract["ce_rows"], "score": abstract["ce_score"]}
        rep = self.replicated
        self.state_shardings = {
            "step": rep,
            "trainable": trainable_sh,
            # The optimizer holds its state in the expert-major view (k2jax.optim.optimizer).
            "opt_state": opt_state_shardings(
                opt_abs, expert_major(trainable_abs), expert_major(trainable_sh), mesh
            ),
            "qk_clip": jax.tree.map(ns, specs["qk_clip"]),
            "qk_thresholds": jax.tree.map(lambda _: rep, abstract_thresholds(abstract)),
            "rng": rep,
            "nonfinite": {"streak": rep, "total": rep},
        }
        if self.carries_rows:
            self.state_shardings["ce"] = {
                "rows": jax.tree.map(ns, specs["ce_rows"]),
                "score": jax.tree.map(ns, specs["ce_score"]),
            }
        rows_axis, seq_axis = token_axes(spec.compute.context_parallel)
        self.batch_sharding = ns(spec_for((None, rows_axis, seq_axis)))
        batch_sh = dict.fromkeys(BATCH_KEYS, self.batch_sharding)
        # image arrays [M, rows, ...]: split with their rows, each row's images whole
        self.image_shardings = {
            k: ns(spec_for((None, rows_axis) + (None,) * (1 if k == "segment" else 2)))
            for k in (IMAGE_KEYS if spec.vision is not None else ())
        }
        batch_sh.update(self.image_shardings)
        self._init_state = jax.jit(self._init_state_fn, out_shardings=self.state_shardings)
        self._init_base = jax.jit(
            self._init_base_fn,
            static_argnums=0,
            out_shardings=(_without_ce(self.frozen_shardings), trainable_sh["params"]),
        )
        self._train_step = jax.jit(
            self._train_step_fn,
            in_shardings=(self.state_shardings, self.frozen_shardings, batch_sh),
            out_shardings=(self.state_shardings, rep),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(
            self._eval_step_fn,
            in_shardings=(self.state_shardings, self.frozen_shardings, batch_sh),
            out_shardings=rep,
        )
        self.weight_flops_per_token = _weight_flops_per_token(spec, abstract, self.predicate)
        self._compiled: dict = {}  # batch shape -> compiled train step
        self._fill_ce = None  # the jitted lora.backward = "ce" factor computation

    # Initialisation -----------------------------------------------------------------------------
    def _init_base_fn(self, seed: int):
        base = Transformer(self.spec.model, self.spec.compute, vision=self.spec.vision)
        params = nn.unbox(init_variables(base, jax.random.key(seed)))["params"]
        frozen, tparams = split_params(params, self.predicate)
        return frozen, jax.tree.map(lambda x: x.astype(jnp.float32), tparams)

    def init_base(self, seed: int):
        """A random base (frozen, trainable params subset) placed on the mesh."""
        frozen, tparams = self._init_base(seed)
        return self._place_frozen(frozen), tparams

    def split_base(self, params):
        """A loaded full parameter tree → (frozen, fp32 trainable subset), on the mesh."""
        frozen, tparams = split_params(params, self.predicate)
        tparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tparams)
        trainable_sh = self.state_shardings["trainable"]["params"]
        return self._place_frozen(frozen), jax.device_put(tparams, trainable_sh)

    def _place_frozen(self, frozen):
        """The frozen base on its shardings; with lora.backward = "ce" also the factors of
        every frozen linear weight (`ce_us`, `ce_vt`, `ce_rnorm`) and routed-expert stack
        (`ce_ust`, `ce_v`, `ce_rnorm`; k2jax/ops/ce_backward.py), computed once from it."""
        if self.spec.lora.backward != "ce":
            return jax.device_put(frozen, self.frozen_shardings)
        if self._fill_ce is None:
            rank = self.spec.lora.ce_rank

            def fill(tree):
                def walk(node, abstract):
                    if not isinstance(abstract, dict):
                        return node
                    out = {k: walk(node[k], v) for k, v in abstract.items() if k in node}
                    if "ce_us" in abstract:  # a dense linear, one stacked layer at a time
                        w, f = node["weight"], functools.partial(ce_factors, rank=rank)
                        us, vt, rnorm = jax.lax.map(f, w) if w.ndim == 3 else f(w)
                        out.update(ce_us=us, ce_vt=vt, ce_rnorm=rnorm)
                    if "ce_ust" in abstract:  # a routed-expert stack, one layer at a time
                        w = node.get("weight")
                        if w is None:
                            w = Int4Weight(node["weight_q"], node["weight_scale"])
                        out.update(grouped_factors(w, rank, abstract["ce_ust"].dtype))
                    return out

                return walk(tree, self.frozen_abstract)

            self._fill_ce = jax.jit(fill, out_shardings=self.frozen_shardings)
        with use_mesh(self.mesh):
            return self._fill_ce(frozen)

    def _init_state_fn(self, key, trainable_params):
        lora_key, rng = jax.random.split(key)
        # Only the LoRA factors and QK-clip factors are outputs: XLA drops the base init.
        v = nn.unbox(init_variables(self.model, jax.random.key(0), lora_rng=lora_key))
        trainable = {"lora": v["lora"], "params": trainable_params}
        zero = jnp.zeros((), jnp.int32)
        state = {
            "step": zero,
            "trainable": trainable,
            "opt_state": self.optimizer.init(trainable),
            "qk_clip": v["qk_clip"],
            "qk_thresholds": unset_thresholds(v["qk_clip"]),
            "rng": jax.random.key_data(rng),
            "nonfinite": {"streak": zero, "total": zero},
        }
        if self.carries_rows:  # the rows are chosen at step 0 (`_carried_rows`)
            state["ce"] = {"rows": v["ce_rows"], "score": v["ce_score"]}
        return state

    def init_state(self, seed: int, trainable_params) -> dict:
        """A fresh train state: LoRA A random (seeded), B zero, QK-clip factors one."""
        return self._init_state(jax.random.key(seed), trainable_params)

    # Steps --------------------------------------------------------------------------------------
    def _apply_loss(self, trainable, qk_clip, frozen, mb, key, ce=None):
        """The loss sums and aux of microbatch `mb`. `ce`: with lora.ce_refresh ≥ 1, the kept
        rows and the probes ({"rows", "score"} as in the state)."""
        variables = {
            "params": merge_params(frozen, trainable["params"]),
            "lora": trainable["lora"],
            "qk_clip": qk_clip,
        }
        if self.carries_rows:
            if ce is None:
                raise ValueError("lora.ce_refresh >= 1: pass the state's 'ce' (kept rows)")
            variables.update(ce_rows=ce["rows"], ce_score=ce["score"])
        # Dropout only in training (a key is given); eval runs the deterministic model.
        rngs = {"dropout": key} if key is not None and self.spec.lora.dropout > 0 else None
        images = {k: mb[k] for k in self.image_shardings} or None
        return self.model.apply(
            variables,
            mb["tokens"],
            mb["targets"],
            mb["loss_mask"],
            mb["positions"],
            mb["segment_ids"],
            z_weight=self.spec.z_loss,
            images=images,
            method=Transformer.loss,
            rngs=rngs,
        )

    def _train_step_fn(self, state, frozen, batch):
        trainable, qk = state["trainable"], state["qk_clip"]
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        # What is differentiated: the trainable leaves, and with lora.ce_refresh ≥ 1 the probes,
        # whose gradient is the step's Σ dY² per kept-row candidate (k2jax/ops/ce_backward.py) —
        # summed over microbatches and replicas like any gradient.
        diff = {"trainable": trainable}
        if self.carries_rows:
            ce, fresh = state["ce"], self._chooses_rows(state["step"])
            rows = self._carried_rows(fresh, ce, frozen)
            diff["score"] = ce["score"]

        def objective(d, mb, key):
            ce_vars = {"rows": rows, "score": d["score"]} if self.carries_rows else None
            sums, aux = self._apply_loss(d["trainable"], qk, frozen, mb, key, ce_vars)
            return sums["loss_sum"] + sums["z_loss_sum"], (sums, aux)

        grad_fn = jax.grad(objective, has_aux=True)

        def micro(carry, xs):
            mb, i = xs
            g, (sums, aux) = grad_fn(diff, mb, jax.random.fold_in(step_key, i))
            acc_g, acc_s, acc_aux = carry
            acc_aux = jax.tree_util.tree_map_with_path(
                lambda p, a, b: jnp.maximum(a, b) if path_keys(p)[-1] in MAX_AUX else a + b,
                acc_aux,
                aux,
            )
            return (_add(acc_g, g), _add(acc_s, sums), acc_aux), None

        M = self.spec.grad_accum
        if M == 1:  # the common case, without the scan (and without tracing the model twice)
            mb = jax.tree.map(lambda x: x[0], batch)
            grads, (sums, aux) = grad_fn(diff, mb, jax.random.fold_in(step_key, 0))
        else:
            first = jax.tree.map(lambda x: x[0], batch)
            _, (sums_abs, aux_abs) = jax.eval_shape(grad_fn, diff, first, step_key)
            aux0 = jax.tree_util.tree_map_with_path(
                lambda p, x: jnp.full(
                    x.shape, -jnp.inf if path_keys(p)[-1] == "max_logit" else 0, x.dtype
                ),
                aux_abs,
            )
            carry0 = (_zeros(diff), _zeros(sums_abs), aux0)
            (grads, sums, aux), _ = jax.lax.scan(micro, carry0, (batch, jnp.arange(M)))
        dy_sq = grads.get("score")
        grads = grads["trainable"]

        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss = sums["loss_sum"] / count
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(sums["z_loss_sum"])
        tau = self.spec.optim.qk_clip_tau
        thresholds = state["qk_thresholds"]

        def update(_):
            updates, opt_state = self.optimizer.update(grads, state["opt_state"], trainable)
            new = optax.apply_updates(trainable, updates)
            if tau is None:
                return new, opt_state, qk, thresholds, jnp.zeros((), jnp.int32)
            thr = set_thresholds(thresholds, aux, tau * logit_scale_factor(self.spec.model))
            new_qk, clipped = update_qk_clip(qk, aux, thr)
            return new, opt_state, new_qk, thr, clipped

        def skip(_):
            return trainable, state["opt_state"], qk, thresholds, jnp.zeros((), jnp.int32)

        new_trainable, opt_state, new_qk, new_thr, clipped = jax.lax.cond(
            finite, update, skip, None
        )
        nf = state["nonfinite"]
        applied = state["step"] - nf["total"]  # updates so far = the optimizer's count
        streak = jnp.where(finite, 0, nf["streak"] + 1)
        total = nf["total"] + (~finite).astype(jnp.int32)
        new_state = {
            "step": state["step"] + 1,
            "trainable": new_trainable,
            "opt_state": opt_state,
            "qk_clip": new_qk,
            "qk_thresholds": new_thr,
            "rng": state["rng"],
            "nonfinite": {"streak": streak, "total": total},
        }
        if self.carries_rows:
            # a choice starts a new sum; a skipped step's (non-finite) gradients are not added
            since = jax.tree.map(lambda a: jnp.where(fresh, 0.0, a), ce["score"])
            score = jax.tree.map(lambda a, g: jnp.where(finite, a + g, a), since, dy_sq)
            new_state["ce"] = {"rows": rows, "score": score}
        max_logits = [a["max_logit"] for a in aux.values()]
        loads = [a["expert_load"].sum(0) for a in aux.values() if "expert_load" in a]
        rounds = [a["exchange_rounds"].max() for a in aux.values() if "exchange_rounds" in a]
        metrics = {
            "loss": loss,
            "z_loss": sums["z_loss_sum"] / count,
            "loss_tokens": sums["count"],
            "tokens": jnp.sum(batch["segment_ids"] > 0, dtype=jnp.int32),  # all hosts' rows
            "grad_norm": grad_norm,
            "lr": self.schedule(applied),
            "max_attention_logit": jnp.max(jnp.stack([m.max() for m in max_logits])),
            "qk_clipped_heads": clipped,
            "expert_load": loads[0] if loads else jnp.zeros((0,), jnp.float32),
            "moe_exchange_rounds": rounds[0] if rounds else jnp.zeros((), jnp.int32),
            "finite": finite,
            "nonfinite_streak": streak,
            "nonfinite_total": total,
        }
        return new_state, metrics

    def _carried_rows(self, fresh, ce, frozen):
        """The kept rows of a step (lora.ce_refresh = N ≥ 1): if `fresh` (a choosing step,
        `_chooses_rows`) chosen afresh by `choose_rows` from the Σ dY² accumulated since the
        last choice and the frozen residual row norms at the same module path, otherwise the
        carried ones."""

        def choose(_):
            def one(path, rows):
                keys = path_keys(path)[:-1]  # the module: <...>/rows, <...>/score, <...>/ce_rnorm
                rnorm = at_path(frozen, keys)["ce_rnorm"]
                return choose_rows(at_path(ce["score"], keys)["score"], rnorm, rows.shape[-1])

            return jax.tree_util.tree_map_with_path(one, ce["rows"])

        return jax.lax.cond(fresh, choose, lambda _: ce["rows"], None)

    def _chooses_rows(self, step):
        """Whether step `step` chooses its kept rows: step 0 (no gradient yet, so by rnorm
        alone), step 1 (from step 0's gradient: the first steps should not run on rnorm's
        choice for a whole period) and every N-th step after it (1 + k·N)."""
        return (step == 0) | ((step - 1) % self.spec.lora.ce_refresh == 0)

    def _eval_step_fn(self, state, frozen, batch):
        def micro(acc, mb):
            sums, _ = self._apply_loss(
                state["trainable"], state["qk_clip"], frozen, mb, None, state.get("ce")
            )
            return _add(acc, sums), None

        zero = jnp.zeros((), jnp.float32)
        init = {"loss_sum": zero, "z_loss_sum": zero, "count": zero}
        sums, _ = jax.lax.scan(micro, init, batch)
        return sums

    def _compiled_train_step(self, state, frozen, batch):
        shape = tuple(batch["tokens"].shape)
        if shape not in self._compiled:
            with use_mesh(self.mesh):
                self._compiled[shape] = self._train_step.lower(state, frozen, batch).compile()
        return self._compiled[shape]

    def compiled_train_step(self, state, frozen, batch) -> jax.stages.Compiled:
        """The compiled train step for this batch shape (compiling it if needed): its
        `memory_analysis()` and `cost_analysis()` are what the planner and benchmarks read."""
        return self._compiled_train_step(state, frozen, batch)

    def prepare(self, state, frozen, batch) -> float:
        """Compiles the train step for this batch shape (ahead of the first step); seconds taken."""
        t0 = time.perf_counter()
        self._compiled_train_step(state, frozen, batch)
        return time.perf_counter() - t0

    def train_step(self, state, frozen, batch):
        """(new state, metrics) — `state` is donated (do not use it afterwards)."""
        return self._compiled_train_step(state, frozen, batch)(state, frozen, batch)

    def eval_step(self, state, frozen, batch):
        """Summed {"loss_sum", "z_loss_sum", "count"} of the batch with dropout off."""
        with use_mesh(self.mesh):
            return self._eval_step(state, frozen, batch)

    # Batches ------------------------------------------------------------------------------------
    def device_batch(self, host_batch: dict) -> dict:
        """This host's rows {key: [rows, T]} → global arrays [M, b, T] sharded over the mesh.
        With a vision tower, the rows' pixel_values and image_grid_thw become the per-row image
        arrays of `row_inputs` ([M, b, ...], split with their rows)."""
        M = self.spec.grad_accum
        arrays = {key: np.asarray(host_batch[key]) for key in BATCH_KEYS}
        shardings = dict.fromkeys(BATCH_KEYS, self.batch_sharding)
        if self.spec.vision is not None:
            missing = [k for k in ("pixel_values", "image_grid_thw") if k not in host_batch]
            if missing:
                raise ValueError(
                    f"a model with a vision tower needs batches with {', '.join(missing)} "
                    "(PackedBatches with images=ImageProcessor)"
                )
            from k2jax.model.vision import row_inputs

            images = row_inputs(
                host_batch["pixel_values"], host_batch["image_grid_thw"], self.spec.vision
            )
            arrays.update({k: images[k] for k in IMAGE_KEYS})
            shardings.update(self.image_shardings)
        out = {}
        for key, x in arrays.items():
            rows = x.shape[0]
            if rows % M:
                raise ValueError(
                    f"{rows} rows per host cannot be split into train.grad_accum={M} microbatches"
                )
            local = x.reshape(M, rows // M, *x.shape[1:])
            global_shape = (M, rows * jax.process_count() // M, *x.shape[1:])
            out[key] = jax.make_array_from_process_local_data(shardings[key], local, global_shape)
        return out

    def step_flops(self, segment_ids: np.ndarray) -> float:
        """Model FLOPs of one train step on a batch with these segment ids (see the docstring)."""
        seg = np.asarray(segment_ids).reshape(-1, segment_ids.shape[-1])
        tokens = int((seg > 0).sum())
        pairs = 0
        for row in seg:
            counts = np.bincount(row[row > 0])
            pairs += int((counts * (counts + 1) // 2).sum())
        c = self.spec.model
        attn = 3 * 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
        return tokens * self.weight_flops_per_token + pairs * c.num_hidden_layers * attn


def _without_ce(tree):
    """A params-shaped tree without lora.backward = "ce"'s factor leaves (what a base holds)."""
    if not isinstance(tree, dict):
        return tree
    return {k: _without_ce(v) for k, v in tree.items() if not k.startswith("ce_")}


def abstract_thresholds(abstract) -> dict:
    """The abstract per-head QK-clip thresholds {stack: [L, H]} of an abstract variable tree."""
    return jax.eval_shape(unset_thresholds, abstract["qk_clip"])


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _zeros(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)


def _weight_flops_per_token(spec: StepSpec, abstract, predicate) -> float:
    """4·N_frozen + 6·N_trainable matmul weights per token (routed experts × K/E)."""
    cfg = spec.model
    expert_share = cfg.num_experts_per_tok / cfg.n_routed_experts
    total = 0.0
    for collection in ("params", "lora"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract[collection])[0]:
            keys = path_keys(path)
            stacked = keys[0] in ("dense_layers", "moe_layers")
            if "embed_tokens" in keys or keys[-1] == "weight_scale":
                continue
            if keys[-1].startswith("ce_"):  # lora.backward = "ce"'s factors: not model weights
                continue
            if leaf.ndim - int(stacked) < 2:  # norms, biases: elementwise, not matmuls
                continue
            n = math.prod(leaf.shape)
            if "experts" in keys and "shared_experts" not in keys:
                n *= expert_share
            trainable = collection == "lora" or predicate(keys)
            total += n * (6 if trainable else 4)
    return total


# MFU's peak, one convention for the trainer and the benchmarks: the *measured* dense bf16 matmul
# ceiling through jax (GPU_NOTES.md: 810 TFLOP/s for an 8192³ matmul on an H100, "use ~800"; the
# H200 has the same tensor cores), which benchmarks/bench_step.py divides by too. The datasheet
# figures stay available as DATASHEET_PEAK_TFLOPS; against them an MFU reads 800/989 = 0.81× as
# high. Kinds never measured here fall back to their datasheet figure, and `peak_source` says so
# (the trainer's metrics record `mfu_peak`). `log.peak_tflops` overrides; unknown kinds (and CPUs)
# report no MFU rather than a wrong one.
PEAK_TFLOPS = {"H200": 800.0, "H100": 800.0, "GH200": 800.0}
DATASHEET_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "B200": 2250.0,
}


def _lookup(table: dict, device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((tflops for name, tflops in table.items() if name in kind), None)


def peak_source(device, override_tflops: float | None = None) -> str | None:
    """Which peak `peak_flops(device, override_tflops)` returns: "log.peak_tflops", "measured"
    (PEAK_TFLOPS), "datasheet" (DATASHEET_PEAK_TFLOPS) or None."""
    if override_tflops is not None:
        return "log.peak_tflops"
    if _lookup(PEAK_TFLOPS, device) is not None:
        return "measured"
    return "datasheet" if _lookup(DATASHEET_PEAK_TFLOPS, device) is not None else None


def peak_flops(
    device, override_tflops: float | None = None, *, datasheet: bool = False
) -> float | None:
    """Peak FLOP/s of one device for MFU: `override_tflops`, else the measured ceiling of its kind,
    else its datasheet figure; with `datasheet=True` always the datasheet figure."""
    if datasheet:
        tflops = _lookup(DATASHEET_PEAK_TFLOPS, device)
    elif override_tflops is not None:
        tflops = override_tflops
    else:
        tflops = _lookup(PEAK_TFLOPS, device) or _lookup(DATASHEET_PEAK_TFLOPS, device)
    return tflops * 1e12 if tflops is not None else None
