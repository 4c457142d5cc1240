"""benchmarks/account_step.py on the tiny preset, against numbers derived without it: the expert
GEMMs', LM head's and attention's FLOPs from the config, the frozen-weight passes under remat
"full" and "none", the per-device count of an 8-device mesh against one device, the one MFU peak,
and the whole count against XLA's own dots in the compiled, partitioned step (another IR, counted
by another walker, below), so that the script cannot rot between the sessions that use it."""

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SEQ = 48  # ≠ hidden size 64, so attention-score shapes (H, T, T) are unambiguous


@pytest.fixture(scope="module")
def acct():
    spec = importlib.util.spec_from_file_location(
        "account_step", ROOT / "benchmarks/account_step.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["account_step"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("account_step", None)


@pytest.fixture(scope="module")
def full(acct):
    setup = acct.make_setup("tiny", remat="full", seq=SEQ)
    return setup, acct.account(setup)


@pytest.fixture(scope="module")
def eight(acct):
    setup = acct.make_setup("tiny8", remat="full", seq=SEQ)
    return setup, acct.account(setup)


def _flops(rec, cls, part=None):
    c = rec["classes"][cls]
    return c["parts"][part]["flops"] if part else c["flops"]


def test_expert_gemms_lm_head_and_attention_from_the_config(acct, full):
    setup, rec = full
    c = setup.program.spec.model
    T, K, D, F, V = SEQ, c.num_experts_per_tok, c.hidden_size, c.moe_intermediate_size, c.vocab_size
    # Routed rows: every (token, expert) pair once, 3 passes (forward, recompute, input gradient)
    # of gate|up [2F, D] and down [D, F] per MoE layer.
    assert _flops(rec, acct.EXPERT) == 3 * c.num_moe_layers * 2 * T * K * (2 * F * D + D * F)
    # The LM head: forward, the loss's own recompute in its backward, the input gradient.
    assert _flops(rec, acct.FROZEN, "LM head") == 3 * 2 * T * V * D
    # Attention in the dpa_xla form: q·k and p·v at the padded head dim Dn + Dr over the full
    # [T, T] square; forward, recompute and a backward of twice a forward's dots.
    d = c.qk_nope_head_dim + c.qk_rope_head_dim
    assert _flops(rec, acct.ATTN) == 4 * c.num_hidden_layers * 4 * c.num_attention_heads * T * T * d
    assert rec["attention_evaluations_per_layer"] == {"forward": 2.0, "backward": 1.0}
    # One device: no padding rows; the Pallas kernel's tiles (row_tile of 96 rows over 8 experts
    # = 32) hold E[ceil(X / 32)]·32 rows per expert.
    e = rec["classes"][acct.EXPERT]
    assert "flops_array" not in e and e["tile_padded_flops"] >= e["flops"]
    assert rec["model_flops"] == setup.program.step_flops(np.ones((1, SEQ), np.int32))
    assert rec["unrecognised_ragged_rows"] == rec["unwalked_subprograms"] == []
    assert "predicted step" in acct.table(rec)


def test_tile_factor_at_k2_shapes(acct):
    # 32k routed rows over 384 experts (85 ± 9 each) in 128-row tiles: one tile each, 1.5x;
    # over 48 experts (683 ± 25 each): 6 tiles (768 rows) for most, 5 (640) for the few below
    # 641 rows, so between 640/682.7 and 768/682.7.
    assert acct._tile_factor(32768, 384, 32768) == pytest.approx(1.5, rel=1e-4)
    assert 640 / (32768 / 48) < acct._tile_factor(32768, 48, 40960) < 768 / (32768 / 48)


def _passes(rec):
    return rec["frozen_weight_passes"]["per_weight"]


def test_frozen_weight_passes_full_and_none(acct, full):
    """remat "full": 3 passes over every frozen weight whose output the backward needs; the last
    matmul of a block (down_proj of the dense MLP and the shared expert) is not recomputed, its
    output feeding only the residual sum: 2. No remat: 2 everywhere. The LM head's loss recomputes
    its logits itself: 3 under every policy."""
    _, rec = full
    for weight, passes in _passes(rec).items():
        want = 2.0 if re.search(r"(dense_layers/mlp|shared_experts)/down_proj$", weight) else 3.0
        assert passes == pytest.approx(want), weight
    none = acct.account(acct.make_setup("tiny", remat="none", seq=SEQ))
    for weight, passes in _passes(none).items():
        assert passes == pytest.approx(3.0 if "lm_head" in weight else 2.0), weight


def test_eight_devices_count_per_device(acct, full, eight):
    """One row per device on expert=8 does each device's share: the same frozen-weight, LoRA,
    attention and (real-row) expert FLOPs per device as one device with one row; the routed
    experts' optimizer work split 8 ways."""
    _, one = full
    _, rec = eight
    assert rec["devices"] == 8 and rec["model_flops"] == pytest.approx(one["model_flops"])
    for cls in (acct.FROZEN, acct.EXPERT, acct.LORA, acct.ATTN):
        assert _flops(rec, cls) == pytest.approx(_flops(one, cls)), cls
    # The exchange pads each peer block to its capacity: buffers hold more rows than pairs.
    assert rec["classes"][acct.EXPERT]["flops_array"] > _flops(rec, acct.EXPERT)
    assert _flops(rec, acct.OPT_MM) < _flops(one, acct.OPT_MM)
    assert all(v == pytest.approx(3.0) for k, v in _passes(rec).items() if "down_proj" not in k)


def test_one_peak_convention(acct):
    """The trainer's MFU, bench_step's and this prediction divide by the same measured 800 TFLOP/s
    of an H100/H200; the datasheet's 989 stays available under its own name."""
    import types

    from k2jax.train.step import DATASHEET_PEAK_TFLOPS, PEAK_TFLOPS, peak_flops, peak_source

    for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        device = types.SimpleNamespace(device_kind=kind)
        assert peak_flops(device) == acct.MFU_PEAK_TFLOPS * 1e12 == 800e12
        assert peak_source(device) == "measured"
        assert peak_flops(device, datasheet=True) == 989e12
    assert acct.bench_step.PEAK_TFLOPS == acct.MFU_PEAK_TFLOPS
    a100 = types.SimpleNamespace(device_kind="NVIDIA A100-SXM4-80GB")  # never measured here
    assert "A100" not in PEAK_TFLOPS and peak_flops(a100) == DATASHEET_PEAK_TFLOPS["A100"] * 1e12
    assert peak_source(a100) == "datasheet" and peak_source(a100, 100.0) == "log.peak_tflops"


def test_total_equals_xla_dots_of_the_compiled_step(acct, eight):
    """XLA's dots in the compiled step (per device after partitioning; while bodies × their known
    trip counts) equal the jaxpr count: the dot_general FLOPs plus the ragged dots as XLA:CPU
    runs them, densely for every group. The max-logit kernel is left out of both (its key loop's
    trip count is data-dependent). Algebraic simplification and CSE are switched off for this
    compile, since they rewrite or merge a few small dots (with them on, XLA's count is ~4% lower
    on this model); the 1% tolerance covers what other passes still change."""
    setup, rec = eight  # on 8 devices: the partitioner checks the per-device division too
    counted = sum(
        c.get("flops_array", c["flops"])
        for k, c in rec["classes"].items()
        if k in acct.MATMUL_CLASSES and k not in (acct.MAXLOGIT,)
    )
    counted += rec["ragged_dense_expansion_flops"] - rec["ragged_dot_buffer_flops"]
    p = setup.program
    with acct.use_mesh(p.mesh):
        compiled = p._train_step.lower(*acct.abstract_inputs(setup)).compile(
            compiler_options={"xla_disable_hlo_passes": "algsimp,cse"}
        )
    xla = hlo_dot_flops(compiled.as_text(), skip="max_logit")
    assert xla == pytest.approx(counted, rel=0.01)


# --------------------------------------------------------------------------------------------------
# XLA's count
# --------------------------------------------------------------------------------------------------

_SHAPE = re.compile(r"^[a-z]+\d*\[([\d,]*)\]")
_INSTR = re.compile(r"^(?:ROOT )?%([\w.\-]+) = (\S+?(?:\{[^}]*\})?|\(.*?\)) ([\w\-]+)\((.*)$")


def hlo_dot_flops(text: str, *, skip: str) -> float:
    """Σ 2 · output elements · contracted size over the `dot` instructions of an HLO module's
    text (not those whose op name contains `skip`): computations called by fusions and calls
    once, while bodies × their known trip count (none known: zero trips), a conditional's
    costliest branch."""
    comps, cur, entry = {}, None, None
    for raw in text.splitlines():
        line = raw.strip()
        head = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{$", line)
        if head and not raw.startswith(" "):
            cur = comps.setdefault(head.group(2), [])
            entry = head.group(2) if head.group(1) else entry
        elif cur is not None and line and line != "}":
            cur.append(line)
    memo: dict[str, float] = {}

    def cost(name: str) -> float:
        if name not in memo:
            memo[name] = 0.0
            shapes, total = {}, 0.0
            for ins in comps.get(name, []):
                m = _INSTR.match(ins)
                if m is None:
                    continue
                var, typ, op, rest = m.groups()
                if shape := _SHAPE.match(typ):
                    shapes[var] = [int(d) for d in shape.group(1).split(",") if d]
                if op == "dot" and skip not in ins:
                    lhs = re.match(r"%([\w.\-]+)", rest).group(1)
                    lc = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins).group(1)
                    k = math.prod(shapes[lhs][int(i)] for i in lc.split(",") if i)
                    total += 2.0 * math.prod(shapes[var]) * k
                callees = re.findall(r"(?:calls|to_apply|body)=%([\w.\-]+)", ins)
                trips = 1.0
                if op == "while":
                    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins)
                    trips = float(known.group(1)) if known else 0.0
                if op == "conditional":
                    branches = re.search(r"branch_computations=\{([^}]*)\}", ins).group(1)
                    total += max(cost(b) for b in re.findall(r"%([\w.\-]+)", branches))
                    continue
                total += trips * sum(cost(c) for c in callees)
            memo[name] = total
        return memo[name]

    return cost(entry)
