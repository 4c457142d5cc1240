"""Context parallelism (k2jax/model/context_parallel.py): one row split along the sequence.

The exactness check of the issue: on the tiny model in float32, with packed rows (several
examples and padding per row), random LoRA factors on every linear and expert, and QK-clip
factors away from 1, the loss, every LoRA gradient and the per-layer max logits at
context-parallel degrees 2, 4 and 8 (and 4 with tensor parallelism over the heads) equal the
single-device computation within 1e-5 relative. Plus the layout's own properties: the zig-zag
permutation balances causal work, round-trips, and the MoE sees each device's own tokens.
"""

from __future__ import annotations

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err
from jax.sharding import NamedSharding

from k2jax.config import CONFIG_DIR, ConfigError, load_model_config
from k2jax.lora import LoraConfig
from k2jax.model import ComputeConfig, Transformer
from k2jax.model import context_parallel as cp
from k2jax.model.transformer import init_variables
from k2jax.sharding import logical_specs, make_mesh, spec_for, token_axes, use_mesh

T = 64


def _compute(mode="none", impl="xla"):
    return ComputeConfig(
        dtype="float32",
        param_dtype="float32",
        remat="full",
        attention_impl=impl,
        context_parallel=mode,
    )


@pytest.fixture(scope="module")
def setup():
    cfg = load_model_config(CONFIG_DIR / "tiny.gin")
    lora = LoraConfig(rank=4)
    boxed = init_variables(
        Transformer(cfg, _compute(), lora), jax.random.key(0), lora_rng=jax.random.key(1)
    )
    v = nn.unbox(boxed)
    keys = iter(jax.random.split(jax.random.key(42), 1000))
    v["lora"] = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), v["lora"])
    v["qk_clip"] = jax.tree.map(
        lambda x: jax.random.uniform(next(keys), x.shape, minval=0.5, maxval=1.0), v["qk_clip"]
    )
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(4):  # packed rows: 2-4 examples each, then padding
        cuts = np.sort(rng.choice(np.arange(4, T - 4), rng.integers(1, 4), replace=False))
        seg = np.zeros(T, np.int32)
        pos = np.zeros(T, np.int32)
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, T - rng.integers(0, 6)])):
            seg[a:b], pos[a:b] = i + 1, np.arange(b - a)
        rows.append((seg, pos))
    seg = jnp.asarray(np.stack([r[0] for r in rows]))
    pos = jnp.asarray(np.stack([r[1] for r in rows]))
    batch = {
        "tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (4, T)), jnp.int32),
        "targets": jnp.asarray(rng.integers(0, cfg.vocab_size, (4, T)), jnp.int32),
        "loss_mask": (seg > 0).astype(jnp.float32) * jnp.asarray(rng.integers(0, 2, (4, T))),
        "positions": pos,
        "segment_ids": seg,
    }
    return cfg, lora, boxed, v, batch


def _loss_grads(model, v, batch):
    def f(lora):
        sums, aux = model.apply(
            {**v, "lora": lora},
            batch["tokens"],
            batch["targets"],
            batch["loss_mask"],
            batch["positions"],
            batch["segment_ids"],
            method=Transformer.loss,
        )
        return sums["loss_sum"], aux

    (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(v["lora"])
    return loss, grads, {k: a["max_logit"] for k, a in aux.items()}


@pytest.fixture(scope="module")
def reference(setup):
    """rows -> (loss, LoRA grads, max logits) of the first `rows` rows on one device."""
    cfg, lora, _, v, batch = setup
    fn = jax.jit(functools.partial(_loss_grads, Transformer(cfg, _compute(), lora)))
    cache = {}

    def get(rows):
        if rows not in cache:
            cache[rows] = fn(v, jax.tree.map(lambda x: x[:rows], batch))
        return cache[rows]

    return get


@pytest.mark.parametrize(
    "mesh_shape, mode, rows, impl",
    [
        ((4, 2, 1), "expert", 4, "xla"),  # degree 2, two rows per data shard
        ((2, 4, 1), "expert", 2, "xla"),  # degree 4
        ((1, 8, 1), "expert", 1, "xla"),  # degree 8: one row over the node
        ((2, 2, 2), "all", 1, "dpa_xla"),  # degree 4 over data × expert, heads over tensor
    ],
)
def test_equals_one_device(setup, reference, mesh_shape, mode, rows, impl):
    cfg, lora, boxed, v, batch = setup
    loss0, grads0, max0 = reference(rows)

    mesh = make_mesh(*mesh_shape)
    model = Transformer(cfg, _compute(mode, impl), lora)
    shard = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    v_s = jax.tree.map(shard, v, logical_specs(boxed))
    b_s = {k: shard(x[:rows], spec_for(token_axes(mode))) for k, x in batch.items()}
    with use_mesh(mesh):
        assert cp.degree(mode) == {"expert": mesh_shape[1]}.get(mode, 4)
        loss, grads, max_logit = jax.jit(functools.partial(_loss_grads, model))(v_s, b_s)
    assert rel_err(loss, loss0) <= 1e-5
    for (path, g), g0 in zip(
        jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads0), strict=True
    ):
        assert rel_err(g, g0) <= 1e-5, jax.tree_util.keystr(path)
    for k in max0:
        assert rel_err(max_logit[k], max0[k]) <= 1e-5, k
    assert float(jnp.abs(grads0["dense_layers"]["self_attn"]["kv_b_proj"]["lora_A"]).max()) > 0


