"""Model FLOPs of a DPO step, and the dense-matmul peak they are compared with.

Counted as is standard (Kaplan et al. / PaLM MFU): a forward pass costs 2 FLOPs
per matmul parameter per token, forward + backward 6; embedding lookups,
norms, activations and softmax are not counted. Attention adds QK^T and AV:
4 x heads x head_dim FLOPs per (query, visible key) pair per layer forward.
Only the work the batch form needs is counted: real tokens (no padding),
visible causal pairs (no masked-out half), and with prefix sharing the shared
prompt once. MFU from these FLOPs is therefore comparable across batch forms.
"""

import time
from dataclasses import dataclass
from typing import List

import torch

from megatron_dpo.data import TokenizedPair
from megatron_dpo.data.packing import shared_prefix_len
from megatron_dpo.models.architecture import ModelArchitecture


def matmul_params(arch: ModelArchitecture) -> int:
    """Parameters in matmuls: attention and MLP projections, output layer."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    attention = hidden * head_dim * (2 * arch.num_attention_heads + 2 * arch.num_query_groups)
    mlp = 3 * hidden * arch.ffn_hidden_size  # SwiGLU: gate, up, down
    return arch.num_layers * (attention + mlp) + hidden * arch.vocab_size


def _triangle(n: int) -> int:
    return n * (n + 1) // 2


def pair_work(pair: TokenizedPair, prefix_sharing: bool):
    """(tokens computed, visible query-key pairs) of one pair."""
    chosen, rejected = len(pair.chosen_ids), len(pair.rejected_ids)
    if not prefix_sharing:
        return chosen + rejected, _triangle(chosen) + _triangle(rejected)
    shared = shared_prefix_len(pair)
    chosen, rejected = chosen - shared, rejected - shared
    visible = _triangle(shared) + _triangle(chosen) + _triangle(rejected) + (chosen + rejected) * shared
    return shared + chosen + rejected, visible


@dataclass
class StepFlops:
    tokens: int  # tokens the step computes (per model pass)
    policy: float  # forward + backward
    reference: float  # forward (0 without an online reference)

    @property
    def total(self) -> float:
        return self.policy + self.reference


def step_flops(arch: ModelArchitecture, pairs: List[TokenizedPair], prefix_sharing: bool,
               online_reference: bool) -> StepFlops:
    work = [pair_work(pair, prefix_sharing) for pair in pairs]
    tokens, visible = sum(w[0] for w in work), sum(w[1] for w in work)
    attention = 4 * arch.num_layers * arch.num_attention_heads * arch.head_dim * visible
    forward = 2 * matmul_params(arch) * tokens + attention
    return StepFlops(tokens, 3.0 * forward, float(forward) if online_reference else 0.0)


def matmul_peak(device: torch.device, size: int, repeats: int = 3) -> float:
    """FLOP/s of the fastest of ``repeats`` [size x size] @ [size x size]
    products: fp32 on CPU (this process's threads), bf16 on GPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
