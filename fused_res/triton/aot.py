"""Ahead-of-time compile of every Triton kernel and autotune config for sm_80 and sm_90, on a
machine without a GPU (DESIGN.md §5 rung 3). It catches GPU-only compile errors (tl.dot block
minimums, layouts, shared memory) and reports each kernel's shared memory, registers and spills.

    python -m fused_res.triton.aot                 # every kernel x config x dtype, sm_80 + sm_90
    python -m fused_res.triton.aot --subset        # one config per kernel family (quick)
    python -m fused_res.triton.aot --json out.json # also write the table as JSON

Exit status 1 on any compile failure, a config over the device's shared memory, or a conv
whose K loop the compiler did not software-pipeline (too little shared memory for its
stages). Registers and stack (spill) bytes come from `cuobjdump -res-usage` on the cubin
(the bundled one, or $CUDA_HOME/bin), shared memory from the compiled kernel's metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from . import configs

ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in maximum per block
DTYPES = ("bf16", "fp16", "fp32")


@dataclass
class Result:
    kernel: str
    variant: str
    config: str
    dtype: str
    sm: int
    ok: bool
    shared: int | None = None
    regs: int | None = None
    stack: int | None = None  # per-thread stack frame: register spills land here
    local: int | None = None
    seconds: float = 0.0
    error: str = ""


# ---- what to compile ----------------------------------------------------------------------

# The conv kernel's runtime arguments and their types; pointers take the compute dtype
# except the float32 vectors and statistics.
_CONV_PTRS = ("x_ptr", "w_ptr", "bias_ptr", "ic_ptr", "ia_ptr", "ib_ptr", "oa_ptr", "ob_ptr",
              "res_ptr", "bs_ptr", "y_ptr", "u_ptr", "st_mean_ptr", "st_lo_ptr", "st_m2_ptr",
              "st_cnt_ptr")
_F32_PTRS = {"ic_ptr", "ia_ptr", "ib_ptr", "oa_ptr", "ob_ptr", "bs_ptr", "st_mean_ptr",
             "st_lo_ptr", "st_m2_ptr", "st_cnt_ptr"}
# Each variant compiles for one representative ResNet-50 problem (N, C_in, H, W, C_out, k,
# stride, pad), channels_last, so that its integer arguments specialise exactly as the JIT
# specialises them at that shape: == 1 becomes a constant, a multiple of 16 is marked
# divisible. Without that, the NHWC rows look unaligned, no load can be vectorised or made
# asynchronous, nothing is pipelined, and the register report describes a kernel the GPU never
# runs (the first version of this tool reported spills in 128x128 tiles for that reason).
_CONV_FLAGS = dict(HAS_BIAS=False, HAS_IC=False, HAS_IA=False, HAS_IB=False, ACT_IN=False,
                   HAS_OA=False, HAS_OB=False, ACT_MID=False, HAS_RES=False, RES_SCALED=False,
                   HAS_BRANCH=False, ACT_OUT=False, STORE_U=False, PROLOGUE=False, STATS=False,
                   FLAT_K=False, INDEX_64=False, B_TMA=False, w_desc=None)

# The TMA conv takes a real weight descriptor.
_TMA_FLAGS = {k: v for k, v in _CONV_FLAGS.items() if k != "w_desc"}

# Representative specializations of the conv kernel (DESIGN.md §2): eval units with the whole
# tail, the train-mode stats conv with a BN+ReLU prologue and without, the 7x7 stem, a 1x1
# projection.
CONV_VARIANTS = {
    "eval_3x3_tail": dict(KH=3, KW=3, HAS_BIAS=True, HAS_OA=True, HAS_OB=True, ACT_MID=True,
                          HAS_RES=True, RES_SCALED=True, HAS_BRANCH=True, ACT_OUT=True,
                          STORE_U=True),
    "train_3x3_prologue_stats": dict(KH=3, KW=3, HAS_IC=True, HAS_IA=True, HAS_IB=True,
                                     ACT_IN=True, PROLOGUE=True, STATS=True),
    "stem_7x7_flat_k": dict(KH=7, KW=7, FLAT_K=True, HAS_OA=True, HAS_OB=True, ACT_MID=True),
    "train_1x1_stats": dict(KH=1, KW=1, HAS_BIAS=True, STATS=True),
    # the 3x3 conv of a training block with its input BN + ReLU in a pass of its own (the
    # default since run 5; the variant above is fused-triton-prologue's)
    "train_3x3_stats": dict(KH=3, KW=3, STATS=True),
    "eval_1x1_s2_tail": dict(KH=1, KW=1, HAS_BIAS=True, HAS_OB=True, ACT_MID=True),
    "eval_3x3_tail_int64": dict(KH=3, KW=3, HAS_BIAS=True, HAS_OA=True, HAS_OB=True,
                                ACT_MID=True, HAS_RES=True, ACT_OUT=True, INDEX_64=True),
}
# The TMA conv (1x1, stride 1, no prologue; sm_90): eval's bottleneck conv3 with the block's
# whole tail, and the train conv with its statistics, as the backend's default runs it.
TMA_VARIANTS = {
    "eval_1x1_tail": dict(KH=1, KW=1, HAS_BIAS=True, HAS_OA=True, HAS_OB=True, ACT_MID=True,
                          HAS_RES=True, ACT_OUT=True, STORE_U=True),
    "train_1x1_stats": dict(KH=1, KW=1, HAS_BIAS=True, STATS=True),
}
# tma_b tiles (the weight by TMA) for every conv variant but the stem's flattened K, which
# gathers its weight rows.
TMA_B_VARIANTS = {k: v for k, v in CONV_VARIANTS.items() if not v.get("FLAT_K")}
CONV_PROBLEMS = {  # (N, C_in, H, W, C_out, k, stride, pad)
    "eval_3x3_tail": (64, 64, 56, 56, 64, 3, 1, 1),
    "train_3x3_prologue_stats": (64, 128, 56, 56, 128, 3, 2, 1),
    "stem_7x7_flat_k": (64, 3, 224, 224, 64, 7, 2, 3),
    "train_1x1_stats": (64, 256, 56, 56, 64, 1, 1, 0),
    "train_3x3_stats": (64, 128, 56, 56, 128, 3, 2, 1),
    "eval_1x1_s2_tail": (64, 512, 28, 28, 1024, 1, 2, 0),
    "eval_3x3_tail_int64": (512, 64, 256, 256, 64, 3, 1, 1),
    "eval_1x1_tail": (64, 512, 7, 7, 2048, 1, 1, 0),
}


def conv_int_args(problem) -> dict:
    """The conv kernel's integer arguments for a channels_last problem, as conv_launch
    passes them."""
    n, c_in, h, w, c_out, k, stride, pad = problem
    from .conv import out_hw
    oh, ow = out_hw(h, w, k, k, (stride, stride), (pad, pad))
    x_strides = (h * w * c_in, 1, w * c_in, c_in)
    y_strides = (oh * ow * c_out, 1, ow * c_out, c_out)
    return dict(M=n * oh * ow, C_in=c_in, H=h, W=w, C_out=c_out, OH=oh, OW=ow,
                **dict(zip(("sxn", "sxc", "sxh", "sxw"), x_strides, strict=True)),
                **dict(zip(("syn", "syc", "syh", "syw"), y_strides, strict=True)),
                **dict(zip(("srn", "src", "srh", "srw"), y_strides, strict=True)),
                stride_h=stride, stride_w=stride, pad_h=pad, pad_w=pad)


# The pair kernel (a block's last conv and its 1x1 projection shortcut, inference): the last
# conv's problem as above, then the shortcut's input (C2, H2, W2) and stride.
_PAIR_PTRS = ("x_ptr", "w_ptr", "x2_ptr", "w2_ptr", "y_ptr")  # the rest: float32 biases
PAIR_VARIANTS = {
    "basic_3x3_s2": dict(KH=3, KW=3, HAS_BIAS=True, HAS_BIAS2=True, ACT_OUT=True),
    "bottleneck_1x1_s2": dict(KH=1, KW=1, HAS_BIAS=True, HAS_BIAS2=True, ACT_OUT=True),
    "bottleneck_1x1_int64": dict(KH=1, KW=1, HAS_BIAS=True, HAS_BIAS2=True, ACT_OUT=True,
                                 INDEX_64=True),
}
PAIR_PROBLEMS = {  # (N, C_in, H, W, C_out, k, stride, pad, C2, H2, W2, stride2)
    "basic_3x3_s2": (64, 128, 28, 28, 128, 3, 1, 1, 64, 56, 56, 2),
    "bottleneck_1x1_s2": (64, 128, 28, 28, 512, 1, 1, 0, 256, 56, 56, 2),
    "bottleneck_1x1_int64": (256, 64, 128, 128, 256, 1, 1, 0, 128, 256, 256, 2),
}


def pair_int_args(problem) -> dict:
    """The pair kernel's integer arguments for a channels_last problem, as conv_pair_launch
    passes them."""
    *conv, c2, h2, w2, stride2 = problem
    a = conv_int_args(conv)
    return dict(M=a["M"], C_in=a["C_in"], H=a["H"], W=a["W"], C_out=a["C_out"], OH=a["OH"],
                OW=a["OW"], C2=c2, H2=h2, W2=w2,
                **{k: a[k] for k in ("sxn", "sxc", "sxh", "sxw", "syn", "syc", "syh", "syw",
                                     "stride_h", "stride_w", "pad_h", "pad_w")},
                s2n=h2 * w2 * c2, s2c=1, s2h=w2 * c2, s2w=c2, stride2_h=stride2,
                stride2_w=stride2)


# The elementwise kernels at ResNet-50's (64, 256, 56, 56) activation, channels_last.
EW_INT_ARGS = dict(M=64 * 56 * 56, C=256, HW=56 * 56, W=56, sn=56 * 56 * 256, sc=1,
                   sh=56 * 256, sw=256, T=64 * 56 * 56 // configs.ELEMENTWISE_CONFIG.block_m,
                   GROUP=configs.FINALIZE_GROUP, sub=configs.MAX_SUB_TILES)


def jit_int_specialization(value: int) -> tuple[str, object]:
    """How Triton's JIT specialises an int argument: ("constexpr", 1) for 1, ("i32", "D")
    for a multiple of 16 (divisibility 16), ("i32", "") otherwise. Asks Triton itself where
    its native specializer is importable."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        return tuple(native_specialize_impl(BaseBackend, value, False, True, True))
    except (ImportError, AttributeError, TypeError):
        if value == 1:
            return ("constexpr", 1)
        return ("i32", "D" if value % 16 == 0 else "")


