// Per-channel two-level reductions over (N, H, W), fused with an elementwise pass.
//
// Level 1: each block reduces one slice of the (N, H, W) extent for one channel (NCHW) or
// for a tile of channels (NHWC) and writes two partial sums per channel to a workspace
// [splits][C]. Level 2 (finalize_kernel) adds the `splits` partials of each channel in a
// fixed order. No atomics: the result is deterministic and there is no hot spot when C is
// small (C = 64 with N*H*W = 800k is the common ResNet case).
//
// Each thread accumulates its own elements in fp32 (the hot loop: a few dozen elements per
// thread at ResNet shapes); everything after it, the block's sum over its threads, the
// partials and the finalize, is in double. In fp32 throughout, these kernels' summation order
// (emulated on the CPU by kernels/emulate_stats_order.py) lost 4e-5 of a zero-mean channel's
// mean and 9e-5 of a variance whose shift sat 30 std from the mean (fp32's budget is 1e-5);
// with the cross-thread sums in double, 2e-6 and 1.3e-6. The extra cost is a few hundred
// double adds per block, and the NHWC block sum's two sums going through shared memory one
// after the other (the same 16 KiB as two float arrays).
//
// An Op supplies the per-element work, split into a load phase and a compute phase so that
// the kernels issue kUnroll independent 16-byte loads per thread before using any of them,
// whatever the compiler can prove about the outputs aliasing the inputs (one load in flight
// per thread is far too little to cover HBM latency):
//   static constexpr int kConsts;     per-channel constants it needs (>= 1)
//   static constexpr int kUnroll;     vectors per thread loaded back to back
//   static constexpr int kMinBlocks;  resident 256-thread blocks per SM (__launch_bounds__);
//                                     the grids are sized to one wave of this many per SM
//   template <int VEC> struct Frag;   the raw loaded data of one vector
//   void lane_consts(int64_t c, float* k) const;          fill k[0..kConsts) for channel c
//   template <int VEC, typename index_t>
//   void load(index_t i, Frag<VEC>& f) const;             the loads of VEC elements from i
//   template <int VEC, int KL, typename index_t>
//   void finish(index_t i, index_t n, const Frag<VEC>& f, const float (&k)[kConsts][KL],
//               float (&ra)[VEC], float (&rb)[VEC]) const;       (reductions)
//   void finish(index_t i, index_t n, const Frag<VEC>& f,
//               const float (&k)[kConsts][KL]) const;            (elementwise passes)
//       VEC elements from flat index i (sample n): do the elementwise stores, return the two
//       contributions per element. KL == VEC when the lanes are channels (NHWC), 1 when all
//       lanes share one channel (NCHW).
//   bool aligned() const;                                 every pointer 16-byte aligned
//
// NHWC kernels are 2-D: a thread owns a fixed vector of VEC channels (its constants stay in
// registers, no per-element channel index) and walks rows (pixels); NCHW kernels walk the
// vectors of whole (n, c) planes, where all lanes of a vector share one channel.
#pragma once

#include "common.cuh"

namespace frk {

template <typename index_t>
__device__ __forceinline__ index_t min_idx(index_t a, index_t b) { return a < b ? a : b; }

// The constants of the KL channels c0, c0 + 1, ... (KL == 1: channel c0 alone).
template <typename Op, int KL>
__device__ __forceinline__ void load_consts(const Op& op, int64_t c0,
                                            float (&k)[Op::kConsts][KL]) {
#pragma unroll
  for (int l = 0; l < KL; ++l) {
    float kk[Op::kConsts];
    op.lane_consts(c0 + l, kk);
#pragma unroll
    for (int q = 0; q < Op::kConsts; ++q) k[q][l] = kk[q];
  }
}

// Sum a and b over the block (blockDim.x * blockDim.y == kThreads); thread 0 gets the totals.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
  __shared__ double sh[2][kThreads / 32];
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
    a = t < kThreads / 32 ? sh[0][t] : 0.0;
    b = t < kThreads / 32 ? sh[1][t] : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
  }
}

