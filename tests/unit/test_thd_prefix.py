"""Prefix sharing in Transformer Engine's THD form: the metadata collate builds
(data/packing.py) and the K/V gather (models/attention.py), run through a
pure-torch THD kernel (tests/thd_reference.py), give the attention of the SDPA
prefix-sharing path and of unshared sequences. tests/distributed/test_thd_prefix.py
checks a model's log-probs and gradients the same way."""

import pytest
import torch
import torch.nn.functional as F

from megatron_dpo.data import TokenizedPair, make_microbatches
from megatron_dpo.data.packing import CHOSEN, REJECTED, SHARED, collate_packed
from megatron_dpo.models.attention import PrefixTHDParams, packed_seq_params, prefix_thd_attention
from tests.thd_reference import thd_attention_reference
from tests.unit.test_packing import PAD, random_pairs

PAIRS = [TokenizedPair([1, 10, 20, 11, 2], [1, 10, 20, 12, 13, 2], 3, 3),  # shared [1, 10]
         TokenizedPair([1, 30, 2], [1, 31, 32, 2], 1, 1)]  # nothing shared


def test_thd_layout_of_a_prefix_shared_row():
    # Row: [1 10 | 20 11 2 | 20 12 13 2] [| 1 30 2 | 1 31 32 2] [pad x 4]
    batch = collate_packed(PAIRS, PAD, seq_length=20, prefix_sharing=True)
    # Query sequences: [shared+chosen 5] [rejected 4] [chosen 3] [rejected 4] [pad tail 4]
    assert batch["cu_seqlens_q"].tolist() == [0, 5, 9, 12, 16, 20]
    # Key sequences: the same, but a rejected branch's keys are [shared; rejected]: 2 + 4.
    assert batch["cu_seqlens_kv"].tolist() == [0, 5, 11, 14, 18, 22]
    assert batch["kv_index"].tolist() == [0, 1, 2, 3, 4, 0, 1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                          16, 17, 18, 19]
    assert (batch["max_seqlen_q"], batch["max_seqlen_kv"], batch["max_seqlen"]) == (5, 6, 9)
    assert batch["cu_seqlens_q"].dtype == batch["cu_seqlens_kv"].dtype == torch.int32
    params = packed_seq_params(batch, te_attention=True)
    # "sbhd": megatron applies RoPE by position, not restarted per THD sequence.
    assert isinstance(params, PrefixTHDParams) and params.qkv_format == "sbhd"
    assert params.kv_index is batch["kv_index"] and params.max_seqlen_kv == 6
    assert "kv_index" not in make_microbatches(PAIRS, 2, PAD, packing=True)[0]


def unshared_attention(query, key, value, batch):
    """Each sequence on its own: [shared prompt; its branch], causal; the
    outputs at the row positions the packed form computes for it. [T, n, d]."""
    out = torch.full(query[:, 0].shape, float("nan"))
    bounds, branches = batch["cu_seqlens"].tolist(), batch["branch_ids"][0]
    for start, end in zip(bounds[:-1], bounds[1:]):
        positions = torch.arange(start, end)
        for branch in (CHOSEN, REJECTED):
            rows = positions[(branches[start:end] == SHARED) | (branches[start:end] == branch)]
            q, k, v = (t[rows, 0].transpose(0, 1) for t in (query, key, value))
            own = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(0, 1)
            mine = branches[rows] == branch if branch == REJECTED else torch.ones(len(rows), dtype=torch.bool)
            out[rows[mine]] = own[mine]
    return out


@pytest.mark.parametrize("num_heads,num_groups", [(4, 4), (4, 2)])
def test_thd_reference_equals_the_sdpa_path_and_unshared_sequences(num_heads, num_groups):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dpo.models.attention import SDPAttention

    batch = make_microbatches(random_pairs(5, seed=11) + PAIRS, 7, PAD, prefix_sharing=True, multiple_of=16)[0]
    assert batch["cu_seqlens"][-1] > batch["cu_seqlens"][-2] and batch["tokens"].shape[1] % 16 == 0
    seq_len, head_dim = batch["tokens"].shape[1], 8
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(seq_len, 1, n, head_dim, generator=generator)
                         for n in (num_heads, num_groups, num_groups))
    thd = prefix_thd_attention(thd_attention_reference, query, key, value, packed_seq_params(batch, te_attention=True))
    config = TransformerConfig(num_layers=1, hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
                               num_query_groups=num_groups, attention_dropout=0.0)
    sdpa = SDPAttention(config, layer_number=1, attn_mask_type=None, attention_type="self")
    segmented = sdpa(query, key, value, None, packed_seq_params=packed_seq_params(batch, te_attention=False))
    torch.testing.assert_close(thd, segmented, rtol=1e-5, atol=1e-5)
    real = batch["cu_seqlens"][-2]  # the pad tail attends only within itself
    unshared = unshared_attention(query, key, value, batch)[:real].reshape(real, 1, -1)
    torch.testing.assert_close(thd[:real], unshared, rtol=1e-5, atol=1e-5)


def test_gather_sums_a_shared_prompt_tokens_key_gradient_over_both_branches():
    batch = collate_packed(PAIRS[:1], PAD, seq_length=9, prefix_sharing=True)
    query, key, value = (torch.randn(9, 1, 2, 4, requires_grad=True) for _ in range(3))
    prefix_thd_attention(thd_attention_reference, query, key, value,
                         packed_seq_params(batch, te_attention=True)).sum().backward()
    key_ref, value_ref = (t.detach().clone().requires_grad_(True) for t in (key, value))
    branches = batch["branch_ids"][0]
    causal = torch.ones(9, 9, dtype=torch.bool).tril()  # the segment's dense tree mask:
    allowed = causal & ((branches[None, :] == SHARED) | (branches[None, :] == branches[:, None]))
    q, k, v = (t[:, 0].transpose(0, 1) for t in (query.detach(), key_ref, value_ref))
    F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).sum().backward()
    torch.testing.assert_close(key.grad, key_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value.grad, value_ref.grad, rtol=1e-5, atol=1e-6)


def _te_and_cuda() -> bool:
    from megatron_dpo.models.kernels import detect_env

    env = detect_env()
    return env.te and env.cuda


@pytest.mark.gpu
@pytest.mark.skipif(not _te_and_cuda(), reason="gpu: needs CUDA and Transformer Engine")
def test_te_prefix_shared_attention_equals_the_reference_on_a_gpu():
    """The thin GPU piece: TE's THD kernel on the metadata collate builds (bf16)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dpo.models.te_attention import TEPrefixSharedAttention

    config = TransformerConfig(num_layers=1, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                               attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16)
    core = TEPrefixSharedAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    batch = make_microbatches(random_pairs(5, seed=11) + PAIRS, 7, PAD, prefix_sharing=True)[0]
    batch = {key: value.cuda() if torch.is_tensor(value) else value for key, value in batch.items()}
    seq_len = batch["tokens"].shape[1]
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(seq_len, 1, n, 64, generator=generator).cuda().bfloat16().requires_grad_(True)
                         for n in (4, 2, 2))
    params = packed_seq_params(batch, te_attention=True)
    got = core(query, key, value, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=params)
    got.float().sum().backward()
    cpu_params = packed_seq_params({k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}, True)
    want = prefix_thd_attention(thd_attention_reference, *(t.detach().float().cpu() for t in (query, key, value)),
                                cpu_params)
    torch.testing.assert_close(got.float().cpu(), want, rtol=2e-2, atol=2e-2)  # bf16 inputs and kernel
    assert all(torch.isfinite(t.grad).all() for t in (query, key, value))
