"""perf/gpu_check.py's pure parts: the datasheet peak of the detected GPU."""

import pytest

from megatron_dpo.perf.gpu_check import datasheet_peak


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 SXM5 80GB", 989), ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA H100 NVL", None), ("NVIDIA GeForce RTX 4090", None), ("Tesla V100-SXM2-16GB", None),
])
def test_datasheet_bf16_peak_of_known_gpus_and_none_otherwise(name, tflops):
    peak = datasheet_peak(name)
    assert (peak and peak / 1e12) == tflops
