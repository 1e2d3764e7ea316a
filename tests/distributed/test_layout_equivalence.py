"""DESIGN.md ladder step 3: one model, many parallel layouts, the same numbers.

Step-1 loss is ln 2 (policy == reference) and step-1/step-2 loss and grad norm
agree within 1e-5 relative across TP, PP (incl. interleaved), DP, the
distributed optimizer and the number of micro-batches per step.
"""

import json
import math
import os

import pytest

from tests.conftest import REPO, torchrun

SCRIPT = os.path.join(REPO, "tests", "distributed", "scripts", "layouts.py")
LAUNCHES = {
    1: ["tp1_pp1_dp1_4mb:", "tp1_pp1_dp1_1mb:mb=16"],
    2: ["tp2:tp=2", "pp2:pp=2", "dp2:", "dp2_distopt:distopt=true", "pp2_vpp2:pp=2,vpp=2"],
    4: ["tp2_pp2:tp=2,pp=2"],
}


@pytest.fixture(scope="module")
def layouts():
    results = {}
    for nproc, specs in LAUNCHES.items():
        output = torchrun(nproc, SCRIPT, specs, timeout=600).stdout
        for line in output.splitlines():
            if line.startswith("LAYOUT "):
                record = json.loads(line[len("LAYOUT "):])
                results[record["layout"]] = record
    expected = {spec.split(":")[0] for specs in LAUNCHES.values() for spec in specs}
    assert set(results) == expected, f"missing layouts: {expected - set(results)}"
    return results


def test_step1_loss_is_ln2_in_every_layout(layouts):
    for name, record in layouts.items():
        first = record["steps"][0]
        assert first["preference_loss"] == pytest.approx(math.log(2), abs=1e-6), name
        assert first["accuracy"] == 0.0, name


def test_micro_batch_counts_differ(layouts):
    assert layouts["tp1_pp1_dp1_4mb"]["num_microbatches"] == 4
    assert layouts["tp1_pp1_dp1_1mb"]["num_microbatches"] == 1


@pytest.mark.parametrize("metric", ["loss", "grad_norm", "chosen_logps", "reward_margin"])
def test_layouts_agree_with_single_rank(layouts, metric):
    baseline = layouts["tp1_pp1_dp1_4mb"]["steps"]
    for name, record in layouts.items():
        for step, (got, want) in enumerate(zip(record["steps"], baseline), start=1):
            assert got[metric] == pytest.approx(want[metric], rel=1e-5, abs=1e-7), (
                f"{metric} at step {step} under {name}: {got[metric]} vs single rank {want[metric]}"
            )
