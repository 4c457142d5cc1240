"""The optimizer: Muon for every LoRA factor (batched over layers and experts), AdamW for the rest.

What trains. The optimizer sees one pytree, the *trainable* tree

    {"lora":   LoRA factors, fp32  (lora_A [.., r, in], lora_B [.., out, r]; leading [L] or [L, E])
     "params": the optionally trainable base weights (router, norms), fp32 master copies}

and never the frozen base, which therefore has no optimizer state at all.

Muon (K2_FACTS §5.1, §5.3). `optax.contrib.muon` orthogonalises the Nesterov momentum with five
Newton–Schulz steps (coefficients 3.4445, −4.7750, 2.0315), scales it by 0.2·√max(fan_in,
fan_out) (`consistent_rms=0.2`, Moonlight's rule that matches AdamW's update RMS, so AdamW learning
rates carry over) and applies decoupled weight decay (× lr). optax treats only 2-D leaves as
matrices by default and silently sends every 3-D or 4-D leaf to its AdamW branch — which would be
every LoRA factor here, since they are stacked over layers (and experts). So we pass
`muon_weight_dimension_numbers` explicitly: for both factors, in our HF [out, in] layout, the
*input* (reduction) axis is −1 and the *output* axis is −2; every other axis (layers, experts) is a
batch axis, and each expert's factor of each layer is orthogonalised on its own (vmapped), exactly
as if it were a separate matrix. (Newton–Schulz and the √max scale are symmetric in the two axes,
so swapping them would give the same numbers; we state the true ones.) Leaves with dimension
numbers None — the trainable base weights — go to optax's AdamW branch (`adam_*` settings).

`name = "adamw"` trains everything with plain AdamW instead (the usual LoRA optimizer; the issue
asks that the loss fall with each).

Experts first. The routed experts' factors are stacked [L, E, ..] with E sharded over the mesh.
optax flattens all batch axes into one before its vmap ([L, E] → [L·E]); with the sharded axis
minor, that merged axis has no block layout and XLA all-gathers every expert's factor onto every
device (measured: one all-gather per expert factor; ~40 GB for K2 at rank 16). So Muon runs on an
*expert-major view* of the tree — those leaves transposed to [E, L, ..] (a local transpose), whose
flattening keeps each device's experts in one block and needs no communication at all. The
optimizer state lives in that view too (`expert_major`; the trainer derives its shardings from
it).

Both are preceded by global-norm clipping of the gradient (`grad_clip_norm`). QK-clip, MuonClip's
other half, acts after the update on the separate "qk_clip" variables (k2jax.optim.qk_clip).

Rejected alternative: our own Muon. optax's is tested, handles batch axes by vmap, and its
differences from Moonlight's reference (EMA momentum with bias correction instead of a plain sum;
equal up to a scalar that the Frobenius normalisation removes) are documented in K2_FACTS §5.3.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, muon

from k2jax.config import ConfigError, check_field_types

# Our [.., out, in] factors in optax's x·W convention: contract over `in` (−1), produce `out` (−2).
LORA_DIMENSION_NUMBERS = MuonDimensionNumbers(reduction_axis=-1, output_axis=-2)
LORA_LEAVES = ("lora_A", "lora_B")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The `optim` section of a run config.

    name: "muon" (Muon for LoRA factors, AdamW for trainable base weights) or "adamw" (all AdamW).
    learning_rate: the schedule's peak (schedule section).
    weight_decay: decoupled weight decay (× lr) of the LoRA factors (of everything for adamw).
    muon_beta, nesterov, ns_steps, ns_coeffs, consistent_rms: Muon's momentum, Newton–Schulz
      iteration and update scale (0.2 = Moonlight/Kimi; None = optax's √max(1, out/in) rule).
    b1, b2, eps: AdamW moments (and Muon's normalisation eps).
    adam_learning_rate: peak lr of the AdamW part under muon (None: learning_rate); it follows the
      same schedule shape.
    adam_weight_decay: weight decay of the AdamW part under muon.
    grad_clip_norm: clip the global gradient norm to this (None: no clipping).
    qk_clip_tau: MuonClip's QK-clip threshold τ on the per-head max attention logit (None: off).
    """

    name: Literal["muon", "adamw"] = "muon"
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    muon_beta: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coeffs: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    consistent_rms: float | None = 0.2
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    adam_learning_rate: float | None = None
    adam_weight_decay: float = 0.0
    grad_clip_norm: float | None = 1.0
    qk_clip_tau: float | None = 100.0

    def __post_init__(self):
        check_field_types(self, "optim")
        if self.learning_rate <= 0:
            raise ConfigError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        if self.adam_learning_rate is not None and self.adam_learning_rate <= 0:
            raise ConfigError(
                f"optim.adam_learning_rate must be > 0 or None, got {self.adam_learning_rate}"
            )
        for name in ("weight_decay", "adam_weight_decay", "eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("muon_beta", "b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.ns_steps < 1:
            raise ConfigError(f"optim.ns_steps must be >= 1, got {self.ns_steps}")
        if self.consistent_rms is not None and self.consistent_rms <= 0:
            raise ConfigError(
                f"optim.consistent_rms must be > 0 or None, got {self.consistent_rms}"
            )
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError(
                f"optim.grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}"
            )
        if self.qk_clip_tau is not None and self.qk_clip_tau <= 0:
            raise ConfigError(f"optim.qk_clip_tau must be > 0 or None, got {self.qk_clip_tau}")


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def muon_dimension_numbers(trainable):
    """Per leaf of the trainable tree: LORA_DIMENSION_NUMBERS for LoRA factors, None (→ AdamW)
    for everything else."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: LORA_DIMENSION_NUMBERS if _leaf_name(path) in LORA_LEAVES else None,
        trainable,
    )


def _is_routed_expert_factor(path) -> bool:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return "experts" in keys and keys[-1] in LORA_LEAVES


def expert_major(tree):
    """The optimizer's view of a trainable tree: routed-expert LoRA factors [L, E, ..] transposed
    to [E, L, ..] (arrays or ShapeDtypeStructs; NamedShardings get their spec's first two entries
    swapped). Applying it twice gives the tree back."""

    def one(path, x):
        if not _is_routed_expert_factor(path):
            return x
        if isinstance(x, jax.sharding.NamedSharding):
            spec = tuple(x.spec) + (None,) * max(0, 2 - len(x.spec))
            return jax.sharding.NamedSharding(
                x.mesh, jax.sharding.PartitionSpec(spec[1], spec[0], *spec[2:])
            )
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((x.shape[1], x.shape[0], *x.shape[2:]), x.dtype)
        return jnp.swapaxes(x, 0, 1)

    return jax.tree_util.tree_map_with_path(one, tree)


def _in_expert_major_view(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    def init(params):
        return inner.init(expert_major(params))

    def update(updates, state, params=None):
        params = None if params is None else expert_major(params)
        updates, state = inner.update(expert_major(updates), state, params)
        return expert_major(updates), state

    return optax.GradientTransformation(init, update)


def make_optimizer(
    config: OptimConfig, schedule: Callable, trainable
) -> optax.GradientTransformation:
    """The gradient transformation for `trainable` (a tree or its abstract shapes).

    `schedule` maps the update count to the learning rate (k2jax.optim.make_schedule).
    """
    if config.name == "adamw":
        opt = optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    else:
        dims = muon_dimension_numbers(trainable)
        is_dim = lambda x: isinstance(x, MuonDimensionNumbers)  # noqa: E731
        if not any(map(is_dim, jax.tree.leaves(dims, is_leaf=is_dim))):
            raise ConfigError("optim.name = 'muon' but the trainable tree has no LoRA factors")
        adam_lr = schedule
        if config.adam_learning_rate is not None:
            ratio = config.adam_learning_rate / config.learning_rate
            adam_lr = lambda count: schedule(count) * ratio  # noqa: E731
        opt = muon(
            schedule,
            ns_coeffs=config.ns_coeffs,
            ns_steps=config.ns_steps,
            beta=config.muon_beta,
            eps=config.eps,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov,
            adam_b1=config.b1,
            adam_b2=config.b2,
            adam_weight_decay=config.adam_weight_decay,
            adam_learning_rate=adam_lr,
            muon_weight_dimension_numbers=dims,  # the last two axes: the same in either view
            consistent_rms=config.consistent_rms,
        )
    # Both optimizers hold their state in the expert-major view, which is where the train step
    # places optimizer state (k2jax.train.step): AdamW's moments are elementwise, so for it the
    # view only decides the layout, and a [L, E, ..] moment would not match the [E, L, ..]
    # sharding and be replicated on every device (76 GiB per GPU for full K2 at expert=8).
    opt = _in_expert_major_view(opt)
    if config.grad_clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
    return opt
