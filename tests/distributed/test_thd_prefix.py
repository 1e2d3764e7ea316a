"""Prefix sharing's THD metadata through a whole model: log-probs and
gradients equal the padded form's and the SDPA path's (fp32, 1e-5). The
kernel is a pure-torch reference of TE's bottom-right THD attention."""

import os
import subprocess
import sys

from tests.conftest import CPU_ENV, REPO

SCRIPT = os.path.join(REPO, "tests", "distributed", "scripts", "thd_prefix_logprobs.py")


def test_thd_prefix_sharing_matches_padded_and_sdpa_logprobs_and_grads():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO, **CPU_ENV)
    result = subprocess.run([sys.executable, SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "THD_PREFIX_OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
