"""The extension's merged ops of a training conv unit (csrc/ops.cpp): channel_stats_bn, the
statistics with the BatchNorm's finalize, and bn_epilogue_backward, the apply backward with
the gradient of the BatchNorm's scale. Each gives what the two ops it stands for give, bit
for bit (the CPU kernels run the two; the CUDA ones do the second in the first's reduction
finalize launch, `-m gpu`);
the cuda backend's training node takes them; opcheck; bad arguments named."""

import copy

import pytest
import torch
from helpers import logging_backend

from fused_res import _ext
from fused_res import nn as fnn
from fused_res.backends import cuda_backend, register_backend
from fused_res.backends.cuda_backend import CudaBackend

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# (N, C, H, W): odd, vector-friendly, a single pixel, many channels, one sample
SHAPES = [(3, 5, 7, 9), (4, 64, 8, 8), (2, 3, 1, 1), (2, 264, 7, 7), (1, 16, 5, 5)]


@pytest.fixture(scope="module")
def C():
    lib = _ext.load()
    if lib is None:
        pytest.skip(f"extension unavailable: {_ext.reason()}")
    register_backend("cuda", CudaBackend)
    return lib


def _needs_device(C, device):
    if device == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(
            "fused_res_C::channel_stats_bn", "CUDA"):
        pytest.fail("the extension was built without its CUDA kernels")


def _feature_map(shape, dtype, fmt, g, device, offset=0.0):
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5 + offset
    return x.to(dtype).contiguous(memory_format=FORMATS[fmt]).to(device)


