"""Implicit-GEMM conv2d on any-strided (NHWC fastest) tensors with the conv unit fused around it.

GEMM view: M = N·OH·OW output pixels, N = C_out, K = KH·KW·C_in. Each program computes a
BLOCK_M x BLOCK_N tile of the output, loading its A operand straight from the input feature map
(no im2col buffer) and the B operand from the weight laid out as (KH, KW, C_in, C_out).

- prologue: the loaded input goes through (x - c) * a + b and ReLU, and positions outside the
  image (zero padding) are zeroed AFTER that, so padding holds zeros of the activated tensor;
- epilogue (unit): + bias, folded affine, act_mid, x branch_scale[n], + λ·residual, act_out,
  cast, store (and store u = the pre-act_mid value when the backward needs it);
- epilogue (stats): + bias, store z, and per-tile channel mean and M2 (sum of squared
  deviations from the tile mean) of the stored z. Tile statistics are combined with Chan's
  parallel formula by a finalize kernel: no second pass over z and no Σz² − (Σz)²/n
  cancellation in float32.

Two K orders: (kh, kw, C_in chunk) in one loop, BLOCK_K channels at a time (contiguous NHWC
loads), or, for few input channels (the 3-channel stem), one flattened K = (kh, kw, c)
gathered BLOCK_K at a time so a 7x7x3 stem does not pad every tap to 16 channels.
"""

from __future__ import annotations

import inspect
import os
import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import configs
from .common import channel_affine, relu, unit_tail
from .launch import bind, launch, on_device

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def _load_a(x_ptr, row_off, row_ok, offs_k, mask_k, ci, dh, dw, ih0, iw0, H, W, sxc, sxh, sxw,
            ic_ptr, ia_ptr, ib_ptr, HAS_IC: tl.constexpr, HAS_IA: tl.constexpr,
            HAS_IB: tl.constexpr, ACT_IN: tl.constexpr, PROLOGUE: tl.constexpr,
            FLAT_K: tl.constexpr):
    """The [BM, BK] A tile: input values after the prologue, zero outside the image."""
    if FLAT_K:
        ih = ih0[:, None] + dh[None, :]
        iw = iw0[:, None] + dw[None, :]
        valid = (row_ok[:, None] & mask_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0)
                 & (iw < W))
        ptrs = x_ptr + (row_off[:, None] + ci.to(row_off.dtype)[None, :] * sxc + ih * sxh
                        + iw * sxw)
    else:
        valid = row_ok[:, None] & mask_k[None, :]
        ptrs = x_ptr + (row_off[:, None] + ci.to(row_off.dtype)[None, :] * sxc)
    a = tl.load(ptrs, mask=valid, other=0.0)
    if PROLOGUE:
        q = channel_affine(a.to(tl.float32), ci, mask_k, ic_ptr, ia_ptr, ib_ptr, HAS_IC, HAS_IA,
                           HAS_IB)
        if ACT_IN:
            q = relu(q)
        # Padding is applied to the activated tensor: zero wherever the load was masked.
        a = tl.where(valid, q, 0.0).to(x_ptr.dtype.element_ty)
    return a


