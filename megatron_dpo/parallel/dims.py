"""The parallel layout of a run: one object for sizes, this rank's ranks and groups.

``ParallelDims.resolve`` checks the policy's TP / PP / VPP sizes against the
world size and the model's shape (config/validate.py raises a ``ConfigError``
with the numbers and the fix) and derives DP and the micro-batch count; it
needs no process group, so ``validate-config`` uses it too. ``init_parallel``
(parallel/init.py) creates megatron-core's groups for these sizes and returns
the same object with this rank's ranks and groups filled in. Resume checks
(``sizes()``), logs (``describe()``), the sampler (``dp_rank``, ``dp_size``)
and the metric reductions (``pp_group``, ``dp_group``) all read it.
"""

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

from megatron_dpo.config.schema import PolicyConfig
from megatron_dpo.config.validate import check_layout


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp_size: int
    pp_size: int
    dp_size: int  # world_size // (tp_size * pp_size)
    vpp_size: Optional[int] = None  # model chunks per pipeline rank; None: no interleaving
    # Mixture of Experts: experts split over ep_size ranks, each expert over
    # etp_size ranks (megatron's expert-model / expert-tensor parallel sizes).
    ep_size: int = 1
    etp_size: int = 1
    # Per training step per DP rank: global batch / (micro batch x DP).
    num_microbatches: int = 1
    # This rank's place, filled in by init_parallel (0 / None before).
    rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    etp_rank: int = 0
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None

    @classmethod
    def resolve(cls, policy_cfg: PolicyConfig, world_size: int, num_layers: int,
                num_attention_heads: int, num_query_groups: int,
                num_experts: Optional[int] = None) -> "ParallelDims":
        """The checked layout of the policy config on ``world_size`` ranks
        (``num_experts``: the model's, None for a dense model)."""
        megatron_cfg = policy_cfg.megatron_cfg
        dp_size, num_microbatches = check_layout(policy_cfg, world_size, num_layers, num_attention_heads,
                                                 num_query_groups, num_experts)
        return cls(world_size=world_size, tp_size=megatron_cfg.tensor_model_parallel_size,
                   pp_size=megatron_cfg.pipeline_model_parallel_size, dp_size=dp_size,
                   vpp_size=megatron_cfg.virtual_pipeline_model_parallel_size,
                   ep_size=megatron_cfg.expert_model_parallel_size,
                   etp_size=megatron_cfg.expert_tensor_parallel_size,
                   num_microbatches=num_microbatches)

    @classmethod
    def of_sizes(cls, world_size: int, tp_size: int = 1, pp_size: int = 1,
                 vpp_size: Optional[int] = None, ep_size: int = 1, etp_size: int = 1) -> "ParallelDims":
        """A layout from sizes alone (conversion, tests); DP fills the rest of the world."""
        return cls(world_size=world_size, tp_size=tp_size, pp_size=pp_size,
                   dp_size=world_size // (tp_size * pp_size), vpp_size=vpp_size, ep_size=ep_size,
                   etp_size=etp_size)

    def with_ranks(self, **ranks_and_groups) -> "ParallelDims":
        return dataclasses.replace(self, **ranks_and_groups)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def num_model_chunks(self) -> int:
        return self.vpp_size or 1

    def sizes(self) -> Dict[str, Optional[int]]:
        """What a checkpoint records of the layout (per-rank state is valid only
        for the same sizes)."""
        sizes = {"tp": self.tp_size, "pp": self.pp_size, "dp": self.dp_size, "vpp": self.vpp_size}
        if (self.ep_size, self.etp_size) != (1, 1):  # dense layouts keep the keys they always had
            sizes.update(ep=self.ep_size, etp=self.etp_size)
        return sizes

    def describe(self) -> str:
        vpp = f" (x VPP {self.vpp_size})" if self.vpp_size else ""
        experts = (f"; experts over EP {self.ep_size} x expert-TP {self.etp_size}"
                   if (self.ep_size, self.etp_size) != (1, 1) else "")
        return (f"{self.world_size} rank(s) = TP {self.tp_size} x PP {self.pp_size}{vpp} x DP {self.dp_size}{experts}; "
                f"{self.num_microbatches} micro-batches per rank per step")
