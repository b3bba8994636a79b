"""An overflowed gradient goes where eager's goes: mixed-precision training with a loss scale
(torch.amp.GradScaler) skips a step only because some parameter's gradient is inf or NaN, so
a fused backward that turned an inf into a finite number (a clamp, a mask that multiplies,
a reduction that drops it) would have the scaler apply a garbage step, silently; one that
overflowed where eager does not would skip steps eager takes. Here the non-finite gradients
of a fused block, parameter by parameter, are eager's: an inf or NaN arriving from above
(where the block's output ReLU passes it and where it does not), and an upstream gradient
large enough that float16 overflows inside the block's own backward. The Triton cases run in
Triton's CPU interpreter in a child process (float32 and float16), as in
tests/test_triton_kernels.py; the cuda backend's on its CPU kernels."""

import copy
import importlib.util
import os

import pytest
import torch
from helpers import fresh_triton_backend, randomize_bn, run_cases_interpreted
from torch import nn

import fused_res
from fused_res.backends import get_backend_object
from fused_res.models import cifar_resnet
from fused_res.models.imagenet import BasicBlock, Bottleneck

CHILD = os.environ.get("TRITON_INTERPRET") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _block(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "basic":
        block = BasicBlock(8, 8)
    else:  # a bottleneck with its projection shortcut: three units and the shortcut's
        block = Bottleneck(16, 4, 1, nn.Sequential(nn.Conv2d(16, 16, 1, bias=False),
                                                   nn.BatchNorm2d(16)))
    return randomize_bn(block).train()


def _grads(net: nn.Module, x: torch.Tensor, gy: torch.Tensor | None,
           gy_of=None) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = net(x)
    y.backward(gy if gy is not None else gy_of(y))
    return {"x": x.grad, **{n: p.grad for n, p in net.named_parameters()}}


def _nonfinite(grads: dict) -> list[str]:
    return sorted(n for n, g in grads.items() if not torch.isfinite(g).all())


def _eager_and_fused(kind: str, backend: str, dtype: torch.dtype, make_gy):
    """(eager's gradients, the fused block's) for the same x and upstream gradient; the
    block in `dtype` throughout, as a half-precision model is."""
    base = _block(kind)
    c = base.conv1.in_channels
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, c, 6, 6, generator=g).to(dtype).contiguous(
        memory_format=torch.channels_last)
    eager = copy.deepcopy(base).to(dtype)
    fused = fused_res.convert(copy.deepcopy(base), backend=backend).to(dtype)
    with torch.no_grad():
        y = copy.deepcopy(base).to(dtype)(x)
    gy = make_gy(y, g)
    return _grads(eager, x, gy), _grads(fused, x, gy)


def check_an_inf_or_nan_from_above(kind: str, backend: str, dtype: torch.dtype, value: float,
                                   where: str) -> None:
    def make_gy(y, g):
        gy = torch.randn(y.shape, generator=g).to(dtype)
        # The first element where the output ReLU passes its gradient ("on") or stops it.
        at = (y > 0) if where == "on" else (y <= 0)
        gy[tuple(at.nonzero()[0])] = value
        return gy

    eager, fused = _eager_and_fused(kind, backend, dtype, make_gy)
    bad = _nonfinite(eager)
    # (the check must not pass for want of anything to compare: eager's own pattern)
    assert bool(bad) == (where == "on"), bad
    assert _nonfinite(fused) == bad
    for n, g in eager.items():  # the same kind of non-finite, element by element
        assert torch.equal(torch.isnan(fused[n]), torch.isnan(g)), n
        assert torch.equal(torch.isinf(fused[n]), torch.isinf(g)), n


def check_float16_overflow_inside_the_backward(kind: str, backend: str) -> None:
    """A finite upstream gradient: 30x the unit normal stays finite everywhere in eager's
    float16 backward (and must in ours: no intermediate of ours may be narrower than
    eager's), 1e4x overflows there (and must in ours: no wider one may hide it)."""
    for scale, finite in ((30.0, True), (1e4, False)):
        eager, fused = _eager_and_fused(
            kind, backend, torch.float16,
            lambda y, g, s=scale: (torch.randn(y.shape, generator=g) * s).half())
        assert (not _nonfinite(eager)) == finite, (scale, _nonfinite(eager))
        assert _nonfinite(fused) == _nonfinite(eager), scale


