"""A training conv unit as one autograd node (fused_res/ops/train_unit.py): the same outputs,
gradients and running statistics as the three ops it stands for, bit for bit, and the ops
wherever it does not apply. The Triton cases run in Triton's CPU interpreter in a child
process, as tests/test_triton_kernels.py does (fp32 and fp16; the kernels really run); the cuda
backend's run on its CPU kernels here."""

import copy
import importlib.util
import os

import pytest
import torch
from helpers import fresh_triton_backend, logging_backend, randomize_bn, run_cases_interpreted
from torch import nn

import fused_res
from fused_res import nn as fnn
from fused_res.backends import get_backend_object
from fused_res.models.cifar import CifarResNet
from fused_res.models.imagenet import BasicBlock, Bottleneck, ResNet
from fused_res.ops import train_unit
from fused_res.testing import TOLERANCES, rel_err

CHILD = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture
def nodes(monkeypatch):
    """A one-element list counting the fused node's forward calls."""
    count = [0]
    real = train_unit._TrainUnit.forward

    def counted(*args):
        count[0] += 1
        return real(*args)

    monkeypatch.setattr(train_unit._TrainUnit, "forward", staticmethod(counted))
    return count


def _model(kind: str, backend: str):
    torch.manual_seed(0)
    if kind == "resnet_basic":  # the stem, identity and downsampling basic blocks
        m = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)
    elif kind == "resnet_bottleneck":
        m = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5, width_per_group=16)
    elif kind == "bottleneck_lambda":  # a residual scale λ, a per-sample drop-path scale
        return randomize_bn(fnn.Bottleneck(16, 4, backend=backend, shortcut_scale=0.5,
                                           drop_path=0.3))
    elif kind == "conv_bias":  # a conv with a bias, a 5x5 kernel, stride 2, no activation
        return randomize_bn(fnn.ConvBNAct2d(6, 8, 5, stride=2, padding=2, bias=True,
                                            act="none", backend=backend))
    elif kind in ("cifar", "cifar_frozen"):  # small enough for the interpreter: projections
        m = CifarResNet(8, shortcut="B", num_classes=5, widths=(8, 16, 16))
        if kind == "cifar_frozen":  # (a fine-tune: the stem's conv and every BN scale frozen;
            # with an input that needs no gradient, the stem's unit then needs none for z)
            m.conv1.weight.requires_grad_(False)
            for bn in m.modules():
                if isinstance(bn, nn.BatchNorm2d):
                    bn.weight.requires_grad_(False)
    else:
        raise ValueError(kind)
    return fused_res.convert(randomize_bn(m), backend=backend)


def _steps(model, dtype, fmt, steps=2, autocast=None, hw=9, create_graph=False, x_grad=True):
    """Outputs, input and parameter gradients and every buffer after `steps` train steps."""
    model = model.to(dtype if autocast is None else torch.float32).train()
    params = [p for p in model.parameters() if p.requires_grad]
    record = []
    for s in range(steps):
        g = torch.Generator().manual_seed(10 + s)
        c = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
        x = torch.randn(2, c, hw, hw, generator=g).to(
            dtype if autocast is None else torch.float32).contiguous(memory_format=fmt)
        x.requires_grad_(x_grad)
        torch.manual_seed(s)  # (drop-path masks)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            y = model(x)
        w = torch.randn(y.shape, generator=g).to(y.dtype)
        loss = (y * w).float().sum()
        wrt = [x, *params] if x_grad else params
        grads = torch.autograd.grad(loss, wrt, create_graph=create_graph)
        if create_graph:  # a second-order term through every node
            grads = torch.autograd.grad(
                sum(gr.float().square().sum() for gr in grads[len(wrt) - len(params):]), wrt,
                allow_unused=True)
        if not x_grad:
            grads = (None, *grads)
        record += [y.detach(), *[gr for gr in grads if gr is not None]]
        with torch.no_grad():  # a step, so the next one sees new weights
            for p, gr in zip(params, grads[1:], strict=True):
                if gr is not None:
                    p -= 0.01 * gr.to(p.dtype)
    record += [b.clone() for b in model.buffers()]
    return record


