"""Per-token and per-sequence log-probs from vocab-parallel logits.

Each TP rank holds logits for its slice of the (padded) vocabulary; megatron's
``vocab_parallel_cross_entropy`` computes ``log_softmax`` + gather with two
small all-reduces over the TP group, never materialising the full vocabulary.

Legend: B = sequences in the micro-batch (2 x pairs), S = sequence length,
V_local = this rank's vocab slice.
"""

import torch


def mask_padded_vocab(logits_BSV: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """Set logits of vocab padding rows (added for TP divisibility) to -inf so
    they take no probability mass: log-probs then match an unpadded model."""
    vocab_local = logits_BSV.shape[-1]
    first = tp_rank * vocab_local
    num_real = max(0, min(vocab_local, vocab_size - first))
    if num_real == vocab_local:
        return logits_BSV
    is_padding = torch.arange(vocab_local, device=logits_BSV.device) >= num_real
    return logits_BSV.masked_fill(is_padding, float("-inf"))


def token_logprobs(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(labels[b, s] | tokens[b, :s+1]) for every position: [B, S] fp32."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    logits_BSV = mask_padded_vocab(logits_BSV.float(), vocab_size, tp_rank)
    # The cross entropy kernel works in place on its input: hand it a copy.
    return -vocab_parallel_cross_entropy(logits_BSV.clone(), labels_BS)


def sequence_logprobs(token_logprobs_BS: torch.Tensor, loss_mask_BS: torch.Tensor):
    """Sum of completion-token log-probs per sequence and the token count: ([B], [B])."""
    logps_B = (token_logprobs_BS * loss_mask_BS).sum(dim=-1)
    num_tokens_B = loss_mask_BS.sum(dim=-1)
    return logps_B, num_tokens_B


def packed_sequence_logprobs(token_logprobs_BS: torch.Tensor, loss_mask_BS: torch.Tensor,
                             sequence_ids_BS: torch.Tensor, num_sequences: int):
    """``sequence_logprobs`` for packed rows, where ``sequence_ids`` names the
    sequence each position is scored for: ([num_sequences], [num_sequences])."""
    sequence_ids = sequence_ids_BS.reshape(-1)
    zeros = token_logprobs_BS.new_zeros(num_sequences)
    logps_N = zeros.index_add(0, sequence_ids, (token_logprobs_BS * loss_mask_BS).reshape(-1))
    num_tokens_N = zeros.index_add(0, sequence_ids, loss_mask_BS.reshape(-1).to(zeros.dtype))
    return logps_N, num_tokens_N
