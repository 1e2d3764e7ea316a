"""Attention for padded and packed micro-batches (data/packing.py).

- ``SDPAttention``: a core-attention module (megatron's ``DotProductAttention``
  interface) on torch's ``scaled_dot_product_attention``. It replaces the local
  spec's ``DotProductAttention``, which materialises [b, n, s, s] scores and
  softmax (with it, forward + backward of the benchmark model, hidden 256 x 4
  layers on 16 x 512 padded tokens, took 1.4x as long on CPU). For a packed row it
  runs SDPA per segment, so no time goes to the cross-segment blocks a dense
  [T, T] mask would compute and throw away; a prefix-shared segment runs as
  two calls (prompt + chosen causally, then rejected over prompt + itself).
- ``SegmentedSeqParams``: the packed row's segments, passed through megatron as
  ``packed_seq_params``. Its ``qkv_format`` is "sbhd": megatron then treats the
  row like any [s, b=1] batch and hands the params on to core attention.
- ``PositionedGPTModel``: GPTModel whose logits come without a transposed
  copy (``compute_language_model_loss``), and whose RoPE follows ``position_ids`` for
  segmented rows. megatron-core 0.16.1 rotates position i of a row by angle i
  (``GPTModel._preprocess`` ignores position_ids for RoPE); a packed row needs
  positions restarting per segment, and prefix sharing needs the rejected
  branch to continue from the prompt's end. It also gives the embedding
  output canonical strides (see ``canonical_strides``).
- With Transformer Engine, plain packing uses TE's own packed format instead
  (THD, ``PackedSeqParams`` with ``cu_seqlens``): TE applies RoPE per sequence.
- ``PrefixTHDParams``: a prefix-shared row for TE (models/te_attention.py).
  A rejected branch attends to [shared prompt; rejected] keys: causal attention
  aligned bottom-right, THD with ``cu_seqlens_q`` != ``cu_seqlens_kv``. Its keys
  are not contiguous in the row, so ``prefix_thd_attention`` gathers the key
  sequences (``kv_index``, data/packing.py: the prompt's K/V once more per
  pair) and hands THD tensors to a kernel. Its ``qkv_format`` stays "sbhd":
  megatron then applies RoPE by position (``PositionedGPTModel``), as for
  ``SegmentedSeqParams``, instead of restarting it per THD sequence. All of its
  metadata is built on the CPU in collate: no host sync in the forward.

Legend: T = packed row length, n = heads (this TP rank), g = query groups
(this TP rank), d = head dim.
"""

import math
from dataclasses import dataclass, field, replace
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule


@dataclass
class Segment:
    """A segment of a packed row, as lengths: ``causal`` tokens attend
    causally among themselves (a whole sequence, or a shared prompt followed by
    the chosen branch); then ``rejected`` tokens (prefix sharing only) attend to
    the first ``shared`` tokens and causally among themselves."""

    causal: int
    shared: int = 0
    rejected: int = 0


@dataclass
class SegmentedSeqParams(PackedSeqParams):
    segments: List[Segment] = field(default_factory=list)
    # Per segment with a rejected branch: its SDPA mask over [shared; rejected]
    # keys, [rejected, shared + rejected] bool, True = may attend.
    rejected_masks: List[torch.Tensor] = field(default_factory=list)

    def split_sizes(self) -> List[int]:
        return [n for s in self.segments for n in ((s.causal, s.rejected) if s.rejected else (s.causal,))]


def rejected_mask(shared: int, rejected: int, device=None) -> torch.Tensor:
    """The rejected branch sees the whole shared prompt and itself causally."""
    ones = torch.ones(rejected, shared + rejected, dtype=torch.bool, device=device)
    return torch.cat([ones[:, :shared], ones[:, shared:].tril()], dim=1)


def segmented_params(cu_seqlens: torch.Tensor, branch_ids_1T: Optional[torch.Tensor]) -> SegmentedSeqParams:
    """Segments from the boundaries and, with prefix sharing, the branch ids
    (data/packing.py: each segment is [shared (0), chosen (1), rejected (2)])."""
    bounds = cu_seqlens.tolist()
    segments = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if branch_ids_1T is None:
            segments.append(Segment(end - start))
            continue
        shared, chosen, rejected = torch.bincount(branch_ids_1T[0, start:end], minlength=3).tolist()
        segments.append(Segment(shared + chosen, shared, rejected))
    masks = [rejected_mask(s.shared, s.rejected, cu_seqlens.device) for s in segments if s.rejected]
    return SegmentedSeqParams(qkv_format="sbhd", max_seqlen_q=bounds[-1], max_seqlen_kv=bounds[-1],
                              segments=segments, rejected_masks=masks)


def thd_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedSeqParams:
    """Transformer Engine's packed format: one causal sequence per segment."""
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


@dataclass
class PrefixTHDParams(PackedSeqParams):
    """A prefix-shared row in THD form (data/packing.py): ``cu_seqlens_q`` /
    ``cu_seqlens_kv`` / ``max_seqlen_*`` of the query and key sequences, and
    ``kv_index`` [T_kv] long, the row position of each key."""

    kv_index: Optional[torch.Tensor] = None


def prefix_thd_params(batch: dict) -> PrefixTHDParams:
    return PrefixTHDParams(qkv_format="sbhd", cu_seqlens_q=batch["cu_seqlens_q"],
                           cu_seqlens_kv=batch["cu_seqlens_kv"], max_seqlen_q=batch["max_seqlen_q"],
                           max_seqlen_kv=batch["max_seqlen_kv"], kv_index=batch["kv_index"])


