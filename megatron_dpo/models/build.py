"""Build this rank's GPTModel shards: TransformerConfig + layer spec + GPTModel.

The builder only constructs modules; parallelism (DDP, optimizer, schedules)
is applied outside, in ``train/``. The policy and the reference are built by
the same function so that they share one parallel layout.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron_dpo.models.architecture import ModelArchitecture
from megatron_dpo.models.kernels import KernelEnv, KernelPlan, detect_env, resolve_kernels
from megatron_dpo.parallel.dims import ParallelDims
from megatron_dpo.parallel.init import get_device

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Conversion builds megatron's local spec on the CPU on any node (see
# parallel.init.device_type); its checkpoint loads into either spec
# (checkpoint/dist.py tolerates the ``_extra_state`` keys they differ in).
CONVERSION_KERNELS = resolve_kernels({}, KernelEnv(te=False, cuda=False, wgrad_kernel=False))


def transformer_engine_available() -> bool:
    """Use TE's fused kernels only where they can run: TE importable and CUDA present."""
    return resolve_kernels({}, detect_env()).use_te


@dataclass(frozen=True)
class MoESettings:
    """How a Mixture-of-Experts model routes and balances (``policy.megatron_cfg``'s
    moe_* keys, megatron's TransformerConfig names); unused for dense models."""

    router_load_balancing_type: str = "aux_loss"
    aux_loss_coeff: float = 0.0
    z_loss_coeff: Optional[float] = None
    token_dispatcher_type: str = "alltoall"

    @classmethod
    def from_megatron_cfg(cls, megatron_cfg) -> "MoESettings":
        return cls(router_load_balancing_type=megatron_cfg.moe_router_load_balancing_type,
                   aux_loss_coeff=megatron_cfg.moe_aux_loss_coeff, z_loss_coeff=megatron_cfg.moe_z_loss_coeff,
                   token_dispatcher_type=megatron_cfg.moe_token_dispatcher_type)


def layer_spec(arch: ModelArchitecture, use_te: bool, prefix_sharing: bool = False, moe_grouped_gemm: bool = False):
    """TE's fused layers, or megatron's local ones, each with the core
    attention that fits the batches: SDPA on the local spec
    (models/attention.py); on the TE spec, TE's, which for prefix-shared
    batches runs THD with bottom-right causal masks (models/te_attention.py).
    MoE models get megatron's MoE layer (router, dispatcher, experts: grouped
    GEMM or sequential)."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_dpo.models.attention import SDPAttention, with_core_attention

    moe = dict(num_experts=arch.num_experts, moe_grouped_gemm=moe_grouped_gemm) if arch.is_moe else {}
    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm, **moe)
        if not prefix_sharing:
            return spec
        from megatron_dpo.models.te_attention import TEPrefixSharedAttention

        return with_core_attention(spec, TEPrefixSharedAttention)
    return with_core_attention(gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=arch.qk_layernorm, normalization="RMSNorm", **moe
    ), SDPAttention)


def moe_config_fields(arch: ModelArchitecture, ctx: ParallelDims, moe: MoESettings, grouped_gemm: bool) -> dict:
    """TransformerConfig's MoE fields; none for a dense model. Routing is
    dropless (no capacity factor), the router computes in fp32."""
    if not arch.is_moe:
        return {}
    return dict(
        num_moe_experts=arch.num_experts,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        moe_router_topk=arch.moe_router_topk,
        moe_router_pre_softmax=arch.moe_router_pre_softmax,
        moe_router_dtype="fp32",
        moe_grouped_gemm=grouped_gemm,
        moe_token_dispatcher_type=moe.token_dispatcher_type,
        moe_router_load_balancing_type=moe.router_load_balancing_type,
        moe_aux_loss_coeff=moe.aux_loss_coeff,
        moe_z_loss_coeff=moe.z_loss_coeff,
        expert_model_parallel_size=ctx.ep_size,
        expert_tensor_parallel_size=ctx.etp_size,
    )


def transformer_config(
    arch: ModelArchitecture,
    ctx: ParallelDims,
    precision: str,
    sequence_parallel: bool = False,
    activation_checkpointing: bool = False,
    fusions: Optional[dict] = None,
    moe: Optional[MoESettings] = None,
    moe_grouped_gemm: bool = False,
    use_cpu_initialization: bool = False,
):
    """``fusions``: KernelPlan.fusions (models/kernels.py); None: all off.
    ``moe``: routing settings of an MoE model; None: megatron's defaults.
    ``use_cpu_initialization``: megatron allocates and initialises on the CPU
    (conversion), not on ``torch.cuda.current_device()``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_dpo.models.kernels import FUSIONS

    fusions = fusions or dict.fromkeys(FUSIONS, False)
    dtype = _DTYPES[precision]
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        persist_layer_norm=False,
        **fusions,
        # DPO compares policy and reference on the same inputs: no dropout, as in TRL.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ctx.tp_size,
        pipeline_model_parallel_size=ctx.pp_size,
        virtual_pipeline_model_parallel_size=ctx.vpp_size,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # The DPO loss is normalised by the number of pairs in the global batch:
        # loss_func returns (sum over its pairs, its pair count) and megatron
        # divides the gradients by the all-reduced count (finalize_model_grads).
        calculate_per_token_loss=True,
        # Interleaved PP with batched p2p gives wrong grads (Megatron-LM #750, #1450).
        batch_p2p_comm=ctx.vpp_size is None,
        overlap_p2p_comm=ctx.vpp_size is not None,
        recompute_granularity="full" if activation_checkpointing else None,
        recompute_method="uniform" if activation_checkpointing else None,
        recompute_num_layers=1 if activation_checkpointing else None,
        # Weights are overwritten by weights.init_weights or a checkpoint, but
        # megatron only tags TP params (tensor_model_parallel, partition_dim),
        # which DDP, grad clipping and sharding rely on, when it initialises them.
        perform_initialization=True,
        use_cpu_initialization=use_cpu_initialization,
        **moe_config_fields(arch, ctx, moe or MoESettings(), moe_grouped_gemm),
    )


