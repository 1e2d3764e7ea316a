from setuptools import find_packages, setup

setup(
    name="megatron_dpo",
    version="0.1.0",
    description="Model-parallel DPO training on megatron-core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_dpo", "megatron_dpo.*"]),
    package_data={"megatron_dpo.models": ["presets/*/*"]},
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        # dist_checkpointing's async writer needs psutil; without it a save hangs.
        "psutil",
        # checkpoint manifests: xxh3-128 checksums at memory speed (already a dependency of datasets).
        "xxhash>=2.0",
        "omegaconf>=2.3",
        "datasets>=2.19",
        "transformers>=4.45",
        "safetensors",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "wandb", "peft"],
        "wandb": ["wandb"],
        # The range megatron-core 0.16.1 declares (its "dev" extra); tests/unit/test_kernels.py checks it.
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12"],
    },
)
