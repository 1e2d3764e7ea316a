"""Vocab-parallel log-probs (and their gradient) == log_softmax + gather on the
full vocabulary, with an odd vocab padded for TP. Run under torchrun."""

import torch

from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import init_distributed, init_parallel, shutdown
from megatron_dpo.parallel.logprobs import sequence_logprobs, token_logprobs


def main() -> None:
    init_distributed()
    ctx = init_parallel(ParallelDims.of_sizes(torch.distributed.get_world_size(), tp_size=2), seed=0)
    vocab_size, padded_vocab, batch, seq = 37, 38, 4, 6
    generator = torch.Generator().manual_seed(1234)
    full_logits = torch.randn(batch, seq, vocab_size, generator=generator, dtype=torch.float64).float()
    labels = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    loss_mask = (torch.rand(batch, seq, generator=generator) > 0.3).float()

    # Reference: the whole vocabulary on one rank.
    reference_logits = full_logits.clone().requires_grad_(True)
    reference = torch.log_softmax(reference_logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    reference_seq, _ = sequence_logprobs(reference, loss_mask)
    reference_seq.sum().backward()

    # This rank's slice of the padded vocabulary (padding rows hold garbage on purpose).
    padded = torch.cat([full_logits, torch.full((batch, seq, padded_vocab - vocab_size), 50.0)], dim=-1)
    grad_full = torch.cat([reference_logits.grad, torch.zeros(batch, seq, padded_vocab - vocab_size)], dim=-1)
    # One chunk of tokens, then chunks of 5 tokens (the last one shorter);
    # the logits kept, or consumed (their storage takes the gradient).
    for chunk_bytes, consume in ((2**26, False), (5 * 4 * padded_vocab // ctx.tp_size, False), (2**26, True)):
        local = padded.chunk(ctx.tp_size, dim=-1)[ctx.tp_rank].clone().requires_grad_(True)
        before = local.detach().clone()
        parallel = token_logprobs(local * 1.0 if consume else local, labels, vocab_size,
                                  consume_logits=consume, chunk_bytes=chunk_bytes)
        parallel_seq, num_tokens = sequence_logprobs(parallel, loss_mask)
        parallel_seq.sum().backward()

        torch.testing.assert_close(parallel, reference.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(parallel_seq, reference_seq.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(num_tokens, loss_mask.sum(-1))
        torch.testing.assert_close(local.grad, grad_full.chunk(ctx.tp_size, dim=-1)[ctx.tp_rank],
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(local.detach(), before), "the logits must not be modified in place"
    if ctx.is_rank0:
        print("LOGPROBS_PARITY_OK")
    shutdown()


if __name__ == "__main__":
    main()