_EW_VARIANTS = (  # (kernel, variant, flags)
    ("epilogue_fwd_kernel", "all_flags",
     dict(HAS_C=True, HAS_S=True, HAS_B=True, ACT_MID=True, HAS_RES=True, RES_SCALED=True,
          HAS_BRANCH=True, ACT_OUT=True)),
    ("epilogue_bwd_kernel", "all_flags",
     dict(HAS_C=True, HAS_S=True, HAS_B=True, ACT_MID=True, ACT_OUT=True, HAS_BRANCH=True,
          RES_SCALED=True, NEED_GT=True, NEED_GR=True, NEED_SUM=True, NEED_SUM_T=True,
          SUMS_HERE=True, NEED_GC=True, FENCE=True, BN_BWD=False, HAS_W=False,
          NEED_GV=False, NEED_GW=False)),
    ("epilogue_bwd_kernel", "bn_bwd",
     dict(HAS_C=True, HAS_S=True, HAS_B=True, ACT_MID=True, ACT_OUT=True, HAS_BRANCH=True,
          RES_SCALED=True, NEED_GT=True, NEED_GR=True, NEED_SUM=True, NEED_SUM_T=True,
          SUMS_HERE=True, NEED_GC=True, FENCE=True, BN_BWD=True, HAS_W=True, NEED_GV=True,
          NEED_GW=True)),
    ("epilogue_bwd_kernel", "sums_apart",
     dict(HAS_C=True, HAS_S=True, HAS_B=True, ACT_MID=True, ACT_OUT=True, HAS_BRANCH=True,
          RES_SCALED=True, NEED_GT=True, NEED_GR=True, NEED_SUM=True, NEED_SUM_T=True,
          SUMS_HERE=False, NEED_GC=False, FENCE=True, BN_BWD=False, HAS_W=False,
          NEED_GV=False, NEED_GW=False)),
    ("stats_partial_kernel", "all_flags", {}),
    ("stats_finalize_kernel", "group", dict(FINAL=False, BN=False, HAS_W=False,
                                            HAS_NBT=False)),
    ("stats_finalize_kernel", "final", dict(FINAL=True, BN=False, HAS_W=False, HAS_NBT=False)),
    ("stats_finalize_kernel", "final_bn", dict(FINAL=True, BN=True, HAS_W=True, HAS_NBT=True)),
    ("stats_bwd_kernel", "all_flags", dict(HAS_GZ=True, HAS_GMEAN=True, HAS_GVAR=True)),
    ("channel_sums_kernel", "all_flags", dict(HAS_SUM=True, HAS_SUM_T=True, NEED_GC=True,
                                              HAS_S=True)),
)
# Kernels over float32 per-channel partials, whatever the tensors' dtype: compiled once, with
# their own tile (block_m: partial rows per step).
_PARTIALS_TILES = {"stats_finalize_kernel": configs.FINALIZE_CONFIG,
                   "channel_sums_kernel": configs.SUMS_CONFIG}
