// CPU implementations of the fused_res_C ops.
//
// Every op walks "rows": an (n, c) plane of HW elements (NCHW) or a pixel of C channels
// (NHWC). Rows are split across threads with at::parallel_for; inside a row the work runs
// on fp32 chunks of kChunk elements in plain loops that the compiler vectorizes (the fp16 /
// bf16 conversions are done chunk-wise on the way in and out). Reductions accumulate in
// double from the first element (a float running sum over a few thousand elements lost
// 1e-4 of a variance whose shift was far from the mean: fp32's budget is 1e-5) and are
// two-level: per-row (NCHW) or per-block-of-rows (NHWC) partials combined in a fixed order,
// so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "../ops.h"

namespace fused_res {
namespace {

constexpr int64_t kChunk = 512;

template <typename T>
inline void to_float(const T* src, float* dst, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<T>(src[j]);
}

// float16 <-> float32: c10::Half's conversions are bit manipulations the compiler does not
// vectorize for the generic x86-64 target, which made every float16 pass ~5x a bfloat16 one
// (benchmarks/cpu_ops.py). Where the CPU has F16C (most x86-64 CPUs since 2012, though not
// every low-end part), its conversions run 8 at a time: exact, round-to-nearest-even as c10's,
// in functions compiled for F16C alone and chosen at run time, so the extension still runs on
// a CPU without it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* src, float* dst,
                                                             int64_t len) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(h));
  }
  for (; j < len; ++j) dst[j] = static_cast<float>(src[j]);
}

__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* src, c10::Half* dst,
                                                             int64_t len) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j), h);
  }
  for (; j < len; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}

// Asked once, on first use (not at load: __builtin_cpu_supports is only reliable in a static
// initializer after __builtin_cpu_init, and GCC's checks for avx include the OS's support).
bool have_f16c() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  }();
  return yes;
}

template <>
inline void to_float<c10::Half>(const c10::Half* src, float* dst, int64_t len) {
  if (have_f16c()) {
    half_to_float_f16c(src, dst, len);
    return;
  }
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<float>(src[j]);
}

template <>
inline void from_float<c10::Half>(const float* src, c10::Half* dst, int64_t len) {
  if (have_f16c()) {
    float_to_half_f16c(src, dst, len);
    return;
  }
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}
#endif

inline float relu(float v) { return v < 0.f ? 0.f : v; }  // keeps NaN, like torch.relu
// torch.relu's backward (threshold_backward): 0 where out <= 0, else g -- a NaN gradient
// where the unit was off is dropped, one where out is NaN passes.
inline float relu_grad(float g, float out) { return out <= 0.f ? 0.f : g; }

// Independent partial sums per chunk in the NCHW reductions (see backward_chunk).
constexpr int kLanes = 8;

// Per-channel constants expanded to full length (defaults 0 / 1 / 0), so the inner loops
// have no per-element branches on whether a vector was given.
struct ChannelConsts {
  std::vector<float> center, scale, shift;
  ChannelConsts(int64_t c, const float* ce, const float* sc, const float* sh)
      : center(c, 0.f), scale(c, 1.f), shift(c, 0.f) {
    if (ce) std::copy(ce, ce + c, center.begin());
    if (sc) std::copy(sc, sc + c, scale.begin());
    if (sh) std::copy(sh, sh + c, shift.begin());
  }
};

// Rows per NHWC reduction block: a function of the shape only (determinism).
inline int64_t nhwc_block_rows(int64_t c) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(c, 1)); }

// ---- channel_stats ------------------------------------------------------------------------

