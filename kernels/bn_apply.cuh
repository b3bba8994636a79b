// The fused apply pass of a conv unit and its backward (DESIGN.md §2):
//
//   u = (z - center) * scale + shift      per channel (each optional)
//   y = act_out(d[n] * act_mid(u) + res_scale * r)
//
// Forward: one read of z (and r), one write of y. Backward: one read of gy, z, y; writes
// dL/dz and dL/dr, and reduces Σ dL/du and Σ dL/du·(z - center) per channel (the β and γ
// gradients) through the two-level channel reduction; no atomics.
#pragma once

#include "bn_coeffs.cuh"
#include "channel_reduce.cuh"

namespace frk {

struct TailParams {
  const float* center;        // (C,) or null
  const float* scale;         // (C,) or null
  const float* shift;         // (C,) or null
  const float* branch_scale;  // (N,) or null
  float res_scale;
  bool relu_mid;
  bool relu_out;

  // Channel c's (center, scale, shift), identity where a vector is absent: the constants the
  // forward and the backward ops keep per lane.
  __device__ __forceinline__ void channel_consts(int64_t c, float* k) const {
    k[0] = center ? center[c] : 0.f;
    k[1] = scale ? scale[c] : 1.f;
    k[2] = shift ? shift[c] : 0.f;
  }
};

template <typename T>
struct EpilogueForwardOp {
  static constexpr int kConsts = 3;  // center, scale, shift
  static constexpr int kUnroll = 4;     // 4 x 32 bytes (z, residual) in flight per thread
  static constexpr int kMinBlocks = 2;  // <= 128 registers: 512 threads, 64 KiB loads per SM
  const T* __restrict__ z;
  const T* __restrict__ residual;  // may be null
  T* __restrict__ y;
  TailParams p;

  template <int VEC>
  struct Frag {
    Pack<T, VEC> z, r;
  };

  __device__ __forceinline__ void lane_consts(int64_t c, float* k) const {
    p.channel_consts(c, k);
  }
  template <int VEC, typename index_t>
  __device__ __forceinline__ void load(index_t i, Frag<VEC>& f) const {
    f.z = load_pack<VEC>(z + i);
    if (residual) f.r = load_pack<VEC>(residual + i);
  }
  template <int VEC, int KL, typename index_t>
  __device__ __forceinline__ void finish(index_t i, index_t n, const Frag<VEC>& f,
                                         const float (&k)[kConsts][KL]) const {
    float v[VEC], r[VEC];
    unpack<VEC>(f.z, v);
    if (residual) unpack<VEC>(f.r, r);
    const float d = p.branch_scale ? p.branch_scale[n] : 1.f;
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      const int kl = KL == 1 ? 0 : l;
      // Explicitly rounded steps: the backward rebuilds u for the ReLU mask with the same
      // operations, and an FMA contracted on one side only would flip the mask of values
      // within an ulp of 0.
      float u = v[l];
      if (p.center) u = __fsub_rn(u, k[0][kl]);
      if (p.scale) u = __fmul_rn(u, k[1][kl]);
      if (p.shift) u = __fadd_rn(u, k[2][kl]);
      if (p.relu_mid) u = relu(u);
      if (p.branch_scale) u = u * d;
      if (residual) u = u + (p.res_scale == 1.f ? r[l] : p.res_scale * r[l]);
      v[l] = p.relu_out ? relu(u) : u;
    }
    store_vec<VEC>(y + i, v);
  }
  bool aligned() const { return aligned16(z) && aligned16(residual) && aligned16(y); }
};

template <typename T>
cudaError_t launch_epilogue_forward(const EpilogueForwardOp<T>& op, const Shape& s,
                                    const LaunchConfig& cfg) {
  return launch_elementwise<EpilogueForwardOp<T>, vec_width<T>()>(op, s, cfg);
}

// Backward. With gw = relu_out ? relu_grad(gy, y) : gy (0 where y <= 0, else gy):
//   dL/dr = res_scale * gw;   gu = d[n] * gw, through relu_grad(., u) when relu_mid;
//   dL/dz = gu * scale;  sums: Σ gu (-> shift; center gets -scale Σ gu), Σ gu·(z - center).
template <typename T>
struct EpilogueBackwardOp {
  static constexpr int kConsts = 3;  // center, scale, shift
  static constexpr int kUnroll = 3;     // 3 x 48 bytes in flight per thread
  static constexpr int kMinBlocks = 2;  // <= 128 registers: 512 threads, 72 KiB loads per SM
  const T* __restrict__ gy;
  const T* __restrict__ z;  // needed for relu_mid or the centered sum, else may be null
  const T* __restrict__ y;  // needed for relu_out
  T* __restrict__ gz;       // null when not wanted
  T* __restrict__ gr;       // null when not wanted
  TailParams p;

