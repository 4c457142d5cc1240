"""The Kimi-K2 model in functional Flax (linen).

Dimension key used in names and einsum strings throughout the model package:

    B  batch                 T  query positions          S  key positions
    D  hidden (embed)        V  vocabulary               N  tokens (B·T flattened)
    H  attention heads       Dn qk_nope_head_dim         Dr qk_rope_head_dim     Dv v_head_dim
    Rq q_lora_rank           Rkv kv_lora_rank            F  MLP / expert intermediate width
    E  routed experts        K  experts per token (top-k) G  expert groups (n_group)
    R  LoRA rank             L  stacked layers

Parameters are named after the Hugging Face tensors (`self_attn.q_a_proj.weight` is
`params[...]["self_attn"]["q_a_proj"]["weight"]`, in HF's [out, in] layout), so the checkpoint
converter is a short map. Layers are stacked: `dense_layers` (the first `first_k_dense_replace`)
and `moe_layers` carry a leading [L] axis and run under `nn.scan`. Routed experts are stacked too
([E, ...]) with gate and up fused as `experts.gate_up_proj` [E, 2F, D] (gate rows first), the
layout transformers uses in memory.
"""

from k2jax.model.options import ComputeConfig
from k2jax.model.transformer import Transformer

__all__ = ["ComputeConfig", "Transformer"]
