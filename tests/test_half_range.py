"""float16 inference where folding a BatchNorm into its conv would leave float16's range: a
channel whose mean is large against its spread, so that the folded bias -mean * scale and the
scaled conv output pass 65504 while eager's conv output and BatchNorm output do not
(reference.affine_apart, eval_fold._in_half_range). Every backend must give eager's answer;
they gave 0 (ReLU of -inf) or -inf. Also: a BatchNorm normalizing with batch statistics
refuses eps=0, as nn.BatchNorm2d does.

The Triton backend's cases run in a child process under TRITON_INTERPRET=1 (as in
test_triton_kernels.py), the other backends' here."""

import copy
import importlib.util
import os

import pytest
import torch
from helpers import run_cases_interpreted
from torch import nn

import fused_res
from fused_res.models.imagenet import Bottleneck
from fused_res.nn import ConvBNAct2d, eval_fold
from fused_res.testing import TOLERANCES, rel_err

CHILD = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["triton"] if CHILD else ["reference", "cuda"]
TOL = TOLERANCES[torch.float16]

if not CHILD and importlib.util.find_spec("triton") is not None:
    def test_triton_cases_in_a_child_process():
        run_cases_interpreted(__file__)


def _need(backend):
    status = fused_res.available_backends().get(backend)
    if status is None or not status.available:
        pytest.skip(f"{backend} is not available here")


def _extreme_unit(backend, act):
    """A 1x1 conv unit whose BatchNorm has mean 100, std 10 and weight 1e4: scale 1000, a
    folded bias of -1e5, eager outputs within +-25000."""
    u = ConvBNAct2d(4, 4, 1, act=act, backend=backend)
    with torch.no_grad():
        u.conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        u.bn.running_mean.fill_(100.0)
        u.bn.running_var.fill_(100.0)
        u.bn.weight.fill_(1e4)
        u.bn.bias.uniform_(-1.0, 1.0)
    x = (100 + 10 * torch.randn(2, 4, 5, 5)).clamp(75, 125)
    return u.eval(), x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["relu", "none"])
@pytest.mark.parametrize("grad", [False, True])
def test_unit_with_an_unfoldable_batchnorm_gives_eagers_answer(backend, act, grad):
    _need(backend)
    torch.manual_seed(0)
    u, x = _extreme_unit(backend, act)
    plain = nn.Sequential(u.conv, u.bn, nn.ReLU() if act == "relu" else nn.Identity())
    want = copy.deepcopy(plain).double()(x.double())
    eager = copy.deepcopy(plain).half()(x.half())
    assert rel_err(eager, want) <= TOL  # (the case is one eager float16 gets right)
    fused = u.half()
    xh = x.half().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        got = fused(xh)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= TOL
    if not grad:
        assert eval_fold.folded_conv(fused.conv, fused.bn, xh) is None  # (the path taken)
        return
    g = torch.randn_like(want)
    got.backward(g.half())
    xd = x.double().requires_grad_()
    copy.deepcopy(plain).double()(xd).backward(g)
    assert rel_err(xh.grad, xd.grad) <= TOL


def _extreme_block(backend):
    """A Bottleneck with a projection shortcut whose last BatchNorm and shortcut BatchNorm
    normalize channels with means ~40x their spread (positive inputs and weights) with
    weight 2000: folds out of float16's range, eager's output in it. Returns (the original,
    the fused copy, x)."""
    torch.manual_seed(0)
    block = Bottleneck(16, 4, downsample=nn.Sequential(nn.Conv2d(16, 16, 1, bias=False),
                                                       nn.BatchNorm2d(16)))
    x = torch.rand(2, 16, 6, 6) + 0.5
    with torch.no_grad():
        for conv in (block.conv3, block.downsample[0]):
            conv.weight.uniform_(0.05, 0.1)
        block.train()(x)  # running statistics near the batch's: momentum 1 below
        for bn in (block.bn1, block.bn2, block.bn3, block.downsample[1]):
            bn.momentum = 1.0
        block(x)
        for bn in (block.bn3, block.downsample[1]):
            bn.weight.fill_(2000.0)
            bn.running_var.mul_(1.0 + 1e-3)
    block.eval()
    return block, fused_res.convert(copy.deepcopy(block), backend=backend).eval(), x


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_with_unfoldable_batchnorms_gives_eagers_answer(backend):
    _need(backend)
    block, fused, x = _extreme_block(backend)
    with torch.no_grad():
        want = copy.deepcopy(block).double()(x.double())
        eager = copy.deepcopy(block).half()(x.half())
        assert rel_err(eager, want) <= TOL
        fused = fused.half()
        xh = x.half()
        got = fused(xh)
        assert eval_fold.folded_conv(fused.downsample[0], fused.downsample[1], xh) is None
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_ordinary_float16_folds_are_still_made(backend):
    _need(backend)
    torch.manual_seed(0)
    u = ConvBNAct2d(4, 4, 3, backend=backend).half().eval()
    x = torch.randn(2, 4, 5, 5).half()
    with torch.no_grad():
        u(x)
        assert eval_fold.folded_conv(u.conv, u.bn, x) is not None


