"""The CPU compat layer: each redirect megatron-core relies on, and the loud
failure when megatron-core's version moves. Runs in a subprocess because
compat.apply() changes torch process-wide."""

import subprocess
import sys
import textwrap

import pytest


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_cuda_calls_are_redirected_to_cpu():
    out = run_python("""
        import torch
        from megatron_dpo.parallel import compat
        assert not torch.cuda.is_available()
        compat.apply(); compat.apply()  # idempotent
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.arange(3, device=torch.device("cuda", 0)).device.type == "cpu"
        t = torch.ones(2)
        assert t.cuda() is t and t.to("cuda").device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor" and t.type(torch.float64).dtype == torch.float64
        torch.cuda.synchronize(); torch.cuda.empty_cache()
        torch.manual_seed(3)  # must not recurse through manual_seed_all
        with torch.device("meta"):  # transformers builds models this way
            assert torch.tensor([1.0]).device.type == "meta" and torch.zeros(2).device.type == "meta"
        print("OK")
    """)
    assert "OK" in out


def test_rng_tracker_gives_its_own_stream_and_restores_the_default():
    out = run_python("""
        import torch
        from megatron_dpo.parallel import compat
        compat.apply()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, initialize_rng_tracker
        initialize_rng_tracker(force_reset=True)
        torch.manual_seed(0)
        get_cuda_rng_tracker().add("model-parallel-rng", 1234)
        before = torch.get_rng_state()
        with get_cuda_rng_tracker().fork():
            forked = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), before), "default stream not restored"
        torch.manual_seed(1234)
        assert torch.equal(forked, torch.rand(3)), "forked stream is not the tracker's seed"
        print("OK")
    """)
    assert "OK" in out


def test_torch_norm_accepts_sequence_parallel_and_tags_params():
    out = run_python("""
        import torch
        from megatron_dpo.parallel import compat
        compat.apply()
        from megatron.core.transformer.torch_norm import WrappedTorchNorm
        from megatron.core.transformer.transformer_config import TransformerConfig
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                                   tensor_model_parallel_size=2, sequence_parallel=True, normalization="RMSNorm")
        norm = WrappedTorchNorm(config, 8)
        assert isinstance(norm, torch.nn.RMSNorm)
        assert all(p.sequence_parallel for p in norm.parameters())
        assert config.sequence_parallel, "the caller's config must not change"
        print("OK")
    """)
    assert "OK" in out


def test_unsupported_megatron_core_version_fails_loudly(monkeypatch):
    import importlib.metadata

    from megatron_dpo.parallel import compat

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.99.0")
    with pytest.raises(RuntimeError, match=r"megatron-core==0\.16\.1, found 0\.99\.0"):
        compat._check_version()
