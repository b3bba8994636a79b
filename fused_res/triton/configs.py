"""Autotune configurations for the Triton kernels, as plain data (no triton import).

The conv kernel is autotuned over CONV_CONFIGS, keyed by problem shape; `conv_config_excluded`
is the one place that says which configs must never run, and why. The same data drives the
ahead-of-time compile check (fused_res.triton.aot), so every config that can run on a GPU has
been compiled for sm_80 and sm_90 on the CPU first.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ConvConfig:
    """One implicit-GEMM tile shape: BLOCK_M output pixels x BLOCK_N output channels, reduced
    BLOCK_K input channels (or flattened (kh, kw, c) taps) at a time. tma: the operands
    arrive by TMA (conv_tma.py: 1x1 stride-1 convs of dense NHWC inputs on sm_90+); tma_b: only
    the weight tile does, in the implicit-GEMM kernel (any conv whose C_in BLOCK_K divides)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = False
    tma_b: bool = False  # the implicit-GEMM kernel with only its weight tile loaded by TMA

    @property
    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k}

    def __str__(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k}"
                f"_w{self.num_warps}_s{self.num_stages}{'_tma' if self.tma else ''}"
                f"{'_tmab' if self.tma_b else ''}")

    def with_tma(self) -> ConvConfig:
        """The same tile with its operands loaded by TMA."""
        return replace(self, tma=True)

    def with_tma_b(self) -> ConvConfig:
        """The same tile with its weight (B) tile loaded by TMA, its input gathered as usual."""
        return replace(self, tma_b=True)


# The autotuner's candidates. Kept to eight on purpose: autotuning compiles every config for
# every new shape key, and a ResNet-50 has ~20 conv shapes per mode. Every one compiles for
# sm_80 and sm_90 without a register spill in every variant of the AOT check (python -m
# fused_res.triton.aot) but one (128x64x64, below), now that the check specialises the
# integer arguments as the JIT does (an earlier version did not, and its report of spills in
# 128x128 tiles was an artifact).
# 128x128x64 on 8 warps is the Hopper-sized tile (two warpgroups of wgmma); the 64-wide ones
# serve 64-channel convs and batches too small to fill the GPU with large tiles.
CONV_CONFIGS: tuple[ConvConfig, ...] = (
    ConvConfig(64, 64, 32, 4, 4),
    ConvConfig(128, 128, 64, 8, 3),
    ConvConfig(64, 128, 64, 4, 3),
    ConvConfig(128, 64, 32, 4, 4),
    ConvConfig(64, 64, 64, 4, 3),
    ConvConfig(64, 32, 32, 4, 4),
    ConvConfig(32, 64, 32, 4, 4),
    # Run 3's conv-configs: 1.08x cuDNN's time at 64->64 3x3 56x56, against 1.28x for the
    # 64x64x64 tile it ran untuned (the AOT check shows 8 bytes of spill for it on sm_80 in
    # the int64 variant only).
    ConvConfig(128, 64, 64, 4, 3),
)

# The smallest tile height the autotuner may pick: what its statistics buffers are sized for.
CONV_MIN_BLOCK_M = min(c.block_m for c in CONV_CONFIGS)

# What runs untuned (FUSED_RES_TRITON_AUTOTUNE=0): of the autotune candidates, deepest K
# step first, then largest tile (the wider N of two equal areas), the first that the
# problem's channels fill and that still gives every SM two tiles (default_conv_config).
# History: in the first H100 run every conv ran 64x64x32 and the fused blocks took 1.3-2.5x
# the time of cuDNN's (benchmarks/results/2026-11-26-h100-run1). In run 3's conv-configs
# (bf16, batch 64) a BLOCK_K of 64 beat 32 at every ResNet-50 shape; against that table the
# 128x64x64 candidate, the wider N on a tie, and skipping an 8-warp tile (one block per SM:
# 165-213 registers per thread) whose last wave would leave most SMs idle pick the best
# measured tile at 5 of the 6 shapes and one within 3% at the sixth: geomean 1.21 -> 1.16x
# cuDNN's time (the best per shape: 1.16x). 64->64 3x3 56x56 1.28 -> 1.08x (128x64);
# 512->2048 1x1 7x7 1.56 -> 1.42x (128x128 made 400 tiles on 132 SMs: a fourth wave of 4);
# 256->64 1x1 56x56 0.95 -> 0.97x. An in-sample choice: the next conv-configs run checks it.
DEFAULT_LADDER: tuple[ConvConfig, ...] = tuple(sorted(
    CONV_CONFIGS, key=lambda c: (-c.block_k, -c.block_m * c.block_n, -c.block_n)))

