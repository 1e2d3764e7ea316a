"""Per-token and per-sequence log-probs from vocab-parallel logits.

Each TP rank holds logits for its slice of the (padded) vocabulary. The
log-softmax runs in fp32 over chunks of tokens (``CHUNK_BYTES`` of fp32 work
space each), with three small all-reduces per chunk over the TP group (max,
sum of exponentials, target logit): the full vocabulary is never gathered,
and no [tokens, V_local] fp32 copy of the logits is made or saved for the
backward pass. The backward recomputes each chunk's softmax from the saved
logits and per-token log-normaliser, and, where the caller gives the logits
up (``consume_logits``: the schedule's loss functions, which never read them
again), writes the gradient into the logits' own storage, as megatron's
``vocab_parallel_cross_entropy`` does with its softmax. Peak: the logits
alone (4 bytes per token x V_local for the fp32 logits megatron's last stage
returns) plus a chunk. megatron's kernel instead works in place on an fp32
copy that it keeps for backward, which is the logits again (plus a masked
copy where the vocabulary is padded for TP): 8 to 12 bytes per token x V_local.

Legend: B = sequences in the micro-batch (2 x pairs), S = sequence length,
T = B x S tokens, V_local = this rank's vocab slice.
"""

import torch

# fp32 work space per chunk of tokens: 64 MiB is 128 tokens of a 128k vocabulary.
CHUNK_BYTES = 64 * 2**20


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


def _all_reduce(tensor: torch.Tensor, op, group) -> None:
    if group is not None:
        torch.distributed.all_reduce(tensor, op=op, group=group)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """logits [T, V_local] (any float dtype), labels [T] -> log p(label) [T] fp32."""

    @staticmethod
    def forward(ctx, logits_TV, labels_T, vocab_size, tp_rank, tp_group, chunk_tokens, consume_logits):
        vocab_local = logits_TV.shape[-1]
        first = tp_rank * vocab_local
        local_labels_T = labels_T - first
        in_slice_T = (local_labels_T >= 0) & (local_labels_T < vocab_local)
        local_labels_T = local_labels_T.clamp(0, vocab_local - 1)
        logps_T = torch.empty(labels_T.shape, dtype=torch.float32, device=logits_TV.device)
        log_normaliser_T = torch.empty_like(logps_T)
        for start in range(0, logits_TV.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            chunk = mask_padded_vocab(logits_TV[rows].float(), vocab_size, tp_rank)
            row_max = chunk.max(dim=-1).values
            _all_reduce(row_max, torch.distributed.ReduceOp.MAX, tp_group)
            target = chunk.gather(-1, local_labels_T[rows, None]).squeeze(-1)
            target = torch.where(in_slice_T[rows], target, torch.zeros_like(target))
            _all_reduce(target, torch.distributed.ReduceOp.SUM, tp_group)
            # logits_TV[rows].float() is logits_TV itself when fp32: never write into chunk before here.
            sum_exp = (chunk - row_max[:, None]).exp().sum(dim=-1)
            _all_reduce(sum_exp, torch.distributed.ReduceOp.SUM, tp_group)
            log_normaliser_T[rows] = row_max + sum_exp.log()
            logps_T[rows] = target - log_normaliser_T[rows]
        ctx.save_for_backward(logits_TV, local_labels_T, in_slice_T, log_normaliser_T)
        ctx.vocab_size, ctx.tp_rank, ctx.chunk_tokens = vocab_size, tp_rank, chunk_tokens
        ctx.consume_logits = consume_logits
        return logps_T

    @staticmethod
    def backward(ctx, grad_T):
        """d logp / d logit_v = onehot(label)_v - softmax_v, chunk by chunk."""
        logits_TV, local_labels_T, in_slice_T, log_normaliser_T = ctx.saved_tensors
        grad_TV = logits_TV if ctx.consume_logits else torch.empty_like(logits_TV)
        grad_T = grad_T.float()
        for start in range(0, logits_TV.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            chunk = mask_padded_vocab(logits_TV[rows].float(), ctx.vocab_size, ctx.tp_rank)
            softmax = (chunk - log_normaliser_T[rows, None]).exp()
            grad = softmax.mul_(-grad_T[rows, None])
            grad.scatter_add_(-1, local_labels_T[rows, None], (grad_T[rows] * in_slice_T[rows])[:, None])
            grad_TV[rows] = grad  # after this chunk's logits were read
        return grad_TV, None, None, None, None, None, None


def token_logprobs(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, vocab_size: int,
                   consume_logits: bool = False, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """log p(labels[b, s] | tokens[b, :s+1]) for every position: [B, S] fp32.

    ``consume_logits``: the caller never reads ``logits_BSV`` again, so the
    backward pass may overwrite it with its gradient (no second logits-sized
    tensor). Only for logits no other autograd node saved (a linear layer's
    output, or its dtype cast)."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        tp_group = None
    vocab_local = logits_BSV.shape[-1]
    chunk_tokens = max(1, chunk_bytes // (4 * vocab_local))
    # Tokens in memory order, so that flattening is a view: [b, s] rows, or the
    # [s, b] rows of megatron's own layout behind a transposed view.
    sequence_major = not logits_BSV.is_contiguous()
    logits_XYV, labels_XY = ((logits_BSV.transpose(0, 1), labels_BS.t()) if sequence_major
                             else (logits_BSV, labels_BS))
    assert logits_XYV.is_contiguous(), "logits: [b, s, v] or a transposed view of [s, b, v]"
    logps_T = _ChunkedTokenLogprobs.apply(logits_XYV.reshape(-1, vocab_local), labels_XY.reshape(-1),
                                          vocab_size, tp_rank, tp_group, chunk_tokens, consume_logits)
    logps_XY = logps_T.view(labels_XY.shape)
    return logps_XY.t() if sequence_major else logps_XY


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
