"""Loading across layer specs (issue 15): a checkpoint saved with one spec,
loaded by a model whose sharded state dict lacks some ``_extra_state`` keys
and has others (as the other spec's would). World of one:

    python tests/distributed/scripts/extra_state_load.py CHECKPOINT_DIR

Prints one line per case: ``CASE <name> OK <weights equal>`` or
``CASE <name> ERROR <message>``.
"""

import dataclasses
import os
import sys

import torch

from megatron_dpo.checkpoint import dist
from megatron_dpo.models import presets, weights
from megatron_dpo.models.build import build_model
from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import init_parallel, shutdown


def other_spec(state: dict) -> dict:
    """No linear_qkv extra state; a core_attention one (TE's) per layer."""
    state = {key: value for key, value in state.items() if not key.endswith("linear_qkv._extra_state")}
    for key, value in list(state.items()):
        if key.endswith("linear_proj._extra_state"):
            new_key = key.replace("linear_proj", "core_attention")
            state[new_key] = dataclasses.replace(value, key=value.key.replace("linear_proj", "core_attention"))
    return state


def without_final_norm(state: dict) -> dict:
    return {key: value for key, value in state.items() if key != "decoder.final_layernorm.weight"}


def with_extra_norm(state: dict) -> dict:
    norm = state["decoder.final_layernorm.weight"]
    return dict(state, **{"decoder.final_layernorm.extra.weight": dataclasses.replace(
        norm, key="decoder.final_layernorm.extra.weight", data=norm.data.clone())})


def main() -> None:
    directory = sys.argv[1]
    dims = init_parallel(ParallelDims.of_sizes(world_size=1), seed=0)
    arch = presets.preset_architecture("tiny-llama", vocab_size=256)
    saved = build_model(arch, dims, trainable=False)
    weights.init_weights(saved, arch, dims, seed=0)
    os.makedirs(directory)
    dist.save_policy(saved, None, directory)
    chunk_state = dist._chunk_state
    for case in (other_spec, without_final_norm, with_extra_norm):
        loaded = build_model(arch, dims, trainable=False)
        weights.init_weights(loaded, arch, dims, seed=1)
        dist._chunk_state = lambda chunk, case=case: case(chunk_state(chunk))
        try:
            dist.load_model_weights(loaded, directory)
        except dist.checkpoint_errors() as error:
            print(f"CASE {case.__name__} ERROR {str(error).strip().splitlines()[-1]}", flush=True)
            continue
        equal = all(torch.equal(a, b) for a, b in zip(saved[0].state_dict().values(), loaded[0].state_dict().values())
                    if isinstance(a, torch.Tensor) and a.numel())
        print(f"CASE {case.__name__} OK {equal}", flush=True)
    shutdown()


# The guard matters: dist_checkpointing's writer re-imports the main module.
if __name__ == "__main__":
    main()
