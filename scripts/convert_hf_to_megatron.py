"""Convert a Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3) into a
megatron_dpo checkpoint that policy.model_name loads at any TP/PP/VPP:

    python scripts/convert_hf_to_megatron.py --hf-dir /models/Llama-3.2-1B-Instruct --out /ckpt/llama1b-mcore
"""

import sys

from megatron_dpo.convert_cli import convert_hf_to_megatron

# The guard matters: dist_checkpointing's writer re-imports the main module.
if __name__ == "__main__":
    sys.exit(convert_hf_to_megatron())
