"""A DiT transformer block with its adaLN inside the quantize launches (the exported model's
packed layers and the QAT student's fused layers alike).

diffusers' ``BasicTransformerBlock`` (``norm_type="ada_norm_zero"``) computes, per block,

    x = x + gate_msa * Attn(LN(x) * (1 + scale_msa) + shift_msa)
    x = x + gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp)

with the LayerNorm, the scale and the shift as three passes over the 8192 x 1152 residual stream
for each of the two norms (DiT-XL/2 at batch 32, H100: ~4.4 ms of a 22 ms bf16 forward). Here the
rotate+quantize launch of q/k/v and of fc1 reads x and computes the norm and modulation itself
(``linears(..., norm=...)``: ``robuq.deploy.modules.packed_linears`` or, in QAT,
``robuq.kernels.qat.fused_linears``, whose backward kernel also goes back through the modulation
and the LayerNorm), and each gated residual is one vectorized pass at inference
(``robuq.kernels.residual``). The weights, the results (up to one bf16 rounding of the modulated
input) and the module tree are diffusers'.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.activations import GELU
from torch import nn

from .attention import SharedQKVAttnProcessor, self_attention
from .residual import gated_residual


def _plain_layer_norm(m) -> bool:
    return isinstance(m, nn.LayerNorm) and not m.elementwise_affine


def can_fuse_norms(block: nn.Module, can_share: Callable) -> bool:
    """A DiT block (adaLN-Zero with its own timestep/class embedder, self-attention only, GELU MLP)
    whose q/k/v share one launch (a ``SharedQKVAttnProcessor``) and whose fc1 ``can_share([fc1])``."""
    if not isinstance(block, BasicTransformerBlock) or block.norm_type != "ada_norm_zero":
        return False
    ff, n1 = block.ff, block.norm1
    return (block.attn2 is None and block.pos_embed is None and block._chunk_size is None
            and getattr(n1, "emb", None) is not None and _plain_layer_norm(n1.norm) and _plain_layer_norm(block.norm3)
            and isinstance(block.attn1.processor, SharedQKVAttnProcessor)
            and isinstance(ff.net[0], GELU) and can_share([ff.net[0].proj]))


def _fused_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                   timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
    if attention_mask is not None or encoder_hidden_states is not None or cross_attention_kwargs or hidden_states.ndim != 3:
        return BasicTransformerBlock.forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                             encoder_attention_mask, timestep, cross_attention_kwargs, class_labels,
                                             added_cond_kwargs)
    # diffusers' patch embedding hands the blocks a transposed view ([B, K, T] memory), which every
    # elementwise op after it keeps: one copy here (a no-op after the first block) lets the launches
    # read x without a copy each and the residual updates run as vectorized kernels
    hidden_states = hidden_states.contiguous()
    n1, linears = self.norm1, self.attn1.processor.linears
    emb = n1.linear(n1.silu(n1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    attn = self_attention(self.attn1, hidden_states, linears, norm=(scale_msa, shift_msa, n1.norm.eps))
    hidden_states = gated_residual(hidden_states, gate_msa, attn)
    ff = self.ff
    h = linears([ff.net[0].proj], hidden_states, norm=(scale_mlp, shift_mlp, self.norm3.eps))[0]
    if "_robuq_linears" in ff.__dict__:  # the GELU inside fc2's kernels (robuq.kernels.mlp)
        out = ff._robuq_linears([ff.net[2]], h, act="gelu_tanh")[0]
    else:
        out = ff.net[0].gelu(h)
        for layer in ff.net[1:]:  # dropout (identity in eval), fc2
            out = layer(out)
    return gated_residual(hidden_states, gate_mlp, out)


def fuse_block_norms(model: nn.Module, can_share: Callable, enabled: bool = True) -> list[str]:
    """Give every block of ``model`` that ``can_fuse_norms`` the fused forward (an instance
    override: parameters, names and checkpoints are unchanged; ``enabled=False`` restores
    diffusers' forward). Returns the blocks' names."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, BasicTransformerBlock):
            m.__dict__.pop("forward", None)
            if enabled and can_fuse_norms(m, can_share):
                m.forward = types.MethodType(_fused_forward, m)
                names.append(name)
    return names
