"""LoRA adapters in and out as PEFT directories, checked against ``peft`` on a
tiny random transformers Llama (GQA, vocab 771 that TP2 pads):

- an adapter written by peft's save_pretrained (random non-zero A and B) gives
  our model the logits of PeftModel within 1e-4 (fp32) under TP1, TP2, PP2;
- starting DPO from it (policy.lora_cfg.init_adapter_path) gives the same
  step-1 metrics as the same values copied in-process, with loss ln 2 (the
  reference is the initial adapter);
- a run's exported adapter (checkpointing.export_adapter_dir) loads with peft
  onto the HF base and gives our logits within 1e-4; the merged export
  (checkpointing.export_hf_dir) equals peft's merge_and_unload.
"""

import json
import math
import os

import pytest
import torch

from tests.conftest import REPO, run_dpo, torchrun
from tests.hf_models import TINY, hf_tensors, save_hf_model

SCRIPTS = os.path.join(REPO, "tests", "distributed", "scripts")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_peft_adapter(hf_dir: str, out_dir: str) -> None:
    """peft's own adapter directory: r=4, alpha=8, every A and B random (non-zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out_dir)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lora_peft"))
    save_hf_model(os.path.join(root, "hf"), "llama", **TINY, tie_word_embeddings=False)
    save_peft_adapter(os.path.join(root, "hf"), os.path.join(root, "peft"))
    return root


def logits_errors(models, adapter_dir: str, tmp_path) -> dict:
    out = str(tmp_path / "errors.json")
    torchrun(2, os.path.join(SCRIPTS, "lora_peft.py"), [out, os.path.join(models, "hf"), adapter_dir], timeout=400)
    with open(out) as handle:
        return json.load(handle)


def test_peft_adapter_gives_peft_logits(models, tmp_path):
    errors = logits_errors(models, os.path.join(models, "peft"), tmp_path)
    print(errors)
    assert set(errors) == {"tp1pp1", "tp2pp1", "tp1pp2"}
    assert all(0 <= error < 1e-4 for error in errors.values()), errors


def init_metrics(models, mode: str, tmp_path) -> dict:
    args = [mode, os.path.join(models, "hf"), os.path.join(models, "peft"), str(tmp_path / mode)]
    output = torchrun(1, os.path.join(SCRIPTS, "lora_init.py"), args, timeout=400).stdout
    (line,) = [line for line in output.splitlines() if line.startswith("INIT ")]
    return json.loads(line[len("INIT "):])


def test_init_adapter_path_equals_in_process_init(models, tmp_path):
    from_path, in_process = init_metrics(models, "path", tmp_path), init_metrics(models, "inprocess", tmp_path)
    assert from_path["preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
    for metric in ("loss", "grad_norm", "chosen_logps", "rejected_logps", "sft_loss"):
        assert from_path[metric] == pytest.approx(in_process[metric], rel=1e-6, abs=1e-7), metric


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory):
    """Two LoRA DPO steps from the peft adapter, exported both ways."""
    tmp = tmp_path_factory.mktemp("trained")
    overrides = [
        f"policy.model_name={models}/hf", "policy.train_global_batch_size=8", "policy.train_micro_batch_size=4",
        "dpo.max_num_steps=2", "data.val_data_path=null", "policy.lora_cfg.enabled=true", "policy.lora_cfg.dim=4",
        "policy.lora_cfg.alpha=8", f"policy.lora_cfg.target_modules=[{','.join(TARGETS)}]",
        f"policy.lora_cfg.init_adapter_path={models}/peft", "policy.megatron_cfg.optimizer.lr=1e-2",
        f"checkpointing.export_adapter_dir={tmp}/adapter", f"checkpointing.export_hf_dir={tmp}/merged",
    ]
    records, _ = run_dpo(tmp, 1, overrides)
    assert len([r for r in records if r.get("split", "train") == "train"]) >= 2
    return str(tmp)


def test_exported_adapter_loads_with_peft_and_gives_our_logits(models, trained, tmp_path):
    exported, initial = hf_tensors(os.path.join(trained, "adapter")), hf_tensors(os.path.join(models, "peft"))
    assert sorted(exported) == sorted(initial)
    assert any(not torch.equal(exported[key], initial[key]) for key in exported)  # it trained
    errors = logits_errors(models, os.path.join(trained, "adapter"), tmp_path)
    assert all(0 <= error < 1e-4 for error in errors.values()), errors


def test_merged_export_equals_peft_merge_and_unload(models, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(os.path.join(models, "hf"), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, os.path.join(trained, "adapter")).merge_and_unload().state_dict()
    ours = hf_tensors(os.path.join(trained, "merged"))
    assert sorted(ours) == sorted(merged)
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor, merged[key], rtol=0, atol=1e-6, msg=key)