template <typename T>
void channel_stats_kernel(const T* x, const Layout& L, float* mean, float* var) {
  const int64_t C = L.c, HW = L.hw, m = L.n * L.hw;
  // Shift K_c = the channel's first element, 0 when it is not finite (see
  // kernels/bn_stats.cuh).
  std::vector<float> K(C);
  for (int64_t c = 0; c < C; ++c) {
    const float v = static_cast<float>(x[L.nhwc ? c : c * HW]);
    K[c] = std::isfinite(v) ? v : 0.f;
  }
  std::vector<double> S, SS;
  if (!L.nhwc) {
    const int64_t rows = L.n * C;
    S.assign(rows, 0.0);
    SS.assign(rows, 0.0);
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      float buf[kChunk];
      for (int64_t r = r0; r < r1; ++r) {
        const float k = K[r % C];
        const T* row = x + r * HW;
        double s = 0.0, ss = 0.0;
        for (int64_t j0 = 0; j0 < HW; j0 += kChunk) {
          const int64_t len = std::min(kChunk, HW - j0);
          to_float(row + j0, buf, len);
          for (int64_t j = 0; j < len; ++j) {
            const double d = static_cast<double>(buf[j]) - k;
            s += d;
            ss += d * d;
          }
        }
        S[r] = s;
        SS[r] = ss;
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.0, ss = 0.0;
      for (int64_t n = 0; n < L.n; ++n) {
        s += S[n * C + c];
        ss += SS[n * C + c];
      }
      const double d = s / m;
      mean[c] = static_cast<float>(K[c] + d);
      var[c] = static_cast<float>(std::max(ss / m - d * d, 0.0));
    }
    return;
  }
  const int64_t rows = L.n * HW, br = nhwc_block_rows(C);
  const int64_t blocks = (rows + br - 1) / br;
  S.assign(blocks * C, 0.0);
  SS.assign(blocks * C, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(C);
    std::vector<double> cs(C), css(C);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(cs.begin(), cs.end(), 0.0);
      std::fill(css.begin(), css.end(), 0.0);
      for (int64_t r = b * br; r < std::min(rows, (b + 1) * br); ++r) {
        to_float(x + r * C, buf.data(), C);
        for (int64_t c = 0; c < C; ++c) {
          const double d = static_cast<double>(buf[c]) - K[c];
          cs[c] += d;
          css[c] += d * d;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        S[b * C + c] = cs[c];
        SS[b * C + c] = css[c];
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double s = 0.0, ss = 0.0;
    for (int64_t b = 0; b < blocks; ++b) {
      s += S[b * C + c];
      ss += SS[b * C + c];
    }
    const double d = s / m;
    mean[c] = static_cast<float>(K[c] + d);
    var[c] = static_cast<float>(std::max(ss / m - d * d, 0.0));
  }
}

// ---- stats_backward -----------------------------------------------------------------------

template <typename T>
void stats_backward_kernel(const T* gz, const T* z, const float* gmean, const float* gvar,
                           const float* mean, T* out, const Layout& L) {
  const int64_t C = L.c, HW = L.hw;
  const float inv = 1.f / static_cast<float>(L.n * HW);
  const int64_t rows = L.nhwc ? L.n * HW : L.n * C, cols = L.nhwc ? C : HW;
  // Per channel: g = gz + a + b * (z - mean), with a = gmean / m, b = 2 * gvar / m.
  std::vector<float> A(C, 0.f), B(C, 0.f), M(C, 0.f);
  for (int64_t c = 0; c < C; ++c) {
    if (gmean) A[c] = gmean[c] * inv;
    if (gvar) {
      B[c] = gvar[c] * 2.f;
      M[c] = mean[c];
    }
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                   [&](int64_t r0, int64_t r1) {
    float g[kChunk], zz[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t j0 = 0; j0 < cols; j0 += kChunk) {
        const int64_t len = std::min(kChunk, cols - j0), off = r * cols + j0;
        if (gz) to_float(gz + off, g, len); else std::fill(g, g + len, 0.f);
        if (gvar) to_float(z + off, zz, len); else std::fill(zz, zz + len, 0.f);
        if (L.nhwc) {
          for (int64_t j = 0; j < len; ++j) {
            const int64_t c = j0 + j;
            g[j] = (g[j] + A[c]) + B[c] * (zz[j] - M[c]) * inv;
          }
        } else {
          const int64_t c = r % C;
          const float a = A[c], b = B[c], mu = M[c];
          for (int64_t j = 0; j < len; ++j) g[j] = (g[j] + a) + b * (zz[j] - mu) * inv;
        }
        from_float(g, out + off, len);
      }
    }
  });
}

// ---- epilogue forward ---------------------------------------------------------------------

struct Tail {
  const float* branch_scale;
  float res_scale;
  bool relu_mid, relu_out;
};

// One chunk of one row: v holds z on entry and y on exit; per-element channel constants
// (NHWC) or one constant per chunk (NCHW). The flags are template arguments, so that the one
// loop has no branch on them and the compiler vectorizes it (the ReLUs become selects): with
// the flags tested per element it compiled to branches, and the ReLU's branch on random data
// mispredicted half the time (a residual block's tail ran at 12 ns an element, 30x aten's
// BN + add + ReLU).
template <bool PER_ELEMENT, bool RELU_MID, bool BRANCH, int RES, bool RELU_OUT>
inline void apply_chunk(float* __restrict__ v, const float* __restrict__ r, int64_t len,
                        const float* __restrict__ ce, const float* __restrict__ sc,
                        const float* __restrict__ sh, float d, float rs) {
  const float c0 = ce[0], s0 = sc[0], h0 = sh[0];
  for (int64_t j = 0; j < len; ++j) {
    float u = PER_ELEMENT ? (v[j] - ce[j]) * sc[j] + sh[j] : (v[j] - c0) * s0 + h0;
    if constexpr (RELU_MID) u = relu(u);
    if constexpr (BRANCH) u = u * d;
    if constexpr (RES == 1) u = u + r[j];
    if constexpr (RES == 2) u = u + rs * r[j];
    if constexpr (RELU_OUT) u = relu(u);
    v[j] = u;
  }
}

// f(std::bool_constant<b>{}): a runtime flag as a compile-time one.
template <typename F>
inline void with_flag(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename T, bool PER_ELEMENT, bool RELU_MID, bool BRANCH, int RES, bool RELU_OUT>
void epilogue_rows(const T* z, const T* res, T* y, const ChannelConsts& k, const Tail& t,
                   const Layout& L) {
  const int64_t C = L.c, HW = L.hw;
  const int64_t rows = L.nhwc ? L.n * HW : L.n * C, cols = L.nhwc ? C : HW;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                   [&](int64_t r0, int64_t r1) {
    float v[kChunk], rr[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = L.nhwc ? r / HW : r / C;
      const float d = BRANCH ? t.branch_scale[n] : 1.f;
      for (int64_t j0 = 0; j0 < cols; j0 += kChunk) {
        const int64_t len = std::min(kChunk, cols - j0), off = r * cols + j0;
        to_float(z + off, v, len);
        if constexpr (RES != 0) to_float(res + off, rr, len);
        const int64_t c = L.nhwc ? j0 : r % C;
        apply_chunk<PER_ELEMENT, RELU_MID, BRANCH, RES, RELU_OUT>(
            v, rr, len, &k.center[c], &k.scale[c], &k.shift[c], d, t.res_scale);
        from_float(v, y + off, len);
      }
    }
  });
}

template <typename T>
void epilogue_kernel(const T* z, const T* res, T* y, const ChannelConsts& k, const Tail& t,
                     const Layout& L) {
  const int res_kind = res == nullptr ? 0 : (t.res_scale == 1.f ? 1 : 2);
  with_flag(L.nhwc, [&](auto per_element) {
    with_flag(t.relu_mid, [&](auto relu_mid) {
      with_flag(t.branch_scale != nullptr, [&](auto branch) {
        with_flag(t.relu_out, [&](auto relu_out) {
          constexpr bool P = decltype(per_element)::value, M = decltype(relu_mid)::value,
                         B = decltype(branch)::value, O = decltype(relu_out)::value;
          if (res_kind == 0) {
            epilogue_rows<T, P, M, B, 0, O>(z, res, y, k, t, L);
          } else if (res_kind == 1) {
            epilogue_rows<T, P, M, B, 1, O>(z, res, y, k, t, L);
          } else {
            epilogue_rows<T, P, M, B, 2, O>(z, res, y, k, t, L);
          }
        });
      });
    });
  });
}

// ---- epilogue backward --------------------------------------------------------------------

// One chunk: g holds gy on entry. Writes dL/dr into gr_out (if given), dL/dz into g, and adds
// Σ gu, Σ gu·(z - center) into sa, sb: per element (NHWC: a row is the C channels) or into
// sa[0], sb[0] (NCHW: the chunk is one channel's). zc is scratch of len floats. One simple
// loop per step, each free of branches on the flags, so that each vectorizes (the ReLU masks
// were branches on the data, as in apply_chunk; one loop with the flags as template arguments
// did not vectorize here and ran 3x slower with relu_mid).
inline void backward_chunk(float* __restrict__ g, const float* __restrict__ zz,
                           const float* __restrict__ yy, float* __restrict__ gr_out,
                           float* __restrict__ zc, int64_t len, const float* __restrict__ ce,
                           const float* __restrict__ sc, const float* __restrict__ sh,
                           bool per_element, float d, const Tail& t, bool has_z,
                           double* __restrict__ sa, double* __restrict__ sb) {
  if (t.relu_out) {
    for (int64_t j = 0; j < len; ++j) g[j] = relu_grad(g[j], yy[j]);
  }
  if (gr_out) {
    if (t.res_scale == 1.f) {
      std::copy(g, g + len, gr_out);
    } else {
      const float rs = t.res_scale;
      for (int64_t j = 0; j < len; ++j) gr_out[j] = g[j] * rs;
    }
  }
  if (!has_z) {
    std::fill(zc, zc + len, 0.f);
  } else if (per_element) {
    for (int64_t j = 0; j < len; ++j) zc[j] = zz[j] - ce[j];
  } else {
    const float c0 = ce[0];
    for (int64_t j = 0; j < len; ++j) zc[j] = zz[j] - c0;
  }
  if (t.branch_scale) {
    for (int64_t j = 0; j < len; ++j) g[j] = g[j] * d;
  }
  if (per_element) {
    if (t.relu_mid) {
      for (int64_t j = 0; j < len; ++j) g[j] = relu_grad(g[j], zc[j] * sc[j] + sh[j]);
    }
    for (int64_t j = 0; j < len; ++j) {
      sa[j] += g[j];
      sb[j] += g[j] * zc[j];
    }
    for (int64_t j = 0; j < len; ++j) g[j] = g[j] * sc[j];
    return;
  }
  const float s0 = sc[0], h0 = sh[0];
  if (t.relu_mid) {
    for (int64_t j = 0; j < len; ++j) g[j] = relu_grad(g[j], zc[j] * s0 + h0);
  }
  // kLanes independent double sums, added up in lane order: a fixed order (the result does
  // not depend on the thread count) that the compiler can vectorize.
  double la[kLanes] = {}, lb[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      la[l] += g[j + l];
      lb[l] += g[j + l] * zc[j + l];
    }
  }
  for (int l = 0; j < len; ++j, ++l) {
    la[l] += g[j];
    lb[l] += g[j] * zc[j];
  }
  for (int l = 0; l < kLanes; ++l) {
    sa[0] += la[l];
    sb[0] += lb[l];
  }
  for (int64_t i = 0; i < len; ++i) g[i] = g[i] * s0;
}

