"""Saves of a tiny policy with the distributed optimizer (torchrun, 2 ranks).

    checkpoint_save.py fail OUT_DIR POINT...   # POINT: metadata | common | config
        one save per POINT, in which rank 0 alone fails (ENOSPC) to write
        dist_checkpointing's .metadata, common.pt or metadata.json; every
        rank prints ``RANK r SAVE_ERROR <message>`` (or hangs, the bug).
"""

import builtins
import contextlib
import errno
import io
import os
import sys

import torch

from megatron_dpo.checkpoint.errors import CheckpointSaveError
from megatron_dpo.checkpoint.save import save_checkpoint
from megatron_dpo.config.schema import MegatronConfig
from megatron_dpo.models import presets, weights
from megatron_dpo.models.build import build_model
from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import init_parallel, shutdown
from megatron_dpo.train.optimizer import build_optimizer, wrap_ddp


def tiny_policy(world_size: int):
    """(dims, DDP chunks, distributed optimizer) of tiny-llama at DP=world_size."""
    dims = init_parallel(ParallelDims.of_sizes(world_size=world_size), seed=0)
    arch = presets.preset_architecture("tiny-llama", vocab_size=256)
    chunks = build_model(arch, dims)
    weights.init_weights(chunks, arch, dims, seed=0)
    megatron_cfg = MegatronConfig()
    megatron_cfg.optimizer.use_distributed_optimizer = True
    chunks = wrap_ddp(chunks, megatron_cfg)
    optimizer = build_optimizer(chunks, megatron_cfg, "float32", max_grad_norm=1.0)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.step()  # Adam's state exists from the first step on
    return dims, chunks, optimizer


# Each file as its writer opens it: DCP's .metadata (through a temporary
# name) and metadata.json with open, common.pt with torch.save.
FILES = {"metadata": ".metadata.tmp", "config": "metadata.json", "common": "common.pt"}


def _disk_full_for(name: str, function, path_index: int):
    def wrapper(*args, **kwargs):
        path = str(args[path_index])
        if os.path.basename(path) == name:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", path)
        return function(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _disk_full_on_rank0(point: str):
    """Below megatron-core's writers: the file system fails, not their code."""
    saved = torch.save, builtins.open, io.open
    if torch.distributed.get_rank() == 0:
        name = FILES[point]
        if point == "common":
            torch.save = _disk_full_for(name, torch.save, path_index=1)
        else:
            builtins.open = io.open = _disk_full_for(name, io.open, path_index=0)
    try:
        yield
    finally:
        torch.save, builtins.open, io.open = saved


def main() -> None:
    mode, out_dir, *points = sys.argv[1:]
    assert mode == "fail"
    dims, chunks, optimizer = tiny_policy(int(os.environ["WORLD_SIZE"]))
    for step, point in enumerate(points, start=1):
        with _disk_full_on_rank0(point):
            try:
                save_checkpoint(out_dir, step, chunks, optimizer, None, {}, dims.rank, model_files=None)
            except CheckpointSaveError as error:
                print(f"RANK {dims.rank} SAVE_ERROR {error}", flush=True)
    shutdown()


# The guard matters: dist_checkpointing's writer re-imports the main module.
if __name__ == "__main__":
    main()
