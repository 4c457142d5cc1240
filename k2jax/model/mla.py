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
"""

from __future__ import annotations

import flax.linen as nn
import jax
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
