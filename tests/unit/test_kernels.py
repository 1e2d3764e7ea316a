"""models/kernels.py: the one function that picks layer spec, fusions and attention."""

import itertools

import pytest

from megatron_dpo.config import load_config
from megatron_dpo.models.kernels import (FUSIONS, PREFIX_SDPA, PREFIX_SDPA_GPU_FALLBACK, PREFIX_TE_THD, KernelEnv,
                                        prefix_attention, resolve_fusions, resolve_kernels, sequence_parallel_problem)

ALL_AUTO = dict.fromkeys(FUSIONS, "auto")


@pytest.mark.parametrize("te,cuda,wgrad", list(itertools.product([False, True], repeat=3)))
def test_auto_is_on_exactly_with_te_and_cuda(te, cuda, wgrad):
    fusions = resolve_fusions(ALL_AUTO, KernelEnv(te=te, cuda=cuda, wgrad_kernel=wgrad))
    fast = te and cuda
    for name in FUSIONS:
        expected = fast and wgrad if name == "gradient_accumulation_fusion" else fast
        assert fusions[name] is expected, name


def test_cpu_has_every_fusion_off_and_the_local_spec():
    plan = resolve_kernels({}, KernelEnv(te=False, cuda=False, wgrad_kernel=False))
    assert plan.layer_spec == "local" and plan.attention == "SDPA"
    assert not any(plan.fusions.values())


def test_te_and_cuda_have_every_fusion_on_and_the_te_spec():
    plan = resolve_kernels({}, KernelEnv(te=True, cuda=True, wgrad_kernel=True))
    assert plan.use_te and all(plan.fusions.values())
    assert "TE" in plan.attention and plan.prefix_attention == PREFIX_TE_THD


@pytest.mark.parametrize("te,cuda,expected", [(True, True, PREFIX_TE_THD), (False, True, PREFIX_SDPA_GPU_FALLBACK),
                                              (True, False, PREFIX_SDPA), (False, False, PREFIX_SDPA)])
def test_prefix_attention_is_te_thd_with_te_and_cuda_and_a_documented_sdpa_fallback_otherwise(te, cuda, expected):
    env = KernelEnv(te=te, cuda=cuda, wgrad_kernel=False)
    assert prefix_attention(env) == expected == resolve_kernels({}, env).prefix_attention
    if expected == PREFIX_SDPA_GPU_FALLBACK:  # a GPU without TE runs, and the banner says why it is slow
        assert "fallback" in expected and "[gpu]" in expected
        assert f"prefix-shared: {expected}" in resolve_kernels({}, env).describe()


def test_prefix_sharing_layer_spec_core_attention():
    from megatron_dpo.models.attention import SDPAttention
    from megatron_dpo.models.build import layer_spec
    from megatron_dpo.models.presets import PRESETS

    spec = layer_spec(PRESETS["tiny-llama"], use_te=False, prefix_sharing=True)
    assert spec.submodules.self_attention.submodules.core_attention is SDPAttention


def test_te_without_cuda_is_the_local_spec():
    assert resolve_kernels({}, KernelEnv(te=True, cuda=False, wgrad_kernel=True)).layer_spec == "local"


def test_explicit_false_turns_one_fusion_off_on_gpu():
    env = KernelEnv(te=True, cuda=True, wgrad_kernel=True)
    fusions = resolve_fusions({**ALL_AUTO, "apply_rope_fusion": "false"}, env)
    assert fusions["apply_rope_fusion"] is False and fusions["bias_activation_fusion"] is True


@pytest.mark.parametrize("name", FUSIONS)
def test_explicit_true_without_the_kernel_is_refused_by_name(name):
    with pytest.raises(ValueError, match=name):
        resolve_fusions({name: "true"}, KernelEnv(te=False, cuda=False, wgrad_kernel=False))


def test_gradient_accumulation_fusion_true_needs_apex_wgrad_kernel():
    with pytest.raises(ValueError, match="fused_weight_gradient_mlp_cuda"):
        resolve_fusions({"gradient_accumulation_fusion": "true"}, KernelEnv(te=True, cuda=True, wgrad_kernel=False))


def test_config_keys_accept_yaml_booleans():
    cfg = load_config(None, ["policy.megatron_cfg.apply_rope_fusion=false",
                             "policy.megatron_cfg.bias_dropout_fusion=True"])
    assert cfg.policy.megatron_cfg.apply_rope_fusion == "false"
    assert cfg.policy.megatron_cfg.bias_dropout_fusion == "true"
    assert cfg.policy.megatron_cfg.masked_softmax_fusion == "auto"


def test_build_passes_the_fusions_to_megatron():
    from megatron_dpo.models.build import transformer_config
    from megatron_dpo.models.presets import PRESETS
    from megatron_dpo.parallel.dims import ParallelDims

    fusions = resolve_fusions(ALL_AUTO, KernelEnv(te=False, cuda=False, wgrad_kernel=False))
    dims = ParallelDims(world_size=1, tp_size=1, pp_size=1, dp_size=1)
    config = transformer_config(PRESETS["tiny-llama"], dims, "float32", fusions=fusions)
    assert not any(getattr(config, name) for name in FUSIONS)


@pytest.mark.parametrize("te,cuda,refused", [(False, True, True), (True, True, False), (False, False, False),
                                             (True, False, False)])
def test_sequence_parallel_needs_te_on_a_gpu(te, cuda, refused):
    problem = sequence_parallel_problem(True, KernelEnv(te=te, cuda=cuda, wgrad_kernel=False))
    assert (problem is not None) is refused
    if refused:
        assert "sequence_parallel=false" in problem and "[gpu]" in problem
    assert sequence_parallel_problem(False, KernelEnv(te=te, cuda=cuda, wgrad_kernel=False)) is None


def test_gpu_extra_pins_the_transformer_engine_range_of_megatron_core():
    import importlib.metadata
    import os
    import re

    declared = next(req for req in importlib.metadata.requires("megatron-core") if req.startswith("transformer-engine"))
    assert ">=2.9.0a0" in declared and "<2.12.0" in declared, declared
    setup_py = open(os.path.join(os.path.dirname(__file__), "..", "..", "setup.py")).read()
    assert re.search(r'"gpu": \["transformer-engine\[pytorch\]>=2\.9,<2\.12"\]', setup_py)


def test_moe_experts_are_grouped_gemm_with_te_and_cuda_else_sequential():
    from megatron_dpo.models.kernels import resolve_moe_grouped_gemm

    for te, cuda in itertools.product((False, True), repeat=2):
        env = KernelEnv(te=te, cuda=cuda, wgrad_kernel=False)
        assert resolve_moe_grouped_gemm("auto", env) == (te and cuda)
        assert resolve_moe_grouped_gemm("false", env) is False
        assert resolve_kernels({"moe_grouped_gemm": "auto"}, env).moe_grouped_gemm == (te and cuda)
    with pytest.raises(ValueError, match="moe_grouped_gemm=true needs Transformer Engine and CUDA"):
        resolve_moe_grouped_gemm("true", KernelEnv(te=False, cuda=True, wgrad_kernel=False))


def test_the_banner_names_the_expert_kernel_only_for_moe_models():
    plan = resolve_kernels({}, KernelEnv(te=False, cuda=False, wgrad_kernel=False))
    assert "MoE" not in plan.describe()
    assert plan.describe(moe=True).endswith("; MoE experts: sequential")
