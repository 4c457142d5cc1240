"""QK-clip's max-logit kernel (k2jax/ops/max_logit_pallas.py): numerics in Pallas interpret mode
against `max_logit_blocked` (the XLA formulation), its partitioning over a mesh, its Triton IR at
Kimi-K2 sizes for an abstract H100, the `k2jax plan` stand-in's memory, and a train step on a
mesh with the kernel (impl "dpa_xla") against the XLA reference on one device.

The kernel's float32 sums inside a dot may run in another order than XLA's einsum, so it is
compared within float32 rounding (rtol 1e-6, a few ulps). Under conftest.py's "highest" matmul
precision every case below comes out bit-identical on CPU with jax 0.12 and 0.11.2; at the
default precision a bf16 case was seen one ulp off with 0.11.2.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.triton import lowering as triton_lowering
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax.config import CONFIG_DIR, load_model_config
from k2jax.data import DEMO_CHATS, DataConfig, KimiTokenizer, PackedBatches
from k2jax.data.testing import write_tiny_tokenizer
from k2jax.ops.attention import attention, max_logit_blocked
from k2jax.ops.max_logit_pallas import DEFAULT_TILES, Tiles, max_logit_pallas, max_logit_per_row
from k2jax.sharding import make_mesh
from k2jax.train import RunConfig, StepSpec, build_program
from k2jax.train.state import to_host

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")


def _segments(B, S, rng):
    """Packed rows: row 0 three documents then padding, row 1 one document then padding, the
    others random runs (segment 0 = padding)."""
    seg = np.ones((B, S), np.int32)
    seg[0, S // 4 :] = 2
    seg[0, S // 2 :] = 3
    seg[0, -(S // 5) :] = 0
    if B > 1:
        seg[1, -3:] = 0
    for b in range(2, B):
        seg[b] = np.sort(rng.integers(0, 4, S))[::-1] if b % 2 else 1
    return seg


def _inputs(seed, B, T, S, H, Dn, Dr, dtype):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(3 * rng.normal(size=s), dtype)  # noqa: E731
    return (f(B, T, H, Dn), f(B, T, H, Dr), f(B, S, H, Dn), f(B, S, Dr)), rng


# (B, T, H, Dn, Dr, tiles): T not a multiple of the blocks, several blocks per row, K2's head
# dims, head dims that are not powers of two (zero-padded), one block covering everything.
CASES = {
    "T37-bq16-bk16": (2, 37, 3, 16, 16, Tiles(bq=16, bk=16)),
    "T70-bq32-bk16-k2dims": (3, 70, 2, 128, 64, Tiles(bq=32, bk=16)),
    "T50-bq16-bk32-odd-dims": (4, 50, 3, 24, 8, Tiles(bq=16, bk=32)),
    "T13-default-tiles": (2, 13, 4, 8, 4, DEFAULT_TILES),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_blocked(case, dtype):
    B, T, H, Dn, Dr, tiles = CASES[case]
    (qn, qr, kn, kr), rng = _inputs(0, B, T, T, H, Dn, Dr, dtype)
    seg = jnp.asarray(_segments(B, T, rng))
    want = max_logit_blocked(qn, qr, kn, kr, 0.3, seg, seg, block=16)
    got = jax.jit(lambda *a: max_logit_pallas(*a, 0.3, seg, seg, tiles=tiles, interpret=True))(
        qn, qr, kn, kr
    )
    assert got.shape == (H,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_decode_form(dtype):
    """T = 5 queries at per-row positions q_index among S = 37 keys (cached generation): the same
    kernel, its key loop bounded by each block's last position."""
    B, T, S, H = 3, 5, 37, 2
    (qn, qr, kn, kr), rng = _inputs(1, B, T, S, H, 16, 16, dtype)
    kv_seg = jnp.asarray(_segments(B, S, rng))
    q_index = jnp.asarray([[20, 21, 22, 23, 24], [30, 31, 32, 33, 34], [0, 1, 2, 3, 36]])
    q_seg = jnp.take_along_axis(kv_seg, q_index, axis=1)
    args = (qn, qr, kn, kr, 0.3, q_seg, kv_seg, q_index)
    want = max_logit_blocked(*args, block=4)
    got = max_logit_pallas(*args, tiles=Tiles(bq=16, bk=16), interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_sharded_over_batch_and_heads():
    """On a data × expert × tensor = 2 × 2 × 2 mesh, batch over (data, expert) and heads over
    tensor as the rules table places them: each device runs the kernel on its own rows and heads
    (no all-gather), and only the per-head maxima are all-reduced over the batch axes."""
    B, T, H = 4, 40, 4
    (qn, qr, kn, kr), rng = _inputs(2, B, T, T, H, 16, 16, jnp.bfloat16)
    seg = jnp.asarray(_segments(B, T, rng))
    tiles = Tiles(bq=16, bk=16)
    want = max_logit_pallas(qn, qr, kn, kr, 0.3, seg, seg, tiles=tiles, interpret=True)

    mesh = make_mesh(2, 2, 2)
    batch = ("data", "expert")
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
    args = (
        put(qn, batch, None, "tensor", None),
        put(qr, batch, None, "tensor", None),
        put(kn, batch, None, "tensor", None),
        put(kr, batch, None, None),
        put(seg, batch, None),
        put(seg, batch, None),
    )
    fn = jax.jit(
        lambda qn, qr, kn, kr, s, t: max_logit_pallas(qn, qr, kn, kr, 0.3, s, t, tiles=tiles)
    )
    compiled = fn.lower(*args).compile()
    hlo = compiled.as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    reduces = re.findall(r"= (\S+) all-reduce\(", hlo)
    assert reduces == ["f32[2]{0}"], reduces  # this device's 2 heads
    np.testing.assert_array_equal(np.asarray(compiled(*args)), np.asarray(want))


# --------------------------------------------------------------------------------------------
# Triton IR at Kimi-K2 sizes (abstract H100: nothing is allocated, nothing runs)
# --------------------------------------------------------------------------------------------


def _lower_k2(monkeypatch, S, dtype=jnp.bfloat16):
    """The kernel's Triton IR for B = 1, S = T, H = 64, Dn = 128, Dr = 64 (K2's MLA): returns
    [(name, grid, operand avals, IR text)]."""
    kernels = []
    real = triton_lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, grid_mapping, *args, **kwargs):
        result = real(jaxpr, grid_mapping, *args, **kwargs)
        avals = [bm.array_aval for bm in grid_mapping.block_mappings]
        text = result.module.operation.get_asm()
        kernels.append((jaxpr.debug_info.func_name, tuple(result.grid), avals, text))
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", capture)
    B, H, Dn, Dr = 1, 64, 128, 64
    A = jax.ShapeDtypeStruct
    args = (
        A((B, S, H, Dn), dtype),
        A((B, S, H, Dr), dtype),
        A((B, S, H, Dn), dtype),
        A((B, S, Dr), dtype),
        A((B, S), jnp.int32),
        A((B, S), jnp.int32),
        A((B, S), jnp.int32),
    )

    def f(*a):
        return max_logit_per_row(*a, scale=0.1447, tiles=DEFAULT_TILES, interpret=False)

    # The kernel itself, not `max_logit_pallas`: custom_partitioning needs real devices to lower.
    h100 = jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"
    )
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
    ):
        lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    return kernels, lowered.as_text()