// NCHW: grid (C, splits). Block (c, s) walks vectors [s*chunk, (s+1)*chunk) of the N*HW/VEC
// vectors of channel c; every vector lies inside one (n, c) plane. Each thread loads U vectors
// (kThreads apart) before reducing them.
template <typename Op, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads, Op::kMinBlocks)
    reduce_nchw_kernel(Op op, index_t c_total, index_t hw, Divider<index_t> hwv,
                       index_t total, index_t chunk, double* __restrict__ part_a,
                       double* __restrict__ part_b) {
  constexpr int U = Op::kUnroll;
  using Frag = typename Op::template Frag<VEC>;
  const index_t c = blockIdx.x;
  const index_t split = blockIdx.y;
  const index_t begin = split * chunk;
  const index_t end = min_idx(total, begin + chunk);
  float k[Op::kConsts][1];
  load_consts<Op, 1>(op, static_cast<int64_t>(c), k);
  float acc_a = 0.f, acc_b = 0.f;
  index_t idx = begin + threadIdx.x;
  // idx < end < 2^30 on the 32-bit path, so idx + U * kThreads cannot wrap.
  for (; idx + (U - 1) * kThreads < end; idx += U * kThreads) {
    Frag f[U];
    index_t ii[U], ss[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const index_t v = idx + u * kThreads;
      ss[u] = hwv.div(v);
      ii[u] = (ss[u] * c_total + c) * hw + (v - ss[u] * hwv.d) * VEC;
      op.template load<VEC>(ii[u], f[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float ra[VEC], rb[VEC];
      op.template finish<VEC, 1>(ii[u], ss[u], f[u], k, ra, rb);
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        acc_a += ra[l];
        acc_b += rb[l];
      }
    }
  }
  for (; idx < end; idx += kThreads) {
    const index_t s = hwv.div(idx);
    const index_t i = (s * c_total + c) * hw + (idx - s * hwv.d) * VEC;
    Frag f;
    op.template load<VEC>(i, f);
    float ra[VEC], rb[VEC];
    op.template finish<VEC, 1>(i, s, f, k, ra, rb);
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      acc_a += ra[l];
      acc_b += rb[l];
    }
  }
  double sum_a = acc_a, sum_b = acc_b;
  block_sum2(sum_a, sum_b);
  if (threadIdx.x == 0) {
    part_a[static_cast<int64_t>(split) * c_total + c] = sum_a;
    part_b[static_cast<int64_t>(split) * c_total + c] = sum_b;
  }
}

// NHWC: block (TX, TY), grid (ceil(C / (TX*VEC)), splits). Thread (tx, ty) owns the VEC
// channels starting at (blockIdx.x*TX + tx)*VEC and walks rows (pixels) begin+ty, +TY, ...,
// U rows at a time; the TY partial sums per channel are then added through shared memory.
template <typename Op, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads, Op::kMinBlocks)
    reduce_nhwc_kernel(Op op, index_t c_total, Divider<index_t> hw, index_t rows, index_t chunk,
                       double* __restrict__ part_a, double* __restrict__ part_b) {
  constexpr int U = Op::kUnroll;
  using Frag = typename Op::template Frag<VEC>;
  // One array for both sums, one after the other: 16 KiB for 16-bit types (VEC 8), so that
  // kMinBlocks = 4 blocks fit an SM of sm_86/89 (100 KiB) as well.
  __shared__ double sh[kThreads * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tdx = blockDim.x, tdy = blockDim.y;
  const index_t c0 = (static_cast<index_t>(blockIdx.x) * tdx + tx) * VEC;
  const bool active = c0 < c_total;
  // Inactive threads read channel 0's constants (C >= VEC on the vector path) and skip the loop.
  float k[Op::kConsts][VEC];
  load_consts<Op, VEC>(op, active ? static_cast<int64_t>(c0) : 0, k);
  float acc_a[VEC], acc_b[VEC];
#pragma unroll
  for (int l = 0; l < VEC; ++l) acc_a[l] = acc_b[l] = 0.f;
  const index_t begin = static_cast<index_t>(blockIdx.y) * chunk;
  const index_t end = min_idx(rows, begin + chunk);
  if (active) {
    index_t m = begin + ty;
    // m < end + tdy and rows < 2^30 on the 32-bit path: m + U * tdy cannot wrap.
    for (; m + (U - 1) * tdy < end; m += U * tdy) {
      Frag f[U];
#pragma unroll
      for (int u = 0; u < U; ++u) op.template load<VEC>((m + u * tdy) * c_total + c0, f[u]);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const index_t r = m + u * tdy;
        float ra[VEC], rb[VEC];
        op.template finish<VEC, VEC>(r * c_total + c0, hw.div(r), f[u], k, ra, rb);
#pragma unroll
        for (int l = 0; l < VEC; ++l) {
          acc_a[l] += ra[l];
          acc_b[l] += rb[l];
        }
      }
    }
    for (; m < end; m += tdy) {
      Frag f;
      op.template load<VEC>(m * c_total + c0, f);
      float ra[VEC], rb[VEC];
      op.template finish<VEC, VEC>(m * c_total + c0, hw.div(m), f, k, ra, rb);
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        acc_a[l] += ra[l];
        acc_b[l] += rb[l];
      }
    }
  }
  // width = tdx * VEC <= 32 * VEC <= kThreads: thread col sums column col, if any.
  static_assert(32 * VEC <= kThreads, "a column per thread needs tdx * VEC <= kThreads");
  const int width = tdx * VEC;
  const int col = ty * tdx + tx;
  double sums[2] = {0.0, 0.0};
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
    for (int l = 0; l < VEC; ++l) sh[ty * width + tx * VEC + l] = pass ? acc_b[l] : acc_a[l];
    __syncthreads();
    if (col < width) {
      for (int r = 0; r < tdy; ++r) sums[pass] += sh[r * width + col];
    }
    __syncthreads();  // (before the next pass overwrites sh)
  }
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * width + col;
  if (col < width && ch < static_cast<int64_t>(c_total)) {
    part_a[static_cast<int64_t>(blockIdx.y) * c_total + ch] = sums[0];
    part_b[static_cast<int64_t>(blockIdx.y) * c_total + ch] = sums[1];
  }
}

