"""Benchmarks users can trust: `python -m fused_res bench` (see benchmarks/README.md).

Layout, one job per module:
  config      BenchConfig: what one run measures, validated (ConfigError names the argument)
  workloads   models, residual blocks and conv units at given shapes (presets and specs)
  contenders  eager / torch.compile / cuDNN fused / fused_res backends: selection and build
  cudnn_fused BN folding + aten's cuDNN conv+bias(+add)+ReLU ops (the cuDNN contender)
  timing      device events, warm-up, rotated inputs, L2 flush, CUDA graphs, statistics
  roofline    FLOPs and fewest bytes from the shapes; matmul rate and copy bandwidth
  env         device, driver, versions, git commit
  runner      the run: reference, correctness gate, timing, memory, roofline per contender
  schema      the JSON document's keys and types, and validate()
  output      rich/plain table, markdown, JSON, PNG chart, progress
  cli         the `bench` subcommand

Nothing here is imported by `import fused_res`; rich, matplotlib and torch.compile are
imported only when used.
"""

from .config import BenchConfig, ConfigError
from .runner import run_bench
from .schema import SCHEMA, validate

__all__ = ["SCHEMA", "BenchConfig", "ConfigError", "run_bench", "validate"]
