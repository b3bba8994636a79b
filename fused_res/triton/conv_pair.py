"""A block's last conv and its projection shortcut as one implicit GEMM (inference).

In eval, with both BatchNorms folded into their convs, a ResNet block ends with

    y = relu(conv(h, W') + b' + conv1x1_stride_s(x, Wd') + bd')

and the two convs write the same output grid: their sum is a single GEMM whose K runs over
h's taps and channels, then over x's channels (K-concatenation). One kernel then computes the
block's output, where two would write the shortcut's output and read it back as the
residual: for ResNet-50 at batch 256 in bf16, 0.77 GB written and read back (1.5 GB of the
eval forward's traffic, the four downsampling blocks), and one launch per such block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .common import relu
from .conv import (
    TUNED,
    ConvPlan,
    _tap_loop,
    _tile_coords,
    autotune_over_conv_configs,
    cdiv,
    dot_precision,
    needs_int64,
    out_hw,
    tile_for,
    vec,
    weight_matrix,
    weight_matrix_cached,
)
from .launch import launch, on_device


@triton.jit
def conv_pair_kernel(
        x_ptr, w_ptr, x2_ptr, w2_ptr, bias_ptr, bias2_ptr, y_ptr,
        M, C_in, H, W, C_out, OH, OW, C2, H2, W2,
        sxn, sxc, sxh, sxw, s2n, s2c, s2h, s2w, syn, syc, syh, syw,
        stride_h, stride_w, pad_h, pad_w, stride2_h, stride2_w,
        KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr,
        ACT_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """y = act_out(conv(x, w) + bias + conv1x1(x2, w2, stride2) + bias2). x (N, C_in, H, W),
    x2 (N, C2, H2, W2) and y (N, C_out, OH, OW) with strides sx*, s2*, sy*; w (KH*KW*C_in,
    C_out) and w2 (C2, C_out) contiguous; bias, bias2 (C_out,) float32."""
    _, _, offs_m, offs_n, mask_m, mask_n, n_idx, oh, ow = _tile_coords(
        M, C_out, OH, OW, BLOCK_M, BLOCK_N, GROUP_M, INDEX_64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # (x_ptr stands in for the prologue's vectors, which PROLOGUE=False never reads.)
    acc = _tap_loop(acc, x_ptr, w_ptr, n_idx, oh * stride_h - pad_h, ow * stride_w - pad_w,
                    mask_m, offs_n, mask_n, C_in, H, W, C_out, sxn, sxc, sxh, sxw, x_ptr, x_ptr,
                    x_ptr, KH, KW, False, False, False, False, False, DOT_PRECISION, BLOCK_K,
                    None, 0, False)
    acc = _tap_loop(acc, x2_ptr, w2_ptr, n_idx, oh * stride2_h, ow * stride2_w, mask_m, offs_n,
                    mask_n, C2, H2, W2, C_out, s2n, s2c, s2h, s2w, x2_ptr, x2_ptr, x2_ptr, 1, 1,
                    False, False, False, False, False, DOT_PRECISION, BLOCK_K, None, 0, False)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS2:
        acc = acc + tl.load(bias2_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACT_OUT:
        acc = relu(acc)
    out_off = (n_idx[:, None] * syn + oh[:, None] * syh + ow[:, None] * syw
               + offs_n.to(offs_m.dtype)[None, :] * syc)
    tl.store(y_ptr + out_off, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# The conv kernel's key plus the shortcut's channels and stride (its other sizes follow).
_TUNE_KEY = ["M", "C_in", "H", "W", "C_out", "OH", "OW", "stride_h", "stride_w", "KH", "KW",
             "C2", "stride2_h", "stride2_w", "INDEX_64"]
_AUTOTUNED: dict = {}


def _autotuned_kernel():
    """conv_pair_kernel autotuned over the conv kernel's candidates, keyed by _TUNE_KEY."""
    if "pair" not in _AUTOTUNED:
        _AUTOTUNED["pair"] = autotune_over_conv_configs(conv_pair_kernel, _TUNE_KEY)
    return _AUTOTUNED["pair"]


