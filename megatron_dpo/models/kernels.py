"""Which kernels a run uses: layer spec, fused kernels, attention backend.

One pure function, ``resolve_kernels``, turns what the machine offers
(``KernelEnv``: Transformer Engine importable, CUDA present, apex's fused
weight-gradient kernel importable) and the ``policy.megatron_cfg`` fusion
settings (``auto`` | ``true`` | ``false``) into a ``KernelPlan``. Tests call
it with every combination of flags; the run calls it once with
``detect_env()`` and the startup banner prints the plan.

``auto`` means: on with TE and CUDA, off otherwise. A fusion set to ``true``
where its kernel cannot run is refused by name. What megatron-core 0.16.1
checks, per fusion:
- ``apply_rope_fusion``: TE's fused RoPE (``fused_apply_rotary_pos_emb``,
  TransformerConfig refuses it without TE).
- ``bias_activation_fusion``: megatron's jit SwiGLU (torch.compile / nvfuser
  on CUDA); on CPU it runs but is slower than eager, so ``auto`` keeps it off.
- ``bias_dropout_fusion``: megatron's jit bias-dropout-add (CUDA only pays).
- ``masked_softmax_fusion``: megatron's fused softmax in the local
  ``DotProductAttention`` (unused with TE attention or our SDPA core; kept
  consistent with the others).
- ``gradient_accumulation_fusion``: the TE linears use TE's own fused wgrad
  (``fuse_wgrad_accumulation``), but the output layer is megatron's
  ``ColumnParallelLinear``, which imports apex's ``fused_weight_gradient_mlp_cuda``
  and raises at build without it (tensor_parallel/layers.py). So ``auto``
  turns it on only with TE, CUDA and that apex extension.

Mixture-of-Experts models (``moe_grouped_gemm``): TE's grouped-GEMM experts
(``TEGroupedMLP``, all local experts in one kernel) with TE and CUDA, else
megatron's ``SequentialMLP`` (one MLP per local expert, a loop); ``true``
without TE and CUDA is refused. Dense models ignore it.
"""

import importlib.util
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

FUSIONS = (
    "apply_rope_fusion",
    "bias_activation_fusion",
    "gradient_accumulation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
)
SWITCH_VALUES = ("auto", "true", "false")


@dataclass(frozen=True)
class KernelEnv:
    te: bool  # transformer_engine importable
    cuda: bool  # torch.cuda.is_available()
    wgrad_kernel: bool  # apex's fused_weight_gradient_mlp_cuda importable


@dataclass(frozen=True)
class KernelPlan:
    layer_spec: str  # "transformer_engine" | "local"
    attention: str  # padded/packed batches' core attention
    prefix_attention: str  # prefix-shared batches' core attention
    fusions: Dict[str, bool]
    moe_grouped_gemm: bool = False  # MoE experts: TE grouped GEMM, else sequential

    @property
    def use_te(self) -> bool:
        return self.layer_spec == "transformer_engine"

    def describe(self, moe: bool = False) -> str:
        """``moe``: the model has experts (their kernel is named only then)."""
        on = [name for name, value in self.fusions.items() if value]
        experts = f"; MoE experts: {'grouped GEMM' if self.moe_grouped_gemm else 'sequential'}" if moe else ""
        return (f"layer spec {self.layer_spec}; attention {self.attention} "
                f"(prefix-shared: {self.prefix_attention}); fusions on: {', '.join(on) or 'none'}{experts}")


def detect_env() -> KernelEnv:
    import torch

    def importable(name: str) -> bool:
        return importlib.util.find_spec(name) is not None

    return KernelEnv(te=importable("transformer_engine"), cuda=torch.cuda.is_available(),
                     wgrad_kernel=importable("fused_weight_gradient_mlp_cuda"))


def _available(name: str, env: KernelEnv) -> bool:
    fast = env.te and env.cuda
    return fast and env.wgrad_kernel if name == "gradient_accumulation_fusion" else fast


