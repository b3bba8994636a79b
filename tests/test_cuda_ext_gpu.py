"""The CUDA kernels of the extension and the `cuda` / `cudnn` backends on a GPU (`-m gpu`):
against the float64 reference and the CPU kernels, in every layout and dtype, on the vector
(16-byte) and scalar paths, with large reductions, N = 0, opcheck and CUDA graphs."""

import copy

import pytest
import torch

import fused_res
from fused_res import _ext, ops
from fused_res.backends import register_backend
from fused_res.backends.cuda_backend import CudaBackend
from fused_res.backends.cudnn_backend import CudnnBackend
from fused_res.backends.reference import ReferenceBackend
from fused_res.testing import TOLERANCES, rel_err

pytestmark = pytest.mark.gpu

D = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
REF = ReferenceBackend()
# (N, C, H, W): odd, vector-friendly in both layouts, tiny, many channels, a big reduction.
SHAPES = [(3, 5, 7, 9), (4, 64, 8, 8), (1, 3, 1, 1), (2, 264, 7, 7), (32, 64, 28, 28)]


@pytest.fixture(scope="module")
def C():
    lib = _ext.load()
    assert lib is not None, _ext.reason()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fused_res_C::epilogue", "CUDA"), \
        "the extension was built without its CUDA kernels"
    register_backend("cuda", CudaBackend)
    register_backend("cudnn", CudnnBackend)
    return lib


