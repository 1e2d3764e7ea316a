"""A checkpoint write that fails on one rank reaches every rank (issue 15):
rank 0 writes dist_checkpointing's common.pt, .metadata and metadata.json
alone, between collectives; before parallel/compat.py's fix a full disk there
left the other ranks waiting in the next collective until the timeout."""

import os
import re

from tests.conftest import REPO, torchrun

SCRIPT = os.path.join(REPO, "tests", "distributed", "scripts", "checkpoint_save.py")
POINTS = {"common": "common.pt", "metadata": ".metadata.tmp", "config": "metadata.json"}


def test_a_write_only_rank_0_makes_fails_on_every_rank_without_hanging(tmp_path):
    result = torchrun(2, SCRIPT, ["fail", str(tmp_path), *POINTS], timeout=120)
    errors = re.findall(r"RANK (\d) SAVE_ERROR could not write checkpoint step_(\d) in \S+: OSError: "
                        r"\[Errno 28\] No space left on device \(injected\): '[^']*/policy/([^']+)'", result.stdout)
    assert sorted(errors) == sorted((rank, str(step), name) for step, name in enumerate(POINTS.values(), start=1)
                                    for rank in "01"), result.stdout[-3000:]
    assert os.listdir(tmp_path) == []  # each half-written step removed
