"""Which pairs each data-parallel rank trains on, step by step.

Every rank builds the same epoch order (a seeded permutation, or file order)
and cuts the same global batches from it; rank r takes the r-th contiguous
slice of each global batch, so the union over ranks of one step is the global
batch a single-rank run sees. The incomplete last global batch of an epoch is
dropped. The position is one number, ``consumed_pairs`` (pairs of all ranks in
finished steps), so a run resumed from it continues exactly where an
uninterrupted run would be, whatever the DP size.
"""

from typing import Iterator

import torch

from megatron_dpo.data.errors import DataError


class PairSampler:
    """Iterating yields, per step of the current epoch, this rank's pair indices.

    One ``for`` loop over the sampler runs the rest of the current epoch; the
    next loop starts the next epoch (``epoch`` tells which one is next).
    """

    def __init__(self, num_pairs: int, global_batch_size: int, dp_rank: int, dp_size: int,
                 shuffle: bool, seed: int, consumed_pairs: int = 0):
        if global_batch_size % dp_size != 0:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by the "
                f"data-parallel size {dp_size}; make it a multiple of {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if num_pairs < global_batch_size:
            raise DataError(
                f"the dataset has {num_pairs} pairs, fewer than one global batch "
                f"({global_batch_size}); lower the global batch size "
                "(policy.train_global_batch_size / dpo.val_global_batch_size) or add data"
            )
        self.num_pairs = num_pairs
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.shuffle = shuffle
        self.seed = seed
        self.steps_per_epoch = num_pairs // global_batch_size
        self.consumed_pairs = 0
        self._set_consumed(consumed_pairs)

    @property
    def epoch(self) -> int:
        """The epoch (from 0) of the next batch."""
        return self.consumed_pairs // (self.steps_per_epoch * self.global_batch_size)

    def __len__(self) -> int:
        """Steps left in the current epoch."""
        return self.steps_per_epoch - self._step_in_epoch()

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        order = self._epoch_order(epoch)  # [num_pairs] int64: 8 bytes a pair, no Python list
        local_size = self.global_batch_size // self.dp_size
        while self.epoch == epoch:
            start = self._step_in_epoch() * self.global_batch_size + self.dp_rank * local_size
            self.consumed_pairs += self.global_batch_size
            yield order[start:start + local_size].tolist()

    def state_dict(self) -> dict:
        return {"consumed_pairs": self.consumed_pairs, "num_pairs": self.num_pairs,
                "global_batch_size": self.global_batch_size,
                "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_pairs", "global_batch_size", "shuffle", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data order: the checkpoint has {key}="
                    f"{state[key]!r}, this run {getattr(self, key)!r}; resume with "
                    "the same data, global batch size, data.shuffle and dpo.seed"
                )
        self._set_consumed(state["consumed_pairs"])

    def _set_consumed(self, consumed_pairs: int) -> None:
        if consumed_pairs < 0 or consumed_pairs % self.global_batch_size != 0:
            raise ValueError(
                f"consumed_pairs={consumed_pairs} is not a non-negative multiple of "
                f"the global batch size {self.global_batch_size}"
            )
        self.consumed_pairs = consumed_pairs

    def _step_in_epoch(self) -> int:
        return (self.consumed_pairs // self.global_batch_size) % self.steps_per_epoch

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_pairs)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_pairs, generator=generator)
