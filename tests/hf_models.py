"""Tiny random Hugging Face checkpoints for the conversion tests."""

import glob
import os

import torch

from tests.conftest import REPO

TOKENIZER = os.path.join(REPO, "megatron_dpo", "models", "presets", "tiny_tokenizer")
# GQA, and an odd vocabulary (771 > the tokenizer's 768) that TP2 pads.
TINY = dict(vocab_size=771, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16384, bos_token_id=1, eos_token_id=2)


def save_hf_model(out_dir: str, model_type: str, dtype=torch.float32, **config) -> None:
    """A random model (norm weights around 1, biases non-zero) and the tiny tokenizer."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if "norm" in name else 0.05 * torch.randn_like(param))
    model.to(dtype).save_pretrained(out_dir)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(out_dir)


def hf_tensors(directory: str):
    """Every tensor of an HF directory, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for file in glob.glob(os.path.join(directory, "*.safetensors")):
        tensors.update(load_file(file))
    return tensors
