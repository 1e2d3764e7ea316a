"""Per-GPU memory estimate of a DPO run, for ``validate-config``.

Counts are exact for parameters (from the canonical tensor shapes, TP shards,
vocab padding, pipeline stages) and rough for activations. Bytes per
parameter follow ``train/optimizer.py``: weights in ``policy.precision``,
gradients in fp32 (``grad_reduce_in_fp32``), Adam state of fp32 moments plus
an fp32 master copy for bf16, sharded over DP with the distributed optimizer.

Activations use Korthikanti et al. 2022 ("Reducing Activation Recomputation
in Large Transformer Models", Sec. 4) with fused (flash) attention, per layer
and micro-batch in 16-bit units of s*b*h: 34/t with sequence parallelism,
10 + 24/t without; 2 (/t with SP) per layer when activations are
checkpointed, plus one layer recomputed. Stage p of the 1F1B pipeline holds
min(PP - p, micro-batches) micro-batches of its L/PP layers in flight; with
the interleaved schedule (VPP chunks of L/(PP x VPP) layers) it holds
megatron's warm-up count plus one, 2(PP - p - 1) + (VPP - 1) PP + 1, capped at
micro-batches x VPP, chunk-micro-batches. A micro-batch of m pairs is b = 2m
sequences of up to s = policy.max_total_sequence_length tokens.
Where a fusion is set to false (auto and true count as on: a GPU run with the
gpu extra), its unfused kernel's extra saved tensors are added per layer in
flight: SwiGLU's FFN-sized input pair (bias_activation_fusion), RoPE's
rotated q and k copies (apply_rope_fusion); gradient_accumulation_fusion off
adds one 16-bit weight gradient of the largest linear (the output layer) as a
transient. CUDA context, cuBLAS workspaces and NCCL buffers are one fixed row
(``RUNTIME_BYTES`` plus ``NCCL_BYTES_PER_GROUP`` for each of TP, PP, DP
larger than 1). Not counted: allocator fragmentation.
Mixture-of-Experts models: expert weights are split over EP x expert-TP
(not TP), the router is replicated, and the distributed optimizer shards
expert state over the expert-data-parallel ranks (world / (expert-TP x EP x
PP)). Activations use the dense formula (a rough stand-in for routed tokens:
top-k x the expert FFN width, which for Qwen3-30B-A3B and Mixtral is 3-7x
hidden where the formula assumes 4x); the all-to-all buffers are not counted.
LoRA runs (policy.lora_cfg.enabled): the base weights once, frozen (no
grads, no optimizer state, no reference copy); grads and Adam state for the
adapters only (models/lora.py's shapes).

Checked against a CPU run (issue 15; scripts/benchmark.py, fp32, hidden 512,
8 layers, vocab 32000, 2 pairs x 512 tokens per micro-batch, unfused): the
estimate without the CUDA row is 2189 MB, the measured peak RSS over the
post-import baseline 2771 MB: estimate / measured = 0.79 (CPU's SDPA math
kernel saves more than flash attention; glibc keeps freed heap).
"""

import math
from dataclasses import dataclass
from typing import List, Tuple

from megatron_dpo.config.schema import Config, LoraConfig, lora_hf_targets
from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.weights import canonical_names, full_shape, is_expert_param
from megatron_dpo.parallel.dims import ParallelDims

GIB = 2**30
_WEIGHT_BYTES = {"float32": 4, "bfloat16": 2}
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
# CUDA context (~500 MiB on H100 with torch's kernels loaded) + cuBLAS / TE workspaces.
RUNTIME_BYTES = 0.75 * GIB
# NCCL's buffers per communicator (NCCL_BUFFSIZE 4 MiB x up to 32 channels x send/recv, rounded up).
NCCL_BYTES_PER_GROUP = 0.25 * GIB


@dataclass(frozen=True)
class MemoryEstimate:
    stage: int  # the pipeline stage with the largest total
    num_parameters: int  # of the policy, on one GPU of that stage
    rows: List[Tuple[str, float]]  # (what, bytes)

    @property
    def total_bytes(self) -> float:
        return sum(size for _, size in self.rows)


def _split(name: str, tp_size: int, ep_size: int, etp_size: int) -> int:
    """Over how many GPUs of a stage one canonical tensor is split."""
    if name.endswith(("layernorm.weight", "mlp.router.weight")):
        return 1
    return ep_size * etp_size if is_expert_param(name) else tp_size


