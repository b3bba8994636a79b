"""Ahead-of-time compile of every Triton kernel and autotune config for sm_80 and sm_90, on a
machine without a GPU (DESIGN.md §5 rung 3). It catches GPU-only compile errors (tl.dot block
minimums, layouts, shared memory) and reports each kernel's shared memory, registers and spills.

    python -m fused_res.triton.aot                 # every kernel x config x dtype, sm_80 + sm_90
    python -m fused_res.triton.aot --subset        # one config per kernel family (quick)
    python -m fused_res.triton.aot --json out.json # also write the table as JSON

Exit status 1 on any compile failure or a config over the device's shared memory. Registers
and stack (spill) bytes come from `cuobjdump -res-usage` on the cubin (the bundled one, or
$CUDA_HOME/bin), shared memory from the compiled kernel's metadata.
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
              "res_ptr", "bs_ptr", "y_ptr", "u_ptr", "st_mean_ptr", "st_m2_ptr", "st_cnt_ptr")
_F32_PTRS = {"ic_ptr", "ia_ptr", "ib_ptr", "oa_ptr", "ob_ptr", "bs_ptr", "st_mean_ptr",
             "st_m2_ptr", "st_cnt_ptr"}
# NHWC: the channel strides are 1 and the JIT would specialize them to constants.
_NHWC_UNIT_STRIDES = ("sxc", "syc", "src", "sc")

_CONV_FLAGS = dict(HAS_BIAS=False, HAS_IC=False, HAS_IA=False, HAS_IB=False, ACT_IN=False,
                   HAS_OA=False, HAS_OB=False, ACT_MID=False, HAS_RES=False, RES_SCALED=False,
                   HAS_BRANCH=False, ACT_OUT=False, STORE_U=False, PROLOGUE=False, STATS=False,
                   FLAT_K=False, INDEX_64=False)

# Representative specializations of the conv kernel (DESIGN.md §2): eval units with the whole
# tail, the train-mode stats conv with a BN+ReLU prologue, the 7x7 stem, a 1x1 projection.
CONV_VARIANTS = {
    "eval_3x3_tail": dict(KH=3, KW=3, HAS_BIAS=True, HAS_OA=True, HAS_OB=True, ACT_MID=True,
                          HAS_RES=True, RES_SCALED=True, HAS_BRANCH=True, ACT_OUT=True,
                          STORE_U=True),
    "train_3x3_prologue_stats": dict(KH=3, KW=3, HAS_IC=True, HAS_IA=True, HAS_IB=True,
                                     ACT_IN=True, PROLOGUE=True, STATS=True),
    "stem_7x7_flat_k": dict(KH=7, KW=7, FLAT_K=True, HAS_OA=True, HAS_OB=True, ACT_MID=True),
    "train_1x1_stats": dict(KH=1, KW=1, HAS_BIAS=True, STATS=True),
    "eval_3x3_tail_int64": dict(KH=3, KW=3, HAS_BIAS=True, HAS_OA=True, HAS_OB=True,
                                ACT_MID=True, HAS_RES=True, ACT_OUT=True, INDEX_64=True),
}

_EW_FLAGS = {
    "epilogue_fwd_kernel": dict(HAS_C=True, HAS_S=True, HAS_B=True, ACT_MID=True,
                                HAS_RES=True, RES_SCALED=True, HAS_BRANCH=True, ACT_OUT=True),
    "epilogue_bwd_kernel": dict(HAS_C=True, HAS_S=True, HAS_B=True, ACT_MID=True, ACT_OUT=True,
                                HAS_BRANCH=True, RES_SCALED=True, NEED_GT=True, NEED_GR=True,
                                NEED_SUM=True, NEED_SUM_T=True),
    "stats_partial_kernel": {},
    "stats_finalize_kernel": {},
    "stats_bwd_kernel": dict(HAS_GZ=True, HAS_GMEAN=True, HAS_GVAR=True),
}
# Pointers holding the (N, C, H, W) tensors of each elementwise kernel (the rest are float32).
_EW_MAPS = {"z_ptr", "res_ptr", "y_ptr", "gy_ptr", "t_ptr", "gt_ptr", "gr_ptr", "x_ptr",
            "gz_ptr", "out_ptr"}
_FLOAT_SCALARS = {"res_scale"}


def _signature(fn, dtype: str, maps: set, constexprs: dict):
    """(signature, attrs) for ASTSource: pointer dtypes, i32 ints, 16-divisible pointers."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in maps else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, attrs