// Level 2: fin(ch, a, b) gets channel ch's two sums (doubles) over its `splits` partials.
// Block (32, 32), grid ceil(C / 32): lane (tx, ty) adds splits ty, ty + 32, ... of channel
// blockIdx.x*32 + tx in order, then row ty == 0 adds the 32 lane sums in order: a fixed
// tree, so deterministic, and 32 times shorter than one thread walking all splits (C = 64
// has ~500 of them).
constexpr int kFinX = 32;
constexpr int kFinY = 32;

template <typename Fin>
__global__ void __launch_bounds__(kFinX * kFinY)
    finalize_kernel(Fin fin, int64_t c_total, int splits, const double* __restrict__ part_a,
                    const double* __restrict__ part_b) {
  __shared__ double sh_a[kFinY][kFinX + 1];
  __shared__ double sh_b[kFinY][kFinX + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * kFinX + tx;
  double a = 0.0, b = 0.0;
  if (ch < c_total) {
#pragma unroll 4
    for (int s = ty; s < splits; s += kFinY) {
      a += part_a[static_cast<int64_t>(s) * c_total + ch];
      b += part_b[static_cast<int64_t>(s) * c_total + ch];
    }
  }
  sh_a[ty][tx] = a;
  sh_b[ty][tx] = b;
  __syncthreads();
  if (ty == 0 && ch < c_total) {
    a = sh_a[0][tx];
    b = sh_b[0][tx];
    for (int r = 1; r < kFinY; ++r) {
      a += sh_a[r][tx];
      b += sh_b[r][tx];
    }
    fin(ch, a, b);
  }
}

// How a reduction is cut into blocks. The caller allocates 2 * splits * C doubles.
struct ReducePlan {
  int vec;     // elements per vector access (1, or 16 bytes' worth)
  int splits;  // blocks along (N, H, W) per channel tile
  int tx, ty;  // NHWC block shape (tx * ty == kThreads); NCHW uses (kThreads, 1)
  int64_t channel_tiles;
  int64_t chunk;  // NCHW: vectors per split; NHWC: rows per split
};

// NHWC block shape: tx threads across the C / vec channel vectors (a power of two up to a
// warp), the rest of the 256 across rows.
inline void nhwc_tile(int64_t c, int vec, int* tx, int* ty, int64_t* channel_tiles) {
  const int64_t cv = (c + vec - 1) / vec;
  int x = 1;
  while (x < 32 && x < cv) x *= 2;
  *tx = x;
  *ty = kThreads / x;
  *channel_tiles = (cv + x - 1) / x;
}

// blocks_per_sm: the Op's kMinBlocks (resident blocks its __launch_bounds__ guarantees);
// unroll: its kUnroll.
inline ReducePlan plan_reduce(const Shape& s, int vec, int num_sms, int blocks_per_sm,
                              int unroll) {
  ReducePlan p{};
  p.vec = vec;
  int64_t per_tile;  // work items along the reduced extent
  if (s.nhwc) {
    nhwc_tile(s.c, vec, &p.tx, &p.ty, &p.channel_tiles);
    per_tile = s.n * s.hw;  // rows
  } else {
    p.tx = kThreads;
    p.ty = 1;
    p.channel_tiles = s.c;
    per_tile = s.n * (s.hw / vec);  // vectors
  }
  // Exactly one wave of resident blocks (rounded down, so no partial second wave), but each
  // thread should get at least two unrolled batches, else the partials and the block
  // reduction dominate.
  const int64_t target = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * blocks_per_sm;
  int64_t splits = target / p.channel_tiles;
  const int64_t min_items = (s.nhwc ? int64_t{p.ty} : int64_t{kThreads}) * unroll * 2;
  const int64_t by_work = per_tile / min_items;
  if (splits > by_work) splits = by_work;
  if (splits > 1024) splits = 1024;
  if (splits < 1) splits = 1;
  p.chunk = (per_tile + splits - 1) / splits;
  if (p.chunk < 1) p.chunk = 1;
  // No empty trailing splits.
  splits = (per_tile + p.chunk - 1) / p.chunk;
  p.splits = static_cast<int>(splits < 1 ? 1 : splits);
  return p;
}

template <typename Op, int VEC, typename index_t>
inline void launch_reduce_typed(const Op& op, const Shape& s, const ReducePlan& p,
                                double* part_a, double* part_b, cudaStream_t stream) {
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

// Level 1 + level 2. `workspace` holds 2 * p.splits * s.c doubles.
template <typename Op, typename Fin, int VEC_MAX>
inline cudaError_t launch_channel_reduce(const Op& op, const Fin& fin, const Shape& s,
                                         const ReducePlan& p, double* workspace,
                                         const LaunchConfig& cfg) {
  double* part_a = workspace;
  double* part_b = workspace + static_cast<int64_t>(p.splits) * s.c;
  const bool small = fits_int32(s.numel());
  if (p.vec == VEC_MAX && VEC_MAX > 1) {
    if (small) launch_reduce_typed<Op, VEC_MAX, uint32_t>(op, s, p, part_a, part_b, cfg.stream);
    else launch_reduce_typed<Op, VEC_MAX, int64_t>(op, s, p, part_a, part_b, cfg.stream);
  } else {
    if (small) launch_reduce_typed<Op, 1, uint32_t>(op, s, p, part_a, part_b, cfg.stream);
    else launch_reduce_typed<Op, 1, int64_t>(op, s, p, part_a, part_b, cfg.stream);
  }
  const int64_t blocks = (s.c + kFinX - 1) / kFinX;
  finalize_kernel<Fin><<<static_cast<unsigned>(blocks), dim3(kFinX, kFinY), 0, cfg.stream>>>(
      fin, s.c, p.splits, part_a, part_b);
  return cudaGetLastError();
}

// Elementwise pass, NCHW: a grid-stride loop over the vectors of the flat tensor, U vectors
// (one grid stride apart) loaded per thread before any is used; all lanes of a vector share
// one channel (the row HW is a multiple of VEC).
template <typename Op, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads, Op::kMinBlocks)
    elementwise_kernel(Op op, Geometry<index_t> g, index_t nvec) {
  constexpr int U = Op::kUnroll;
  using Frag = typename Op::template Frag<VEC>;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  index_t v = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x;
  // nvec < 2^30 and stride <= 2^24 on the 32-bit path: v + U * stride cannot wrap.
  for (; v + (U - 1) * stride < nvec; v += U * stride) {
    Frag f[U];
#pragma unroll
    for (int u = 0; u < U; ++u) op.template load<VEC>((v + u * stride) * VEC, f[u]);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const index_t i = (v + u * stride) * VEC;
      float k[Op::kConsts][1];
      load_consts<Op, 1>(op, static_cast<int64_t>(g.channel(i)), k);
      op.template finish<VEC, 1>(i, g.sample(i), f[u], k);
    }
  }
  for (; v < nvec; v += stride) {
    const index_t i = v * VEC;
    Frag f;
    op.template load<VEC>(i, f);
    float k[Op::kConsts][1];
    load_consts<Op, 1>(op, static_cast<int64_t>(g.channel(i)), k);
    op.template finish<VEC, 1>(i, g.sample(i), f, k);
  }
}