def prefix_thd_attention(attend, query, key, value, params: PrefixTHDParams) -> torch.Tensor:
    """query [T, 1, n, d], key / value [T, 1, g, d] -> [T, 1, n*d].

    ``attend(q [T, n, d], k [T_kv, g, d], v [T_kv, g, d], params)`` is THD
    attention, causal aligned bottom-right within each (query, key) sequence
    pair: TE's kernel on a GPU, a reference in the CPU tests."""
    q_TND = query.squeeze(1).contiguous()
    # index_select's backward sums the two copies of a prompt token's K/V gradient.
    k_TGD, v_TGD = (t.squeeze(1).index_select(0, params.kv_index) for t in (key, value))
    return attend(q_TND, k_TGD, v_TGD, params).reshape(query.shape[0], 1, -1)


def packed_seq_params(batch: dict, te_attention: bool) -> PackedSeqParams:
    """The params a packed micro-batch's forward passes to the model."""
    if te_attention:
        return prefix_thd_params(batch) if "kv_index" in batch else thd_params(batch["cu_seqlens"], batch["max_seqlen"])
    return segmented_params(batch["cu_seqlens"], batch.get("branch_ids"))


class SDPAttention(MegatronModule):
    """Core attention: query [s, b, n, d], key / value [s, b, g, d] -> [s, b, n*d].

    attention_mask None: causal. A [b, 1, s, s] bool mask (megatron's
    convention, True = masked) is honoured. ``SegmentedSeqParams``: b = 1,
    attention within each segment.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        assert dropout == 0.0 and config.context_parallel_size == 1, "SDPAttention: no dropout, no CP"
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def _sdpa(self, q_bnsd, k_bgsd, v_bgsd, allowed: Optional[torch.Tensor]) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q_bnsd, k_bgsd, v_bgsd, attn_mask=allowed, is_causal=allowed is None, scale=self.softmax_scale,
            enable_gqa=q_bnsd.shape[1] != k_bgsd.shape[1],
        )

    def _segmented(self, q, k, v, params: SegmentedSeqParams) -> torch.Tensor:
        """Attention within each segment of a packed row. Causal parts run with
        SDPA's causal kernel (it skips the masked half); a rejected branch runs
        over [shared prompt; rejected] keys only, never over the chosen ones."""
        # split, not slicing: its backward is one cat, where each slice's
        # backward would write a zero-filled gradient of the whole row.
        pieces = [iter(t.split(params.split_sizes(), dim=2)) for t in (q, k, v)]
        masks, outs = iter(params.rejected_masks), []
        for segment in params.segments:
            q_causal, k_causal, v_causal = (next(piece) for piece in pieces)
            outs.append(self._sdpa(q_causal, k_causal, v_causal, None))
            if segment.rejected:
                q_rejected, k_rejected, v_rejected = (next(piece) for piece in pieces)
                keys, values = (torch.cat([causal[..., :segment.shared, :], rejected], dim=2)
                                for causal, rejected in ((k_causal, k_rejected), (v_causal, v_rejected)))
                outs.append(self._sdpa(q_rejected, keys, values, next(masks)))
        return torch.cat(outs, dim=2)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert attention_bias is None, "SDPAttention takes no attention bias"
        seq_len, batch = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n|g, s, d]
        if isinstance(packed_seq_params, SegmentedSeqParams):
            out = self._segmented(q, k, v, packed_seq_params)
        else:
            assert packed_seq_params is None, "SDPAttention: THD params need Transformer Engine attention"
            out = self._sdpa(q, k, v, None if attention_mask is None else ~attention_mask)
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, -1)  # [s, b, n*d]


def with_core_attention(spec, core_attention):
    """A GPT layer spec with its core attention swapped for ``core_attention``."""
    attention = spec.submodules.self_attention
    attention = replace(attention, submodules=replace(attention.submodules, core_attention=core_attention))
    return replace(spec, submodules=replace(spec.submodules, self_attention=attention))


def canonical_strides(x_SBH: torch.Tensor) -> torch.Tensor:
    """The same data with the strides of a fresh contiguous tensor.

    The embedding's [s, b, h] output is a transposed [b, s, h] tensor; at b = 1
    (a packed row) ``.contiguous()`` keeps its strides (s*h on the size-1 dim).
    On those, torch.matmul folds [s, 1, h] into one GEMM only for weights that
    require grad; for the frozen reference it runs a batched GEMM: slower, and
    rounded differently, so the step-0 loss would miss ln 2 by ~1e-7.
    """
    return x_SBH.reshape(-1).view(x_SBH.shape) if x_SBH.is_contiguous() else x_SBH.contiguous()


class PositionedGPTModel(GPTModel):
    """GPTModel whose RoPE angles follow position_ids in segmented and
    prefix-shared THD rows."""

    def _preprocess(self, *args, **kwargs):
        decoder_input, rotary_pos_emb, *rest = super()._preprocess(*args, **kwargs)
        if isinstance(decoder_input, torch.Tensor):
            decoder_input = canonical_strides(decoder_input)
        params, position_ids = kwargs.get("packed_seq_params"), kwargs.get("position_ids")
        if isinstance(params, (SegmentedSeqParams, PrefixTHDParams)) and rotary_pos_emb is not None:
            freqs = self.rotary_pos_emb(position_ids.shape[1])  # [T, 1, 1, d] for positions 0..T-1
            rotary_pos_emb = freqs[position_ids.t()].squeeze(2)  # [T, b, 1, d]
        return (decoder_input, rotary_pos_emb, *rest)

    def compute_language_model_loss(self, labels, logits_SBV):
        """GPTModel's last stage calls this when given labels; ours returns the
        logits as a [b, s, v] view of megatron's [s, b, v] output, not a loss.
        Without labels megatron returns a transposed contiguous copy instead: a
        second logits-sized tensor at the peak of the step (parallel/logprobs.py
        reads either layout)."""
        return logits_SBV.transpose(0, 1)
