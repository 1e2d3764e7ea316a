import os

from tests.conftest import REPO, torchrun


def test_vocab_parallel_logprobs_match_log_softmax_gather_at_tp2():
    script = os.path.join(REPO, "tests", "distributed", "scripts", "logprobs_parity.py")
    result = torchrun(2, script, [], timeout=180)
    assert "LOGPROBS_PARITY_OK" in result.stdout
