"""Shared test utilities: deterministic random weights and statistics for any model; a test
module's cases run again in Triton's interpreter."""

import contextlib
import os
import subprocess
import sys

import torch
from torch import nn


def run_cases_interpreted(test_file: str) -> None:
    """Run test_file's cases in a child pytest with TRITON_INTERPRET=1 and assert they pass:
    triton decides when a kernel is decorated whether it is interpreted, so the cases need a
    process of their own (nothing leaks into other test files, and the AOT test sees real JIT
    kernels)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter cases failed:\n{tail}"
    assert " passed" in proc.stdout, tail


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics, so that eval
    mode is not an identity and train-mode updates are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def check_bn_ops_match_batchnorm(backend: str, momentum, affine: bool, dtype=None,
                                 device: str = "cpu", channels: int = 6) -> None:
    """Three training steps of an nn.BatchNorm2d against channel_stats + bn_scale +
    bn_update_running on `backend`: the normalized output, the running statistics and
    num_batches_tracked agree (float32 math; the reference normalization in float64); then
    one eval-mode call (no update) and one empty batch (counts only). `dtype` is the running
    buffers' dtype (float32 unless given: a model.half() keeps float16 buffers). The ops run
    on `device`; nn.BatchNorm2d, the truth, on the CPU."""
    from fused_res import ops
    from fused_res.testing import rel_err

    g = torch.Generator().manual_seed(7)
    c = channels
    bn = nn.BatchNorm2d(c, momentum=momentum, affine=affine).train()
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g))
    rm, rv = bn.running_mean.clone().to(device), bn.running_var.clone().to(device)
    if dtype is not None:
        rm, rv = rm.to(dtype), rv.to(dtype)
    nbt = bn.num_batches_tracked.clone().to(device)
    weight = bn.weight.detach().to(device) if affine else None
    for _ in range(3):
        x = torch.randn(4, c, 5, 3, generator=g) * 2 + 1
        want = bn(x.double().float()).double()
        mean, var = ops.channel_stats(x.to(device), backend=backend)
        scale = ops.bn_scale(mean, var, weight, running_mean=rm, running_var=rv,
                             num_batches_tracked=nbt, momentum=momentum, eps=bn.eps,
                             count=4 * 5 * 3, backend=backend)
        mean, scale = mean.cpu(), scale.cpu()
        y = (x.double() - mean.double().view(1, -1, 1, 1)) * scale.double().view(1, -1, 1, 1)
        if affine:
            y = y + bn.bias.double().view(1, -1, 1, 1)
        assert rel_err(y, want) <= 1e-5, "bn(x)"
        tol = 1e-6 if dtype is None else 1e-3
        assert rel_err(rm.cpu(), bn.running_mean) <= tol, "running_mean"
        assert rel_err(rv.cpu(), bn.running_var) <= tol, "running_var"
        assert nbt.item() == bn.num_batches_tracked.item()
    before = (rm.clone(), rv.clone(), nbt.clone())
    ops.bn_scale(mean.to(device), var, weight, eps=bn.eps, count=60, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(before, (rm, rv, nbt), strict=True))
    empty = torch.zeros(c, device=device)
    ops.bn_scale(empty, empty + 1, weight, running_mean=rm, running_var=rv,
                 num_batches_tracked=nbt, momentum=momentum, count=0, backend=backend)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    assert nbt.item() == before[2].item() + 1


def check_bn_scale_gradients(backend: str, device: str = "cpu") -> None:
    """bn_scale's gradients in var and weight against torch's own composite in float64,
    with gradients of the stride-0 kind (a sum's) and of a general kind."""
    from fused_res import ops
    from fused_res.testing import rel_err

    g = torch.Generator().manual_seed(8)
    var64 = torch.rand(37, dtype=torch.float64, generator=g) + 0.1
    w64 = torch.randn(37, dtype=torch.float64, generator=g)
    up = torch.randn(37, dtype=torch.float64, generator=g)
    for weighted in (True, False):
        for grad_out in (up, None):
            var = var64.float().to(device).requires_grad_()
            w = w64.float().to(device).requires_grad_() if weighted else None
            s = ops.bn_scale(torch.zeros(37, device=device), var, w, eps=1e-3, count=10,
                             backend=backend)
            v_ref = var64.clone().requires_grad_()
            w_ref = w64.clone().requires_grad_() if weighted else None
            s_ref = torch.rsqrt(v_ref + 1e-3) * (w_ref if weighted else 1.0)
            assert rel_err(s, s_ref) <= 1e-6, "scale"
            loss = (s * grad_out.float().to(device)).sum() if grad_out is not None else s.sum()
            loss_ref = (s_ref * grad_out).sum() if grad_out is not None else s_ref.sum()
            leaves = [var] + ([w] if weighted else [])
            leaves_ref = [v_ref] + ([w_ref] if weighted else [])
            for a, b in zip(torch.autograd.grad(loss, leaves),
                            torch.autograd.grad(loss_ref, leaves_ref), strict=True):
                assert rel_err(a, b) <= 1e-6, "gradient"


def check_bn_update_edge_cases(backend: str, device: str = "cpu") -> None:
    """momentum=None without num_batches_tracked leaves the statistics as they are (nn's
    factor 0); float16 running statistics updated for 300 steps stay as close to a float32
    run as float16 allows (one rounding per update, not three)."""
    from fused_res import ops
    from fused_res.testing import rel_err

    g = torch.Generator().manual_seed(9)
    rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    before = (rm.clone(), rv.clone())
    ops.bn_scale(torch.randn(5, device=device), torch.rand(5, device=device), None,
                 running_mean=rm, running_var=rv, momentum=None, count=8, backend=backend)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])

    wide = [torch.zeros(64, device=device), torch.ones(64, device=device),
            torch.tensor(0, device=device)]
    narrow = [wide[0].half(), wide[1].half(), wide[2].clone()]
    for _ in range(300):
        mean = (torch.randn(64, generator=g) * 0.5 + 2).to(device)
        var = (torch.rand(64, generator=g) + 1).to(device)
        for bufs in (wide, narrow):
            ops.bn_scale(mean, var, None, running_mean=bufs[0], running_var=bufs[1],
                         num_batches_tracked=bufs[2], momentum=None, count=50,
                         backend=backend)
    assert rel_err(narrow[0].cpu(), wide[0].cpu()) <= 4e-3, "running_mean"
    assert rel_err(narrow[1].cpu(), wide[1].cpu()) <= 4e-3, "running_var"


