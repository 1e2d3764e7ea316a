"""Transformer Engine attention for prefix-shared rows: the GPU-only piece.

Imported only where TE is importable (models/build.py). Everything around the
kernel call, the THD metadata (data/packing.py) and the K/V gather
(``attention.prefix_thd_attention``), is plain torch and tested on the CPU
against a reference; this file only hands the THD tensors to TE.

Why TE's own ``forward`` and not megatron's wrapper: megatron-core 0.16.1's
``TEDotProductAttention.forward`` takes megatron's ``AttnMaskType``, which has
no ``padding_causal_bottom_right`` (THD needs a "padding" type, and the
rejected queries need bottom-right alignment). TE (>= 2.9, the gpu extra)
runs that mask in THD on its FlashAttention and cuDNN backends.
"""

from megatron.core.extensions.transformer_engine import TEDotProductAttention
from transformer_engine.pytorch import DotProductAttention

from megatron_dpo.models.attention import PrefixTHDParams, prefix_thd_attention


class TEPrefixSharedAttention(TEDotProductAttention):
    """megatron's TE core attention; a ``PrefixTHDParams`` row runs as THD
    with ``cu_seqlens_q`` != ``cu_seqlens_kv``, causal aligned bottom-right."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if not isinstance(packed_seq_params, PrefixTHDParams):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)
        assert attention_bias is None and self.config.context_parallel_size == 1, \
            "prefix-shared THD attention: no attention bias, no context parallelism"
        return prefix_thd_attention(self._thd, query, key, value, packed_seq_params)

    def _thd(self, q_TND, k_TGD, v_TGD, params: PrefixTHDParams):
        return DotProductAttention.forward(
            self, q_TND, k_TGD, v_TGD, qkv_format="thd",
            cu_seqlens_q=params.cu_seqlens_q, cu_seqlens_kv=params.cu_seqlens_kv,
            max_seqlen_q=params.max_seqlen_q, max_seqlen_kv=params.max_seqlen_kv,
            attn_mask_type="padding_causal_bottom_right",
        )