def _scaled_step(net, opt, scaler, x, target) -> float:
    """One float16-autocast SGD step through the scaler; the scale it leaves."""
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(net(x), target)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return scaler.get_scale()


def check_grad_scaler_skips_and_takes_steps_as_eager(backend: str) -> None:
    """torch.amp.GradScaler under float16 autocast: a scale that overflows skips the step
    (parameters untouched) and halves the scale for the fused model as for eager; at a scale
    that does not, both step, to the same parameters within float16's noise."""
    try:
        torch.amp.GradScaler("cpu")
    except (RuntimeError, TypeError, ValueError) as e:
        pytest.skip(f"this torch has no CPU GradScaler: {e}")
    torch.manual_seed(0)
    base = randomize_bn(cifar_resnet(8, shortcut="B", num_classes=5, widths=(8, 16, 16)))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 8, 8, generator=g)
    target = torch.randint(0, 5, (4,), generator=g)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    after = {}
    for name, net in (("eager", copy.deepcopy(base)),
                      ("fused", fused_res.convert(copy.deepcopy(base), backend=backend))):
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)
        # 2**60 overflows float16; 2**59 too
        scales = [_scaled_step(net, opt, scaler, x, target) for _ in range(2)]
        assert scales == [2.0 ** 59, 2.0 ** 58], (name, scales)
        for n, p in net.named_parameters():
            assert torch.equal(p.detach(), before[n]), (name, n)
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        # (no overflow: the scale stays)
        assert _scaled_step(net, opt, scaler, x, target) == 8.0, name
        after[name] = {n: p.detach().clone() for n, p in net.named_parameters()}
    for n, p in after["eager"].items():
        step = p - before[n]
        assert step.abs().max() > 0, n  # (a step was taken)
        # The step's error relative to the step (float16 gradients: 2e-2 of each, eager's
        # own distance to float64 on this model is of that order).
        assert (after["fused"][n] - p).norm() <= 5e-2 * step.norm() + 1e-6, n


BLOCKS = ["basic", "bottleneck"]
FROM_ABOVE = [(float("inf"), "on"), (float("nan"), "on"), (float("inf"), "off")]


if not CHILD:
    def _cuda_backend_runs() -> bool:
        return get_backend_object("cuda").status().available

    @pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
    def test_triton_cases_in_a_child_process():
        run_cases_interpreted(__file__)

    @pytest.mark.parametrize("backend", [
        "reference", pytest.param("cuda", marks=pytest.mark.skipif(
            not _cuda_backend_runs(), reason="the extension is not built"))])
    @pytest.mark.parametrize("kind", BLOCKS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("value, where", FROM_ABOVE, ids=["inf_on", "nan_on", "inf_off"])
    def test_an_inf_or_nan_from_above_reaches_eagers_gradients(backend, kind, dtype, value,
                                                               where):
        check_an_inf_or_nan_from_above(kind, backend, dtype, value, where)

    @pytest.mark.parametrize("backend", [
        "reference", pytest.param("cuda", marks=pytest.mark.skipif(
            not _cuda_backend_runs(), reason="the extension is not built"))])
    @pytest.mark.parametrize("kind", BLOCKS)
    def test_float16_overflows_inside_the_backward_where_eagers_does(backend, kind):
        check_float16_overflow_inside_the_backward(kind, backend)

    @pytest.mark.skipif(not _cuda_backend_runs(), reason="the extension is not built")
    def test_grad_scaler_with_the_cuda_backend():
        check_grad_scaler_skips_and_takes_steps_as_eager("cuda")

else:
    @pytest.fixture(autouse=True)
    def triton_backend():
        with fresh_triton_backend():
            yield

    @pytest.mark.parametrize("kind", BLOCKS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("value, where", FROM_ABOVE, ids=["inf_on", "nan_on", "inf_off"])
    def test_triton_an_inf_or_nan_from_above_reaches_eagers_gradients(kind, dtype, value,
                                                                      where):
        check_an_inf_or_nan_from_above(kind, "triton", dtype, value, where)

    @pytest.mark.parametrize("kind", BLOCKS)
    def test_triton_float16_overflows_inside_the_backward_where_eagers_does(kind):
        check_float16_overflow_inside_the_backward(kind, "triton")

    def test_triton_grad_scaler():
        check_grad_scaler_skips_and_takes_steps_as_eager("triton")
