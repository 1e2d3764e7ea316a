"""Build the offline tokenizer of the ``tiny-llama`` preset.

A byte-level BPE (as Llama 3 / GPT-2: any text encodes, nothing maps to
<unk>) trained on the demo data (data/demo/*.jsonl), with Llama's special
tokens: ``<s>`` (BOS, prepended on encode), ``</s>`` (EOS), ``<pad>`` and
``<unk>``. The chat template marks roles with plain text,
``<|role|>\\n{content}\\n``, the form the demo prompts are written in.

Training reads the files in a fixed order and BPE training is deterministic,
so a re-run reproduces the committed files byte for byte.

Usage: python scripts/make_tiny_tokenizer.py [--data data/demo]
           [--out megatron_dpo/models/presets/tiny_tokenizer]
"""

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 768
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def demo_texts(data_dir: Path) -> list[str]:
    """Every prompt, chosen and rejected string of the demo files, in order."""
    texts = []
    for name in ("train.jsonl", "val.jsonl"):
        with open(data_dir / name, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts += [row["prompt"], row["chosen"], row["rejected"]]
    return texts


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return tokenizer


def tokenizer_config() -> dict:
    # PreTrainedTokenizerFast loads tokenizer.json as is, in transformers 4 and 5.
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--out", default="megatron_dpo/models/presets/tiny_tokenizer")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(demo_texts(Path(args.data)))
    tokenizer.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tokenizer_config())
    write_json(out / "special_tokens_map.json", {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
    })
    print(f"wrote a {tokenizer.get_vocab_size()}-token tokenizer to {out}")


if __name__ == "__main__":
    main()