// Elementwise pass, NHWC: block (TX, TY), grid (channel tiles, row blocks). Thread (tx, ty)
// owns the VEC channels from (blockIdx.x*TX + tx)*VEC, keeps their constants in registers and
// walks rows blockIdx.y*TY + ty, + gridDim.y*TY, ..., U rows at a time.
template <typename Op, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads, Op::kMinBlocks)
    elementwise_nhwc_kernel(Op op, index_t c_total, Divider<index_t> hw, index_t rows) {
  constexpr int U = Op::kUnroll;
  using Frag = typename Op::template Frag<VEC>;
  const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= c_total) return;  // no barrier below
  float k[Op::kConsts][VEC];
  load_consts<Op, VEC>(op, static_cast<int64_t>(c0), k);
  const index_t stride = static_cast<index_t>(gridDim.y) * blockDim.y;
  index_t m = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  // rows < 2^30 and stride <= 2^24 on the 32-bit path: m + U * stride cannot wrap.
  for (; m + (U - 1) * stride < rows; m += U * stride) {
    Frag f[U];
#pragma unroll
    for (int u = 0; u < U; ++u) op.template load<VEC>((m + u * stride) * c_total + c0, f[u]);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const index_t r = m + u * stride;
      op.template finish<VEC, VEC>(r * c_total + c0, hw.div(r), f[u], k);
    }
  }
  for (; m < rows; m += stride) {
    Frag f;
    op.template load<VEC>(m * c_total + c0, f);
    op.template finish<VEC, VEC>(m * c_total + c0, hw.div(m), f, k);
  }
}

