"""The optimizer: Muon for every LoRA factor (batched over layers and experts), AdamW for the rest.

What trains. The optimizer sees one pytree, the *trainable* tree

    {"lora":   LoRA factors, fp32  (lora_A [.., r, in], lora_B [.., out, r]; leading [L] or [L, E])
     "params": the optionally trainable base weights (router, norms), fp32 master copies}

and never the frozen base, which therefore has no optimizer state at all.

Muon (K2_FACTS §5.1, §5.3). Every LoRA factor — each expert's of each layer on its own — gets
exactly `optax.contrib.muon`'s update: EMA momentum with bias correction and Nesterov, five
Newton–Schulz (NS) steps (coefficients 3.4445, −4.7750, 2.0315) on the momentum normalised by its
Frobenius norm (+ eps), a scale of 0.2·√max(fan_in, fan_out) (`consistent_rms=0.2`, Moonlight's
rule that matches AdamW's update RMS, so AdamW learning rates carry over; None: optax's
√max(1, fan_out/fan_in)), decoupled weight decay (× lr) and the learning rate. Leaves that are not
LoRA factors — the trainable base weights — go to optax's AdamW (`adam_*` settings, Nesterov as
optax's muon passes it). Both sit in the `optax.partition` that optax's muon builds, with optax's
own states, so the optimizer state is optax's leaf for leaf (same pytree, same checkpoints).

Newton–Schulz in the r×r Gram space. A factor is an r×n matrix with r ≪ n (A [r, in]; B [out, r]
read transposed, optax's rule for tall matrices; r = 16 against 7168 or 2048 at K2). One NS step
X ← aX + b(XXᵀ)X + c(XXᵀ)²X multiplies X from the left by a polynomial in XXᵀ, so X_k = P_k·X₀
with P_k an r×r polynomial in G = X₀X₀ᵀ (symmetric, commuting with G). With A_k = X_kX_kᵀ =
P_k·G·P_k and h_k = aI + bA_k + cA_k²:

    P₀ = I, A₀ = G;    P_{k+1} = h_k·P_k,    A_{k+1} = h_k·A_k·h_k,

steps on r×r matrices only; the r×n matrix is read for G (whose trace is ‖x‖_F², so the
normalisation X₀ = x/(‖x‖_F + eps) becomes a scalar on G and P) and for X_k = P_k·X₀. What the
full form does not have: A_k carries G's float32 rounding (absolute, eps·‖G‖) amplified by P_k²,
up to a²ᵏ ≈ 12ᵏ in the directions NS is still growing, where the full form recomputes A_k from X_k
at every step. All five steps on one G lose digits on momenta whose singular values span ≥ 10²,
which real ones do: on the tiny model's first-step gradients (rank-deficient experts, which got
few tokens) that came out up to 7.7e-4 off float64 where optax's float32 full form is 4.5e-5,
and broke the mesh-vs-one-device step test (tests/test_train.py). So every
GRAM_SEGMENT_STEPS = 3 steps at most the iterate X_k is formed and its Gram matrix recomputed:
five steps run as 2 + 3, reading the r×n matrix 4 times instead of optax's 10 (2.6× fewer FLOPs;
the crossover is n = 1.5 r, which no LoRA factor is near), and stay near the full form's own
float32 error: ≤ 3e-5 off float64 on those gradients (optax: 4.5e-5), ≤ 4e-5 on spectra spanning
up to 10⁶ (optax: 2e-5; one G: 4e-3), tests/test_muon_gram.py.
Products run at HIGHEST precision: a GPU's default float32 matmul is TF32 (JAX's "Matmul
precision" page), under which the full form — what ran before — is 1.6e-3 to 7e-3 off float64 on
every input (simulated on CPU); HIGHEST is free at r×r and the r×n products are memory-bound.
Temporaries: one factor-sized iterate instead of every step's; for full K2 on 8 GPUs (`k2jax
plan`) the step's peak temporaries fall from 21.66 to 13.29 GiB per device, the same as with no
Newton–Schulz at all — the optimizer no longer sets the peak. The batch axes (layers, experts) are
einsum batch axes: no vmap, no reshape, so an expert-sharded leaf is orthogonalised where it lives.

Experts first. The routed experts' factors are stacked [L, E, ..] with E sharded over the mesh.
The optimizer runs on, and keeps its state in, an *expert-major view* of the tree — those leaves
transposed to [E, L, ..] (a local transpose; `expert_major`; the trainer derives the state's
shardings from it). It was needed when Muon was optax's: optax flattens all batch axes into one
before its vmap ([L, E] → [L·E]), and with the sharded axis minor that merged axis has no block
layout, so XLA all-gathered every expert's factor onto every device (~40 GB for K2 at rank 16).
The Gram-space NS never flattens, but the view still fixes the layout of the momenta (and of
AdamW's, see `make_optimizer`), and a [E, L]-major state keeps checkpoints as they were.

`name = "adamw"` trains everything with plain AdamW instead (the usual LoRA optimizer; the issue
asks that the loss fall with each).

Both are preceded by global-norm clipping of the gradient (`grad_clip_norm`). QK-clip, MuonClip's
other half, acts after the update on the separate "qk_clip" variables (k2jax.optim.qk_clip).

Rejected alternatives. `optax.contrib.muon` as it is (what we used first): it is tested, and its
differences from Moonlight's reference (EMA momentum with bias correction instead of a plain sum;
equal up to a scalar that the Frobenius normalisation removes) are documented in K2_FACTS §5.3; but
it runs NS on the full r×n matrices, and it has no hook for the orthogonaliser (`scale_by_muon`
calls `orthogonalize_via_newton_schulz` directly). So we own only what that forces:
`scale_by_muon`'s update (its ~10 lines of momentum, written with optax's own tree helpers; the
state comes from optax's `scale_by_muon(...).init`) and the shape scale (optax's `scale_by_shape`
lives in a private module), and chain optax's weight decay, learning rate, AdamW and partition.
The tests keep `optax.contrib.muon` as the oracle, leaf for leaf and step by step. A thin QR,
X₀ = L·Q and NS(X₀) = NS(L)·Q, would not square the condition number at all, but needs a
Householder QR of every factor, a solver call per matrix on GPU that nobody has measured here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

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


# Newton–Schulz steps per Gram matrix: after this many, the iterate is formed explicitly and its
# Gram matrix recomputed (module docstring: fewer lose float32 digits to G's squared conditioning).
GRAM_SEGMENT_STEPS = 3


def _segments(steps: int) -> list[int]:
    """`steps` split into ⌈steps / GRAM_SEGMENT_STEPS⌉ near-equal runs, the longer ones last
    (5 → [2, 3])."""
    n = -(-steps // GRAM_SEGMENT_STEPS)
    return [steps // n + (i >= n - steps % n) for i in range(n)]


def orthogonalize_in_gram_space(x: jax.Array, ns_coeffs: jax.Array, eps: float) -> jax.Array:
    """optax's Frobenius-preconditioned Newton–Schulz orthogonalisation of the matrices in the
    last two axes of `x` (every leading axis is a batch axis), run on their s×s Gram matrices,
    s = min of the two axes.

    `ns_coeffs` is [steps, 3]: one (a, b, c) per step. The result equals
    `optax.contrib._muon.orthogonalize_via_newton_schulz(x, ns_coeffs, steps, "frobenius", eps,
    LORA_DIMENSION_NUMBERS)` up to float32 rounding; the module docstring has the derivation.
    """
    m, n = x.shape[-2:]
    hi = jax.lax.Precision.HIGHEST  # not TF32 on GPU: G squares the condition number
    mm = lambda p, q: jnp.matmul(p, q, precision=hi)  # noqa: E731
    # optax transposes a tall matrix (m > n) and iterates on the wide one, X = xᵀ; so do we,
    # without the copy: G = X Xᵀ = xᵀx is the Gram matrix of the short side, (P·xᵀ)ᵀ = x·Pᵀ.
    if m <= n:
        gram_of = lambda y: jnp.einsum("...ik,...jk->...ij", y, y, precision=hi)  # noqa: E731
        apply = lambda p, y: jnp.einsum("...ij,...jk->...ik", p, y, precision=hi)  # noqa: E731
    else:
        gram_of = lambda y: jnp.einsum("...ki,...kj->...ij", y, y, precision=hi)  # noqa: E731
        apply = lambda p, y: jnp.einsum("...ki,...ji->...kj", y, p, precision=hi)  # noqa: E731
    eye = jnp.eye(min(m, n), dtype=x.dtype)
    coeffs = ns_coeffs.astype(x.dtype)
    y, k = x, 0
    for segment, length in enumerate(_segments(coeffs.shape[0])):
        gram = gram_of(y)  # A = Y Yᵀ of the current iterate Y (X₀ up to its scale, then X_k)
        scale = jnp.ones((), x.dtype)
        if segment == 0:
            # X₀ = x / (‖x‖_F + eps), and ‖x‖_F² = trace(x xᵀ): no pass over x of its own.
            norm = jnp.sqrt(jnp.trace(gram, axis1=-2, axis2=-1))[..., None, None]
            scale = 1.0 / (norm + eps)
            gram = gram * (scale * scale)
        poly = None  # P, with X_k = P·Y
        for step in range(length):
            a, b, c = coeffs[k, 0], coeffs[k, 1], coeffs[k, 2]
            h = a * eye + b * gram + c * mm(gram, gram)  # h(A_k) = aI + bA_k + cA_k²
            poly = h if poly is None else mm(h, poly)  # P_{k+1} = h(A_k)·P_k
            if step + 1 < length:
                gram = mm(mm(h, gram), h)  # A_{k+1} = X_{k+1}X_{k+1}ᵀ = h(A_k)·A_k·h(A_k)
            k += 1
        y = apply(poly * scale, y)  # X_k = P·Y, explicitly
    return y


def scale_by_muon_in_gram_space(
    ns_coeffs: tuple[float, float, float],
    ns_steps: int,
    beta: float,
    eps: float,
    *,
    nesterov: bool,
) -> optax.GradientTransformation:
    """`optax.contrib.scale_by_muon` for leaves whose last two axes are the matrix (the others
    batch axes), with `orthogonalize_in_gram_space` as its orthogonaliser: optax's init and state
    (`MuonState`), optax's momentum, written with optax's tree helpers as optax 0.2.8 writes it."""
    reference = optax.contrib.scale_by_muon(
        ns_coeffs=ns_coeffs, ns_steps=ns_steps, beta=beta, eps=eps, nesterov=nesterov
    )

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        if nesterov:
            mu_hat = jax.tree.map(
                lambda m, g: beta * m + (1 - beta) * g,
                optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                optax.tree.bias_correction(updates, beta, count),
            )
        else:
            mu_hat = optax.tree.bias_correction(mu, beta, count)
        coeffs = state.ns_coeffs  # (3,): the same each step; (steps, 3): one row per step
        if coeffs.ndim == 1:
            coeffs = jnp.broadcast_to(coeffs, (ns_steps, 3))
        updates = jax.tree.map(lambda x: orthogonalize_in_gram_space(x, coeffs, eps), mu_hat)
        return updates, state._replace(count=count, mu=mu)

    return optax.GradientTransformation(reference.init, update)


def _scale_by_shape(consistent_rms: float | None) -> optax.GradientTransformation:
    """optax.contrib's `scale_by_shape` for LORA_DIMENSION_NUMBERS (fan_in = the last axis,
    fan_out = the one before): × consistent_rms·√max(fan_in, fan_out), or × √max(1, out/in)."""

    def one(u):
        fan_out, fan_in = u.shape[-2:]
        if consistent_rms is not None:
            return jnp.sqrt(jnp.maximum(fan_in, fan_out)) * consistent_rms * u
        return jnp.sqrt(jnp.maximum(1, fan_out / fan_in)) * u

    return optax.GradientTransformation(
        optax.init_empty_state,
        lambda updates, state, params=None: (jax.tree.map(one, updates), state),
    )


def _muon(
    config: OptimConfig, schedule: Callable, adam_lr: Callable
) -> optax.GradientTransformation:
    """`optax.contrib.muon` with its dimension numbers = LORA_DIMENSION_NUMBERS on the LoRA
    factors and None elsewhere, with its Newton–Schulz run in Gram space: the same partition,
    chain and states (so the same pytree), the same numbers up to float32 rounding."""

    def labels(tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "muon" if _leaf_name(path) in LORA_LEAVES else "adam", tree
        )

    muon_part = optax.chain(
        scale_by_muon_in_gram_space(
            config.ns_coeffs,
            config.ns_steps,
            config.muon_beta,
            config.eps,
            nesterov=config.nesterov,
        ),
        _scale_by_shape(config.consistent_rms),
        optax.add_decayed_weights(config.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
    adam_part = optax.adamw(
        adam_lr,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        eps_root=0.0,
        weight_decay=config.adam_weight_decay,
        nesterov=config.nesterov,
    )
    return optax.partition({"muon": muon_part, "adam": adam_part}, labels)


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
        opt = _muon(config, schedule, adam_lr)
    # Both optimizers hold their state in the expert-major view, which is where the train step
    # places optimizer state (k2jax.train.step): AdamW's moments are elementwise, so for it the
    # view only decides the layout, and a [L, E, ..] moment would not match the [E, L, ..]
    # sharding and be replicated on every device (76 GiB per GPU for full K2 at expert=8).
    opt = _in_expert_major_view(opt)
    if config.grad_clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
    return opt
