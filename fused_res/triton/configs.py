"""Autotune configurations for the Triton kernels, as plain data (no triton import).

The conv kernel is autotuned over CONV_CONFIGS, keyed by problem shape; `conv_config_excluded`
is the one place that says which configs must never run, and why. The same data drives the
ahead-of-time compile check (fused_res.triton.aot), so every config that can run on a GPU has
been compiled for sm_80 and sm_90 on the CPU first.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvConfig:
    """One implicit-GEMM tile shape: BLOCK_M output pixels x BLOCK_N output channels, reduced
    BLOCK_K input channels (or flattened (kh, kw, c) taps) at a time."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    @property
    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}

    def __str__(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k}"
                f"_w{self.num_warps}_s{self.num_stages}")


# Kept small on purpose. Autotuning compiles every config for every new shape key, and a
# ResNet-50 has ~20 conv shapes per mode, so 12 configs cost minutes of compiling on the first
# batch. The AOT sweep (python -m fused_res.triton.aot) showed the 128x128 and 256-wide tiles
# spilling registers in the fused 3x3 kernels (stack frames of 1.7-4.3 KB), while these tiles
# compiled without spills on sm_80 and sm_90; 128x64 stays as the one large candidate for
# the GPU run to judge.
CONV_CONFIGS: tuple[ConvConfig, ...] = (
    ConvConfig(64, 64, 32, 4, 4),
    ConvConfig(64, 64, 64, 4, 3),
    ConvConfig(64, 32, 32, 4, 4),
    ConvConfig(32, 64, 32, 4, 4),
    ConvConfig(128, 64, 32, 4, 4),
)

# Larger tiles that only a GPU can judge (benchmarks/conv_configs.py times them against
# CONV_CONFIGS and cuDNN at ResNet-50's shapes). On the first H100 run the 64x64x32 default
# took 3-4.8x cuDNN's time for the plain conv (graph-free timing); Hopper's tensor cores want
# 128-wide tiles with BLOCK_K 64. Not autotuned until a GPU run shows which of them win.
SWEEP_CONFIGS: tuple[ConvConfig, ...] = (
    ConvConfig(128, 128, 32, 4, 4),
    ConvConfig(128, 128, 64, 8, 3),
    ConvConfig(128, 64, 64, 4, 3),
    ConvConfig(64, 128, 64, 4, 3),
    ConvConfig(128, 256, 64, 8, 2),
    ConvConfig(256, 128, 64, 8, 2),
)

# The interpreter runs one program at a time in numpy: larger tiles mean fewer programs.
# It does not enforce tl.dot's minimum of 16, but we keep it so the same path runs on a GPU.
INTERPRETER_CONV_CONFIG = ConvConfig(32, 32, 16, 4, 1)

# Shared memory per block on sm_80 is at most 163 KiB (opt-in); keep headroom for the
# epilogue's layout conversion scratch.
SMEM_BUDGET = 144 * 1024

DOT_MIN = 16  # tl.dot on GPUs needs every block dimension >= 16


def conv_smem_estimate(cfg: ConvConfig, elt_bytes: int) -> int:
    """Bytes of the software-pipelined A and B tiles (num_stages buffers each)."""
    return cfg.num_stages * (cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n) * elt_bytes


def conv_config_excluded(cfg: ConvConfig, elt_bytes: int, taps: int) -> str | None:
    """Why `cfg` must not run for an element size and a kernel with `taps` = KH*KW, or None.

    Rules (each one a config known to fail to compile, to be slow by construction, or to be
    wrong on some Triton versions):
    - any block dimension < 16: tl.dot rejects it on the GPU (the interpreter does not);
    - the pipelined tiles do not fit the shared-memory budget of sm_80;
    - num_warps >= 8 with a multi-tap (3x3, 7x7) loop and num_stages >= 4: large warp counts
      with deeply pipelined tap loops are the combination seen to miscompile;
    - num_warps >= 8 on a tile with fewer than 64 accumulator elements per thread: the dot's
      warp layout then replicates work and only adds register pressure.
    """
    if min(cfg.block_m, cfg.block_n, cfg.block_k) < DOT_MIN:
        return f"a block dimension is below tl.dot's minimum of {DOT_MIN}"
    if conv_smem_estimate(cfg, elt_bytes) > SMEM_BUDGET:
        return (f"{conv_smem_estimate(cfg, elt_bytes)} bytes of pipelined tiles exceed the "
                f"{SMEM_BUDGET}-byte shared-memory budget")
    if cfg.num_warps >= 8 and taps > 1 and cfg.num_stages >= 4:
        return "num_warps >= 8 with a pipelined multi-tap loop (seen to miscompile)"
    if cfg.num_warps >= 8 and cfg.block_m * cfg.block_n < 64 * 32 * cfg.num_warps:
        return "num_warps >= 8 on a tile too small to give each thread 64 accumulators"
    return None


def conv_configs_for(elt_bytes: int, taps: int, c_in: int, c_out: int,
                     flat_k: bool) -> list[ConvConfig]:
    """The configs worth timing for one problem: not excluded, and not much wider than the
    problem's channel counts (a 128-wide tile on 32 channels only wastes work)."""
    out = []
    for cfg in CONV_CONFIGS:
        if conv_config_excluded(cfg, elt_bytes, taps) is not None:
            continue
        if cfg.block_n > max(DOT_MIN, 2 * c_out):
            continue
        if not flat_k and cfg.block_k > max(DOT_MIN, 2 * c_in):
            continue
        out.append(cfg)
    if not out:  # the smallest valid config always runs
        out = [min((c for c in CONV_CONFIGS if conv_config_excluded(c, elt_bytes, taps) is None),
                   key=lambda c: c.block_m * c.block_n)]
    return out


@dataclass(frozen=True)
class TileConfig:
    """Elementwise / reduction tile: BLOCK_M rows (pixels) x BLOCK_C channels."""

    block_m: int
    block_c: int
    num_warps: int

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_c}_w{self.num_warps}"


# Memory-bound passes: one config, big enough to stream, small enough to keep registers low
# (the backward holds ~5 fp32 tiles; 64x64 on 4 warps hit ~250 registers in the AOT report).
ELEMENTWISE_CONFIG = TileConfig(32, 64, 4)
INTERPRETER_ELEMENTWISE_CONFIG = TileConfig(64, 64, 4)
FINALIZE_CONFIG = TileConfig(32, 64, 4)  # block_m here is tiles combined per step
