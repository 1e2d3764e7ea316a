"""Router metrics of a Mixture-of-Experts policy, per training step.

- ``load_balancing_loss`` (megatron-core's tracker name; ``z_loss`` with a
  z-loss coefficient): the router loss without its coefficient, as megatron's
  router records it per layer and micro-batch in training
  (``moe_utils.save_to_aux_losses_tracker``); summed over PP stages (each holds
  its layers), over the TP shards of a sequence-parallel batch for the
  load-balancing loss (each holds a part of it, see
  ``switch_load_balancing_loss_func``) and averaged over them for the z-loss
  (each holds the mean over its tokens), averaged over DP ranks, layers and
  micro-batches. megatron's own
  ``reduce_aux_losses_tracker_across_ranks`` averages over DP with
  ``ReduceOp.AVG``, which gloo lacks, hence the reduction here.
- ``expert_load_max_over_mean``: per layer, the tokens routed to each expert
  over the step's global batch (padding tokens are routed too, and counted);
  the largest over layers of max / mean over experts: 1 is perfect balance,
  num_experts / topk the worst.
"""

from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import get_device

# megatron-core's tracker name of each moe_router_load_balancing_type's loss.
_BALANCING_LOSS = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                   "global_aux_loss": "global_load_balancing_loss"}


def tracked_losses(load_balancing_type: str, aux_loss_coeff: float, z_loss_coeff: Optional[float]) -> List[str]:
    """The router losses megatron records for these settings (its tracker is
    global and keeps a name once seen, so the names come from the settings)."""
    names = [_BALANCING_LOSS[load_balancing_type]] if load_balancing_type in _BALANCING_LOSS and aux_loss_coeff > 0 else []
    return names + (["z_loss"] if z_loss_coeff is not None else [])


class RouterMetrics:
    """A context manager around a policy pass that counts the tokens each router
    sends to each expert (forward hooks on megatron's routers); ``reduce`` then
    gives the step's metrics on every rank."""

    def __init__(self, policy_chunks, num_layers: int, num_experts: int, tp_split: int, losses: List[str]):
        from megatron.core.transformer.moe.router import Router

        self.losses = losses  # tracked_losses(...)
        self.routers = [m for chunk in policy_chunks for m in chunk.modules() if isinstance(m, Router)]
        # On the routers' device: counting is no host sync in the forward pass.
        self.tokens_per_expert_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=get_device())
        self.tp_split = tp_split  # TP size with sequence parallelism (tokens split over TP), else 1
        self._handles = []

    def _count(self, router, inputs, output) -> None:
        _, routing_map_TE = output
        self.tokens_per_expert_LE[router.layer_number - 1] += routing_map_TE.detach().sum(0).double()

    def __enter__(self) -> "RouterMetrics":
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()
        self._handles = [router.register_forward_hook(self._count) for router in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _sum_over_ranks(self, values: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
        values = values.to(get_device())
        if self.tp_split > 1:
            dist.all_reduce(values, group=dims.tp_group)
        dist.all_reduce(values, group=dims.pp_group)
        dist.all_reduce(values, group=dims.dp_group)
        return values.cpu()

    def reduce(self, dims: ParallelDims, num_microbatches: int) -> Dict[str, float]:
        """Collective over all ranks."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        metrics = {}
        for name in self.losses:  # the same names on every rank: the collectives match
            if name in tracker:  # absent: the step routed nothing through a training forward
                per_layer = self._sum_over_ranks(tracker[name]["values"].detach().double(), dims)
                shards = self.tp_split if name == "z_loss" else 1
                metrics[name] = per_layer.mean().item() / (dims.dp_size * num_microbatches * shards)
        clear_aux_losses_tracker()
        load_LE = self._sum_over_ranks(self.tokens_per_expert_LE, dims)
        metrics["expert_load_max_over_mean"] = (load_LE.max(dim=1).values / load_LE.mean(dim=1)).max().item()
        return metrics
