"""Padding-free micro-batches: a micro-batch's pairs packed back to back in one row.

A packed micro-batch is one row (B = 1) of T tokens: its *segments* one after
another, then a pad tail so that every micro-batch of a step has the same T
(pipeline stages exchange activations of one shape per step). A token attends
only within its own segment:

  data.packing:         one segment per sequence: [chosen_0][rejected_0][chosen_1]...
  data.prefix_sharing:  one segment per pair: [shared prompt | chosen | rejected]

Inside a prefix-shared segment each token is given a *branch*: 0 for the
shared prompt, 1 for chosen, 2 for rejected. A token attends to earlier tokens
of the shared prompt and of its own branch, so chosen and rejected never see
each other, and the rejected positions continue from the prompt's end: each
completion is computed exactly as if it followed the prompt alone. The last
prompt token is not shared: its logits score the first completion token, which
differs between chosen and rejected, so each branch starts with its own copy.
Positions restart at 0 in every segment. The pad tail is a causal segment of
its own (no query is left with nothing to attend to; its loss mask is 0).

Fields (T = packed length, N = 2 x pairs sequences, interleaved as in the
padded form: 2i chosen, 2i+1 rejected of pair i):
  tokens, labels, position_ids [1, T] long; loss_mask [1, T] float32
  sequence_ids [1, T] long: the sequence a position's label is scored for
  cu_seqlens [segments + 1] int32: segment boundaries (THD convention)
  max_seqlen: the longest segment (an int: no device sync to find it)
  branch_ids [1, T] long: only with prefix sharing
  num_sequences: N (an int)
With prefix sharing, also Transformer Engine's THD form of the row (built
here, on the CPU; models/attention.py reads it): per pair two *query
sequences*, [shared prompt | chosen] and [rejected], each over its *key
sequence*: [shared prompt | chosen] itself, and [shared prompt | rejected],
gathered from the row by ``kv_index``. The rejected queries attend
bottom-right aligned: the i-th sees the whole prompt and rejected tokens 0..i.
  cu_seqlens_q, cu_seqlens_kv [query sequences + 1] int32 (the pad tail is one
    more sequence); kv_index [cu_seqlens_kv[-1]] long: the row position of each key
  max_seqlen_q, max_seqlen_kv: ints
(collate.make_microbatches adds gt_rewards / reference_logps [N] as padded.)
"""

import itertools
from dataclasses import dataclass

import torch

from megatron_dpo.data.tokenize import TokenizedPair, common_prefix_len

SHARED, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class _Piece:
    """Consecutive tokens of one segment with their labels, loss mask and positions."""

    ids: list[int]
    labels: list[int]
    loss: list[float]
    first_position: int
    branch: int
    sequence: int


def shared_prefix_len(pair: TokenizedPair) -> int:
    """Leading tokens computed once for both sequences: the prompt of both but
    its last token (tokenize.py's boundary, one for both sequences), where
    the two sequences hold the same tokens: truncate_sequence / keep_end
    cuts their starts by different amounts, and then they share less."""
    prompt_len = min(pair.chosen_prompt_len, pair.rejected_prompt_len)
    return max(min(common_prefix_len(pair.chosen_ids, pair.rejected_ids), prompt_len) - 1, 0)


def _sequence_piece(ids: list[int], prompt_len: int, start: int, branch: int, sequence: int,
                    pad_id: int) -> _Piece:
    """Tokens ids[start:], labelled and loss-masked as in the padded form
    (position t is scored for ids[t+1] when prompt_len <= t+1 < len(ids))."""
    first_scored = max(prompt_len - 1, 0)
    loss = [1.0 if first_scored <= t < len(ids) - 1 else 0.0 for t in range(start, len(ids))]
    return _Piece(ids[start:], ids[start + 1:] + [pad_id], loss, start, branch, sequence)


def pair_segments(pair: TokenizedPair, index: int, pad_id: int, prefix_sharing: bool) -> list[list[_Piece]]:
    """The segments of pair ``index`` of a micro-batch, each a list of pieces."""
    chosen, rejected = 2 * index, 2 * index + 1
    if not prefix_sharing:
        return [[_sequence_piece(pair.chosen_ids, pair.chosen_prompt_len, 0, SHARED, chosen, pad_id)],
                [_sequence_piece(pair.rejected_ids, pair.rejected_prompt_len, 0, SHARED, rejected, pad_id)]]
    shared = shared_prefix_len(pair)
    prompt = pair.chosen_ids[:shared]
    return [[
        _Piece(prompt, pair.chosen_ids[1:shared + 1], [0.0] * shared, 0, SHARED, chosen),
        _sequence_piece(pair.chosen_ids, pair.chosen_prompt_len, shared, CHOSEN, chosen, pad_id),
        _sequence_piece(pair.rejected_ids, pair.rejected_prompt_len, shared, REJECTED, rejected, pad_id),
    ]]


