"""The one table that maps logical axis names to mesh axes.

Model code names the axes of every weight (`nn.with_logical_partitioning`) and of the
activations at layer boundaries (`constrain(x, names)`); this table alone decides where they live
on the (data, expert, tensor) mesh. Changing a parallelism strategy touches only RULES.

    logical axis       mesh axes            used by
    batch              (data, expert)       tokens outside the MoE: data-parallel over both
    seq, act_embed     —                    layer-boundary activations [batch, seq, act_embed]
    vocab              tensor               embedding and LM head (vocab-parallel head and loss)
    heads              tensor               q_b_proj / kv_b_proj rows, o_proj columns (MLA heads)
    mlp                tensor               dense and shared-expert SwiGLU width
    experts            (expert, tensor)     the stacked routed experts, their scales and LoRA; the
                                            expert-parallel group of the MoE's all-to-all
    moe_tokens         (data, expert,       tokens inside the MoE: each device routes its own
                        tensor)             share (k2jax/model/expert_parallel.py)
    ctx_rows           data                 context parallelism (k2jax/model/context_parallel.py):
    ctx_seq            expert               one row's tokens split along the sequence instead of
    ctx_seq_all        (data, expert)       rows over `expert` (compute.context_parallel "expert"),
                                            or over both token axes ("all"; rows then replicated)
    embed, q_lora, kv_lora, kv_a, expert_mlp, *_groups, router_experts, lora_rank, layers,
    qk_clip_part, qk_clip_heads (MuonClip's per-head factors, tiny)                           —

Outside the MoE the tokens [batch, seq] are split over (data, expert) either by row ("batch",
"seq") or, with context parallelism, along the sequence ("ctx_rows", "ctx_seq" or None,
"ctx_seq_all"); `token_axes` names the pair for a mode. Both flatten to the same device order,
so the MoE receives the same tokens per device either way.

Inside the MoE the tokens are split over all three axes ("moe_tokens") and exchanged over the
experts' axes (k2jax/model/expert_parallel.py reads both from here with `mesh_axes`). Optimizer
state follows the parameter it belongs to.

One resolver, `spec_for(names)`, turns names into a PartitionSpec for weights and activations
alike, and fails when a name has no rule or when a spec would use one mesh axis twice. Rejected
alternative: flax's `nn.with_logical_constraint` for activations. Its resolver treats the same
table as priorities: a name without a rule, or one whose mesh axes an earlier dim took, is
silently left unsharded, so a typo or a collision changes the layout without a word.

flax still resolves names in one place of its own: a boxed weight (nn.LogicallyPartitioned) that
a module reads during `init` under `use_mesh` re-applies its constraint through the flax rules
set there. Those are the names `logical_specs` has already resolved strictly for the same tree's
shardings, so the two agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "expert")),
    ("seq", None),
    ("act_embed", None),
    ("ctx_rows", "data"),
    ("ctx_seq", "expert"),
    ("ctx_seq_all", ("data", "expert")),
    ("vocab", "tensor"),
    ("embed", None),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("q_lora", None),
    ("kv_lora", None),
    ("kv_a", None),
    ("experts", ("expert", "tensor")),
    ("moe_tokens", ("data", "expert", "tensor")),
    ("expert_mlp", None),
    ("embed_groups", None),
    ("expert_mlp_groups", None),
    ("router_experts", None),
    ("lora_rank", None),
    ("layers", None),
    ("qk_clip_part", None),
    ("qk_clip_heads", None),
    # Kimi-K2.5's vision tower and projector (~0.4B parameters): replicated on every device
    ("vision_embed", None),
    ("vision_qkv", None),
    ("vision_mlp", None),
    ("vision_patch", None),
    ("vision_pos", None),
)

_RULE_MAP = dict(RULES)


class ShardingRuleError(ValueError):
    pass


def spec_for(names: Sequence[str | None]) -> PartitionSpec:
    """The PartitionSpec of an array whose dims have these logical names."""
    out, used = [], []
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in _RULE_MAP:
            raise ShardingRuleError(
                f"logical axis {name!r} has no rule in k2jax.sharding.rules.RULES (names: {names})"
            )
        axes = _RULE_MAP[name]
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        for a in flat:
            if a in used:
                raise ShardingRuleError(f"logical axes {names} use mesh axis {a!r} twice")
            used.append(a)
        out.append(axes)
    return PartitionSpec(*out)


def mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes a logical axis maps to, as a tuple (empty: replicated)."""
    if name not in _RULE_MAP:
        raise ShardingRuleError(f"logical axis {name!r} has no rule in k2jax.sharding.rules.RULES")
    axes = _RULE_MAP[name]
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


# compute.context_parallel → the logical names of the [batch, seq] token axes outside the MoE.
TOKEN_AXES = {
    "none": ("batch", "seq"),
    "expert": ("ctx_rows", "ctx_seq"),
    "all": (None, "ctx_seq_all"),
}


def token_axes(context_parallel: str) -> tuple[str | None, str | None]:
    """(rows, sequence) logical names of the token axes for a context-parallel mode ("auto", not
    yet resolved against a batch, lays tokens out as "none")."""
    return TOKEN_AXES["none" if context_parallel == "auto" else context_parallel]


def logical_specs(boxed_tree):
    """PartitionSpecs for a tree of boxed values (nn.LogicallyPartitioned); unboxed leaves
    (no names) are replicated."""

    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return spec_for(x.names)
        return PartitionSpec()

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def param_shardings(boxed_tree, mesh: Mesh):
    """NamedShardings for a boxed (abstract) variable tree on `mesh`, same structure unboxed."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), logical_specs(boxed_tree))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`x` pinned to the layout `spec_for(names)` on the context mesh (jax.set_mesh / use_mesh);
    `x` unchanged when there is no context mesh (single-device use, no sharding to pin)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(names))


def flax_rules():
    """RULES in the form flax's `nn.logical_axis_rules` context manager takes."""
    return tuple((name, axes) for name, axes in RULES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """The context model code runs in on a mesh: jax's context mesh (shard_map and `constrain`
    use it) and flax's logical-axis rules (for flax's own unboxing of weights, module docstring)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules()):
        yield mesh
