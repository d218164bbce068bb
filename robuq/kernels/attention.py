"""A diffusers attention processor that computes q, k and v with one call, so the three
projections of a self-attention can share one rotate+quantize launch (they read the same input
through the same Hadamard rotation; each keeps its own quantizer and weights)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


class SharedQKVAttnProcessor(AttnProcessor2_0):
    """``AttnProcessor2_0`` whose self-attention takes q, k, v from ``linears([to_q, to_k, to_v], x)``
    (same results as three calls). Any other call (cross-attention, masks, 4-D input) is the parent's."""

    def __init__(self, linears: Callable):
        super().__init__()
        self.linears = linears

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if (encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3
                or attn.spatial_norm is not None or attn.group_norm is not None or args or kwargs):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self_attention(attn, hidden_states, self.linears)


def self_attention(attn: Attention, hidden_states, linears: Callable, **linears_kwargs):
    """``AttnProcessor2_0``'s self-attention (3-D input, no mask) with q, k, v from
    ``linears([to_q, to_k, to_v], hidden_states, **linears_kwargs)``."""
    b = hidden_states.shape[0]
    q, k, v = [t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
               for t in linears([attn.to_q, attn.to_k, attn.to_v], hidden_states, **linears_kwargs)]
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3]).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor


def share_qkv(model, can_share: Callable, linears: Callable, enabled: bool = True) -> list[str]:
    """Give every ``Attention`` of ``model`` whose q, k, v ``can_share`` a ``SharedQKVAttnProcessor``
    over ``linears`` (``enabled=False``: restore the processors it replaced). Returns their names."""
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, Attention):
            continue
        old = m.__dict__.pop("_robuq_processor", None)
        if old is not None:
            m.set_processor(old)
        if enabled and can_share([m.to_q, m.to_k, m.to_v]):
            m.__dict__["_robuq_processor"] = m.processor
            m.set_processor(SharedQKVAttnProcessor(linears))
            names.append(name)
    return names