@triton.jit
def _tile_coords(M, C_out, OH, OW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr, INDEX_64: tl.constexpr):
    """This program's output tile: its row- and channel-tile indices, the rows (output
    pixels, as n, oh, ow) and channels it covers, and their masks."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_out, BLOCK_N)
    # Grouped order: GROUP_M row tiles share their input rows in L2 across channel tiles.
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    # 64-bit index math when a tensor spans 2^31 elements (big batches of big images); int32
    # otherwise, because [BLOCK_M, BLOCK_N] int64 offsets double the epilogue's registers.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if INDEX_64:
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < C_out
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    n_idx = t // OH
    return pid_m, pid_n, offs_m, offs_n, mask_m, mask_n, n_idx, oh, ow


@triton.jit
def _tap_loop(acc, x_ptr, w_ptr, n_idx, ih0, iw0, mask_m, offs_n, mask_n, C_in, H, W, C_out,
              sxn, sxc, sxh, sxw, ic_ptr, ia_ptr, ib_ptr, KH: tl.constexpr, KW: tl.constexpr,
              HAS_IC: tl.constexpr, HAS_IA: tl.constexpr, HAS_IB: tl.constexpr,
              ACT_IN: tl.constexpr, PROLOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_K: tl.constexpr, w_desc, n0, B_TMA: tl.constexpr):
    """acc += the conv of x (taps KH x KW, channels BLOCK_K at a time) with w (KH*KW*C_in,
    C_out) for this tile's output pixels, whose top-left input position is (ih0, iw0).
    B_TMA: the weight tile comes through w_desc (a tensor descriptor over w, block
    (BLOCK_K, BLOCK_N)) at column n0; the launcher admits it only where BLOCK_K divides C_in,
    so that no chunk reads past its tap's rows.
    One loop over (tap, channel chunk) rather than a loop per tap: Triton software-pipelines
    the innermost loop only, and a per-tap loop of C_in / BLOCK_K iterations (1 or 2 for
    64-channel 3x3 convs) would drain the pipeline at every tap."""
    k_chunks = tl.cdiv(C_in, BLOCK_K)
    for kk in range(0, KH * KW * k_chunks):
        tap = kk // k_chunks
        c0 = (kk - tap * k_chunks) * BLOCK_K
        ih = ih0 + tap // KW
        iw = iw0 + tap % KW
        row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        row_off = n_idx * sxn + ih * sxh + iw * sxw
        offs_k = c0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C_in
        a = _load_a(x_ptr, row_off, row_ok, offs_k, mask_k, offs_k, 0, 0, ih0, iw0, H, W,
                    sxc, sxh, sxw, ic_ptr, ia_ptr, ib_ptr, HAS_IC, HAS_IA, HAS_IB, ACT_IN,
                    PROLOGUE, False)
        if B_TMA:
            b = w_desc.load([tap * C_in + c0, n0])
        else:
            b = tl.load(w_ptr + (tap * C_in + offs_k)[:, None] * C_out + offs_n[None, :],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _conv_epilogue(acc, pid_m, offs_m, offs_n, mask_m, mask_n, n_idx, oh, ow, bias_ptr, oa_ptr,
                   ob_ptr, res_ptr, bs_ptr, y_ptr, u_ptr, st_mean_ptr, st_lo_ptr, st_m2_ptr,
                   st_cnt_ptr, C_out, syn, syc, syh, syw, srn, src, srh, srw, res_scale,
                   HAS_BIAS: tl.constexpr, HAS_OA: tl.constexpr, HAS_OB: tl.constexpr,
                   ACT_MID: tl.constexpr, HAS_RES: tl.constexpr, RES_SCALED: tl.constexpr,
                   HAS_BRANCH: tl.constexpr, ACT_OUT: tl.constexpr, STORE_U: tl.constexpr,
                   STATS: tl.constexpr):
    """Everything after the K loop, for the [BLOCK_M, BLOCK_N] fp32 accumulator: + bias, then
    either z with its per-tile statistics (STATS) or the unit's tail (affine, act_mid,
    branch scale, residual, act_out; u where STORE_U), cast and stored."""
    offs_n_ix = offs_n.to(offs_m.dtype)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask2 = mask_m[:, None] & mask_n[None, :]
    out_off = (n_idx[:, None] * syn + oh[:, None] * syh + ow[:, None] * syw
               + offs_n_ix[None, :] * syc)
    out_ty = y_ptr.dtype.element_ty
    if STATS:
        z = acc.to(out_ty)
        tl.store(y_ptr + out_off, z, mask=mask2)
        # Statistics of the stored z (as BatchNorm sees it), about the tile's own mean.
        zf = tl.where(mask2, z.to(tl.float32), 0.0)
        cnt = tl.sum(mask_m.to(tl.float32), axis=0)
        inv = 1.0 / tl.maximum(cnt, 1.0)
        t_mean = tl.sum(zf, axis=0) * inv
        dev = tl.where(mask2, zf - t_mean[None, :], 0.0)
        # t_mean is a float32 sum's rounding, some ulp of |mean| off, and the finalize weighs
        # each tile's mean against the others': at |mean| = 3000 std that rounding cost 1e-4
        # of the variance. Σ dev / n is what it lost (z - t_mean is exact near |mean|, where
        # it matters), kept beside it: the pair holds the tile mean to ~eps·std.
        t_lo = tl.sum(dev, axis=0) * inv
        t_m2 = tl.sum(dev * dev, axis=0) - cnt * t_lo * t_lo
        # ≥ 0 in exact arithmetic; a rounding below 0 (a constant channel) must not reach a
        # variance. tl.where, not tl.maximum, so that NaN stays NaN.
        t_m2 = tl.where(t_m2 < 0.0, 0.0, t_m2)
        st_off = pid_m.to(tl.int64) * C_out + offs_n
        tl.store(st_mean_ptr + st_off, t_mean, mask=mask_n)
        tl.store(st_lo_ptr + st_off, t_lo, mask=mask_n)
        tl.store(st_m2_ptr + st_off, t_m2, mask=mask_n)
        tl.store(st_cnt_ptr + pid_m, cnt)
    else:
        u = channel_affine(acc, offs_n, mask_n, oa_ptr, oa_ptr, ob_ptr, False, HAS_OA, HAS_OB)
        if STORE_U:
            tl.store(u_ptr + out_off, u.to(out_ty), mask=mask2)
        r_off = (n_idx[:, None] * srn + oh[:, None] * srh + ow[:, None] * srw
                 + offs_n_ix[None, :] * src)
        y = unit_tail(u, n_idx, mask_m, res_ptr + r_off, mask2, bs_ptr, res_scale, ACT_MID,
                      HAS_BRANCH, HAS_RES, RES_SCALED, ACT_OUT)
        tl.store(y_ptr + out_off, y.to(out_ty), mask=mask2)


@triton.jit
def conv_unit_kernel(
        x_ptr, w_ptr, w_desc, bias_ptr, ic_ptr, ia_ptr, ib_ptr, oa_ptr, ob_ptr, res_ptr, bs_ptr,
        y_ptr, u_ptr, st_mean_ptr, st_lo_ptr, st_m2_ptr, st_cnt_ptr,
        M, C_in, H, W, C_out, OH, OW,
        sxn, sxc, sxh, sxw, syn, syc, syh, syw, srn, src, srh, srw,
        stride_h, stride_w, pad_h, pad_w, res_scale,
        KH: tl.constexpr, KW: tl.constexpr, FLAT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_IC: tl.constexpr, HAS_IA: tl.constexpr, HAS_IB: tl.constexpr,
        ACT_IN: tl.constexpr, HAS_OA: tl.constexpr, HAS_OB: tl.constexpr,
        ACT_MID: tl.constexpr, HAS_RES: tl.constexpr, RES_SCALED: tl.constexpr,
        HAS_BRANCH: tl.constexpr, ACT_OUT: tl.constexpr, STORE_U: tl.constexpr,
        PROLOGUE: tl.constexpr, STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        INDEX_64: tl.constexpr, B_TMA: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """y = tail(conv(prologue(x)) + bias) (STATS=False) or z = conv(prologue(x)) + bias with
    per-tile statistics (STATS=True). x (N, C_in, H, W) with strides sx*; w (KH*KW*C_in, C_out)
    contiguous (B_TMA: read through w_desc, a tensor descriptor over it; else None); y, u
    (N, C_out, OH, OW) with strides sy*; residual with strides sr*; st_* a TileStats's arrays
    (one row per M tile)."""
    pid_m, pid_n, offs_m, offs_n, mask_m, mask_n, n_idx, oh, ow = _tile_coords(
        M, C_out, OH, OW, BLOCK_M, BLOCK_N, GROUP_M, INDEX_64)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        K_TOTAL = KH * KW * C_in
        row_off = n_idx * sxn
        for k0 in range(0, K_TOTAL, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K_TOTAL
            ci = offs_k % C_in
            tap = offs_k // C_in
            a = _load_a(x_ptr, row_off, mask_m, offs_k, mask_k, ci, tap // KW, tap % KW, ih0,
                        iw0, H, W, sxc, sxh, sxw, ic_ptr, ia_ptr, ib_ptr, HAS_IC, HAS_IA,
                        HAS_IB, ACT_IN, PROLOGUE, True)
            b = tl.load(w_ptr + offs_k[:, None] * C_out + offs_n[None, :],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        acc = _tap_loop(acc, x_ptr, w_ptr, n_idx, ih0, iw0, mask_m, offs_n, mask_n, C_in, H, W,
                        C_out, sxn, sxc, sxh, sxw, ic_ptr, ia_ptr, ib_ptr, KH, KW, HAS_IC,
                        HAS_IA, HAS_IB, ACT_IN, PROLOGUE, DOT_PRECISION, BLOCK_K, w_desc,
                        pid_n * BLOCK_N, B_TMA)

    _conv_epilogue(acc, pid_m, offs_m, offs_n, mask_m, mask_n, n_idx, oh, ow, bias_ptr, oa_ptr,
                   ob_ptr, res_ptr, bs_ptr, y_ptr, u_ptr, st_mean_ptr, st_lo_ptr, st_m2_ptr,
                   st_cnt_ptr, C_out, syn, syc, syh, syw, srn, src, srh, srw, res_scale,
                   HAS_BIAS, HAS_OA, HAS_OB, ACT_MID, HAS_RES, RES_SCALED, HAS_BRANCH, ACT_OUT,
                   STORE_U, STATS)


# triton decides at decoration time whether kernels are interpreted (TRITON_INTERPRET=1).
_INTERPRET = not isinstance(conv_unit_kernel, triton.runtime.jit.JITFunction)


# ---- launchers ----------------------------------------------------------------------------

_AUTOTUNED: dict = {}


def _prune(cfgs, nargs, **kwargs):
    x = nargs["x_ptr"] if "x_ptr" in nargs else nargs["x_desc"].base
    taps = kwargs.get("KH", 1) * kwargs.get("KW", 1)
    keep = {str(c) for c in configs.conv_configs_for(x.element_size(), taps, nargs["C_in"],
                                                     nargs["C_out"], kwargs.get("FLAT_K"))
            # TMA weight tiles: no chunk may run past its tap's C_in rows.
            if not kwargs.get("B_TMA") or nargs["C_in"] % c.block_k == 0}
    # (Never empty with B_TMA: the launcher admits only a C_in the smallest BLOCK_K divides,
    # and conv_configs_for keeps a 32-deep tile for any C_in of 32 or more.)
    return [c for c in cfgs if _config_name(c) in keep]


def _config_name(c) -> str:
    kw = c.kwargs
    return (f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}_w{c.num_warps}"
            f"_s{c.num_stages}")


# The problem's shape and the variant flags that change the kernel's cost: a 1x1 and a 3x3
# conv of one ResNet-50 stage have the same sizes and strides, and the statistics epilogue, the
# prologue and the residual load change what a tile costs.
_TUNE_KEY = ["M", "C_in", "H", "W", "C_out", "OH", "OW", "stride_h", "stride_w", "KH", "KW",
             "FLAT_K", "PROLOGUE", "STATS", "HAS_RES", "STORE_U", "INDEX_64"]


def autotune_over_conv_configs(kernel, key: list[str], pre_hook=None, **kwargs):
    """`kernel` autotuned over CONV_CONFIGS (pruned per problem by _prune), keyed by `key`;
    pre_hook(nargs) runs before each config does (it sees the config's BLOCK_* too).
    Where this Triton can (cache_results), the timings are kept on disk with its compiled
    kernels, so a new process on the same GPU skips tuning a shape already tuned; not with a
    pre_hook, which Triton cannot store (every process tunes the TMA conv afresh)."""
    cfgs = [triton.Config({**c.meta, "GROUP_M": 8}, num_warps=c.num_warps,
                          num_stages=c.num_stages, pre_hook=pre_hook)
            for c in configs.CONV_CONFIGS]
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs["cache_results"] = True
    return triton.autotune(cfgs, key=key, prune_configs_by={"early_config_prune": _prune},
                           **kwargs)(kernel)


def _autotuned_kernel():
    """conv_unit_kernel autotuned, keyed by _TUNE_KEY. The tile count arrays are zeroed
    before every timed run so a config's leftovers never reach the finalize."""
    if "conv" not in _AUTOTUNED:
        _AUTOTUNED["conv"] = autotune_over_conv_configs(conv_unit_kernel, _TUNE_KEY,
                                                        reset_to_zero=["st_cnt_ptr"])
    return _AUTOTUNED["conv"]


def _set_weight_block(nargs) -> None:
    """Autotuner pre-hook: the weight descriptor's block follows the config being run."""
    nargs["w_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


def _autotuned_kernel_tma_b():
    """conv_unit_kernel with TMA weight tiles, autotuned like _autotuned_kernel over the
    configs whose BLOCK_K divides C_in (_prune), each with its own descriptor block."""
    if "conv_tma_b" not in _AUTOTUNED:
        _AUTOTUNED["conv_tma_b"] = autotune_over_conv_configs(
            conv_unit_kernel, _TUNE_KEY, pre_hook=_set_weight_block,
            reset_to_zero=["st_cnt_ptr"])
    return _AUTOTUNED["conv_tma_b"]


class TunedTiles:
    """The tile Triton's autotuner chose, per problem: a later call of the same problem runs
    that tile as a fixed config. Through the autotuner every call binds its ~70 arguments
    twice (the autotuner's key, then the JIT's) and never takes the direct launch path
    (launch.py); with a fixed tile the statistics buffers are also sized exactly, with no
    zero fill. Keys are the launchers' own: what the autotuner keys on (_TUNE_KEY), the
    dtype and the device. Only the problem's own candidates are kept (the AOT-checked
    CONV_CONFIGS it may run: configs.conv_configs_for).
    Pointer-loaded launches only: the TMA ones pass descriptors, which take the JIT anyway."""

    _MAX_ENTRIES = 4096  # a ResNet-50 makes ~40 keys per mode

    def __init__(self) -> None:
        self._by_key: dict = {}

    def get(self, key: tuple) -> configs.ConvConfig | None:
        return self._by_key.get(key)

    def remember(self, key: tuple, tuner, candidates: list) -> None:
        """Record the config `tuner` (a triton Autotuner) ran last, i.e. for this key, if it
        is one of this problem's `candidates` (configs.conv_configs_for): the autotuner's
        attribute is shared, and another thread's tuning in between must not leave this key a
        tile excluded for it (one over its shared memory, say)."""
        best = getattr(tuner, "best_config", None)
        try:
            kw = best.kwargs
            cfg = configs.ConvConfig(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"],
                                     best.num_warps, best.num_stages)
        except (AttributeError, KeyError, TypeError):
            return  # a Triton whose autotuner does not say: every call keeps tuning
        if cfg not in candidates:
            return
        if len(self._by_key) >= self._MAX_ENTRIES:
            self._by_key.clear()
        self._by_key[key] = cfg

    def clear(self) -> None:
        self._by_key.clear()

    def __len__(self) -> int:
        return len(self._by_key)


TUNED = TunedTiles()


def autotune_enabled() -> bool:
    """FUSED_RES_TRITON_AUTOTUNE=0 runs configs.default_conv_config's choice without tuning:
    correctness checks then skip compiling every config for every shape."""
    return os.environ.get("FUSED_RES_TRITON_AUTOTUNE", "1") != "0"


_SM_COUNTS: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query costs microseconds)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNTS[idx]


def dot_precision(dtype: torch.dtype) -> str:
    """tf32 for float32 only where torch's own conv setting allows it (cudnn.allow_tf32)."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not _INTERPRET:
        return "tf32"
    return "ieee"


def span(t: torch.Tensor) -> int:
    """1 + the largest element offset t addresses (its extent in its storage)."""
    return 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True)
                   if n > 0)


def needs_int64(*tensors) -> bool:
    """Whether element offsets into any of the tensors can reach 2^31. A storage of fewer
    than 2^31 elements bounds every offset into it, which settles nearly every call without
    walking shapes and strides (this runs on the host for every launch)."""
    for t in tensors:
        if t is None or t.untyped_storage().nbytes() < 2 ** 31 * t.element_size():
            continue
        if span(t) >= 2 ** 31:
            return True
    return False


def vec(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-channel (or per-sample) vector as the kernels read it: contiguous. Gradients of
    C-sized outputs are often expanded views (mean.sum()'s gradient has stride 0), and a
    sliced parameter is strided; the kernels index vectors as plain arrays."""
    return None if t is None else t.contiguous()


def out_hw(h: int, w: int, kh: int, kw: int, stride, padding) -> tuple[int, int]:
    """A conv's output (OH, OW) for an (h, w) input (dilation 1)."""
    return ((h + 2 * padding[0] - kh) // stride[0] + 1,
            (w + 2 * padding[1] - kw) // stride[1] + 1)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, on the host (triton.cdiv goes through its JIT call machinery)."""
    return -(-a // b)


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, KH, KW) -> (KH*KW*C_in, C_out) contiguous, the GEMM's B operand."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


# id(weight) -> (weak references to weight and its storage, its state, its matrix); an entry
# leaves with its weight. (torch.utils.weak.WeakIdKeyDictionary builds a Python weak-reference
# object per lookup: ~3 us a call on the CPU here, on every inference conv.)
_W_MATS: dict = {}


def weight_matrix_cached(weight: torch.Tensor) -> torch.Tensor:
    """weight_matrix(weight), reused while weight is unchanged (the same tensor, its storage,
    version, dtype and shape). Callers use it only for weights nobody writes behind the
    version counter's back (the eval fold's, backends.constants); a weight that needs a
    gradient (a parameter in training changes every step) or has no version counter
    (inference mode) is copied per call all the same."""
    if weight.requires_grad or weight.is_inference():
        return weight_matrix(weight)
    # The storage by identity, not address: `p.data = t` keeps the tensor and its version,
    # and a new storage may land where the old one was.
    storage = weight.untyped_storage()
    state = (weight.data_ptr(), weight._version, weight.dtype, weight.shape)
    key = id(weight)
    hit = _W_MATS.get(key)
    if (hit is not None and hit[0]() is weight and hit[1]() is storage
            and hit[2] == state):
        return hit[3]
    w_mat = weight_matrix(weight)
    # The entry leaves when the weight is freed (the callback runs before its id is reused).
    _W_MATS[key] = (weakref.ref(weight, lambda _, k=key: _W_MATS.pop(k, None)),
                    weakref.ref(storage), state, w_mat)
    return w_mat


def tile_for(config, x: torch.Tensor, m: int, c_in: int, c_out: int, taps: int,
             flat: bool):
    """The tile a GEMM launch runs: `config` where given, the interpreter's under
    TRITON_INTERPRET, configs.default_conv_config's when autotuning is off (M output pixels
    of x's device), else None (the autotuner picks)."""
    if config is not None:
        return config
    if _INTERPRET:
        return configs.INTERPRETER_CONV_CONFIG
    if not autotune_enabled() and m > 0:
        return configs.default_conv_config(m, c_in, c_out, x.element_size(), taps, flat,
                                           sm_count(x.device))
    return None


def tma_requested() -> bool:
    """FUSED_RES_TRITON_TMA=1: when no config is given, the convs conv_tma can run take it,
    and the others their weight tiles by TMA where they can (not the default: H100 run 7
    found too small a gain; see conv_tma.py)."""
    return os.environ.get("FUSED_RES_TRITON_TMA", "0") == "1"


def _tma_tile(config, cfg, tma: bool, x, weight, stride, padding, prologue: bool):
    """False: the implicit-GEMM kernel runs (its weight tiles by TMA or not:
    _weight_descriptor). Otherwise conv_tma's 1x1 kernel runs, with this tile (a ConvConfig
    with tma=True) or None (autotuned). A config with tma=True that cannot run is an error;
    tma (TMA asked for, no config given) applies where it can."""
    if not (config.tma if config is not None else tma):
        return False
    from . import conv_tma
    reason = conv_tma.unsupported_reason(x, weight, stride, padding, prologue)
    if config is not None:
        if reason is not None:
            raise ValueError(f"config={config}: a TMA tile cannot run this conv: {reason}")
        return config
    if reason is not None:
        return False
    return cfg.with_tma() if cfg is not None else None


def _weight_descriptor(config, cfg, tma: bool, x, weight, w_mat, flat: bool):
    """The implicit-GEMM kernel's weight descriptor (its B tiles by TMA), or None for pointer
    loads: for a config with tma_b=True (an error where it cannot), and where TMA is asked
    for (tma, no config given) for a conv conv_tma's own kernel does not take, where the
    tile's BLOCK_K (autotuned: the smallest any candidate has) divides C_in."""
    if not (config.tma_b if config is not None else tma):
        return None
    from . import conv_tma
    bk = cfg.block_k if cfg is not None else min(c.block_k for c in configs.CONV_CONFIGS)
    reason = conv_tma.weight_tma_reason(x, weight, bk, flat)
    if reason is not None:
        if config is not None:
            raise ValueError(f"config={config}: its weight tiles cannot come by TMA: {reason}")
        return None
    # Autotuned: the pre-hook sets each config's block.
    return conv_tma.weight_descriptor(w_mat, bk, cfg.block_n if cfg is not None
                                      else configs.DOT_MIN)


class TileStats(NamedTuple):
    """Per-channel statistics of row tiles, float32: tile t's rows have mean
    mean[t] + mean_lo[t] (C,) (mean_lo the rounding mean[t] lost, so that tiles far from
    zero still compare finely), M2 m2[t] (C,) about it, and count[t] rows (0: never
    written; its other rows hold garbage)."""

    mean: torch.Tensor
    mean_lo: torch.Tensor
    m2: torch.Tensor
    count: torch.Tensor

    @classmethod
    def empty(cls, tiles: int, c: int, device, zero_counts: bool = False) -> TileStats:
        # One allocation for the four (each an allocator call on the host, per conv unit and
        # finalize level in training), each part starting 128-byte aligned as a tensor of
        # its own would (Triton specializes on 16-byte alignment).
        part = -(-tiles * c // 32) * 32
        buf = torch.empty(3 * part + tiles, dtype=torch.float32, device=device)
        mean, lo, m2 = (buf[i * part:i * part + tiles * c].view(tiles, c) for i in range(3))
        count = buf[3 * part:]
        if zero_counts:
            count.zero_()
        return cls(mean, lo, m2, count)


def _signature(t: torch.Tensor | None) -> tuple | None:
    """What of a tensor a launch's integer arguments and kernel choice follow from."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


class ConvPlan:
    """One conv launch, made again for a new input x and second input (conv_launch's
    residual, conv_pair_launch's x2) of the same shape, strides, dtype and device as the
    call's (and the second input no more or less the input than it was): a new output, the
    same kernel, grid and every other argument (the weight matrices and the vectors the call
    had: the caller passes those same tensors, which nobody writes). Made by conv_launch and
    conv_pair_launch (plan_out=...) for an inference call without statistics on constant
    weights, with 32-bit indexing and its tile known."""

    __slots__ = ("kernel", "grid", "kwargs", "template", "x_at", "y_at", "r_at", "x_sig",
                 "r_sig", "aliased", "y_shape", "fmt", "bound", "x_aligned")

    @classmethod
    def make(cls, kernel, grid, args: tuple, kwargs: dict, x, residual, y, fmt,
             tma: bool = False) -> ConvPlan:
        """tma: TMA was asked for, and the input's alignment decided against it (a 1x1
        conv takes conv_tma where the input is 16-byte aligned): the plan holds to it."""
        p = cls()
        p.x_aligned = not x.data_ptr() % 16 if tma else None
        p.kernel, p.grid, p.kwargs, p.fmt, p.y_shape = kernel, grid, dict(kwargs), fmt, y.shape
        # The call's own x, y and residual are not kept: their places are filled per call.
        p.y_at = tuple(i for i, a in enumerate(args) if a is y)
        p.x_at = tuple(i for i, a in enumerate(args) if a is x)
        p.r_at = (() if residual is None else
                  tuple(i for i, a in enumerate(args) if a is residual and a is not x))
        # Bound now (the launch just made cached this key); the alignment that can change is
        # that of the tensors filled per call (one place of each is enough).
        p.bound = bind(kernel, grid, args, kwargs,
                       varying=tuple(at[0] for at in (p.x_at, p.y_at, p.r_at) if at))
        filled = set(p.x_at + p.y_at + p.r_at)
        p.template = tuple(None if i in filled else a for i, a in enumerate(args))
        p.aliased = residual is x
        p.x_sig, p.r_sig = _signature(x), _signature(residual)
        return p

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | None:
        """The output (y) for this x and residual, or None where they are not like the
        planned call's (the caller then runs conv_launch)."""
        if (_signature(x) != self.x_sig or (residual is x) != self.aliased
                or _signature(residual) != self.r_sig or needs_int64(x, residual)
                or (self.x_aligned is not None and self.x_aligned != (not x.data_ptr() % 16))):
            return None
        y = torch.empty(self.y_shape, dtype=x.dtype, device=x.device, memory_format=self.fmt)
        args = list(self.template)
        for i in self.x_at:
            args[i] = x
        for i in self.y_at:
            args[i] = y
        for i in self.r_at:
            args[i] = residual
        if self.bound is not None:
            self.bound(tuple(args))
        else:
            launch(self.kernel, self.grid, *args, **self.kwargs)
        return y


def conv_launch(x, weight, bias, stride, padding, in_center, in_scale, in_shift, act_in, *,
                out_scale=None, out_shift=None, act_mid="none", residual=None, res_scale=1.0,
                branch_scale=None, act_out="none", store_u=False, stats=False,
                memory_format=torch.contiguous_format, config=None, tma=None,
                cache_weight=False, plan_out: list | None = None):
    """Run the fused conv. x (N, C_in, H, W) float32/float16/bfloat16, weight (C_out, C_in,
    KH, KW) same dtype; vectors (C,) any float dtype; residual (N, C_out, OH, OW).

    stats=False: returns (y, u) (u None unless store_u). stats=True: returns (z, TileStats)
    with one row per M tile (elementwise.stats_finalize makes mean and variance of it).
    config: a configs.ConvConfig to run instead of the autotuned choice (benchmarks, tests).
    tma: whether operands come by TMA where they can (sm_90): a 1x1 stride-1 conv without a
    prologue through conv_tma, the weight tiles of the others; None: FUSED_RES_TRITON_TMA
    decides (off unless "1"). cache_weight: the weight's GEMM layout may be kept and reused
    (weight_matrix_cached; only for a weight nobody writes, backends.constants).
    plan_out: a list to which a ConvPlan of this call is appended where there can be one
    (cache_weight, no statistics, no u, 32-bit indexing, a known tile, no TMA)."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    bias, in_center, in_scale, in_shift = vec(bias), vec(in_center), vec(in_scale), vec(in_shift)
    out_scale, out_shift, branch_scale = vec(out_scale), vec(out_shift), vec(branch_scale)
    oh, ow = out_hw(h, w, kh, kw, stride, padding)
    y = torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=x.device,
                    memory_format=memory_format)
    u = torch.empty_like(y) if store_u else None
    m = n * oh * ow
    flat = configs.flat_k(c_in, kh * kw)
    r = residual if residual is not None else y
    prologue = (in_center is not None or in_scale is not None or in_shift is not None
                or act_in == "relu")
    index_64 = needs_int64(x, y, r)
    tma = tma_requested() if tma is None else tma
    cfg = tile_for(config, x, m, c_in, c_out, kh * kw, flat)
    tuned_key = None
    if cfg is None and not tma:
        # What the autotuner keys on (_TUNE_KEY), with the dtype and device it adds.
        tuned_key = ("conv", m, c_in, h, w, c_out, oh, ow, *stride, kh, kw, flat, prologue,
                     stats, residual is not None, store_u, index_64, x.dtype, x.device)
        cfg = TUNED.get(tuned_key)
    if stats:
        # One partial per M tile. When the autotuner decides, the buffers are sized for its
        # smallest tile and the counts zeroed, so that rows a larger tile leaves unwritten
        # have count 0 and the finalize skips them; a known tile writes every row.
        bm = cfg.block_m if cfg is not None else configs.CONV_MIN_BLOCK_M
        st = TileStats.empty(cdiv(max(m, 1), bm), c_out, x.device, zero_counts=cfg is None)
    if m == 0:
        return (y, TileStats(*(a[:0] for a in st))) if stats else (y, u)
    if weight.numel() >= 2 ** 31:
        raise ValueError(f"weight has {weight.numel()} elements; accepted: < 2**31")
    w_mat = weight_matrix_cached(weight) if cache_weight else weight_matrix(weight)
    dummy = y
    flags = dict(KH=kh, KW=kw, FLAT_K=flat, HAS_BIAS=bias is not None,
                 HAS_IC=in_center is not None, HAS_IA=in_scale is not None,
                 HAS_IB=in_shift is not None, ACT_IN=act_in == "relu",
                 HAS_OA=out_scale is not None, HAS_OB=out_shift is not None,
                 ACT_MID=act_mid == "relu", HAS_RES=residual is not None,
                 RES_SCALED=float(res_scale) != 1.0, HAS_BRANCH=branch_scale is not None,
                 ACT_OUT=act_out == "relu", STORE_U=store_u, STATS=stats, PROLOGUE=prologue,
                 DOT_PRECISION=dot_precision(x.dtype), INDEX_64=index_64)
    # The epilogue's tensors (dummies where a flag says unused), in the kernels' order.
    tail = (bias if bias is not None else dummy,
            out_scale if out_scale is not None else dummy,
            out_shift if out_shift is not None else dummy,
            r, branch_scale if branch_scale is not None else dummy,
            y, u if u is not None else dummy,
            *(st if stats else (dummy,) * len(TileStats._fields)))
    tile = _tma_tile(config, cfg, tma, x, weight, stride, padding, prologue)
    if tile is not False:
        from . import conv_tma
        conv_tma.launch(x, w_mat, tail, y, r, res_scale, flags, tile)
    else:
        w_desc = _weight_descriptor(config, cfg, tma, x, weight, w_mat, flat)
        flags["B_TMA"] = w_desc is not None
        args = (x, w_mat, w_desc, tail[0],
                in_center if in_center is not None else dummy,
                in_scale if in_scale is not None else dummy,
                in_shift if in_shift is not None else dummy, *tail[1:],
                m, c_in, h, w, c_out, oh, ow, *x.stride(), *y.stride(), *r.stride(),
                stride[0], stride[1], padding[0], padding[1], float(res_scale))
        if cfg is not None:
            grid = (cdiv(m, cfg.block_m) * cdiv(c_out, cfg.block_n),)
            kwargs = dict(flags, **cfg.meta, GROUP_M=8, num_warps=cfg.num_warps,
                          num_stages=cfg.num_stages)
            launch(conv_unit_kernel, grid, *args, **kwargs)
            if (plan_out is not None and cache_weight and not (stats or store_u or index_64)
                    and w_desc is None):
                plan_out.append(ConvPlan.make(conv_unit_kernel, grid, args, kwargs, x,
                                              residual, y, memory_format, tma))
        else:
            grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) *
                                 cdiv(c_out, meta["BLOCK_N"]),)
            kernel = _autotuned_kernel_tma_b() if flags["B_TMA"] else _autotuned_kernel()
            with on_device((x,)):  # (launch() sees to it on the other paths)
                kernel[grid](*args, **flags)
            if tuned_key is not None:
                TUNED.remember(tuned_key, kernel, configs.conv_configs_for(
                    x.element_size(), kh * kw, c_in, c_out, flat))
    if stats:
        return y, st
    return y, u
