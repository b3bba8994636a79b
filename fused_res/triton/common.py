"""Triton device helpers shared by the conv and elementwise kernels: the per-channel affine
and the unit's tail (act_mid, per-sample branch scale, λ residual add, act_out).

All math runs in float32 on [BLOCK_M, BLOCK_C] tiles whose columns are channels, exactly as
the reference backend's _affine and _tail do it in the acc dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def relu(t):
    """max(t, 0) that keeps NaN, as torch.relu does (tl.maximum may return 0 for NaN)."""
    return tl.where(t < 0, 0.0, t)


@triton.jit
def relu_grad(g, out):
    """torch.relu's backward (threshold_backward): 0 where out <= 0, else g. A NaN gradient
    where the unit was off is dropped, one where out is NaN passes, as in eager."""
    return tl.where(out <= 0, 0.0, g)


@triton.jit
def channel_affine(t, offs_c, mask_c, c_ptr, s_ptr, b_ptr, HAS_C: tl.constexpr,
                   HAS_S: tl.constexpr, HAS_B: tl.constexpr):
    """(t - c) * s + b with per-column vectors; t float32 [BM, BC], offs_c [BC]."""
    if HAS_C:
        t = t - tl.load(c_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_S:
        t = t * tl.load(s_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        t = t + tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    return t


@triton.jit
def unit_tail(u, n_idx, mask_m, r_ptrs, mask2, bs_ptr, res_scale, ACT_MID: tl.constexpr,
              HAS_BRANCH: tl.constexpr, HAS_RES: tl.constexpr, RES_SCALED: tl.constexpr,
              ACT_OUT: tl.constexpr):
    """act_out(branch_scale[n] * act_mid(u) + res_scale * r); u float32 [BM, BC], n_idx [BM]
    the sample of each row, r_ptrs the residual's pointers (read only when HAS_RES)."""
    v = u
    if ACT_MID:
        v = relu(v)
    if HAS_BRANCH:
        v = v * tl.load(bs_ptr + n_idx, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    if HAS_RES:
        r = tl.load(r_ptrs, mask=mask2, other=0.0).to(tl.float32)
        if RES_SCALED:
            r = r * res_scale
        v = v + r
    if ACT_OUT:
        v = relu(v)
    return v


@triton.jit
def gpu_fence(anchor, FENCE: tl.constexpr):
    """A gpu-scope acquire-release fence in every thread, for the hand-off to the last program
    of a grid row (last_to_arrive); none under the interpreter, which runs programs one after
    another and has no inline assembly. `anchor`: any int32 scalar (inline asm needs an
    operand)."""
    if FENCE:
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, $1;", "=r,r", [anchor],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def last_to_arrive(cnt_ptr, slot, arrivals, FENCE: tl.constexpr):
    """Counts this program in cnt[slot] (int32, zeroed before the launch) and returns whether
    it is the last of `arrivals` programs to do so; every store a program made before the call
    is visible to the last one after it. (Each thread fences its stores, the block syncs, the
    count is an acquire-release atomic, and the last program fences again before it reads.)"""
    gpu_fence(slot, FENCE)
    tl.debug_barrier()
    last = tl.atomic_add(cnt_ptr + slot, 1, sem="acq_rel", scope="gpu") == arrivals - 1
    if last:
        gpu_fence(slot, FENCE)
    return last