def stage_parameters(arch: ModelArchitecture, tp_size: int, pp_size: int, ep_size: int = 1, etp_size: int = 1,
                     experts_only: bool = False) -> List[int]:
    """Parameters held by one GPU of each pipeline stage (its TP shard and, for
    MoE, its experts); ``experts_only``: count the expert weights alone."""
    layers_per_stage = arch.num_layers // pp_size
    counts = [0] * pp_size
    for name in canonical_names(arch):
        if experts_only and not is_expert_param(name):
            continue
        shape = list(full_shape(name, arch))
        if name in _VOCAB_PARAMS:
            shape[0] = arch.padded_vocab_size(tp_size)
        numel = math.prod(shape) // _split(name, tp_size, ep_size, etp_size)
        if name.startswith("decoder.layers."):
            counts[int(name.split(".")[2]) // layers_per_stage] += numel
        else:
            counts[0 if name.startswith("embedding.") else -1] += numel
    if arch.tie_word_embeddings and pp_size > 1 and not experts_only:  # the last stage's copy of the embedding
        counts[-1] += arch.padded_vocab_size(tp_size) * arch.hidden_size // tp_size
    return counts


def active_parameters(arch: ModelArchitecture) -> int:
    """Parameters one token passes through: all but the experts it is not routed to."""
    total = sum(stage_parameters(arch, 1, 1))
    if not arch.is_moe:
        return total
    experts = sum(stage_parameters(arch, 1, 1, experts_only=True))
    return total - experts * (arch.num_experts - arch.moe_router_topk) // arch.num_experts


def lora_stage_parameters(arch: ModelArchitecture, lora_cfg: LoraConfig, tp_size: int, pp_size: int) -> List[int]:
    """Adapter parameters held by one GPU of each pipeline stage (models/lora.py:
    column-parallel layers split B, row-parallel ones split A)."""
    from megatron_dpo.models.lora import part_shapes

    per_layer = 0
    for part in lora_hf_targets(lora_cfg.target_modules):
        (rank, fan_in), (fan_out, _) = part_shapes(part, arch, lora_cfg.dim)
        row_parallel = part in ("o_proj", "down_proj")
        per_layer += rank * fan_in // (tp_size if row_parallel else 1)
        per_layer += fan_out * rank // (1 if row_parallel else tp_size)
    return [per_layer * arch.num_layers // pp_size] * pp_size


def layers_in_flight(num_layers: int, layout: ParallelDims, stage: int) -> int:
    """Layer-micro-batches whose activations stage ``stage`` holds at its peak."""
    pp, vpp = layout.pp_size, layout.vpp_size
    if vpp is None:
        return min(pp - stage, layout.num_microbatches) * (num_layers // pp)
    chunk_microbatches = min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, layout.num_microbatches * vpp)
    return chunk_microbatches * (num_layers // (pp * vpp))


def _unfused_bytes_per_layer(arch: ModelArchitecture, cfg: Config, layout: ParallelDims) -> float:
    megatron_cfg = cfg.policy.megatron_cfg
    tokens = cfg.policy.max_total_sequence_length * 2 * cfg.policy.train_micro_batch_size
    elements = 0
    if megatron_cfg.bias_activation_fusion == "false":
        elements += tokens * arch.ffn_hidden_size
    if megatron_cfg.apply_rope_fusion == "false":
        head_dim = arch.kv_channels or arch.hidden_size // arch.num_attention_heads
        elements += tokens * (arch.num_attention_heads + arch.num_query_groups) * head_dim
    return elements / layout.tp_size * _WEIGHT_BYTES[cfg.policy.precision]


def _activation_bytes(arch: ModelArchitecture, cfg: Config, layout: ParallelDims, stage: int) -> float:
    megatron_cfg = cfg.policy.megatron_cfg
    tp = layout.tp_size
    sbh = cfg.policy.max_total_sequence_length * 2 * cfg.policy.train_micro_batch_size * arch.hidden_size
    unit = sbh * _WEIGHT_BYTES[cfg.policy.precision] / 2
    full_layer = unit * (34 / tp if megatron_cfg.sequence_parallel else 10 + 24 / tp)
    full_layer += _unfused_bytes_per_layer(arch, cfg, layout)
    in_flight = layers_in_flight(arch.num_layers, layout, stage)
    if megatron_cfg.activation_checkpointing:
        return in_flight * unit * 2 / (tp if megatron_cfg.sequence_parallel else 1) + full_layer
    return in_flight * full_layer


def _runtime_bytes(cfg: Config, layout: ParallelDims, is_last: bool, arch: ModelArchitecture) -> float:
    groups = sum(size > 1 for size in (layout.tp_size, layout.pp_size, layout.dp_size))
    wgrad = 0
    if cfg.policy.megatron_cfg.gradient_accumulation_fusion == "false" and is_last:
        wgrad = arch.padded_vocab_size(layout.tp_size) * arch.hidden_size // layout.tp_size * 2
    return RUNTIME_BYTES + groups * NCCL_BYTES_PER_GROUP + wgrad


def _logits_bytes(arch: ModelArchitecture, cfg: Config, layout: ParallelDims) -> float:
    """The last stage's logits (parallel/logprobs.py): fp32 (Float16Module
    casts them up), their gradient written into the same storage, and in bf16
    the 16-bit logits / their gradient beside it; plus one chunk of work space."""
    from megatron_dpo.parallel.logprobs import CHUNK_BYTES

    elements = (cfg.policy.max_total_sequence_length * 2 * cfg.policy.train_micro_batch_size
                * arch.padded_vocab_size(layout.tp_size) // layout.tp_size)
    sixteen_bit = 2 if cfg.policy.precision == "bfloat16" else 0
    return elements * (4 + sixteen_bit) + 2 * CHUNK_BYTES


def _optimizer_params(arch: ModelArchitecture, layout: ParallelDims, stage: int, params: int,
                      distributed: bool) -> float:
    """The stage's parameters whose Adam state one GPU holds: with the distributed
    optimizer dense ones sharded over DP, experts over the expert-DP ranks."""
    if not distributed:
        return params
    experts = stage_parameters(arch, layout.tp_size, layout.pp_size, layout.ep_size, layout.etp_size,
                               experts_only=True)[stage] if arch.is_moe else 0
    expert_dp = layout.world_size // (layout.etp_size * layout.ep_size * layout.pp_size)
    return (params - experts) / layout.dp_size + experts / expert_dp


def _stage_rows(arch: ModelArchitecture, cfg: Config, layout: ParallelDims, stage: int, params: int):
    precision = cfg.policy.precision
    weight_bytes = _WEIGHT_BYTES[precision]
    distributed = cfg.policy.megatron_cfg.optimizer.use_distributed_optimizer
    optimizer_bytes = 12 if precision == "bfloat16" else 8  # (fp32 master +) Adam m, v
    shards = layout.dp_size if distributed else 1
    optimizer_what = ("fp32 master + " if precision == "bfloat16" else "") + "Adam m, v"
    optimizer_what += f", sharded over DP {shards}" if distributed else ", not sharded"
    if distributed and arch.is_moe:
        optimizer_what += f"; experts over expert-DP {layout.world_size // (layout.etp_size * layout.ep_size * layout.pp_size)}"
    is_last = stage == layout.pp_size - 1
    lora_cfg = cfg.policy.lora_cfg
    if lora_cfg.enabled:  # the base is frozen: grads and Adam state for the adapters only
        adapters = lora_stage_parameters(arch, lora_cfg, layout.tp_size, layout.pp_size)[stage]
        return [
            (f"base weights ({precision}, frozen)", params * weight_bytes),
            (f"adapter weights (r={lora_cfg.dim}, {adapters / 1e6:.1f}M per GPU)", adapters * weight_bytes),
            ("adapter grads (fp32)", adapters * 4),
            (f"adapter optimizer ({optimizer_what})", adapters * optimizer_bytes / shards),
            ("reference weights (LoRA: base + initial adapters, no copy)", 0),
            ("activations (rough)", _activation_bytes(arch, cfg, layout, stage)),
            ("logits + log-softmax", _logits_bytes(arch, cfg, layout) if is_last else 0),
        ]
    reference = params * weight_bytes if cfg.reference.mode == "online" else 0
    return [
        (f"policy weights ({precision})", params * weight_bytes),
        ("policy grads (fp32)", params * 4),
        (f"optimizer ({optimizer_what})", _optimizer_params(arch, layout, stage, params, distributed) * optimizer_bytes),
        (f"reference weights (reference.mode={cfg.reference.mode})", reference),
        ("activations (rough)", _activation_bytes(arch, cfg, layout, stage)),
        ("logits + log-softmax", _logits_bytes(arch, cfg, layout) if is_last else 0),
        ("CUDA context, workspaces, NCCL buffers (+ unfused wgrad)", _runtime_bytes(cfg, layout, is_last, arch)),
    ]


def estimate_memory(arch: ModelArchitecture, cfg: Config, layout: ParallelDims) -> MemoryEstimate:
    """The estimate for the pipeline stage that needs the most memory."""
    estimates = [
        MemoryEstimate(stage, params, _stage_rows(arch, cfg, layout, stage, params))
        for stage, params in enumerate(stage_parameters(arch, layout.tp_size, layout.pp_size, layout.ep_size,
                                                         layout.etp_size))
    ]
    return max(estimates, key=lambda estimate: estimate.total_bytes)
