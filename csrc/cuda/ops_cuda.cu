// CUDA implementations of the fused_res_C ops: argument handling with ATen, the kernels
// themselves in kernels/ (torch-free). Workspaces come from the caching allocator and every
// launch goes to the current stream, so the ops are safe under CUDA graphs.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "bn_apply.cuh"
#include "bn_stats.cuh"

namespace fused_res {
namespace {

template <typename T>
struct DeviceType;
template <>
struct DeviceType<float> { using type = float; };
template <>
struct DeviceType<at::Half> { using type = __half; };
template <>
struct DeviceType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename scalar_t>
using dev_t = typename DeviceType<scalar_t>::type;

template <typename scalar_t>
dev_t<scalar_t>* dptr(const at::Tensor& t) {
  return reinterpret_cast<dev_t<scalar_t>*>(t.data_ptr<scalar_t>());
}

template <typename scalar_t>
dev_t<scalar_t>* dptr(const OptTensor& t) {
  return t.has_value() ? dptr<scalar_t>(*t) : nullptr;
}

frk::LaunchConfig launch_config() {
  return frk::LaunchConfig{at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                           at::cuda::getCurrentCUDAStream().stream()};
}

frk::Shape shape_of(const Layout& L) { return frk::Shape{L.n, L.c, L.hw, L.nhwc}; }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fused_res_C: ", what, " launch failed: ",
              cudaGetErrorString(err));
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fused_res_C: ", name, " is on ", t.device(),
              "; the CUDA implementation was called");
}

}  // namespace