def check_scale_and_update_is_the_two_ops(backend: str, device: str = "cpu") -> None:
    """ops.bn_scale's eager path (one backend call, one launch where the backend has a kernel
    for both) gives the values, running statistics, count and gradients of its two ops run
    one after the other, to the bit: C = 37 (a partial block), momentum and cumulative,
    with and without a weight, an empty batch."""
    from fused_res.ops import library

    g = torch.Generator().manual_seed(3)
    for momentum, has_w, count in ((0.1, True, 9), (None, True, 9), (0.1, False, 9),
                                   (0.1, True, 0)):
        mean = torch.randn(37, generator=g).to(device)
        var0 = (torch.rand(37, generator=g) + 0.2).to(device)
        w0 = (torch.randn(37, generator=g)).to(device) if has_w else None
        bufs0 = [torch.randn(37, generator=g).to(device), torch.rand(37, generator=g).to(device),
                 torch.tensor(3, device=device)]
        gy = torch.randn(37, generator=g).to(device)
        got = []
        for merged in (True, False):
            var = var0.clone().requires_grad_()
            w = w0.clone().requires_grad_() if has_w else None
            bufs = [b.clone() for b in bufs0]
            if merged:
                scale = library.bn_scale_and_update(var, w, 1e-5, backend, mean, *bufs,
                                                    momentum, count)
            else:
                library.call("bn_update_running", mean, var.detach(), *bufs, momentum, count,
                             backend)
                scale = library.call("bn_scale", var, w, 1e-5, backend)
            (scale * gy).sum().backward()
            got.append([scale.detach(), *bufs, var.grad] + ([w.grad] if has_w else []))
        for a, b in zip(*got, strict=True):
            assert torch.equal(a, b), (momentum, has_w, count)


def check_fold_follows_a_train_step_without_parameter_changes(backend: str) -> None:
    """A train-mode forward (with and without grad mode: the two eager paths of the running
    statistics' update) moves the running statistics but no parameter (a frozen backbone,
    BN recalibration): the next eval must fold the new statistics. The backends' kernels
    write them through pointers, so the eager path must bump their version counters."""
    import copy

    import fused_res
    from fused_res.models import imagenet
    from fused_res.testing import rel_err

    torch.manual_seed(0)
    eager = imagenet.BasicBlock(8, 8)
    fused = fused_res.convert(copy.deepcopy(eager), backend=backend)
    x = torch.randn(4, 8, 8, 8)
    for grad in (True, False):
        fused.eval()
        with torch.no_grad():
            fused(x)  # the fold is cached
        fused.train()
        with torch.set_grad_enabled(grad):
            fused(x * 3 + 1)
        fused.eval()
        eager.load_state_dict(fused.state_dict())
        with torch.no_grad():
            assert rel_err(fused(x), eager.eval()(x)) <= 1e-5, f"grad mode {grad}"


