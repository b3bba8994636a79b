// Host-side argument checks and layout handling shared by the CPU and CUDA implementations
// of the fused_res_C ops (schema: csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <string>
#include <utility>

namespace fused_res {

using OptTensor = std::optional<at::Tensor>;

// The (N, C, H, W) extent and storage order an op runs on.
struct Layout {
  int64_t n, c, hw;
  bool nhwc;
  at::MemoryFormat format() const {
    return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
  int64_t numel() const { return n * c * hw; }
};

inline void check_feature_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "fused_res_C: ", name, " has shape ", t.sizes(),
              "; accepted: a 4-D tensor (N, C, H, W)");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "fused_res_C: ",
              name, " has dtype ", st, "; accepted: float32, float16, bfloat16");
}

// NHWC when the tensor is channels_last and not also plain contiguous (a tensor that is both,
// e.g. C == 1 or H == W == 1, runs as NCHW); anything else is made contiguous NCHW.
inline at::Tensor canonical(const at::Tensor& t, Layout* layout) {
  const bool nhwc = !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = nhwc ? t : t.contiguous();
  if (layout) *layout = Layout{t.size(0), t.size(1), t.size(2) * t.size(3), nhwc};
  return out;
}

// Another feature map of the primary's shape and dtype, brought into the primary's layout.
inline at::Tensor like_primary(const at::Tensor& t, const at::Tensor& primary,
                               const Layout& layout, const char* name) {
  TORCH_CHECK(t.sizes() == primary.sizes(), "fused_res_C: ", name, " has shape ", t.sizes(),
              "; accepted: the shape of the main input ", primary.sizes());
  TORCH_CHECK(t.device() == primary.device(), "fused_res_C: ", name, " is on ", t.device(),
              "; accepted: the main input's device ", primary.device());
  TORCH_CHECK(t.scalar_type() == primary.scalar_type(), "fused_res_C: ", name,
              " has dtype ", t.scalar_type(), "; accepted: the main input's dtype ",
              primary.scalar_type());
  return t.contiguous(layout.format());
}

// A per-channel (or per-sample) vector as contiguous float32 on the primary's device.
inline OptTensor vec_f32(const OptTensor& v, int64_t len, const at::Tensor& primary,
                         const char* name, const char* per) {
  if (!v.has_value()) return std::nullopt;
  const at::Tensor& t = *v;
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, "fused_res_C: ", name, " has shape ",
              t.sizes(), "; accepted: (", len, ",), one value per ", per);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fused_res_C: ", name, " has dtype ",
              t.scalar_type(), "; accepted: a floating-point tensor");
  TORCH_CHECK(t.device() == primary.device(), "fused_res_C: ", name, " is on ", t.device(),
              "; accepted: the main input's device ", primary.device());
  return t.to(at::kFloat).contiguous();
}

inline const float* fptr(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

inline at::Tensor empty_vec(const at::Tensor& like) {
  return at::empty({0}, like.options().dtype(at::kFloat));
}

// float32 / float16 / bfloat16 only: the kernels' I/O types.
#define FUSED_RES_DISPATCH(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// ---- implementations (CPU in csrc/cpu, CUDA in csrc/cuda) -------------------------------
#define FUSED_RES_DECLARE(dev)                                                                \
  std::tuple<at::Tensor, at::Tensor> channel_stats_##dev(const at::Tensor& x);                \
  at::Tensor stats_backward_##dev(const OptTensor& gz, const OptTensor& gmean,                \
                                  const OptTensor& gvar, const at::Tensor& z,                 \
                                  const at::Tensor& mean);                                    \
  at::Tensor epilogue_##dev(const at::Tensor& z, const OptTensor& center,                     \
                            const OptTensor& scale, const OptTensor& shift, bool relu_mid,    \
                            const OptTensor& residual, double res_scale,                      \
                            const OptTensor& branch_scale, bool relu_out);                    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>                      \
      epilogue_backward_##dev(                                                                \
          const at::Tensor& gy, const OptTensor& z, const OptTensor& y,                       \
          const OptTensor& center, const OptTensor& scale, const OptTensor& shift,            \
          bool relu_mid, double res_scale, const OptTensor& branch_scale, bool relu_out,      \
          bool need_gz, bool need_gr, bool need_sums, bool need_center_grad);                 \
  std::tuple<at::Tensor, at::Tensor> bn_finalize_##dev(                                       \
      const at::Tensor& mean, const at::Tensor& var, const OptTensor& weight,                 \
      const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,     \
      const OptTensor& num_batches_tracked, std::optional<double> momentum, double eps,       \
      int64_t count);                                                                         \
  at::Tensor bn_scale_##dev(const at::Tensor& var, const OptTensor& weight, double eps);      \
  std::tuple<at::Tensor, at::Tensor> bn_scale_backward_##dev(                                 \
      const at::Tensor& grad, const at::Tensor& var, const OptTensor& weight, double eps,     \
      bool need_var, bool need_weight);                                                     \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_stats_bn_##dev(                      \
      const at::Tensor& x, const OptTensor& weight, const at::Tensor& running_mean,           \
      const at::Tensor& running_var, const OptTensor& num_batches_tracked, double momentum,   \
      double eps);                                                                            \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>          \
      bn_epilogue_backward_##dev(                                                             \
          const at::Tensor& gy, const at::Tensor& z, const OptTensor& y,                      \
          const at::Tensor& center, const at::Tensor& scale, const OptTensor& shift,          \
          bool relu_mid, double res_scale, const OptTensor& branch_scale, bool relu_out,      \
          bool need_gz, bool need_gr, bool need_center_grad, const at::Tensor& bn_var,        \
          const OptTensor& bn_weight, double bn_eps, bool need_bn_var, bool need_bn_weight);

