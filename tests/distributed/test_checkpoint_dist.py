"""Distributed checkpoints (issue 15). A write that fails on one rank
reaches every rank: rank 0 writes dist_checkpointing's common.pt, .metadata
and metadata.json alone, between collectives; before parallel/compat.py's fix
a full disk there left the other ranks waiting in the next collective until
the timeout. Loading across Transformer Engine's and the local layer spec
tolerates ``_extra_state`` keys on one side only, and nothing else."""

import os
import re
import subprocess
import sys

from tests.conftest import REPO, torchrun

SCRIPTS = os.path.join(REPO, "tests", "distributed", "scripts")
SCRIPT = os.path.join(SCRIPTS, "checkpoint_save.py")
POINTS = {"common": "common.pt", "metadata": ".metadata.tmp", "config": "metadata.json"}


def test_a_write_only_rank_0_makes_fails_on_every_rank_without_hanging(tmp_path):
    result = torchrun(2, SCRIPT, ["fail", str(tmp_path), *POINTS], timeout=120)
    errors = re.findall(r"RANK (\d) SAVE_ERROR could not write checkpoint step_(\d) in \S+: OSError: "
                        r"\[Errno 28\] No space left on device \(injected\): '[^']*/policy/([^']+)'", result.stdout)
    assert sorted(errors) == sorted((rank, str(step), name) for step, name in enumerate(POINTS.values(), start=1)
                                    for rank in "01"), result.stdout[-3000:]
    assert os.listdir(tmp_path) == []  # each half-written step removed


def test_loading_across_layer_specs_tolerates_extra_state_keys_and_nothing_else(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "extra_state_load.py"), str(tmp_path / "ckpt")],
                            cwd=REPO, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = dict(line.split(" ", 2)[1:] for line in result.stdout.splitlines() if line.startswith("CASE "))
    assert cases["other_spec"] == "OK True"  # linear_qkv's extra state missing, core_attention's extra: loaded
    assert "1 key(s) of the checkpoint have no place in this model: decoder.final_layernorm.weight." in (
        cases["without_final_norm"])
    assert "1 key(s) this model has are not in the checkpoint: decoder.final_layernorm.extra.weight." in (
        cases["with_extra_norm"])
