// Per-channel two-level reductions over (N, H, W), fused with an elementwise pass.
//
// Level 1: each block reduces one slice of the (N, H, W) extent for one channel (NCHW) or
// for a tile of channels (NHWC) and writes two fp32 partial sums per channel to a workspace
// [splits][C]. Level 2 (finalize_kernel) adds the `splits` partials of each channel in a
// fixed order. No atomics: the result is deterministic and there is no hot spot when C is
// small (C = 64 with N*H*W = 800k is the common ResNet case).
//
// An Op supplies the per-element work:
//   static constexpr int kConsts;                         per-channel constants it needs
//   void lane_consts(int64_t c, float* k) const;          fill k[0..kConsts) for channel c
//   template <int VEC, int KL, typename index_t>
//   void apply(index_t i, index_t n, const float (&k)[kConsts][KL],
//              float (&ra)[VEC], float (&rb)[VEC]) const;
//       VEC elements from flat index i (sample n): do the elementwise stores, return the two
//       contributions per element. KL == VEC when the lanes are channels (NHWC), 1 when all
//       lanes share one channel (NCHW).
//   bool aligned() const;                                 every pointer 16-byte aligned
#pragma once

#include "common.cuh"

namespace frk {

template <typename index_t>
__device__ __forceinline__ index_t min_idx(index_t a, index_t b) { return a < b ? a : b; }

// Sum a and b over the block (blockDim.x * blockDim.y == kThreads); thread 0 gets the totals.
__device__ __forceinline__ void block_sum2(float& a, float& b) {
  __shared__ float sh[2][kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  if ((t & 31) == 0) {
    sh[0][t >> 5] = a;
    sh[1][t >> 5] = b;
  }
  __syncthreads();
  if (t < 32) {
    a = t < kThreads / 32 ? sh[0][t] : 0.f;
    b = t < kThreads / 32 ? sh[1][t] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
  }
}

// NCHW: grid (C, splits). Block (c, s) walks vectors [s*chunk, (s+1)*chunk) of the N*HW/VEC
// vectors of channel c; every vector lies inside one (n, c) plane.
template <typename Op, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads)
    reduce_nchw_kernel(Op op, index_t c_total, index_t hw, Divider<index_t> hwv,
                       index_t total, index_t chunk, float* __restrict__ part_a,
                       float* __restrict__ part_b) {
  const index_t c = blockIdx.x;
  const index_t split = blockIdx.y;
  const index_t begin = split * chunk;
  const index_t end = min_idx(total, begin + chunk);
  float k[Op::kConsts][1];
  {
    float kk[Op::kConsts];
    op.lane_consts(static_cast<int64_t>(c), kk);
#pragma unroll
    for (int q = 0; q < Op::kConsts; ++q) k[q][0] = kk[q];
  }
  float acc_a = 0.f, acc_b = 0.f;
  for (index_t idx = begin + threadIdx.x; idx < end; idx += kThreads) {
    const index_t s = hwv.div(idx);
    const index_t j = idx - s * hwv.d;
    const index_t i = (s * c_total + c) * hw + j * VEC;
    float ra[VEC], rb[VEC];
    op.template apply<VEC, 1>(i, s, k, ra, rb);
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      acc_a += ra[l];
      acc_b += rb[l];
    }
  }
  block_sum2(acc_a, acc_b);
  if (threadIdx.x == 0) {
    part_a[static_cast<int64_t>(split) * c_total + c] = acc_a;
    part_b[static_cast<int64_t>(split) * c_total + c] = acc_b;
  }
}