def record_fixed_tiles(monkeypatch, module) -> list[str]:
    """Wrap `module`.launch (a fused_res.triton module's fixed-config launch path) so that
    each launch appends its tile's name (as configs.ConvConfig prints it) to the list
    returned, then launches as before."""
    tiles: list[str] = []
    real = module.launch

    def recording_launch(kernel, grid, *args, **kw):
        tiles.append(f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}_w{kw['num_warps']}"
                     f"_s{kw['num_stages']}")
        return real(kernel, grid, *args, **kw)
    monkeypatch.setattr(module, "launch", recording_launch)
    return tiles


def check_relu_backward_matches_eager(backend: str, device: str = "cpu") -> None:
    """ReLU's gradient where the unit is off, on, at 0 and NaN, under NaN and ±inf upstream
    gradients, through ops.epilogue's act_mid and act_out (with the residual's gradient) and
    the conv prologue's act_in, against eager autograd of the same expression. torch.relu's
    backward is 0 where out <= 0 (a NaN gradient there is dropped) and g elsewhere (a NaN
    output passes it); g * (out > 0) got both wrong."""
    from fused_res import ops

    nan, inf = float("nan"), float("inf")
    u = torch.tensor([-1.0, 2.0, nan, 0.5, 0.0, -0.0, 3.0, -2.0], device=device)
    gy = torch.tensor([nan, 1.0, 1.5, inf, nan, -inf, -2.0, inf], device=device)
    u, gy = u.view(1, 1, 2, 4), gy.view(1, 1, 2, 4)
    r0 = torch.tensor([0.5, -3.0, 1.0, -0.25, 2.0, 0.0, -4.0, 1.0], device=device).view_as(u)
    one = torch.ones(1, device=device)

    def grads(fn, *inputs):
        leaves = [t.clone().requires_grad_() for t in inputs]
        return torch.autograd.grad(fn(*leaves), leaves, gy)

    def same(got, want, what):
        for g, w in zip(got, want, strict=True):
            assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{what}: {g} vs eager {w}"
            torch.testing.assert_close(g, w, rtol=1e-6, atol=0, equal_nan=True,
                                       msg=lambda m: f"{what}: {m}")

    cases = {
        "act_mid": (lambda z: ops.epilogue(z, one, act_mid="relu", backend=backend),
                    lambda z: torch.relu(z * one.view(1, -1, 1, 1))),
        "act_out": (lambda z, r: ops.epilogue(z, one, residual=r, act_out="relu",
                                              backend=backend),
                    lambda z, r: torch.relu(z * one.view(1, -1, 1, 1) + r)),
        "both": (lambda z, r: ops.epilogue(z, one, act_mid="relu", residual=r,
                                           act_out="relu", backend=backend),
                 lambda z, r: torch.relu(torch.relu(z * one.view(1, -1, 1, 1)) + r)),
    }
    for what, (ours, eager) in cases.items():
        inputs = (u,) if what == "act_mid" else (u, r0)
        same(grads(ours, *inputs), grads(eager, *inputs), what)
    # Without a scale or a tail after it, the mid ReLU's gradient is taken from y for u.
    same(grads(lambda z: ops.epilogue(z, act_mid="relu", backend=backend), u),
         grads(torch.relu, u), "act_mid from y")
    w = torch.ones(1, 1, 1, 1, device=device)
    conv = torch.nn.functional.conv2d
    same(grads(lambda x: ops.conv_unit(x, w, act_in="relu", backend=backend), u),
         grads(lambda x: conv(torch.relu(x), w), u), "act_in")
    same(grads(lambda x: ops.conv_unit(x, w, act_mid="relu", backend=backend), u),
         grads(lambda x: torch.relu(conv(x, w)), u), "conv act_mid")
    same(grads(lambda x: ops.conv_unit(x, w, act_mid="relu", act_out="relu", backend=backend),
               u),
         grads(lambda x: torch.relu(torch.relu(conv(x, w))), u), "conv act_mid act_out")


@contextlib.contextmanager
def fresh_triton_backend():
    """The triton backend registered anew for the enclosed code (the interpreter cases' own
    object, whatever an earlier module left in the registry), the old one restored after."""
    from fused_res.backends import registry
    from fused_res.backends.triton_backend import TritonBackend

    old = registry._factories["triton"]
    registry.register_backend("triton", TritonBackend)
    try:
        yield
    finally:
        registry.register_backend("triton", old)


def logging_backend(cls: type, ran: list) -> type:
    """A subclass of backend class cls whose bn_scale_and_update and bn_scale_backward append
    "update" / "scale_backward" to ran before running cls's: the methods a backend's merged
    launches must not skip when a subclass overrides them."""

    class Logged(cls):
        def bn_scale_and_update(self, *args):
            ran.append("update")
            return super().bn_scale_and_update(*args)

        def bn_scale_backward(self, *args):
            ran.append("scale_backward")
            return super().bn_scale_backward(*args)

    return Logged
