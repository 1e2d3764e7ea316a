"""Step-1 metrics of a LoRA run whose initial adapters come from a PEFT
directory, either through ``policy.lora_cfg.init_adapter_path`` ("path") or
copied in-process into a fresh run's adapters ("inprocess": key names spelled
out here, independently of models/lora.py). Rank 0 prints ``INIT <json>``.

    torchrun --nproc_per_node=1 tests/distributed/scripts/lora_init.py MODE HF_DIR ADAPTER_DIR RUN_DIR [key=value ...]
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file

from megatron_dpo.config import load_config
from megatron_dpo.data import PairSampler
from megatron_dpo.models.lora import LoRAPair
from megatron_dpo.models.build import layer_offset, unwrap
from megatron_dpo.parallel.init import shutdown
from megatron_dpo.train.setup import setup_run
from megatron_dpo.train.step import train_step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@torch.no_grad()
def copy_peft_tensors(run, adapter_dir: str) -> None:
    """The PEFT tensors into every adapter (TP=1: whole tensors), and into its
    frozen initial copy (the reference)."""
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    for chunk in run.policy:
        offset = layer_offset(chunk)
        for index, layer in enumerate(unwrap(chunk).decoder.layers):
            for name, module in layer.named_modules():
                if isinstance(module, LoRAPair):
                    part = name.rsplit(".", 1)[1]
                    prefix = f"base_model.model.model.layers.{index + offset}.{MODULES[part]}.{part}"
                    module.A.copy_(tensors[f"{prefix}.lora_A.weight"])
                    module.B.copy_(tensors[f"{prefix}.lora_B.weight"])
                    module.initial = (module.A.detach().clone(), module.B.detach().clone())
    run.optimizer.reload_model_params()


def main() -> None:
    mode, hf_dir, adapter_dir, run_dir, *extra = sys.argv[1:]
    with open(os.path.join(adapter_dir, "adapter_config.json")) as handle:
        peft_cfg = json.load(handle)
    overrides = [
        f"policy.model_name={hf_dir}", "policy.precision=float32", "policy.max_total_sequence_length=64",
        "policy.train_global_batch_size=8", "policy.train_micro_batch_size=4", "data.val_data_path=null",
        "dpo.max_num_steps=1", "checkpointing.enabled=false", f"checkpointing.checkpoint_dir={run_dir}",
        "policy.lora_cfg.enabled=true", f"policy.lora_cfg.dim={peft_cfg['r']}",
        f"policy.lora_cfg.alpha={peft_cfg['lora_alpha']}",
        f"policy.lora_cfg.target_modules=[{','.join(sorted(peft_cfg['target_modules']))}]",
    ]
    if mode == "path":
        overrides.append(f"policy.lora_cfg.init_adapter_path={adapter_dir}")
    cfg = load_config(os.path.join(REPO, "configs", "dpo.yaml"), overrides + extra)
    run = setup_run(cfg)
    if mode == "inprocess":
        copy_peft_tensors(run, adapter_dir)
    sampler = PairSampler(len(run.train_data.pairs), cfg.policy.train_global_batch_size, run.dims.dp_rank,
                          run.dims.dp_size, shuffle=True, seed=cfg.dpo.seed)
    pairs = [run.train_data.pairs[i] for i in next(iter(sampler))]
    metrics = train_step(run, pairs)
    if int(os.environ.get("RANK", "0")) == 0:
        print("INIT " + json.dumps(metrics), flush=True)
    shutdown()


if __name__ == "__main__":
    main()
