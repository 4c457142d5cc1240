"""Multi-head Latent Attention (MLA), the training path (K2_FACTS §3.2).

    c_q  = RMSNorm(x·W_qaᵀ)                    [B, T, Rq]     q_a_proj, q_a_layernorm
    q    = c_q·W_qbᵀ → [B, T, H, Dn + Dr]       nope | rope     q_b_proj
    a    = x·W_kvaᵀ → c_kv [Rkv] | k_rope [Dr]                  kv_a_proj_with_mqa
    kv   = RMSNorm(c_kv)·W_kvbᵀ → [B, T, H, Dn + Dv]  k_nope | v kv_a_layernorm, kv_b_proj
    RoPE on q_rope (per head) and k_rope (one vector shared by all heads)
    out  = softmax(scale·(q_nope·k_nope + q_rope·k_rope), causal, per segment) · v → o_proj

The rotary key is kept as one [B, S, Dr] vector and never broadcast to H heads (see
k2jax/ops/attention.py). The layer also returns the per-head maximum pre-softmax logit, the
quantity MuonClip's QK-clip acts on.

QK-clip under LoRA. MuonClip rescales, per head h whose max logit exceeds τ, the rows of the query
and key projections: q_nope and k_nope by √γ_h, q_rope by γ_h (the shared rotary key is left
alone), so that head's logits shrink by exactly γ_h (K2_FACTS §5.2). With a frozen base we cannot
rescale W, and rescaling only the LoRA factors would not bound the logits when the base dominates.
So the rescaling is kept as three per-head factors in a separate "qk_clip" collection
([3, H]: q_nope, q_rope, k_nope; all ones at the start), applied to the effective (base + LoRA)
projections here. This is exactly MuonClip's rescaling of the merged weights; it is not trained, and
`k2jax merge` folds it into q_b_proj / kv_b_proj rows.

Decoding with a compressed cache. When the "cache" collection holds `c_kv` [B, S, Rkv] (the
*normalised* latent) and `k_rope` [B, S, Dr] (the shared rotary key, rotated), the layer writes its
new tokens into the cache at their positions and attends over the cache instead of over its own
tokens: (Rkv + Dr) numbers per token and layer (576 for Kimi-K2) instead of H·(Dn + Dr + Dv)
(20,480 for per-head keys and values) — a 35× smaller cache. Keys and values are never
expanded; W_kvb is absorbed into the query and the output ("weight absorption", DeepSeek-V2 §2.1.2):

    q_nope·k_nope(s) = q_nope·(W_kᵀ c_s) = (W_k q_nope)·c_s      per head, W_k = kv_b rows [Dn, Rkv]
    Σ_s p_s v(s)     = W_v Σ_s p_s c_s                             W_v = kv_b rows [Dv, Rkv]

so the scores are q_lat·c_s with q_lat = W_kᵀ q_nope ∈ R^Rkv per head, and the output is
W_v (Σ p c). Per decoded token this reads the cache once (B·S·(Rkv + Dr)) and costs
B·H·S·(Rkv + Dr) multiply-adds; the non-absorbed form would first expand the whole cache through
W_kvb (B·S·H·(Dn + Dv)·Rkv per step), which is what absorption avoids. LoRA on kv_b_proj
(W + s·B·A) is absorbed the same way without forming W + s·B·A: q_lat = W_kᵀq + s·Aᵀ(B_kᵀq) and
out = W_v o + s·B_v(A o), where A [r, Rkv] is shared by all heads and B splits into per-head
rows like W. The QK-clip factor of k_nope multiplies q_lat (a per-head scalar commutes with the
contraction); those of q_nope/q_rope act on the query as in training. Prefill runs the same path
with T prompt tokens (one code path; at prefill the absorbed form costs Rkv/Dn = 4× the
expanded form's score FLOPs, negligible next to the MLPs for chat-length prompts).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from k2jax.config import ModelConfig
from k2jax.lora import LoraConfig
from k2jax.model.context_parallel import degree, gathered_attention
from k2jax.model.layers import Linear, RMSNorm, module_path
from k2jax.model.options import ComputeConfig, accum_dtype
from k2jax.model.rope import apply_rope, rope_cos_sin, rope_parameters
from k2jax.ops.attention import attention, attention_mask
from k2jax.ops.einsum import einsum_acc


class MLA(nn.Module):
    cfg: ModelConfig
    compute: ComputeConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT) -> tuple[jax.Array, jax.Array]:
        c, kw = self.cfg, dict(compute=self.compute, lora=self.lora)
        B, T, _ = x_BTD.shape
        H, Dn, Dr, Dv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim

        cq = Linear(c.q_lora_rank, ("q_lora", "embed"), name="q_a_proj", **kw)(x_BTD)
        cq = RMSNorm(c.latent_eps, self.compute, "q_lora", name="q_a_layernorm")(cq)
        q = Linear(H * (Dn + Dr), ("heads", "q_lora"), name="q_b_proj", **kw)(cq)
        q = q.reshape(B, T, H, Dn + Dr)
        q_nope, q_rope = q[..., :Dn], q[..., Dn:]

        a = Linear(c.kv_lora_rank + Dr, ("kv_a", "embed"), name="kv_a_proj_with_mqa", **kw)(x_BTD)
        c_kv, k_rope = a[..., : c.kv_lora_rank], a[..., c.kv_lora_rank :]
        c_kv = RMSNorm(c.latent_eps, self.compute, "kv_lora", name="kv_a_layernorm")(c_kv)
        if self.has_variable("cache", "c_kv"):
            out, max_logit_H = self._cached_attention(q_nope, q_rope, c_kv, k_rope, positions_BT)
            out = Linear(c.hidden_size, ("embed", "heads"), name="o_proj", **kw)(
                out.reshape(B, T, H * Dv)
            )
            return out, max_logit_H
        if degree(self.compute.context_parallel) > 1 and not self.is_initializing():
            out, max_logit_H = self._context_parallel_attention(
                q_nope, q_rope, c_kv, k_rope, positions_BT, segment_ids_BT
            )
            out = Linear(c.hidden_size, ("embed", "heads"), name="o_proj", **kw)(
                out.reshape(B, T, H * Dv)
            )
            return checkpoint_name(out, "attn_out"), max_logit_H
        kv = Linear(H * (Dn + Dv), ("heads", "kv_lora"), name="kv_b_proj", **kw)(c_kv)
        kv = kv.reshape(B, T, H, Dn + Dv)
        k_nope, v = kv[..., :Dn], kv[..., Dn:]

        # Created with the LoRA variables at init; absent (= all ones) when not passed to apply.
        if (self.lora is not None and self.is_initializing()) or self.has_variable(
            "qk_clip", "scales"
        ):
            scales = self.variable(
                "qk_clip",
                "scales",
                nn.with_logical_partitioning(
                    lambda: jnp.ones((3, H), jnp.float32), ("qk_clip_part", "qk_clip_heads")
                ),
            )
            s_qn, s_qr, s_kn = (s[:, None].astype(q.dtype) for s in scales.value)
            q_nope, q_rope, k_nope = q_nope * s_qn, q_rope * s_qr, k_nope * s_kn

        inv_freq, attention_factor = rope_parameters(c)
        cos, sin = rope_cos_sin(positions_BT, inv_freq, attention_factor, q_rope.dtype)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope, cos, sin)

        out, max_logit_H = attention(
            q_nope,
            q_rope,
            k_nope,
            k_rope,
            v,
            scale=c.softmax_scale,
            q_segment_ids=segment_ids_BT,
            kv_segment_ids=segment_ids_BT,
            impl=self.compute.attention_impl,
        )
        out = Linear(c.hidden_size, ("embed", "heads"), name="o_proj", **kw)(
            out.reshape(B, T, H * Dv)
        )
        return checkpoint_name(out, "attn_out"), max_logit_H

    def _context_parallel_attention(self, q_nope, q_rope, c_kv, k_rope, positions_BT, seg_BT):
        """The training path with the row split along the sequence (k2jax/model/
        context_parallel.py): the same arithmetic as above, with kv_b_proj applied inside the
        gathered region. Returns ([B, T, H, Dv] in layout order, max logit [H])."""
        c = self.cfg
        dtype = q_nope.dtype
        q_nope, q_rope, k_rope, s_kn = self._clip_and_rotate(q_nope, q_rope, k_rope, positions_BT)

        w = self.variables["params"]["kv_b_proj"]["weight"]
        lora, scale = None, 1.0
        factors = self.variables.get("lora", {}).get("kv_b_proj")
        if self.lora is not None and factors is not None:
            x = None  # the adapter's input is the latent itself: gathered once
            if self.lora.dropout > 0 and self.has_rng("dropout"):
                # one mask per token, drawn where the token lives, as in layers.Linear
                x = nn.Dropout(self.lora.dropout, deterministic=False, name="kv_b_dropout")(
                    c_kv.astype(dtype)
                )
            lora, scale = (factors["lora_A"], factors["lora_B"], x), self.lora.scale
        return gathered_attention(
            q_nope,
            q_rope,
            c_kv,
            k_rope,
            seg_BT,
            w,
            lora,
            s_kn,
            mode=self.compute.context_parallel,
            scale=c.softmax_scale,
            impl=self.compute.attention_impl,
            dtype=dtype,
            lora_scale=scale,
        )

    def _clip_and_rotate(self, q_nope, q_rope, k_rope, positions_BT):
        """The query's QK-clip factors applied (the key's, s_kn, returned: each path applies it
        where its keys are formed) and RoPE on the query and the shared key."""
        s_kn = None
        if self.has_variable("qk_clip", "scales"):
            s_qn, s_qr, s_kn = self.get_variable("qk_clip", "scales")
            q_nope = q_nope * s_qn[:, None].astype(q_nope.dtype)
            q_rope = q_rope * s_qr[:, None].astype(q_rope.dtype)
        inv_freq, attention_factor = rope_parameters(self.cfg)
        cos, sin = rope_cos_sin(positions_BT, inv_freq, attention_factor, q_rope.dtype)
        return q_nope, apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin), s_kn

    def _cached_attention(self, q_nope, q_rope, c_kv_BTC, k_rope_BTR, positions_BT):
        """Writes this step's latent and rotary key into the cache at `positions_BT` and attends
        over the cache in the absorbed form (module docstring). Returns ([B, T, H, Dv], max
        logit [H])."""
        c = self.cfg
        B, T, H, Dn = q_nope.shape
        Dv, C = c.v_head_dim, c.kv_lora_rank
        dtype = q_nope.dtype
        f32 = accum_dtype(dtype)

        q_nope, q_rope, k_rope_BTR, s_kn = self._clip_and_rotate(
            q_nope, q_rope, k_rope_BTR, positions_BT
        )

        # Write the new tokens. Row b's token t goes to slot positions[b, t]: rows may sit at
        # different lengths, and a right-padded prefill writes padding only past a row's end,
        # where the row's next real token overwrites it before any query can see it.
        cache_c = self.variable("cache", "c_kv", lambda: None)
        cache_r = self.variable("cache", "k_rope", lambda: None)
        rows = jnp.arange(B)[:, None]
        cache_c.value = cache_c.value.at[rows, positions_BT].set(
            c_kv_BTC.astype(cache_c.value.dtype)
        )
        cache_r.value = cache_r.value.at[rows, positions_BT].set(
            k_rope_BTR.astype(cache_r.value.dtype)
        )
        c_BSC = cache_c.value.astype(dtype)
        r_BSR = cache_r.value.astype(dtype)

        # kv_b_proj [H·(Dn + Dv), C] split per head into the key part W_k and the value part W_v.
        w = self.variables["params"]["kv_b_proj"]["weight"].astype(dtype).reshape(H, Dn + Dv, C)
        w_k, w_v = w[:, :Dn], w[:, Dn:]
        q_lat = einsum_acc("bthd,hdc->bthc", q_nope, w_k)
        lora = self._kv_b_lora()
        if lora is not None:
            a_RC, b_HDR, scale = lora
            t = jnp.einsum("bthd,hdr->bthr", q_nope, b_HDR[:, :Dn].astype(dtype))
            q_lat += scale * einsum_acc("bthr,rc->bthc", t, a_RC.astype(dtype))
        if s_kn is not None:
            q_lat = q_lat * s_kn[:, None].astype(f32)
        q_lat = q_lat.astype(dtype)

        logits = einsum_acc("bthc,bsc->bhts", q_lat, c_BSC)
        logits += einsum_acc("bthr,bsr->bhts", q_rope, r_BSR)
        logits = logits * c.softmax_scale
        ones_q = jnp.ones((B, T), jnp.int32)
        ones_k = jnp.ones((B, c_BSC.shape[1]), jnp.int32)
        visible = attention_mask(ones_q, ones_k, positions_BT)
        logits = jnp.where(visible, logits, jnp.finfo(f32).min)
        max_logit_H = jnp.max(logits, axis=(0, 2, 3))
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)

        o_lat = einsum_acc("bhts,bsc->bthc", probs, c_BSC).astype(dtype)
        out = einsum_acc("bthc,hvc->bthv", o_lat, w_v)
        if lora is not None:
            a_RC, b_HDR, scale = lora
            t = jnp.einsum("bthc,rc->bthr", o_lat, a_RC.astype(dtype)) * scale
            out += einsum_acc("bthr,hvr->bthv", t.astype(dtype), b_HDR[:, Dn:].astype(dtype))
        return out.astype(dtype), max_logit_H

    def _kv_b_lora(self):
        """(A [r, Rkv], B per head [H, Dn + Dv, r], scale) of kv_b_proj's adapter, or None."""
        if self.lora is None or not self.lora.applies_to(f"{module_path(self)}.kv_b_proj"):
            return None
        lora = self.variables.get("lora", {}).get("kv_b_proj")
        if lora is None:
            return None
        H, r = self.cfg.num_attention_heads, lora["lora_A"].shape[0]
        return lora["lora_A"], lora["lora_B"].reshape(H, -1, r), self.lora.scale
