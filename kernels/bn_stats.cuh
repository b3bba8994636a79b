// Batch statistics of BatchNorm: per-channel mean and biased variance (forward), their
// gradient (backward), and the finalize step (coefficients + running statistics).
//
// Statistics are shifted sums: every element of channel c is taken relative to K_c, the
// median of three of the channel's elements (its first, middle and last by (n, h, w)), and
// the two-level reduction adds Σ(x-K) and Σ(x-K)². With the shift, Σ(x-K)²/m - (Σ(x-K)/m)²
// does not cancel catastrophically when |mean| >> std (the failure of plain Σx, Σx²), and
// unlike per-element Welford it costs no division. What is left cancels in proportion to
// ((K - mean) / std)²: the sums past each thread are in double (channel_reduce.cuh), and K is
// a median so that one element far out in the tail is not the shift (with the first element
// alone as K, one element 300 std out there cost the variance 5e-5 of its 1e-5 budget; as
// one of three, 5e-8: kernels/emulate_stats_order.py, (8, 4, 64, 64) NHWC).
#pragma once

#include "bn_coeffs.cuh"
#include "channel_reduce.cuh"

namespace frk {

// The shift of a channel whose first element is v: v, or 0 when v is inf or NaN (an inf
// shift would make every difference NaN, and the mean NaN where x.mean() is inf).
__device__ __forceinline__ float stats_shift(float v) { return isfinite(v) ? v : 0.f; }

// Where channel c's three shift samples lie: x[c * step], x[c * step + mid] and
// x[c * step + last] (channel 0's element (N/2, HW/2) and (N-1, HW-1); all in bounds for a
// non-empty x).
struct ShiftAt {
  int64_t step, mid, last;
};

inline ShiftAt shift_at(const Shape& s) {
  const int64_t n2 = s.n / 2, hw2 = s.hw / 2;
  if (s.nhwc) return {1, (n2 * s.hw + hw2) * s.c, (s.n * s.hw - 1) * s.c};
  return {s.hw, n2 * s.c * s.hw + hw2, (s.n - 1) * s.c * s.hw + s.hw - 1};
}

template <typename T>
__device__ __forceinline__ float channel_shift(const T* __restrict__ x, int64_t c,
                                               const ShiftAt& at) {
  const int64_t base = c * at.step;
  const float a = stats_shift(to_f(x[base]));
  const float b = stats_shift(to_f(x[base + at.mid]));
  const float e = stats_shift(to_f(x[base + at.last]));
  return fmaxf(fminf(a, b), fminf(fmaxf(a, b), e));  // the median
}

template <typename T>
struct StatsOp {
  static constexpr int kConsts = 1;
  static constexpr int kUnroll = 4;     // 4 x 16 bytes in flight per thread
  static constexpr int kMinBlocks = 4;  // <= 64 registers: 1024 threads, 64 KiB loads per SM
  const T* __restrict__ x;
  ShiftAt at;

  template <int VEC>
  struct Frag {
    Pack<T, VEC> x;
  };

  __device__ __forceinline__ void lane_consts(int64_t c, float* k) const {
    k[0] = channel_shift(x, c, at);
  }
  template <int VEC, typename index_t>
  __device__ __forceinline__ void load(index_t i, Frag<VEC>& f) const {
    f.x = load_pack<VEC>(x + i);
  }
  template <int VEC, int KL, typename index_t>
  __device__ __forceinline__ void finish(index_t, index_t, const Frag<VEC>& f,
                                         const float (&k)[kConsts][KL], float (&ra)[VEC],
                                         float (&rb)[VEC]) const {
    float v[VEC];
    unpack<VEC>(f.x, v);
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      const float d = v[l] - k[0][KL == 1 ? 0 : l];
      ra[l] = d;
      rb[l] = d * d;
    }
  }
  bool aligned() const { return aligned16(x); }
};

template <typename T>
struct StatsFinalize {
  const T* __restrict__ x;
  ShiftAt at;
  double inv_count;
  float* __restrict__ mean;
  float* __restrict__ var;
  // A train-mode BatchNorm finalized on these statistics in the same launch (channel_stats_bn:
  // one launch fewer than channel_stats then bn_finalize), when has_bn.
  FinalizeArgs bn;
  bool has_bn;
  __device__ __forceinline__ void operator()(int64_t c, double sum, double sumsq) const {
    const double d = sum * inv_count;
    const float m = static_cast<float>(channel_shift(x, c, at) + d);
    const double v = sumsq * inv_count - d * d;
    // Clamps rounding below 0; a NaN stays NaN, as in torch.var.
    const float vf = static_cast<float>(v < 0.0 ? 0.0 : v);
    mean[c] = m;
    var[c] = vf;
    if (has_bn) bn_finalize_channel(bn, c, m, vf);
  }
};

template <typename T>
struct ChannelStatsArgs {
  const T* x;
  float* mean;  // (C,)
  float* var;   // (C,) biased
};

template <typename T>
inline ReducePlan plan_channel_stats(const ChannelStatsArgs<T>& a, const Shape& s,
                                     int num_sms) {
  constexpr int V = vec_width<T>();
  const int vec = (s.row() % V == 0 && aligned16(a.x)) ? V : 1;
  return plan_reduce(s, vec, num_sms, StatsOp<T>::kMinBlocks, StatsOp<T>::kUnroll);
}

