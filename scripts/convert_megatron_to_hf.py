"""Export a megatron_dpo checkpoint (a training step_N/ or a converted
checkpoint) as a Hugging Face model directory that transformers loads:

    python scripts/convert_megatron_to_hf.py --checkpoint results/dpo/step_150 --out /models/llama1b-dpo
    torchrun --nproc_per_node=N scripts/convert_megatron_to_hf.py ...   # N ranks write files in parallel
"""

import sys

from megatron_dpo.convert_cli import convert_megatron_to_hf

if __name__ == "__main__":
    sys.exit(convert_megatron_to_hf())
