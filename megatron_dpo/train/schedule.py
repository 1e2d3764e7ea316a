"""One DPO step through megatron-core's pipeline schedules.

Per global batch (this DP rank's share, split in micro-batches of whole pairs):
  1. reference pass: forward-only schedule over the frozen reference; returns
     each micro-batch's per-sequence log-probs (on the last stage);
  2. policy pass: forward/backward schedule over the same micro-batches, each
     with its reference log-probs; ``loss_func`` turns policy and reference
     log-probs into the preference loss; returns the metric sums and each
     micro-batch's per-pair rewards (on the last stage).
Both passes see the same micro-batches (composition, padding, layout), so at
step 0, where policy == reference, the DPO loss is exactly ln 2. Values flow
through the returns: nothing is written into the micro-batch dicts.

megatron-core contracts relied on here (0.16.1, ``schedules.forward_step``):
- ``forward_step_func(data_iterator, model) -> (output, loss_func)``; on the
  last stage ``output`` is the logits, [B, S, V_local] (GPTModel transposes
  its [S, B, V] output when no labels are passed).
- ``loss_func(output) -> (loss, count, reduced)``: with
  ``config.calculate_per_token_loss`` (set in ``models.build``) the schedule
  neither divides by the micro-batch count nor by ``count``; it sums ``count``
  over micro-batches and ``finalize_model_grads`` all-reduces that sum over
  DP and scales the gradients by its inverse. Returning (sum of per-pair losses,
  number of pairs) therefore gives the gradient of the mean over all pairs of
  the global batch, for any DP size and micro-batch count. ``reduced`` (any
  object) is appended to the list the schedule returns, one per micro-batch,
  on the last stage only.
- forward-only with ``collect_non_loss_data=True`` stores whatever
  ``loss_func(output, non_loss_data=True)`` returns, per micro-batch.
- the data iterator is consumed in micro-batch order, once per model chunk
  (with virtual pipeline stages every chunk pulls its own iterator).
- p2p tensors are [seq_length, micro_batch_size (sequences), hidden]: every
  micro-batch of a step is padded to one length (a packed micro-batch is one
  row: [T, 1, hidden]).
- ``packed_seq_params`` given to ``GPTModel.forward`` reaches every layer's
  core attention (models/attention.py) on every pipeline stage.
- MoE router losses (load balancing, z-loss): the router reads
  ``config.moe_aux_loss_coeff`` / ``moe_z_loss_coeff`` at each forward, only
  in training mode with grad enabled (never in the reference pass), and with
  ``calculate_per_token_loss`` attaches ``coeff x loss x local tokens`` to the
  backward (``MoEAuxLossAutoScaler``, scale 1 in fp32), which
  ``finalize_model_grads`` then divides by the global pair count like the DPO
  loss. Setting the coefficient to ``coeff x pairs / local tokens`` of each
  micro-batch (``RouterLossCoeffs``) makes the policy's gradient that of
  ``mean DPO loss + coeff x pair-weighted mean router loss`` over the global
  batch, whatever the layout.

Shape suffixes: B pairs, 2B sequences, S sequence length, V vocabulary (local to a TP rank).
"""

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional

import torch

from megatron_dpo.config.schema import LossConfig
from megatron_dpo.loss.objective import pair_terms
from megatron_dpo.models.attention import packed_seq_params
from megatron_dpo.models.build import transformer_engine_available
from megatron_dpo.parallel.logprobs import packed_sequence_logprobs, sequence_logprobs, token_logprobs

# Per-pair sums reduced over micro-batches, DP ranks and PP stages, in order.
METRIC_SUMS = (
    "loss", "preference_loss", "sft_loss", "chosen_reward", "rejected_reward",
    "reward_margin", "accuracy", "chosen_logps", "rejected_logps",
)


@dataclass(frozen=True)
class RouterLossCoeffs:
    """An MoE policy's router-loss coefficients per pair (``policy.megatron_cfg``'s
    moe_aux_loss_coeff, moe_z_loss_coeff) and how its tokens split over TP
    (sequence parallelism: each TP rank routes its share of the tokens)."""

    aux_loss: float
    z_loss: Optional[float]
    tp_split: int  # TP size with sequence parallelism, else 1


