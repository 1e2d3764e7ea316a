"""Build the typed config tree: schema defaults <- YAML file <- ``key=value`` overrides.

Everything the user can get wrong at this stage (an unknown or misspelt key, a
value of the wrong type, a string outside its choices, a number out of range)
is reported as a ``ConfigError`` naming the key, the value, its source and the
fix. Cross-field checks that need the world size or the model's shape live in
``validate.py``.
"""

import dataclasses
import difflib
import functools
import os
import tempfile
import typing
from typing import Any, Callable, Dict, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_dpo.config.errors import ConfigError
from megatron_dpo.config.schema import CHOICES, LORA_HF_TARGETS, LORA_MEGATRON_TARGETS, Config

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "a boolean (true or false)", str: "a string"}

# Range checks, by key. Keys holding None (an unset Optional) are skipped.
_AT_LEAST_ONE = (
    "policy.lora_cfg.dim",
    "policy.train_global_batch_size",
    "policy.train_micro_batch_size",
    "policy.max_total_sequence_length",
    "policy.megatron_cfg.tensor_model_parallel_size",
    "policy.megatron_cfg.pipeline_model_parallel_size",
    "policy.megatron_cfg.virtual_pipeline_model_parallel_size",
    "policy.megatron_cfg.expert_model_parallel_size",
    "policy.megatron_cfg.expert_tensor_parallel_size",
    "policy.megatron_cfg.scheduler.lr_decay_iters",
    "dpo.max_num_epochs",
    "dpo.max_num_steps",
    "dpo.val_batches",
    "dpo.val_global_batch_size",
    "dpo.val_micro_batch_size",
    "dpo.max_consecutive_nonfinite",
    "checkpointing.keep_top_k",
)
_NON_NEGATIVE = (
    "policy.max_grad_norm",
    "policy.megatron_cfg.optimizer.lr",
    "policy.megatron_cfg.optimizer.min_lr",
    "policy.megatron_cfg.optimizer.weight_decay",
    "policy.megatron_cfg.scheduler.lr_warmup_iters",
    "policy.megatron_cfg.scheduler.lr_warmup_init",
    "policy.megatron_cfg.moe_aux_loss_coeff",
    "policy.megatron_cfg.moe_z_loss_coeff",
    "loss_fn.preference_loss_weight",
    "loss_fn.sft_loss_weight",
    "dpo.val_period",
    "checkpointing.save_period",
    "logger.num_val_samples_to_print",
)
_POSITIVE = (
    "loss_fn.reference_policy_kl_penalty",
    "loss_fn.discopop_tau",
    "policy.megatron_cfg.optimizer.adam_eps",
)
_UNIT_INTERVAL = (
    "policy.lora_cfg.dropout",
    "policy.megatron_cfg.optimizer.adam_beta1",
    "policy.megatron_cfg.optimizer.adam_beta2",
    "loss_fn.label_smoothing",
)