def conv_pair_launch(x, weight, bias, stride, padding, x2, weight2, bias2, stride2, act_out, *,
                     memory_format=torch.contiguous_format, config=None, cache_weights=False,
                     plan_out: list | None = None):
    """y = act_out(conv(x, weight, stride, padding) + bias + conv(x2, weight2, stride2) +
    bias2). x (N, C_in, H, W), weight (C_out, C_in, KH, KW), x2 (N, C2, H2, W2), weight2
    (C_out, C2, 1, 1), all one dtype (float32, float16, bfloat16); bias, bias2 (C_out,) or
    None; the shortcut's output grid must be the conv's. config: a configs.ConvConfig to run
    instead of the autotuned choice (benchmarks, tests). cache_weights: the weights' GEMM
    layouts may be kept and reused (only for weights nobody writes, backends.constants).
    plan_out: a list to which a conv.ConvPlan of this call (x2 its second input) is appended
    where there can be one (cache_weights, 32-bit indexing, a known tile)."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    c2, h2, w2 = x2.shape[1:]
    oh, ow = out_hw(h, w, kh, kw, stride, padding)
    if out_hw(h2, w2, 1, 1, stride2, (0, 0)) != (oh, ow) or x2.shape[0] != n:
        raise ValueError(f"x2 {tuple(x2.shape)} with stride {tuple(stride2)} does not give "
                         f"the conv's output grid {(n, c_out, oh, ow)}")
    for name, t in (("weight", weight), ("weight2", weight2)):
        if t.numel() >= 2 ** 31:
            raise ValueError(f"{name} has {t.numel()} elements; accepted: < 2**31")
    bias, bias2 = vec(bias), vec(bias2)
    y = torch.empty((n, c_out, oh, ow), dtype=x.dtype, device=x.device,
                    memory_format=memory_format)
    m = n * oh * ow
    if m == 0 or c_out == 0:
        return y
    if config is not None and (config.tma or config.tma_b):
        raise ValueError(f"config={config}: the pair kernel loads its operands with "
                         "pointers; accepted: a config without tma or tma_b")
    cfg = tile_for(config, x, m, min(c_in, c2), c_out, kh * kw, False)
    index_64 = needs_int64(x, x2, y)
    tuned_key = None
    if cfg is None:
        # What the autotuner keys on (_TUNE_KEY), with the dtype and device it adds.
        tuned_key = ("pair", m, c_in, h, w, c_out, oh, ow, *stride, kh, kw, c2, *stride2,
                     index_64, x.dtype, x.device)
        cfg = TUNED.get(tuned_key)
    w_mat = weight_matrix_cached if cache_weights else weight_matrix
    args = (x, w_mat(weight), x2, w_mat(weight2),
            bias if bias is not None else y, bias2 if bias2 is not None else y, y,
            m, c_in, h, w, c_out, oh, ow, c2, h2, w2, *x.stride(), *x2.stride(), *y.stride(),
            stride[0], stride[1], padding[0], padding[1], stride2[0], stride2[1])
    flags = dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_BIAS2=bias2 is not None,
                 ACT_OUT=act_out == "relu", DOT_PRECISION=dot_precision(x.dtype),
                 INDEX_64=index_64)
    if cfg is not None:
        grid = (cdiv(m, cfg.block_m) * cdiv(c_out, cfg.block_n),)
        kwargs = dict(flags, **cfg.meta, GROUP_M=8, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)
        launch(conv_pair_kernel, grid, *args, **kwargs)
        if plan_out is not None and cache_weights and not index_64:
            plan_out.append(ConvPlan.make(conv_pair_kernel, grid, args, kwargs, x, x2, y,
                                          memory_format))
    else:
        grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(c_out, meta["BLOCK_N"]),)
        kernel = _autotuned_kernel()
        with on_device((x,)):
            kernel[grid](*args, **flags)
        TUNED.remember(tuned_key, kernel, configs.conv_configs_for(  # (as _prune keeps them)
            x.element_size(), kh * kw, c_in, c_out, False))
    return y