// NHWC: block (TX, TY), grid (ceil(C / (TX*VEC)), splits). Thread (tx, ty) owns the VEC
// channels starting at (blockIdx.x*TX + tx)*VEC and walks rows (pixels) begin+ty, +TY, ...;
// the TY partial sums per channel are then added through shared memory.
template <typename Op, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads)
    reduce_nhwc_kernel(Op op, index_t c_total, Divider<index_t> hw, index_t rows, index_t chunk,
                       float* __restrict__ part_a, float* __restrict__ part_b) {
  __shared__ float sh_a[kThreads * VEC];
  __shared__ float sh_b[kThreads * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tdx = blockDim.x, tdy = blockDim.y;
  const index_t c0 = (static_cast<index_t>(blockIdx.x) * tdx + tx) * VEC;
  const bool active = c0 < c_total;
  float k[Op::kConsts][VEC];
#pragma unroll
  for (int l = 0; l < VEC; ++l) {
    float kk[Op::kConsts];
    op.lane_consts(active ? static_cast<int64_t>(c0) + l : 0, kk);
#pragma unroll
    for (int q = 0; q < Op::kConsts; ++q) k[q][l] = kk[q];
  }
  float acc_a[VEC], acc_b[VEC];
#pragma unroll
  for (int l = 0; l < VEC; ++l) acc_a[l] = acc_b[l] = 0.f;
  const index_t begin = static_cast<index_t>(blockIdx.y) * chunk;
  const index_t end = min_idx(rows, begin + chunk);
  if (active) {
    for (index_t m = begin + ty; m < end; m += tdy) {
      float ra[VEC], rb[VEC];
      op.template apply<VEC, VEC>(m * c_total + c0, hw.div(m), k, ra, rb);
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        acc_a[l] += ra[l];
        acc_b[l] += rb[l];
      }
    }
  }
  const int width = tdx * VEC;
#pragma unroll
  for (int l = 0; l < VEC; ++l) {
    sh_a[ty * width + tx * VEC + l] = acc_a[l];
    sh_b[ty * width + tx * VEC + l] = acc_b[l];
  }
  __syncthreads();
  for (int col = ty * tdx + tx; col < width; col += kThreads) {
    float a = 0.f, b = 0.f;
    for (int r = 0; r < tdy; ++r) {
      a += sh_a[r * width + col];
      b += sh_b[r * width + col];
    }
    const int64_t ch = static_cast<int64_t>(blockIdx.x) * width + col;
    if (ch < static_cast<int64_t>(c_total)) {
      part_a[static_cast<int64_t>(blockIdx.y) * c_total + ch] = a;
      part_b[static_cast<int64_t>(blockIdx.y) * c_total + ch] = b;
    }
  }
}

// Level 2: channel ch gets the sums of its `splits` partials, in split order.
template <typename Fin>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(Fin fin, int64_t c_total, int splits, const float* __restrict__ part_a,
                    const float* __restrict__ part_b) {
  for (int64_t ch = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; ch < c_total;
       ch += static_cast<int64_t>(gridDim.x) * kThreads) {
    float a = 0.f, b = 0.f;
    for (int s = 0; s < splits; ++s) {
      a += part_a[s * c_total + ch];
      b += part_b[s * c_total + ch];
    }
    fin(ch, a, b);
  }
}

// How a reduction is cut into blocks. The caller allocates 2 * splits * C floats.
struct ReducePlan {
  int vec;     // elements per vector access (1, or 16 bytes' worth)
  int splits;  // blocks along (N, H, W) per channel tile
  int tx, ty;  // NHWC block shape (tx * ty == kThreads); NCHW uses (kThreads, 1)
  int64_t channel_tiles;
  int64_t chunk;  // NCHW: vectors per split; NHWC: rows per split
};

inline ReducePlan plan_reduce(const Shape& s, int vec, int num_sms) {
  ReducePlan p{};
  p.vec = vec;
  int64_t per_tile;  // work items along the reduced extent
  if (s.nhwc) {
    const int64_t cv = (s.c + vec - 1) / vec;
    int tx = 1;
    while (tx < 32 && tx < cv) tx *= 2;
    p.tx = tx;
    p.ty = kThreads / tx;
    p.channel_tiles = (cv + tx - 1) / tx;
    per_tile = s.n * s.hw;  // rows
  } else {
    p.tx = kThreads;
    p.ty = 1;
    p.channel_tiles = s.c;
    per_tile = s.n * (s.hw / vec);  // vectors
  }
  // ~4 resident blocks per SM in total; but each block should get at least a few loop trips
  // per thread, else the partials and the block reduction dominate.
  const int64_t target = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 4;
  int64_t splits = (target + p.channel_tiles - 1) / p.channel_tiles;
  const int64_t min_items = s.nhwc ? static_cast<int64_t>(p.ty) * 4 : int64_t{kThreads} * 4;
  const int64_t by_work = per_tile / min_items;
  if (splits > by_work) splits = by_work;
  if (splits > 1024) splits = 1024;
  if (splits < 1) splits = 1;
  p.splits = static_cast<int>(splits);
  p.chunk = (per_tile + splits - 1) / splits;
  if (p.chunk < 1) p.chunk = 1;
  return p;
}