  template <int VEC>
  struct Frag {
    Pack<T, VEC> gy, y, z;
  };

  __device__ __forceinline__ void lane_consts(int64_t c, float* k) const {
    p.channel_consts(c, k);
  }
  template <int VEC, typename index_t>
  __device__ __forceinline__ void load(index_t i, Frag<VEC>& f) const {
    f.gy = load_pack<VEC>(gy + i);
    if (p.relu_out) f.y = load_pack<VEC>(y + i);
    if (z) f.z = load_pack<VEC>(z + i);
  }
  template <int VEC, int KL, typename index_t>
  __device__ __forceinline__ void finish(index_t i, index_t n, const Frag<VEC>& f,
                                         const float (&k)[kConsts][KL], float (&ra)[VEC],
                                         float (&rb)[VEC]) const {
    float g[VEC], zc[VEC];
    unpack<VEC>(f.gy, g);
    if (p.relu_out) {
      float yv[VEC];
      unpack<VEC>(f.y, yv);
#pragma unroll
      for (int l = 0; l < VEC; ++l) g[l] = relu_grad(g[l], yv[l]);
    }
    if (gr) {
      float o[VEC];
#pragma unroll
      for (int l = 0; l < VEC; ++l) o[l] = p.res_scale == 1.f ? g[l] : g[l] * p.res_scale;
      store_vec<VEC>(gr + i, o);
    }
    if (z) {
      unpack<VEC>(f.z, zc);
#pragma unroll
      for (int l = 0; l < VEC; ++l) zc[l] = __fsub_rn(zc[l], k[0][KL == 1 ? 0 : l]);
    } else {
#pragma unroll
      for (int l = 0; l < VEC; ++l) zc[l] = 0.f;
    }
    const float d = p.branch_scale ? p.branch_scale[n] : 1.f;
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      const int kl = KL == 1 ? 0 : l;
      float gu = p.branch_scale ? g[l] * d : g[l];
      // The forward's u, rounded step by step as there (x 1 and + 0 are exact when the
      // forward skipped them).
      if (p.relu_mid) gu = relu_grad(gu, __fadd_rn(__fmul_rn(zc[l], k[1][kl]), k[2][kl]));
      ra[l] = gu;
      rb[l] = gu * zc[l];
      g[l] = gu * k[1][kl];
    }
    if (gz) store_vec<VEC>(gz + i, g);
  }
  bool aligned() const {
    return aligned16(gy) && aligned16(z) && aligned16(y) && aligned16(gz) && aligned16(gr);
  }
};

// Where the epilogue's scale = weight * rsqrt(var + eps) is a train-mode BatchNorm's
// (bn_epilogue_backward): that function's gradient, taken in the apply backward's finalize
// from dL/dscale = Σ dL/du·(z - center), as bn_scale_backward computes it.
struct BnScaleGrad {
  const float* var;
  const float* weight;  // may be null (affine=False)
  float eps;
  float* grad_var;      // null when not wanted (both null: no BatchNorm)
  float* grad_weight;   // null when not wanted
};

struct SumsFinalize {
  float* __restrict__ sum_gu;           // (C,)
  float* __restrict__ sum_gu_centered;  // (C,)
  const float* __restrict__ scale;      // (C,) or null (1)
  float* __restrict__ grad_center;      // (C,) -scale * Σ dL/du, or null (not wanted)
  BnScaleGrad bn;
  __device__ __forceinline__ void operator()(int64_t c, double a, double b) const {
    const float s = static_cast<float>(a);
    const float t = static_cast<float>(b);
    sum_gu[c] = s;
    sum_gu_centered[c] = t;
    if (grad_center) grad_center[c] = -(scale ? scale[c] : 1.f) * s;
    if (bn.grad_var || bn.grad_weight) {
      bn_scale_grads(t, bn.var[c], bn.weight, bn.eps, c, bn.grad_var, bn.grad_weight);
    }
  }
};

template <typename T>
inline ReducePlan plan_epilogue_backward(const EpilogueBackwardOp<T>& op, const Shape& s,
                                         int num_sms) {
  constexpr int V = vec_width<T>();
  return plan_reduce(s, (s.row() % V == 0 && op.aligned()) ? V : 1, num_sms,
                     EpilogueBackwardOp<T>::kMinBlocks, EpilogueBackwardOp<T>::kUnroll);
}

// s.numel() > 0; workspace: 2 * plan.splits * C doubles.
template <typename T>
cudaError_t launch_epilogue_backward(const EpilogueBackwardOp<T>& op, const SumsFinalize& fin,
                                     const Shape& s, const ReducePlan& p, double* workspace,
                                     const LaunchConfig& cfg) {
  return launch_channel_reduce<EpilogueBackwardOp<T>, SumsFinalize, vec_width<T>()>(
      op, fin, s, p, workspace, cfg);
}

}  // namespace frk