# Tiles only a GPU can judge (benchmarks/conv_configs.py times them beside CONV_CONFIGS and
# cuDNN at ResNet-50's shapes); not autotuned. The AOT check shows small spills for some of
# them in the fused 3x3 and int64 variants (128x256 and 256x128: 8-500 bytes).
SWEEP_CONFIGS: tuple[ConvConfig, ...] = (
    ConvConfig(64, 64, 64, 4, 4),
    ConvConfig(128, 256, 64, 8, 3),
    ConvConfig(256, 128, 64, 8, 3),
)

# TMA tiles (conv_tma.py) that only a GPU can judge against the pointer-loaded ones above:
# benchmarks/conv_configs.py times them at ResNet-50's 1x1 stride-1 shapes. Deeper pipelines
# than the pointer tiles, because a TMA stage costs no registers. H100 run 7 found them a
# little faster without statistics and level with them (conv_tma.py), so they run only where
# asked (a config with tma=True, or FUSED_RES_TRITON_TMA=1, which autotunes CONV_CONFIGS as
# TMA tiles instead). The AOT check: 128x256 spills 24 bytes on
# sm_90 in the eval variant with the whole tail and u (254 registers), as its pointer twin
# does; the rest do not spill.
TMA_SWEEP_CONFIGS: tuple[ConvConfig, ...] = (
    ConvConfig(128, 128, 64, 8, 3, tma=True),
    ConvConfig(128, 128, 64, 8, 4, tma=True),
    ConvConfig(128, 64, 64, 4, 4, tma=True),
    ConvConfig(64, 128, 64, 4, 4, tma=True),
    ConvConfig(128, 256, 64, 8, 3, tma=True),
)

# The implicit-GEMM kernel with its weight tile loaded by TMA (any kernel size, stride,
# padding or prologue: only B is a plain matrix), the input still gathered per element: what
# TMA can do for the 3x3 convs (run 5: up to 1.62x cuDNN's time at 512 -> 512 7x7). Timed by
# benchmarks/conv_configs.py beside the pointer tiles; runs for a config with tma_b=True, and
# under FUSED_RES_TRITON_TMA=1 (autotuned over CONV_CONFIGS as such tiles).
TMA_B_SWEEP_CONFIGS: tuple[ConvConfig, ...] = (
    ConvConfig(128, 128, 64, 8, 3, tma_b=True),
    ConvConfig(128, 64, 64, 4, 3, tma_b=True),
    ConvConfig(64, 128, 64, 4, 3, tma_b=True),
)

# Every TMA tile a GPU may run: the sweeps', and CONV_CONFIGS as such tiles (what
# FUSED_RES_TRITON_TMA=1 autotunes over). The AOT check compiles them, the interpreter tests
# run them.
TMA_RUNNABLE: tuple[ConvConfig, ...] = tuple(dict.fromkeys(
    TMA_SWEEP_CONFIGS + tuple(c.with_tma() for c in CONV_CONFIGS)))
TMA_B_RUNNABLE: tuple[ConvConfig, ...] = tuple(dict.fromkeys(
    TMA_B_SWEEP_CONFIGS + tuple(c.with_tma_b() for c in CONV_CONFIGS)))

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
      warp layout then replicates work and only adds register pressure;
    - float32 operands on 4 warps with BLOCK_M >= 128 and BLOCK_K >= 64: they spill (the AOT
      compile of 128x64x64: 8-224 bytes in the fused 3x3 and int64 variants).
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
    if elt_bytes == 4 and cfg.num_warps == 4 and cfg.block_m >= 128 and cfg.block_k >= 64:
        return "float32 operands of a 128-row, 64-deep tile on 4 warps spill registers"
    return None


def conv_configs_for(elt_bytes: int, taps: int, c_in: int, c_out: int,
                     flat: bool) -> list[ConvConfig]:
    """The configs worth timing for one problem: not excluded, and not much wider than the
    problem's channel counts (a 128-wide tile on 32 channels only wastes work)."""
    out = []
    for cfg in CONV_CONFIGS:
        if conv_config_excluded(cfg, elt_bytes, taps) is not None:
            continue
        if cfg.block_n > max(DOT_MIN, 2 * c_out):
            continue
        if not flat and cfg.block_k > max(DOT_MIN, 2 * c_in):
            continue
        out.append(cfg)
    if not out:  # the smallest valid config always runs
        out = [min((c for c in CONV_CONFIGS if conv_config_excluded(c, elt_bytes, taps) is None),
                   key=lambda c: c.block_m * c.block_n)]
    return out


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def flat_k(c_in: int, taps: int) -> bool:
    """Flattened (kh, kw, c) K for narrow inputs: per-tap chunks would be mostly padding."""
    return taps > 1 and c_in < DOT_MIN