// s.numel() > 0; workspace: 2 * plan.splits * C doubles. bn: a BatchNorm to finalize in the
// same launch (its mean and var fields are ignored: they are a.mean and a.var), or null.
template <typename T>
cudaError_t launch_channel_stats(const ChannelStatsArgs<T>& a, const Shape& s,
                                 const ReducePlan& p, double* workspace,
                                 const LaunchConfig& cfg, const FinalizeArgs* bn = nullptr) {
  const ShiftAt at = shift_at(s);
  StatsOp<T> op{a.x, at};
  StatsFinalize<T> fin{a.x, at, 1.0 / static_cast<double>(s.n * s.hw), a.mean,
                       a.var, bn ? *bn : FinalizeArgs{}, bn != nullptr};
  return launch_channel_reduce<StatsOp<T>, StatsFinalize<T>, vec_width<T>()>(op, fin, s, p,
                                                                            workspace, cfg);
}

// dL/dz = gz + gmean/m + 2*gvar*(z - mean)/m, m = N*H*W (gz, gmean, gvar each optional).
template <typename T>
struct StatsBackwardOp {
  static constexpr int kConsts = 3;  // gmean, gvar, mean
  static constexpr int kUnroll = 2;     // 2 x 32 bytes (gz, z) in flight per thread
  static constexpr int kMinBlocks = 3;  // <= 80 registers: 768 threads, 48 KiB loads per SM
  const T* __restrict__ gz;      // may be null
  const T* __restrict__ z;       // needed when gvar is given
  const float* __restrict__ gmean;
  const float* __restrict__ gvar;
  const float* __restrict__ mean;
  T* __restrict__ out;
  float inv_count;  // 1 / (N*H*W): a multiply, since fp32 division is a called slow path

  template <int VEC>
  struct Frag {
    Pack<T, VEC> g, z;
  };

  __device__ __forceinline__ void lane_consts(int64_t c, float* k) const {
    k[0] = gmean ? gmean[c] : 0.f;
    k[1] = gvar ? gvar[c] : 0.f;
    k[2] = gvar ? mean[c] : 0.f;
  }
  template <int VEC, typename index_t>
  __device__ __forceinline__ void load(index_t i, Frag<VEC>& f) const {
    if (gz) f.g = load_pack<VEC>(gz + i);
    if (gvar) f.z = load_pack<VEC>(z + i);
  }
  template <int VEC, int KL, typename index_t>
  __device__ __forceinline__ void finish(index_t i, index_t, const Frag<VEC>& f,
                                         const float (&k)[kConsts][KL]) const {
    float g[VEC], zv[VEC];
    if (gz) {
      unpack<VEC>(f.g, g);
    } else {
#pragma unroll
      for (int l = 0; l < VEC; ++l) g[l] = 0.f;
    }
    if (gvar) unpack<VEC>(f.z, zv);
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      const int kl = KL == 1 ? 0 : l;
      if (gmean) g[l] += k[0][kl] * inv_count;
      if (gvar) g[l] += (k[1][kl] * 2.f) * (zv[l] - k[2][kl]) * inv_count;
    }
    store_vec<VEC>(out + i, g);
  }
  bool aligned() const { return aligned16(gz) && aligned16(z) && aligned16(out); }
};

template <typename T>
cudaError_t launch_stats_backward(const StatsBackwardOp<T>& op, const Shape& s,
                                  const LaunchConfig& cfg) {
  return launch_elementwise<StatsBackwardOp<T>, vec_width<T>()>(op, s, cfg);
}

// BatchNorm finalize (bn_coeffs.cuh), one thread per channel.
__global__ void __launch_bounds__(kThreads) bn_finalize_kernel(FinalizeArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= a.c) return;
  bn_finalize_channel(a, c, a.mean[c], a.var[c]);
}

inline cudaError_t launch_bn_finalize(const FinalizeArgs& a, const LaunchConfig& cfg) {
  if (a.c == 0) return cudaSuccess;
  const int64_t blocks = (a.c + kThreads - 1) / kThreads;
  bn_finalize_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, cfg.stream>>>(a);
  return cudaGetLastError();
}

// A train-mode BatchNorm's scale from the batch variance, and its backward, one thread per
// channel (the scale is differentiable, the finalize above is not):
//   scale = weight * rsqrt(var + eps)
//   grad_var = -grad * weight * rstd^3 / 2,  grad_weight = grad * rstd
struct ScaleArgs {
  const float* var;
  const float* weight;  // may be null (affine=False)
  const float* grad;    // backward only
  float* scale;         // forward only
  float* grad_var;      // backward; null when not wanted
  float* grad_weight;   // backward; null when not wanted
  int64_t c;
  float eps;
};

__global__ void __launch_bounds__(kThreads) bn_scale_kernel(ScaleArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= a.c) return;
  const float r = bn_rstd(a.var[c], a.eps);
  a.scale[c] = a.weight ? __fmul_rn(r, a.weight[c]) : r;
}

__global__ void __launch_bounds__(kThreads) bn_scale_backward_kernel(ScaleArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= a.c) return;
  bn_scale_grads(a.grad[c], a.var[c], a.weight, a.eps, c, a.grad_var, a.grad_weight);
}

inline cudaError_t launch_bn_scale(const ScaleArgs& a, bool backward, const LaunchConfig& cfg) {
  if (a.c == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>((a.c + kThreads - 1) / kThreads);
  if (backward) {
    bn_scale_backward_kernel<<<blocks, kThreads, 0, cfg.stream>>>(a);
  } else {
    bn_scale_kernel<<<blocks, kThreads, 0, cfg.stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace frk
