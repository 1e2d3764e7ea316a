"""Two torchrun agents on this machine acting as two nodes, met at a c10d
rendezvous as slurm/dpo.sbatch starts them, train exactly like one agent
with the same world size."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, RUN_DPO, TINY_OVERRIDES, free_port, read_jsonl, run_dpo
from tests.e2e.conftest import assert_same_records

STEPS = ["dpo.max_num_steps=4"]


def _train_on_two_agents(tmp_path, overrides):
    """Each agent is one "node" with one rank; returns the run's records."""
    run_dir = os.path.join(str(tmp_path), "two_agents")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=two-nodes",
        RUN_DPO, "--config", os.path.join(REPO, "configs", "dpo.yaml"), *TINY_OVERRIDES,
        f"checkpointing.checkpoint_dir={run_dir}", *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    logs = [os.path.join(str(tmp_path), f"agent{node}.log") for node in range(2)]
    agents = []
    for log in logs:
        with open(log, "w") as handle:  # a file, not a pipe: a full pipe would stall one agent and both
            agents.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT))
    for agent, log in zip(agents, logs):
        agent.wait(timeout=300)
        with open(log) as handle:
            assert agent.returncode == 0, handle.read()[-6000:]
    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


@pytest.mark.parametrize("layout", [
    pytest.param([], id="dp2"),
    pytest.param(["policy.megatron_cfg.tensor_model_parallel_size=2"], id="tp2"),
])
def test_two_agents_train_like_one(tmp_path, layout):
    two_agents = _train_on_two_agents(tmp_path, [*STEPS, *layout])
    one_agent, _ = run_dpo(tmp_path / "one_agent", 2, [*STEPS, *layout])
    assert [r["step"] for r in one_agent] == [1, 2, 3, 4]
    assert_same_records(one_agent, two_agents)