def _set_router_loss_coeffs(coeffs: Optional[RouterLossCoeffs], batch: Dict[str, torch.Tensor], model) -> None:
    if coeffs is None:
        return
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    num_pairs = batch.get("num_sequences", batch["tokens"].shape[0]) // 2
    per_token = num_pairs / (batch["tokens"].numel() // coeffs.tp_split)
    config.moe_aux_loss_coeff = coeffs.aux_loss * per_token
    if coeffs.z_loss is not None:
        config.moe_z_loss_coeff = coeffs.z_loss * per_token


@dataclass
class PolicyPassResult:
    # METRIC_SUMS, then the pair count: this rank's sums (zeros off the last stage).
    sums: torch.Tensor
    # Per micro-batch, [B, 2] (chosen, rejected) rewards; empty off the last stage.
    rewards: List[torch.Tensor]


def _forward_logits(batch: Dict[str, torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
    """[b, s, v_local] logits on the last stage: a view of megatron's [s, b, v]
    output (labels select PositionedGPTModel's no-copy path, models/attention.py)."""
    if "cu_seqlens" not in batch:
        # Right padding + the causal mask: pad positions never influence real tokens.
        return model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    # A packed row: attention stays within each segment (data/packing.py).
    params = packed_seq_params(batch, te_attention=transformer_engine_available())
    return model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"],
                 packed_seq_params=params)


def _batch_logprobs(batch, logits_BSV, vocab_size):
    """Per-sequence summed log-probs and scored-token counts: ([2B], [2B])."""
    # The logits (the output layer's, nothing else holds them) end here: their
    # storage takes their gradient in the backward pass.
    token_logps_BS = token_logprobs(logits_BSV, batch["labels"], vocab_size, consume_logits=True)
    if "sequence_ids" in batch:
        return packed_sequence_logprobs(token_logps_BS, batch["loss_mask"], batch["sequence_ids"],
                                        batch["num_sequences"])
    return sequence_logprobs(token_logps_BS, batch["loss_mask"])


def _reference_loss_func(batch, vocab_size, logits_BSV, non_loss_data=True):
    logps_2B, _ = _batch_logprobs(batch, logits_BSV, vocab_size)
    return logps_2B.detach()


def _policy_loss_func(batch, reference_logps_2B, vocab_size, loss_cfg: LossConfig, logits_BSV):
    logps_2B, num_tokens_2B = _batch_logprobs(batch, logits_BSV, vocab_size)
    terms = pair_terms(logps_2B, reference_logps_2B, num_tokens_2B, loss_cfg, batch.get("gt_rewards"))
    num_pairs = terms.loss.shape[0]
    per_pair = {
        "loss": terms.loss,
        "preference_loss": terms.preference_loss,
        "sft_loss": terms.sft_loss,
        "chosen_reward": terms.chosen_reward,
        "rejected_reward": terms.rejected_reward,
        "reward_margin": terms.chosen_reward - terms.rejected_reward,
        "accuracy": (terms.chosen_reward > terms.rejected_reward).float(),
        "chosen_logps": terms.chosen_logps,
        "rejected_logps": terms.rejected_logps,
    }
    # METRIC_SUMS, then the pair count (a packed batch's rows are not its sequences).
    sums = torch.stack([per_pair[name].detach().sum() for name in METRIC_SUMS] + [terms.loss.new_tensor(num_pairs)])
    rewards_B2 = torch.stack([terms.chosen_reward, terms.rejected_reward], dim=-1).detach()
    return terms.loss.sum(), torch.tensor(num_pairs, dtype=torch.int), {"sums": sums, "rewards": rewards_B2}


def reference_forward_step(vocab_size: int, data_iterator, model):
    batch, _ = next(data_iterator)
    return _forward_logits(batch, model), partial(_reference_loss_func, batch, vocab_size)


def policy_forward_step(vocab_size: int, loss_cfg: LossConfig, router_coeffs: Optional[RouterLossCoeffs],
                        data_iterator, model):
    batch, reference_logps_2B = next(data_iterator)
    _set_router_loss_coeffs(router_coeffs, batch, model)
    return _forward_logits(batch, model), partial(_policy_loss_func, batch, reference_logps_2B, vocab_size, loss_cfg)


def _run(forward_step, model_chunks, microbatches, reference_logps, seq_length, forward_only,
         collect_non_loss_data):
    """megatron-core's schedule over (micro-batch, its reference log-probs) items."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    items = list(zip(microbatches, reference_logps))
    iterators = [iter(items) for _ in model_chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    )


@torch.no_grad()
def reference_pass(reference_chunks, microbatches: List[dict], seq_length: int,
                   vocab_size: int) -> List[torch.Tensor]:
    """Per micro-batch, the [2B] summed completion log-probs of the reference
    on the last pipeline stage; an empty list on other stages."""
    return _run(partial(reference_forward_step, vocab_size), reference_chunks, microbatches,
                [None] * len(microbatches), seq_length, forward_only=True, collect_non_loss_data=True)


def policy_pass(
    policy_chunks, microbatches: List[dict], reference_logps: List[Optional[torch.Tensor]], seq_length: int,
    vocab_size: int, loss_cfg: LossConfig, forward_only: bool = False,
    router_coeffs: Optional[RouterLossCoeffs] = None,
) -> PolicyPassResult:
    """Forward (and backward) of the policy; ``reference_logps[i]`` ([2B]) goes
    with ``microbatches[i]`` (None off the last stage, where it is not read).
    ``router_coeffs``: an MoE policy's router-loss coefficients; None: dense."""
    outputs = _run(partial(policy_forward_step, vocab_size, loss_cfg, router_coeffs), policy_chunks, microbatches,
                   reference_logps, seq_length, forward_only=forward_only, collect_non_loss_data=False)
    sums = torch.zeros(len(METRIC_SUMS) + 1, dtype=torch.float64)
    for output in outputs:
        sums += output["sums"].double().cpu()
    return PolicyPassResult(sums=sums, rewards=[output["rewards"] for output in outputs])
