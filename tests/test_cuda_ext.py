"""The C++ extension's CPU kernels and the `cuda` backend on CPU tensors, against the float64
reference: every layout and dtype, odd sizes, N = 0; opcheck; the no-extension fallback.

The extension is built once (prebuilt by setup.py, or JIT into the cache) for the module."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fused_res
from fused_res import _ext, models, ops
from fused_res.backends import register_backend
from fused_res.backends.cuda_backend import CudaBackend
from fused_res.backends.cudnn_backend import CudnnBackend
from fused_res.backends.reference import ReferenceBackend
from fused_res.testing import TOLERANCES, rel_err

ROOT = Path(__file__).resolve().parents[1]
D = torch.float64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
SHAPES = [(3, 5, 7, 9), (2, 16, 4, 4), (1, 3, 1, 1), (4, 8, 3, 5)]
REF = ReferenceBackend()


@pytest.fixture(scope="module")
def C():
    lib = _ext.load()
    if lib is None:
        have_tools = shutil.which(os.environ.get("CXX", "c++")) and shutil.which("ninja")
        if have_tools and not os.environ.get(_ext.NO_EXT_ENV):
            pytest.fail(f"a compiler and ninja are present but the extension did not load: "
                        f"{_ext.reason()}")
        pytest.skip(f"extension unavailable: {_ext.reason()}")
    register_backend("cuda", CudaBackend)
    register_backend("cudnn", CudnnBackend)
    return lib


def _t(shape, dtype, fmt, g, scale=1.0, offset=0.0):
    x = torch.randn(*shape, dtype=D, generator=g) * scale + offset
    return x.to(dtype).contiguous(memory_format=FORMATS[fmt])


def _vec(c, g, positive=False):
    v = torch.rand(c, dtype=D, generator=g) + 0.5 if positive else torch.randn(
        c, dtype=D, generator=g)
    return v.float()


def _check(out, ref, tol, what):
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


# ---- channel statistics -------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_channel_stats_matches_reference(C, shape, dtype, fmt):
    g = torch.Generator().manual_seed(1)
    x = _t(shape, dtype, fmt, g, 2.0, 3.0)
    mean, var = C.channel_stats(x)
    ref_mean, ref_var = REF.channel_stats_forward(x.double())
    assert mean.dtype == var.dtype == torch.float32
    # Same (rounded) inputs, fp32 accumulation: fp32-level error whatever the I/O dtype.
    _check(mean, ref_mean, 1e-6, "mean")
    _check(var, ref_var, 1e-5, "var")


@pytest.mark.parametrize("fmt", FORMATS)
def test_channel_stats_survive_a_large_mean(C, fmt):
    """|mean| / std = 1e4: plain Σx, Σx² in fp32 would lose the variance entirely."""
    g = torch.Generator().manual_seed(2)
    x = _t((8, 4, 16, 16), torch.float32, fmt, g, 0.01, 100.0)
    mean, var = C.channel_stats(x)
    ref_mean, ref_var = REF.channel_stats_forward(x.double())
    _check(mean, ref_mean, 1e-7, "mean")
    _check(var, ref_var, 1e-4, "var")


def _far_first_element(shape, fmt, g, outlier):
    """Zero-mean data whose every channel starts with `outlier` (the kernels' shift)."""
    x = torch.randn(*shape, dtype=D, generator=g)
    x[0, :, 0, 0] = outlier
    return x.float().contiguous(memory_format=FORMATS[fmt])


@pytest.mark.parametrize("outlier", [None, 30.0])
@pytest.mark.parametrize("fmt", FORMATS)
def test_channel_stats_keep_fp32_accuracy_far_from_the_shift(C, fmt, outlier):
    """A zero-mean channel (None: its first element is typical) and one whose first element,
    the shift, sits 30 std out: with float running sums the CPU kernel lost 2e-5 of the first
    mean and 1.4e-4 of the second variance, past fp32's 1e-5 (the reference: 3e-8)."""
    for seed in range(4):  # (the float sums' error varies with the draw: 1e-6 to 1.5e-4)
        g = torch.Generator().manual_seed(seed)
        x = _far_first_element((64, 2, 32, 32), fmt, g, outlier or 0.0)
        if outlier is None:
            x[0, :, 0, 0] = x[1, :, 0, 0]
        mean, var = C.channel_stats(x)
        ref_mean, ref_var = REF.channel_stats_forward(x.double())
        _check(mean, ref_mean, TOLERANCES[torch.float32], f"mean (seed {seed})")
        _check(var, ref_var, TOLERANCES[torch.float32], f"var (seed {seed})")


def test_channel_stats_of_a_channel_that_starts_with_inf(C):
    """An inf anywhere in a channel makes its mean inf (as x.mean()) and its variance NaN,
    the first element included: an inf shift made the mean NaN there only."""
    for pos in [(0, 1, 0, 0), (1, 1, 2, 3)]:
        x = torch.randn(2, 3, 4, 5)
        x[pos] = float("inf")
        for fmt in FORMATS.values():
            mean, var = C.channel_stats(x.contiguous(memory_format=fmt))
            assert mean[1].item() == float("inf") and var[1].isnan(), (pos, fmt)
            assert torch.isfinite(mean[[0, 2]]).all() and torch.isfinite(var[[0, 2]]).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_batch(C, fmt):
    x = torch.empty(0, 6, 5, 3).contiguous(memory_format=FORMATS[fmt])
    mean, var = C.channel_stats(x)
    assert mean.shape == (6,) and not mean.any() and not var.any()
    y = C.epilogue(x, torch.zeros(6), torch.ones(6), None, True, torch.empty_like(x), 0.5,
                   torch.empty(0), True)
    assert y.shape == x.shape
    gz, gr, s1, s2, gc = C.epilogue_backward(x, x, x, None, torch.ones(6), None, True, 1.0,
                                             None, True, True, True, True, True)
    assert gz.shape == gr.shape == x.shape and s1.shape == s2.shape == gc.shape == (6,)
    assert not s1.any() and not s2.any() and not gc.any()
    assert C.stats_backward(None, torch.ones(6), torch.ones(6), x, mean).shape == x.shape


@pytest.mark.parametrize("has_scale", [True, False])
@pytest.mark.parametrize("need_sums", [True, False])
@pytest.mark.parametrize("fmt", FORMATS)
def test_epilogue_backward_center_gradient(C, has_scale, need_sums, fmt):
    """dL/dcenter = -scale · Σ dL/du from the op itself (its sums' finalize), equal to what
    the sums give, whether or not the sums are returned; the same sums and gradients as
    without it."""
    g = torch.Generator().manual_seed(9)
    z, gy = _t((3, 8, 5, 7), torch.float32, fmt, g), _t((3, 8, 5, 7), torch.float32, fmt, g)
    c, s, b = _vec(8, g), (_vec(8, g, True) if has_scale else None), _vec(8, g)
    args = (gy, z, None, c, s, b, True, 1.0, None, False, True, False)
    gz, _, s1, s2, gc = C.epilogue_backward(*args, need_sums, True)
    gz0, _, s10, s20, gc0 = C.epilogue_backward(*args, True)
    assert gc0.numel() == 0 and gc.shape == (8,) and torch.equal(gz, gz0)
    want = -(s if has_scale else torch.ones(8)) * s10
    assert torch.equal(gc, want)
    if need_sums:
        assert torch.equal(s1, s10) and torch.equal(s2, s20)
    else:
        assert s1.numel() == 0 and s2.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_stats_backward_formula(C, dtype, fmt):
    g = torch.Generator().manual_seed(3)
    z = _t((3, 8, 5, 7), dtype, fmt, g)
    gz = _t((3, 8, 5, 7), dtype, fmt, g)
    gmean, gvar = _vec(8, g), _vec(8, g)
    mean, _ = C.channel_stats(z)
    out = C.stats_backward(gz, gmean, gvar, z, mean)
    m = 3 * 5 * 7
    ref = (gz.double() + gmean.double().view(1, -1, 1, 1) / m
           + 2 * gvar.double().view(1, -1, 1, 1) * (z.double() - mean.double().view(1, -1, 1, 1))
           / m)
    assert out.dtype == dtype and out.is_contiguous(memory_format=FORMATS[fmt])
    _check(out, ref, TOLERANCES[dtype], "stats_backward")


# ---- the apply pass (epilogue) ------------------------------------------------------------

# (center, scale, shift, relu_mid, residual, res_scale, branch_scale, relu_out)
EPILOGUES = [
    (True, True, True, True, False, 1.0, False, False),     # BN + ReLU
    (True, True, True, False, True, 1.0, False, True),      # BN, + shortcut, ReLU
    (False, True, True, True, True, 0.5, True, True),       # folded BN, drop-path, λ
    (False, False, False, False, True, 2.0, True, False),   # add only
    (True, False, True, True, False, 1.0, True, True),      # odd mix
]


def _epilogue_args(shape, dtype, fmt, cfg, g):
    ce, sc, sh, rm, res, lam, br, ro = cfg
    c, n = shape[1], shape[0]
    z = _t(shape, dtype, fmt, g)
    return dict(z=z, center=_vec(c, g) if ce else None, scale=_vec(c, g, True) if sc else None,
                shift=_vec(c, g) if sh else None, act_mid="relu" if rm else "none",
                residual=_t(shape, dtype, fmt, g) if res else None, res_scale=lam,
                branch_scale=torch.rand(n, generator=g, dtype=D).float() if br else None,
                act_out="relu" if ro else "none")


def _up(v):
    if isinstance(v, torch.Tensor):
        return v.detach().double().requires_grad_(v.requires_grad)
    return v


# The kernels' rows in chunks: one short chunk, and (667 = 512 + 155 pixels of a channel,
# NCHW) two, the last not a whole number of the sums' lanes.
EPILOGUE_SHAPES = {"small": None, "two_chunks": (2, 8, 23, 29)}


@pytest.mark.parametrize("cfg", EPILOGUES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", EPILOGUE_SHAPES)
def test_epilogue_forward_matches_reference(C, cfg, dtype, fmt, size):
    g = torch.Generator().manual_seed(4)
    a = _epilogue_args(EPILOGUE_SHAPES[size] or (3, 8, 5, 7), dtype, fmt, cfg, g)
    y = C.epilogue(a["z"], a["center"], a["scale"], a["shift"], a["act_mid"] == "relu",
                   a["residual"], a["res_scale"], a["branch_scale"], a["act_out"] == "relu")
    ref = REF.epilogue_forward(*(_up(a[k]) for k in (
        "z", "center", "scale", "shift", "act_mid", "residual", "res_scale", "branch_scale",
        "act_out")))
    assert y.dtype == dtype and y.is_contiguous(memory_format=FORMATS[fmt])
    _check(y, ref, TOLERANCES[dtype], "y")


@pytest.mark.parametrize("cfg", EPILOGUES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", EPILOGUE_SHAPES)
def test_epilogue_backward_through_ops(C, cfg, dtype, fmt, size):
    """fused_res.ops.epilogue on backend 'cuda' (the CPU kernels), forward and every gradient,
    against the float64 reference backend on the same inputs."""
    g = torch.Generator().manual_seed(5)
    shape = EPILOGUE_SHAPES[size] or ((3, 8, 5, 7) if fmt == "nchw" else (2, 16, 3, 5))
    a = _epilogue_args(shape, dtype, fmt, cfg, g)
    for k in ("z", "center", "scale", "shift", "residual"):
        if a[k] is not None:
            a[k].requires_grad_()
    b = {k: _up(v) for k, v in a.items()}

    def run(args, backend):
        return ops.epilogue(args["z"], args["scale"], args["shift"], center=args["center"],
                            act_mid=args["act_mid"], residual=args["residual"],
                            res_scale=args["res_scale"], branch_scale=args["branch_scale"],
                            act_out=args["act_out"], backend=backend)

    y, ref = run(a, "cuda"), run(b, "reference")
    tol = TOLERANCES[dtype]
    _check(y, ref, tol, "y")
    # (in z's layout: the kernels take the backward in gy's, so an NCHW gy would run the
    # NCHW kernel on a channels_last z)
    gy = torch.randn(shape, dtype=D, generator=g).contiguous(memory_format=FORMATS[fmt])
    names = [k for k in ("z", "center", "scale", "shift", "residual") if a[k] is not None]
    got = torch.autograd.grad(y, [a[k] for k in names], gy.to(dtype))
    want = torch.autograd.grad(ref, [b[k] for k in names], gy.to(dtype).double())
    for k, gg, ww in zip(names, got, want, strict=True):
        assert gg.dtype == a[k].dtype
        # Per-channel sums of fp16/bf16 gradients: their error grows with the reduction.
        _check(gg, ww, tol * (4 if k in ("center", "scale", "shift") else 1), f"d{k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_channel_stats_gradient_through_ops(C, dtype, fmt):
    g = torch.Generator().manual_seed(6)
    x = _t((3, 8, 5, 7), dtype, fmt, g).requires_grad_()
    xd = _up(x)
    wm, wv = torch.randn(8, dtype=D, generator=g), torch.randn(8, dtype=D, generator=g)
    m, v = ops.channel_stats(x, backend="cuda")
    mr, vr = ops.channel_stats(xd, backend="reference")
    (gx,) = torch.autograd.grad((m.double() * wm).sum() + (v.double() * wv).sum(), x)
    (gr,) = torch.autograd.grad((mr * wm).sum() + (vr * wv).sum(), xd)
    _check(gx, gr, TOLERANCES[dtype], "dx")


# ---- BatchNorm finalize -------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_finalize_matches_batchnorm2d(C, momentum, affine):
    g = torch.Generator().manual_seed(7)
    bn = nn.BatchNorm2d(6, momentum=momentum, affine=affine).train()
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.rand(6, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(6, generator=g))
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    nbt = bn.num_batches_tracked.clone()
    for _ in range(3):
        x = torch.randn(4, 6, 5, 3, generator=g) * 2 + 1
        y = bn(x)
        mean, var = C.channel_stats(x)
        scale, shift = C.bn_finalize(mean, var, bn.weight, bn.bias, rm, rv, nbt, momentum,
                                     bn.eps, 4 * 5 * 3)
        _check(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), y, 1e-5, "bn(x)")
        _check(rm, bn.running_mean, 1e-6, "running_mean")
        _check(rv, bn.running_var, 1e-6, "running_var")
        assert nbt.item() == bn.num_batches_tracked.item()


def test_bn_finalize_empty_batch_only_counts_and_rejects_one_value(C):
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(5)
    C.bn_finalize(torch.zeros(3), torch.zeros(3), None, None, rm, rv, nbt, 0.1, 1e-5, 0)
    assert nbt.item() == 6 and not rm.any() and (rv == 1).all()
    with pytest.raises(RuntimeError, match="more than one value"):
        C.bn_finalize(torch.zeros(3), torch.zeros(3), None, None, rm, rv, nbt, 0.1, 1e-5, 1)


def test_bn_finalize_bumps_the_version_of_what_it_updates(C):
    """The kernels write the running statistics through pointers; without the op's
    ADInplaceOrView kernel their version counters stayed put, so a backward that had saved
    running_var read the updated values (a gradient of 10 for 1) instead of raising, as aten's
    in-place ops make it (a probe). Inference tensors, which have no counter, still update."""
    rm, rv, nbt = torch.zeros(4), torch.ones(4), torch.tensor(0)
    C.bn_finalize(torch.randn(4), torch.rand(4), None, None, rm, rv, nbt, 0.5, 1e-5, 10)
    assert rm._version > 0 and rv._version > 0 and nbt._version > 0
    x = torch.randn(4, requires_grad=True)
    saved = torch.ones(4)
    y = (x * saved).sum()
    C.bn_finalize(torch.zeros(4), torch.full((4,), 9.0), None, None, torch.zeros(4), saved,
                  None, 1.0, 1e-5, 10)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    with torch.inference_mode():
        rm, rv = torch.zeros(4), torch.ones(4)
        C.bn_finalize(torch.ones(4), torch.ones(4), None, None, rm, rv, None, 1.0, 1e-5, 2)
    C.bn_finalize(torch.ones(4), torch.ones(4), None, None, rm, rv, None, 1.0, 1e-5, 2)
    assert (rm == 1).all() and (rv == 2).all()


# ---- argument checks ----------------------------------------------------------------------

def test_an_argument_on_meta_is_refused_by_name(C):
    """A meta tensor routes the whole call to the fake kernels, past the C++ device checks:
    those returned uninitialised CPU memory and skipped the in-place updates."""
    z, meta = torch.randn(2, 3, 4, 5), torch.ones(3, device="meta")
    calls = {
        "scale": lambda: C.epilogue(z, None, meta, None, False, None, 1.0, None, False),
        "gz": lambda: C.stats_backward(torch.randn(2, 3, 4, 5, device="meta"), None, None, z,
                                       torch.zeros(3)),
        "num_batches_tracked": lambda: C.bn_finalize(
            torch.full((3,), 5.0), torch.full((3,), 4.0), None, None, torch.zeros(3),
            torch.ones(3), torch.tensor(0, device="meta"), 0.5, 1e-5, 10),
        "grad": lambda: C.bn_scale_backward(meta, torch.ones(3), None, 1e-5, True, False),
        "center": lambda: C.epilogue_backward(z, z, None, meta, None, None, False, 1.0, None,
                                              False, True, False, True, True),
        "weight": lambda: C.bn_scale(torch.ones(3), meta, 1e-5),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=f"{name} is on meta; accepted"):
            call()


def test_bad_arguments_name_the_argument_and_what_is_accepted(C):
    z = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="z has shape .*accepted: a 4-D"):
        C.epilogue(z[0], None, None, None, False, None, 1.0, None, False)
    with pytest.raises(RuntimeError, match="z has dtype Double.*accepted: float32"):
        C.epilogue(z.double(), None, None, None, False, None, 1.0, None, False)
    with pytest.raises(RuntimeError, match="scale has shape .*accepted: \\(4,\\)"):
        C.epilogue(z, None, torch.ones(3), None, False, None, 1.0, None, False)
    with pytest.raises(RuntimeError, match="residual has shape"):
        C.epilogue(z, None, None, None, False, torch.randn(2, 4, 3, 2), 1.0, None, False)
    with pytest.raises(RuntimeError, match="relu_mid=True needs z"):
        C.epilogue_backward(z, None, None, None, None, None, True, 1.0, None, False, True,
                            False, False)
    # The buffer or vector at fault by its schema name (both were once "running
    # statistics" and "weight", names no argument of these ops has).
    ones = torch.ones(4)
    with pytest.raises(RuntimeError, match="running_var has shape .*accepted: contiguous"):
        C.bn_finalize(ones, ones, None, None, torch.zeros(4), ones.half(), None, 0.1, 1e-5, 10)
    with pytest.raises(RuntimeError, match="bn_weight has shape .*accepted: \\(4,\\)"):
        C.bn_epilogue_backward(z, z, None, ones, ones, None, False, 1.0, None, False, True,
                               False, False, ones, ones[:2], 1e-5, True, True)


# ---- opcheck and compile ------------------------------------------------------------------

def _opcheck_samples():
    g = torch.Generator().manual_seed(8)
    out = []
    for fmt in FORMATS:
        z = _t((2, 8, 3, 5), torch.float32, fmt, g)
        r = _t((2, 8, 3, 5), torch.float32, fmt, g)
        c, s, b = _vec(8, g), _vec(8, g, True), _vec(8, g)
        d = torch.rand(2, generator=g)
        mean, _ = REF.channel_stats_forward(z)
        out += [
            ("channel_stats", (z,)),
            ("channel_stats", (z.half(),)),
            ("stats_backward", (r, _vec(8, g), _vec(8, g), z, mean)),
            ("stats_backward", (None, _vec(8, g), None, z, mean)),
            ("epilogue", (z, c, s, b, True, r, 0.5, d, True)),
            ("epilogue", (z.bfloat16(), None, s, None, False, None, 1.0, None, True)),
            ("epilogue_backward", (r, z, z.relu(), c, s, b, True, 0.5, d, True, True, True,
                                   True)),
            ("epilogue_backward", (r, z, None, c, s, b, True, 1.0, None, False, False, False,
                                   False, True)),
            ("epilogue_backward", (r, None, None, None, None, None, False, 1.0, None, False,
                                   False, True, True)),
        ]
    out.append(("bn_finalize", (_vec(8, g), _vec(8, g, True), _vec(8, g), None, torch.zeros(8),
                                torch.ones(8), torch.tensor(0), None, 1e-5, 30)))
    out += [("bn_scale", (_vec(8, g, True), _vec(8, g), 1e-5)),
            ("bn_scale", (_vec(8, g, True), None, 1e-3)),
            ("bn_scale_backward", (_vec(8, g), _vec(8, g, True), _vec(8, g), 1e-5, True, True)),
            ("bn_scale_backward", (_vec(8, g), _vec(8, g, True), None, 1e-5, True, False))]
    return out


@pytest.mark.parametrize("name,args", _opcheck_samples(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(C, name, args):
    torch.library.opcheck(getattr(C, name).default, args)


def test_compiles_fullgraph(C):
    def f(z, s, b, r):
        y = torch.ops.fused_res_C.epilogue(z, None, s, b, True, r, 1.0, None, True)
        m, v = torch.ops.fused_res_C.channel_stats(y)
        return y * 2, m + v

    g = torch.Generator().manual_seed(9)
    z, r = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    s, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    got = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)(z, s, b, r)
    for x, y in zip(got, f(z, s, b, r), strict=True):
        torch.testing.assert_close(x, y)


# ---- the cuda backend through fused_res.ops -----------------------------------------------

UNITS = [
    # (kernel, stride, padding, act_in, affine_in, affine_out, act_mid, residual, branch, act_out)
    (3, 1, 1, "none", False, True, "relu", False, False, "none"),
    (3, 2, 1, "relu", True, True, "none", True, False, "relu"),
    (1, 1, 0, "none", False, True, "none", True, True, "relu"),
    (1, 2, 0, "relu", False, False, "none", False, False, "none"),
    (3, 1, 1, "relu", True, False, "relu", True, True, "none"),
]


def _unit(cfg, dtype, fmt, g, n=2, cin=6, cout=8, h=7, w=9):
    k, s, pad, act_in, aff_in, aff_out, act_mid, res, branch, act_out = cfg
    t = lambda *shape: torch.randn(*shape, dtype=D, generator=g)
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    fm = FORMATS[fmt]
    a = dict(x=t(n, cin, h, w).to(dtype).contiguous(memory_format=fm),
             weight=(t(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype), bias=t(cout).to(dtype),
             in_center=t(cin).float() if aff_in else None,
             in_scale=(torch.rand(cin, generator=g) + 0.5) if aff_in else None,
             in_shift=t(cin).float() if aff_in else None,
             out_scale=(torch.rand(cout, generator=g) + 0.5) if aff_out else None,
             out_shift=t(cout).float() if aff_out else None,
             residual=t(n, cout, oh, ow).to(dtype).contiguous(memory_format=fm) if res else None,
             branch_scale=torch.rand(n, generator=g) if branch else None)
    kw = dict(stride=s, padding=pad, act_in=act_in, act_mid=act_mid, res_scale=0.7,
              act_out=act_out)
    return a, kw


@pytest.mark.parametrize("cfg", UNITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_unit_cuda_backend_matches_reference(C, cfg, dtype, fmt):
    g = torch.Generator().manual_seed(10)
    a, kw = _unit(cfg, dtype, fmt, g)
    grad_names = [k for k, v in a.items() if v is not None and k != "branch_scale"]
    for k in grad_names:
        a[k].requires_grad_()
    b = {k: _up(v) for k, v in a.items()}
    y = ops.conv_unit(**a, **kw, backend="cuda")
    ref = ops.conv_unit(**b, **kw, backend="reference")
    assert y.is_contiguous(memory_format=FORMATS[fmt])
    tol = TOLERANCES[dtype]
    _check(y, ref, tol, "y")
    gy = torch.randn(ref.shape, dtype=D, generator=g)
    got = torch.autograd.grad(y, [a[k] for k in grad_names], gy.to(dtype))
    want = torch.autograd.grad(ref, [b[k] for k in grad_names], gy.to(dtype).double())
    for k, gg, ww in zip(grad_names, got, want, strict=True):
        _check(gg, ww, tol * 4, f"d{k}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_conv_bn_stats_cuda_backend_matches_reference(C, fmt):
    g = torch.Generator().manual_seed(11)
    a, _ = _unit(UNITS[1], torch.float32, fmt, g)
    args = {k: a[k] for k in ("x", "weight", "bias", "in_center", "in_scale", "in_shift")}
    for v in args.values():
        v.requires_grad_()
    b = {k: _up(v) for k, v in args.items()}
    outs = ops.conv_bn_stats(**args, stride=2, padding=1, act_in="relu", backend="cuda")
    refs = ops.conv_bn_stats(**b, stride=2, padding=1, act_in="relu", backend="reference")
    for o, r, what in zip(outs, refs, ("z", "mean", "var"), strict=True):
        _check(o, r, 1e-5, what)
    ws = [torch.randn(r.shape, dtype=D, generator=g) for r in refs]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, ws, strict=True))
    loss_ref = sum((r * w).sum() for r, w in zip(refs, ws, strict=True))
    got = torch.autograd.grad(loss, list(args.values()))
    want = torch.autograd.grad(loss_ref, list(b.values()))
    for k, gg, ww in zip(args, got, want, strict=True):
        _check(gg, ww, 1e-4, f"d{k}")


def test_cuda_backend_declines_float64_with_a_warning(C):
    x = torch.randn(1, 2, 3, 3, dtype=D)
    with pytest.warns(UserWarning, match="float64"):
        y = ops.epilogue(x, torch.ones(2, dtype=D), None, act_mid="relu", backend="cuda")
    torch.testing.assert_close(y, x.relu())


def test_converted_model_train_step_on_cuda_backend(C):
    """A CIFAR ResNet converted on backend 'cuda' (CPU kernels) trains like the reference:
    outputs, every gradient and the running statistics after one step, in fp32."""
    torch.manual_seed(12)
    base = models.cifar_resnet(8, variant="original", shortcut="B", shortcut_scale=0.8)
    base_pre = models.cifar_resnet(8, variant="full_preact", shortcut="A")
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    for model in (base, base_pre):
        ours = fused_res.convert(model, backend="cuda").train()
        ref = fused_res.convert(model, backend="reference").train()
        y, yr = ours(x), ref(x)
        _check(y, yr, 1e-5, "logits")
        y.square().sum().backward()
        yr.square().sum().backward()
        for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
            _check(p.grad, q.grad, 1e-4, f"grad {n}")
        for (n, bb), (_, rb) in zip(ours.named_buffers(), ref.named_buffers(), strict=True):
            _check(bb.float(), rb.float(), 1e-5, f"buffer {n}")
        ours.eval()
        ref.eval()
        with torch.no_grad():
            _check(ours(x), ref(x), 1e-5, "eval logits")


def test_cudnn_backend_reports_why_it_cannot_run_here(C):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    status = CudnnBackend().status()
    assert not status.available and "CUDA" in status.reason


# ---- loading: light import, no-extension and no-compiler fallbacks ------------------------

def _run(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=e, timeout=300)


def test_import_does_not_load_the_extension():
    out = _run("import sys, fused_res, torch; from fused_res import _ext; "
               "assert 'fused_res._C' not in sys.modules; assert not _ext._state['done']; "
               "print('ok')")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


_FALLBACK = """
import sys, warnings, torch
sys.modules['fused_res._C'] = None      # no prebuilt extension
import fused_res
from fused_res import _ext, ops
from fused_res.backends import register_backend
from fused_res.backends.cuda_backend import CudaBackend
register_backend('cuda', CudaBackend)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    st = fused_res.available_backends()['cuda']
    x = torch.randn(2, 3, 4, 4)
    y = ops.epilogue(x, torch.ones(3), None, act_mid='relu', backend='cuda')
    y = ops.epilogue(x, torch.ones(3), None, act_mid='relu', backend='cuda')
assert torch.equal(y, x.relu())
print('STATUS', st)
print('SOURCES', _ext.CSRC.joinpath('ops.cpp').is_file())
for m in w:
    print('WARN', m.message)
"""


def test_no_compiler_falls_back_with_one_clear_warning(tmp_path):
    out = _run(_FALLBACK, CXX=str(tmp_path / "no-such-c++"), FUSED_RES_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    status = [ln for ln in lines if ln.startswith("STATUS")]
    # A checkout, or an installed copy with its packaged sources, gets as far as the compiler;
    # a copy without sources (installed some other way) stops before it and says so.
    why = "no C++ compiler" if "SOURCES True" in lines else "sources are missing"
    assert status and "unavailable" in status[0] and why in status[0], lines
    assert "JIT build failed" not in status[0], lines
    ext_warnings = [ln for ln in lines if "extension is unavailable" in ln]
    assert len(ext_warnings) == 1, lines
    fallback = [ln for ln in lines if "using the reference backend" in ln]
    assert len(fallback) == 1, lines


def test_no_ext_environment_variable_skips_the_extension(tmp_path):
    out = _run(_FALLBACK, FUSED_RES_NO_EXT="1", FUSED_RES_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "FUSED_RES_NO_EXT" in out.stdout
    assert not any(p.name.startswith("ext-") for p in tmp_path.iterdir())


def test_find_cuda_home_reads_wrapper_scripts(tmp_path, monkeypatch):
    home = tmp_path / "cuda-13.9"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / "include" / "cuda_runtime.h").write_text("")
    wrapper = tmp_path / "wrapbin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    assert _ext.find_cuda_home() == str(home)
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert _ext.find_cuda_home() == str(home)


def test_warnings_are_not_errors_in_the_kernels_module():
    # The extension's CPU path must not emit warnings of its own on a plain call.
    if _ext.load() is None:
        pytest.skip(_ext.reason())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.ops.fused_res_C.channel_stats(torch.randn(2, 3, 4, 4))


def test_a_converted_model_compiles_fullgraph_on_its_first_call(C):
    """The first call of a fused model may be the one torch.compile traces, and dynamo cannot
    trace the extension's loader (a lock, maybe a build): convert() loads what the backend
    needs. Train (with the backward) and eval, against the same model uncompiled."""
    import copy

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    for mode in ("train", "eval"):
        _ext._reset_for_tests()
        torch._dynamo.reset()
        model = getattr(fused_res.convert(models.cifar_resnet(8), backend="cuda"), mode)()
        assert _ext.loaded()
        eager = copy.deepcopy(model)
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        want = eager(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        if mode == "train":
            got.square().sum().backward()
            want.square().sum().backward()
            for (n, a), b in zip(model.named_parameters(), eager.parameters(), strict=True):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_compiling_the_first_use_of_the_cuda_backend_says_what_to_do(C):
    """Where nothing loaded the extension before the trace (the functional API with an
    explicit backend), the compile fails with the remedy, not with dynamo's lock error or a
    silent reference path; after prepare() the same function compiles."""
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(8, 4, 3, 3)
    f = lambda x, w: fused_res.ops.conv_unit(x, w, padding=1, act_out="relu",  # noqa: E731
                                              backend="cuda")
    _ext._reset_for_tests()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="prepare"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(x, w)
    fused_res.backends.prepare("cuda")
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(x, w),
                               f(x, w))


def test_prepare_loads_what_auto_recorded_and_what_none_stands_for(C, tmp_path, monkeypatch):
    """'auto' may run the cuda backend where its cache recorded it the winner, and None
    follows $FUSED_RES_BACKEND: convert() loads the extension for both, before any trace."""
    import json

    from fused_res.backends import auto

    path = tmp_path / "auto.json"
    path.write_text(json.dumps({"cpu|conv_unit|x": {"backend": "cuda"}}))
    monkeypatch.setenv("FUSED_RES_AUTO_CACHE", str(path))
    auto.reset()
    try:
        _ext._reset_for_tests()
        fused_res.convert(models.cifar_resnet(8))
        assert _ext.loaded()
    finally:
        auto.reset()
    monkeypatch.setenv("FUSED_RES_BACKEND", "cuda")
    _ext._reset_for_tests()
    fused_res.convert(models.cifar_resnet(8), backend=None)
    assert _ext.loaded()


def test_non_strict_export_may_load_the_extension(C):
    """torch.export(strict=False) runs the Python for real: the first use of the cuda backend
    loads the extension there instead of raising the compile-trace error."""
    class Unit(nn.Module):
        def forward(self, x, w):
            return fused_res.ops.conv_unit(x, w, padding=1, act_out="relu", backend="cuda")

    x, w = torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3)
    _ext._reset_for_tests()
    exported = torch.export.export(Unit(), (x, w), strict=False)
    assert _ext.loaded()
    torch.testing.assert_close(exported.module()(x, w), Unit()(x, w))


def test_relu_backward_is_eagers(C):
    """The CPU kernels' act_mid / act_out gradients (and the prologue's, which the backend
    shares with the reference) where ReLU is off, on or NaN, under NaN and inf gradients."""
    from tests.helpers import check_relu_backward_matches_eager
    check_relu_backward_matches_eager("cuda")


def test_gpus_older_than_sm80_are_declined_with_a_reason(monkeypatch):
    """The CUDA kernels are built for sm_80+ (and sm_90 PTX): on a T4 or V100 CUDA found no
    image only at the first launch, mid-model; now the backend declines such a device (the
    op falls back to the reference with one warning, as for any unsupported case)."""
    from types import SimpleNamespace

    from fused_res.backends import cuda_backend
    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: True)
    x = SimpleNamespace(dtype=torch.float16, device=torch.device("cuda", 0))
    for cap, declined in (((7, 5), True), ((7, 0), True), ((8, 0), False), ((8, 6), False),
                          ((9, 0), False), ((10, 0), False)):
        monkeypatch.setattr(cuda_backend, "_capability", lambda device, c=cap: c)
        reason = CudaBackend().unsupported_reason(x, None, 1, (1, 1))
        assert (reason is not None) == declined, (cap, reason)
        if declined:
            assert f"compute capability {cap[0]}.{cap[1]}" in reason and "sm_80" in reason


def test_cpu_ops_benchmark_checks_and_times_every_row(C, capsys):
    """benchmarks/cpu_ops.py on a tiny activation: every dtype and layout is checked against
    the reference and timed (no WRONG row), each op named in its row."""
    import importlib.util as iu
    spec = iu.spec_from_file_location("cpu_ops", ROOT / "benchmarks" / "cpu_ops.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--shape", "2,8,5,7", "--dtype", "fp32,fp16,bf16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "WRONG" not in out
    rows = [line for line in out.splitlines() if line.startswith(("fp32", "fp16", "bf16"))]
    assert len(rows) == 6, out
    for line in rows:
        for op in ("aten bn+add+relu", "ours tail", "ours tail bwd", "ours stats"):
            assert op in line, line


@pytest.mark.parametrize("fmt", FORMATS)
def test_float16_conversions_are_exact(C, fmt):
    """The CPU kernels' float16 loads and stores (F16C where the CPU has it, else c10's): every
    one of the 65,536 values comes back through an identity apply pass bit for bit (NaN as
    NaN; -0 as +0, which the pass's +0 shift makes of it), and rounding a float32 result,
    ties and overflow included, is torch's .half()."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    z = bits.view(torch.float16).reshape(1, 256, 16, 16).contiguous(
        memory_format=FORMATS[fmt])
    y = C.epilogue(z, None, None, None, False, None, 1.0, None, False)
    zb, yb = z.view(torch.int16), y.view(torch.int16)
    nan = torch.isnan(z)
    assert torch.equal(torch.isnan(y), nan)
    negative_zero = zb == -32768
    assert torch.equal(yb[~nan & ~negative_zero], zb[~nan & ~negative_zero])
    assert (yb[negative_zero] == 0).all()
    g = torch.Generator().manual_seed(6)
    z = (torch.randn(2, 8, 9, 11, generator=g) * 10).half().contiguous(
        memory_format=FORMATS[fmt])
    # (2049 and 2051 are ties between float16 neighbours; 3e4 overflows some products)
    for scale, shift in ((torch.rand(8, generator=g), None), (None, torch.full((8,), 2049.0)),
                         (None, torch.full((8,), 2051.0)), (torch.full((8,), 3e4), None)):
        y = C.epilogue(z, None, scale, shift, False, None, 1.0, None, False)
        ref = z.float() * (1 if scale is None else scale.view(1, 8, 1, 1)) + (
            0 if shift is None else shift.view(1, 8, 1, 1))
        assert torch.equal(y, ref.half())