template <typename T>
void epilogue_backward_kernel(const T* gy, const T* z, const T* y, T* gz, T* gr,
                              const ChannelConsts& k, const Tail& t, const Layout& L,
                              float* sum_gu, float* sum_guc) {
  const int64_t C = L.c, HW = L.hw;
  const bool has_z = z != nullptr;
  if (!L.nhwc) {
    const int64_t rows = L.n * C;
    std::vector<double> S(rows), SS(rows);
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      float g[kChunk], zz[kChunk], yy[kChunk], gro[kChunk], zc[kChunk];
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r % C;
        const float d = t.branch_scale ? t.branch_scale[r / C] : 1.f;
        double s = 0.0, ss = 0.0;
        for (int64_t j0 = 0; j0 < HW; j0 += kChunk) {
          const int64_t len = std::min(kChunk, HW - j0), off = r * HW + j0;
          to_float(gy + off, g, len);
          if (has_z) to_float(z + off, zz, len);
          if (t.relu_out) to_float(y + off, yy, len);
          double sa = 0.0, sb = 0.0;
          backward_chunk(g, zz, yy, gr ? gro : nullptr, zc, len, &k.center[c], &k.scale[c],
                         &k.shift[c], false, d, t, has_z, &sa, &sb);
          s += sa;
          ss += sb;
          if (gr) from_float(gro, gr + off, len);
          if (gz) from_float(g, gz + off, len);
        }
        S[r] = s;
        SS[r] = ss;
      }
    });
    if (sum_gu) {
      for (int64_t c = 0; c < C; ++c) {
        double s = 0.0, ss = 0.0;
        for (int64_t n = 0; n < L.n; ++n) {
          s += S[n * C + c];
          ss += SS[n * C + c];
        }
        sum_gu[c] = static_cast<float>(s);
        if (sum_guc) sum_guc[c] = static_cast<float>(ss);
      }
    }
    return;
  }
  const int64_t rows = L.n * HW, br = nhwc_block_rows(C);
  const int64_t blocks = (rows + br - 1) / br;
  std::vector<double> S(blocks * C), SS(blocks * C);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> g(C), zz(C), yy(C), gro(C), zc(C);
    std::vector<double> sa(C), sb(C);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(sa.begin(), sa.end(), 0.0);
      std::fill(sb.begin(), sb.end(), 0.0);
      for (int64_t r = b * br; r < std::min(rows, (b + 1) * br); ++r) {
        const float d = t.branch_scale ? t.branch_scale[r / HW] : 1.f;
        const int64_t off = r * C;
        to_float(gy + off, g.data(), C);
        if (has_z) to_float(z + off, zz.data(), C);
        if (t.relu_out) to_float(y + off, yy.data(), C);
        backward_chunk(g.data(), zz.data(), yy.data(), gr ? gro.data() : nullptr, zc.data(),
                       C, k.center.data(), k.scale.data(), k.shift.data(), true, d, t, has_z,
                       sa.data(), sb.data());
        if (gr) from_float(gro.data(), gr + off, C);
        if (gz) from_float(g.data(), gz + off, C);
      }
      for (int64_t c = 0; c < C; ++c) {
        S[b * C + c] = sa[c];
        SS[b * C + c] = sb[c];
      }
    }
  });
  if (sum_gu) {
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.0, ss = 0.0;
      for (int64_t b = 0; b < blocks; ++b) {
        s += S[b * C + c];
        ss += SS[b * C + c];
      }
      sum_gu[c] = static_cast<float>(s);
      if (sum_guc) sum_guc[c] = static_cast<float>(ss);
    }
  }
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fused_res_C: ", name, " is on ", t.device(),
              "; the CPU implementation was called");
}

}  // namespace

