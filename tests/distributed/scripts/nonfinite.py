"""scripts/run_dpo.py with NaN injected after the policy's backward pass: a
NaN gradient on step 2, a NaN loss on step 3, NaN gradients from step 5 on.
Rank 0 prints ``UPDATE step=N updated=B params_changed=B`` for every step."""

import sys

import torch

from megatron_dpo.cli import run_dpo
from megatron_dpo.train import step
from megatron_dpo.train.schedule import METRIC_SUMS

NAN_GRAD_STEPS = {2} | set(range(5, 100))
NAN_LOSS_STEPS = {3}
_calls = {"policy": 0}
_policy_pass, _optimizer_step = step.policy_pass, step.optimizer_step


def policy_pass(chunks, *args, forward_only=False, **kwargs):
    result = _policy_pass(chunks, *args, forward_only=forward_only, **kwargs)
    if forward_only:
        return result
    _calls["policy"] += 1
    if _calls["policy"] in NAN_LOSS_STEPS:
        result.sums[METRIC_SUMS.index("loss")] = float("nan")
    if _calls["policy"] in NAN_GRAD_STEPS:
        for chunk in chunks:
            next(chunk.parameters()).main_grad.fill_(float("nan"))
    return result


def optimizer_step(run, loss):
    before = [param.detach().clone() for param in run.policy[0].parameters()]
    updated, grad_norm = _optimizer_step(run, loss)
    changed = any(not torch.equal(old, new) for old, new in zip(before, run.policy[0].parameters()))
    if run.dims.is_rank0:
        print(f"UPDATE step={_calls['policy']} updated={updated} params_changed={changed}", flush=True)
    return updated, grad_norm


step.policy_pass, step.optimizer_step = policy_pass, optimizer_step

if __name__ == "__main__":
    sys.exit(run_dpo())