def load_config(path: Optional[str], overrides: Sequence[str]) -> Config:
    """Defaults, then the YAML file (if any), then each override in order; validated."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        merged = _merge_yaml(merged, path)
    for override in overrides:
        merged = _merge_override(merged, override)
    try:
        cfg = OmegaConf.to_object(merged)  # resolves ${...} interpolations
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(f"Could not resolve config key '{e.full_key}': {reason}") from None
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_checkpointing(cfg)
    _check_lora(cfg)
    return cfg


def duration_seconds(text: str) -> int:
    """Seconds of "HH:MM:SS" or "DD:HH:MM:SS" (NeMo RL's checkpoint_must_save_by)."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or not all(part.isdigit() for part in parts):
        raise ConfigError(
            f"Invalid value for 'checkpointing.checkpoint_must_save_by': {text!r}. "
            "Write the wall-clock budget as HH:MM:SS (e.g. 03:45:00) or DD:HH:MM:SS."
        )
    seconds = 0
    for part, unit in zip(reversed(parts), (1, 60, 3600, 86400)):
        seconds += int(part) * unit
    return seconds


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """Plain nested dict of the resolved config (for logging and saving)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML, atomically: a reader never sees half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
    os.replace(f.name, path)


@functools.lru_cache(maxsize=None)
def _schema_keys(cls: type = Config, prefix: str = "") -> Dict[str, Any]:
    """Every dotted key of the schema -> its annotated type (a dataclass for a section)."""
    keys = {}
    for f in dataclasses.fields(cls):
        keys[prefix + f.name] = f.type
        if dataclasses.is_dataclass(f.type):
            keys.update(_schema_keys(f.type, prefix + f.name + "."))
    return keys


def _merge_yaml(base: DictConfig, path: str) -> DictConfig:
    if not os.path.isfile(path):
        raise ConfigError(
            f"Config file not found: '{path}'. Pass an existing YAML file "
            f"(e.g. configs/dpo.yaml), or no file to start from the defaults."
        )
    with open(path) as f:
        text = f.read()
    try:
        layer = OmegaConf.create(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"Could not parse config file '{path}': {e}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"Config file '{path}' must hold a mapping of keys at the top level.")
    lines = {}
    if root is not None:
        _check_yaml_keys(root, "", path, lines)
    return _merge(base, layer, lambda key: f"{path}:{lines.get(key, '?')}")


def _check_yaml_keys(node: yaml.MappingNode, prefix: str, path: str, lines: Dict[str, int]) -> None:
    """Check each key of the YAML tree against the schema, recording its line for messages."""
    for key_node, value_node in node.value:
        key = prefix + str(key_node.value)
        lines[key] = key_node.start_mark.line + 1
        is_mapping = isinstance(value_node, yaml.MappingNode)
        _check_key(key, f"{path}:{lines[key]}", is_mapping)
        if is_mapping:
            _check_yaml_keys(value_node, key + ".", path, lines)


def _merge_override(base: DictConfig, override: str) -> DictConfig:
    source = f"command-line override '{override}'"
    key, sep, _ = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"Malformed {source}: expected key=value, "
            f"e.g. policy.train_global_batch_size=32 or dpo.val_period=0."
        )
    _check_key(key, source, is_mapping=False)
    return _merge(base, OmegaConf.from_dotlist([override]), lambda _: source)


def _merge(base: DictConfig, layer: DictConfig, source_of: Callable[[str], str]) -> DictConfig:
    """Merge one layer; OmegaConf's type errors become ConfigErrors that name the source."""
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        key = str(e.full_key)
        value = OmegaConf.select(layer, key, throw_on_resolution_failure=False)
        raise ConfigError(
            f"Invalid value for '{key}' ({source_of(key)}): {value!r} is not "
            f"{_type_name(_schema_keys().get(key))}. Set {key} to {_type_name(_schema_keys().get(key))}."
        ) from None


def _check_key(key: str, source: str, is_mapping: bool) -> None:
    keys = _schema_keys()
    if _is_name_map(keys.get(key.rpartition(".")[0])):
        return  # an entry of a {name: value} key, e.g. data.val_data_paths.<name>
    if key not in keys:
        raise ConfigError(f"Unknown config key '{key}' ({source}).{_suggestion(key, keys)}")
    is_section = dataclasses.is_dataclass(keys[key])
    if is_section and not is_mapping:
        child = next(k for k in keys if k.startswith(key + ".") and not dataclasses.is_dataclass(keys[k]))
        raise ConfigError(
            f"'{key}' ({source}) is a section, not a value. Set its keys instead, e.g. {child}=..."
        )
    if is_mapping and not is_section and not _is_name_map(keys[key]):
        raise ConfigError(f"'{key}' ({source}) takes {_type_name(keys[key])}, not a mapping of keys.")


def _suggestion(key: str, keys: Dict[str, Any]) -> str:
    """Nearest valid key: by the whole dotted path, else by the last part (wrong section)."""
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not match:
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        leaf = difflib.get_close_matches(key.rsplit(".", 1)[-1], by_leaf, n=1, cutoff=0.8)
        match = [by_leaf[leaf[0]]] if leaf else []
    return f" Did you mean '{match[0]}'?" if match else " Valid keys are listed in configs/dpo.yaml."


def _is_name_map(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict


def _type_name(annotation: Any) -> str:
    if _is_name_map(annotation):
        return "a mapping of names to values ({name: value, ...})"
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return f"{_TYPE_NAMES.get(args[0], args[0])} or null"
    return _TYPE_NAMES.get(annotation, str(annotation))


def _get(cfg: Config, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


def _check_choices(cfg: Config) -> None:
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if choices[-2:] == ("true", "false") and value in ("True", "False"):
            # YAML true/false in a string key (auto | true | false) arrives as "True"/"False".
            value = value.lower()
            parent, _, leaf = key.rpartition(".")
            setattr(_get(cfg, parent), leaf, value)
        if value not in choices:
            raise ConfigError(
                f"Invalid value for '{key}': {value!r}. Choose one of: {', '.join(choices)}."
            )


def _check_ranges(cfg: Config) -> None:
    checks = [(key, lambda v: v >= 1, "an integer >= 1") for key in _AT_LEAST_ONE]
    checks += [(key, lambda v: v >= 0, "a value >= 0") for key in _NON_NEGATIVE]
    checks += [(key, lambda v: v > 0, "a value > 0") for key in _POSITIVE]
    checks += [(key, lambda v: 0 <= v < 1, "a value in [0, 1)") for key in _UNIT_INTERVAL]
    for key, is_valid, wanted in checks:
        value = _get(cfg, key)
        if value is not None and not is_valid(value):
            raise ConfigError(f"Invalid value for '{key}': {value}. Set {key} to {wanted}.")
    optimizer = cfg.policy.megatron_cfg.optimizer
    if optimizer.min_lr > optimizer.lr:  # megatron-core's OptimizerParamScheduler asserts this
        raise ConfigError(
            f"Invalid learning rates: policy.megatron_cfg.optimizer.min_lr({optimizer.min_lr}) > "
            f"lr({optimizer.lr}). Lower min_lr or raise lr."
        )


def _check_checkpointing(cfg: Config) -> None:
    checkpointing = cfg.checkpointing
    if checkpointing.checkpoint_must_save_by is not None:
        duration_seconds(checkpointing.checkpoint_must_save_by)
    if checkpointing.export_hf_dir is not None and not checkpointing.enabled:
        raise ConfigError(
            "checkpointing.export_hf_dir needs checkpointing.enabled=true (the export is converted from the "
            "final checkpoint). Enable checkpointing, or set export_hf_dir=null."
        )
    metric = checkpointing.metric_name
    if metric is not None and (metric.count(":") != 1 or metric.split(":")[0].split("/")[0] not in ("train", "val")):
        raise ConfigError(
            f"Invalid value for 'checkpointing.metric_name': {metric!r}. Name a split and a metric, "
            "e.g. val:loss, val/<name>:accuracy or train:loss (or null to keep the newest checkpoints)."
        )


def _check_lora(cfg: Config) -> None:
    lora = cfg.policy.lora_cfg
    if not lora.enabled:
        for key, value in (("policy.lora_cfg.init_adapter_path", lora.init_adapter_path),
                           ("checkpointing.export_adapter_dir", cfg.checkpointing.export_adapter_dir)):
            if value is not None:
                raise ConfigError(f"{key}={value!r} needs policy.lora_cfg.enabled=true. Enable LoRA, or set {key}=null.")
        return
    valid = list(LORA_HF_TARGETS) + list(LORA_MEGATRON_TARGETS)
    unknown = [name for name in lora.target_modules if name not in valid]
    if unknown or not lora.target_modules:
        raise ConfigError(
            f"Invalid value for 'policy.lora_cfg.target_modules': {list(lora.target_modules)}"
            f"{f' ({unknown} unknown)' if unknown else ' (empty)'}. Name some of: {', '.join(valid)}."
        )
    if lora.alpha <= 0:
        raise ConfigError(f"Invalid value for 'policy.lora_cfg.alpha': {lora.alpha}. Set it to a value > 0.")
    if cfg.policy.megatron_cfg.sequence_parallel:
        raise ConfigError("policy.lora_cfg.enabled=true does not support policy.megatron_cfg.sequence_parallel=true "
                          "yet: set sequence_parallel=false.")
    if cfg.checkpointing.export_adapter_dir is not None and not cfg.checkpointing.enabled:
        raise ConfigError("checkpointing.export_adapter_dir needs checkpointing.enabled=true (the export is "
                          "converted from the final checkpoint). Enable checkpointing, or set it to null.")
