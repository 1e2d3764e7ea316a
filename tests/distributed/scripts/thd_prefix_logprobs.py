"""A tiny model's per-sequence log-probs and gradients: padded rows, the SDPA
prefix-sharing path, and the THD prefix-sharing path with the reference kernel
(tests/thd_reference.py) in place of Transformer Engine's. A world of one."""

import sys

import torch

from megatron_dpo.data import TokenizedPair, make_microbatches
from megatron_dpo.models import attention
from megatron_dpo.models.build import build_model
from megatron_dpo.models.presets import preset_architecture
from megatron_dpo.models.weights import init_weights
from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import init_parallel, shutdown
from megatron_dpo.parallel.logprobs import packed_sequence_logprobs, sequence_logprobs, token_logprobs
from tests.thd_reference import ReferenceTHDAttention
from tests.unit.test_packing import PAD, random_pairs

# A long shared prompt: the rejected branch's keys are mostly the gathered copy.
LONG_PROMPT = TokenizedPair([1, 5, 6, 7, 8, 9, 10, 11, 2], [1, 5, 6, 7, 8, 9, 12, 2], 7, 7)


def logps_and_grads(model, batch, vocab_size, params):
    model.zero_grad()
    logits = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"],
                   packed_seq_params=params)
    token_logps = token_logprobs(logits, batch["labels"], vocab_size)
    if params is None:
        logps, _ = sequence_logprobs(token_logps, batch["loss_mask"])
    else:
        logps, _ = packed_sequence_logprobs(token_logps, batch["loss_mask"], batch["sequence_ids"],
                                            batch["num_sequences"])
    logps.sum().backward()
    return logps.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def main() -> None:
    dims = init_parallel(ParallelDims.of_sizes(1), seed=0)
    # The local spec's core attention, with the TE path's THD route (kernel swapped for the reference).
    attention.SDPAttention = ReferenceTHDAttention
    arch = preset_architecture("tiny-llama", vocab_size=64)  # 4 heads over 2 query groups
    (model,) = build_model(arch, dims, "float32")
    init_weights([model], arch, dims, seed=3)
    pairs = random_pairs(6, seed=7) + [LONG_PROMPT]
    padded = make_microbatches(pairs, 7, PAD)[0]
    shared = make_microbatches(pairs, 7, PAD, prefix_sharing=True)[0]
    want, want_grads = logps_and_grads(model, padded, arch.vocab_size, None)
    forms = {"sdpa": attention.packed_seq_params(shared, te_attention=False),
             "thd": attention.packed_seq_params(shared, te_attention=True)}
    assert isinstance(forms["thd"], attention.PrefixTHDParams)
    for name, params in forms.items():
        got, grads = logps_and_grads(model, shared, arch.vocab_size, params)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} log-probs: {m}")
        for key, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[key], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name} grad of {key}: {m}")
    print("THD_PREFIX_OK", [round(v, 4) for v in want.tolist()])
    shutdown()


if __name__ == "__main__":
    sys.exit(main())