namespace {

// The statistics pass of a non-empty canonical x into mean and var, (C,) float32; with bn,
// that BatchNorm's finalize in the pass's finalize launch.
void run_channel_stats(const at::Tensor& x, const Layout& L, at::Tensor& mean, at::Tensor& var,
                       const frk::FinalizeArgs* bn) {
  const auto cfg = launch_config();
  const auto s = shape_of(L);
  FUSED_RES_DISPATCH(x.scalar_type(), "channel_stats", [&] {
    using T = dev_t<scalar_t>;
    const frk::ChannelStatsArgs<T> args{dptr<scalar_t>(x), mean.data_ptr<float>(),
                                        var.data_ptr<float>()};
    const auto plan = frk::plan_channel_stats(args, s, cfg.num_sms);
    at::Tensor ws = at::empty({2 * plan.splits * L.c}, mean.options().dtype(at::kDouble));
    check_launch(frk::launch_channel_stats(args, s, plan, ws.data_ptr<double>(), cfg, bn),
                 "channel_stats");
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& x_in) {
  check_feature_map(x_in, "x");
  check_cuda(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  Layout L;
  const at::Tensor x = canonical(x_in, &L);
  // The finalize kernel writes every channel: zero-filling first would cost two launches.
  const auto fopt = x.options().dtype(at::kFloat);
  if (L.numel() == 0) return {at::zeros({L.c}, fopt), at::zeros({L.c}, fopt)};
  at::Tensor mean = at::empty({L.c}, fopt);
  at::Tensor var = at::empty({L.c}, fopt);
  run_channel_stats(x, L, mean, var, nullptr);
  return {mean, var};
}

at::Tensor stats_backward_cuda(const OptTensor& gz, const OptTensor& gmean,
                               const OptTensor& gvar, const at::Tensor& z_in,
                               const at::Tensor& mean_in) {
  check_feature_map(z_in, "z");
  check_cuda(z_in, "z");
  const c10::cuda::CUDAGuard guard(z_in.device());
  Layout L;
  const at::Tensor z = canonical(z_in, &L);
  const OptTensor g = gz.has_value() ? OptTensor(like_primary(*gz, z_in, L, "gz"))
                                     : std::nullopt;
  const OptTensor gm = vec_f32(gmean, L.c, z_in, "gmean", "channel");
  const OptTensor gv = vec_f32(gvar, L.c, z_in, "gvar", "channel");
  const OptTensor mean = vec_f32(mean_in, L.c, z_in, "mean", "channel");
  at::Tensor out = at::empty_like(z, z.options(), L.format());
  if (L.numel() == 0) return out;
  const auto cfg = launch_config();
  FUSED_RES_DISPATCH(z.scalar_type(), "stats_backward", [&] {
    using T = dev_t<scalar_t>;
    const frk::StatsBackwardOp<T> op{dptr<scalar_t>(g), dptr<scalar_t>(z), fptr(gm),
                                     fptr(gv), fptr(mean), dptr<scalar_t>(out),
                                     1.f / static_cast<float>(L.n * L.hw)};
    check_launch(frk::launch_stats_backward(op, shape_of(L), cfg), "stats_backward");
  });
  return out;
}

at::Tensor epilogue_cuda(const at::Tensor& z_in, const OptTensor& center,
                         const OptTensor& scale, const OptTensor& shift, bool relu_mid,
                         const OptTensor& residual, double res_scale,
                         const OptTensor& branch_scale, bool relu_out) {
  check_cuda(z_in, "z");
  const c10::cuda::CUDAGuard guard(z_in.device());
  const EpilogueInputs in = prepare_epilogue(z_in, center, scale, shift, residual,
                                             branch_scale);
  at::Tensor y = at::empty_like(in.z, in.z.options(), in.layout.format());
  if (in.layout.numel() == 0) return y;
  const frk::TailParams p{fptr(in.center), fptr(in.scale), fptr(in.shift),
                          fptr(in.branch_scale), static_cast<float>(res_scale), relu_mid,
                          relu_out};
  const auto cfg = launch_config();
  FUSED_RES_DISPATCH(in.z.scalar_type(), "epilogue", [&] {
    using T = dev_t<scalar_t>;
    const frk::EpilogueForwardOp<T> op{dptr<scalar_t>(in.z), dptr<scalar_t>(in.residual),
                                       dptr<scalar_t>(y), p};
    check_launch(frk::launch_epilogue_forward(op, shape_of(in.layout), cfg), "epilogue");
  });
  return y;
}

namespace {

using BackwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// epilogue_backward on checked inputs (the stream's device set); with bn, the finalize also
// writes the BatchNorm's scale gradient (numel > 0 only: the caller handles empty inputs).
BackwardOut run_epilogue_backward(const BackwardInputs& in, double res_scale, bool relu_mid,
                                  bool relu_out, bool need_gz, bool need_gr, bool need_sums,
                                  bool need_center_grad, const frk::BnScaleGrad* bn) {
  const Layout& L = in.layout;
  const auto fmt = L.format();
  const auto fopt = in.gy.options().dtype(at::kFloat);
  at::Tensor gz = need_gz ? at::empty_like(in.gy, in.gy.options(), fmt)
                          : at::empty({0}, in.gy.options());
  at::Tensor gr = need_gr ? at::empty_like(in.gy, in.gy.options(), fmt)
                          : at::empty({0}, in.gy.options());
  // The kernel always reduces both sums (its finalize writes every channel, so no zero fill
  // unless there is nothing to reduce); they are returned only when asked for.
  at::Tensor s1 = L.numel() > 0 ? at::empty({L.c}, fopt) : at::zeros({L.c}, fopt);
  at::Tensor s2 = L.numel() > 0 ? at::empty({L.c}, fopt) : at::zeros({L.c}, fopt);
  // -scale · Σ dL/du, written by the same finalize (zeros when there is nothing to reduce).
  at::Tensor gc = !need_center_grad ? at::empty({0}, fopt)
                  : L.numel() > 0   ? at::empty({L.c}, fopt)
                                    : at::zeros({L.c}, fopt);
  if (L.numel() > 0) {
    const frk::TailParams p{fptr(in.center), fptr(in.scale), fptr(in.shift),
                            fptr(in.branch_scale), static_cast<float>(res_scale), relu_mid,
                            relu_out};
    const auto cfg = launch_config();
    const auto s = shape_of(L);
    FUSED_RES_DISPATCH(in.gy.scalar_type(), "epilogue_backward", [&] {
      using T = dev_t<scalar_t>;
      const frk::EpilogueBackwardOp<T> op{
          dptr<scalar_t>(in.gy), dptr<scalar_t>(in.z), dptr<scalar_t>(in.y),
          need_gz ? dptr<scalar_t>(gz) : nullptr, need_gr ? dptr<scalar_t>(gr) : nullptr,
          p};
      frk::SumsFinalize fin{s1.data_ptr<float>(), s2.data_ptr<float>(), fptr(in.scale),
                            need_center_grad ? gc.data_ptr<float>() : nullptr};
      if (bn) fin.bn = *bn;
      const auto plan = frk::plan_epilogue_backward(op, s, cfg.num_sms);
      at::Tensor ws = at::empty({2 * plan.splits * L.c}, fopt.dtype(at::kDouble));
      check_launch(frk::launch_epilogue_backward(op, fin, s, plan, ws.data_ptr<double>(), cfg),
                   "epilogue_backward");
    });
  }
  if (!need_sums) s1 = at::empty({0}, fopt);
  if (!need_sums || !in.z) s2 = at::empty({0}, fopt);
  return {gz, gr, s1, s2, gc};
}

}  // namespace

BackwardOut epilogue_backward_cuda(
    const at::Tensor& gy_in, const OptTensor& z, const OptTensor& y, const OptTensor& center,
    const OptTensor& scale, const OptTensor& shift, bool relu_mid, double res_scale,
    const OptTensor& branch_scale, bool relu_out, bool need_gz, bool need_gr, bool need_sums,
    bool need_center_grad) {
  check_cuda(gy_in, "gy");
  const c10::cuda::CUDAGuard guard(gy_in.device());
  const BackwardInputs in = prepare_epilogue_backward(gy_in, z, y, center, scale, shift,
                                                      relu_mid, branch_scale, relu_out);
  return run_epilogue_backward(in, res_scale, relu_mid, relu_out, need_gz, need_gr, need_sums,
                               need_center_grad, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_epilogue_backward_cuda(const at::Tensor& gy_in, const at::Tensor& z, const OptTensor& y,
                          const at::Tensor& center, const at::Tensor& scale,
                          const OptTensor& shift, bool relu_mid, double res_scale,
                          const OptTensor& branch_scale, bool relu_out, bool need_gz,
                          bool need_gr, bool need_center_grad, const at::Tensor& bn_var,
                          const OptTensor& bn_weight, double bn_eps, bool need_bn_var,
                          bool need_bn_weight) {
  check_cuda(gy_in, "gy");
  const c10::cuda::CUDAGuard guard(gy_in.device());
  const BackwardInputs in = prepare_epilogue_backward(gy_in, z, y, center, scale, shift,
                                                      relu_mid, branch_scale, relu_out);
  const ScaleInputs bn_in = prepare_bn_grad(bn_var, bn_weight, gy_in);
  if (in.layout.numel() == 0) {  // no pass: the two ops (the sums are zeros)
    auto [gz, gr, s1, s2, gc] = run_epilogue_backward(in, res_scale, relu_mid, relu_out,
                                                      need_gz, need_gr, true, need_center_grad,
                                                      nullptr);
    auto [gv, gw] = bn_scale_backward_cuda(s2, bn_var, bn_weight, bn_eps, need_bn_var,
                                           need_bn_weight);
    return {gz, gr, s1, gc, gv, gw};
  }
  const int64_t C = in.layout.c;
  need_bn_weight = need_bn_weight && bn_weight.has_value();
  at::Tensor gv = need_bn_var ? at::empty({C}, bn_in.var.options()) : empty_vec(bn_in.var);
  at::Tensor gw = need_bn_weight ? at::empty({C}, bn_in.var.options()) : empty_vec(bn_in.var);
  const frk::BnScaleGrad bn{bn_in.var.data_ptr<float>(), fptr(bn_in.weight),
                            static_cast<float>(bn_eps),
                            need_bn_var ? gv.data_ptr<float>() : nullptr,
                            need_bn_weight ? gw.data_ptr<float>() : nullptr};
  auto [gz, gr, s1, s2, gc] = run_epilogue_backward(in, res_scale, relu_mid, relu_out, need_gz,
                                                    need_gr, true, need_center_grad, &bn);
  if (need_bn_weight) gw = gw.to(bn_weight->scalar_type());
  return {gz, gr, s1, gc, gv, gw};
}

std::tuple<at::Tensor, at::Tensor> bn_finalize_cuda(
    const at::Tensor& mean, const at::Tensor& var, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, std::optional<double> momentum, double eps,
    int64_t count) {
  check_cuda(mean, "mean");
  const c10::cuda::CUDAGuard guard(mean.device());
  const FinalizeInputs in = prepare_finalize(mean, var, weight, bias, running_mean, running_var,
                                             num_batches_tracked, momentum, count);
  const int64_t C = in.mean.size(0);
  at::Tensor scale = at::empty({C}, in.mean.options());
  at::Tensor shift = at::empty({C}, in.mean.options());
  // The batch is counted by the kernel's channel 0 where it has a momentum (one launch less);
  // without one the kernel reads the count, incremented first on the same stream.
  const bool track = running_mean.has_value() && num_batches_tracked.has_value();
  const bool bump_in_kernel = track && momentum.has_value() && C > 0;
  if (track && !bump_in_kernel) num_batches_tracked->add_(1);
  frk::FinalizeArgs a{};
  a.mean = in.mean.data_ptr<float>();
  a.var = in.var.data_ptr<float>();
  a.weight = fptr(in.weight);
  a.bias = fptr(in.bias);
  a.running_mean = in.update ? running_mean->data_ptr<float>() : nullptr;
  a.running_var = in.update ? running_var->data_ptr<float>() : nullptr;
  a.num_batches_tracked =
      num_batches_tracked.has_value() ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  a.bump_count = bump_in_kernel;
  a.scale = scale.data_ptr<float>();
  a.shift = shift.data_ptr<float>();
  a.c = C;
  a.momentum = static_cast<float>(momentum.value_or(0.0));
  a.momentum_none = !momentum.has_value();
  a.eps = static_cast<float>(eps);
  a.unbias = in.unbias;
  a.update = in.update;
  check_launch(frk::launch_bn_finalize(a, launch_config()), "bn_finalize");
  return {scale, shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_stats_bn_cuda(
    const at::Tensor& x_in, const OptTensor& weight, const at::Tensor& running_mean,
    const at::Tensor& running_var, const OptTensor& num_batches_tracked, double momentum,
    double eps) {
  check_feature_map(x_in, "x");
  check_cuda(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  Layout L;
  const at::Tensor x = canonical(x_in, &L);
  const auto fopt = x.options().dtype(at::kFloat);
  const int64_t count = L.n * L.hw;
  if (L.numel() == 0) {  // no statistics pass: zeros, then the finalize's own kernel
    at::Tensor mean = at::zeros({L.c}, fopt), var = at::zeros({L.c}, fopt);
    at::Tensor scale = std::get<0>(bn_finalize_cuda(mean, var, weight, std::nullopt,
                                                    running_mean, running_var,
                                                    num_batches_tracked, momentum, eps, count));
    return {mean, var, scale};
  }
  // The finalize writes every channel: no zero fill.
  at::Tensor mean = at::empty({L.c}, fopt);
  at::Tensor var = at::empty({L.c}, fopt);
  const FinalizeInputs in = prepare_finalize(mean, var, weight, std::nullopt, running_mean,
                                             running_var, num_batches_tracked, momentum, count);
  at::Tensor scale = at::empty({L.c}, fopt);
  frk::FinalizeArgs a{};
  a.weight = fptr(in.weight);
  a.running_mean = in.update ? running_mean.data_ptr<float>() : nullptr;
  a.running_var = in.update ? running_var.data_ptr<float>() : nullptr;
  // With a momentum nothing in the launch reads the count: channel 0 adds the batch.
  a.num_batches_tracked =
      num_batches_tracked.has_value() ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  a.bump_count = num_batches_tracked.has_value();
  a.scale = scale.data_ptr<float>();
  a.c = L.c;
  a.momentum = static_cast<float>(momentum);
  a.eps = static_cast<float>(eps);
  a.unbias = in.unbias;
  a.update = in.update;
  run_channel_stats(x, L, mean, var, &a);
  return {mean, var, scale};
}

at::Tensor bn_scale_cuda(const at::Tensor& var, const OptTensor& weight, double eps) {
  check_cuda(var, "var");
  const c10::cuda::CUDAGuard guard(var.device());
  const ScaleInputs in = prepare_scale(var, weight, std::nullopt);
  at::Tensor scale = at::empty({in.var.size(0)}, in.var.options());
  frk::ScaleArgs a{};
  a.var = in.var.data_ptr<float>();
  a.weight = fptr(in.weight);
  a.scale = scale.data_ptr<float>();
  a.c = in.var.size(0);
  a.eps = static_cast<float>(eps);
  check_launch(frk::launch_bn_scale(a, false, launch_config()), "bn_scale");
  return scale;
}

std::tuple<at::Tensor, at::Tensor> bn_scale_backward_cuda(const at::Tensor& grad,
                                                          const at::Tensor& var,
                                                          const OptTensor& weight, double eps,
                                                          bool need_var, bool need_weight) {
  check_cuda(var, "var");
  const c10::cuda::CUDAGuard guard(var.device());
  const ScaleInputs in = prepare_scale(var, weight, grad);
  const int64_t C = in.var.size(0);
  need_weight = need_weight && weight.has_value();
  at::Tensor gv = need_var ? at::empty({C}, in.var.options()) : empty_vec(in.var);
  at::Tensor gw = need_weight ? at::empty({C}, in.var.options()) : empty_vec(in.var);
  frk::ScaleArgs a{};
  a.var = in.var.data_ptr<float>();
  a.weight = fptr(in.weight);
  a.grad = in.grad->data_ptr<float>();
  a.grad_var = need_var ? gv.data_ptr<float>() : nullptr;
  a.grad_weight = need_weight ? gw.data_ptr<float>() : nullptr;
  a.c = C;
  a.eps = static_cast<float>(eps);
  if (need_var || need_weight) {
    check_launch(frk::launch_bn_scale(a, true, launch_config()), "bn_scale_backward");
  }
  if (need_weight) gw = gw.to(weight->scalar_type());
  return {gv, gw};
}

TORCH_LIBRARY_IMPL(fused_res_C, CUDA, m) {
  m.impl("channel_stats", &channel_stats_cuda);
  m.impl("stats_backward", &stats_backward_cuda);
  m.impl("epilogue", &epilogue_cuda);
  m.impl("epilogue_backward", &epilogue_backward_cuda);
  m.impl("bn_finalize", &bn_finalize_cuda);
  m.impl("bn_scale", &bn_scale_cuda);
  m.impl("bn_scale_backward", &bn_scale_backward_cuda);
  m.impl("channel_stats_bn", &channel_stats_bn_cuda);
  m.impl("bn_epilogue_backward", &bn_epilogue_backward_cuda);
}

}  // namespace fused_res
