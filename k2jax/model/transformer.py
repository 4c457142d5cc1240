"""The decoder stack: embedding → dense layers → MoE layers → final norm → LM head.

    h = embed(tokens)
    for each layer:  h = h + MLA(RMSNorm_in(h));  h = h + FFN(RMSNorm_post(h))
    logits = lm_head(RMSNorm_final(h))

FFN is the dense SwiGLU for the first `first_k_dense_replace` layers and the MoE after. Each kind
of layer is one module scanned over a stacked [L, ...] copy of its weights (`nn.scan`), wrapped in
`nn.remat` with the configured policy, so compile time does not grow with depth (61 layers) and
activation memory is one layer's worth plus the scan carries.

Inputs are packed rows: `segment_ids` (1, 2, ... per example; 0 for padding) keep examples from
seeing each other, and `positions` restart at 0 for each example (RoPE).

Decoding: `init_cache` builds the "cache" collection — per stacked layer the MLA compressed cache
(normalised latent c_kv and rotated shared key k_rope, see k2jax.model.mla) — and
`Transformer.decode` runs tokens at given positions through the same layers with that collection
mutable, so prefill and each one-token step are ordinary `apply` calls (k2jax.generate drives them).
Without a "cache" collection nothing changes: the training path never sees it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from k2jax.config import ModelConfig
from k2jax.config.vision import VisionConfig
from k2jax.lora import LoraConfig
from k2jax.model import context_parallel as cp
from k2jax.model.layers import MLP, Embed, RMSNorm
from k2jax.model.loss import chunked_cross_entropy
from k2jax.model.mla import MLA
from k2jax.model.moe import MoE
from k2jax.model.options import ComputeConfig
from k2jax.model.vision import MoonViT, Projector, row_inputs
from k2jax.ops.einsum import einsum_acc
from k2jax.sharding.rules import constrain, token_axes


def layer_activation(compute: ComputeConfig) -> tuple:
    """Logical names of the [B, T, D] activations between layers (rows and sequence as the
    context-parallel mode lays them out, k2jax/model/context_parallel.py)."""
    return (*token_axes(compute.context_parallel), "act_embed")


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    compute: ComputeConfig
    lora: LoraConfig | None
    moe: bool

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        c = self.cfg
        x_BTD = constrain(x_BTD, layer_activation(self.compute))
        h = RMSNorm(c.rms_norm_eps, self.compute, name="input_layernorm")(x_BTD)
        attn, max_logit_H = MLA(c, self.compute, self.lora, name="self_attn")(
            h, positions_BT, segment_ids_BT
        )
        x_BTD = x_BTD + attn
        h = RMSNorm(c.rms_norm_eps, self.compute, name="post_attention_layernorm")(x_BTD)
        aux = {"max_logit": max_logit_H}
        if self.moe:
            y, moe_aux = MoE(c, self.compute, self.lora, name="mlp")(h)
            aux.update(moe_aux)
        else:
            y = MLP(c.intermediate_size, self.compute, self.lora, name="mlp")(h)
        x_BTD = constrain(x_BTD + y, layer_activation(self.compute))
        return x_BTD, aux


def _stack(cfg, compute, lora, *, moe: bool, length: int, name: str):
    layer = DecoderLayer
    policy = compute.remat_policy()
    if policy is not None:
        layer = nn.remat(layer, policy=policy, prevent_cse=False)
    scanned = nn.scan(
        layer,
        variable_axes={
            "params": 0,
            "lora": 0,
            "qk_clip": 0,
            "cache": 0,
            "ce_rows": 0,
            "ce_score": 0,
        },
        split_rngs={"params": True, "lora": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, compute, lora, moe, name=name)


class LMHead(nn.Module):
    """The untied output projection [V, D]; applied by the chunked loss or `Transformer.logits`."""

    vocab_size: int
    hidden_size: int
    compute: ComputeConfig

    def setup(self):
        self.weight = self.param(
            "weight",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (self.vocab_size, self.hidden_size),
            self.compute.jnp_param_dtype,
        )


class Transformer(nn.Module):
    """The whole model. Methods (use with `apply(..., method=...)`):

    __call__(tokens, positions, segment_ids) -> (final-normed hidden [B, T, D], aux)
    logits(tokens, ...) -> [B, T, V] in float32
    loss(tokens, targets, loss_mask, ...) -> dict of sums (see k2jax.model.loss) and aux

    With `vision` (Kimi-K2.5 / K2.6) the model also holds the vision tower and projector
    (k2jax.model.vision), and each method takes `images`: the per-row arrays of
    `vision.row_inputs` ({"pixel_values": [B, N, 3·P·P], ...}) — the image features of row b
    replace, in order, the embeddings of row b's image tokens (`vision.image_token_id`), one per
    merged patch group.
    """

    cfg: ModelConfig
    compute: ComputeConfig = ComputeConfig()
    lora: LoraConfig | None = None
    vision: VisionConfig | None = None

    def setup(self):
        c = self.cfg
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, self.compute)
        if c.num_dense_layers:
            self.dense_layers = _stack(
                c,
                self.compute,
                self.lora,
                moe=False,
                length=c.num_dense_layers,
                name="dense_layers",
            )
        if c.num_moe_layers:
            self.moe_layers = _stack(
                c, self.compute, self.lora, moe=True, length=c.num_moe_layers, name="moe_layers"
            )
        self.norm = RMSNorm(c.rms_norm_eps, self.compute)
        self.lm_head = LMHead(c.vocab_size, c.hidden_size, self.compute)
        if self.vision is not None:
            self.vision_tower = MoonViT(self.vision, self.compute, self.lora)
            self.mm_projector = Projector(self.vision, self.compute, self.lora)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, images=None):
        h, aux, n = self._hidden(tokens_BT, positions_BT, segment_ids_BT, images=images)
        return cp.from_layout(h, n), aux

    def _image_slots(self, tokens_BT, images):
        """(image features [B, M, D], slot [B, T]: the feature of its row each token takes, −1
        for none)."""
        if images is None:
            return None, None
        if self.vision is None:
            raise ValueError("images were passed to a model without a vision tower")
        merged = self.vision_tower(images["pixel_values"], images)
        features = self.mm_projector(merged)
        is_image = tokens_BT == self.vision.image_token_id
        slot = jnp.where(is_image, jnp.cumsum(is_image, axis=1) - 1, -1)
        return features, slot.astype(jnp.int32)

    def _hidden(self, tokens_BT, positions_BT, segment_ids_BT, *, decoding=False, images=None):
        """(final-normed hidden [B, T, D] in the context-parallel layout, aux, degree n): with
        n > 1 the rows are in zig-zag order (k2jax/model/context_parallel.py), else natural."""
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        n = 1
        if not (decoding or self.is_initializing()):
            n = cp.degree(self.compute.context_parallel)
        features, slot_BT = self._image_slots(tokens_BT, images)
        tokens_BT, positions_BT, segment_ids_BT = (
            cp.to_layout(x, n) for x in (tokens_BT, positions_BT, segment_ids_BT)
        )
        x = self.embed_tokens(tokens_BT)
        if features is not None:
            slot_BT = cp.to_layout(slot_BT, n)
            picked = jnp.take_along_axis(
                features.astype(x.dtype), jnp.maximum(slot_BT, 0)[..., None], axis=1
            )
            x = jnp.where((slot_BT >= 0)[..., None], picked, x)
        aux = {}
        if self.cfg.num_dense_layers:
            x, aux["dense"] = self.dense_layers(x, positions_BT, segment_ids_BT)
        if self.cfg.num_moe_layers:
            x, aux["moe"] = self.moe_layers(x, positions_BT, segment_ids_BT)
        return self.norm(x), aux, n

    def head_weight(self) -> jax.Array:
        return self.lm_head.weight

    def logits(self, tokens_BT, positions_BT=None, segment_ids_BT=None, images=None):
        h, _ = self(tokens_BT, positions_BT, segment_ids_BT, images)
        w = self.head_weight()
        return einsum_acc("btd,vd->btv", h, w.astype(h.dtype))

    def decode(self, tokens_BT, positions_BT, last_B=None, images=None):
        """Logits of tokens run through the KV cache (apply with a "cache" collection, mutable).

        Every token t of row b is written to cache slot positions[b, t] and attends to slots
        ≤ positions[b, t]. Returns float32 logits [B, T, V], or [B, V] at index last_B[b] of
        each row when `last_B` is given (a prefill needs only each prompt's last logits).
        `images` (per row, as in `__call__`) go with the prefill, which holds every image token.
        """
        h, _, _ = self._hidden(tokens_BT, positions_BT, None, decoding=True, images=images)
        if last_B is not None:
            h = h[jnp.arange(h.shape[0]), last_B]
        w = self.head_weight()
        return einsum_acc("...d,vd->...v", h, w.astype(h.dtype))

    def loss(
        self,
        tokens_BT,
        targets_BT,
        loss_mask_BT,
        positions_BT=None,
        segment_ids_BT=None,
        *,
        z_weight=0.0,
        images=None,
    ):
        h, aux, n = self._hidden(tokens_BT, positions_BT, segment_ids_BT, images=images)
        mode = self.compute.context_parallel
        flat = lambda x: cp.flatten_tokens(cp.to_layout(x, n), mode)  # noqa: E731
        sums = chunked_cross_entropy(
            cp.flatten_tokens(h, mode),
            self.head_weight(),
            flat(targets_BT),
            flat(loss_mask_BT),
            chunk=self.compute.loss_chunk_tokens,
            z_weight=z_weight,
        )
        return sums, aux


def init_variables(model: Transformer, rng: jax.Array, *, seq_len: int = 8, lora_rng=None) -> dict:
    """Random variables {"params": ..., "lora": ...} (boxed with logical axis names).

    Runs `logits` on a dummy batch so every weight (incl. the LM head) is created. Wrap in
    `jax.eval_shape` for abstract shapes without allocating anything.
    """
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    rngs = {"params": rng}
    if lora_rng is not None:
        rngs["lora"] = lora_rng
    images = None
    if model.vision is not None:  # one smallest image, so the vision weights are created too
        v = model.vision
        images = row_inputs(
            np.zeros((1, v.merge_size, v.patch_features), np.float32),
            [[[1, *v.merge_kernel]]],
            v,
        )
    # jit: un-jitted init of a scanned model runs op by op and is many times slower.
    return jax.jit(lambda r, im: model.init(r, tokens, None, None, im, method=Transformer.logits))(
        rngs, images
    )


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> dict:
    """An empty "cache" collection for `Transformer.decode`: per stack of layers
    {"self_attn": {"c_kv": [L, B, S, Rkv], "k_rope": [L, B, S, Dr]}} with S = max_len slots."""

    def stack(n):
        return {
            "self_attn": {
                "c_kv": jnp.zeros((n, batch, max_len, cfg.kv_lora_rank), dtype),
                "k_rope": jnp.zeros((n, batch, max_len, cfg.qk_rope_head_dim), dtype),
            }
        }

    cache = {}
    if cfg.num_dense_layers:
        cache["dense_layers"] = stack(cfg.num_dense_layers)
    if cfg.num_moe_layers:
        cache["moe_layers"] = stack(cfg.num_moe_layers)
    return cache
