"""Where a train step's FLOPs go, counted on a CPU from the program itself (issue 13, item 8).

    .venv/bin/python benchmarks/account_step.py --setup slice --json /tmp/slice.json
    .venv/bin/python benchmarks/account_step.py --setup full8 --json /tmp/full8.json

Setups. `slice` is bench_step.py's case b on one device (configs/kimi_k2_thinking.gin widths, 1
dense + 3 MoE layers, 384 INT4 experts, seq 4096, one row, configs/lora_sft.gin's recipe: LoRA r=16
on every linear, MuonClip, remat "full"). `full8` is the whole Kimi-K2-Thinking on 8 devices (mesh
data 1 × expert 8 × tensor 1, one 4096-token row per device, the recipe's moe_chunk_tokens),
counted per device. `tiny` / `tiny8` are configs/tiny.gin the same ways (tests/test_account_step.py).

Method. The real jitted train step (`Program._train_step`) is traced with abstract inputs, as
`k2jax plan` does — nothing is allocated and nothing is compiled — and its jaxpr is dead-code
eliminated as jit's lowering would be (the LM head's unused weight gradient goes). Every equation
is then visited, recursively into scan / while / cond / jit / remat / custom_vjp / shard_map /
pallas_call bodies: a scan body counts `length` times, a cond its costliest branch, a shard_map
body is per device already, and the rest of a multi-device program is divided by how many ways
its operands are sharded (one sharded dimension per array, propagated from the input shardings
and sharding constraints through elementwise ops, reshapes, transposes, reductions and dots; the
test checks the result against XLA's partitioned program). Loops with a data-dependent trip count
(the exchange's overflow rounds) count zero trips, the common case; one trip is reported apart.
Two kernels are traced in their XLA forms, since the planner's stand-ins (`impl="plan"`) have no
arithmetic: the grouped matmul as `ragged_dot` (gmm_impl "xla") and attention as the cuDNN wrapper
through XLA (attention_impl "dpa_xla": the GPU path's code, the kernel's dense equivalent: q·k and
p·v at head dim Dn + Dr over the full [T, S] square). Pallas kernels are counted by their shapes
(the max-logit kernel: the key blocks a causal query block sees). `einsum_acc` is traced as on a
GPU (bf16 operands, float32 accumulation), not widened to float32 as on a CPU.

Classes. A dot is a *frozen-weight matmul* when one operand derives from frozen base weights only
(dataflow from the step's inputs through casts, reshapes and INT4 dequantisation), sub-classed by
the weight; a *routed-expert GEMM* when it is a ragged dot on the frozen expert stacks; *LoRA*
when an operand derives from trainable factors only, or it shares such a dot's source line (the
backward's weight gradients); *attention*, the *QK-clip max-logit pass* and the *optimizer* by
source location. The rest: elementwise ops (one FLOP per output element), reductions (per input
element), data movement (bytes, no FLOPs), collectives (bytes). Ops inside the XLA forms of the
two kernels (INT4 dequantisation and LoRA epilogue; softmax and masks) are classes of their own:
on a GPU they are inside the kernels.

Routed rows. A ragged dot counts 2·M·K·N over the rows that hold (token, expert) pairs: every row
on one device; under expert parallelism a device's receive buffer has P·C rows (capacity C per
peer) of which n·K are pairs on average (each pair goes to exactly one device), so the count is
scaled by n·K / (P·C) (`flops_array`: unscaled). `tile_padded_flops`: the same with each expert's
rows rounded up to the Pallas kernel's row tile (`gmm_pallas.row_tile`), in expectation over
uniform routing (rows per expert binomial).

Frozen-weight passes: the FLOPs of the matmuls consuming a frozen weight over that weight's model
forward FLOPs (2·tokens·N, × K/E for routed experts): 3 under remat "full" (forward, recompute,
input gradient), 2 without recompute — but 2 for a block's last matmul under "full" (its output
is not needed by the backward) and 3 for the LM head under every policy (the loss recomputes its
logits in its own backward, k2jax/model/loss.py). Model FLOPs are the library's convention
(`Program.step_flops`, k2jax/train/step.py); `executed_over_model` compares the two.

GPU time, a prediction: each class at a rate from /work/shared/GPU_NOTES.md (`RATES` names the
source of each); an equation takes max(FLOPs / rate, bytes / HBM) where the rate alone would hide
that it is memory-bound; attention is priced per forward and backward evaluation at the measured
kernel times; the expert GEMMs on their tile-padded FLOPs; elementwise ops by the bytes of the
fusions XLA would form (chains of fusible ops read their outside inputs and write what leaves the
chain; `*_unfused`: every op on its own, an upper bound); the kernels' internals cost nothing
extra. HBM and link rates (`GPUS`) are assumptions, not measurements. MFU = model FLOPs /
(predicted time × 800 TFLOP/s), the measured bf16 ceiling (`k2jax.train.step.PEAK_TFLOPS`; the
datasheet's 989 is DATASHEET_PEAK_TFLOPS).

Runs in seconds per trace on a 2-core CPU (about a minute per setup with the remat-policy sweep,
which traces the step once per policy).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

# The full8 setup needs 8 devices, simulated on the CPU before jax starts (as `k2jax plan` does).
if "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util
from jax._src.interpreters import partial_eval as pe

import k2jax
from k2jax.config import load_model_config
from k2jax.model.context_parallel import resolve as resolve_context
from k2jax.sharding import make_mesh, use_mesh
from k2jax.train.step import Program

PKG = Path(k2jax.__file__).resolve().parent
SEQ = 4096
MFU_PEAK_TFLOPS = 800.0  # measured bf16 matmul ceiling through jax (GPU_NOTES.md "Ceilings")

# --------------------------------------------------------------------------------------------------
# Classes and GPU rates
# --------------------------------------------------------------------------------------------------

FROZEN = "frozen-weight matmuls"
EXPERT = "routed-expert GEMMs"
LORA = "LoRA matmuls"
ATTN = "attention scores/values"
MAXLOGIT = "QK-clip max-logit pass"
OPT_MM = "optimizer matmuls (Muon NS)"
OPT_EW = "optimizer elementwise"
OTHER_MM = "other matmuls"
ELEMENTWISE = "elementwise"
REDUCTIONS = "reductions"
MOVEMENT = "data movement"
ATTN_INSIDE = "attention softmax/masks (in the kernel on GPU)"
GMM_INSIDE = "expert dequant/LoRA epilogue (in the kernel on GPU)"
COLLECTIVES = "collectives"
CLASSES = (FROZEN, EXPERT, LORA, ATTN, MAXLOGIT, OPT_MM, OPT_EW, OTHER_MM, ELEMENTWISE, REDUCTIONS)
CLASSES += (MOVEMENT, ATTN_INSIDE, GMM_INSIDE, COLLECTIVES)
MATMUL_CLASSES = (FROZEN, EXPERT, LORA, ATTN, MAXLOGIT, OPT_MM, OTHER_MM)

# (TFLOP/s or None for bytes only, where the figure comes from). HBM and link rates are assumed.
FUSED = "bytes at HBM, fused along producer→consumer chains (`*_unfused`: every op on its own)"
RATES = {
    FROZEN: (800.0, "bf16 8192³ matmul through jax: 810 TFLOP/s (GPU_NOTES 'Ceilings')"),
    EXPERT: (
        320.0,
        "naive INT4 Pallas Triton kernel, 128×128 tiles: 320 TFLOP/s, on the tile-"
        "padded FLOPs (GPU_NOTES 'Grouped matmul')",
    ),
    LORA: (800.0, "roofline: 800 TFLOP/s or bytes at HBM (rank 16: memory-bound)"),
    ATTN: (
        None,
        "cuDNN 0.75 ms forward at B=1, S=4096, H=64 causal; backward 2.44 ms (tokamax's "
        "3.0 ms fwd+bwd − 0.56 fwd, the only measured backward); per evaluation",
    ),
    MAXLOGIT: (
        800.0,
        "XLA form (max_logit_blocked): roofline, float32 [B, H, 512, S] logit "
        "blocks written to HBM",
    ),
    OPT_MM: (800.0, "roofline (r×n and r×r products: memory-bound)"),
    OPT_EW: (None, FUSED),
    OTHER_MM: (800.0, "roofline"),
    ELEMENTWISE: (None, FUSED),
    REDUCTIONS: (None, FUSED),
    MOVEMENT: (None, FUSED + "; reshapes are free (bitcasts)"),
    ATTN_INSIDE: (0.0, "inside the cuDNN kernel's time"),
    GMM_INSIDE: (0.0, "inside the grouped-matmul kernel's time"),
    COLLECTIVES: (None, "bytes at the link rate (all_to_all and psum inside shard_map)"),
}
MAXLOGIT_KERNEL = "max-logit kernel"
RATES[MAXLOGIT_KERNEL] = (
    458.0,
    "Pallas kernel (flash forward without softmax and V): priced "
    "at cuDNN's flash forward rate, ~458 TFLOP/s useful (GPU_NOTES 'Attention')",
)
ATTN_FWD_S, ATTN_BWD_S = 0.75e-3, 3.0e-3 - 0.56e-3
ATTN_REF_SHAPE = (1, 64, 4096)  # B, H, S of the measured attention times


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What the time prediction assumes about the device (HBM and link rates are not measured)."""

    name: str
    hbm_tb_s: float
    link_gb_s: float = 370.0  # GPU_NOTES: "plan with ≤ 370" GB/s per direction (NVLink, DeepEP)