FUSED_RES_DECLARE(cpu)
FUSED_RES_DECLARE(cuda)
#undef FUSED_RES_DECLARE

// Checks common to both devices; returns the per-channel vectors as float32.
struct EpilogueInputs {
  at::Tensor z;  // canonical layout
  Layout layout;
  OptTensor residual, center, scale, shift, branch_scale;
};

inline EpilogueInputs prepare_epilogue(const at::Tensor& z, const OptTensor& center,
                                       const OptTensor& scale, const OptTensor& shift,
                                       const OptTensor& residual,
                                       const OptTensor& branch_scale) {
  check_feature_map(z, "z");
  EpilogueInputs in;
  in.z = canonical(z, &in.layout);
  const int64_t c = in.layout.c;
  in.center = vec_f32(center, c, z, "center", "channel");
  in.scale = vec_f32(scale, c, z, "scale", "channel");
  in.shift = vec_f32(shift, c, z, "shift", "channel");
  in.branch_scale = vec_f32(branch_scale, in.layout.n, z, "branch_scale", "sample");
  if (residual.has_value()) in.residual = like_primary(*residual, z, in.layout, "residual");
  return in;
}

struct BackwardInputs {
  at::Tensor gy;  // canonical layout
  Layout layout;
  OptTensor z, y, center, scale, shift, branch_scale;
};

inline BackwardInputs prepare_epilogue_backward(const at::Tensor& gy, const OptTensor& z,
                                                const OptTensor& y, const OptTensor& center,
                                                const OptTensor& scale, const OptTensor& shift,
                                                bool relu_mid, const OptTensor& branch_scale,
                                                bool relu_out) {
  check_feature_map(gy, "gy");
  BackwardInputs in;
  in.gy = canonical(gy, &in.layout);
  const int64_t c = in.layout.c;
  TORCH_CHECK(!relu_mid || z.has_value(), "fused_res_C: epilogue_backward with relu_mid=True "
              "needs z (to recompute the ReLU mask); got z=None");
  TORCH_CHECK(!relu_out || y.has_value(), "fused_res_C: epilogue_backward with relu_out=True "
              "needs y (the forward output, for the ReLU mask); got y=None");
  if (z.has_value()) in.z = like_primary(*z, gy, in.layout, "z");
  if (y.has_value()) in.y = like_primary(*y, gy, in.layout, "y");
  in.center = vec_f32(center, c, gy, "center", "channel");
  in.scale = vec_f32(scale, c, gy, "scale", "channel");
  in.shift = vec_f32(shift, c, gy, "shift", "channel");
  in.branch_scale = vec_f32(branch_scale, in.layout.n, gy, "branch_scale", "sample");
  return in;
}

struct FinalizeInputs {
  at::Tensor mean, var;
  OptTensor weight, bias;
  float unbias = 1.f;
  bool update = false;
};

