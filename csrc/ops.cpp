// The fused_res_C operator library: schema in one place. CPU kernels register in
// csrc/cpu/ops_cpu.cpp, CUDA launchers in csrc/cuda/ops_cuda.cu; fake (meta) kernels in
// fused_res/_ext.py. The ops are non-differentiable primitives (forward and backward
// kernels); autograd lives in the fused_res::* custom ops that call them.
#include <Python.h>
#include <torch/library.h>

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
}