GPUS = {
    "slice": Gpu("H100 80GB (GPU_NOTES' machine)", 3.0),
    "tiny": Gpu("H100 80GB (GPU_NOTES' machine)", 3.0),
    "full8": Gpu("8×H200 (HBM 4.8 TB/s nominal)", 4.0),
}
GPUS["tiny8"] = GPUS["full8"]

# --------------------------------------------------------------------------------------------------
# Setups
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    what: str
    program: Program
    rows: int
    seq: int

    @property
    def devices(self) -> int:
        return self.program.mesh.devices.size


def make_setup(
    name: str,
    *,
    remat: str | None = None,
    seq: int | None = None,
    moe_chunk_tokens: int | None = None,
    rows: int | None = None,
    lora: dict | None = None,
) -> Setup:
    """The program of a setup (see the module docstring), with the counting kernels' impls.
    `rows` (default: one per device) fewer than the data × expert shards split each row along
    the sequence (context parallelism, k2jax/model/context_parallel.py)."""
    case = bench_step.CASES["b"]
    if name == "slice":
        cfg, seq, mesh_sizes = bench_step.slice_config(case), seq or SEQ, None
    elif name == "tiny":
        cfg, seq, mesh_sizes = load_model_config("tiny.gin"), seq or 64, None
    elif name in ("full8", "tiny8"):
        cfg = load_model_config(case.preset if name == "full8" else "tiny.gin")
        seq, mesh_sizes = seq or (SEQ if name == "full8" else 64), dict(data=1, expert=8, tensor=1)
    else:
        raise ValueError(f"unknown setup {name!r}")
    spec = bench_step.step_spec(
        cfg, expert_dtype="int4", gmm_impl="xla", attention_impl="dpa_xla", lora=lora
    )
    changes = {}
    if remat is not None:
        changes["remat"] = remat
    if moe_chunk_tokens is not None:
        changes["moe_chunk_tokens"] = moe_chunk_tokens
    rows = rows or (math.prod(mesh_sizes.values()) if mesh_sizes else 1)
    mode = resolve_context("auto", rows // spec.grad_accum, mesh_sizes or {})
    changes["context_parallel"] = mode
    spec = dataclasses.replace(spec, compute=dataclasses.replace(spec.compute, **changes))
    if mesh_sizes is None:
        mesh = make_mesh(devices=jax.devices()[:1])
    else:
        n = math.prod(mesh_sizes.values())
        if jax.device_count() < n:
            raise RuntimeError(f"{name} needs {n} devices; jax has {jax.device_count()}")
        mesh = make_mesh(**mesh_sizes, devices=jax.devices()[:n])
    what = (
        f"{cfg.num_dense_layers}+{cfg.num_moe_layers} layers, {cfg.n_routed_experts} "
        f"{spec.compute.experts} experts, seq {seq}, {rows} row(s), mesh "
        + (
            "1 device"
            if mesh_sizes is None
            else "×".join(f"{k} {v}" for k, v in mesh_sizes.items())
        )
        + f", remat {spec.compute.remat}, moe_chunk_tokens {spec.compute.moe_chunk_tokens}"
        + (f", context parallel {mode!r}" if mode != "none" else "")
    )
    return Setup(name, what, Program(spec, mesh), rows, seq)


def abstract_inputs(setup: Setup):
    """(state, frozen, batch) as ShapeDtypeStructs with the program's shardings."""
    p = setup.program
    sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    state = jax.tree.map(sds, p.state_abstract, p.state_shardings)
    frozen = jax.tree.map(sds, p.frozen_abstract, p.frozen_shardings)
    shape = (p.spec.grad_accum, setup.rows // p.spec.grad_accum, setup.seq)
    batch = {
        k: jax.ShapeDtypeStruct(
            shape, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=p.batch_sharding
        )
        for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    }
    return state, frozen, batch


class _GpuBackend:
    """`jax` as k2jax.ops.einsum sees it while tracing: default_backend() says "gpu", so
    einsum_acc keeps bf16 operands (it widens them to float32 only on a CPU backend)."""

    def __getattr__(self, name):
        return getattr(jax, name)

    @staticmethod
    def default_backend():
        return "gpu"


@contextlib.contextmanager
def _trace_as_gpu(enabled: bool):
    module = sys.modules.get("k2jax.ops.einsum")
    if not enabled or module is None or getattr(module, "jax", None) is not jax:
        yield
        return
    module.jax = _GpuBackend()
    try:
        yield
    finally:
        module.jax = jax


def trace_step(setup: Setup, *, as_gpu: bool = True):
    """(jaxpr, consts, input leaves [(kind, path, abstract, sharding)]) of the DCE'd train step."""
    p = setup.program
    args = abstract_inputs(setup)
    with use_mesh(p.mesh), _trace_as_gpu(as_gpu):
        traced = p._train_step.trace(*args)
    closed = traced.jaxpr
    jaxpr, consts = closed.jaxpr, list(closed.consts)
    jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)
    leaves = []
    for kind, tree in zip(("state", "frozen", "batch"), args):
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            leaves.append((kind, _keys(path), x))
    if len(leaves) != len(jaxpr.invars):
        raise RuntimeError(f"{len(leaves)} input leaves but {len(jaxpr.invars)} jaxpr inputs")
    return jaxpr, consts, leaves


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


# --------------------------------------------------------------------------------------------------
# The walk
# --------------------------------------------------------------------------------------------------

EMPTY = frozenset()
REPL = (1, None)  # (ways sharded, sharded dimension)
_IDENTITY = {"name", "sharding_constraint", "optimization_barrier", "device_put", "copy", "copy_p"}
_MOVEMENT = {
    "convert_element_type", "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims",
    "slice", "dynamic_slice", "dynamic_update_slice", "gather", "scatter", "concatenate", "pad",
    "rev", "iota", "split", "select_and_gather_add", "bitcast_convert_type", "scatter-add",
    "scatter_add", "scatter-mul", "scatter-min", "scatter-max",
}  # fmt: skip
_REDUCTIONS = {
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "reduce_xor", "argmax", "argmin", "cumsum", "cummax", "cummin", "cumprod", "cumlogsumexp",
    "sort", "top_k", "reduce_precision",
}  # fmt: skip
_COLLECTIVES = {"all_to_all", "psum", "pmax", "pmin", "all_gather", "ppermute", "psum_scatter",
                "reduce_scatter", "pbroadcast", "psum_invariant", "ragged_all_to_all"}  # fmt: skip
_NO_COST = {"axis_index", "random_wrap", "random_unwrap", "random_seed", "random_fold_in",
            "random_split", "random_bits", "threefry2x32", "stop_gradient", "pvary"}  # fmt: skip


def _size(aval) -> int:
    return math.prod(getattr(aval, "shape", ()))


def _nbytes(aval) -> float:
    dtype = getattr(aval, "dtype", None)
    if dtype is None or not hasattr(aval, "shape"):
        return 0.0
    try:
        bits = jnp.dtype(dtype).itemsize * 8
    except TypeError:  # key types
        return 0.0
    if jnp.dtype(dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)):
        bits = 4
    return _size(aval) * bits / 8


