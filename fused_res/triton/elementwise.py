"""Fused elementwise and per-channel reduction kernels over (N, C, H, W) tensors.

Every kernel walks [BLOCK_M pixels x BLOCK_C channels] tiles of tensors that share one layout
(NCHW or NHWC; the launchers make them agree), so one set of strides addresses all of them.

    epilogue_fwd_kernel   y = tail((z - c) * s + b)                    (the apply pass)
    epilogue_bwd_kernel   dL/dt = dL/du · s, dL/dresidual, and per-tile Σ dL/du and
                          Σ dL/du · (t - c) per channel, added up by the last program of
                          each channel block                             (affine / act / add)
    stats_partial_kernel  channel mean and M2 of `sub` tiles per program (Welford per
                          element, Chan across rows once)
    stats_finalize_kernel Chan's combine of the partials, in parallel groups -> mean, var
    stats_bwd_kernel      dL/dz + dL/dmean / m + 2 dL/dvar (z - mean) / m
    channel_sums_kernel   the same sums in a launch of their own (no rows, or
                          FUSED_RES_TRITON_SUMS_APART=1), and the center's gradient
                          -scale · Σ dL/du (was two sums, a negation, a product)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._eager import plain_eager
from . import batchnorm, configs
from .batchnorm import (
    bump_count,
    store_scale,
    store_scale_grads,
    unbiased_factor,
    update_running,
)
from .common import channel_affine, last_to_arrive, relu_grad, unit_tail
from .conv import TileStats, cdiv, needs_int64, sm_count, vec
from .launch import launch


@triton.jit
def _tile(tile_m, M, C, HW, W, sn, sc, sh, sw, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
          INDEX_64: tl.constexpr):
    """Row/column indices, masks and element offsets (int64 when a tensor spans 2^31
    elements, else int32 to save registers) of row tile `tile_m` in this program's channel
    block."""
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if INDEX_64:
        offs_m = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    n_idx = offs_m // HW
    hw = offs_m % HW
    off = ((n_idx * sn + (hw // W) * sh + (hw % W) * sw)[:, None]
           + offs_c.to(offs_m.dtype)[None, :] * sc)
    return offs_m, offs_c, mask_m, mask_c, n_idx, off


@triton.jit
def epilogue_fwd_kernel(z_ptr, c_ptr, s_ptr, b_ptr, res_ptr, bs_ptr, y_ptr,
                        M, C, HW, W, sn, sc, sh, sw, res_scale,
                        HAS_C: tl.constexpr, HAS_S: tl.constexpr, HAS_B: tl.constexpr,
                        ACT_MID: tl.constexpr, HAS_RES: tl.constexpr, RES_SCALED: tl.constexpr,
                        HAS_BRANCH: tl.constexpr, ACT_OUT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                        INDEX_64: tl.constexpr):
    """y = act_out(bs[n] * act_mid((z - c) * s + b) + λ r); z, r, y share strides."""
    offs_m, offs_c, mask_m, mask_c, n_idx, off = _tile(tl.program_id(0), M, C, HW, W, sn, sc,
                                                       sh, sw, BLOCK_M, BLOCK_C, INDEX_64)
    mask2 = mask_m[:, None] & mask_c[None, :]
    z = tl.load(z_ptr + off, mask=mask2, other=0.0).to(tl.float32)
    u = channel_affine(z, offs_c, mask_c, c_ptr, s_ptr, b_ptr, HAS_C, HAS_S, HAS_B)
    y = unit_tail(u, n_idx, mask_m, res_ptr + off, mask2, bs_ptr, res_scale, ACT_MID,
                  HAS_BRANCH, HAS_RES, RES_SCALED, ACT_OUT)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def epilogue_bwd_kernel(gy_ptr, t_ptr, y_ptr, c_ptr, s_ptr, b_ptr, bs_ptr, gt_ptr, gr_ptr,
                        psum_ptr, psum_t_ptr, cnt_ptr, sum_ptr, sum_t_ptr, gc_ptr,
                        var_ptr, w_ptr, gv_ptr, gw_ptr,
                        M, C, HW, W, sn, sc, sh, sw, res_scale, sub, eps,
                        HAS_C: tl.constexpr, HAS_S: tl.constexpr, HAS_B: tl.constexpr,
                        ACT_MID: tl.constexpr, ACT_OUT: tl.constexpr,
                        HAS_BRANCH: tl.constexpr, RES_SCALED: tl.constexpr,
                        NEED_GT: tl.constexpr, NEED_GR: tl.constexpr, NEED_SUM: tl.constexpr,
                        NEED_SUM_T: tl.constexpr, SUMS_HERE: tl.constexpr,
                        NEED_GC: tl.constexpr, FENCE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, INDEX_64: tl.constexpr,
                        BN_BWD: tl.constexpr = False, HAS_W: tl.constexpr = False,
                        NEED_GV: tl.constexpr = False, NEED_GW: tl.constexpr = False):
    """Backward of y = act_out(bs[n] * act_mid((t - c) * s + b) + λ r) given gy:
    gt = gu * s (t's dtype), gr = λ gw (r's dtype), and per program (`sub` row tiles, channel)
    the partial sums Σ gu and Σ gu (t - c) into psum / psum_t (programs_m, C) float32. The
    sums accumulate elementwise over the row tiles and reduce across rows once at the end: a
    row reduction is a cross-warp exchange with a barrier, and one per tile stalled the
    stream of loads (this pass ran at 0.45-0.66 of copy bandwidth on an H100, run 3, against
    0.70-0.87 for the CUDA kernel that reduces once per block).
    SUMS_HERE: the last program of each channel block to finish (cnt (channel blocks,) int32,
    zeroed) adds up the block's partials into sum / sum_t (C,) and writes gc (_sum_partials),
    the pass channel_sums_kernel otherwise makes after this one; with BN_BWD it also takes
    the scale s = w * rsqrt(var + eps) of a train-mode BatchNorm back to var and w (gv, gw:
    batchnorm.bn_scale_bwd_kernel's work on the sum Σ gu (t - c), its dL/ds)."""
    acc_g = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc_gt = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for i in range(0, sub):
        offs_m, offs_c, mask_m, mask_c, n_idx, off = _tile(
            tl.program_id(0) * sub + i, M, C, HW, W, sn, sc, sh, sw, BLOCK_M, BLOCK_C,
            INDEX_64)
        mask2 = mask_m[:, None] & mask_c[None, :]
        g = tl.load(gy_ptr + off, mask=mask2, other=0.0).to(tl.float32)
        if ACT_OUT:
            g = relu_grad(g, tl.load(y_ptr + off, mask=mask2, other=0.0))
        if NEED_GR:
            gr = g * res_scale if RES_SCALED else g
            tl.store(gr_ptr + off, gr.to(gr_ptr.dtype.element_ty), mask=mask2)
        if HAS_BRANCH:
            g = g * tl.load(bs_ptr + n_idx, mask=mask_m, other=0.0).to(tl.float32)[:, None]
        if ACT_MID or NEED_SUM_T:
            t = tl.load(t_ptr + off, mask=mask2, other=0.0).to(tl.float32)
            if ACT_MID:
                u = channel_affine(t, offs_c, mask_c, c_ptr, s_ptr, b_ptr, HAS_C, HAS_S, HAS_B)
                g = relu_grad(g, u)
        if NEED_GT:
            gt = g
            if HAS_S:
                gt = gt * tl.load(s_ptr + offs_c, mask=mask_c,
                                  other=0.0).to(tl.float32)[None, :]
            tl.store(gt_ptr + off, gt.to(gt_ptr.dtype.element_ty), mask=mask2)
        if NEED_SUM:
            acc_g += tl.where(mask2, g, 0.0)
        if NEED_SUM_T:
            centered = channel_affine(t, offs_c, mask_c, c_ptr, c_ptr, c_ptr, HAS_C, False,
                                      False)
            acc_gt += tl.where(mask2, g * centered, 0.0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_off = tl.program_id(0).to(tl.int64) * C + offs_c
    if NEED_SUM:
        tl.store(psum_ptr + p_off, tl.sum(acc_g, axis=0), mask=offs_c < C)
    if NEED_SUM_T:
        tl.store(psum_t_ptr + p_off, tl.sum(acc_gt, axis=0), mask=offs_c < C)
    if SUMS_HERE:
        if last_to_arrive(cnt_ptr, tl.program_id(1), tl.num_programs(0), FENCE):
            total_t = _sum_partials(psum_ptr, psum_t_ptr, sum_ptr, sum_t_ptr, gc_ptr, s_ptr,
                                    tl.num_programs(0), C, offs_c, NEED_SUM, NEED_SUM_T,
                                    NEED_GC, HAS_S, BLOCK_M, BLOCK_C)
            if BN_BWD:
                mask_c = offs_c < C
                v = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32)
                store_scale_grads(total_t, v, w_ptr, gv_ptr, gw_ptr, offs_c, mask_c, eps,
                                  HAS_W, NEED_GV, NEED_GW)


@triton.jit
def channel_sums_kernel(psum_ptr, psum_t_ptr, s_ptr, s_t_ptr, gc_ptr, scale_ptr, T, C,
                        HAS_SUM: tl.constexpr, HAS_SUM_T: tl.constexpr, NEED_GC: tl.constexpr,
                        HAS_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """s = Σ_t psum[t, :], s_t = Σ_t psum_t[t, :] (psum (T, C) float32 partials), and
    gc = -scale * s (-s without HAS_S): the gradient of the affine's center."""
    _sum_partials(psum_ptr, psum_t_ptr, s_ptr, s_t_ptr, gc_ptr, scale_ptr, T, C,
                  tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C), HAS_SUM, HAS_SUM_T,
                  NEED_GC, HAS_S, BLOCK_T, BLOCK_C)


@triton.jit
def _sum_partials(psum_ptr, psum_t_ptr, s_ptr, s_t_ptr, gc_ptr, scale_ptr, T, C, offs_c,
                  HAS_SUM: tl.constexpr, HAS_SUM_T: tl.constexpr, NEED_GC: tl.constexpr,
                  HAS_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """channel_sums_kernel's work for the channels offs_c, in row order (the same bits
    whichever program runs it); returns the Σ psum_t (zeros without HAS_SUM_T). Loads bypass
    L1 (.cg): other programs wrote the partials."""
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < T)[:, None] & mask_c[None, :]
        off = offs_t.to(tl.int64)[:, None] * C + offs_c[None, :]
        if HAS_SUM:
            acc += tl.load(psum_ptr + off, mask=mask, other=0.0, cache_modifier=".cg")
        if HAS_SUM_T:
            acc_t += tl.load(psum_t_ptr + off, mask=mask, other=0.0, cache_modifier=".cg")
    if HAS_SUM:
        total = tl.sum(acc, axis=0)
        tl.store(s_ptr + offs_c, total, mask=mask_c)
        if NEED_GC:
            gc = -total
            if HAS_S:
                gc = gc * tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            tl.store(gc_ptr + offs_c, gc, mask=mask_c)
    total_t = tl.sum(acc_t, axis=0)
    if HAS_SUM_T:
        tl.store(s_t_ptr + offs_c, total_t, mask=mask_c)
    return total_t


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's pairwise combine of two (count, mean, M2) summaries per channel."""
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / tl.maximum(n, 1.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def stats_partial_kernel(x_ptr, st_mean_ptr, st_lo_ptr, st_m2_ptr, st_cnt_ptr, M, C, HW, W,
                         sn, sc, sh, sw, sub, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                         INDEX_64: tl.constexpr):
    """Per program (`sub` consecutive [BLOCK_M, BLOCK_C] row tiles, channel block): the count
    of rows and the channel mean and M2 about it (float32). Each element of the tile keeps its
    own Welford mean and M2 of d = x - k over the program's tiles (elementwise: no exchange
    between threads), and the BLOCK_M rows are combined by Chan's formula once, at the end.
    A Chan merge per tile put two cross-warp reductions between every tile's loads (0.06-0.23
    of copy bandwidth on an H100, run 3). Plain sums of d and d² would reduce once too, but
    lose up to (rows / BLOCK_M)·eps of the variance where the first tile sits apart from the
    rest; Welford's update loses nothing to that."""
    first = tl.program_id(0) * sub
    # k: each channel's mean over the program's first tile (reduced across rows once per
    # program). The running means of x - k stay near zero, where float32 resolves them finely
    # (Welford about x itself, at |mean| = 3000 std, lost 1e-5 of the variance to their
    # rounding), and k is no single row that could be an outlier (k from the first row lost
    # 4e-5 of a mean 3000 std below that row in the final mean_t + k).
    offs_m, offs_c, mask_m, mask_c, n_idx, off = _tile(first, M, C, HW, W, sn, sc, sh, sw,
                                                       BLOCK_M, BLOCK_C, INDEX_64)
    mask2 = mask_m[:, None] & mask_c[None, :]
    x = tl.load(x_ptr + off, mask=mask2, other=0.0).to(tl.float32)
    n_r = mask_m.to(tl.float32)
    k = tl.sum(x, axis=0) / tl.maximum(tl.sum(n_r, axis=0), 1.0)
    # Tile 0 is each element's first sample: mean = x - k, M2 = 0.
    mean = tl.where(mask2, x - k[None, :], 0.0)
    m2 = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for i in range(1, sub):
        offs_m, offs_c, mask_m, mask_c, n_idx, off = _tile(
            first + i, M, C, HW, W, sn, sc, sh, sw, BLOCK_M, BLOCK_C, INDEX_64)
        mask2 = mask_m[:, None] & mask_c[None, :]
        x = tl.load(x_ptr + off, mask=mask2, other=0.0).to(tl.float32) - k[None, :]
        # The count is per row (the same for every channel): one reciprocal per row.
        n_r += mask_m.to(tl.float32)
        inv = 1.0 / tl.maximum(n_r, 1.0)
        delta = tl.where(mask2, x - mean, 0.0)
        mean += delta * inv[:, None]
        m2 += delta * tl.where(mask2, x - mean, 0.0)
    n = tl.broadcast_to(n_r[:, None], (BLOCK_M, BLOCK_C))
    n_t, mean_t, m2_t = tl.reduce((n, mean, m2), 0, _chan_merge)
    p_off = tl.program_id(0).to(tl.int64) * C + offs_c
    # The mean as (k, mean_t), not rounded into one float32 (TileStats).
    tl.store(st_mean_ptr + p_off, k, mask=mask_c)
    tl.store(st_lo_ptr + p_off, mean_t, mask=mask_c)
    tl.store(st_m2_ptr + p_off, m2_t, mask=mask_c)
    tl.store(st_cnt_ptr + tl.program_id(0), tl.max(n_t, axis=0))


@triton.jit
def _two_sum(a, b):
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@triton.jit
def stats_finalize_kernel(st_mean_ptr, st_lo_ptr, st_m2_ptr, st_cnt_ptr, out_mean_ptr,
                          out_lo_ptr, out_m2_ptr, out_cnt_ptr, w_ptr, scale_ptr, rm_ptr,
                          rv_ptr, nbt_ptr, T, C, GROUP, momentum, unbias, eps,
                          BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, FINAL: tl.constexpr,
                          BN: tl.constexpr = False, HAS_W: tl.constexpr = False,
                          HAS_NBT: tl.constexpr = False):
    """Combine tiles [g * GROUP, (g + 1) * GROUP) of T partials (a TileStats), g the
    program's first grid index: into one partial per group (FINAL=False: out_* a TileStats of
    `groups` rows), or, with one group, into the mean and biased variance (FINAL=True: out_mean
    and out_m2 (C,) receive mean and var). A block of tiles is merged exactly (M2 = Σ M2_i +
    Σ n_i (mean_i - mean)^2), blocks by Chan's pairwise update: no catastrophic cancellation
    when |mean| >> std. Every mean is taken about k, near the group's first tiles' means, as
    (mean_i - k) + lo_i: near k that difference is exact, so the tiles' offsets from each
    other, which the M2 weighs, keep float32's precision at any |mean| / std."""
    g = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    start = g * GROUP
    end = tl.minimum(start + GROUP, T)
    # k: the mean of the first BLOCK_T tiles' float32 means. Any k is right; one near the
    # tiles' means keeps their differences exact. (The first tile alone may be one nobody
    # wrote; k = 0 then lost the precision again.)
    offs_t = start + tl.arange(0, BLOCK_T)
    cnt = tl.load(st_cnt_ptr + offs_t, mask=offs_t < end, other=0.0)
    mask2 = ((offs_t < end) & (cnt > 0.0))[:, None] & mask_c[None, :]
    mean = tl.load(st_mean_ptr + offs_t.to(tl.int64)[:, None] * C + offs_c[None, :],
                   mask=mask2, other=0.0)
    k = tl.sum(cnt[:, None] * mean, axis=0) / tl.maximum(tl.sum(cnt, axis=0), 1.0)
    n_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2_a = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        cnt = tl.load(st_cnt_ptr + offs_t, mask=mask_t, other=0.0)
        # Tiles no program wrote (count 0: a larger BLOCK_M than the buffer was sized for)
        # hold uninitialised memory; 0 * NaN would poison the sums, so they are never read.
        mask2 = (mask_t & (cnt > 0.0))[:, None] & mask_c[None, :]
        off = offs_t.to(tl.int64)[:, None] * C + offs_c[None, :]
        mean = tl.load(st_mean_ptr + off, mask=mask2, other=0.0)
        lo = tl.load(st_lo_ptr + off, mask=mask2, other=0.0)
        m2 = tl.load(st_m2_ptr + off, mask=mask2, other=0.0)
        rel = tl.where(mask2, (mean - k[None, :]) + lo, 0.0)
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(cnt[:, None] * rel, axis=0) / tl.maximum(n_b, 1.0)
        d = tl.where(mask2, rel - mean_b[None, :], 0.0)
        m2_b = tl.sum(m2 + cnt[:, None] * d * d, axis=0)
        n_a, mean_a, m2_a = _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b)
    hi, lo_out = _two_sum(k, mean_a)
    if FINAL:
        var = m2_a / tl.maximum(n_a, 1.0)
        tl.store(out_mean_ptr + offs_c, hi, mask=mask_c)
        tl.store(out_m2_ptr + offs_c, var, mask=mask_c)
        if BN:
            # A train-mode BatchNorm on these statistics, as batchnorm.bn_running_kernel
            # (HAS_SCALE, a momentum) does it from the stored mean and var, in this launch.
            store_scale(var, w_ptr, scale_ptr, offs_c, mask_c, eps, HAS_W)
            update_running(rm_ptr, rv_ptr, offs_c, mask_c, hi, var, momentum, unbias)
            if HAS_NBT:
                if tl.program_id(1) == 0:
                    bump_count(nbt_ptr)
    else:
        out_off = g.to(tl.int64) * C + offs_c
        tl.store(out_mean_ptr + out_off, hi, mask=mask_c)
        tl.store(out_lo_ptr + out_off, lo_out, mask=mask_c)
        tl.store(out_m2_ptr + out_off, m2_a, mask=mask_c)
        # Every channel block of a group computes the same count; one of them stores it.
        tl.store(out_cnt_ptr + g, tl.max(n_a, axis=0), mask=tl.program_id(1) == 0)


@triton.jit
def stats_bwd_kernel(gz_ptr, z_ptr, mean_ptr, gmean_ptr, gvar_ptr, out_ptr, M, C, HW, W,
                     sn, sc, sh, sw, HAS_GZ: tl.constexpr, HAS_GMEAN: tl.constexpr,
                     HAS_GVAR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                     INDEX_64: tl.constexpr):
    """out = gz + gmean / M + 2 gvar (z - mean) / M, computed in float32."""
    offs_m, offs_c, mask_m, mask_c, n_idx, off = _tile(tl.program_id(0), M, C, HW, W, sn, sc,
                                                       sh, sw, BLOCK_M, BLOCK_C, INDEX_64)
    mask2 = mask_m[:, None] & mask_c[None, :]
    g = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    if HAS_GZ:
        g = tl.load(gz_ptr + off, mask=mask2, other=0.0).to(tl.float32)
    inv_m = 1.0 / M
    if HAS_GMEAN:
        gm = tl.load(gmean_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        g = g + gm[None, :] * inv_m
    if HAS_GVAR:
        gv = tl.load(gvar_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + off, mask=mask2, other=0.0).to(tl.float32)
        g = g + (2.0 * gv[None, :]) * (z - mu[None, :]) * inv_m
    tl.store(out_ptr + off, g.to(out_ptr.dtype.element_ty), mask=mask2)


# FUSED_RES_TRITON_SUMS_APART=1 (read at import): the apply backward's channel sums in a
# kernel of their own after the pass, as before they moved into its last programs.
SUMS_IN_PASS = os.environ.get("FUSED_RES_TRITON_SUMS_APART", "0") != "1"
# triton decides at decoration time whether kernels are interpreted (TRITON_INTERPRET=1).
_INTERPRET = not isinstance(epilogue_fwd_kernel, triton.runtime.jit.JITFunction)


# ---- launchers ----------------------------------------------------------------------------

def _cfg(c: int) -> configs.TileConfig:
    return (configs.INTERPRETER_ELEMENTWISE_CONFIG if _INTERPRET
            else configs.elementwise_config(c))


def _geometry(t: torch.Tensor):
    n, c, h, w = t.shape
    return n * h * w, c, h * w, w


def _index_64(rows: int, *tensors) -> bool:
    """INDEX_64 for a _tile launch whose programs cover `rows` row indices (a multiple of the
    tile, past M in the last program): int64 where element offsets into a tensor can reach
    2^31, or the row indices themselves could (a wrapped one would pass the row mask)."""
    return rows >= 2 ** 31 or needs_int64(*tensors)


def _reduction_programs(m: int, c: int, cfg: configs.TileConfig,
                        device: torch.device) -> tuple[int, int]:
    """(row tiles per program, programs along M) of a per-channel reduction over m rows."""
    sub = configs.reduction_sub_tiles(m, cfg.block_m, cdiv(c, cfg.block_c),
                                      None if _INTERPRET else sm_count(device))
    return sub, cdiv(m, cfg.block_m * sub)


def _grid(m: int, c: int, cfg: configs.TileConfig):
    return (cdiv(m, cfg.block_m), cdiv(c, cfg.block_c))


def like(t: torch.Tensor | None, fmt: torch.memory_format) -> torch.Tensor | None:
    """t in memory format fmt (a copy only when its strides differ)."""
    return None if t is None else t.contiguous(memory_format=fmt)


def _epilogue_forward(z, center, scale, shift, act_mid, residual, res_scale, branch_scale,
                      act_out, fmt):
    """y (z's shape and dtype, memory format fmt) = tail((z - center) * scale + shift)."""
    z = like(z, fmt)
    center, scale, shift, branch_scale = vec(center), vec(scale), vec(shift), vec(branch_scale)
    y = torch.empty_like(z, memory_format=fmt)
    m, c, hw, w = _geometry(z)
    if m == 0 or c == 0:
        return y
    r = like(residual, fmt)
    cfg, d = _cfg(c), y
    launch(epilogue_fwd_kernel, _grid(m, c, cfg),
        z, center if center is not None else d, scale if scale is not None else d,
        shift if shift is not None else d, r if r is not None else d,
        branch_scale if branch_scale is not None else d, y, m, c, hw, w, *y.stride(),
        float(res_scale), HAS_C=center is not None, HAS_S=scale is not None,
        HAS_B=shift is not None, ACT_MID=act_mid == "relu", HAS_RES=r is not None,
        RES_SCALED=float(res_scale) != 1.0, HAS_BRANCH=branch_scale is not None,
        ACT_OUT=act_out == "relu", BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c,
        INDEX_64=_index_64(cdiv(m, cfg.block_m) * cfg.block_m, z, r, y),
        num_warps=cfg.num_warps)
    return y


def _epilogue_backward(gy, t, y, center, scale, shift, branch_scale, act_mid, act_out,
                       res_scale, residual_dtype, need_gt, need_gr, need_sum, need_sum_t, fmt,
                       gt_dtype=None, bn=None):
    """Gradients of y = tail((t - center) * scale + shift) given gy (all (N, C, H, W)):
    returns (gt in gt_dtype (default t's) or None, gr in residual_dtype or None, Σ gu (C,) or
    None, Σ gu (t - center) (C,) or None, dL/dcenter = -scale Σ gu (C,) where need_sum and a
    center is given, else None); sums in float32, gu = dL/d((t-c)*s+b).
    bn = (var, weight, eps, need_var, need_weight), with need_sum_t: scale is a train-mode
    BatchNorm's weight * rsqrt(var + eps), and two more results follow, its gradients
    (dL/dvar float32, dL/dweight in weight's dtype; None where not needed), as
    batchnorm.bn_scale_backward gives them from Σ gu (t - center): in this pass's last
    programs where the sums are made there, else in a launch of their own."""
    gy = like(gy, fmt)
    center, scale, shift, branch_scale = vec(center), vec(scale), vec(shift), vec(branch_scale)
    m, c, hw, w = _geometry(gy)
    gt = torch.empty(gy.shape, dtype=gt_dtype or t.dtype, device=gy.device,
                     memory_format=fmt) if need_gt else None
    gr = torch.empty(gy.shape, dtype=residual_dtype, device=gy.device,
                     memory_format=fmt) if need_gr else None
    cfg = _cfg(c)
    sub, tiles = _reduction_programs(m, c, cfg, gy.device)
    psum = torch.empty((tiles, c), dtype=torch.float32, device=gy.device) if need_sum else None
    psum_t = torch.empty((tiles, c), dtype=torch.float32,
                         device=gy.device) if need_sum_t else None
    need_gc = need_sum and center is not None
    sums = [torch.empty(c, dtype=torch.float32, device=gy.device) if need else None
            for need in (need_sum, need_sum_t, need_gc)]
    launched = m > 0 and c > 0
    # The last program per channel block adds up the partials (a fill of the counts before
    # the pass instead of channel_sums_kernel after it), unless FUSED_RES_TRITON_SUMS_APART=1.
    sums_here = launched and (need_sum or need_sum_t) and SUMS_IN_PASS
    bn_here = False
    if bn is not None:
        if not need_sum_t:
            raise ValueError("_epilogue_backward(bn=...) needs need_sum_t: the BatchNorm's "
                             "gradients are taken from Σ gu (t - center)")
        var, bn_w, eps, need_gv, need_gw = bn
        var, bn_w = vec(var), vec(bn_w)
        need_gw = need_gw and bn_w is not None
        bn_here = sums_here and (need_gv or need_gw)
        gv = torch.empty_like(var) if bn_here and need_gv else None
        gw = torch.empty_like(bn_w) if bn_here and need_gw else None
    if launched:
        need_t = act_mid == "relu" or need_sum_t
        t_in = like(t, fmt) if need_t else gy
        y_in = like(y, fmt) if act_out == "relu" else gy
        d = gy
        c_blocks = cdiv(c, cfg.block_c)
        # Arrival counts, zeroed per call: a buffer kept between calls would be shared by
        # passes on concurrent streams.
        cnt = torch.zeros(c_blocks, dtype=torch.int32, device=gy.device) if sums_here else d
        launch(epilogue_bwd_kernel, (tiles, c_blocks),
            gy, t_in, y_in, center if center is not None else d,
            scale if scale is not None else d, shift if shift is not None else d,
            branch_scale if branch_scale is not None else d,
            gt if gt is not None else d, gr if gr is not None else d,
            psum if psum is not None else d, psum_t if psum_t is not None else d,
            cnt, *(o if o is not None else d for o in sums),
            *((var, bn_w if bn_w is not None else var, gv if gv is not None else var,
               gw if gw is not None else var) if bn_here else (d, d, d, d)),
            m, c, hw, w, *gy.stride(), float(res_scale), sub,
            float(eps) if bn_here else 0.0,
            HAS_C=center is not None, HAS_S=scale is not None, HAS_B=shift is not None,
            ACT_MID=act_mid == "relu", ACT_OUT=act_out == "relu",
            HAS_BRANCH=branch_scale is not None, RES_SCALED=float(res_scale) != 1.0,
            NEED_GT=need_gt, NEED_GR=need_gr, NEED_SUM=need_sum, NEED_SUM_T=need_sum_t,
            SUMS_HERE=sums_here, NEED_GC=need_gc and sums_here, FENCE=not _INTERPRET,
            BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c,
            INDEX_64=_index_64(tiles * sub * cfg.block_m, gy, t_in, y_in, gt, gr),
            num_warps=cfg.num_warps,
            **(dict(BN_BWD=True, HAS_W=bn_w is not None, NEED_GV=bool(need_gv),
                    NEED_GW=bool(need_gw)) if bn_here else {}))
    elif need_gt or need_gr:
        for out in (gt, gr):
            if out is not None:
                out.zero_()
    if c > 0 and (need_sum or need_sum_t) and not sums_here:
        d = sums[0] if need_sum else sums[1]
        cfg = configs.SUMS_CONFIG
        launch(channel_sums_kernel, (cdiv(c, cfg.block_c),),
            psum if need_sum else d, psum_t if need_sum_t else d,
            *(o if o is not None else d for o in sums), scale if scale is not None else d,
            tiles, c, HAS_SUM=need_sum, HAS_SUM_T=need_sum_t, NEED_GC=need_gc,
            HAS_S=scale is not None, BLOCK_T=cfg.block_m, BLOCK_C=cfg.block_c,
            num_warps=cfg.num_warps)
    if bn is None:
        return (gt, gr, *sums)
    if not bn_here:  # (the sums made apart, or no rows: the scale's backward on its own)
        gv, gw = batchnorm._bn_scale_backward(sums[1], var, bn_w, eps, need_gv, need_gw)
        gv, gw = (gv if need_gv else None), (gw if need_gw else None)
    return (gt, gr, *sums, gv, gw)


def stats_finalize(parts: TileStats, c: int, bn: tuple | None = None):
    """(mean, biased var) (C,) float32 from per-tile partials (a TileStats with C columns);
    zeros when there are none. More than FINALIZE_GROUP tiles are first merged in parallel,
    FINALIZE_GROUP at a time, until one group is left: a single program walking every tile of
    a large activation (one per 32 rows) took ~1 ms on an H100
    (benchmarks/results/2026-11-26-h100-run1, stats).

    bn = (weight, eps, running_mean, running_var, num_batches_tracked, momentum, count): the
    last launch also does a train-mode BatchNorm's work on them, as batchnorm.bn_update_running
    with scale_of=(weight, eps) would (a momentum, running statistics contiguous on the
    device, at least one tile: the caller sees to it), and returns (mean, var, scale)."""
    t = parts.count.shape[0]
    device = parts.count.device
    if t == 0 or c == 0:
        if bn is not None:
            raise ValueError("stats_finalize(bn=...) needs partials of at least one tile")
        zeros = torch.zeros((c,), dtype=torch.float32, device=device)
        return zeros, zeros.clone()
    # The final combine writes every channel: no fill launches.
    mean = torch.empty((c,), dtype=torch.float32, device=device)
    var = torch.empty_like(mean)
    cfg = configs.FINALIZE_CONFIG
    group = configs.FINALIZE_GROUP
    c_blocks = cdiv(c, cfg.block_c)
    while t > group:
        groups = cdiv(t, group)
        nxt = TileStats.empty(groups, c, device)
        launch(stats_finalize_kernel, (groups, c_blocks),
            *parts, *nxt, mean, mean, mean, mean, mean, t, c, group, 0.0, 1.0, 0.0,
            BLOCK_T=cfg.block_m, BLOCK_C=cfg.block_c, FINAL=False, num_warps=cfg.num_warps)
        parts, t = nxt, groups
    if bn is None:
        launch(stats_finalize_kernel, (1, c_blocks),
            *parts, mean, mean, var, parts.count, mean, mean, mean, mean, mean, t, c, t, 0.0,
            1.0, 0.0, BLOCK_T=cfg.block_m, BLOCK_C=cfg.block_c, FINAL=True,
            num_warps=cfg.num_warps)
        return mean, var
    weight, eps, running_mean, running_var, nbt, momentum, count = bn
    weight = vec(weight)
    scale = torch.empty_like(mean)
    launch(stats_finalize_kernel, (1, c_blocks),
        *parts, mean, mean, var, parts.count, weight if weight is not None else mean, scale,
        running_mean, running_var, nbt if nbt is not None else mean, t, c, t,
        float(momentum), float(unbiased_factor(count)), float(eps),
        BLOCK_T=cfg.block_m, BLOCK_C=cfg.block_c, FINAL=True, BN=True,
        HAS_W=weight is not None, HAS_NBT=nbt is not None, num_warps=cfg.num_warps)
    return mean, var, scale


def channel_stats(x):
    """Per-channel mean and biased variance (C,) float32 of x (N, C, H, W) over (N, H, W)."""
    m, c, hw, w = _geometry(x)
    if m == 0 or c == 0:
        zeros = torch.zeros((c,), dtype=torch.float32, device=x.device)
        return zeros, zeros.clone()
    cfg = _cfg(c)
    sub, tiles = _reduction_programs(m, c, cfg, x.device)
    parts = TileStats.empty(tiles, c, x.device)
    launch(stats_partial_kernel, (tiles, cdiv(c, cfg.block_c)),
        x, *parts, m, c, hw, w, *x.stride(), sub, BLOCK_M=cfg.block_m,
        BLOCK_C=cfg.block_c, INDEX_64=_index_64(tiles * sub * cfg.block_m, x),
        num_warps=cfg.num_warps)
    return stats_finalize(parts, c)


def _stats_backward(gz, gmean, gvar, z, mean, out_dtype, fmt):
    """dL/dz (z's shape, out_dtype, memory format fmt) of (mean, biased var) over (N, H, W)
    plus the direct gradient gz (any of gz, gmean, gvar may be None)."""
    z = like(z, fmt)
    gmean, gvar, mean = vec(gmean), vec(gvar), vec(mean)
    out = torch.empty(z.shape, dtype=out_dtype, device=z.device, memory_format=fmt)
    m, c, hw, w = _geometry(z)
    if m == 0 or c == 0:
        if gz is not None:
            out.copy_(gz)
        else:
            out.zero_()
        return out
    gz = like(gz, fmt)
    cfg, d = _cfg(c), z
    launch(stats_bwd_kernel, _grid(m, c, cfg),
        gz if gz is not None else d, z, mean, gmean if gmean is not None else mean,
        gvar if gvar is not None else mean, out, m, c, hw, w, *out.stride(),
        HAS_GZ=gz is not None, HAS_GMEAN=gmean is not None, HAS_GVAR=gvar is not None,
        BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c,
        INDEX_64=_index_64(cdiv(m, cfg.block_m) * cfg.block_m, gz, z, out),
        num_warps=cfg.num_warps)
    return out


# ---- torch.library ops ----------------------------------------------------------------------
# The backward of fused_res's ops calls these launchers. Under torch.compile, AOT autograd
# traces that backward with fake tensors, so each launcher is a custom op with a fake
# implementation: the compiled graph holds one node per kernel instead of failing (or breaking
# the graph) on a data pointer.

_NS = "fused_res_triton"
_FMT = {False: torch.contiguous_format, True: torch.channels_last}


def _new(shape, dtype, device, fmt):
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


@torch.library.custom_op(f"{_NS}::epilogue_fwd", mutates_args=())
def _epilogue_fwd_op(z: torch.Tensor, center: torch.Tensor | None, scale: torch.Tensor | None,
                     shift: torch.Tensor | None, act_mid: str, residual: torch.Tensor | None,
                     res_scale: float, branch_scale: torch.Tensor | None, act_out: str,
                     channels_last: bool) -> torch.Tensor:
    return _epilogue_forward(z, center, scale, shift, act_mid, residual, res_scale,
                             branch_scale, act_out, _FMT[channels_last])


@_epilogue_fwd_op.register_fake
def _(z, center, scale, shift, act_mid, residual, res_scale, branch_scale, act_out,
      channels_last):
    return _new(z.shape, z.dtype, z.device, _FMT[channels_last])


@torch.library.custom_op(f"{_NS}::epilogue_bwd", mutates_args=())
def _epilogue_bwd_op(gy: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor | None,
                     center: torch.Tensor | None, scale: torch.Tensor | None,
                     shift: torch.Tensor | None, branch_scale: torch.Tensor | None,
                     act_mid: str, act_out: str, res_scale: float, gt_dtype: torch.dtype,
                     gr_dtype: torch.dtype, need_gt: bool, need_gr: bool, need_sum: bool,
                     need_sum_t: bool, channels_last: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor]:
    outs = _epilogue_backward(gy, t, y, center, scale, shift, branch_scale, act_mid, act_out,
                              res_scale, gr_dtype, need_gt, need_gr, need_sum, need_sum_t,
                              _FMT[channels_last], gt_dtype)
    # Custom ops return tensors only: an output that was not asked for is empty.
    return tuple(o if o is not None else gy.new_empty((0,)) for o in outs)


@_epilogue_bwd_op.register_fake
def _(gy, t, y, center, scale, shift, branch_scale, act_mid, act_out, res_scale, gt_dtype,
      gr_dtype, need_gt, need_gr, need_sum, need_sum_t, channels_last):
    fmt, c = _FMT[channels_last], gy.shape[1]
    gt = _new(gy.shape, gt_dtype, gy.device, fmt) if need_gt else gy.new_empty((0,))
    gr = _new(gy.shape, gr_dtype, gy.device, fmt) if need_gr else gy.new_empty((0,))
    vec = lambda need: gy.new_empty((c,) if need else (0,), dtype=torch.float32)
    return gt, gr, vec(need_sum), vec(need_sum_t), vec(need_sum and center is not None)


@torch.library.custom_op(f"{_NS}::stats_bwd", mutates_args=())
def _stats_bwd_op(gz: torch.Tensor | None, gmean: torch.Tensor | None,
                  gvar: torch.Tensor | None, z: torch.Tensor, mean: torch.Tensor,
                  out_dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    return _stats_backward(gz, gmean, gvar, z, mean, out_dtype, _FMT[channels_last])


@_stats_bwd_op.register_fake
def _(gz, gmean, gvar, z, mean, out_dtype, channels_last):
    return _new(z.shape, out_dtype, z.device, _FMT[channels_last])


def _direct(tensors) -> bool:
    """Whether to launch without the custom op: plain eager mode (fused_res._eager), and grad
    mode off. These ops have no autograd formula; a backward taken with create_graph=True runs
    them with grad mode on, and must then get the custom op's error rather than results that
    silently drop out of the second-order graph."""
    return not torch.is_grad_enabled() and plain_eager(tensors)


def epilogue_forward(z, center, scale, shift, act_mid, residual, res_scale, branch_scale,
                     act_out, fmt):
    """y (z's shape and dtype, memory format fmt) = tail((z - center) * scale + shift)."""
    if _direct((z, center, scale, shift, residual, branch_scale)):
        return _epilogue_forward(z, center, scale, shift, act_mid, residual, float(res_scale),
                                 branch_scale, act_out, fmt)
    return _epilogue_fwd_op(z, center, scale, shift, act_mid, residual, float(res_scale),
                            branch_scale, act_out, fmt == torch.channels_last)


def epilogue_backward(gy, t, y, center, scale, shift, branch_scale, act_mid, act_out,
                      res_scale, residual_dtype, need_gt, need_gr, need_sum, need_sum_t, fmt,
                      gt_dtype=None, bn=None):
    """Gradients of y = tail((t - center) * scale + shift) given gy (all (N, C, H, W)):
    returns (gt in gt_dtype (default t's) or None, gr in residual_dtype or None, Σ gu (C,) or
    None, Σ gu (t - center) (C,) or None, dL/dcenter = -scale Σ gu (C,) or None (where
    need_sum and a center is given)); sums in float32, gu = dL/d((t-c)*s+b).
    bn = (var, weight, eps, need_var, need_weight): scale is a train-mode BatchNorm's, and its
    gradients to var and weight follow (_epilogue_backward), in eager mode only."""
    gt_dtype = gt_dtype or (t.dtype if t is not None else gy.dtype)
    if _direct((gy, t, y, center, scale, shift, branch_scale)):
        return _epilogue_backward(gy, t, y, center, scale, shift, branch_scale, act_mid,
                                  act_out, float(res_scale), residual_dtype or gy.dtype,
                                  bool(need_gt), bool(need_gr), bool(need_sum),
                                  bool(need_sum_t), fmt, gt_dtype, bn)
    if bn is not None:
        raise RuntimeError("epilogue_backward(bn=...) runs in plain eager mode with grad mode "
                           "off only")
    outs = _epilogue_bwd_op(gy, t, y, center, scale, shift, branch_scale, act_mid, act_out,
                            float(res_scale), gt_dtype, residual_dtype or gy.dtype,
                            bool(need_gt), bool(need_gr), bool(need_sum), bool(need_sum_t),
                            fmt == torch.channels_last)
    return tuple(o if need else None for o, need in
                 zip(outs, (need_gt, need_gr, need_sum, need_sum_t,
                            need_sum and center is not None), strict=True))


def stats_backward(gz, gmean, gvar, z, mean, out_dtype, fmt):
    """dL/dz (z's shape, out_dtype, memory format fmt) of (mean, biased var) over (N, H, W)
    plus the direct gradient gz (any of gz, gmean, gvar may be None)."""
    if _direct((z, gz, gmean, gvar, mean)):
        return _stats_backward(gz, gmean, gvar, z, mean, out_dtype, fmt)
    return _stats_bwd_op(gz, gmean, gvar, z, mean, out_dtype, fmt == torch.channels_last)