def resolve_fusions(settings: Mapping[str, str], env: KernelEnv) -> Dict[str, bool]:
    """Each fusion on or off; ``settings`` maps a fusion name to auto/true/false."""
    resolved = {}
    for name in FUSIONS:
        value = str(settings.get(name, "auto")).lower()
        if value not in SWITCH_VALUES:
            raise ValueError(f"policy.megatron_cfg.{name}={value!r}: choose one of {', '.join(SWITCH_VALUES)}")
        if value == "true" and not _available(name, env):
            need = "Transformer Engine, CUDA" + (" and apex's fused_weight_gradient_mlp_cuda"
                                                  if name == "gradient_accumulation_fusion" else "")
            raise ValueError(f"policy.megatron_cfg.{name}=true needs {need} ({env}); set it to auto or false")
        resolved[name] = _available(name, env) if value == "auto" else value == "true"
    return resolved


PREFIX_TE_THD = "TE THD bottom-right"
PREFIX_SDPA = "SDPA"
PREFIX_SDPA_GPU_FALLBACK = ("SDPA (fallback: no Transformer Engine on this GPU; a per-segment loop with host "
                            "syncs, GQA on the math kernel; pip install -e '.[gpu]' for TE THD)")


def prefix_attention(env: KernelEnv) -> str:
    """Prefix-shared batches' core attention. With TE and CUDA, TE's THD
    kernel: the rejected branch is a query sequence over [prompt; rejected]
    keys, causal aligned bottom-right (models/te_attention.py). Otherwise the
    SDPA per-segment path, on CPU the one there is; on a GPU without TE it is
    a documented fallback, not a refusal: it gives the same numbers (the CPU
    tests' path), only slower, as padded and packed batches there run SDPA too."""
    if env.te and env.cuda:
        return PREFIX_TE_THD
    return PREFIX_SDPA_GPU_FALLBACK if env.cuda else PREFIX_SDPA


def resolve_moe_grouped_gemm(setting: str, env: KernelEnv) -> bool:
    """Grouped-GEMM experts (TE, CUDA) or sequential ones; ``setting``: auto/true/false."""
    value = str(setting).lower()
    if value not in SWITCH_VALUES:
        raise ValueError(f"policy.megatron_cfg.moe_grouped_gemm={value!r}: choose one of {', '.join(SWITCH_VALUES)}")
    available = env.te and env.cuda
    if value == "true" and not available:
        raise ValueError(f"policy.megatron_cfg.moe_grouped_gemm=true needs Transformer Engine and CUDA ({env}); "
                         "set it to auto or false (sequential experts)")
    return available if value == "auto" else value == "true"


def resolve_kernels(settings: Mapping[str, str], env: KernelEnv) -> KernelPlan:
    use_te = env.te and env.cuda
    return KernelPlan(
        layer_spec="transformer_engine" if use_te else "local",
        attention="TE DotProductAttention (THD for packed rows)" if use_te else "SDPA",
        prefix_attention=prefix_attention(env),
        fusions=resolve_fusions(settings, env),
        moe_grouped_gemm=resolve_moe_grouped_gemm(settings.get("moe_grouped_gemm", "auto"), env),
    )


def sequence_parallel_problem(sequence_parallel: bool, env: KernelEnv) -> Optional[str]:
    """Why sequence parallelism cannot run here, or None. On a GPU without TE
    megatron builds the local spec, whose torch norms refuse
    ``sequence_parallel`` (an assert at model build); on CPU the compat layer
    builds without it and tags the parameters (DESIGN.md, CPU compat)."""
    if sequence_parallel and env.cuda and not env.te:
        return ("policy.megatron_cfg.sequence_parallel=true needs Transformer Engine on a GPU (the local "
                "spec's norms refuse it): install the gpu extra (pip install -e '.[gpu]'), or set "
                "policy.megatron_cfg.sequence_parallel=false")
    return None


def fusion_settings(megatron_cfg) -> Dict[str, str]:
    """The fusion keys (and ``moe_grouped_gemm``) of a ``policy.megatron_cfg`` sub-config."""
    return {name: getattr(megatron_cfg, name) for name in (*FUSIONS, "moe_grouped_gemm")}
