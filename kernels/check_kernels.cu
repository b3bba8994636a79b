// Instantiates every kernel of kernels/ for fp32, fp16 and bf16 without torch, so that bare
// nvcc can compile them for sm_80 / sm_90 and ptxas can report registers and spills
// (kernels/check_kernels.py). The extension (csrc/cuda/ops_cuda.cu) instantiates the same
// launchers.
#include "bn_apply.cuh"
#include "bn_stats.cuh"

namespace frk {

#define FRK_INSTANTIATE(T)                                                                  \
  template cudaError_t launch_channel_stats<T>(const ChannelStatsArgs<T>&, const Shape&,    \
                                               const ReducePlan&, double*,                   \
                                               const LaunchConfig&, const FinalizeArgs*);   \
  template cudaError_t launch_stats_backward<T>(const StatsBackwardOp<T>&, const Shape&,    \
                                                const LaunchConfig&);                       \
  template cudaError_t launch_epilogue_forward<T>(const EpilogueForwardOp<T>&,              \
                                                  const Shape&, const LaunchConfig&);       \
  template cudaError_t launch_epilogue_backward<T>(const EpilogueBackwardOp<T>&,            \
                                                   const SumsFinalize&, const Shape&,       \
                                                   const ReducePlan&, double*,               \
                                                   const LaunchConfig&);

FRK_INSTANTIATE(float)
FRK_INSTANTIATE(__half)
FRK_INSTANTIATE(__nv_bfloat16)

#undef FRK_INSTANTIATE

}  // namespace frk