def build_model(
    arch: ModelArchitecture,
    ctx: ParallelDims,
    precision: str = "float32",
    sequence_parallel: bool = False,
    activation_checkpointing: bool = False,
    trainable: bool = True,
    prefix_sharing: bool = False,
    kernels: Optional[KernelPlan] = None,
    for_conversion: bool = False,
    moe: Optional[MoESettings] = None,
) -> List[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), on the run
    device; ``for_conversion``: on the CPU with the local spec, on any node.

    bf16 models are wrapped in megatron's Float16Module, which casts inputs and
    keeps the last stage's logits in fp32. ``prefix_sharing``: the model will
    see prefix-shared packed batches (data.prefix_sharing). ``kernels``: the
    run's resolved plan (models/kernels.py); None: every setting ``auto``.
    ``moe``: routing settings of an MoE model (``MoESettings``); None: defaults.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module

    from megatron_dpo.models.attention import PositionedGPTModel

    if for_conversion:
        kernels = CONVERSION_KERNELS
    kernels = kernels or resolve_kernels({}, detect_env())
    device = get_device(for_conversion)
    config = transformer_config(arch, ctx, precision, sequence_parallel, activation_checkpointing,
                                kernels.fusions, moe, kernels.moe_grouped_gemm,
                                use_cpu_initialization=for_conversion)
    spec = layer_spec(arch, kernels.use_te, prefix_sharing, kernels.moe_grouped_gemm)
    num_chunks = ctx.vpp_size or 1
    chunks = []
    for vp_stage in range(num_chunks):
        vp = vp_stage if ctx.vpp_size else None
        model = PositionedGPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.padded_vocab_size(ctx.tp_size),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rotary_base),
            rope_scaling=arch.rope_scaling_factor is not None,
            rope_scaling_factor=arch.rope_scaling_factor or 8.0,
            vp_stage=vp,
        )
        model.to(device)
        if precision == "bfloat16":
            model = Float16Module(config, model)
        if not trainable:
            model.requires_grad_(False)
            model.eval()
        chunks.append(model)
    return chunks


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of this chunk's first transformer layer."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    gpt = unwrap(model)
    return get_transformer_layer_offset(gpt.config, vp_stage=gpt.vp_stage)