def packed_length(pairs: list[TokenizedPair], prefix_sharing: bool) -> int:
    """Tokens of these pairs once packed (no pad tail)."""
    if not prefix_sharing:
        return sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return sum(len(p.chosen_ids) + len(p.rejected_ids) - shared_prefix_len(p) for p in pairs)


def _pieces_to_columns(segments: list[list[_Piece]]) -> dict[str, list]:
    columns = {name: [] for name in ("tokens", "labels", "loss_mask", "position_ids", "sequence_ids", "branch_ids")}
    cu_seqlens = [0]
    for segment in segments:
        for piece in segment:
            count = len(piece.ids)
            columns["tokens"] += piece.ids
            columns["labels"] += piece.labels
            columns["loss_mask"] += piece.loss
            columns["position_ids"] += range(piece.first_position, piece.first_position + count)
            columns["sequence_ids"] += [piece.sequence] * count
            columns["branch_ids"] += [piece.branch] * count
        cu_seqlens.append(len(columns["tokens"]))
    columns["cu_seqlens"] = cu_seqlens
    return columns


def thd_prefix_layout(segments: list[list[_Piece]]) -> dict:
    """The THD query / key sequences of a prefix-shared row (module docstring)."""
    q_lengths, kv_lengths, kv_index, start = [], [], [], 0
    for segment in segments:
        lengths = [len(piece.ids) for piece in segment]
        if [piece.branch for piece in segment] == [SHARED, CHOSEN, REJECTED]:
            shared, chosen, rejected = lengths
            q_lengths += [shared + chosen, rejected]
            kv_lengths += [shared + chosen, shared + rejected]
            rejected_start = start + shared + chosen
            kv_index += [*range(start, rejected_start), *range(start, start + shared),
                         *range(rejected_start, rejected_start + rejected)]
        else:  # the pad tail
            q_lengths.append(sum(lengths))
            kv_lengths.append(sum(lengths))
            kv_index += range(start, start + sum(lengths))
        start += sum(lengths)
    return {
        "cu_seqlens_q": torch.tensor([0, *itertools.accumulate(q_lengths)], dtype=torch.int32),
        "cu_seqlens_kv": torch.tensor([0, *itertools.accumulate(kv_lengths)], dtype=torch.int32),
        "kv_index": torch.tensor(kv_index, dtype=torch.long),
        "max_seqlen_q": max(q_lengths),
        "max_seqlen_kv": max(kv_lengths),
    }


def collate_packed(pairs: list[TokenizedPair], pad_id: int, seq_length: int,
                   prefix_sharing: bool) -> dict:
    """One packed micro-batch of ``seq_length`` tokens (see the module docstring)."""
    segments = [segment for index, pair in enumerate(pairs)
                for segment in pair_segments(pair, index, pad_id, prefix_sharing)]
    used = packed_length(pairs, prefix_sharing)
    if used > seq_length:
        raise ValueError(f"{used} packed tokens do not fit seq_length={seq_length}")
    if used < seq_length:
        pad = seq_length - used
        segments.append([_Piece([pad_id] * pad, [pad_id] * pad, [0.0] * pad, 0, SHARED, 0)])
    columns = _pieces_to_columns(segments)
    batch = {name: torch.tensor([columns[name]], dtype=torch.long)
             for name in ("tokens", "labels", "position_ids", "sequence_ids")}
    batch["loss_mask"] = torch.tensor([columns["loss_mask"]], dtype=torch.float32)
    batch["cu_seqlens"] = torch.tensor(columns["cu_seqlens"], dtype=torch.int32)
    batch["max_seqlen"] = max(b - a for a, b in itertools.pairwise(columns["cu_seqlens"]))
    if prefix_sharing:
        batch["branch_ids"] = torch.tensor([columns["branch_ids"]], dtype=torch.long)
        batch.update(thd_prefix_layout(segments))
    batch["num_sequences"] = 2 * len(pairs)
    return batch