def _buffers(c, g, device):
    return (torch.randn(c, generator=g).to(device), (torch.rand(c, generator=g) + 0.5).to(device),
            torch.tensor(7, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_channel_stats_bn_is_channel_stats_then_bn_finalize(C, device, shape, dtype, fmt):
    _needs_device(C, device)
    g = torch.Generator().manual_seed(1)
    x = _feature_map(shape, dtype, fmt, g, device, offset=2.0)
    weight = (torch.rand(shape[1], generator=g) + 0.5).to(device)
    for w, momentum, eps in ((weight, 0.1, 1e-5), (None, 0.3, 1e-3),
                             (weight.to(torch.bfloat16), 1.0, 0.0)):
        got_bufs = _buffers(shape[1], torch.Generator().manual_seed(2), device)
        want_bufs = tuple(b.clone() for b in got_bufs)
        mean, var, scale = C.channel_stats_bn(x, w, *got_bufs, momentum, eps)
        m, v = C.channel_stats(x)
        count = shape[0] * shape[2] * shape[3]
        s, _ = C.bn_finalize(m, v, w, None, *want_bufs, momentum, eps, count)
        for a, b in zip((mean, var, scale, *got_bufs), (m, v, s, *want_bufs), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert got_bufs[2].item() == 8


@pytest.mark.parametrize("device", DEVICES)
def test_channel_stats_bn_of_an_empty_batch_and_its_errors(C, device):
    _needs_device(C, device)
    x = torch.randn(0, 4, 3, 3, device=device)
    rm, rv, nbt = torch.zeros(4, device=device), torch.ones(4, device=device), \
        torch.tensor(0, device=device)
    mean, var, scale = C.channel_stats_bn(x, None, rm, rv, nbt, 0.1, 1.0)
    assert not mean.any() and not var.any() and (scale == 1).all()
    assert nbt.item() == 1 and not rm.any() and (rv == 1).all()  # counted, not averaged
    assert rm._version > 0 and rv._version > 0 and nbt._version > 0
    with pytest.raises(RuntimeError, match="count=1; BatchNorm in training needs more"):
        C.channel_stats_bn(torch.randn(1, 4, 1, 1, device=device), None, rm, rv, nbt, 0.1,
                           1e-5)
    with pytest.raises(RuntimeError, match="running_mean has shape .*accepted"):
        C.channel_stats_bn(torch.randn(2, 4, 3, 3, device=device), None, rm[:3], rv[:3], nbt,
                           0.1, 1e-5)
    with pytest.raises(RuntimeError, match="x has dtype Double.*accepted: float32"):
        C.channel_stats_bn(x.double(), None, rm, rv, nbt, 0.1, 1e-5)


# (relu_mid, residual, branch_scale, relu_out, res_scale)
TAILS = [(True, False, False, False, 1.0), (False, True, False, True, 1.0),
         (True, True, True, True, 0.5), (False, False, False, False, 1.0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tail", TAILS)
def test_bn_epilogue_backward_is_epilogue_backward_then_bn_scale_backward(C, device, shape,
                                                                           dtype, fmt, tail):
    _needs_device(C, device)
    relu_mid, has_res, has_d, relu_out, res_scale = tail
    g = torch.Generator().manual_seed(3)
    c = shape[1]
    z = _feature_map(shape, dtype, fmt, g, device, offset=0.5)
    gy = _feature_map(shape, dtype, fmt, g, device)
    mean, var = C.channel_stats(z)
    bn_w = (torch.rand(c, generator=g) + 0.5).to(device)
    shift = torch.randn(c, generator=g).to(device)
    d = torch.rand(shape[0], generator=g).to(device) if has_d else None
    r = _feature_map(shape, dtype, fmt, g, device) if has_res else None
    for w, eps, needs in ((bn_w, 1e-5, (True, True, True, True, True)),
                          (None, 1e-3, (True, False, True, True, False)),
                          (bn_w.half(), 1e-5, (False, True, False, False, True)),
                          (bn_w, 1e-5, (True, True, False, False, False))):
        need_gz, need_gr, need_center, need_var, need_w = needs
        scale = C.bn_scale(var, w, eps)
        y = C.epilogue(z, mean, scale, shift, relu_mid, r, res_scale, d, relu_out)
        yy = y if relu_out else None
        got = C.bn_epilogue_backward(gy, z, yy, mean, scale, shift, relu_mid, res_scale, d,
                                     relu_out, need_gz, need_gr, need_center, var, w, eps,
                                     need_var, need_w)
        gz, gr, s1, s2, gc = C.epilogue_backward(gy, z, yy, mean, scale, shift, relu_mid,
                                                 res_scale, d, relu_out, need_gz, need_gr, True,
                                                 need_center)
        gv, gw = C.bn_scale_backward(s2, var, w, eps, need_var, need_w)
        for i, (a, b) in enumerate(zip(got, (gz, gr, s1, gc, gv, gw), strict=True)):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (needs, i)
        assert got[5].dtype == (w.dtype if need_w and w is not None else torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_epilogue_backward_of_an_empty_batch_and_its_errors(C, device):
    _needs_device(C, device)
    z = torch.randn(0, 4, 3, 3, device=device)
    ones = torch.ones(4, device=device)
    gz, gr, s1, gc, gv, gw = C.bn_epilogue_backward(z, z, None, ones, ones, None, True, 1.0,
                                                    None, False, True, True, True, ones, ones,
                                                    1e-5, True, True)
    assert gz.shape == z.shape and gr.shape == z.shape
    for v in (s1, gc, gv, gw):
        assert v.shape == (4,) and not v.any()
    z = torch.randn(2, 4, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="bn_var has shape .*accepted: a float32 vector"):
        C.bn_epilogue_backward(z, z, None, ones, ones, None, False, 1.0, None, False, True,
                               False, False, ones[:3], None, 1e-5, True, False)
    with pytest.raises(RuntimeError, match="bn_var has shape .* dtype Half"):
        C.bn_epilogue_backward(z, z, None, ones, ones, None, False, 1.0, None, False, True,
                               False, False, ones.half(), None, 1e-5, True, False)
    with pytest.raises(RuntimeError, match="weight has shape .*one value per channel"):
        C.bn_epilogue_backward(z, z, None, ones, ones, None, False, 1.0, None, False, True,
                               False, False, ones, ones[:2], 1e-5, True, True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(C, device):
    _needs_device(C, device)
    g = torch.Generator().manual_seed(4)
    for fmt in FORMATS:
        z = _feature_map((2, 8, 3, 5), torch.float32, fmt, g, device)
        gy = _feature_map((2, 8, 3, 5), torch.float32, fmt, g, device)
        w = (torch.rand(8, generator=g) + 0.5).to(device)
        mean, var = C.channel_stats(z)
        torch.library.opcheck(C.channel_stats_bn.default,
                              (z, w, torch.zeros(8, device=device), torch.ones(8, device=device),
                               torch.tensor(0, device=device), 0.1, 1e-5))
        torch.library.opcheck(C.channel_stats_bn.default,
                              (z.half(), None, torch.zeros(8, device=device),
                               torch.ones(8, device=device), None, 0.5, 1e-3))
        scale = C.bn_scale(var, w, 1e-5)
        torch.library.opcheck(C.bn_epilogue_backward.default,
                              (gy, z, z.relu(), mean, scale, w, True, 0.5, None, True, True,
                               True, True, var, w, 1e-5, True, True))
        torch.library.opcheck(C.bn_epilogue_backward.default,
                              (gy.bfloat16(), z.bfloat16(), None, mean, scale, None, False, 1.0,
                               None, False, False, False, False, var, None, 1e-5, True, False))


class _Counting:
    """fused_res_C's ops, counting calls by name (cuda_backend._ops() stand-in)."""

    def __init__(self, ops):
        self._ops, self.calls = ops, {}

    def __getattr__(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1
        return getattr(self._ops, name)


@pytest.mark.parametrize("device", DEVICES)
def test_the_cuda_backends_training_node_takes_the_merged_ops(C, device, monkeypatch):
    """A Bottleneck's train step on the cuda backend: every unit's statistics, finalize and
    scale gradient through the merged ops (none through the pairs), with the values of the
    pairs (FUSED_RES_TRAIN_UNIT off runs them) -- and a subclass that overrides one of the
    pair's methods keeps its override."""
    _needs_device(C, device)
    # (cuDNN's weight gradients may sum in a different order from call to call otherwise)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch.manual_seed(0)
    base = fnn.Bottleneck(16, 4, backend="cuda").to(device).train()
    x = torch.randn(2, 16, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    gy = torch.randn(2, 16, 6, 6, device=device)
    results = []
    for on in (True, False):
        counting = _Counting(C)
        monkeypatch.setattr(cuda_backend, "_ops", lambda c=counting: c)
        monkeypatch.setattr("fused_res.ops.train_unit.ENABLED", on)
        m = copy.deepcopy(base)
        xi = x.clone().requires_grad_()
        m(xi).backward(gy)
        results.append([xi.grad, *(p.grad for p in m.parameters()), *m.buffers()])
        if on:
            assert counting.calls.get("channel_stats_bn") == 3
            assert counting.calls.get("bn_epilogue_backward") == 3
            for pair in ("channel_stats", "bn_finalize", "bn_scale", "bn_scale_backward"):
                assert pair not in counting.calls, counting.calls
        else:
            assert "channel_stats_bn" not in counting.calls
            assert "bn_epilogue_backward" not in counting.calls
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)

    ran = []
    register_backend("cuda", logging_backend(CudaBackend, ran))
    try:
        counting = _Counting(C)
        monkeypatch.setattr(cuda_backend, "_ops", lambda: counting)
        m = copy.deepcopy(base)
        xi = x.clone().requires_grad_()
        m(xi).backward(gy)
        assert ran == ["update"] * 3 + ["scale_backward"] * 3
        assert "channel_stats_bn" not in counting.calls
        assert "bn_epilogue_backward" not in counting.calls
        assert all(torch.equal(a, b) for a, b in zip(
            [xi.grad, *(p.grad for p in m.parameters()), *m.buffers()], results[1],
            strict=True))
    finally:
        register_backend("cuda", CudaBackend)
