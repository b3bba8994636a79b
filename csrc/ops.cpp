// The fused_res_C operator library: schema in one place. CPU kernels register in
// csrc/cpu/ops_cpu.cpp, CUDA launchers in csrc/cuda/ops_cuda.cu; fake (meta) kernels in
// fused_res/_ext.py. The ops are non-differentiable primitives (forward and backward
// kernels); autograd lives in the fused_res::* custom ops that call them.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <tuple>

extern "C" {
// `import fused_res._C` only needs to load this library so that the TORCH_LIBRARY static
// initialisers below run; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_res_C, m) {
  // mean and biased variance per channel over (N, H, W), float32; zeros for N*H*W == 0.
  m.def("channel_stats(Tensor x) -> (Tensor mean, Tensor var)");
  // dL/dz = gz + gmean/m + 2*gvar*(z - mean)/m, m = N*H*W; in z's dtype and layout.
  m.def("stats_backward(Tensor? gz, Tensor? gmean, Tensor? gvar, Tensor z, Tensor mean) "
        "-> Tensor");
  // y = relu?(branch_scale[n] * relu?((z - center) * scale + shift) + res_scale * residual)
  m.def("epilogue(Tensor z, Tensor? center, Tensor? scale, Tensor? shift, bool relu_mid, "
        "Tensor? residual, float res_scale, Tensor? branch_scale, bool relu_out) -> Tensor");
  // (dL/dz, dL/dresidual, Σ dL/du, Σ dL/du·(z - center), dL/dcenter = -scale·Σ dL/du, all
  // sums float32); unwanted outputs are empty, the centered sum is empty when z is not
  // given. dL/dcenter comes from the sums' own finalize: a BatchNorm's mean gradient without
  // two more C-sized launches (a product and a negation).
  m.def("epilogue_backward(Tensor gy, Tensor? z, Tensor? y, Tensor? center, Tensor? scale, "
        "Tensor? shift, bool relu_mid, float res_scale, Tensor? branch_scale, bool relu_out, "
        "bool need_gz, bool need_gr, bool need_sums, bool need_center_grad=False) "
        "-> (Tensor gz, Tensor gr, Tensor sum_gu, Tensor sum_gu_centered, "
        "Tensor grad_center)");
  // nn.BatchNorm2d's training finalize: (scale, shift) with bn(z) = z * scale + shift, and
  // the running statistics / num_batches_tracked updated in place.
  m.def("bn_finalize(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
        "float? momentum, float eps, int count) -> (Tensor scale, Tensor shift)");
  // A train-mode BatchNorm's scale = weight * rsqrt(var + eps) (float32), and its backward
  // (dL/dvar float32, dL/dweight in weight's dtype; unwanted outputs are empty).
  m.def("bn_scale(Tensor var, Tensor? weight, float eps) -> Tensor");
  m.def("bn_scale_backward(Tensor grad, Tensor var, Tensor? weight, float eps, bool need_var, "
        "bool need_weight) -> (Tensor grad_var, Tensor grad_weight)");
  // A training conv unit's pairs, the second op in the first's reduction finalize launch on
  // CUDA (one launch fewer each; the CPU kernels run the pair): channel_stats then bn_finalize with a momentum, returning (mean, var,
  // scale); epilogue_backward (need_sums) where scale = bn_scale(bn_var, bn_weight, bn_eps),
  // then bn_scale_backward on dL/dscale, returning (dL/dz, dL/dresidual, Σ dL/du,
  // dL/dcenter, dL/dbn_var, dL/dbn_weight).
  m.def("channel_stats_bn(Tensor x, Tensor? weight, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, float momentum, float eps) "
        "-> (Tensor mean, Tensor var, Tensor scale)");
  m.def("bn_epilogue_backward(Tensor gy, Tensor z, Tensor? y, Tensor center, Tensor scale, "
        "Tensor? shift, bool relu_mid, float res_scale, Tensor? branch_scale, bool relu_out, "
        "bool need_gz, bool need_gr, bool need_center_grad, Tensor bn_var, Tensor? bn_weight, "
        "float bn_eps, bool need_bn_var, bool need_bn_weight) -> (Tensor gz, Tensor gr, "
        "Tensor sum_gu, Tensor grad_center, Tensor grad_bn_var, Tensor grad_bn_weight)");
}

namespace {

using OptTensor = std::optional<at::Tensor>;

void bump_versions(std::initializer_list<const OptTensor*> mutated) {
  for (const OptTensor* t : mutated) {
    if (t->has_value() && (*t)->defined() && !(*t)->is_inference()) {
      torch::autograd::impl::bump_version(**t);
    }
  }
}

// The kernels write the running statistics through pointers, which autograd's version
// counters do not see: a graph that saved running_var before the update would then run its
// backward on the new values without a word. As aten's in-place ops do, these kernels bump
// the counters of what the schema says the op mutates, so that such a backward raises
// instead. (Inference tensors have no counter, and lack this key.)
using BnFinalize = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, std::optional<double>, double, int64_t);

std::tuple<at::Tensor, at::Tensor> bn_finalize_bump_versions(
    c10::DispatchKeySet ks, const at::Tensor& mean, const at::Tensor& var,
    const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked,
    std::optional<double> momentum, double eps, int64_t count) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_res_C::bn_finalize", "")
                             .typed<BnFinalize>();
  std::tuple<at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.redispatch(ks & c10::after_ADInplaceOrView_keyset, mean, var, weight, bias,
                        running_mean, running_var, num_batches_tracked, momentum, eps, count);
  }
  bump_versions({&running_mean, &running_var, &num_batches_tracked});
  return out;
}

using StatsBn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
    double, double);

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_stats_bn_bump_versions(
    c10::DispatchKeySet ks, const at::Tensor& x, const OptTensor& weight,
    const at::Tensor& running_mean, const at::Tensor& running_var,
    const OptTensor& num_batches_tracked, double momentum, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_res_C::channel_stats_bn", "")
                             .typed<StatsBn>();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = op.redispatch(ks & c10::after_ADInplaceOrView_keyset, x, weight, running_mean,
                        running_var, num_batches_tracked, momentum, eps);
  }
  const OptTensor rm = running_mean, rv = running_var;
  bump_versions({&rm, &rv, &num_batches_tracked});
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_res_C, ADInplaceOrView, m) {
  m.impl("bn_finalize", TORCH_FN(bn_finalize_bump_versions));
  m.impl("channel_stats_bn", TORCH_FN(channel_stats_bn_bump_versions));
}
