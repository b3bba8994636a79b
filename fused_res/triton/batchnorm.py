"""A train-mode BatchNorm's per-channel work in one launch each, where torch's composite took
about a dozen C-sized launches per BatchNorm per training step (nn/batchnorm.py):

    bn_scale_kernel      scale = weight * rsqrt(var + eps)
    bn_scale_bwd_kernel  dL/dvar = -dL/dscale * weight * rstd^3 / 2, dL/dweight = dL/dscale * rstd
    bn_running_kernel    num_batches_tracked += 1; running = (1 - f) running + f batch, with
                         f = momentum or 1 / num_batches_tracked and the unbiased batch variance
                         (nn.BatchNorm2d's update); one program, with a barrier between
                         every thread's read of the count and its update; with HAS_SCALE
                         also bn_scale_kernel's scale, in the same launch
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._eager import plain_eager
from .conv import cdiv, vec
from .launch import launch

BLOCK = 1024


@triton.jit
def _rstd_of(v, eps):
    # 1 / sqrt, each correctly rounded, as torch.rsqrt computes it on the CPU.
    return 1.0 / tl.sqrt_rn(v + eps)


@triton.jit
def _rstd(var_ptr, offs, mask, eps):
    return _rstd_of(tl.load(var_ptr + offs, mask=mask, other=1.0).to(tl.float32), eps)


@triton.jit
def store_scale(v, w_ptr, out_ptr, offs, mask, eps, HAS_W: tl.constexpr):
    """out[offs] = w * rsqrt(v + eps) (w = 1 without HAS_W) for the channels offs, whose
    float32 batch variance is v. (Also stats_finalize_kernel's, in its BN mode.)"""
    s = _rstd_of(v, eps)
    if HAS_W:
        s = s * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, s, mask=mask)


