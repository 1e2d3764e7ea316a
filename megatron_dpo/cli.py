"""Entry points used by scripts/: ``run_dpo`` (train), ``precompute_reference``
and ``validate-config``."""

import argparse
import logging
import os
import sys
import warnings
from typing import Callable, List, Optional

from megatron_dpo.config import ConfigError, load_config
from megatron_dpo.data import DataError
from megatron_dpo.checkpoint.errors import CheckpointSaveError
from megatron_dpo.train.errors import NonFiniteError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "dpo.yaml")


def _quiet_library_warnings() -> None:
    # megatron-core warns once per module that TE/apex are absent; the run
    # banner states which kernels are in use instead.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*")
    warnings.filterwarnings("ignore", message=r".*cuda_graph_scope.*")
    # torch.distributed.checkpoint's loader, as megatron-core's dist_checkpointing calls it.
    warnings.filterwarnings("ignore", message=r".*Please use DTensor instead.*", category=FutureWarning)
    # megatron-core logs every parameter name and its optimizer config at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)


def _parser(description: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. dpo.max_num_epochs=1")
    return parser


def _config_path(path: Optional[str]) -> Optional[str]:
    if path is None and os.path.isfile(DEFAULT_CONFIG):
        return DEFAULT_CONFIG
    return path


def _parse(argv: Optional[List[str]], description: str):
    args = _parser(description).parse_args(argv)
    return _config_path(args.config), args.overrides


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_dpo(argv: Optional[List[str]] = None) -> int:
    """Train. Returns the process exit code."""
    from megatron_dpo.train.lifetime import end_with_parent

    end_with_parent()

    def train(cfg):
        from megatron_dpo.train.loop import train

        train(cfg)

    return _main(argv, "DPO training on megatron-core", train)


def precompute_reference(argv: Optional[List[str]] = None) -> int:
    """Compute and store the reference log-probs of reference.mode=cached for
    the configured data sets, without training. Returns the process exit code."""
    def precompute(cfg):
        from megatron_dpo.train.setup import precompute_reference

        precompute_reference(cfg)

    return _main(argv, "Precompute the reference log-probs of reference.mode=cached", precompute)


def _main(argv: Optional[List[str]], description: str, action: Callable) -> int:
    """Load the config, run ``action(cfg)``; a user error exits 2 with its message,
    a diverged run (NonFiniteError) 3, a checkpoint that could not be written 4."""
    from megatron_dpo.loss.registry import check_loss_config

    _quiet_library_warnings()
    logging.basicConfig(level=logging.INFO if _is_rank0() else logging.WARNING, format="%(message)s")
    try:
        path, overrides = _parse(argv, description)
        cfg = load_config(path, overrides)
        check_loss_config(cfg.loss_fn)
        action(cfg)
    except (ConfigError, DataError) as error:
        if _is_rank0():
            print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteError as error:
        if _is_rank0():
            print(f"error: {error}", file=sys.stderr)
        return 3
    except CheckpointSaveError as error:
        if _is_rank0():
            print(f"error: {error}", file=sys.stderr)
        return 4
    finally:
        from megatron_dpo.parallel.init import shutdown

        shutdown()
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def validate_config(argv: Optional[List[str]] = None) -> int:
    """Check a config for a world size without running it (no GPUs, no
    weights): print the layout, the batch arithmetic and a per-GPU memory
    estimate. Returns the exit code: 0 valid, 2 invalid (the reason on stderr)."""
    from megatron_dpo.loss.registry import check_loss_config

    parser = _parser("Check a config for a world size without running it.", "python -m megatron_dpo.cli validate-config")
    parser.add_argument("--world-size", type=_positive_int, required=True,
                        help="GPUs (ranks) the run uses: nodes x GPUs per node")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="memory of one GPU; the estimate must fit (default: 80, an H100)")
    args = parser.parse_args(argv)
    _quiet_library_warnings()
    path = _config_path(args.config)
    try:
        cfg = load_config(path, args.overrides)
        check_loss_config(cfg.loss_fn)
        _print_plan(cfg, args.world_size, args.gpu_memory_gib)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"OK: {path} is valid for world size {args.world_size}.")
    return 0


def _count(num: int) -> str:
    return f"{num / 1e9:.2f}B" if num >= 1e9 else f"{num / 1e6:.2f}M"


