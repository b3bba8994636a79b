// Shared device helpers for the fused BatchNorm / ReLU / add kernels.
//
// Free of torch headers on purpose: bare nvcc compiles kernels/ (check_kernels.cu) so that
// register use and spills can be inspected on machines without a GPU or a torch build.
//
// Tensors are (N, C, H, W) stored NCHW (contiguous) or NHWC (channels_last). A "row" is the
// contiguous innermost run: HW elements of one (n, c) plane for NCHW, C channels of one
// (n, h, w) pixel for NHWC. Vector paths need the row length to be a multiple of the vector
// width, so a vector never straddles two rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace frk {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 16-byte (or narrower, for VEC == 1) aligned pack so that a load is one LDG.128.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* __restrict__ p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

// bf16 -> fp32 is exact: the 16 bits become the high half of the float (NaN payloads too).
// Pairs are converted from the 32-bit words directly, which keeps the packed registers alive
// instead of materialising one 16-bit temporary per element.
template <int VEC, typename T>
__device__ __forceinline__ void unpack(const Pack<T, VEC>& pk, float (&out)[VEC]) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value && VEC % 2 == 0) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(pk.v);
#pragma unroll
    for (int j = 0; j < VEC / 2; ++j) {
      out[2 * j] = __uint_as_float(w[j] << 16);
      out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
  } else if constexpr (std::is_same<T, __half>::value && VEC % 2 == 0) {
    const __half2* h = reinterpret_cast<const __half2*>(pk.v);
#pragma unroll
    for (int j = 0; j < VEC / 2; ++j) {
      const float2 f = __half22float2(h[j]);
      out[2 * j] = f.x;
      out[2 * j + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_f(pk.v[j]);
  }
}

template <int VEC, typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  unpack<VEC>(load_pack<VEC>(p), out);
}

// Pairs round with one packed conversion (cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32): the same
// round-to-nearest-even per element as from_f.
template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
  if constexpr (std::is_same<T, __nv_bfloat16>::value && VEC % 2 == 0) {
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(pk.v);
#pragma unroll
    for (int j = 0; j < VEC / 2; ++j) h[j] = __floats2bfloat162_rn(in[2 * j], in[2 * j + 1]);
  } else if constexpr (std::is_same<T, __half>::value && VEC % 2 == 0) {
    __half2* h = reinterpret_cast<__half2*>(pk.v);
#pragma unroll
    for (int j = 0; j < VEC / 2; ++j) h[j] = __floats2half2_rn(in[2 * j], in[2 * j + 1]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) pk.v[j] = from_f<T>(in[j]);
  }
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// torch.relu keeps NaN (fmaxf would turn it into 0, hiding a bad input).
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

// torch.relu's backward (threshold_backward): 0 where out <= 0, else g -- a NaN gradient
// where the unit was off is dropped, one where out is NaN passes.
__device__ __forceinline__ float relu_grad(float g, float out) { return out <= 0.f ? 0.f : g; }

// Division by a runtime constant as a multiply-high and a shift (Granlund & Montgomery):
// integer division is a long instruction sequence on the GPU, 64-bit division a called
// subroutine whose saved registers show up as spills. The address math of every kernel here
// divides by C, H*W or C*H*W, so the magic numbers are computed once on the host.
template <typename index_t>
struct Divider;

// Valid for numerators below 2^31 (t + n must not overflow 32 bits).
template <>
struct Divider<uint32_t> {
  uint32_t magic = 0;
  uint32_t shift = 0;
  uint32_t d = 1;
  Divider() = default;
  explicit Divider(uint32_t divisor) : d(divisor) {
    while (shift < 32 && (uint64_t{1} << shift) < divisor) ++shift;
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - divisor)) /
                                  divisor + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return (__umulhi(n, magic) + n) >> shift;
  }
  __device__ __forceinline__ uint32_t mod(uint32_t n) const { return n - div(n) * d; }
};

// Non-negative numerators below 2^63.
template <>
struct Divider<int64_t> {
  uint64_t magic = 0;
  uint32_t shift = 0;
  int64_t d = 1;
  Divider() = default;
  explicit Divider(int64_t divisor) : d(divisor) {
    const uint64_t ud = static_cast<uint64_t>(divisor);
    while (shift < 63 && (uint64_t{1} << shift) < ud) ++shift;
    const unsigned __int128 num = static_cast<unsigned __int128>((uint64_t{1} << shift) - ud)
                                  << 64;
    magic = static_cast<uint64_t>(num / ud + 1);
  }
  __device__ __forceinline__ int64_t div(int64_t n) const {
    if (shift == 0) return n;  // d == 1
    const uint64_t un = static_cast<uint64_t>(n);
    const uint64_t t = __umul64hi(un, magic);
    // (t + n) >> shift without the 65-bit intermediate.
    return static_cast<int64_t>((t + ((un - t) >> 1)) >> (shift - 1));
  }
  __device__ __forceinline__ int64_t mod(int64_t n) const { return n - div(n) * d; }
};

// Where flat element i of an (N, C, H, W) tensor lives, for NCHW or NHWC storage.
template <typename index_t>
struct Geometry {
  Divider<index_t> hw, c, chw;
  bool nhwc;
  __device__ __forceinline__ index_t channel(index_t i) const {
    return nhwc ? c.mod(i) : c.mod(hw.div(i));
  }
  __device__ __forceinline__ index_t sample(index_t i) const { return chw.div(i); }
};

// The shape every launcher receives: sizes in 64 bits, the index type is chosen per launch.
struct Shape {
  int64_t n, c, hw;
  bool nhwc;
  int64_t numel() const { return n * c * hw; }
  int64_t row() const { return nhwc ? c : hw; }
};

struct LaunchConfig {
  int num_sms;
  cudaStream_t stream;
};

inline bool aligned16(const void* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

// 32-bit indices when every index a grid-stride loop can form (element index plus one grid
// stride) fits; 64-bit otherwise. Integer division by C and HW dominates the address math,
// and 32-bit division is several times cheaper than 64-bit.
inline bool fits_int32(int64_t numel) { return numel < (int64_t{1} << 30); }

inline int grid_for(int64_t work_items, int num_sms, int blocks_per_sm) {
  int64_t blocks = (work_items + kThreads - 1) / kThreads;
  // One wave: as many blocks as can be resident at once (blocks_per_sm is what the kernel's
  // __launch_bounds__ guarantees); the grid-stride loop covers the rest, so the per-block
  // setup is amortised and no partial second wave idles most SMs.
  const int64_t cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * blocks_per_sm;
  if (blocks > cap) blocks = cap;
  return static_cast<int>(blocks < 1 ? 1 : blocks);
}

}  // namespace frk