template <typename Op, int VEC, typename index_t>
inline void launch_reduce_typed(const Op& op, const Shape& s, const ReducePlan& p,
                                float* part_a, float* part_b, cudaStream_t stream) {
  if (s.nhwc) {
    dim3 grid(static_cast<unsigned>(p.channel_tiles), static_cast<unsigned>(p.splits));
    dim3 block(static_cast<unsigned>(p.tx), static_cast<unsigned>(p.ty));
    reduce_nhwc_kernel<Op, VEC, index_t><<<grid, block, 0, stream>>>(
        op, static_cast<index_t>(s.c), Divider<index_t>(static_cast<index_t>(s.hw)),
        static_cast<index_t>(s.n * s.hw), static_cast<index_t>(p.chunk), part_a, part_b);
  } else {
    dim3 grid(static_cast<unsigned>(s.c), static_cast<unsigned>(p.splits));
    reduce_nchw_kernel<Op, VEC, index_t><<<grid, kThreads, 0, stream>>>(
        op, static_cast<index_t>(s.c), static_cast<index_t>(s.hw),
        Divider<index_t>(static_cast<index_t>(s.hw / VEC)),
        static_cast<index_t>(s.n * (s.hw / VEC)), static_cast<index_t>(p.chunk), part_a, part_b);
  }
}

// Level 1 + level 2. `workspace` holds 2 * p.splits * s.c floats.
template <typename Op, typename Fin, int VEC_MAX>
inline cudaError_t launch_channel_reduce(const Op& op, const Fin& fin, const Shape& s,
                                         const ReducePlan& p, float* workspace,
                                         const LaunchConfig& cfg) {
  float* part_a = workspace;
  float* part_b = workspace + static_cast<int64_t>(p.splits) * s.c;
  const bool small = fits_int32(s.numel());
  if (p.vec == VEC_MAX && VEC_MAX > 1) {
    if (small) launch_reduce_typed<Op, VEC_MAX, uint32_t>(op, s, p, part_a, part_b, cfg.stream);
    else launch_reduce_typed<Op, VEC_MAX, int64_t>(op, s, p, part_a, part_b, cfg.stream);
  } else {
    if (small) launch_reduce_typed<Op, 1, uint32_t>(op, s, p, part_a, part_b, cfg.stream);
    else launch_reduce_typed<Op, 1, int64_t>(op, s, p, part_a, part_b, cfg.stream);
  }
  const int64_t blocks = (s.c + kThreads - 1) / kThreads;
  finalize_kernel<Fin><<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), kThreads, 0,
                         cfg.stream>>>(fin, s.c, p.splits, part_a, part_b);
  return cudaGetLastError();
}

// Elementwise pass: op.apply<VEC>(i, c0, lanes_are_channels, n) for each vector.
template <typename Op, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(Op op, Geometry<index_t> g, index_t nvec) {
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t v = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; v < nvec;
       v += stride) {
    const index_t i = v * VEC;
    op.template apply<VEC>(i, g.channel(i), g.nhwc, g.sample(i));
  }
}

template <typename Op, int VEC, typename index_t>
inline void launch_elementwise_typed(const Op& op, const Shape& s, int64_t nvec, int grid,
                                     cudaStream_t stream) {
  Geometry<index_t> g{Divider<index_t>(static_cast<index_t>(s.hw)),
                      Divider<index_t>(static_cast<index_t>(s.c)),
                      Divider<index_t>(static_cast<index_t>(s.c * s.hw)), s.nhwc};
  elementwise_kernel<Op, VEC, index_t><<<grid, kThreads, 0, stream>>>(
      op, g, static_cast<index_t>(nvec));
}

template <typename Op, int VEC_MAX>
inline cudaError_t launch_elementwise(const Op& op, const Shape& s, const LaunchConfig& cfg) {
  const int64_t numel = s.numel();
  if (numel == 0) return cudaSuccess;
  const int vec = (VEC_MAX > 1 && s.row() % VEC_MAX == 0 && op.aligned()) ? VEC_MAX : 1;
  const int64_t nvec = numel / vec;
  const int grid = grid_for(nvec, cfg.num_sms);
  const bool small = fits_int32(numel);
  if (vec == VEC_MAX && VEC_MAX > 1) {
    if (small) launch_elementwise_typed<Op, VEC_MAX, uint32_t>(op, s, nvec, grid, cfg.stream);
    else launch_elementwise_typed<Op, VEC_MAX, int64_t>(op, s, nvec, grid, cfg.stream);
  } else {
    if (small) launch_elementwise_typed<Op, 1, uint32_t>(op, s, nvec, grid, cfg.stream);
    else launch_elementwise_typed<Op, 1, int64_t>(op, s, nvec, grid, cfg.stream);
  }
  return cudaGetLastError();
}

}  // namespace frk
