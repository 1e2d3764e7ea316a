"""The typed config tree: schema, loading (YAML + overrides) and cross-field validation."""

from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.load import config_to_dict, load_config, save_config
from megatron_dpo.config.schema import (
    CHOICES,
    CheckpointingConfig,
    Config,
    DataConfig,
    DPOConfig,
    LoggerConfig,
    LossConfig,
    MegatronConfig,
    OptimizerConfig,
    PolicyConfig,
    ReferenceConfig,
    SchedulerConfig,
    TokenizerConfig,
    WandbConfig,
)
from megatron_dpo.config.validate import check_layout, resolve_val_num_microbatches

__all__ = [
    "CHOICES", "CheckpointingConfig", "Config", "ConfigError", "DataConfig", "DPOConfig",
    "LoggerConfig", "LossConfig", "MegatronConfig", "OptimizerConfig",
    "PolicyConfig", "ReferenceConfig", "SchedulerConfig", "TokenizerConfig", "WandbConfig", "config_to_dict",
    "check_layout", "load_config", "resolve_val_num_microbatches", "save_config",
]
