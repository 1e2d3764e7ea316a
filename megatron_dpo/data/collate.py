"""Tokenized pairs -> micro-batch tensors, padded or packed (data/packing.py).

Shapes: B = pairs in the micro-batch, S = padded sequence length. Rows are
interleaved [chosen_0, rejected_0, chosen_1, rejected_1, ...] (2B rows), so a
micro-batch always holds whole pairs and row 2i / 2i+1 is pair i.
All micro-batches of one step share one S: pipeline parallelism sends
activations of a single shape per step.
"""

import torch

from megatron_dpo.data.packing import collate_packed, packed_length
from megatron_dpo.data.tokenize import TokenizedPair


def collate_microbatch(pairs: list[TokenizedPair], pad_id: int,
                       seq_length: int) -> dict[str, torch.Tensor]:
    """tokens / labels / position_ids [2B, S] long, loss_mask [2B, S] float32;
    where the pairs carry them, gt_rewards and reference_logps [2B] float32.

    labels[:, t] = tokens[:, t+1] (the last position gets pad_id);
    loss_mask[:, t] = 1.0 where labels[:, t] is a completion token (EOS
    included) of that row, i.e. prompt_len <= t+1 < len(row).
    """
    rows = [(ids, prompt_len) for p in pairs for ids, prompt_len in (
        (p.chosen_ids, p.chosen_prompt_len), (p.rejected_ids, p.rejected_prompt_len))]
    longest = max(len(ids) for ids, _ in rows)
    if longest > seq_length:
        raise ValueError(f"a sequence of {longest} tokens does not fit seq_length={seq_length}")
    tokens = torch.full((len(rows), seq_length), pad_id, dtype=torch.long)  # [2B, S]
    loss_mask = torch.zeros((len(rows), seq_length), dtype=torch.float32)  # [2B, S]
    for row, (ids, prompt_len) in enumerate(rows):
        tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        # Position t predicts token t+1: completion tokens sit at [prompt_len, len).
        loss_mask[row, max(prompt_len - 1, 0):len(ids) - 1] = 1.0
    labels = torch.full_like(tokens, pad_id)  # [2B, S]
    labels[:, :-1] = tokens[:, 1:]
    position_ids = torch.arange(seq_length, dtype=torch.long).expand(len(rows), -1).contiguous()
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    return dict(batch, **pair_fields(pairs))


def pair_fields(pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
    """gt_rewards and reference_logps [2B] float32, where the pairs carry them."""
    fields = {}
    if pairs[0].chosen_reward is not None:
        fields["gt_rewards"] = _interleaved([(p.chosen_reward, p.rejected_reward) for p in pairs])
    if pairs[0].reference_logps is not None:
        fields["reference_logps"] = _interleaved([p.reference_logps for p in pairs])
    return fields


def _interleaved(chosen_rejected: list[tuple[float, float]]) -> torch.Tensor:
    """[(c0, r0), (c1, r1), ...] -> [c0, r0, c1, r1, ...]: [2B] float32."""
    return torch.tensor(chosen_rejected, dtype=torch.float32).reshape(-1)


def step_seq_length(pairs: list[TokenizedPair], multiple_of: int = 8) -> int:
    """The longest sequence among these pairs, rounded up to a multiple."""
    longest = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    return -(-longest // multiple_of) * multiple_of


def make_microbatches(pairs: list[TokenizedPair], micro_batch_size: int, pad_id: int,
                      packing: bool = False, prefix_sharing: bool = False,
                      multiple_of: int = 8) -> list[dict[str, torch.Tensor]]:
    """Split one step's pairs into micro-batches of micro_batch_size pairs,
    padded rows or, with packing / prefix_sharing, one packed row each."""
    if len(pairs) % micro_batch_size != 0:
        raise ValueError(
            f"{len(pairs)} pairs per rank do not split into micro-batches of "
            f"{micro_batch_size}; make the global batch size a multiple of "
            "micro batch size x data-parallel size"
        )
    chunks = [pairs[i:i + micro_batch_size] for i in range(0, len(pairs), micro_batch_size)]
    if not (packing or prefix_sharing):
        seq_length = step_seq_length(pairs, multiple_of)
        return [collate_microbatch(chunk, pad_id, seq_length) for chunk in chunks]
    longest = max(packed_length(chunk, prefix_sharing) for chunk in chunks)
    seq_length = -(-longest // multiple_of) * multiple_of
    return [dict(collate_packed(chunk, pad_id, seq_length, prefix_sharing), **pair_fields(chunk))
            for chunk in chunks]
