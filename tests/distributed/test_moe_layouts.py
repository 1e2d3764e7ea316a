"""DESIGN.md ladder step 3 for Mixture-of-Experts: the tiny MoE preset (4
experts, top-2, dropless, load-balancing and z-loss on) gives the same numbers
under expert, tensor (with sequence parallelism, which megatron's MoE layer
needs) and pipeline parallelism: step-1 loss ln 2, and the first two steps'
loss, grad norm and router metrics within 1e-5 of EP1."""

import json
import math
import os

import pytest

from tests.conftest import REPO, torchrun

SCRIPT = os.path.join(REPO, "tests", "distributed", "scripts", "layouts.py")
MOE = "model=tiny-moe,aux=0.01,zloss=0.001"
# One launch of 4 ranks; data parallelism fills what the layout leaves.
SPECS = [f"ep1:{MOE}", f"ep2:{MOE},ep=2", f"ep2_tp2:{MOE},ep=2,tp=2,sp=true", f"ep2_pp2:{MOE},ep=2,pp=2",
         "ep2_no_router_loss:model=tiny-moe,ep=2"]
ROUTER_METRICS = ("load_balancing_loss", "z_loss", "expert_load_max_over_mean")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    env = {"LAYOUTS_RUN_DIR": str(tmp_path_factory.mktemp("run"))}
    output = torchrun(4, SCRIPT, SPECS, timeout=600, env=env).stdout
    records = [json.loads(line[len("LAYOUT "):]) for line in output.splitlines() if line.startswith("LAYOUT ")]
    results = {record["layout"]: record["steps"] for record in records}
    assert set(results) == {spec.split(":")[0] for spec in SPECS}
    return results


def test_moe_step1_loss_is_ln2_and_layouts_agree_with_ep1(layouts):
    baseline = layouts["ep1"]
    for name, steps in layouts.items():
        print(name, [{k: s[k] for k in ("loss", "grad_norm", *ROUTER_METRICS) if k in s} for s in steps])
    for name in ("ep2", "ep2_tp2", "ep2_pp2"):
        assert layouts[name][0]["preference_loss"] == pytest.approx(math.log(2), abs=1e-6), name
        for step, (got, want) in enumerate(zip(layouts[name], baseline), start=1):
            for metric in ("loss", "grad_norm", *ROUTER_METRICS):
                assert got[metric] == pytest.approx(want[metric], rel=1e-5), (name, step, metric, got[metric], want[metric])


def test_router_losses_reach_the_policy_gradient_and_are_logged_only_when_on(layouts):
    with_losses, without = layouts["ep2"][0], layouts["ep2_no_router_loss"][0]
    assert with_losses["loss"] == without["loss"]  # the DPO loss itself
    assert abs(with_losses["grad_norm"] - without["grad_norm"]) > 1e-6
    assert "load_balancing_loss" not in without and "z_loss" not in without
    # Random routers: about balanced (1 = perfect, num_experts / topk = 2 worst).
    assert 1.0 < with_losses["expert_load_max_over_mean"] < 2.0
    assert with_losses["load_balancing_loss"] == pytest.approx(1.0, abs=0.1)