def test_cudnn_folds_float16_only_an_eval_folds_checked_bias():
    from fused_res.backends.constants import mark_constant
    from fused_res.backends.cudnn_backend import CudnnBackend

    x16, x32 = torch.zeros(1, 1, 1, 1).half(), torch.zeros(1, 1, 1, 1)
    shift, scale = torch.zeros(2), torch.ones(2)
    kept = mark_constant(torch.zeros(2))
    with torch.no_grad():
        assert CudnnBackend.folds(x32, None, scale, shift)
        assert CudnnBackend.folds(x16, None, None, None)
        assert CudnnBackend.folds(x16, None, None, kept)
        assert not CudnnBackend.folds(x16, None, None, shift)  # (a caller's: range unknown)
        assert not CudnnBackend.folds(x16, None, scale, kept)
        assert not CudnnBackend.folds(x16, torch.zeros(2), None, kept)
    assert not CudnnBackend.folds(x16, None, None, kept)  # (grad mode on)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_statistics_refuse_eps_zero_as_batchnorm_does(backend):
    _need(backend)
    u = ConvBNAct2d(3, 4, 1, norm_layer=lambda c: nn.BatchNorm2d(c, eps=0.0), backend=backend)
    x = torch.ones(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"eps=0\.0; accepted: a float > 0"):
        u(x)
    assert int(u.bn.num_batches_tracked) == 0 and torch.equal(u.bn.running_var, torch.ones(4))
    with pytest.raises(ValueError, match="eps"):
        nn.Sequential(u.conv, u.bn)(x)
    u.eval()(x)  # (running statistics: eps 0 is eager's too)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float16_fold_is_not_made_while_a_graph_captures(backend, monkeypatch):
    """(The range check's host read is what capture forbids: tests/test_graph_capture_gpu.py
    captures for real.) No fold made then, nothing kept: the next call makes it."""
    _need(backend)
    torch.manual_seed(0)
    u = ConvBNAct2d(4, 4, 3, backend=backend).half().eval()
    x = torch.randn(2, 4, 5, 5).half()
    with torch.no_grad():
        want = u(x)
        eval_fold.clear()
        with monkeypatch.context() as m:
            m.setattr(eval_fold, "_capturing", lambda h: True)
            assert eval_fold.folded_conv(u.conv, u.bn, x) is None
            got = u(x)
        assert rel_err(got, want) <= TOL
        assert eval_fold.folded_conv(u.conv, u.bn, x) is not None


@pytest.mark.gpu
@pytest.mark.skipif(CHILD or not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "cudnn", "triton"])
@pytest.mark.parametrize("act", ["relu", "none"])
def test_on_the_gpu_an_unfoldable_batchnorm_gives_eagers_answer(backend, act):
    """The same unit on CUDA, where cuDNN's conv and fused path and the extension's
    epilogue run (gpu_check's pytest-gpu step)."""
    _need(backend)
    torch.manual_seed(0)
    u, x = _extreme_unit(backend, act)
    plain = nn.Sequential(u.conv, u.bn, nn.ReLU() if act == "relu" else nn.Identity())
    want = copy.deepcopy(plain).double()(x.double())
    u, xh = u.cuda().half(), x.cuda().half()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = u(xh.clone().requires_grad_(grad))
        assert torch.isfinite(got).all() and rel_err(got.cpu(), want) <= TOL, grad
