"""Data pipeline: files -> pairs -> token ids -> DP-sharded steps -> micro-batches.

Pure (no torch.distributed): the sampler gets dp_rank / dp_size passed in.
"""

from megatron_dpo.config.schema import DataConfig
from megatron_dpo.data.collate import collate_microbatch, make_microbatches, step_seq_length
from megatron_dpo.data.formats import DataError, PreferencePair, load_pairs
from megatron_dpo.data.sampler import PairSampler
from megatron_dpo.data.tokenize import TokenizedPair, TokenizeResult, tokenize_pairs


def build_dataset(path: str, data_cfg: DataConfig, tokenizer, max_length: int) -> TokenizeResult:
    """Load and tokenize one file under data_cfg.overlength_policy."""
    pairs = load_pairs(path, data_cfg)
    return tokenize_pairs(pairs, tokenizer, max_length, data_cfg.overlength_policy)


__all__ = [
    "DataError", "PreferencePair", "load_pairs",
    "TokenizedPair", "TokenizeResult", "tokenize_pairs",
    "PairSampler",
    "collate_microbatch", "make_microbatches", "step_seq_length",
    "build_dataset",
]
