// A train-mode BatchNorm's per-channel coefficient math: the finalize (scale, shift, running
// statistics, num_batches_tracked) and the gradient of its scale. Their own kernels
// (bn_stats.cuh: one thread per channel) and the reductions that do the same work in their
// last launch (the statistics pass's finalize, channel_stats_bn; the apply backward's,
// bn_epilogue_backward) call these functions, so a merged launch computes, to the bit, what
// the separate kernels do.
#pragma once

#include "common.cuh"

namespace frk {

// 1 / sqrt, each correctly rounded, as the CPU kernel and eager BatchNorm compute it (rsqrtf
// is up to 2 ulp off).
__device__ __forceinline__ float bn_rstd(float v, float eps) {
  return __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(v, eps)));
}

// nn.BatchNorm2d's training finalize, per channel:
//   scale = weight * rsqrt(var + eps), shift = bias - mean * scale
//   f = momentum, or 1 / num_batches_tracked when momentum is None (the caller has then
//   incremented num_batches_tracked on the same stream, before the launch)
//   running_mean = running_mean * (1 - f) + mean * f
//   running_var  = running_var * (1 - f) + (var * count / (count - 1)) * f
// Explicit _rn intrinsics keep nvcc from contracting into FMAs, so the update rounds like
// the eager one.
struct FinalizeArgs {
  const float* mean;
  const float* var;
  const float* weight;  // may be null (affine=False)
  const float* bias;    // may be null
  float* running_mean;  // may be null (track_running_stats=False)
  float* running_var;
  // Read when momentum_none; incremented by channel 0's thread when bump_count (with a
  // momentum nothing in the launch reads it, so no other thread can see it half-done).
  int64_t* num_batches_tracked;
  float* scale;
  float* shift;  // may be null (not wanted)
  int64_t c;
  float momentum;
  bool momentum_none;
  bool bump_count;
  float eps;
  float unbias;  // count / (count - 1), rounded to fp32 as eager does
  bool update;   // running statistics present and count > 0
};

// Channel c of the finalize, given its batch mean m and biased variance v.
__device__ __forceinline__ void bn_finalize_channel(const FinalizeArgs& a, int64_t c, float m,
                                                    float v) {
  float sc = bn_rstd(v, a.eps);
  if (a.weight) sc = __fmul_rn(sc, a.weight[c]);
  a.scale[c] = sc;
  if (a.shift) a.shift[c] = __fsub_rn(a.bias ? a.bias[c] : 0.f, __fmul_rn(m, sc));
  if (a.bump_count && c == 0) *a.num_batches_tracked += 1;
  if (!a.update) return;
  const float f = a.momentum_none
                      ? __fdiv_rn(1.f, static_cast<float>(*a.num_batches_tracked))
                      : a.momentum;
  const float keep = __fsub_rn(1.f, f);
  a.running_mean[c] = __fadd_rn(__fmul_rn(a.running_mean[c], keep), __fmul_rn(m, f));
  a.running_var[c] =
      __fadd_rn(__fmul_rn(a.running_var[c], keep), __fmul_rn(__fmul_rn(v, a.unbias), f));
}

// The gradient of scale = weight * rsqrt(var + eps) given g = dL/dscale of channel c:
//   grad_var = -g * weight * rstd^3 / 2,  grad_weight = g * rstd   (each output may be null)
__device__ __forceinline__ void bn_scale_grads(float g, float v, const float* weight, float eps,
                                               int64_t c, float* grad_var,
                                               float* grad_weight) {
  const float r = bn_rstd(v, eps);
  if (grad_weight) grad_weight[c] = g * r;
  if (grad_var) grad_var[c] = (weight ? g * weight[c] : g) * (r * r * r) * -0.5f;
}

}  // namespace frk
