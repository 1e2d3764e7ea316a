"""The uninterrupted run that resume, preemption and fault tests continue and compare with."""

import os

import pytest

from tests.conftest import run_dpo

# 8 steps of 8 pairs on DP=2 with the distributed optimizer (ZeRO-1 on plain
# torch Adam: the path whose checkpoint megatron-core cannot load by itself).
RESUMABLE = [
    "dpo.max_num_steps=8", "policy.train_global_batch_size=8", "policy.train_micro_batch_size=2",
    "policy.megatron_cfg.optimizer.use_distributed_optimizer=true",
]
FULLY_RESHARDABLE = "checkpointing.optimizer_format=fully_reshardable"
# Timing is the only part of a record that a resumed run may change.
UNCOMPARED = ("step", "split", "step_time", "tokens_per_sec")


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """(records, run_dir) of the RESUMABLE run, saved after every step."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    # fully_reshardable: test_resume.py resumes these checkpoints at other layouts too.
    records, _ = run_dpo(tmp_path, 2, [*RESUMABLE, "checkpointing.save_period=1", FULLY_RESHARDABLE])
    assert [r["step"] for r in records] == list(range(1, 9))
    return records, os.path.join(str(tmp_path), "run")


def assert_same_records(expected, actual, rel=1e-6, rel_by_metric=None, abs=None):
    """Same (step, split) sequence; every metric within ``rel`` (or its own
    tolerance in ``rel_by_metric``) relative, or ``abs`` absolute when given."""
    assert [(r["step"], r["split"]) for r in actual] == [(r["step"], r["split"]) for r in expected]
    for want, got in zip(expected, actual):
        for name in want.keys() - set(UNCOMPARED):
            tolerance = (rel_by_metric or {}).get(name, rel)
            assert got[name] == pytest.approx(want[name], rel=tolerance, abs=abs), (want["step"], name)