// ---- op entry points ----------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> channel_stats_cpu(const at::Tensor& x_in) {
  check_feature_map(x_in, "x");
  check_cpu(x_in, "x");
  Layout L;
  const at::Tensor x = canonical(x_in, &L);
  at::Tensor mean = at::zeros({L.c}, x.options().dtype(at::kFloat));
  at::Tensor var = at::zeros({L.c}, x.options().dtype(at::kFloat));
  if (L.numel() == 0) return {mean, var};
  FUSED_RES_DISPATCH(x.scalar_type(), "channel_stats",
                                  [&] {
    channel_stats_kernel<scalar_t>(x.data_ptr<scalar_t>(), L, mean.data_ptr<float>(),
                                   var.data_ptr<float>());
  });
  return {mean, var};
}

at::Tensor stats_backward_cpu(const OptTensor& gz, const OptTensor& gmean, const OptTensor& gvar,
                              const at::Tensor& z_in, const at::Tensor& mean_in) {
  check_feature_map(z_in, "z");
  check_cpu(z_in, "z");
  Layout L;
  const at::Tensor z = canonical(z_in, &L);
  OptTensor g = gz.has_value() ? OptTensor(like_primary(*gz, z_in, L, "gz")) : std::nullopt;
  const OptTensor gm = vec_f32(gmean, L.c, z_in, "gmean", "channel");
  const OptTensor gv = vec_f32(gvar, L.c, z_in, "gvar", "channel");
  const OptTensor mean = vec_f32(mean_in, L.c, z_in, "mean", "channel");
  at::Tensor out = at::empty_like(z, z.options(), L.format());
  if (L.numel() == 0) return out;
  FUSED_RES_DISPATCH(z.scalar_type(), "stats_backward",
                                  [&] {
    stats_backward_kernel<scalar_t>(g ? g->data_ptr<scalar_t>() : nullptr,
                                    z.data_ptr<scalar_t>(), fptr(gm), fptr(gv), fptr(mean),
                                    out.data_ptr<scalar_t>(), L);
  });
  return out;
}