def _make(shape, dtype, fmt, g, scale=1.0, offset=0.0, misalign=False):
    """A CUDA tensor; misalign=True puts its data 1 element past a 16-byte boundary, which
    forces the scalar (non-vector) kernel path."""
    x = (torch.randn(*shape, dtype=D, generator=g) * scale + offset).to(dtype)
    if not misalign:
        return x.cuda().contiguous(memory_format=FORMATS[fmt])
    n, c, h, w = shape
    buf = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    if fmt == "nhwc":
        out = buf[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        out = buf[1:].view(n, c, h, w)
    out.copy_(x)
    return out


def _check(out, ref, tol, what):
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("misalign", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_channel_stats(C, shape, dtype, fmt, misalign):
    g = torch.Generator().manual_seed(1)
    x = _make(shape, dtype, fmt, g, 2.0, 3.0, misalign)
    mean, var = C.channel_stats(x)
    rm, rv = REF.channel_stats_forward(x.double().cpu())
    _check(mean, rm, 1e-6, "mean")
    _check(var, rv, 1e-5, "var")
    cm, cv = C.channel_stats(x.cpu())
    _check(mean, cm, 1e-6, "mean vs CPU kernel")
    _check(var, cv, 1e-5, "var vs CPU kernel")


@pytest.mark.parametrize("fmt", FORMATS)
def test_channel_stats_large_mean(C, fmt):
    g = torch.Generator().manual_seed(2)
    x = _make((16, 32, 32, 32), torch.float32, fmt, g, 0.01, 100.0)
    mean, var = C.channel_stats(x)
    rm, rv = REF.channel_stats_forward(x.double().cpu())
    _check(mean, rm, 1e-7, "mean")
    _check(var, rv, 1e-4, "var")


@pytest.mark.parametrize("outlier", [None, 30.0, 300.0])
@pytest.mark.parametrize("fmt", FORMATS)
def test_channel_stats_keep_fp32_accuracy_far_from_the_shift(C, fmt, outlier):
    """Zero-mean channels, and channels whose first element sits 30 or 300 std out: the
    kernels' summation order in fp32 throughout lost 4e-5 of the mean and 9e-5 of the
    variance at 30 std (kernels/emulate_stats_order.py); with the cross-thread sums in
    double, 2e-6 and 1.3e-6, but 5e-5 of the variance at 300 std while that element was the
    shift; the median of three elements as the shift, 5e-8. An inf first element makes the
    mean inf, not NaN."""
    g = torch.Generator().manual_seed(5)
    # (the emulator's zero-mean shape: at (64, 2, 32, 32) the old order lost only 1e-6)
    x = torch.randn(64, 2, 64, 64, dtype=D, generator=g)
    x[0, :, 0, 0] = x[1, :, 0, 0] if outlier is None else outlier
    x = x.float().cuda().contiguous(memory_format=FORMATS[fmt])
    mean, var = C.channel_stats(x)
    rm, rv = REF.channel_stats_forward(x.double().cpu())
    _check(mean, rm, TOLERANCES[torch.float32], "mean")
    _check(var, rv, TOLERANCES[torch.float32], "var")
    x[0, :, 0, 0] = float("inf")
    mean, var = C.channel_stats(x)
    assert (mean == float("inf")).all() and var.isnan().all()


EPILOGUES = [
    (True, True, True, True, False, 1.0, False, False),
    (True, True, True, False, True, 1.0, False, True),
    (False, True, True, True, True, 0.5, True, True),
    (False, False, False, False, True, 2.0, True, False),
]


@pytest.mark.parametrize("misalign", [False, True])
@pytest.mark.parametrize("cfg", EPILOGUES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_epilogue_forward_and_backward(C, cfg, dtype, fmt, misalign):
    ce, sc, sh, rm, res, lam, br, ro = cfg
    g = torch.Generator().manual_seed(3)
    shape = (4, 64, 6, 8)
    n, c = shape[:2]
    vec = lambda positive=False: ((torch.rand(c, generator=g) + 0.5) if positive
                                  else torch.randn(c, generator=g)).cuda()
    a = dict(z=_make(shape, dtype, fmt, g, misalign=misalign),
             center=vec() if ce else None, scale=vec(True) if sc else None,
             shift=vec() if sh else None,
             residual=_make(shape, dtype, fmt, g, misalign=misalign) if res else None)
    for v in a.values():
        if v is not None:
            v.requires_grad_()
    b = {k: (v.detach().double().requires_grad_() if v is not None else None)
         for k, v in a.items()}
    d = torch.rand(n, generator=g).cuda() if br else None
    kw = dict(act_mid="relu" if rm else "none", res_scale=lam, act_out="relu" if ro else "none")
    y = ops.epilogue(a["z"], a["scale"], a["shift"], center=a["center"], residual=a["residual"],
                     branch_scale=d, backend="cuda", **kw)
    ref = ops.epilogue(b["z"], b["scale"], b["shift"], center=b["center"],
                       residual=b["residual"], branch_scale=None if d is None else d.double(),
                       backend="reference", **kw)
    tol = TOLERANCES[dtype]
    _check(y, ref, tol, "y")
    names = [k for k, v in a.items() if v is not None]
    gy = torch.randn(shape, dtype=D, generator=g).cuda()
    got = torch.autograd.grad(y, [a[k] for k in names], gy.to(dtype))
    want = torch.autograd.grad(ref, [b[k] for k in names], gy.to(dtype).double())
    for k, gg, ww in zip(names, got, want, strict=True):
        _check(gg, ww, tol * (4 if k in ("center", "scale", "shift") else 1), f"d{k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_stats_backward(C, dtype, fmt):
    g = torch.Generator().manual_seed(4)
    x = _make((8, 64, 14, 14), dtype, fmt, g).requires_grad_()
    xd = x.detach().double().requires_grad_()
    wm, wv = torch.randn(64, dtype=D, generator=g).cuda(), torch.randn(64, dtype=D,
                                                                      generator=g).cuda()
    m, v = ops.channel_stats(x, backend="cuda")
    mr, vr = ops.channel_stats(xd, backend="reference")
    (gx,) = torch.autograd.grad((m.double() * wm).sum() + (v.double() * wv).sum(), x)
    (gr,) = torch.autograd.grad((mr * wm).sum() + (vr * wv).sum(), xd)
    _check(gx, gr, TOLERANCES[dtype], "dx")


def test_empty_batch(C):
    for fmt in FORMATS.values():
        x = torch.empty(0, 8, 4, 4, device="cuda").contiguous(memory_format=fmt)
        mean, var = C.channel_stats(x)
        assert not mean.any() and not var.any()
        assert C.epilogue(x, None, torch.ones(8, device="cuda"), None, True, None, 1.0, None,
                          True).shape == x.shape
        _, _, s1, _, gc = C.epilogue_backward(x, x, None, None, None, None, True, 1.0, None,
                                              False, True, False, True, True)
        assert s1.shape == gc.shape == (8,) and not s1.any() and not gc.any()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_finalize(C, momentum):
    bn = torch.nn.BatchNorm2d(32, momentum=momentum).cuda().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for _ in range(3):
        x = torch.randn(8, 32, 7, 7, device="cuda") * 2 + 1
        y = bn(x)
        mean, var = C.channel_stats(x)
        scale, shift = C.bn_finalize(mean, var, bn.weight, bn.bias, rm, rv, nbt, momentum,
                                     bn.eps, 8 * 49)
        _check(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), y, 1e-5, "bn(x)")
        _check(rm, bn.running_mean, 1e-6, "running_mean")
        _check(rv, bn.running_var, 1e-6, "running_var")
        assert nbt.item() == bn.num_batches_tracked.item()


def test_opcheck_cuda(C):
    g = torch.Generator().manual_seed(5)
    for fmt in FORMATS:
        z = _make((2, 16, 3, 5), torch.float16, fmt, g)
        r = _make((2, 16, 3, 5), torch.float16, fmt, g)
        s = (torch.rand(16, generator=g) + 0.5).cuda()
        mean, _ = C.channel_stats(z)
        torch.library.opcheck(C.channel_stats.default, (z,))
        torch.library.opcheck(C.stats_backward.default, (r, s, s, z, mean))
        torch.library.opcheck(C.epilogue.default, (z, mean, s, None, True, r, 0.5, None, True))
        torch.library.opcheck(C.epilogue_backward.default,
                              (r, z, z.relu(), mean, s, s, True, 1.0, None, True, True, True,
                               True, True))


def test_epilogue_under_cuda_graph(C):
    z = torch.randn(4, 64, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(z)
    s, b = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    for _ in range(2):  # warm up outside the graph (allocator, lazy init)
        ops.epilogue(z, s, b, act_mid="relu", residual=r, act_out="relu", backend="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.epilogue(z, s, b, act_mid="relu", residual=r, act_out="relu", backend="cuda")
    z.normal_()
    graph.replay()
    ref = ops.epilogue(z, s, b, act_mid="relu", residual=r, act_out="relu",
                       backend="reference")
    _check(y, ref, 1e-6, "graph replay")


UNITS = [
    (3, 1, 1, "none", False, True, "relu", False, False, "none"),
    (3, 2, 1, "relu", True, True, "none", True, False, "relu"),
    (1, 1, 0, "none", False, True, "none", True, True, "relu"),
    (3, 1, 1, "none", False, True, "none", True, False, "relu"),
    (3, 1, 1, "none", False, True, "none", False, False, "relu"),
]


@pytest.mark.parametrize("backend", ["cuda", "cuda-epilogue", "cudnn"])
@pytest.mark.parametrize("cfg", UNITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_unit_backends(C, backend, cfg, dtype, fmt, monkeypatch):
    if backend == "cuda-epilogue":  # the cuda backend without cuDNN's own fused ops
        monkeypatch.setenv("FUSED_RES_CUDA_CUDNN_FUSED", "0")
        backend = "cuda"
    k, s, pad, act_in, aff_in, aff_out, act_mid, res, branch, act_out = cfg
    g = torch.Generator().manual_seed(6)
    n, cin, cout, h, w = 4, 32, 64, 14, 14
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    t = lambda *shape: torch.randn(*shape, dtype=D, generator=g)
    fm = FORMATS[fmt]
    a = dict(x=t(n, cin, h, w), weight=t(cout, cin, k, k) / (cin * k * k) ** 0.5,
             bias=t(cout), in_center=t(cin) if aff_in else None,
             in_scale=torch.rand(cin, dtype=D, generator=g) + 0.5 if aff_in else None,
             in_shift=t(cin) if aff_in else None,
             out_scale=torch.rand(cout, dtype=D, generator=g) + 0.5 if aff_out else None,
             out_shift=t(cout) if aff_out else None,
             residual=t(n, cout, oh, ow) if res else None,
             branch_scale=torch.rand(n, dtype=D, generator=g) if branch else None)
    kw = dict(stride=s, padding=pad, act_in=act_in, act_mid=act_mid, res_scale=0.7,
              act_out=act_out)

    def on(dev, dt):
        out = {}
        for key, v in a.items():
            if v is None:
                out[key] = None
            elif key in ("x", "residual"):
                out[key] = v.to(dev, dt).contiguous(memory_format=fm)
            elif key in ("weight", "bias"):
                out[key] = v.to(dev, dt)
            else:
                out[key] = v.to(dev, torch.float32 if dt != D else D)
        return out

    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 tolerance 1e-5 is for true fp32 math
    try:
        y = ops.conv_unit(**on("cuda", dtype), **kw, backend=backend)
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    ref = ops.conv_unit(**on("cpu", D), **kw, backend="reference")
    assert y.is_contiguous(memory_format=fm) and y.dtype == dtype
    _check(y, ref, TOLERANCES[dtype] * (5 if dtype == torch.float32 else 1), "y")


def _train_step(model, x, autocast: bool):
    """(logits, {name: grad}) of one forward + backward of mean(logits^2)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    (y if y.dtype == D else y.float()).square().mean().backward()
    return y, {name: p.grad for name, p in model.named_parameters()}


def test_fused_model_train_step_on_gpu(C):
    from fused_res import models

    torch.manual_seed(7)
    base = models.resnet18(num_classes=10).cuda().train()
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    # Three independent models (convert converts a deep copy; the explicit copies say so):
    # ours on the cuda backend and eager (the reference backend's aten ops) both under bf16
    # autocast, and a float64 reference without autocast.
    ours = fused_res.convert(copy.deepcopy(base), backend="cuda").train()
    eager = fused_res.convert(copy.deepcopy(base), backend="reference").train()
    ref64 = fused_res.convert(copy.deepcopy(base).double(), backend="reference").train()
    y, grads = _train_step(ours, x, True)
    y_eager, grads_eager = _train_step(eager, x, True)
    y_ref, grads_ref = _train_step(ref64, x.double(), False)
    # Gradients at the stem pass through the backward of 8 train-mode BatchNorms, which
    # amplifies bf16 rounding: ours must be as close to float64 as eager bf16 is (within 2x),
    # or within the bf16 tolerance, whichever is looser.
    failed = []
    checks = [("logits", y, y_eager, y_ref)] + [
        (f"grad {name}", grads[name], grads_eager[name], grads_ref[name]) for name in grads_ref]
    for what, a, e, r in checks:
        assert torch.isfinite(a).all(), what
        err, eager_err = rel_err(a, r), rel_err(e, r)
        budget = max(TOLERANCES[torch.bfloat16], 2 * eager_err)
        if not err <= budget:
            failed.append(f"{what} (bf16 autocast): relative error {err:.3e} > budget "
                          f"{budget:.3e} (eager bf16: {eager_err:.3e})")
    assert not failed, "; ".join(failed)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_ops_on_gpu(C, backend, momentum):
    """bn_scale / bn_update_running kernels of both GPU backends against nn.BatchNorm2d and
    torch's gradients (tests/helpers.py; the same checks run on the CPU)."""
    from tests.helpers import (
        check_bn_ops_match_batchnorm,
        check_bn_scale_gradients,
        check_bn_update_edge_cases,
        check_scale_and_update_is_the_two_ops,
    )
    if backend == "triton" and not fused_res.available_backends()["triton"].available:
        pytest.skip("triton is unavailable")
    check_bn_ops_match_batchnorm(backend, momentum, True, device="cuda")
    # Channels across many warps and blocks: every warp must read the count before the
    # Triton kernel stores its increment (momentum=None reads it for the factor).
    check_bn_ops_match_batchnorm(backend, momentum, True, device="cuda", channels=2048)
    check_bn_ops_match_batchnorm(backend, momentum, False, dtype=torch.float16,
                                 device="cuda")
    check_bn_scale_gradients(backend, device="cuda")
    check_bn_update_edge_cases(backend, device="cuda")
    check_scale_and_update_is_the_two_ops(backend, device="cuda")


def test_relu_backward_is_eagers_on_gpu(C):
    from tests.helpers import check_relu_backward_matches_eager
    check_relu_backward_matches_eager("cuda", device="cuda")
