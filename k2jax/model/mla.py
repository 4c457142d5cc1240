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
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from k2jax.config import ModelConfig
from k2jax.lora import LoraConfig
from k2jax.model.layers import Linear, RMSNorm
from k2jax.model.options import ComputeConfig
from k2jax.model.rope import apply_rope, rope_cos_sin, rope_parameters
from k2jax.ops.attention import attention


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
