"""The typed config tree.

Key names follow the seed tutorial and NeMo RL's ``examples/configs/dpo.yaml``
so that a NeMo RL user's ``key=value`` override lines carry over. Batch sizes
count preference *pairs* (one pair = a chosen and a rejected sequence).
Each component receives only its own sub-tree, never the whole config.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional


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
class MegatronConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


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
    # What to do with a pair longer than policy.max_total_sequence_length:
    # "drop" (skip it, counted and logged) or "truncate" (cut the prompt's
    # start, then the completions' ends).
    overlength_policy: str = "truncate"


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


@dataclass
class CheckpointingConfig:
    enabled: bool = True
    checkpoint_dir: str = "results/dpo"
    # Save every this many steps (and at the end); 0 saves only at the end.
    save_period: int = 50
    # None keeps every checkpoint.
    keep_top_k: Optional[int] = None


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
class Config:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    loss_fn: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


# Choices of string-valued keys, checked at load.
CHOICES: Dict[str, tuple] = {
    "policy.precision": ("float32", "bfloat16"),
    "policy.megatron_cfg.optimizer.optimizer": ("adam",),
    "policy.megatron_cfg.scheduler.lr_decay_style": (
        "constant", "linear", "cosine", "inverse-square-root",
    ),
    "loss_fn.preference_loss": (
        "dpo", "robust", "ipo", "ipo_sum", "hinge", "exo_pair", "discopop",
        "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
        "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl",
    ),
    "data.overlength_policy": ("drop", "truncate"),
}