def _check_same_as_the_ops(kind, backend, dtype, nodes, fmt=torch.channels_last,
                           autocast=None, create_graph=False):
    x_grad = kind != "cifar_frozen"
    base = _model(kind, backend)
    # Under autocast, an input large enough that no conv backward sees a 1x1 map under a 3x3
    # kernel: aten's CPU weight gradient of that in bf16 is garbage (NaN, 1e25) and differs
    # from call to call (torch 2.x, oneDNN), whichever path calls it.
    hw = 17 if autocast is not None else 9
    got = _steps(copy.deepcopy(base), dtype, fmt, autocast=autocast, create_graph=create_graph,
                 hw=hw, x_grad=x_grad)
    fused_calls = nodes[0]
    train_unit.ENABLED = False
    try:
        want = _steps(copy.deepcopy(base), dtype, fmt, autocast=autocast,
                      create_graph=create_graph, hw=hw, x_grad=x_grad)
    finally:
        train_unit.ENABLED = True
    assert fused_calls > 0 and nodes[0] == fused_calls  # used with it on, never with it off
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        if create_graph and a.is_floating_point():
            # (the second order recomputes the reference's forward: the same math, not the
            # same rounding)
            assert rel_err(a, b) < TOLERANCES[a.dtype], (i, rel_err(a, b))
        else:
            assert torch.equal(a, b), (i, (a.double() - b.double()).abs().max().item())
    return got


def _check_layouts_autocast_and_double_backward(backend, kind, autocast, nodes):
    """NCHW inputs, autocast to `autocast`, and a create_graph backward: the ops' results."""
    _check_same_as_the_ops(kind, backend, torch.float32, nodes, fmt=torch.contiguous_format)
    nodes[0] = 0
    _check_same_as_the_ops(kind, backend, torch.float32, nodes, autocast=autocast)
    nodes[0] = 0
    with pytest.warns(UserWarning, match="double backward"):
        _check_same_as_the_ops("bottleneck_lambda", backend, torch.float32, nodes,
                               create_graph=True)


def _check_against_float64(backend, dtype, nodes):
    """Two train steps of a downsampling Bottleneck (λ = 0.5) and a BasicBlock, fused in
    `dtype`, against the plain blocks in float64: outputs, every gradient, the running
    statistics (through the fused node: nodes counts it)."""
    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    plain = randomize_bn(nn.Sequential(Bottleneck(16, 8, stride=2, downsample=down),
                                       BasicBlock(32, 32)))
    fused = fused_res.convert(copy.deepcopy(plain), backend=backend)
    fused[0].shortcut_scale = 0.5
    got = _steps(fused, dtype, torch.channels_last)
    want = _steps(_Scaled(plain), torch.float64, torch.channels_last)
    assert nodes[0] > 0
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a.is_floating_point():
            assert rel_err(a, b) < TOLERANCES[dtype], (i, rel_err(a, b))
        else:
            assert torch.equal(a, b), i  # num_batches_tracked


class _Scaled(nn.Module):
    """The plain blocks with the first one's shortcut scaled by 0.5 (what shortcut_scale
    does in the fused one)."""

    def __init__(self, seq):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        b = self.seq[0]
        out = b.bn3(b.conv3(b.relu(b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))))))
        return self.seq[1](b.relu(out + 0.5 * b.downsample(x)))


