"""Train two steps of the tiny fp32 model under each parallel layout given on
the command line (all at this launch's world size) and print the metrics as
JSON lines on rank 0. A layout is ``name:key=value,key=value`` (keys: KEYS).
Before training, the first batch's per-sequence log-probs of the initial
policy are recorded where rank 0 holds them (the last pipeline stage).
"""

import itertools
import json
import os
import sys

from megatron_dpo.config import load_config
from megatron_dpo.data import PairSampler
from megatron_dpo.parallel.init import shutdown
from megatron_dpo.train.schedule import reference_pass
from megatron_dpo.train.setup import setup_run
from megatron_dpo.train.step import device_microbatches, train_step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BASE = [
    "policy.model_name=tiny-llama", "policy.precision=float32", "policy.max_total_sequence_length=64",
    "policy.train_global_batch_size=16", "policy.train_micro_batch_size=4", "data.val_data_path=null",
    "dpo.max_num_steps=2", "checkpointing.enabled=false",
    # The run dir (tokenized data cache, lock) of every layout: the test's temporary directory.
    f"checkpointing.checkpoint_dir={os.environ.get('LAYOUTS_RUN_DIR', 'results/layouts')}",
]
KEYS = {
    "tp": "policy.megatron_cfg.tensor_model_parallel_size",
    "pp": "policy.megatron_cfg.pipeline_model_parallel_size",
    "vpp": "policy.megatron_cfg.virtual_pipeline_model_parallel_size",
    "mb": "policy.train_micro_batch_size",
    "distopt": "policy.megatron_cfg.optimizer.use_distributed_optimizer",
    "ogr": "policy.megatron_cfg.distributed_data_parallel_config.overlap_grad_reduce",
    "opg": "policy.megatron_cfg.distributed_data_parallel_config.overlap_param_gather",
    "pack": "data.packing",
    "share": "data.prefix_sharing",
    "ref": "reference.mode",
    "cache": "reference.cache_dir",
    "lora": "policy.lora_cfg.enabled",
    "model": "policy.model_name",
    "sp": "policy.megatron_cfg.sequence_parallel",
    "ep": "policy.megatron_cfg.expert_model_parallel_size",
    "aux": "policy.megatron_cfg.moe_aux_loss_coeff",
    "zloss": "policy.megatron_cfg.moe_z_loss_coeff",
}
# lora=true: adapters on every linear (rank 4), all parts of the fused layers.
LORA = ["policy.lora_cfg.dim=4", "policy.lora_cfg.alpha=8",
        "policy.lora_cfg.target_modules=[linear_qkv,linear_proj,gate_proj,up_proj,down_proj]"]


def sequence_logps(run, pairs):
    """Per-sequence log-probs of the policy on these pairs, [c0, r0, c1, ...];
    None off the last pipeline stage."""
    microbatches = device_microbatches(pairs, run.micro_batch_size, run.pad_id, run.cfg.data)
    logps = reference_pass(run.policy, microbatches, microbatches[0]["tokens"].shape[1], run.arch.vocab_size)
    if not run.dims.is_last_stage:
        return None
    return [value for microbatch_logps in logps for value in microbatch_logps.tolist()]


def run_layout(spec: str) -> dict:
    name, _, settings = spec.partition(":")
    overrides = [f"{KEYS[k]}={v}" for k, v in (item.split("=") for item in settings.split(",") if item)]
    overrides += LORA if "lora=true" in settings else []
    cfg = load_config(os.path.join(REPO, "configs", "dpo.yaml"), BASE + overrides)
    run = setup_run(cfg)
    sampler = PairSampler(len(run.train_data.pairs), cfg.policy.train_global_batch_size,
                          run.dims.dp_rank, run.dims.dp_size, shuffle=True, seed=cfg.dpo.seed)
    batches = [[run.train_data.pairs[i] for i in indices] for indices in itertools.islice(sampler, 2)]
    record = {"layout": name, "num_microbatches": run.dims.num_microbatches,
              "logps": sequence_logps(run, batches[0])}
    if cfg.reference.mode == "cached":
        record["cached_logps"] = [value for pair in batches[0] for value in pair.reference_logps]
    record["steps"] = [train_step(run, pairs) for pairs in batches]
    # What gets gradients: the DDP grad buffers and the optimizer's parameters.
    record["grad_buffer_numel"] = sum(buffer.grad_data.numel() for chunk in run.policy for buffer in chunk.buffers)
    record["optimizer_numel"] = sum(param.numel() for group in run.optimizer.param_groups
                                    for param in group["params"])
    record["trainable_numel"] = sum(p.numel() for chunk in run.policy for p in chunk.parameters() if p.requires_grad)
    return record


def main() -> None:
    for spec in sys.argv[1:]:
        result = run_layout(spec)
        if int(os.environ.get("RANK", "0")) == 0:
            print("LAYOUT " + json.dumps(result), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