def jobs(subset: bool = False, dtypes=DTYPES):
    """(kernel_fn, kernel name, variant, config name, dtype, constexprs, maps, options, or an
    exclusion reason) for everything the backend can launch on a GPU."""
    from . import conv, elementwise

    out = []
    dtypes = ("bf16",) if subset else dtypes
    for dtype in dtypes:
        elt = 4 if dtype == "fp32" else 2
        for variant, flags in CONV_VARIANTS.items():
            taps = flags["KH"] * flags["KW"]
            cfgs = configs.CONV_CONFIGS
            if subset:
                cfgs = [c for c in cfgs if configs.conv_config_excluded(c, elt, taps) is None][:1]
            for cfg in cfgs:
                reason = configs.conv_config_excluded(cfg, elt, taps)
                cx = {**_CONV_FLAGS, **flags, **cfg.meta, "GROUP_M": 8,
                      "DOT_PRECISION": "tf32" if dtype == "fp32" else "ieee"}
                cx.update({s: 1 for s in _NHWC_UNIT_STRIDES
                           if s in conv.conv_unit_kernel.arg_names})
                maps = set(_CONV_PTRS) - _F32_PTRS
                out.append((conv.conv_unit_kernel, "conv_unit_kernel", variant, str(cfg), dtype,
                            cx, maps, {"num_warps": cfg.num_warps,
                                       "num_stages": cfg.num_stages}, reason))
        for name, flags in _EW_FLAGS.items():
            fn = getattr(elementwise, name)
            cfg = (configs.FINALIZE_CONFIG if name == "stats_finalize_kernel"
                   else configs.ELEMENTWISE_CONFIG)
            blocks = ({"BLOCK_T": cfg.block_m, "BLOCK_C": cfg.block_c}
                      if name == "stats_finalize_kernel"
                      else {"BLOCK_M": cfg.block_m, "BLOCK_C": cfg.block_c})
            cx = {**flags, **blocks}
            if name != "stats_finalize_kernel":
                cx["INDEX_64"] = False
            cx.update({s: 1 for s in _NHWC_UNIT_STRIDES if s in fn.arg_names})
            if name == "stats_finalize_kernel" and dtype != dtypes[0]:
                continue  # float32 partials whatever the tensors' dtype: compile it once
            out.append((fn, name, "all_flags", str(cfg), dtype, cx, _EW_MAPS,
                        {"num_warps": cfg.num_warps, "num_stages": 1}, None))
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


def compile_one(job, sm: int, tool: str | None) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, name, variant, cfg_name, dtype, cx, maps, options, reason = job
    res = Result(name, variant, cfg_name, dtype, sm, ok=True)
    if reason is not None:
        res.error = f"excluded: {reason}"
        return res
    sig, attrs = _signature(fn, dtype, maps, cx)
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn, sig, constexprs=cx, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", sm, 32), options=options)
        res.shared = int(k.metadata.shared)
        usage = _res_usage(k.asm["cubin"], tool)
        res.regs, res.stack, res.local = usage.get("REG"), usage.get("STACK"), usage.get("LOCAL")
        if res.shared > SMEM_LIMIT[sm]:
            res.ok = False
            res.error = f"shared memory {res.shared} > {SMEM_LIMIT[sm]}"
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
        for sm in archs:
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