# Asked on every untuned launch, and a pure function of small ints: ~6 us a call on the CPU
# here, a dict lookup cached.
@functools.lru_cache(maxsize=4096)
def default_conv_config(m: int, c_in: int, c_out: int, elt_bytes: int, taps: int,
                        flat: bool, sm_count: int) -> ConvConfig:
    """The untuned config for a problem of M output pixels: the first of DEFAULT_LADDER that
    is allowed (conv_config_excluded), no wider than the channels (BLOCK_N <= C_out, BLOCK_K
    <= C_in, each rounded up to a power of two and at least 16), and that makes at least
    2 * sm_count tiles (for an 8-warp tile, one block per SM, within its first three waves
    not a last wave under half full); else the allowed config that makes the most tiles.
    Where no ladder tile is that narrow (16 channels), the choice is among the autotuner's
    candidates for the problem (conv_configs_for), never a wider tile than the autotuner
    would try."""
    n_cap = max(DOT_MIN, _pow2_at_least(c_out))
    k_cap = max(DOT_MIN, _pow2_at_least(c_in))
    fits = [c for c in DEFAULT_LADDER
            if conv_config_excluded(c, elt_bytes, taps) is None and c.block_n <= n_cap
            and (flat or c.block_k <= k_cap)]
    if not fits:
        fits = sorted(conv_configs_for(elt_bytes, taps, c_in, c_out, flat),
                      key=lambda c: -c.block_m * c.block_n)
    tiles = lambda c: -(-m // c.block_m) * -(-c_out // c.block_n)
    for cfg in fits:
        t = tiles(cfg)
        if t < 2 * sm_count:
            continue
        # One block per SM: with few waves, a last one under half full idles most SMs for a
        # whole wave (400 tiles on 132 SMs: 24% of the time); with many, it costs little.
        if cfg.num_warps == 8 and t < 4 * sm_count and 0 < t % sm_count < sm_count // 2:
            continue
        return cfg
    return max(fits, key=tiles)


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
# Narrow tensors (CIFAR ResNets: 16 and 32 channels) get narrower, taller tiles of the same
# 2048 elements, rather than a 64-wide tile with most of its lanes masked off.
ELEMENTWISE_NARROW = (TileConfig(64, 32, 4), TileConfig(128, 16, 4))
INTERPRETER_ELEMENTWISE_CONFIG = TileConfig(64, 64, 4)


def elementwise_config(c: int) -> TileConfig:
    """The tile of the elementwise and reduction passes over a tensor of c channels."""
    for cfg in ELEMENTWISE_NARROW[::-1]:
        if c <= cfg.block_c:
            return cfg
    return ELEMENTWISE_CONFIG
FINALIZE_CONFIG = TileConfig(32, 64, 4)  # block_m here is tiles combined per step
# Adding up the backward's per-tile channel sums: block_m partial rows per step.
SUMS_CONFIG = TileConfig(64, 64, 4)
# Partials one finalize program merges; more than this many are merged in parallel groups
# first (a ResNet-50 layer-1 activation at batch 128 makes ~12,500 conv tiles of 32 rows).
FINALIZE_GROUP = 128
# Row tiles a reduction program folds into one partial: 1/8 of the partial bytes and of the
# finalize's work. The block-input statistics and the apply backward's channel sums take at
# least this many (reduction_sub_tiles).
STATS_SUB_TILES = 8
# Both reduce once per program whatever its row tiles, so on a GPU they take more tiles per
# program where the problem is large: up to this many.
MAX_SUB_TILES = 64
PROGRAMS_PER_SM = 4


def reduction_sub_tiles(m: int, block_m: int, c_blocks: int, sms: int | None) -> int:
    """Row tiles per program of a per-channel reduction over m rows (the apply backward's
    sums, the block-input statistics): STATS_SUB_TILES, doubled (up to MAX_SUB_TILES) while
    the grid keeps PROGRAMS_PER_SM programs per SM. Fewer partial rows shorten the walk over
    them that follows, one program per 64 channels: with 8 tiles per program ResNet-50's
    layer-1 backward at batch 128 left channel_sums_kernel ~1,600 rows to add up. sms=None
    (the interpreter, a CPU) keeps STATS_SUB_TILES."""
    sub = STATS_SUB_TILES
    if sms is None:
        return sub
    while (sub < MAX_SUB_TILES
           and -(-m // (block_m * sub * 2)) * c_blocks >= PROGRAMS_PER_SM * sms):
        sub *= 2
    return sub
