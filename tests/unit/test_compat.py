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


@pytest.mark.cpu_only
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


@pytest.mark.cpu_only
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


@pytest.mark.cpu_only
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


# -- safe loading: nothing in a checkpoint directory runs code ---------------------

PAYLOAD = """
class Payload:  # unpickling it creates the file MARKER
    def __reduce__(self):
        return (open, (MARKER, "w"))
"""


def test_hostile_dcp_metadata_is_refused_naming_the_file_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    out = run_python(f"""
        import json, os, pickle
        import torch
        from megatron_dpo.parallel import compat
        compat.cuda_available = lambda: True  # the GPU path of apply(): safe loading is on there too
        compat.apply(); compat.apply()  # idempotent
        from torch.distributed.checkpoint import FileSystemReader
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
        MARKER, ckpt = {str(marker)!r}, {str(tmp_path)!r}
        {PAYLOAD.strip().replace(chr(10), chr(10) + ' ' * 8)}
        with open(os.path.join(ckpt, "metadata.json"), "w") as f:
            json.dump({{"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                       "common_backend": "torch", "common_backend_version": 1}}, f)
        path = os.path.join(ckpt, ".metadata")
        nested = Metadata(state_dict_metadata={{"w": Payload()}})  # allowed outside, payload inside
        readers = (lambda: FileSystemReader(ckpt).read_metadata(), lambda: dist_checkpointing.load_tensors_metadata(ckpt))
        for payload in (Payload(), nested):
            with open(path, "wb") as f:
                pickle.dump(payload, f)
            for read in readers:
                try:
                    read()
                    print("LOADED")
                except compat.UnsafeCheckpointError as error:
                    print("REFUSED", error)
        with open(path, "wb") as f:
            f.write(pickle.dumps(Metadata(state_dict_metadata={{}}))[:-9])
        try:
            FileSystemReader(ckpt).read_metadata()
        except pickle.UnpicklingError as error:
            print("CORRUPT", error)
    """)
    refusals = [line for line in out.splitlines() if line.startswith("REFUSED")]
    assert len(refusals) == 4 and "LOADED" not in out, out
    for line in refusals:
        assert f"{tmp_path}/.metadata: refusing to load it: it references io.open, which is not a class of " \
               "torch.distributed.checkpoint metadata" in line
    assert f"CORRUPT {tmp_path}/.metadata: truncated or corrupt checkpoint metadata" in out
    assert not marker.exists()


SAVE_AND_LOAD = """
import os, pickle, sys
import torch
import torch.distributed as dist
from megatron_dpo.parallel import compat

MARKER, ckpt = sys.argv[1], sys.argv[2]
{payload}

def request(obj_data):
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    return {{"w": ShardedTensor.from_rank_offsets("w", torch.arange(6.0).reshape(2, 3), replica_id=0),
             "extra": ShardedObject("extra", obj_data, (1,), (0,), replica_id=0), "step": 3}}

def main():
    compat.apply()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import dist_checkpointing
    good, bad = os.path.join(ckpt, "good"), os.path.join(ckpt, "bad")
    os.makedirs(good); os.makedirs(bad)
    dist_checkpointing.save(request({{"t": torch.ones(2), "n": None}}), good)
    loaded = dist_checkpointing.load(request(None), good)
    assert torch.equal(loaded["w"], torch.arange(6.0).reshape(2, 3)) and loaded["step"] == 3
    assert torch.equal(loaded["extra"]["t"], torch.ones(2)) and loaded["extra"]["n"] is None
    print("ROUND TRIP OK")
    dist_checkpointing.save(request(Payload()), bad)  # a byte item that would run code
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        dist_checkpointing.load(request(None), bad)
    except CheckpointException as error:  # DCP reports each rank's exception
        ((failure, _traceback),) = error.failures.values()
        print("BYTES REFUSED", type(failure).__name__, failure)
    torch.save({{"step": Payload()}}, os.path.join(good, "common.pt"))  # megatron's common state
    try:
        dist_checkpointing.load_common_state_dict(good)
    except pickle.UnpicklingError as error:
        print("COMMON REFUSED", str(error).splitlines()[0])
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
"""


def test_megatron_checkpoint_loads_and_hostile_byte_items_and_common_state_are_refused(tmp_path):
    import os

    from tests.conftest import free_port

    script = tmp_path / "save_and_load.py"
    script.write_text(SAVE_AND_LOAD.format(payload=PAYLOAD))
    marker = tmp_path / "pwned"
    # Without compat this variable makes megatron's torch.load of common.pt a full unpickle.
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    result = subprocess.run([sys.executable, str(script), str(marker), str(tmp_path), str(free_port())],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "ROUND TRIP OK" in out
    assert "BYTES REFUSED UnsafeCheckpointError checkpoint item 'extra/shard_0_1': refusing to load it" in out, out
    assert "COMMON REFUSED Weights only load failed" in out, out
    assert not marker.exists()


def test_transformer_engine_fp8_extra_state_is_refused_and_empty_state_passes():
    import io

    import torch

    from megatron_dpo.parallel import compat

    class Linear:
        def set_extra_state(self, state):
            self.state = state

    set_extra_state = compat._refuse_pickled_extra_state(Linear.set_extra_state)
    layer = Linear()
    set_extra_state(layer, torch.empty(0, dtype=torch.uint8))  # TE >= 2.0 without FP8
    old_format = io.BytesIO()
    torch.save(None, old_format)
    set_extra_state(layer, old_format)  # TE < 2.0 without FP8
    assert layer.state is old_format and old_format.tell() == 0
    with pytest.raises(compat.UnsafeCheckpointError, match="Linear: the checkpoint holds Transformer Engine FP8"):
        set_extra_state(layer, torch.frombuffer(bytearray(b"\x80\x04K\x01."), dtype=torch.uint8))


def test_moe_router_gemm_runs_without_transformer_engine():
    """megatron-core 0.16.1 reads moe_utils.te_general_gemm, defined only when TE imports:
    without TE the router's forward raises NameError; compat defines it as None (upstream's fix)."""
    out = run_python("""
        import importlib.util, torch
        from megatron.core.transformer.moe import moe_utils
        weight, inp = torch.randn(4, 8), torch.randn(3, 8)
        gate = lambda: moe_utils.router_gating_linear(inp, weight, None, torch.float32)
        if importlib.util.find_spec("transformer_engine") is None:
            try:
                gate()
                raise SystemExit("the upstream NameError is gone: drop the fix from compat.py")
            except NameError:
                pass
        from megatron_dpo.parallel import compat
        compat.apply()
        torch.testing.assert_close(gate(), inp @ weight.t())
        print("OK")
    """)
    assert "OK" in out


@pytest.mark.cpu_only
def test_streams_events_and_moe_split_sizes_on_cpu():
    out = run_python("""
        import torch
        from megatron_dpo.parallel import compat
        compat.apply()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            event = torch.cuda.Event(); event.record(); event.synchronize()
        assert event.query() and torch.cuda.current_stream() is not stream
        assert torch.ones(2).new_empty((3,), device=torch.cuda.current_device()).device.type == "cpu"
        from megatron.core.transformer.moe import token_dispatcher
        splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([2, 3]), as_numpy=True)
        assert list(splits) == [2, 3] and not torch.is_tensor(splits)
        print("OK")
    """)
    assert "OK" in out