# Pointers holding the (N, C, H, W) tensors of each elementwise kernel (the rest are float32).
_EW_MAPS = {"z_ptr", "res_ptr", "y_ptr", "gy_ptr", "t_ptr", "gt_ptr", "gr_ptr", "x_ptr",
            "gz_ptr", "out_ptr"}
_FLOAT_SCALARS = {"res_scale", "eps", "momentum", "unbias"}
_I64_PTRS = {"nbt_ptr"}  # BatchNorm's num_batches_tracked
_I32_PTRS = {"cnt_ptr"}  # arrival counts (last_to_arrive)

# The BatchNorm per-channel kernels (float32 vectors whatever the tensors' dtype: compiled
# once), at ResNet-50's widest BatchNorm.
_BN_VARIANTS = (  # (kernel, variant, flags)
    ("bn_scale_kernel", "weighted", dict(HAS_W=True)),
    ("bn_scale_bwd_kernel", "all_flags", dict(HAS_W=True, NEED_V=True, NEED_W=True)),
    ("bn_running_kernel", "momentum", dict(HAS_NBT=True, MOMENTUM_NONE=False, UPDATE=True,
                                           HAS_SCALE=False, HAS_W=False)),
    ("bn_running_kernel", "cumulative", dict(HAS_NBT=True, MOMENTUM_NONE=True, UPDATE=True,
                                             HAS_SCALE=False, HAS_W=False)),
    ("bn_running_kernel", "with_scale", dict(HAS_NBT=True, MOMENTUM_NONE=False, UPDATE=True,
                                             HAS_SCALE=True, HAS_W=True)),
)
BN_INT_ARGS = dict(C=2048)
# The TMA conv's descriptors: the constexprs that give their block shapes.
_DESC_BLOCKS = {"x_desc": ("BLOCK_M", "BLOCK_K"), "w_desc": ("BLOCK_K", "BLOCK_N")}
_BN_MAPS = {"w_ptr", "gw_ptr", "rm_ptr", "rv_ptr"}