def _check_backward_under_a_dispatch_mode(backend, nodes):
    """A node made in plain eager mode whose backward runs under a dispatch mode (a flop
    counter) gives the ops' gradients: its backend calls take the custom ops there."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    base = randomize_bn(fnn.ConvBNAct2d(3, 5, 3, padding=1, backend=backend)).train()
    x = torch.randn(2, 3, 6, 6)
    grads = []
    for on in (True, False):
        train_unit.ENABLED = on
        try:
            m = copy.deepcopy(base)
            xi = x.clone().requires_grad_()
            y = m(xi)
            with FlopCounterMode(display=False):
                y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
            grads.append([xi.grad, *(p.grad for p in m.parameters())])
        finally:
            train_unit.ENABLED = True
    assert nodes[0] == 1
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def _cuda_backend_runs() -> bool:
    return get_backend_object("cuda").status().available


if not CHILD:
    @pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
    def test_train_unit_cases_in_a_child_process():
        run_cases_interpreted(__file__)

    @pytest.mark.skipif(not _cuda_backend_runs(), reason="the extension is not built")
    @pytest.mark.parametrize("kind", ["resnet_basic", "resnet_bottleneck", "cifar",
                                      "cifar_frozen", "bottleneck_lambda", "conv_bias"])
    @pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
    def test_cuda_backend_train_unit_is_the_three_ops(kind, fmt, nodes):
        _check_same_as_the_ops(kind, "cuda", torch.float32, nodes, fmt)

    @pytest.mark.skipif(not _cuda_backend_runs(), reason="the extension is not built")
    def test_cuda_backend_train_unit_nchw_autocast_double_backward(nodes):
        _check_layouts_autocast_and_double_backward("cuda", "resnet_basic", torch.bfloat16,
                                                    nodes)

    @pytest.mark.skipif(not _cuda_backend_runs(), reason="the extension is not built")
    def test_cuda_backend_train_unit_matches_the_float64_reference(nodes):
        _check_against_float64("cuda", torch.float32, nodes)

    @pytest.mark.skipif(not _cuda_backend_runs(), reason="the extension is not built")
    def test_cuda_backend_backward_under_a_dispatch_mode(nodes):
        _check_backward_under_a_dispatch_mode("cuda", nodes)

    def test_not_taken_where_it_does_not_apply(nodes):
        """The reference backend, 'auto', grad mode off, a BatchNorm without running
        statistics, forward-mode AD: the three ops run (and the values are theirs)."""
        torch.manual_seed(0)
        block = randomize_bn(fnn.Bottleneck(16, 4, backend="reference")).train()
        x = torch.randn(2, 16, 5, 5)
        block(x).sum().backward()
        with fused_res.use_backend("auto"):
            fnn.Bottleneck(16, 4)(x)
        if _cuda_backend_runs():
            cuda = fnn.Bottleneck(16, 4, backend="cuda").train()
            with torch.no_grad():
                cuda(x)
            cuda.bn1.track_running_stats = False
            cuda.bn1.running_mean = cuda.bn1.running_var = None
            calls = nodes[0]
            cuda(x)
            assert nodes[0] == calls + 2  # bn2 and bn3 still: bn1 through the ops
            with torch.autograd.forward_ad.dual_level():  # (the ops' composite then)
                cuda(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)))
            assert nodes[0] == calls + 2
        assert nodes[0] == (2 if _cuda_backend_runs() else 0)

    def test_bad_batchnorm_settings_are_the_ops_errors():
        """What the ops refuse, they still refuse (the fused node steps aside for them)."""
        if not _cuda_backend_runs():
            pytest.skip("the extension is not built")
        block = fnn.Bottleneck(16, 4, backend="cuda").train()
        block.bn2.momentum = "fast"
        with pytest.raises(TypeError, match="momentum='fast'"):
            block(torch.randn(2, 16, 5, 5))
        block.bn2.momentum = 0.1
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            block(torch.randn(1, 16, 1, 1))

else:
    @pytest.fixture(autouse=True)
    def triton_backend():
        with fresh_triton_backend():
            yield

    @pytest.mark.parametrize("kind", ["cifar", "cifar_frozen", "bottleneck_lambda",
                                      "conv_bias"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_triton_train_unit_is_the_three_ops(kind, dtype, nodes):
        _check_same_as_the_ops(kind, "triton", dtype, nodes)

    def test_triton_train_unit_nchw_autocast_double_backward(nodes):
        _check_layouts_autocast_and_double_backward("triton", "cifar", torch.float16, nodes)

    def test_triton_train_unit_matches_the_float64_reference(nodes):
        # (float32: in float16 the input gradient after two blocks' BatchNorm backwards is
        # 3e-2 off float64 whichever path computes it; float16 is held to the ops' path above,
        # bit for bit)
        _check_against_float64("triton", torch.float32, nodes)

    def test_triton_backward_takes_the_scale_back_in_the_epilogue_pass(nodes, monkeypatch):
        """The BatchNorm scale's gradient (to var and weight) is made by the epilogue
        backward's last programs, not a launch of its own, with the ops' values bit for bit;
        with the sums apart (FUSED_RES_TRITON_SUMS_APART) it is its own launch again."""
        from fused_res.triton import batchnorm as tbn
        from fused_res.triton import elementwise as ew

        calls = [0]
        real = tbn._bn_scale_backward

        def counted(*args):
            calls[0] += 1
            return real(*args)

        monkeypatch.setattr(tbn, "_bn_scale_backward", counted)
        base = _model("bottleneck_lambda", "triton")
        got = _steps(copy.deepcopy(base), torch.float32, torch.channels_last)
        assert nodes[0] > 0 and calls[0] == 0
        train_unit.ENABLED = False
        try:
            want = _steps(copy.deepcopy(base), torch.float32, torch.channels_last)
        finally:
            train_unit.ENABLED = True
        assert calls[0] > 0
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        calls[0] = 0
        monkeypatch.setattr(ew, "SUMS_IN_PASS", False)
        apart = _steps(copy.deepcopy(base), torch.float32, torch.channels_last)
        assert calls[0] > 0
        assert all(torch.equal(a, b) for a, b in zip(apart, want, strict=True))

    def test_triton_finalize_does_the_batchnorm_in_its_last_launch(nodes, monkeypatch):
        """The statistics' last launch takes the BatchNorm's scale and running update (with a
        momentum); with momentum=None (a cumulative average) the update is its own launch.
        Both are the ops' values bit for bit (running statistics and count included)."""
        from fused_res.triton import elementwise as ew

        calls = []
        real = ew.stats_finalize

        def recorded(parts, c, bn=None):
            calls.append(bn is not None)
            return real(parts, c, bn)

        monkeypatch.setattr(ew, "stats_finalize", recorded)
        _check_same_as_the_ops("bottleneck_lambda", "triton", torch.float32, nodes)
        assert any(calls) and not all(calls)  # merged with it on, apart with it off
        calls.clear()
        nodes[0] = 0
        base = _model("bottleneck_lambda", "triton")
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        got = _steps(copy.deepcopy(base), torch.float32, torch.channels_last, steps=3)
        train_unit.ENABLED = False
        try:
            want = _steps(copy.deepcopy(base), torch.float32, torch.channels_last, steps=3)
        finally:
            train_unit.ENABLED = True
        assert nodes[0] > 0 and not any(calls)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))

    def test_triton_backward_under_a_dispatch_mode(nodes):
        _check_backward_under_a_dispatch_mode("triton", nodes)

    def test_a_subclass_override_is_not_skipped_by_the_merged_launches(nodes):
        """A TritonBackend subclass overriding bn_scale_and_update or bn_scale_backward has
        its override run, as the ops' path runs it."""
        from fused_res.backends import registry
        from fused_res.backends.triton_backend import TritonBackend

        ran = []
        registry.register_backend("triton", logging_backend(TritonBackend, ran))
        base = _model("conv_bias", "triton")
        got = _steps(copy.deepcopy(base), torch.float32, torch.channels_last, steps=1)
        assert nodes[0] == 1 and ran == ["update", "scale_backward"]
        train_unit.ENABLED = False
        try:
            want = _steps(copy.deepcopy(base), torch.float32, torch.channels_last, steps=1)
        finally:
            train_unit.ENABLED = True
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
