"""The typed config tree.

Key names follow the seed tutorial and NeMo RL's ``examples/configs/dpo.yaml``
so that a NeMo RL user's ``key=value`` override lines carry over. Batch sizes
count preference *pairs* (one pair = a chosen and a rejected sequence).
Each component receives only its own sub-tree, never the whole config.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class TokenizerConfig:
    # None: use the tokenizer stored with policy.model_name.
    name: Optional[str] = None
    # A Jinja chat template overriding the tokenizer's own (chat-form data).
    chat_template: Optional[str] = None


@dataclass
class OptimizerConfig:
    optimizer: str = "adam"
    lr: float = 5.0e-6
    min_lr: float = 5.0e-6
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1.0e-8
    # Shard optimizer state over data-parallel ranks (ZeRO-1).
    use_distributed_optimizer: bool = False


@dataclass
class SchedulerConfig:
    lr_warmup_iters: int = 1
    lr_warmup_init: float = 0.0
    # constant | linear | cosine | inverse-square-root
    lr_decay_style: str = "constant"
    # None: decay over the whole run (the resolved number of steps).
    lr_decay_iters: Optional[int] = None


@dataclass
class DistributedDataParallelConfig:
    # Reduce gradients bucket by bucket while the backward pass still runs
    # (megatron-core's DDP with its default buckets).
    overlap_grad_reduce: bool = False
    # With the distributed optimizer: all-gather updated parameters bucket by
    # bucket during the next forward pass.
    overlap_param_gather: bool = False


@dataclass
class MegatronConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    # Fused kernels, each auto | true | false. auto: on with Transformer Engine
    # and CUDA (gradient_accumulation_fusion also needs apex's fused wgrad
    # kernel), off otherwise; models/kernels.py resolves them.
    apply_rope_fusion: str = "auto"
    bias_activation_fusion: str = "auto"
    gradient_accumulation_fusion: str = "auto"
    bias_dropout_fusion: str = "auto"
    masked_softmax_fusion: str = "auto"
    # Mixture-of-Experts (used only when the model has experts; Megatron-LM /
    # NeMo RL names). Experts are split over expert_model_parallel_size ranks
    # and each expert over expert_tensor_parallel_size ranks (NeMo RL's default 1).
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    # Routing is dropless (no capacity factor). aux_loss | seq_aux_loss |
    # global_aux_loss | none; the loss is added to the policy's DPO loss with
    # moe_aux_loss_coeff (0: not added); moe_z_loss_coeff: router z-loss, None: off.
    moe_router_load_balancing_type: str = "aux_loss"
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: Optional[float] = None
    # alltoall | allgather
    moe_token_dispatcher_type: str = "alltoall"
    # auto | true | false: grouped-GEMM experts (TE, CUDA), else sequential ones.
    moe_grouped_gemm: str = "auto"
    distributed_data_parallel_config: DistributedDataParallelConfig = field(
        default_factory=DistributedDataParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class LoraConfig:
    # Train low-rank adapters over the frozen base instead of every weight;
    # the reference is then the base with the initial adapters (models/lora.py).
    enabled: bool = False
    # Adapter rank r (PEFT's r).
    dim: int = 8
    # PEFT's lora_alpha: the adapter output is scaled by alpha / dim.
    alpha: float = 16.0
    # Dropout on the adapter input (PEFT's lora_dropout).
    dropout: float = 0.0
    # HF names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)
    # or megatron names (linear_qkv = q,k,v; linear_proj = o; linear_fc1 =
    # gate,up; linear_fc2 = down).
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # A PEFT adapter directory (adapter_config.json + adapter_model.safetensors)
    # to start from; None: fresh adapters (A random, B zero).
    init_adapter_path: Optional[str] = None


@dataclass
class PolicyConfig:
    # A built-in preset name (see megatron_dpo.models.presets), an HF checkpoint
    # directory (config.json + safetensors) or a megatron_dpo checkpoint dir.
    model_name: str = "tiny-llama"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train_global_batch_size: int = 32
    train_micro_batch_size: int = 1
    max_total_sequence_length: int = 1024
    # float32 | bfloat16
    precision: str = "bfloat16"
    max_grad_norm: float = 1.0
    megatron_cfg: MegatronConfig = field(default_factory=MegatronConfig)
    lora_cfg: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class LossConfig:
    # beta of the DPO paper.
    reference_policy_kl_penalty: float = 0.05
    # A name in megatron_dpo.loss.registry.PREFERENCE_LOSSES.
    preference_loss: str = "dpo"
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    # Use per-token mean instead of per-sequence sum of log-probs (the
    # preference loss "ipo" always uses the mean, as TRL does).
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool = False
    # Assumed probability that a pair's label is flipped: conservative DPO
    # (dpo), robust DPO (robust, needs < 0.5), EXO's epsilon (exo_pair; 0
    # means 1e-3, as in TRL).
    label_smoothing: float = 0.0
    # Multiplies the ground-truth reward gap of the rpo_* losses.
    gt_reward_scale: float = 1.0
    # Temperature of the discopop loss's mixing coefficient.
    discopop_tau: float = 0.05


@dataclass
class DataConfig:
    train_data_path: str = "data/demo/train.jsonl"
    val_data_path: Optional[str] = "data/demo/val.jsonl"
    shuffle: bool = True
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    # Named validation sets, {name: path}, each validated and logged as split
    # "val/<name>" (beside val_data_path's "val").
    val_data_paths: Dict[str, str] = field(default_factory=dict)
    # What to do with a pair longer than policy.max_total_sequence_length:
    # "drop" (skip it, counted and logged), "truncate" (cut prompt tokens,
    # the same from both sequences, then the completions' ends) or
    # "truncate_sequence" (TRL's: cut each of prompt+chosen, prompt+rejected
    # on its own, as truncation_mode says).
    overlength_policy: str = "truncate"
    # truncate: which part of the prompt survives, keep_end (cut its start,
    # after BOS) | keep_start (cut its end). truncate_sequence: TRL's meaning,
    # keep_start (cut each sequence's end; a pair whose prompt alone fills the
    # length is dropped) | keep_end (cut each sequence's start).
    truncation_mode: str = "keep_end"
    # Padding-free micro-batches: the pairs of a micro-batch back to back in
    # one row, attention confined to each sequence (data/packing.py).
    packing: bool = False
    # Each pair as one packed segment [prompt, chosen, rejected]: the prompt is
    # computed once for both completions (implies packing).
    prefix_sharing: bool = False
    # Where each data set is tokenized once (memory-mapped Arrow, keyed by the
    # file, tokenizer, length and truncation settings) and reused on restarts;
    # None: <checkpointing.checkpoint_dir>/tokenized_cache. One process builds
    # it while the others on the same file system wait.
    cache_dir: Optional[str] = None


@dataclass
class DPOConfig:
    max_num_epochs: int = 1
    # None: run until max_num_epochs is reached.
    max_num_steps: Optional[int] = None
    # Validate every this many steps; 0 disables periodic validation.
    val_period: int = 25
    # None: the whole validation set.
    val_batches: Optional[int] = None
    val_global_batch_size: int = 8
    val_micro_batch_size: int = 1
    val_at_start: bool = True
    val_at_end: bool = True
    seed: int = 42
    # A step whose loss or gradient norm is NaN/inf is skipped (no update,
    # counted in the metric skipped_steps); this many in a row abort the run.
    max_consecutive_nonfinite: int = 5


@dataclass
class CheckpointingConfig:
    enabled: bool = True
    checkpoint_dir: str = "results/dpo"
    # Save every this many steps (and at the end); 0 saves only at the end.
    save_period: int = 50
    # None keeps every checkpoint. The newest one is always kept on top.
    keep_top_k: Optional[int] = None
    # Which checkpoints keep_top_k keeps: "<split>:<metric>" recorded at the
    # saved step (e.g. val:loss, train:accuracy); None keeps the newest.
    metric_name: Optional[str] = None
    higher_is_better: bool = False
    # auto: continue from the newest complete step_N/ in checkpoint_dir;
    # never: start fresh (an earlier run's files move to previous_run_*/);
    # or the path of one step_N/ directory to continue from.
    resume: str = "auto"
    # Resume although the tokenizer or training data differ from the checkpoint's.
    allow_config_change: bool = False
    # How a step dir is checked against its manifest before a resume: "full"
    # (sizes and xxh3 checksums: one read of the checkpoint, split over the
    # ranks) or "size" (one stat per file). A step that fails verification or
    # loading is moved aside as step_N.corrupt; the run continues from the
    # previous complete step.
    verify: str = "full"
    # Wall-clock budget "HH:MM:SS" (or NeMo RL's "DD:HH:MM:SS") from process
    # start: save and exit 0 before it runs out. None: no budget.
    checkpoint_must_save_by: Optional[str] = None
    # At the end of training, write the final policy as a Hugging Face model
    # directory here (safetensors + config + tokenizer; an earlier export is
    # replaced). Needs enabled=true: it is converted from the final step_N/.
    export_hf_dir: Optional[str] = None
    # LoRA runs (policy.lora_cfg.enabled): at the end, write the final
    # adapters as a PEFT adapter directory here (export_hf_dir then holds
    # the merged model). None: no adapter export.
    export_adapter_dir: Optional[str] = None
    # How the distributed optimizer's state is saved. dp_reshardable: each DP
    # rank writes its own shard (megatron's fully-parallel save/load); resume
    # needs the same TP/PP/VPP. fully_reshardable: resumable at any layout, but
    # the save all-gathers each TP/PP shard's optimizer state to every DP rank
    # (~24 GB per rank for 8B at TP4).
    optimizer_format: str = "dp_reshardable"
    # Write a checkpoint's shards in a background process while training goes
    # on (megatron-core's async save); the step dir is completed (manifest,
    # rename) before the next save, and at the end of the run.
    async_save: bool = False


@dataclass
class WandbConfig:
    project: str = "dpo-dev"
    name: str = "dpo"


@dataclass
class LoggerConfig:
    # TensorBoard events and other logs; relative paths are under the run dir.
    log_dir: str = "logs"
    tensorboard_enabled: bool = True
    wandb_enabled: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)
    num_val_samples_to_print: int = 0
    plot_enabled: bool = True


@dataclass
class ReferenceConfig:
    # online: a frozen reference model beside the policy, run every step;
    # cached: its log-probs computed once per data set, stored and reused (no
    # reference model during training); none: reference-free (log-probs 0).
    mode: str = "online"
    # Where cached log-probs live; None: <checkpointing.checkpoint_dir>/reference_cache.
    cache_dir: Optional[str] = None


@dataclass
class Config:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    loss_fn: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


# policy.lora_cfg.target_modules: HF names, each adapting one part of a
# megatron linear layer; a megatron name stands for all of its parts.
LORA_HF_TARGETS = {
    "q_proj": "self_attention.linear_qkv", "k_proj": "self_attention.linear_qkv",
    "v_proj": "self_attention.linear_qkv", "o_proj": "self_attention.linear_proj",
    "gate_proj": "mlp.linear_fc1", "up_proj": "mlp.linear_fc1", "down_proj": "mlp.linear_fc2",
}
LORA_MEGATRON_TARGETS = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",),
}


def lora_hf_targets(target_modules: List[str]) -> List[str]:
    """policy.lora_cfg.target_modules as HF names, in LORA_HF_TARGETS order
    (a name neither HF's nor megatron's is left out: config.load refuses it)."""
    names = set()
    for name in target_modules:
        names.update(LORA_MEGATRON_TARGETS.get(name, (name,)))
    return [name for name in LORA_HF_TARGETS if name in names]


# Choices of string-valued keys, checked at load.
_SWITCH = ("auto", "true", "false")
CHOICES: Dict[str, tuple] = {
    **{f"policy.megatron_cfg.{name}": _SWITCH for name in (
        "apply_rope_fusion", "bias_activation_fusion", "gradient_accumulation_fusion",
        "bias_dropout_fusion", "masked_softmax_fusion", "moe_grouped_gemm")},
    "policy.megatron_cfg.moe_router_load_balancing_type": ("aux_loss", "seq_aux_loss", "global_aux_loss", "none"),
    "policy.megatron_cfg.moe_token_dispatcher_type": ("alltoall", "allgather"),
    "policy.precision": ("float32", "bfloat16"),
    "policy.megatron_cfg.optimizer.optimizer": ("adam",),
    "policy.megatron_cfg.scheduler.lr_decay_style": (
        "constant", "linear", "cosine", "inverse-square-root",
    ),
    # loss_fn.preference_loss: the names are the loss registry's, checked by
    # megatron_dpo.loss.registry.check_loss_config (loss sits above config).
    "data.overlength_policy": ("drop", "truncate", "truncate_sequence"),
    "data.truncation_mode": ("keep_end", "keep_start"),
    "reference.mode": ("online", "cached", "none"),
    "checkpointing.verify": ("size", "full"),
    "checkpointing.optimizer_format": ("dp_reshardable", "fully_reshardable"),
}