template <typename Op, int VEC, typename index_t>
inline void launch_elementwise_typed(const Op& op, const Shape& s, const LaunchConfig& cfg) {
  const int blocks_per_sm = Op::kMinBlocks;
  if (s.nhwc) {
    int tx, ty;
    int64_t tiles;
    nhwc_tile(s.c, VEC, &tx, &ty, &tiles);
    const int64_t rows = s.n * s.hw;
    const int64_t target = static_cast<int64_t>(cfg.num_sms > 0 ? cfg.num_sms : 1) *
                           blocks_per_sm;
    int64_t gy = target / tiles;
    const int64_t by_rows = (rows + ty - 1) / ty;
    if (gy > by_rows) gy = by_rows;
    if (gy > 65535) gy = 65535;
    if (gy < 1) gy = 1;
    dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(gy));
    dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
    elementwise_nhwc_kernel<Op, VEC, index_t><<<grid, block, 0, cfg.stream>>>(
        op, static_cast<index_t>(s.c), Divider<index_t>(static_cast<index_t>(s.hw)),
        static_cast<index_t>(rows));
  } else {
    const int64_t nvec = s.numel() / VEC;
    const int grid = grid_for(nvec, cfg.num_sms, blocks_per_sm);
    Geometry<index_t> g{Divider<index_t>(static_cast<index_t>(s.hw)),
                        Divider<index_t>(static_cast<index_t>(s.c)),
                        Divider<index_t>(static_cast<index_t>(s.c * s.hw)), s.nhwc};
    elementwise_kernel<Op, VEC, index_t><<<grid, kThreads, 0, cfg.stream>>>(
        op, g, static_cast<index_t>(nvec));
  }
}

template <typename Op, int VEC_MAX>
inline cudaError_t launch_elementwise(const Op& op, const Shape& s, const LaunchConfig& cfg) {
  const int64_t numel = s.numel();
  if (numel == 0) return cudaSuccess;
  const int vec = (VEC_MAX > 1 && s.row() % VEC_MAX == 0 && op.aligned()) ? VEC_MAX : 1;
  const bool small = fits_int32(numel);
  if (vec == VEC_MAX && VEC_MAX > 1) {
    if (small) launch_elementwise_typed<Op, VEC_MAX, uint32_t>(op, s, cfg);
    else launch_elementwise_typed<Op, VEC_MAX, int64_t>(op, s, cfg);
  } else {
    if (small) launch_elementwise_typed<Op, 1, uint32_t>(op, s, cfg);
    else launch_elementwise_typed<Op, 1, int64_t>(op, s, cfg);
  }
  return cudaGetLastError();
}

}  // namespace frk