@pytest.mark.parametrize("S", [4096, 12288])
def test_triton_ir_at_k2_sizes(monkeypatch, S):
    kernels, hlo = _lower_k2(monkeypatch, S)
    assert len(kernels) == 1
    name, grid, avals, ir = kernels[0]
    bq, bk = DEFAULT_TILES.bq, DEFAULT_TILES.bk
    assert name == "max_logit" and grid == (S // bq, 1, 64)
    # The shared rotary key goes in as [B, S, Dr] (never broadcast to the heads); the only output
    # is one float per (batch, head, query block).
    assert [tuple(a.shape) for a in avals][3] == (1, S, 64)
    assert tuple(avals[-1].shape) == (1, 64, S // bq) and avals[-1].dtype == jnp.float32
    assert f"-> tensor<1x64x{S // bq}xf32>" in hlo  # the custom call's result
    # One key loop whose trip count is computed in the program (the causal skip), holding the two
    # bf16 MMAs (nope: [bq, 128]·[128, bk], rope: [bq, 64]·[64, bk]) with float32 accumulators.
    loops = re.findall(r"scf\.for %\S+ = %\S+ to (%\S+) step", ir)
    assert len(loops) == 1
    assert not re.search(rf"{re.escape(loops[0])} = arith\.constant", ir)
    dots = re.findall(r"tt\.dot .* : (tensor<\S+>) \* (tensor<\S+>) -> (tensor<\S+>)", ir)
    assert sorted(dots) == sorted(
        [
            (f"tensor<{bq}x128xbf16>", f"tensor<128x{bk}xbf16>", f"tensor<{bq}x{bk}xf32>"),
            (f"tensor<{bq}x64xbf16>", f"tensor<64x{bk}xbf16>", f"tensor<{bq}x{bk}xf32>"),
        ]
    ), dots
    # A single scalar store; no tensor is written.
    stores = re.findall(r"tt\.store %\S+, %\S+(?:, %\S+)? : (\S+)", ir)
    assert stores == ["!tt.ptr<f32>"], stores
    # Every operand is below 2**31 elements, so the lowering's i32 offsets cannot wrap.
    assert all(a.size < 2**31 for a in avals)


def test_float32_inputs_use_ieee_mmas(monkeypatch):
    """float32 operands are multiplied as float32 (Triton would otherwise use TF32)."""
    kernels, _ = _lower_k2(monkeypatch, 1024, jnp.float32)
    ir = kernels[0][3]
    dots = re.findall(r"tt\.dot [^\n]*", ir)
    assert len(dots) == 2 and not any("tf32" in d for d in dots), dots


# --------------------------------------------------------------------------------------------
# The `k2jax plan` stand-in
# --------------------------------------------------------------------------------------------


def test_plan_attention_has_no_logit_blocks():
    """The compiled "plan" attention (forward and all gradients, as in training) at K2's head
    sizes and S = 4096 holds no float32 temporary as large as one [H, 512, S] logit block —
    what `max_logit_blocked` materialised; the kernel it stands for writes [B, H, S/128]."""
    B, S, H, Dn, Dr, Dv = 1, 4096, 64, 128, 64, 128
    block_bytes = H * 512 * S * 4
    A = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    inputs = (A((B, S, H, Dn), bf), A((B, S, H, Dr), bf), A((B, S, H, Dn), bf))
    inputs += (A((B, S, Dr), bf), A((B, S, H, Dv), bf), A((B, S), jnp.int32))

    def step(qn, qr, kn, kr, v, seg):
        def f(qn, qr, kn, kr, v):
            out, m = attention(
                qn, qr, kn, kr, v, scale=0.14, q_segment_ids=seg, kv_segment_ids=seg, impl="plan"
            )
            return jnp.sum(out.astype(jnp.float32)), m

        return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)(qn, qr, kn, kr, v)

    compiled = jax.jit(step).lower(*inputs).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < block_bytes, (temp, block_bytes)
    for dims in re.findall(r"\bf32\[([\d,]+)\]", compiled.as_text()):
        elements = int(np.prod([int(d) for d in dims.split(",")]))
        assert elements * 4 < block_bytes, dims


def test_plan_max_logit_is_per_head_float32():
    (qn, qr, kn, kr), rng = _inputs(3, 2, 13, 13, 3, 8, 4, jnp.bfloat16)
    seg = jnp.asarray(_segments(2, 13, rng))
    v = jnp.zeros((2, 13, 3, 6), jnp.bfloat16)
    kw = dict(scale=0.3, q_segment_ids=seg, kv_segment_ids=seg)
    out, m = attention(qn, qr, kn, kr, v, impl="plan", **kw)
    assert out.shape == v.shape and m.shape == (3,) and m.dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# In the model: a train step on a mesh
# --------------------------------------------------------------------------------------------


def test_train_step_on_a_mesh_records_the_kernels_max_logits():
    """A train step of the tiny model on an expert=4 × tensor=2 mesh (2 accumulated microbatches,
    the decoder under scan and full remat) with the kernel as the max logit (impl "dpa_xla") records
    the same per-layer, per-head max logits as the XLA reference on one device. A QK-clip τ below
    every logit makes the step store them as the thresholds (K2_FACTS §5.2 in
    k2jax/optim/qk_clip.py)."""
    cfg = load_model_config(CONFIG_DIR / "tiny.gin")

    def spec(impl, remat, grad_accum):
        overrides = [f'compute.attention_impl="{impl}"', f'compute.remat="{remat}"']
        overrides += ["train.run_dir=unused", "optim.qk_clip_tau=0.01"]
        rc = RunConfig.load(CONFIG_DIR / "tiny_train.gin", overrides)
        return dataclasses.replace(StepSpec.from_run_config(rc, cfg), grad_accum=grad_accum)

    def one_batch(tmp):
        write_tiny_tokenizer(tmp)
        data = DataConfig(path=str(DEMO_CHATS), seq_len=128, batch_size=8)
        return next(PackedBatches(data, KimiTokenizer.from_dir(tmp)))

    with tempfile.TemporaryDirectory() as tmp:
        batch = one_batch(tmp)
    assert 0 in batch["segment_ids"]  # packed rows with padding
    ref = build_program(spec("xla", "none", 1), make_mesh(devices=jax.devices()[:1]))
    prog = build_program(spec("dpa_xla", "full", 2), make_mesh(1, 4, 2))
    frozen, tparams = ref.init_base(0)
    state = ref.init_state(0, tparams)
    host_state, host_frozen = to_host(state), to_host(frozen)
    want, m_want = ref.train_step(state, frozen, ref.device_batch(batch))
    state8 = jax.device_put(host_state, prog.state_shardings)
    frozen8 = jax.device_put(host_frozen, prog.frozen_shardings)
    got, m_got = prog.train_step(state8, frozen8, prog.device_batch(batch))
    np.testing.assert_allclose(float(m_got["loss"]), float(m_want["loss"]), rtol=1e-5)
    for stack, thr in jax.device_get(want["qk_thresholds"]).items():
        assert np.all(np.isfinite(thr)) and np.all(thr > 0.01), (stack, thr)
        np.testing.assert_allclose(jax.device_get(got["qk_thresholds"][stack]), thr, rtol=1e-6)