def _sub_jaxprs(eqn):
    """(param name, Jaxpr, consts) of an equation's sub-programs."""
    out = []
    for key, value in eqn.params.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                out.append((key, v.jaxpr, list(v.consts)))
            elif isinstance(v, jax.extend.core.Jaxpr):
                out.append((key, v, []))
    return out


@dataclasses.dataclass
class Tally:
    flops: float = 0.0
    flops_array: float = 0.0  # ragged dots: over every row of the buffers
    tile_padded_flops: float = 0.0  # routed-expert GEMMs: rows rounded up to the kernel's tiles
    bytes: float = 0.0  # elementwise-type ops: as fused by producer→consumer chains
    bytes_unfused: float = 0.0
    ops: int = 0
    gpu_s: float = 0.0
    gpu_s_unfused: float = 0.0  # the same with every elementwise-type op's bytes unfused

    def add(self, other: Tally):
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class Accountant:
    """Walks a train step's jaxpr and tallies FLOPs, bytes and predicted GPU seconds by class."""

    def __init__(self, setup: Setup, gpu: Gpu):
        self.setup, self.gpu = setup, gpu
        self.tally: dict[tuple[str, str], Tally] = collections.defaultdict(Tally)
        self.weight_flops: dict[str, float] = collections.defaultdict(float)
        self.while_trip = collections.defaultdict(Tally)  # one trip of the data-dependent loops
        self.unknown_ragged: set[int] = set()
        self.unwalked: set[str] = set()
        self._lora_origins: set = set()
        self._frames: dict[int, tuple] = {}
        self._fusion = None
        self.ragged_flops = [0.0, 0.0]  # ragged dots over their buffers; XLA:CPU's expansion
        self.by_source: dict[tuple, float] = collections.defaultdict(float)  # non-dot ops' seconds
        self._rows = _routed_rows(setup)

    # entry ------------------------------------------------------------------------------------
    def run(self, jaxpr, consts, leaves):
        tags, shard = [], []
        for kind, keys, x in leaves:
            if kind == "frozen":
                tags.append(frozenset({"F:" + "/".join(keys)}))
            elif kind == "state" and keys[0] == "trainable":
                tags.append(frozenset({"T"}))
            elif kind == "batch":
                tags.append(frozenset({"D"}))
            else:
                tags.append(frozenset({"S"}))
            shard.append(_input_sharding(x))
        self._walk(jaxpr, consts, tags, shard, mult=1.0, count=True, local=False)
        return self

    # recursion --------------------------------------------------------------------------------
    def _walk(self, jaxpr, consts, tags, shard, *, mult, count, local, trip=None):
        """Visits `jaxpr` with its inputs' tags and shardings; returns the outputs'. `local`: in a
        shard_map body (shapes per device). `trip`: a Tally collecting instead of self.tally."""
        env_t, env_s = {}, {}
        for v in jaxpr.constvars:
            env_t[v], env_s[v] = EMPTY, REPL
        for v, t, s in zip(jaxpr.invars, tags, shard):
            env_t[v], env_s[v] = t, s
        get_t = lambda v: env_t.get(v, EMPTY) if not _is_literal(v) else EMPTY  # noqa: E731
        get_s = lambda v: env_s.get(v, REPL) if not _is_literal(v) else REPL  # noqa: E731
        outer, self._fusion = self._fusion, _fusion_boundaries(jaxpr) if count else None
        for eqn in jaxpr.eqns:
            in_t = [get_t(v) for v in eqn.invars]
            in_s = [get_s(v) for v in eqn.invars]
            out_t, out_s = self._eqn(
                eqn, in_t, in_s, mult=mult, count=count, local=local, trip=trip
            )
            for v, t, s in zip(eqn.outvars, out_t, out_s):
                env_t[v], env_s[v] = t, s
        self._fusion = outer
        return [get_t(v) for v in jaxpr.outvars], [get_s(v) for v in jaxpr.outvars]

    def _eqn(self, eqn, in_t, in_s, *, mult, count, local, trip):
        name = eqn.primitive.name
        kw = dict(count=count, local=local, trip=trip)
        n_out = len(eqn.outvars)
        if name == "scan":
            return self._scan(eqn, in_t, in_s, mult=mult, **kw)
        if name == "while":
            p = eqn.params
            nc, nb = p["cond_nconsts"], p["body_nconsts"]
            body = p["body_jaxpr"]
            carry_t, carry_s = in_t[nc + nb :], in_s[nc + nb :]
            for _ in range(3):  # tags of the carry: a fixpoint
                out_t, out_s = self._walk(
                    body.jaxpr, body.consts, in_t[nc : nc + nb] + carry_t,
                    in_s[nc : nc + nb] + carry_s, mult=mult, count=False, local=local,
                )  # fmt: skip
                new_t = [a | b for a, b in zip(carry_t, out_t)]
                if new_t == carry_t:
                    break
                carry_t, carry_s = new_t, [max(a, b, key=_ways) for a, b in zip(carry_s, out_s)]
            if count:  # one trip, reported apart (the trip count is data-dependent)
                self._walk(
                    body.jaxpr, body.consts, in_t[nc : nc + nb] + carry_t,
                    in_s[nc : nc + nb] + carry_s, mult=mult, count=True, local=local,
                    trip=self.while_trip if trip is None else trip,
                )  # fmt: skip
            return carry_t, carry_s
        if name == "cond":
            branches = eqn.params["branches"]
            results, costs = [], []
            for br in branches:
                probe = self._probe()
                r = probe._walk(br.jaxpr, br.consts, in_t[1:], in_s[1:], mult=mult, **kw)
                results.append((r, probe))
                costs.append(sum(t.flops for t in probe.tally.values()))
            (out_t, out_s), probe = results[int(np.argmax(costs))]  # the costliest branch
            if count:
                self._merge(probe)
            out_t = [frozenset().union(*ts) for ts in zip(*(r[0][0] for r in results))]
            return out_t, out_s
        if name == "shard_map":
            return self._shard_map(eqn, in_t, in_s, mult=mult, **kw)
        if name == "pallas_call":
            return self._pallas(eqn, in_t, in_s, mult=mult, **kw)
        subs = [] if name.startswith("scatter") else _sub_jaxprs(eqn)  # not its combiner
        if subs:  # jit, remat, custom_jvp/vjp calls, eval_jaxpr, ...: one body, inputs 1:1
            _, body, consts = subs[0]
            if len(body.invars) == len(in_t):
                return self._walk(body, consts, in_t, in_s, mult=mult, **kw)
            self.unwalked.add(name)  # counted as one op on its outputs
        out_t = frozenset().union(*in_t) if in_t else EMPTY
        out_s = _propagate(eqn, in_s) if not local else [REPL] * n_out
        if count:
            self._leaf(eqn, in_t, in_s, out_s, mult=mult, local=local, trip=trip)
        return [out_t] * n_out, out_s

    def _scan(self, eqn, in_t, in_s, *, mult, count, local, trip):
        p = eqn.params
        nc, ncar = _scan_split(p)
        length = p["length"]
        body = p["jaxpr"]
        xs_s = [(w, d - 1) if d not in (None, 0) else REPL for w, d in in_s[nc + ncar :]]
        carry_t, carry_s = list(in_t[nc : nc + ncar]), list(in_s[nc : nc + ncar])
        args = lambda ct, cs: (in_t[:nc] + ct + in_t[nc + ncar :], in_s[:nc] + cs + xs_s)  # noqa: E731
        for _ in range(4):
            out_t, out_s = self._walk(body.jaxpr, body.consts, *args(carry_t, carry_s),
                                      mult=mult, count=False, local=local)  # fmt: skip
            new_t = [a | b for a, b in zip(carry_t, out_t[:ncar])]
            new_s = [max(a, b, key=_ways) for a, b in zip(carry_s, out_s[:ncar])]
            if new_t == carry_t and new_s == carry_s:
                break
            carry_t, carry_s = new_t, new_s
        if count:
            out_t, out_s = self._walk(body.jaxpr, body.consts, *args(carry_t, carry_s),
                                      mult=mult * length, count=True, local=local, trip=trip)  # fmt: skip
        ys_s = [(w, d + 1) if d is not None else REPL for w, d in out_s[ncar:]]
        return carry_t + out_t[ncar:], carry_s + ys_s

    def _shard_map(self, eqn, in_t, in_s, *, mult, count, local, trip):
        body = eqn.params["jaxpr"]
        consts = []
        if isinstance(body, jax.extend.core.ClosedJaxpr):
            body, consts = body.jaxpr, list(body.consts)
        out_t, _ = self._walk(body, consts, in_t, [REPL] * len(in_t), mult=mult, count=count,
                              local=True, trip=trip)  # fmt: skip
        mesh = eqn.params["mesh"]
        out_s = [_spec_sharding(spec, mesh) for spec in eqn.params["out_specs"]]
        return out_t, out_s

    def _pallas(self, eqn, in_t, in_s, *, mult, count, local, trip):
        """A Pallas kernel, by its shapes: its body's dot FLOPs × its grid. The max-logit kernel
        loops over the key blocks a query block can see (a data-dependent trip count): those are
        counted for a causal mask, Σ over query blocks of ceil(last visible key / bk)."""
        name = str(
            eqn.params.get("name") or getattr(eqn.params.get("name_and_src_info"), "name", "")
        )
        grid = tuple(getattr(eqn.params.get("grid_mapping"), "grid", ()) or (1,))
        body = eqn.params["jaxpr"]
        out = frozenset().union(*in_t) if in_t else EMPTY
        if not count:
            return [out] * len(eqn.outvars), [REPL] * len(eqn.outvars)
        ways = 1 if local else max(_ways(s) for s in (*in_s, REPL))
        probe = self._probe()
        probe._walk(body, [], [EMPTY] * len(body.invars), [REPL] * len(body.invars),
                    mult=1.0, count=True, local=True)  # fmt: skip
        dots = lambda tally: sum(v.flops for k, v in tally.items() if k[0] in MATMUL_CLASSES)  # noqa: E731
        flops = dots(probe.tally) * math.prod(grid)
        loop = dots(probe.while_trip)
        if loop and "max_logit" in name:
            q_nope, _, k_nope = (v.aval for v in eqn.invars[:3])
            B, T, H, _ = q_nope.shape
            S = k_nope.shape[1]
            bq = -(-T // grid[0])
            bk = _loop_dot_rows(body)
            trips = (
                B
                * H
                * sum(min(-(-min((i + 1) * bq, T) // bk), -(-S // bk)) for i in range(grid[0]))
            )
            flops += trips * loop
            key, rate = (MAXLOGIT, "kernel"), RATES[MAXLOGIT_KERNEL][0]
        else:
            key, rate = (OTHER_MM, f"pallas_call {name}"), RATES[OTHER_MM][0]
            self.while_trip[key].add(Tally(flops=loop * math.prod(grid) * mult / ways))
        t = Tally(flops=flops * mult / ways, ops=1)
        t.flops_array = t.flops
        nbytes = sum(_nbytes(v.aval) for v in (*eqn.invars, *eqn.outvars))
        t.bytes = nbytes * mult / ways
        t.gpu_s = t.gpu_s_unfused = self._roofline(t.flops, t.bytes, rate)
        t.bytes_unfused = t.bytes
        self._add(key, t, trip)
        return [out] * len(eqn.outvars), [REPL] * len(eqn.outvars)

    def _probe(self) -> Accountant:
        """An accountant sharing this one's caches, with empty tallies."""
        probe = Accountant.__new__(Accountant)
        probe.__dict__.update(self.__dict__)
        probe.tally = collections.defaultdict(Tally)
        probe.weight_flops = collections.defaultdict(float)
        probe.while_trip = collections.defaultdict(Tally)
        return probe

    def _merge(self, other: Accountant):
        for k, v in other.tally.items():
            self.tally[k].add(v)
        for k, v in other.weight_flops.items():
            self.weight_flops[k] += v
        for k, v in other.while_trip.items():
            self.while_trip[k].add(v)

    def _add(self, key, t: Tally, trip):
        """Into the tallies, or into `trip` (one trip of a data-dependent loop, by class)."""
        if trip is None:
            self.tally[key].add(t)
        else:
            trip[key].add(t)

    # one primitive ----------------------------------------------------------------------------
    def _leaf(self, eqn, in_t, in_s, out_s, *, mult, local, trip):
        name = eqn.primitive.name
        if name in _IDENTITY or name in _NO_COST:
            return
        ways = 1 if local else max(_ways(s) for s in (*in_s, *out_s, REPL))
        scale = mult / ways
        avals_in = [v.aval for v in eqn.invars]
        avals_out = [v.aval for v in eqn.outvars]
        nbytes = sum(_nbytes(a) for a in avals_in) + sum(_nbytes(a) for a in avals_out)
        frames = self._origin(eqn)
        where = _where(frames)
        t = Tally(bytes=nbytes * scale, bytes_unfused=nbytes * scale, ops=1)
        rate = None
        if name == "dot_general" or "ragged_dot" in name:
            flops, m_rows, groups = _dot_flops(eqn)
            frozen = [x for x in in_t[:2] if x and all(s.startswith("F:") for s in x)]
            trainable = any(x == frozenset({"T"}) for x in in_t[:2])
            origin = frames[:1]
            real = 1.0
            if m_rows is not None:  # a ragged dot: scale to the rows that hold pairs
                real = self._rows.get(m_rows)
                if real is None:
                    self.unknown_ragged.add(m_rows)
                    real = 1.0
            t.flops, t.flops_array = flops * real * scale, flops * scale
            if m_rows is not None and trip is None:  # XLA:CPU runs a ragged dot for every group
                self.ragged_flops[0] += flops * scale
                self.ragged_flops[1] += flops * scale * eqn.invars[2].aval.shape[0]
            if where == "attention":
                key = (ATTN, "")
            elif where == "max_logit":
                key = (MAXLOGIT, "")
            elif where == "optimizer":
                key = (OPT_MM, "")
            elif frozen:
                leaves = sorted(frozen[0])
                weight = _weight_name(leaves[0][2:])
                routed = m_rows is not None
                key = (
                    (EXPERT, weight.rsplit("/", 1)[-1])
                    if routed
                    else (FROZEN, _weight_group(weight))
                )
                if trip is None:
                    self.weight_flops[weight] += t.flops
                if routed and groups:
                    t.tile_padded_flops = t.flops * _tile_factor(real * m_rows, groups, m_rows)
                    rate = RATES[EXPERT][0]
            elif trainable or origin in self._lora_origins:
                self._lora_origins.add(origin)
                key = (LORA, "routed experts" if m_rows is not None else "linears")
            else:
                key = (OTHER_MM, frames[0][1] if frames else "")
            if rate is None:
                rate = RATES[key[0]][0]
            if key[0] == EXPERT:
                t.gpu_s = t.tile_padded_flops / (rate * 1e12)
            else:
                t.gpu_s = self._roofline(t.flops, t.bytes, rate)
            t.gpu_s_unfused = t.gpu_s
            self._add(key, t, trip)
            return
        if name in _COLLECTIVES:
            axes = eqn.params.get("axes", eqn.params.get("axis_name", ()))
            axes = axes if isinstance(axes, (tuple, list)) else (axes,)
            shape = self.setup.program.mesh.shape
            peers = math.prod(shape.get(a, 1) for a in axes if isinstance(a, str))
            if peers == 1:
                return  # over mesh axes of size 1: no traffic
            # bytes leaving a device: all_to_all keeps its own block; a ring all-reduce sends
            # 2·(P−1)/P of the buffer
            share = 2 * (peers - 1) / peers if name.startswith("psum") else (peers - 1) / peers
            t.bytes = sum(_nbytes(a) for a in avals_in) * scale * share
            t.gpu_s = t.gpu_s_unfused = t.bytes / (self.gpu.link_gb_s * 1e9)
            t.flops_array = 0.0
            self._add((COLLECTIVES, name), t, trip)
            return
        if name in _MOVEMENT:
            cls, t.flops = MOVEMENT, 0.0
        elif name in _REDUCTIONS:
            cls, t.flops = REDUCTIONS, sum(_size(a) for a in avals_in[:1]) * scale
        else:
            cls, t.flops = ELEMENTWISE, sum(_size(a) for a in avals_out) * scale
        if where == "" and self._is_score_shaped(avals_in + avals_out):
            where = "attention"  # jax's own ops inside dot_product_attention's backward
        if where == "attention":
            cls = ATTN_INSIDE
        elif where == "gmm":
            cls = GMM_INSIDE
        elif where == "max_logit":
            cls = MAXLOGIT
        elif where == "optimizer":
            cls = OPT_EW
        t.flops_array = t.flops
        if _fusible(eqn):
            t.bytes = _fused_bytes(eqn, self._fusion) * scale
        rate = RATES[cls][0]
        if rate != 0.0:
            t.gpu_s = self._roofline(t.flops, t.bytes, rate)
            t.gpu_s_unfused = self._roofline(t.flops, t.bytes_unfused, rate)
        if trip is None:
            src = f"{frames[0][0]}:{frames[0][1]}" if frames else "(no k2jax frame)"
            self.by_source[(cls, name, src)] += t.gpu_s
        self._add((cls, name if cls in (MOVEMENT, REDUCTIONS) else ""), t, trip)

    def _is_score_shaped(self, avals) -> bool:
        """Has an operand the shape of attention scores (heads, queries, keys: H, T, T)?"""
        H, T = self.setup.program.spec.model.num_attention_heads, self.setup.seq
        for a in avals:
            shape = list(getattr(a, "shape", ()))
            if shape.count(T) >= 2 and H in shape and (H != T or shape.count(T) >= 3):
                return True
        return False

    def _roofline(self, flops, nbytes, tflops):
        compute = flops / (tflops * 1e12) if tflops else 0.0
        return max(compute, nbytes / (self.gpu.hbm_tb_s * 1e12))

    def _origin(self, eqn) -> tuple:
        """The equation's frames in the k2jax package, innermost first: (file, function, line);
        optax's frames as ("optax", function, 0)."""
        tb = eqn.source_info.traceback
        key = id(tb)
        if key not in self._frames:
            frames = []
            for f in source_info_util.user_frames(tb) if tb is not None else ():
                path = f.file_name
                if path.startswith(str(PKG)):
                    frames.append((os.path.relpath(path, PKG), f.function_name, f.start_line))
                elif "/optax/" in path:
                    frames.append(("optax", f.function_name, 0))
            self._frames[key] = (tuple(frames), tb)  # keep tb alive: ids are not reused
        return self._frames[key][0]


_SLICING = {"slice", "dynamic_slice", "gather"}  # read what they extract, not their operand


def _fusible(eqn) -> bool:
    name = eqn.primitive.name
    if name == "dot_general" or "ragged_dot" in name or name in _COLLECTIVES or name in _IDENTITY:
        return False
    return name not in ("sort", "top_k") and not _sub_jaxprs(eqn) and name != "pallas_call"


_BITCASTS = {"reshape", "squeeze", "expand_dims"}  # free on a GPU (row-major bitcasts)


def _fusion_boundaries(jaxpr):
    """(vars made by fusible ops, vars read by a non-fusible op or returned, bitcast aliases) of
    one body: XLA fuses chains of elementwise ops, casts, broadcasts, slices and reductions into
    one kernel that reads its chain's outside inputs and writes what leaves the chain; reshapes
    are bitcasts, transparent to both."""
    alias = {}
    root = lambda v: alias.get(v, v)  # noqa: E731
    made, leaving = set(), set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _BITCASTS and not _is_literal(eqn.invars[0]):
            alias[eqn.outvars[0]] = root(eqn.invars[0])
        elif _fusible(eqn):
            made.update(eqn.outvars)
        else:
            leaving.update(root(v) for v in eqn.invars if not _is_literal(v))
    leaving.update(root(v) for v in jaxpr.outvars if not _is_literal(v))
    return made, leaving, alias


def _fused_bytes(eqn, fusion) -> float:
    """An elementwise-type op's share of its fusion's HBM traffic: inputs made outside the chain
    (slicing ops: the part they read) and outputs that leave it."""
    if fusion is None or eqn.primitive.name in _BITCASTS:
        return 0.0
    made, leaving, alias = fusion
    out = sum(_nbytes(v.aval) for v in eqn.outvars if v in leaving)
    if eqn.primitive.name in _SLICING:
        reads = sum(_nbytes(v.aval) for v in eqn.outvars)
        return out + (reads if alias.get(eqn.invars[0], eqn.invars[0]) not in made else 0.0)
    ins = [v for v in eqn.invars if not _is_literal(v) and alias.get(v, v) not in made]
    if eqn.primitive.name in ("dynamic_update_slice", "scatter", "scatter-add", "scatter_add"):
        ins = ins[1:]  # in place: the updates are read, the operand is not
    return out + sum(_nbytes(v.aval) for v in ins)


def _loop_dot_rows(jaxpr) -> int:
    """Rows of the right operand of the first dot inside a loop of a kernel body (its key tile)."""
    for eqn in jaxpr.eqns:
        for _, sub, _ in _sub_jaxprs(eqn):
            for e in sub.eqns:
                if e.primitive.name == "dot_general":
                    return e.invars[1].aval.shape[0]
            rows = _loop_dot_rows(sub)
            if rows:
                return rows
    return 0


def _scan_split(params) -> tuple[int, int]:
    """(consts, carries) of a scan's inputs (jax ≤ 0.11: num_consts/num_carry; 0.12: ft_in)."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()
    return len(list(consts)), len(list(carry))


def _is_literal(v) -> bool:
    return isinstance(v, jax.extend.core.Literal)


def _where(frames) -> str:
    """Which kernel or phase an equation belongs to, from its source frames."""
    for file, func, _ in frames:
        if file == "optax" or file.startswith("optim/") or func.endswith("<locals>.update"):
            return "optimizer"
        if func.startswith("max_logit"):
            return "max_logit"
        if file == "ops/attention.py" and func.startswith(("attention_dpa", "attention_reference")):
            return "attention"
        if file == "ops/grouped_matmul.py" or (file == "quant.py" and func == "dequantize"):
            return "gmm"
    return ""


def _dot_flops(eqn) -> tuple[float, int | None, int | None]:
    """(2·MACs, ragged rows or None, groups or None) of a dot_general or ragged dot."""
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    if eqn.primitive.name == "dot_general":
        (_, rc), (_, rb) = eqn.params["dimension_numbers"]
        free_rhs = math.prod(d for i, d in enumerate(rhs.shape) if i not in (*rc, *rb))
        return 2.0 * _size(lhs) * free_rhs, None, None
    dn = eqn.params.get("ragged_dot_dimension_numbers")
    if dn is None:  # jax.lax.ragged_dot: lhs [M, K], rhs [G, K, N]
        return 2.0 * _size(lhs) * rhs.shape[-1], lhs.shape[0], rhs.shape[0]
    (_, rc), (_, rb) = dn.dot_dimension_numbers
    group = tuple(dn.rhs_group_dimensions)
    free_rhs = math.prod(d for i, d in enumerate(rhs.shape) if i not in (*rc, *rb, *group))
    m = lhs.shape[dn.lhs_ragged_dimensions[0]]
    groups = rhs.shape[group[0]] if group else None
    return 2.0 * _size(lhs) * free_rhs, m, groups


def _weight_name(path: str) -> str:
    parts = path.split("/")
    return "/".join(parts[:-1]) if parts[-1] in ("weight", "weight_q", "weight_scale") else path


def _weight_group(weight: str) -> str:
    if "lm_head" in weight:
        return "LM head"
    if "self_attn" in weight:
        return "attention projections"
    if "shared_experts" in weight:
        return "shared experts"
    if weight.endswith("mlp/gate"):
        return "router"
    if "dense_layers" in weight:
        return "dense MLP"
    return weight


# --------------------------------------------------------------------------------------------------
# Sharding: one sharded dimension per array, outside shard_map
# --------------------------------------------------------------------------------------------------


def _ways(s) -> int:
    return s[0]


def _spec_sharding(spec, mesh) -> tuple[int, int | None]:
    """(ways, dim) of a PartitionSpec on `mesh`: the first sharded dimension's mesh-axis product."""
    if spec is None:
        return REPL
    for dim, names in enumerate(spec):
        if names is None:
            continue
        names = names if isinstance(names, (tuple, list)) else (names,)
        ways = math.prod(mesh.shape[n] for n in names)
        if ways > 1:
            return (ways, dim)
    return REPL


def _input_sharding(x) -> tuple[int, int | None]:
    s = getattr(x, "sharding", None)
    spec = getattr(s, "spec", None)
    return _spec_sharding(spec, s.mesh) if spec is not None else REPL


def _propagate(eqn, in_s) -> list:
    """The outputs' (ways, dim), from the inputs' — a rough GSPMD: elementwise ops keep the
    sharded dimension, reshapes/transposes/reductions/dots move or drop it, constraints set it."""
    name, p = eqn.primitive.name, eqn.params
    outs = eqn.outvars
    n_out = len(outs)
    ranks = [len(getattr(v.aval, "shape", ())) for v in outs]
    sharded = [(s, v) for s, v in zip(in_s, eqn.invars) if s[0] > 1]
    if name == "sharding_constraint":
        sh = p.get("sharding")
        return [_spec_sharding(getattr(sh, "spec", None), sh.mesh) if sh is not None else in_s[0]]
    if not sharded:
        return [REPL] * n_out
    best, var = max(sharded, key=lambda sv: sv[0][0])
    ways, dim = best
    in_shape = getattr(var.aval, "shape", ())
    out_shape = getattr(outs[0].aval, "shape", ())
    if name == "dot_general":
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        lhs_rank = len(eqn.invars[0].aval.shape)
        cands = []
        for side, (s, v) in enumerate(zip(in_s[:2], eqn.invars[:2])):
            if s[0] <= 1:
                continue
            c, b = (lc, lb) if side == 0 else (rc, rb)
            if s[1] in c:
                continue  # contracted: a partial sum, all-reduced
            if s[1] in b:
                cands.append((s[0], list(b).index(s[1])))
                continue
            free = [i for i in range(len(v.aval.shape)) if i not in (*c, *b)]
            offset = len(b) + (0 if side == 0 else lhs_rank - len(lc) - len(lb))
            cands.append((s[0], offset + free.index(s[1])))
        return [max(cands, key=_ways) if cands else REPL]
    if name in ("transpose",):
        return [(ways, list(p["permutation"]).index(dim))]
    if name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin",
                "reduce_and", "reduce_or"):  # fmt: skip
        axes = p.get("axes", ())
        if dim in axes:
            return [REPL] * n_out
        return [(ways, dim - sum(a < dim for a in axes))] * n_out
    if name == "broadcast_in_dim":
        return [(ways, p["broadcast_dimensions"][dim])]
    if name == "squeeze":
        dims = p["dimensions"]
        return [(ways, dim - sum(d < dim for d in dims))] if dim not in dims else [REPL]
    if name == "expand_dims":
        return [(ways, dim + sum(d <= dim for d in p["dimensions"]))]
    if name == "reshape":
        return [_reshape_dim(in_shape, out_shape, ways, dim)]
    if name in ("gather", "dynamic_slice", "dynamic_update_slice", "scatter", "scatter-add",
                "scatter_add"):  # fmt: skip
        return [(ways, dim) if r > dim else REPL for r in ranks]
    # elementwise and the rest: the sharded operand's dimension, if the output has it
    return [(ways, dim) if r == len(in_shape) and r > dim else REPL for r in ranks]


def _reshape_dim(in_shape, out_shape, ways, dim):
    """The output dimension that starts where the sharded input dimension starts (size-1
    dimensions skipped), or the one that contains that start if its size still splits."""
    start = math.prod(in_shape[:dim])
    acc = 1
    for j, d in enumerate(out_shape):
        if acc == start and d > 1:
            return (ways, j)
        if acc < start < acc * d:
            return (ways, j) if d % ways == 0 else REPL
        acc *= d
    return REPL


# --------------------------------------------------------------------------------------------------
# Routed rows and tiles
# --------------------------------------------------------------------------------------------------


def _routed_rows(setup: Setup) -> dict[int, float]:
    """{rows of a ragged dot's buffer: the fraction of them that hold (token, expert) pairs}."""
    p = setup.program
    cfg, compute = p.spec.model, p.spec.compute
    K, n_dev = cfg.num_experts_per_tok, setup.devices
    tokens = setup.rows // p.spec.grad_accum * setup.seq  # per microbatch, all devices
    if n_dev == 1:
        return {tokens * K: 1.0}
    n = tokens // n_dev
    chunk = compute.moe_chunk_tokens if 0 < compute.moe_chunk_tokens < n else n
    try:  # capacity blocks (issue 12): P·C rows for the n·K pairs of each sub-chunk
        from k2jax.model.expert_parallel import capacity
        from k2jax.sharding.rules import mesh_axes

        n_ep = math.prod(p.mesh.shape[a] for a in mesh_axes("experts"))
        k = compute.moe_overlap_chunks
        pairs = chunk // (k if 0 < k <= chunk and chunk % k == 0 else 1) * K
        rows = n_ep * capacity(pairs, n_ep, compute.moe_capacity_factor)
    except ImportError:  # the padded dispatch before it: P·A rows for A pairs
        n_ep = p.mesh.shape["expert"] * p.mesh.shape["tensor"]
        pairs = chunk * K
        rows = n_ep * pairs
    return {rows: pairs / rows}


def _tile_factor(real_rows: float, groups: int, buffer_rows: int) -> float:
    """E[Σ_g ceil(X_g/bm)·bm] / real_rows with X_g ~ Binomial(real_rows, 1/groups): the MMA rows
    of the Pallas kernel's group-aligned row tiles (bm = gmm_pallas.row_tile of the buffer)."""
    try:
        from k2jax.ops.gmm_pallas import row_tile

        bm = row_tile(buffer_rows, groups)
    except ImportError:
        bm = 128
    n, q = round(real_rows), 1.0 / groups
    if groups == 1 or n == 0:
        return math.ceil(n / bm) * bm / max(n, 1)
    mean = n * q
    sd = math.sqrt(n * q * (1 - q)) or 1.0
    ks = np.arange(max(0, int(mean - 12 * sd)), min(n, int(mean + 12 * sd) + 2) + 1)
    logp = (
        np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in ks])
        + ks * math.log(q)
        + (n - ks) * math.log1p(-q)
    )
    prob = np.exp(logp)
    expected = float((prob * np.ceil(ks / bm) * bm).sum() / prob.sum())
    return groups * expected / real_rows


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def account(setup: Setup, *, gpu: Gpu | None = None, as_gpu: bool = True) -> dict:
    """The accounting of one setup: classes, frozen-weight passes, model FLOPs, predicted time."""
    gpu = gpu or GPUS[setup.name]
    t0 = time.perf_counter()
    jaxpr, consts, leaves = trace_step(setup, as_gpu=as_gpu)
    trace_s = time.perf_counter() - t0
    acc = Accountant(setup, gpu).run(jaxpr, consts, leaves)
    p, cfg = setup.program, setup.program.spec.model
    n_dev = setup.devices
    tokens = setup.rows * setup.seq // n_dev  # per device
    seg = np.ones((setup.rows, setup.seq), np.int32)
    model = p.step_flops(seg) / n_dev

    # Attention: evaluations from the counted FLOPs (the dpa_xla form: q·k and p·v at the padded
    # head dim, full square), priced at the measured kernel times.
    att = acc.tally.get((ATTN, ""), Tally())
    B, H, T = setup.rows // n_dev, cfg.num_attention_heads, setup.seq
    d = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    one_fwd = 4.0 * B * H * T * T * d * cfg.num_hidden_layers
    evals = att.flops / one_fwd if one_fwd else 0.0
    fwd_evals = evals - 2.0  # one backward = 2 forwards' dots (dq, dk, dv, dp)
    ref_b, ref_h, ref_s = ATTN_REF_SHAPE
    scale = (B * H * T * T) / (ref_b * ref_h * ref_s * ref_s) * cfg.num_hidden_layers
    if att.flops:
        att.gpu_s = att.gpu_s_unfused = scale * (fwd_evals * ATTN_FWD_S + ATTN_BWD_S)

    classes = {}
    for (cls, sub), t in sorted(acc.tally.items(), key=lambda kv: CLASSES.index(kv[0][0])):
        keys = ("flops", "bytes", "bytes_unfused", "gpu_s", "gpu_s_unfused", "ops")
        entry = classes.setdefault(cls, dict.fromkeys(keys, 0.0))
        for k in keys:
            entry[k] += getattr(t, k)
        entry["flops_array"] = entry.get("flops_array", 0.0) + t.flops_array
        if t.tile_padded_flops:
            entry["tile_padded_flops"] = entry.get("tile_padded_flops", 0.0) + t.tile_padded_flops
        if sub:
            entry.setdefault("parts", {})[sub] = {"flops": t.flops, "gpu_s": t.gpu_s}
    for c in classes.values():
        if math.isclose(c["flops_array"], c["flops"], rel_tol=1e-12):
            del c["flops_array"]  # only where buffers hold padding rows
    total = sum(c["flops"] for c in classes.values())
    matmul = sum(classes[c]["flops"] for c in MATMUL_CLASSES if c in classes)
    gpu_s = sum(c["gpu_s"] for c in classes.values())
    gpu_s_unfused = sum(c["gpu_s_unfused"] for c in classes.values())
    passes = frozen_passes(acc, setup)
    return {
        "setup": setup.name,
        "what": setup.what,
        "devices": n_dev,
        "tokens_per_device": tokens,
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "k2jax_path": str(PKG),
        "remat": p.spec.compute.remat,
        "trace_s": trace_s,
        "count_s": time.perf_counter() - t0 - trace_s,
        "classes": classes,
        "executed_flops": total,
        "executed_matmul_flops": matmul,
        "model_flops": model,
        "model_flops_per_token": model / tokens,
        "weight_flops_per_token": p.weight_flops_per_token,
        "executed_over_model": total / model,
        "executed_matmul_over_model": matmul / model,
        "frozen_weight_passes": passes,
        "attention_evaluations_per_layer": {"forward": fwd_evals, "backward": 1.0},
        "data_dependent_loop_one_trip_flops": sum(t.flops for t in acc.while_trip.values()),
        "unrecognised_ragged_rows": sorted(acc.unknown_ragged),
        "unwalked_subprograms": sorted(acc.unwalked),
        # what XLA:CPU executes for the ragged dots: a dense expansion over every group (for
        # comparisons with a CPU compile only; the GPU kernel does not expand)
        "ragged_dot_buffer_flops": acc.ragged_flops[0],
        "ragged_dense_expansion_flops": acc.ragged_flops[1],
        "top_non_matmul_gpu_s": [
            {"class": c, "op": op, "source": src, "gpu_s": v}
            for (c, op, src), v in sorted(acc.by_source.items(), key=lambda kv: -kv[1])[:15]
        ],
        "gpu": dataclasses.asdict(gpu),
        "rates": {k: v[1] for k, v in RATES.items()},
        "predicted_step_s": gpu_s,
        "predicted_step_s_unfused": gpu_s_unfused,
        "mfu_peak_tflops": MFU_PEAK_TFLOPS,
        "predicted_mfu": model / (gpu_s * MFU_PEAK_TFLOPS * 1e12) if gpu_s else None,
        "predicted_mfu_unfused": model / (gpu_s_unfused * MFU_PEAK_TFLOPS * 1e12),
    }


def frozen_passes(acc: Accountant, setup: Setup) -> dict:
    """Matmul FLOPs consuming each frozen weight over its model forward FLOPs, by group."""
    p = setup.program
    cfg = p.spec.model
    tokens = setup.rows * setup.seq / setup.devices
    share = cfg.num_experts_per_tok / cfg.n_routed_experts
    sizes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(p.frozen_abstract)[0]:
        keys = _keys(path)
        if keys[-1] == "weight_scale" or leaf.ndim - int(keys[0].endswith("_layers")) < 2:
            continue
        name = _weight_name("/".join(keys))
        routed = "experts" in keys and "shared_experts" not in keys
        sizes[name] = 2.0 * tokens * math.prod(leaf.shape) * (share if routed else 1.0)
    per_weight = {w: acc.weight_flops.get(w, 0.0) / f for w, f in sizes.items() if "embed" not in w}
    groups = collections.defaultdict(list)
    for w, v in per_weight.items():
        routed = "experts/" in w and "shared_experts" not in w
        groups["routed experts" if routed else _weight_group(w)].append((v, sizes[w]))
    return {
        "groups": {
            g: {
                "passes": sum(v * f for v, f in vals) / sum(f for _, f in vals),
                "min": min(v for v, _ in vals),
                "max": max(v for v, _ in vals),
            }
            for g, vals in sorted(groups.items())
        },
        "per_weight": per_weight,
    }


def policy_passes(name: str, policies=None, **kw) -> dict:
    """Frozen-weight passes per group for every remat policy (one trace each)."""
    from k2jax.model.options import REMAT_POLICIES

    out = {}
    for policy in policies or REMAT_POLICIES:
        setup = make_setup(name, remat=policy, **kw)
        jaxpr, consts, leaves = trace_step(setup)
        acc = Accountant(setup, GPUS["slice"]).run(jaxpr, consts, leaves)
        out[policy] = {g: v["passes"] for g, v in frozen_passes(acc, setup)["groups"].items()}
    return out


def table(rec: dict) -> str:
    """The class table of one record, plain text."""
    model = rec["model_flops"]
    lines = [
        f"{rec['setup']}: {rec['what']} — per device, remat {rec['remat']}",
        f"{'class':<52}{'TFLOP':>10}{'× model':>9}{'GPU ms':>9}",
    ]
    for cls, c in rec["classes"].items():
        extra = ""
        if "tile_padded_flops" in c:
            extra = f"  (tile-padded {c['tile_padded_flops'] / 1e12:.2f})"
        if "flops_array" in c:
            extra += f"  (buffer rows {c['flops_array'] / 1e12:.2f})"
        lines.append(
            f"{cls:<52}{c['flops'] / 1e12:10.3f}{c['flops'] / model:9.3f}"
            f"{c['gpu_s'] * 1e3:9.2f}{extra}"
        )
        if cls in (FROZEN, EXPERT, LORA, COLLECTIVES):
            for sub, s in c.get("parts", {}).items():
                lines.append(f"  {sub:<50}{s['flops'] / 1e12:10.3f}{'':9}{s['gpu_s'] * 1e3:9.2f}")
    lines += [
        f"{'executed total':<52}{rec['executed_flops'] / 1e12:10.3f}"
        f"{rec['executed_over_model']:9.3f}{rec['predicted_step_s'] * 1e3:9.2f}",
        f"{'model FLOPs (Program.step_flops)':<52}{model / 1e12:10.3f}{1:9.3f}",
        f"model FLOPs per token {rec['model_flops_per_token'] / 1e9:.2f} G; executed matmuls "
        f"{rec['executed_matmul_over_model']:.3f}× model",
        f"predicted step {rec['predicted_step_s'] * 1e3:.1f} ms → MFU "
        f"{100 * rec['predicted_mfu']:.1f}% vs {rec['mfu_peak_tflops']:.0f} TFLOP/s "
        f"(elementwise ops unfused: {rec['predicted_step_s_unfused'] * 1e3:.1f} ms, "
        f"{100 * rec['predicted_mfu_unfused']:.1f}%)",
        "frozen-weight passes: "
        + ", ".join(
            f"{g} {v['passes']:.2f}" for g, v in rec["frozen_weight_passes"]["groups"].items()
        ),
    ]
    lines.append(
        "largest non-matmul ops (GPU ms, op, source): "
        + "; ".join(
            f"{x['gpu_s'] * 1e3:.1f} {x['op']} {x['source']}"
            for x in rec["top_non_matmul_gpu_s"][:5]
        )
    )
    if rec.get("passes_by_policy"):
        lines.append("passes by remat policy:")
        for policy, groups in rec["passes_by_policy"].items():
            lines.append(f"  {policy:<10}" + ", ".join(f"{g} {v:.2f}" for g, v in groups.items()))
    if rec["data_dependent_loop_one_trip_flops"]:
        lines.append(
            f"not counted: one trip of the data-dependent loops (overflow rounds) = "
            f"{rec['data_dependent_loop_one_trip_flops'] / 1e12:.3f} TFLOP"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", choices=("slice", "full8", "tiny", "tiny8"), default="slice")
    ap.add_argument("--remat", default=None, help="remat policy (default: the recipe's, full)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--moe-chunk-tokens", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None, help="rows per step (default: one/device)")
    ap.add_argument("--no-policies", action="store_true", help="skip the remat-policy sweep")
    ap.add_argument(
        "--lora-backward", choices=("exact", "ce"), default="exact", help="lora.backward"
    )
    ap.add_argument("--ce-rank", type=int, default=64, help="lora.ce_rank (with ce)")
    ap.add_argument("--ce-keep", type=float, default=0.125, help="lora.ce_keep (with ce)")
    ap.add_argument("--ce-refresh", type=int, default=0, help="lora.ce_refresh (with ce)")
    ap.add_argument("--json", type=Path, default=None, help="write the record here")
    args = ap.parse_args(argv)
    kw = dict(seq=args.seq, moe_chunk_tokens=args.moe_chunk_tokens)
    lora = bench_step.lora_overrides(args)
    setup = make_setup(args.setup, remat=args.remat, rows=args.rows, lora=lora, **kw)
    rec = account(setup)
    rec["command"] = " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])
    if not args.no_policies:
        rec["passes_by_policy"] = policy_passes(args.setup, **kw)
    print(table(rec))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
