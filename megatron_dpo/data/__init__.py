"""Data pipeline: files -> pairs -> token ids -> DP-sharded steps -> micro-batches.

Pure (no torch.distributed): the sampler gets dp_rank / dp_size passed in.
"""

from megatron_dpo.config.schema import DataConfig
from megatron_dpo.data.cache import TokenizedDataset, open_tokenized
from megatron_dpo.data.chat import render_chat
from megatron_dpo.data.collate import collate_microbatch, make_microbatches, step_seq_length
from megatron_dpo.data.errors import DataError
from megatron_dpo.data.fingerprint import pairs_fingerprint
from megatron_dpo.data.formats import PreferencePair, load_pairs
from megatron_dpo.data.sampler import PairSampler
from megatron_dpo.data.tokenize import TokenizedPair, TokenizeResult, tokenize_pairs


def split_paths(data_cfg: DataConfig) -> dict[str, str]:
    """Data set name -> path: "train", "val" (data.val_data_path), and
    "val/<name>" for each of data.val_data_paths; names are metric splits."""
    paths = {"train": data_cfg.train_data_path}
    if data_cfg.val_data_path:
        paths["val"] = data_cfg.val_data_path
    paths.update({f"val/{name}": path for name, path in data_cfg.val_data_paths.items()})
    return paths


def build_dataset(path: str, data_cfg: DataConfig, tokenizer, max_length: int) -> TokenizeResult:
    """Load one file and tokenize it in memory under data_cfg's
    overlength_policy / truncation_mode (open_tokenized: the same, cached)."""
    return tokenize_pairs(load_pairs(path, data_cfg), tokenizer, max_length, data_cfg.overlength_policy,
                          data_cfg.truncation_mode)


__all__ = [
    "DataError", "PreferencePair", "load_pairs", "render_chat",
    "TokenizedPair", "TokenizeResult", "tokenize_pairs", "pairs_fingerprint",
    "TokenizedDataset", "open_tokenized",
    "PairSampler",
    "collate_microbatch", "make_microbatches", "step_seq_length",
    "build_dataset", "split_paths",
]