def test_logits_in_natural_order(setup):
    """`Transformer.logits` un-permutes the layout: the same [B, T, V] as one device."""
    cfg, lora, _, v, batch = setup
    args = (batch["tokens"][:1], batch["positions"][:1], batch["segment_ids"][:1])
    ref = Transformer(cfg, _compute(), lora).apply(v, *args, method=Transformer.logits)
    mesh = make_mesh(1, 8, 1)
    with use_mesh(mesh):
        out = jax.jit(
            lambda v, *a: Transformer(cfg, _compute("expert"), lora).apply(
                v, *a, method=Transformer.logits
            )
        )(v, *args)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_zigzag_balances_causal_work(n):
    perm = cp.zigzag(T, n)
    assert sorted(perm.tolist()) == list(range(T))
    x = jnp.arange(3 * T).reshape(3, T)
    np.testing.assert_array_equal(cp.from_layout(cp.to_layout(x, n), n), x)
    # visible (query, key) pairs per device: query at natural position p sees p + 1 keys
    work = (perm + 1).reshape(n, T // n).sum(axis=1)
    assert len(set(work.tolist())) == 1


def test_flatten_keeps_each_device_block():
    """[B, T] split (data, expert) flattens to contiguous per-device blocks and back."""
    mesh = make_mesh(2, 4, 1)
    x = jnp.arange(4 * 16).reshape(4, 16)
    with use_mesh(mesh):
        flat = cp.flatten_tokens(x, "expert")
        back = cp.unflatten_tokens(flat, 4, 16, "expert")
    np.testing.assert_array_equal(back, x)
    # device (i, j) holds rows 2i, 2i+1 and columns 4j..4j+3: block i*4 + j of the flat axis
    blocks = np.asarray(flat).reshape(8, 8)
    for i in range(2):
        for j in range(4):
            np.testing.assert_array_equal(
                np.sort(blocks[i * 4 + j]),
                np.sort(np.asarray(x[2 * i : 2 * i + 2, 4 * j : 4 * j + 4]).ravel()),
            )


def test_resolve_and_errors():
    mesh = {"data": 2, "expert": 4}
    assert cp.resolve("auto", 8, mesh) == "none"
    assert cp.resolve("auto", 2, mesh) == "expert"
    assert cp.resolve("auto", 1, mesh) == "all"
    with pytest.raises(ValueError, match="multiple of data = 2"):
        cp.resolve("expert", 3, mesh)
    with pytest.raises(ValueError, match="multiple of 16"):
        cp.zigzag(40, 8)
    with pytest.raises(ConfigError, match="context_parallel"):
        ComputeConfig(context_parallel="ring")


_COLLECTIVE = re.compile(
    r"=\s*(\(.*?\)|\S+)\s+(all-gather|all-reduce|reduce-scatter|collective-permute)(?:-start)?\("
)
_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def test_only_the_latent_crosses_devices(setup):
    """Read from the compiled loss + gradient at degree 8: outside the MoE's all-to-all, no
    collective moves more than the row's latent (T × kv_lora_rank numbers) — the expanded keys
    and values (T × H·(Dn + Dv)) and their gradients never cross devices."""
    cfg, lora, boxed, v, batch = setup
    mesh = make_mesh(1, 8, 1)
    model = Transformer(cfg, _compute("expert"), lora)
    shard = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    v_s = jax.tree.map(shard, v, logical_specs(boxed))
    b_s = {k: shard(x[:1], spec_for(token_axes("expert"))) for k, x in batch.items()}
    with use_mesh(mesh):
        hlo = jax.jit(functools.partial(_loss_grads, model)).lower(v_s, b_s).compile().as_text()
    sizes = [
        math.prod(int(d) for d in dims.split(",") if d)
        for m in _COLLECTIVE.finditer(hlo)
        for dims in _SHAPE.findall(m.group(1))
    ]
    latent = T * cfg.kv_lora_rank
    expanded = T * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    assert latent in sizes  # the gather is there
    assert max(sizes) <= latent < expanded


def test_trainer_runs_one_row_over_the_mesh(tmp_path):
    """`k2jax train` with one row per step on expert = 8: "auto" resolves to context
    parallelism, the batch is laid out along the sequence, and the loss falls (LoRA dropout
    on)."""
    from k2jax.train import RunConfig, Trainer

    rc = RunConfig.load(
        CONFIG_DIR / "tiny_train.gin",
        [
            f"train.run_dir='{tmp_path}'",
            "log.progress=False",
            "checkpoint.every=0",
            "mesh.expert=8",
            "data.batch_size=1",
            "data.seq_len=256",
            "lora.dropout=0.1",  # the kv_b adapter's dropout is drawn per token before the gather
        ],
    )
    with Trainer(rc) as trainer:
        metrics = trainer.fit(max_steps=6)
        assert trainer.program.spec.compute.context_parallel == "expert"
        assert trainer.program.batch_sharding.spec == spec_for((None, *token_axes("expert")))
    losses = [m["loss"] for m in metrics]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