def _signature(fn, dtype: str, maps: set, constexprs: dict, ints: dict):
    """(signature, attrs, constexprs) for ASTSource: pointer dtypes (16-byte aligned, as
    torch's allocations are), int arguments specialised as the JIT would for the values in
    `ints` (plain i32 where absent)."""
    sig, attrs, cx = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            sig[name] = "constexpr"
        elif name in _DESC_BLOCKS:
            rows, cols = (cx[b] for b in _DESC_BLOCKS[name])
            sig[name] = f"tensordesc<{dtype}[{rows}, {cols}]>"
        elif name.endswith("_ptr"):
            sig[name] = (f"*{dtype}" if name in maps else "*i64" if name in _I64_PTRS
                         else "*i32" if name in _I32_PTRS else "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name in ints:
            kind, key = jit_int_specialization(ints[name])
            if kind == "constexpr":
                sig[name] = "constexpr"
                cx[name] = key
            else:
                sig[name] = kind
                if key == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
    return sig, attrs, cx


@dataclass
class Job:
    """One compile: a kernel, its constexprs for one variant and config, one dtype."""

    fn: object
    kernel: str
    variant: str
    config: str
    dtype: str
    constexprs: dict
    maps: set  # pointers to the (N, C, H, W) tensors (the compute dtype; the rest float32)
    ints: dict  # representative integer arguments, specialised as the JIT would
    options: dict
    excluded: str | None = None
    # Bytes of one pipeline stage (the A and B tiles) where the K loop must be software-
    # pipelined, or 0 where that is not required (the gathered 7x7 stem, elementwise kernels).
    stage_bytes: int = 0
    archs: tuple = ARCHS  # the GPUs it can run on (TMA kernels: sm_90 only)


def _gemm_jobs(fn, variants: dict, base_flags: dict, maps: set, int_args, dtype: str,
               subset: bool, cfgs=configs.CONV_CONFIGS, archs=ARCHS) -> list[Job]:
    """The implicit-GEMM kernels' jobs: every variant x config (one where subset). Flags the
    kernel does not take (the TMA conv has no taps, padding or prologue) are dropped."""
    elt = 4 if dtype == "fp32" else 2
    out = []
    for variant, flags in variants.items():
        taps = flags["KH"] * flags["KW"]
        todo = cfgs
        if subset:
            todo = [c for c in cfgs if configs.conv_config_excluded(c, elt, taps) is None][:1]
        for cfg in todo:
            cx = {**base_flags, **flags, **cfg.meta, "GROUP_M": 8,
                  "DOT_PRECISION": "tf32" if dtype == "fp32" else "ieee"}
            cx = {k: v for k, v in cx.items() if k in fn.arg_names}
            out.append(Job(fn, fn.__name__, variant, str(cfg), dtype, cx, maps,
                           int_args(variant),
                           {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                           configs.conv_config_excluded(cfg, elt, taps),
                           0 if flags.get("FLAT_K") else
                           (cfg.block_m + cfg.block_n) * cfg.block_k * elt, archs))
    return out


def jobs(subset: bool = False, dtypes=DTYPES) -> list[Job]:
    """Everything the backend can launch on a GPU, each with the reason it is excluded (if
    it is)."""
    from . import batchnorm, conv, conv_pair, conv_tma, elementwise

    out = []
    dtypes = ("bf16",) if subset else dtypes
    for dtype in dtypes:
        out += _gemm_jobs(conv.conv_unit_kernel, CONV_VARIANTS, _CONV_FLAGS,
                          set(_CONV_PTRS) - _F32_PTRS,
                          lambda v: conv_int_args(CONV_PROBLEMS[v]), dtype, subset)
        out += _gemm_jobs(conv_pair.conv_pair_kernel, PAIR_VARIANTS, {"INDEX_64": False},
                          set(_PAIR_PTRS), lambda v: pair_int_args(PAIR_PROBLEMS[v]), dtype,
                          subset)
        # The TMA kernels, sm_90 only: the implicit-GEMM kernel with TMA weight tiles (its
        # non-stem variants), then the 1x1 TMA conv.
        out += _gemm_jobs(conv.conv_unit_kernel, TMA_B_VARIANTS, {**_TMA_FLAGS, "B_TMA": True},
                          set(_CONV_PTRS) - _F32_PTRS,
                          lambda v: conv_int_args(CONV_PROBLEMS[v]), dtype, subset,
                          cfgs=configs.TMA_B_RUNNABLE, archs=(90,))
        out += _gemm_jobs(conv_tma.conv1x1_tma_kernel, TMA_VARIANTS, _TMA_FLAGS,
                          set(_CONV_PTRS) - _F32_PTRS,
                          lambda v: conv_int_args(CONV_PROBLEMS[v]), dtype, subset,
                          cfgs=configs.TMA_RUNNABLE, archs=(90,))
        for name, variant, flags in _EW_VARIANTS:
            fn = getattr(elementwise, name)
            if name in _PARTIALS_TILES:
                if dtype != dtypes[0]:
                    continue  # float32 partials whatever the tensors' dtype: compile it once
                tiles = [_PARTIALS_TILES[name]]
            else:
                tiles = [configs.ELEMENTWISE_CONFIG, *configs.ELEMENTWISE_NARROW]
                tiles = tiles[:1] if subset else tiles
            for cfg in tiles:
                blocks = ({"BLOCK_T": cfg.block_m, "BLOCK_C": cfg.block_c}
                          if name in _PARTIALS_TILES
                          else {"BLOCK_M": cfg.block_m, "BLOCK_C": cfg.block_c,
                                "INDEX_64": False})
                out.append(Job(fn, name, variant, str(cfg), dtype, {**flags, **blocks},
                               _EW_MAPS, EW_INT_ARGS,
                               {"num_warps": cfg.num_warps, "num_stages": 1}))
        # The weight and the running statistics take the model's dtype (model.half()).
        for name, variant, flags in _BN_VARIANTS:
            out.append(Job(getattr(batchnorm, name), name, variant, f"b{batchnorm.BLOCK}_w4",
                           dtype, {**flags, "BLOCK": batchnorm.BLOCK}, _BN_MAPS, BN_INT_ARGS,
                           {"num_warps": 4, "num_stages": 1}))
    return out


# ---- compiling and inspecting -------------------------------------------------------------

def _cuobjdump() -> str | None:
    here = os.path.dirname(__import__("triton").__file__)
    for cand in (os.path.join(here, "backends", "nvidia", "bin", "cuobjdump"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                              "cuobjdump"), shutil.which("cuobjdump")):
        if cand and os.path.exists(cand):
            return cand
    return None


def _res_usage(cubin: bytes, tool: str | None) -> dict:
    """REG / STACK / LOCAL from `cuobjdump -res-usage`."""
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                              check=False).stdout
    finally:
        os.unlink(path)
    out = {}
    for key in ("REG", "STACK", "LOCAL", "SHARED"):
        m = re.search(rf"\b{key}:(\d+)", text)
        if m:
            out[key] = int(m.group(1))
    return out


def compile_one(job: Job, sm: int, tool: str | None) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(job.kernel, job.variant, job.config, job.dtype, sm, ok=True)
    if job.excluded is not None:
        res.error = f"excluded: {job.excluded}"
        return res
    sig, attrs, cx = _signature(job.fn, job.dtype, job.maps, job.constexprs, job.ints)
    t0 = time.perf_counter()
    try:
        src = ASTSource(job.fn, sig, constexprs=cx, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", sm, 32), options=job.options)
        res.shared = int(k.metadata.shared)
        usage = _res_usage(k.asm["cubin"], tool)
        res.regs, res.stack, res.local = usage.get("REG"), usage.get("STACK"), usage.get("LOCAL")
        stages = job.options.get("num_stages", 1)
        if res.shared > SMEM_LIMIT[sm]:
            res.ok = False
            res.error = f"shared memory {res.shared} > {SMEM_LIMIT[sm]}"
        elif job.stage_bytes and stages > 1 and res.shared < (stages - 1) * job.stage_bytes:
            # Triton multi-buffers a pipelined loop's tiles (num_stages - 1 buffers on sm_80,
            # num_stages on sm_90). Less shared memory than that means the loads were not made
            # asynchronous (unvectorisable, e.g. unaligned addresses) and the conv would wait
            # on every load: the regression this check exists to catch.
            res.ok = False
            res.error = (f"K loop not software-pipelined: {res.shared} bytes of shared memory "
                         f"< {stages - 1} stages x {job.stage_bytes}")
    except Exception as e:  # noqa: BLE001 - every failure is reported, none is fatal here
        res.ok = False
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
    res.seconds = time.perf_counter() - t0
    return res


def run(subset: bool = False, archs=ARCHS, log=print, dtypes=DTYPES) -> list[Result]:
    """Compile every job for every arch; returns the results (failures have ok=False)."""
    tool = _cuobjdump()
    results = []
    for job in jobs(subset, dtypes):
        for sm in (a for a in archs if a in job.archs):
            r = compile_one(job, sm, tool)
            results.append(r)
            log(_row(r))
    return results


_HEAD = (f"{'kernel':<22} {'variant':<26} {'config':<20} {'dtype':<5} {'sm':>3} "
         f"{'smem':>7} {'regs':>5} {'stack':>6} {'s':>6}  status")


def _row(r: Result) -> str:
    f = lambda v: "-" if v is None else str(v)
    status = "ok" if r.ok and not r.error else (r.error if r.ok else f"FAIL {r.error}")
    return (f"{r.kernel:<22} {r.variant:<26} {r.config:<20} {r.dtype:<5} {r.sm:>3} "
            f"{f(r.shared):>7} {f(r.regs):>5} {f(r.stack):>6} {r.seconds:>6.1f}  {status}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_res.triton.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subset", action="store_true", help="one config per kernel, bf16 only")
    p.add_argument("--arch", type=int, action="append", choices=ARCHS,
                   help="compile for this sm only (repeatable; default: 80 and 90)")
    p.add_argument("--dtype", action="append", choices=DTYPES,
                   help="compile for this dtype only (repeatable; default: all)")
    p.add_argument("--json", help="write the results as JSON here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: kernels would be interpreted, not compiled; unset it",
              file=sys.stderr)
        return 2
    print(_HEAD, flush=True)
    results = run(args.subset, tuple(args.arch or ARCHS), log=lambda s: print(s, flush=True),
                  dtypes=tuple(args.dtype or DTYPES))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    failed = [r for r in results if not r.ok]
    compiled = [r for r in results if r.ok and not r.error]
    spilled = [r for r in compiled if r.stack]
    print(f"\n{len(compiled)} compiled, {len(results) - len(compiled) - len(failed)} excluded, "
          f"{len(failed)} failed; {len(spilled)} with a stack frame (spills)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