def _print_plan(cfg, world_size: int, gpu_memory_gib: float) -> None:
    from megatron_dpo.checkpoint.source import resolve_architecture
    from megatron_dpo.config.validate import resolve_val_num_microbatches
    from megatron_dpo.data import split_paths
    from megatron_dpo.models.kernels import detect_env, sequence_parallel_problem
    from megatron_dpo.models.memory import GIB, active_parameters, estimate_memory, stage_parameters
    from megatron_dpo.parallel.dims import ParallelDims

    policy = cfg.policy
    arch, origin = resolve_architecture(policy)
    total_params = sum(stage_parameters(arch, 1, 1))
    print(f"model: {origin}\n  {arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_attention_heads} heads, "
          f"{arch.num_query_groups} query groups, vocab {arch.vocab_size}: {_count(total_params)} parameters")
    if arch.is_moe:
        print(f"  Mixture of Experts: {arch.num_experts} experts, top-{arch.moe_router_topk}: "
              f"{_count(active_parameters(arch))} active parameters per token")
    layout = ParallelDims.resolve(policy, world_size, arch.num_layers, arch.num_attention_heads,
                                  arch.num_query_groups, arch.num_experts)
    megatron_cfg = policy.megatron_cfg
    problem = sequence_parallel_problem(megatron_cfg.sequence_parallel, detect_env())
    if problem is not None:
        raise ConfigError(problem)
    print(f"layout: world {world_size} = TP {layout.tp_size} x PP {layout.pp_size} x DP {layout.dp_size}"
          f" (virtual pipeline {layout.vpp_size}, sequence parallel {megatron_cfg.sequence_parallel})")
    if arch.is_moe:
        expert_dp = world_size // (layout.etp_size * layout.ep_size * layout.pp_size)
        print(f"experts: world {world_size} = expert-TP {layout.etp_size} x EP {layout.ep_size} x PP {layout.pp_size} "
              f"x expert-DP {expert_dp}; {arch.num_experts // layout.ep_size} expert(s) per GPU, "
              f"{megatron_cfg.moe_token_dispatcher_type} dispatcher, dropless")
    print(f"train batch: {policy.train_global_batch_size} pairs = {policy.train_micro_batch_size} per micro-batch x "
          f"{layout.num_microbatches} micro-batches x DP {layout.dp_size}; a micro-batch is "
          f"{2 * policy.train_micro_batch_size} sequences of <= {policy.max_total_sequence_length} tokens")
    if len(split_paths(cfg.data)) > 1:
        val_microbatches = resolve_val_num_microbatches(cfg.dpo, layout)
        print(f"val batch: {cfg.dpo.val_global_batch_size} pairs = {cfg.dpo.val_micro_batch_size} per micro-batch x "
              f"{val_microbatches} micro-batches x DP {layout.dp_size}")
    estimate = estimate_memory(arch, cfg, layout)
    print(f"memory per GPU, GiB (estimate; pipeline stage {estimate.stage}, "
          f"{_count(estimate.num_parameters)} policy parameters per GPU):")
    for what, size in estimate.rows:
        print(f"  {what:<58} {size / GIB:8.2f}")
    total_gib = estimate.total_bytes / GIB
    print(f"  {'total (without allocator fragmentation)':<58} {total_gib:8.2f}")
    if total_gib > gpu_memory_gib:
        raise ConfigError(
            f"Estimated memory per GPU ({total_gib:.1f} GiB) exceeds --gpu-memory-gib {gpu_memory_gib:g}. "
            f"Fix: {'; '.join(_memory_fixes(megatron_cfg, layout))}."
        )


def _memory_fixes(megatron_cfg, layout) -> List[str]:
    fixes = []
    if not megatron_cfg.activation_checkpointing:
        fixes.append("set policy.megatron_cfg.activation_checkpointing=true")
    if not megatron_cfg.optimizer.use_distributed_optimizer and layout.dp_size > 1:
        fixes.append("set policy.megatron_cfg.optimizer.use_distributed_optimizer=true")
    return fixes + [
        "raise policy.megatron_cfg.tensor_model_parallel_size or pipeline_model_parallel_size (or the world size)",
        "lower policy.train_micro_batch_size or policy.max_total_sequence_length",
    ]


COMMANDS = {"validate-config": validate_config}


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m megatron_dpo.cli COMMAND ...``"""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m megatron_dpo.cli {{{','.join(COMMANDS)}}} [--help] ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