@triton.jit
def update_running(rm_ptr, rv_ptr, offs, mask, m, v, f, unbias):
    """running = (1 - f) running + f batch for the channels offs (batch mean m, biased var v,
    float32; the running variance takes the unbiased one), in the buffers' dtype."""
    keep = 1.0 - f
    rm = tl.load(rm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(rm_ptr + offs, (rm * keep + m * f).to(rm_ptr.dtype.element_ty), mask=mask)
    tl.store(rv_ptr + offs, (rv * keep + (v * unbias) * f).to(rv_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def store_scale_grads(g, v, w_ptr, gv_ptr, gw_ptr, offs, mask, eps, HAS_W: tl.constexpr,
                      NEED_V: tl.constexpr, NEED_W: tl.constexpr):
    """The scale's gradient g (float32) back to the variance v and the weight, for the
    channels offs: gv = -g * w * rstd^3 / 2 (float32), gw = g * rstd (w's dtype), rstd =
    rsqrt(v + eps). (Also epilogue_bwd_kernel's, in its BN_BWD mode.)"""
    rstd = _rstd_of(v, eps)
    if NEED_W:
        tl.store(gw_ptr + offs, (g * rstd).to(gw_ptr.dtype.element_ty), mask=mask)
    if NEED_V:
        gs = g
        if HAS_W:
            gs = g * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gv_ptr + offs, gs * (rstd * rstd * rstd) * -0.5, mask=mask)


@triton.jit
def bn_scale_kernel(var_ptr, w_ptr, out_ptr, C, eps, HAS_W: tl.constexpr,
                    BLOCK: tl.constexpr):
    """out (C,) float32 = w * rsqrt(var + eps) (w = 1 without HAS_W)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    v = tl.load(var_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    store_scale(v, w_ptr, out_ptr, offs, mask, eps, HAS_W)


@triton.jit
def bn_scale_bwd_kernel(g_ptr, var_ptr, w_ptr, gv_ptr, gw_ptr, C, eps, HAS_W: tl.constexpr,
                        NEED_V: tl.constexpr, NEED_W: tl.constexpr, BLOCK: tl.constexpr):
    """gv = -g * w * rstd^3 / 2 (float32), gw = g * rstd (w's dtype), rstd = rsqrt(var + eps)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    v = tl.load(var_ptr + offs, mask=mask, other=1.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    store_scale_grads(g, v, w_ptr, gv_ptr, gw_ptr, offs, mask, eps, HAS_W, NEED_V, NEED_W)


@triton.jit
def bump_count(nbt_ptr):
    """num_batches_tracked += 1 by one program; returns the new count. Every thread loads
    the count, one stores it: without the barrier a warp that loads after the store would
    see the new count (1 / (n + 1) for its channels)."""
    n = tl.load(nbt_ptr) + 1
    tl.debug_barrier()
    tl.store(nbt_ptr, n)
    return n


@triton.jit
def bn_running_kernel(mean_ptr, var_ptr, rm_ptr, rv_ptr, nbt_ptr, w_ptr, out_ptr, C, momentum,
                      unbias, eps, HAS_NBT: tl.constexpr, MOMENTUM_NONE: tl.constexpr,
                      UPDATE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_W: tl.constexpr,
                      BLOCK: tl.constexpr):
    """nn.BatchNorm2d's running-statistics update, in place, and with HAS_SCALE out (C,)
    float32 = w * rsqrt(var + eps) as bn_scale_kernel computes it; launched as one
    program."""
    f = momentum
    if HAS_NBT:
        n = bump_count(nbt_ptr)
        if MOMENTUM_NONE:
            f = 1.0 / n.to(tl.float32)
    if UPDATE or HAS_SCALE:
        for c0 in range(0, C, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            mask = offs < C
            v = tl.load(var_ptr + offs, mask=mask, other=1.0).to(tl.float32)
            if HAS_SCALE:
                store_scale(v, w_ptr, out_ptr, offs, mask, eps, HAS_W)
            if UPDATE:
                m = tl.load(mean_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                update_running(rm_ptr, rv_ptr, offs, mask, m, v, f, unbias)


def unbiased_factor(count: int) -> float:
    """count / (count - 1): the biased batch variance of `count` values to the unbiased one
    the running variance takes (1 for a single value or none)."""
    return count / (count - 1) if count > 1 else 1.0


# ---- launchers ----------------------------------------------------------------------------

def bn_scale(var: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """weight * rsqrt(var + eps): var (C,) float32, weight (C,) any float dtype or None;
    returns (C,) float32."""
    var, weight = vec(var), vec(weight)
    c = var.shape[0]
    out = torch.empty_like(var)
    if c:
        launch(bn_scale_kernel, (cdiv(c, BLOCK),), var,
               weight if weight is not None else var, out, c, float(eps),
               HAS_W=weight is not None, BLOCK=BLOCK)
    return out


def _bn_scale_backward(g, var, weight, eps, need_var, need_weight):
    g, var, weight = vec(g), vec(var), vec(weight)
    c = var.shape[0]
    gv = torch.empty_like(var) if need_var else var.new_empty((0,))
    need_weight = need_weight and weight is not None
    gw = torch.empty_like(weight) if need_weight else var.new_empty((0,))
    if c and (need_var or need_weight):
        launch(bn_scale_bwd_kernel, (cdiv(c, BLOCK),),
            g, var, weight if weight is not None else var, gv if need_var else var,
            gw if need_weight else var, c, float(eps), HAS_W=weight is not None,
            NEED_V=bool(need_var), NEED_W=bool(need_weight), BLOCK=BLOCK)
    return gv, gw


@torch.library.custom_op("fused_res_triton::bn_scale_bwd", mutates_args=())
def _bn_scale_bwd_op(g: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                     eps: float, need_var: bool, need_weight: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return _bn_scale_backward(g, var, weight, eps, need_var, need_weight)


@_bn_scale_bwd_op.register_fake
def _(g, var, weight, eps, need_var, need_weight):
    gv = torch.empty_like(var) if need_var else var.new_empty((0,))
    gw = (torch.empty_like(weight) if need_weight and weight is not None
          else var.new_empty((0,)))
    return gv, gw


def bn_scale_backward(g, var, weight, eps, need_var, need_weight):
    """(dL/dvar float32 or None, dL/dweight in weight's dtype or None) of bn_scale given
    dL/dscale (C,). Runs the kernel directly in plain eager mode with grad mode off (it has
    no derivative: a create_graph backward must not get here), else through a custom op that
    torch.compile can trace."""
    if not torch.is_grad_enabled() and plain_eager((g, var, weight)):
        gv, gw = _bn_scale_backward(g, var, weight, eps, need_var, need_weight)
    else:
        gv, gw = _bn_scale_bwd_op(g, var, weight, float(eps), bool(need_var),
                                  bool(need_weight))
    return (gv if need_var else None), (gw if need_weight and weight is not None else None)


def bn_update_running(mean, var, running_mean, running_var, num_batches_tracked, momentum,
                      count: int, scale_of: tuple | None = None) -> torch.Tensor | None:
    """nn.BatchNorm2d's training update of running_mean / running_var (C,) (any float dtype,
    contiguous) and num_batches_tracked (int64 scalar or None) from the batch mean and biased
    var (C,) float32 of `count` values per channel, in one launch. scale_of=(weight, eps):
    that launch also computes and returns bn_scale(var, weight, eps)."""
    c = mean.shape[0]
    update = count > 0 and c > 0
    has_nbt = num_batches_tracked is not None
    mean, var = vec(mean), vec(var)
    out = torch.empty_like(var) if scale_of is not None else None
    has_scale = out is not None and c > 0
    if not (update or has_nbt or has_scale):
        return out
    weight, eps = scale_of if scale_of is not None else (None, 0.0)
    weight = vec(weight)
    unbias = unbiased_factor(count)
    nbt = num_batches_tracked if has_nbt else mean
    launch(bn_running_kernel, (1,), mean, var, running_mean, running_var, nbt,
           weight if weight is not None else var, out if out is not None else var, c,
           0.0 if momentum is None else float(momentum), float(unbias), float(eps),
           HAS_NBT=has_nbt, MOMENTUM_NONE=momentum is None, UPDATE=update,
           HAS_SCALE=has_scale, HAS_W=weight is not None, BLOCK=BLOCK)
    return out
