"""A pure-torch stand-in for Transformer Engine's THD attention (tests only).

``thd_attention_reference`` has the signature of the kernel call that
``models.attention.prefix_thd_attention`` hands THD tensors to: per (query,
key) sequence pair of ``cu_seqlens_q`` / ``cu_seqlens_kv``, causal attention
aligned bottom-right (TE's ``padding_causal_bottom_right``): query i of a
sequence of sq queries over skv keys sees keys j <= i + skv - sq. A loop of
SDPA calls; on a GPU, TE runs the same metadata in one kernel.
"""

import itertools

import torch
import torch.nn.functional as F

from megatron_dpo.models.attention import PrefixTHDParams, SDPAttention, prefix_thd_attention


def thd_attention_reference(q_TND, k_TGD, v_TGD, params: PrefixTHDParams) -> torch.Tensor:
    """q [T, n, d], k / v [T_kv, g, d] -> [T, n, d]."""
    outs = []
    bounds_q = itertools.pairwise(params.cu_seqlens_q.tolist())
    bounds_kv = itertools.pairwise(params.cu_seqlens_kv.tolist())
    for (q_start, q_end), (kv_start, kv_end) in zip(bounds_q, bounds_kv, strict=True):
        num_q, num_kv = q_end - q_start, kv_end - kv_start
        assert num_q <= params.max_seqlen_q and num_kv <= params.max_seqlen_kv
        allowed = torch.ones(num_q, num_kv, dtype=torch.bool).tril(diagonal=num_kv - num_q)
        q, k, v = (t.transpose(0, 1) for t in (q_TND[q_start:q_end], k_TGD[kv_start:kv_end], v_TGD[kv_start:kv_end]))
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True).transpose(0, 1))
    return torch.cat(outs)


class ReferenceTHDAttention(SDPAttention):
    """SDPAttention that runs ``PrefixTHDParams`` rows through the reference:
    on the CPU, the TE core attention's code path with the kernel swapped."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if isinstance(packed_seq_params, PrefixTHDParams):
            return prefix_thd_attention(thd_attention_reference, query, key, value, packed_seq_params)
        return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
