"""pytest-benchmark suites: units and blocks at the ResNet-50/ResNet-18 stage shapes and the
CIFAR shapes, eager channels_last against fused_res (and cuDNN's fused ops on CUDA).

    pytest benchmarks/ --benchmark-only                    # measure (CUDA if present)
    pytest benchmarks/ --benchmark-disable -k cifar        # run each once, as a smoke test

`python -m pytest` never collects this folder (pyproject: testpaths = ["tests"]); run here
without one of the flags above, every benchmark is skipped. Environment:
FUSED_RES_BENCH_DEVICE (cpu|cuda), FUSED_RES_BENCH_DTYPE (fp32|tf32|bf16|fp16),
FUSED_RES_BENCH_BATCH (default 64 on CUDA, 2 on the CPU).
"""

import os

import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a pytest-benchmark suite under benchmarks/")


def _enabled(config) -> bool:
    opt = config.getoption
    return bool(opt("benchmark_only", default=False) or opt("benchmark_disable", default=False)
                or os.environ.get("FUSED_RES_BENCH") == "1")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="benchmark suite: run `pytest benchmarks/ --benchmark-only`")
    enabled = _enabled(config)
    for item in items:
        item.add_marker(pytest.mark.bench)
        if not enabled:
            item.add_marker(skip)
