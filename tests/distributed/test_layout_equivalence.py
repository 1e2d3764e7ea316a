"""DESIGN.md ladder step 3: one model, many parallel layouts, the same numbers.

Step-1 loss is ln 2 (policy == reference) and step-1/step-2 loss and grad norm
agree within 1e-5 relative across TP, PP (incl. interleaved), DP, the
distributed optimizer, the number of micro-batches per step, and the batch
form: padded, packed (data.packing) and prefix-shared (data.prefix_sharing),
with an online or a cached reference.
"""

import json
import math
import os

import pytest

from tests.conftest import REPO, torchrun

SCRIPT = os.path.join(REPO, "tests", "distributed", "scripts", "layouts.py")
LAUNCHES = {
    1: ["tp1_pp1_dp1_4mb:", "tp1_pp1_dp1_1mb:mb=16", "tp1_packed:pack=true", "tp1_shared:share=true",
        "tp1_shared_cached:share=true,ref=cached,cache={tmp}"],
    2: ["tp2:tp=2", "pp2:pp=2", "dp2:", "dp2_distopt:distopt=true", "pp2_vpp2:pp=2,vpp=2",
        "tp2_shared:tp=2,share=true", "dp2_overlap:ogr=true", "dp2_distopt_overlap:distopt=true,ogr=true,opg=true"],
    4: ["tp2_pp2:tp=2,pp=2", "tp2_pp2_packed:tp=2,pp=2,pack=true", "tp2_pp2_shared:tp=2,pp=2,share=true",
        "pp2_vpp2_dp2_overlap:pp=2,vpp=2,distopt=true,ogr=true,opg=true"],
}
# Communication overlap (grad reduce, param gather) on vs off in the same layout.
OVERLAP = {"dp2_overlap": "dp2", "dp2_distopt_overlap": "dp2_distopt"}
# Layouts whose rank 0 holds the first batch's log-probs of every sequence.
SEQUENCE_LOGPS = ["tp1_pp1_dp1_1mb", "tp1_packed", "tp1_shared", "tp1_shared_cached", "tp2", "tp2_shared"]
# Its reference log-probs come from a separate pass (other micro-batches), so
# they equal the policy's at step 1 up to rounding, not exactly.
CACHED = "tp1_shared_cached"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    results = {}
    cache_dir = tmp_path_factory.mktemp("reference_cache")
    env = {"LAYOUTS_RUN_DIR": str(tmp_path_factory.mktemp("run"))}
    for nproc, specs in LAUNCHES.items():
        output = torchrun(nproc, SCRIPT, [spec.format(tmp=cache_dir) for spec in specs], timeout=600, env=env).stdout
        for line in output.splitlines():
            if line.startswith("LAYOUT "):
                record = json.loads(line[len("LAYOUT "):])
                results[record["layout"]] = record
    expected = {spec.split(":")[0] for specs in LAUNCHES.values() for spec in specs}
    assert set(results) == expected, f"missing layouts: {expected - set(results)}"
    return results


def online(layouts):
    return {name: record for name, record in layouts.items() if name != CACHED}


def test_step1_loss_is_ln2_in_every_layout(layouts):
    for name, record in online(layouts).items():
        first = record["steps"][0]
        assert first["preference_loss"] == pytest.approx(math.log(2), abs=1e-6), name
        assert first["accuracy"] == 0.0, name


def test_micro_batch_counts_differ(layouts):
    assert layouts["tp1_pp1_dp1_4mb"]["num_microbatches"] == 4
    assert layouts["tp1_pp1_dp1_1mb"]["num_microbatches"] == 1


@pytest.mark.parametrize("metric", ["loss", "grad_norm", "chosen_logps", "rejected_logps", "reward_margin"])
def test_layouts_agree_with_single_rank(layouts, metric):
    baseline = layouts["tp1_pp1_dp1_4mb"]["steps"]
    for name, record in online(layouts).items():
        for step, (got, want) in enumerate(zip(record["steps"], baseline), start=1):
            assert got[metric] == pytest.approx(want[metric], rel=1e-5, abs=1e-7), (
                f"{metric} at step {step} under {name}: {got[metric]} vs single rank {want[metric]}"
            )


@pytest.mark.parametrize("overlapped,plain", sorted(OVERLAP.items()))
def test_overlap_equals_no_overlap(layouts, overlapped, plain):
    """Step 2 also checks that the parameters gathered after step 1 are the updated ones."""
    for got, want in zip(layouts[overlapped]["steps"], layouts[plain]["steps"]):
        for metric in ("loss", "grad_norm", "chosen_logps", "rejected_logps"):
            assert got[metric] == pytest.approx(want[metric], rel=1e-6, abs=1e-9), (overlapped, metric)


def test_packed_and_shared_sequence_logps_match_padded(layouts):
    baseline = layouts["tp1_pp1_dp1_4mb"]["logps"]
    for name in SEQUENCE_LOGPS:
        got = layouts[name]["logps"]
        assert got == pytest.approx(baseline, rel=1e-5, abs=1e-6), name


def test_cached_reference_with_prefix_sharing(layouts):
    """The cache holds per-sequence log-probs computed on packed batches."""
    cached, baseline = layouts[CACHED], layouts["tp1_pp1_dp1_4mb"]
    assert cached["cached_logps"] == pytest.approx(baseline["logps"], rel=1e-5, abs=1e-6)
    for got, want in zip(cached["steps"], baseline["steps"]):
        for metric in ("loss", "grad_norm", "chosen_logps"):
            assert got[metric] == pytest.approx(want[metric], rel=1e-5), metric
