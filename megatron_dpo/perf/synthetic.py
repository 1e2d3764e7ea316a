"""Synthetic preference pairs with realistic prompt / completion lengths.

Token lengths are lognormal, the usual shape of text-length distributions.
The parameters are approximations of published dataset statistics (Llama-type
tokenizers), not fitted here; treat them as plausible shapes, not measurements:
  * UltraFeedback (binarized): prompts mostly short instructions with a long
    tail (median ~90 tokens); chosen completions long (median ~270 tokens),
    rejected somewhat shorter (median ~230).
  * Anthropic HH-RLHF: prompts are multi-turn dialogue histories (median ~110
    tokens); replies short (median ~50 tokens).
  * "mix": the two alternating, pair by pair.
Pairs longer than ``max_length`` are cut as data.overlength_policy=truncate
does: prompt first (down to one token), then the completions.
"""

import math
import random
from dataclasses import dataclass
from typing import List

from megatron_dpo.data import TokenizedPair


@dataclass(frozen=True)
class LogNormal:
    median: float
    sigma: float

    def sample(self, rng: random.Random) -> int:
        return max(1, round(self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0))))


@dataclass(frozen=True)
class LengthProfile:
    prompt: LogNormal
    chosen: LogNormal  # completion tokens, EOS included
    rejected: LogNormal


PROFILES = {
    "ultrafeedback": LengthProfile(LogNormal(90, 0.9), LogNormal(270, 0.6), LogNormal(230, 0.7)),
    "hh-rlhf": LengthProfile(LogNormal(110, 0.9), LogNormal(50, 0.8), LogNormal(50, 0.8)),
}
MIXES = {"mix": ("ultrafeedback", "hh-rlhf")}
LENGTH_CHOICES = tuple(PROFILES) + tuple(MIXES)


def truncated_lengths(prompt: int, chosen: int, rejected: int, max_length: int):
    """(prompt, chosen, rejected) lengths with both sequences within max_length."""
    prompt = max(1, min(prompt, max_length - max(chosen, rejected)))
    return prompt, min(chosen, max_length - prompt), min(rejected, max_length - prompt)


def synthetic_pairs(num_pairs: int, lengths: str, max_length: int, vocab_size: int,
                    seed: int) -> List[TokenizedPair]:
    """Random-token pairs sharing a prompt, lengths drawn from ``lengths``."""
    rng = random.Random(seed)
    names = MIXES.get(lengths, (lengths,))
    pairs = []
    for index in range(num_pairs):
        profile = PROFILES[names[index % len(names)]]
        prompt, chosen, rejected = truncated_lengths(
            profile.prompt.sample(rng), profile.chosen.sample(rng), profile.rejected.sample(rng), max_length)
        prompt_ids = [rng.randrange(vocab_size) for _ in range(prompt)]
        pairs.append(TokenizedPair(
            chosen_ids=prompt_ids + [rng.randrange(vocab_size) for _ in range(chosen)],
            rejected_ids=prompt_ids + [rng.randrange(vocab_size) for _ in range(rejected)],
            chosen_prompt_len=prompt, rejected_prompt_len=prompt,
        ))
    return pairs