inline FinalizeInputs prepare_finalize(const at::Tensor& mean, const at::Tensor& var,
                                       const OptTensor& weight, const OptTensor& bias,
                                       const OptTensor& running_mean,
                                       const OptTensor& running_var,
                                       const OptTensor& num_batches_tracked,
                                       std::optional<double> momentum, int64_t count) {
  TORCH_CHECK(mean.dim() == 1 && mean.scalar_type() == at::kFloat, "fused_res_C: mean has "
              "shape ", mean.sizes(), " and dtype ", mean.scalar_type(),
              "; accepted: a float32 vector (C,)");
  const int64_t c = mean.size(0);
  TORCH_CHECK(var.sizes() == mean.sizes() && var.scalar_type() == at::kFloat,
              "fused_res_C: var has shape ", var.sizes(), " and dtype ", var.scalar_type(),
              "; accepted: float32 of mean's shape ", mean.sizes());
  TORCH_CHECK(var.device() == mean.device(), "fused_res_C: var is on ", var.device(),
              "; accepted: mean's device ", mean.device());
  TORCH_CHECK(count >= 0, "fused_res_C: count=", count, "; accepted: N*H*W >= 0");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), "fused_res_C: running_mean "
              "and running_var must be given together (or both None)");
  FinalizeInputs in;
  in.mean = mean.contiguous();
  in.var = var.contiguous();
  in.weight = vec_f32(weight, c, mean, "weight", "channel");
  in.bias = vec_f32(bias, c, mean, "bias", "channel");
  if (running_mean.has_value()) {
    const std::pair<const char*, const at::Tensor*> buffers[] = {
        {"running_mean", &*running_mean}, {"running_var", &*running_var}};
    for (const auto& [name, rs] : buffers) {
      TORCH_CHECK(rs->dim() == 1 && rs->size(0) == c && rs->scalar_type() == at::kFloat &&
                      rs->is_contiguous() && rs->device() == mean.device(),
                  "fused_res_C: ", name, " has shape ", rs->sizes(), ", dtype ",
                  rs->scalar_type(), ", device ", rs->device(), "; accepted: contiguous "
                  "float32 (", c, ",) on ", mean.device(), " (updated in place)");
    }
    if (count > 0) {
      TORCH_CHECK(count > 1, "fused_res_C: count=1; BatchNorm in training needs more than "
                  "one value per channel");
      in.update = true;
      // Eager computes var * (count / (count - 1)) with the Python float rounded to fp32.
      in.unbias = static_cast<float>(static_cast<double>(count) / (count - 1));
    }
  }
  if (!momentum.has_value() && in.update) {
    TORCH_CHECK(num_batches_tracked.has_value(), "fused_res_C: momentum=None (cumulative "
                "average) needs num_batches_tracked");
  }
  if (num_batches_tracked.has_value()) {
    const auto& t = *num_batches_tracked;
    TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kLong && t.device() == mean.device(),
                "fused_res_C: num_batches_tracked has shape ", t.sizes(), ", dtype ",
                t.scalar_type(), "; accepted: an int64 scalar tensor on ", mean.device());
  }
  return in;
}

// Checks of bn_scale / bn_scale_backward, common to both devices: var (C,) float32; weight
// (C,) of any float dtype or None, read as float32; grad (C,) read as float32.
struct ScaleInputs {
  at::Tensor var;
  OptTensor weight;
  OptTensor grad;
};

inline ScaleInputs prepare_scale(const at::Tensor& var, const OptTensor& weight,
                                 const OptTensor& grad, const char* weight_name = "weight") {
  TORCH_CHECK(var.dim() == 1 && var.scalar_type() == at::kFloat, "fused_res_C: var has shape ",
              var.sizes(), " and dtype ", var.scalar_type(), "; accepted: a float32 vector (C,)");
  const int64_t c = var.size(0);
  ScaleInputs in;
  in.var = var.contiguous();
  in.weight = vec_f32(weight, c, var, weight_name, "channel");
  in.grad = vec_f32(grad, c, var, "grad", "channel");
  return in;
}

// bn_epilogue_backward's BatchNorm (bn_var float32 (C,) for the C channels of primary, gy;
// bn_weight (C,) read as float32), checked before the pass runs.
inline ScaleInputs prepare_bn_grad(const at::Tensor& var, const OptTensor& weight,
                                   const at::Tensor& primary) {
  const int64_t c = primary.size(1);
  TORCH_CHECK(var.dim() == 1 && var.size(0) == c && var.scalar_type() == at::kFloat,
              "fused_res_C: bn_var has shape ", var.sizes(), " and dtype ", var.scalar_type(),
              "; accepted: a float32 vector (", c, ",), one value per channel");
  TORCH_CHECK(var.device() == primary.device(), "fused_res_C: bn_var is on ", var.device(),
              "; accepted: the main input's device ", primary.device());
  return prepare_scale(var, weight, std::nullopt, "bn_weight");
}

}  // namespace fused_res