at::Tensor epilogue_cpu(const at::Tensor& z_in, const OptTensor& center, const OptTensor& scale,
                        const OptTensor& shift, bool relu_mid, const OptTensor& residual,
                        double res_scale, const OptTensor& branch_scale, bool relu_out) {
  check_cpu(z_in, "z");
  const EpilogueInputs in = prepare_epilogue(z_in, center, scale, shift, residual,
                                             branch_scale);
  at::Tensor y = at::empty_like(in.z, in.z.options(), in.layout.format());
  if (in.layout.numel() == 0) return y;
  const ChannelConsts k(in.layout.c, fptr(in.center), fptr(in.scale), fptr(in.shift));
  const Tail t{fptr(in.branch_scale), static_cast<float>(res_scale), relu_mid, relu_out};
  FUSED_RES_DISPATCH(in.z.scalar_type(), "epilogue",
                                  [&] {
    epilogue_kernel<scalar_t>(in.z.data_ptr<scalar_t>(),
                              in.residual ? in.residual->data_ptr<scalar_t>() : nullptr,
                              y.data_ptr<scalar_t>(), k, t, in.layout);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> epilogue_backward_cpu(
    const at::Tensor& gy_in, const OptTensor& z, const OptTensor& y, const OptTensor& center,
    const OptTensor& scale, const OptTensor& shift, bool relu_mid, double res_scale,
    const OptTensor& branch_scale, bool relu_out, bool need_gz, bool need_gr, bool need_sums,
    bool need_center_grad) {
  check_cpu(gy_in, "gy");
  const BackwardInputs in = prepare_epilogue_backward(gy_in, z, y, center, scale, shift,
                                                      relu_mid, branch_scale, relu_out);
  const Layout& L = in.layout;
  const auto fmt = L.format();
  at::Tensor gz = need_gz ? at::empty_like(in.gy, in.gy.options(), fmt)
                          : at::empty({0}, in.gy.options());
  at::Tensor gr = need_gr ? at::empty_like(in.gy, in.gy.options(), fmt)
                          : at::empty({0}, in.gy.options());
  // The center's gradient comes from Σ dL/du: reduced whenever either is asked for.
  const bool reduce = need_sums || need_center_grad;
  at::Tensor s1 = reduce ? at::zeros({L.c}, in.gy.options().dtype(at::kFloat))
                         : empty_vec(in.gy);
  at::Tensor s2 = (need_sums && in.z) ? at::zeros({L.c}, in.gy.options().dtype(at::kFloat))
                                      : empty_vec(in.gy);
  at::Tensor gc = need_center_grad ? at::zeros({L.c}, in.gy.options().dtype(at::kFloat))
                                   : empty_vec(in.gy);
  if (L.numel() == 0) return {gz, gr, need_sums ? s1 : empty_vec(in.gy), s2, gc};
  const ChannelConsts k(L.c, fptr(in.center), fptr(in.scale), fptr(in.shift));
  const Tail t{fptr(in.branch_scale), static_cast<float>(res_scale), relu_mid, relu_out};
  FUSED_RES_DISPATCH(in.gy.scalar_type(),
                                  "epilogue_backward", [&] {
    epilogue_backward_kernel<scalar_t>(
        in.gy.data_ptr<scalar_t>(), in.z ? in.z->data_ptr<scalar_t>() : nullptr,
        in.y ? in.y->data_ptr<scalar_t>() : nullptr,
        need_gz ? gz.data_ptr<scalar_t>() : nullptr,
        need_gr ? gr.data_ptr<scalar_t>() : nullptr, k, t, L,
        reduce ? s1.data_ptr<float>() : nullptr,
        (need_sums && in.z) ? s2.data_ptr<float>() : nullptr);
  });
  if (need_center_grad) {
    const float* sc = fptr(in.scale);
    const float* s = s1.data_ptr<float>();
    float* g = gc.data_ptr<float>();
    for (int64_t c = 0; c < L.c; ++c) g[c] = -(sc ? sc[c] : 1.f) * s[c];
  }
  return {gz, gr, need_sums ? s1 : empty_vec(in.gy), s2, gc};
}

std::tuple<at::Tensor, at::Tensor> bn_finalize_cpu(
    const at::Tensor& mean, const at::Tensor& var, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, std::optional<double> momentum, double eps,
    int64_t count) {
  check_cpu(mean, "mean");
  const FinalizeInputs in = prepare_finalize(mean, var, weight, bias, running_mean, running_var,
                                             num_batches_tracked, momentum, count);
  const int64_t C = in.mean.size(0);
  at::Tensor scale = at::empty({C}, in.mean.options());
  at::Tensor shift = at::empty({C}, in.mean.options());
  const bool track = running_mean.has_value();
  if (track && num_batches_tracked.has_value()) num_batches_tracked->add_(1);
  float f = 0.f;
  if (in.update) {
    // Eager: factor = 1 / num_batches_tracked.to(float32) when momentum is None.
    f = momentum.has_value()
            ? static_cast<float>(*momentum)
            : 1.f / static_cast<float>(num_batches_tracked->item<int64_t>());
  }
  const float* m = in.mean.data_ptr<float>();
  const float* v = in.var.data_ptr<float>();
  const float* w = fptr(in.weight);
  const float* b = fptr(in.bias);
  float* sc = scale.data_ptr<float>();
  float* sh = shift.data_ptr<float>();
  float* rm = in.update ? running_mean->data_ptr<float>() : nullptr;
  float* rv = in.update ? running_var->data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps), keep = 1.f - f;
  for (int64_t c = 0; c < C; ++c) {
    float s = 1.f / std::sqrt(v[c] + e);
    if (w) s = s * w[c];
    sc[c] = s;
    sh[c] = (b ? b[c] : 0.f) - m[c] * s;
    if (rm) {
      rm[c] = rm[c] * keep + m[c] * f;
      rv[c] = rv[c] * keep + (v[c] * in.unbias) * f;
    }
  }
  return {scale, shift};
}

// 1 / sqrt, each correctly rounded, as torch.rsqrt computes it on the CPU.
static inline float bn_rstd(float v, float eps) { return 1.f / std::sqrt(v + eps); }

at::Tensor bn_scale_cpu(const at::Tensor& var, const OptTensor& weight, double eps) {
  check_cpu(var, "var");
  const ScaleInputs in = prepare_scale(var, weight, std::nullopt);
  const int64_t C = in.var.size(0);
  at::Tensor scale = at::empty({C}, in.var.options());
  const float* v = in.var.data_ptr<float>();
  const float* w = fptr(in.weight);
  float* sc = scale.data_ptr<float>();
  const float e = static_cast<float>(eps);
  for (int64_t c = 0; c < C; ++c) {
    const float r = bn_rstd(v[c], e);
    sc[c] = w ? r * w[c] : r;
  }
  return scale;
}

std::tuple<at::Tensor, at::Tensor> bn_scale_backward_cpu(const at::Tensor& grad,
                                                         const at::Tensor& var,
                                                         const OptTensor& weight, double eps,
                                                         bool need_var, bool need_weight) {
  check_cpu(var, "var");
  const ScaleInputs in = prepare_scale(var, weight, grad);
  const int64_t C = in.var.size(0);
  need_weight = need_weight && weight.has_value();
  at::Tensor gv = need_var ? at::empty({C}, in.var.options()) : empty_vec(in.var);
  at::Tensor gw = need_weight ? at::empty({C}, in.var.options()) : empty_vec(in.var);
  const float* v = in.var.data_ptr<float>();
  const float* w = fptr(in.weight);
  const float* g = in.grad->data_ptr<float>();
  float* pv = need_var ? gv.data_ptr<float>() : nullptr;
  float* pw = need_weight ? gw.data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  for (int64_t c = 0; c < C; ++c) {
    const float r = bn_rstd(v[c], e);
    if (pw) pw[c] = g[c] * r;
    if (pv) pv[c] = (w ? g[c] * w[c] : g[c]) * (r * r * r) * -0.5f;
  }
  if (need_weight) gw = gw.to(weight->scalar_type());
  return {gv, gw};
}

// The pairs the CUDA kernels run in one launch; here the two ops, one after the other (the
// results are theirs by construction, and the CUDA ones are tested against them).
std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_stats_bn_cpu(
    const at::Tensor& x, const OptTensor& weight, const at::Tensor& running_mean,
    const at::Tensor& running_var, const OptTensor& num_batches_tracked, double momentum,
    double eps) {
  check_feature_map(x, "x");
  check_cpu(x, "x");
  auto [mean, var] = channel_stats_cpu(x);
  const int64_t count = x.size(0) * x.size(2) * x.size(3);
  at::Tensor scale = std::get<0>(bn_finalize_cpu(mean, var, weight, std::nullopt, running_mean,
                                                 running_var, num_batches_tracked, momentum,
                                                 eps, count));
  return {mean, var, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_epilogue_backward_cpu(const at::Tensor& gy, const at::Tensor& z, const OptTensor& y,
                         const at::Tensor& center, const at::Tensor& scale,
                         const OptTensor& shift, bool relu_mid, double res_scale,
                         const OptTensor& branch_scale, bool relu_out, bool need_gz,
                         bool need_gr, bool need_center_grad, const at::Tensor& bn_var,
                         const OptTensor& bn_weight, double bn_eps, bool need_bn_var,
                         bool need_bn_weight) {
  check_cpu(gy, "gy");
  check_feature_map(gy, "gy");
  prepare_bn_grad(bn_var, bn_weight, gy);
  auto [gz, gr, s1, s2, gc] = epilogue_backward_cpu(gy, z, y, center, scale, shift, relu_mid,
                                                     res_scale, branch_scale, relu_out, need_gz,
                                                     need_gr, true, need_center_grad);
  auto [gv, gw] = bn_scale_backward_cpu(s2, bn_var, bn_weight, bn_eps, need_bn_var,
                                        need_bn_weight);
  return {gz, gr, s1, gc, gv, gw};
}

TORCH_LIBRARY_IMPL(fused_res_C, CPU, m) {
  m.impl("channel_stats", &channel_stats_cpu);
  m.impl("stats_backward", &stats_backward_cpu);
  m.impl("epilogue", &epilogue_cpu);
  m.impl("epilogue_backward", &epilogue_backward_cpu);
  m.impl("bn_finalize", &bn_finalize_cpu);
  m.impl("bn_scale", &bn_scale_cpu);
  m.impl("bn_scale_backward", &bn_scale_backward_cpu);
  m.impl("channel_stats_bn", &channel_stats_bn_cpu);
  m.impl("bn_epilogue_backward", &bn_epilogue_backward_cpu);
}

}  // namespace fused_res
