"""Training BatchNorms applied in their own pass (Backend.fuse_train_prologue False) instead of
the next conv's prologue: the same values, gradients and running statistics, no prologue
recomputed in the backward, and the choice per backend."""

import contextlib
import copy

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import fused_res
import fused_res.nn as fnn
from fused_res import models, ops
from fused_res.backends import get_backend_object
from fused_res.backends.reference import ReferenceBackend
from fused_res.testing import rel_err

D = torch.float64


def _downsample(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


R = "reference"
BLOCKS = {  # eager blocks (converted below) and fused_res.nn blocks
    "bottleneck": (lambda: models.imagenet.Bottleneck(8, 4, 2, _downsample(8, 16, 2)), 8),
    "basic": (lambda: models.imagenet.BasicBlock(6, 6), 6),
    # pre-activation: the block's first BN (of its input) is a prologue too, and with a
    # projection shortcut the shortcut reads that pre-activation
    "preact_projection": (lambda: fnn.PreActBottleneck(8, 4, 2, shortcut_scale=0.5,
                                                       backend=R), 8),
    "preact_identity": (lambda: fnn.PreActBasicBlock(8, 8, 1, backend=R), 8),
    "cifar_bn_after_add": (lambda: models.cifar.CifarBlock(8, 8, 1, "bn_after_add"), 8),
    "cifar_relu_only_preact": (
        lambda: models.cifar.CifarBlock(8, 16, 2, "relu_only_preact", "B"), 8),
}


class _Spy:
    """Counts the reference backend's conv calls (conv_bn_stats, conv_unit) that carry a
    prologue with an affine, and the affine prologue recomputes of a backward."""

    def __init__(self, monkeypatch):
        self.prologue_convs = self.recomputes = 0

        def counting(method):
            def spy(obj, *args):
                # both take (x, weight, bias, stride, padding, dilation, groups, in_center,
                # in_scale, in_shift, act_in, ...)
                if any(v is not None for v in args[7:10]):
                    self.prologue_convs += 1
                return method(obj, *args)
            return spy

        apply = ReferenceBackend._prologue_apply

        def spy_apply(obj, x, center, scale, shift, act):
            if center is not None or scale is not None or shift is not None:
                self.recomputes += 1
            return apply(obj, x, center, scale, shift, act)
        for name in ("conv_bn_stats_forward", "conv_unit_forward"):
            monkeypatch.setattr(ReferenceBackend, name,
                                counting(getattr(ReferenceBackend, name)))
        monkeypatch.setattr(ReferenceBackend, "_prologue_apply", spy_apply)


def _step(block, x, gy):
    """Output, input gradient and parameter gradients of one training step."""
    xa = x.clone().requires_grad_()
    y = block(xa)
    (y * gy).sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad(set_to_none=True)
    return y.detach(), xa.grad, grads


@pytest.mark.parametrize("name", list(BLOCKS))
def test_bn_pass_computes_what_the_prologue_does(name, monkeypatch):
    make, cin = BLOCKS[name]
    torch.manual_seed(0)
    eager = randomize_bn(make()).double().train()
    fused = fused_res.convert(copy.deepcopy(eager), backend=R)
    assert isinstance(fused, fnn.FusedResidualBlock) and fused.backend == R
    apart = copy.deepcopy(fused)
    x = torch.randn(3, cin, 9, 9, dtype=D)
    gy = torch.randn_like(fused(x.clone()))  # (a step; the copies below restart from here)
    fused.load_state_dict(eager.state_dict())
    apart.load_state_dict(eager.state_dict())

    spy = _Spy(monkeypatch)
    want = _step(fused, x, gy)
    fused_prologues, fused_recomputes = spy.prologue_convs, spy.recomputes
    spy.prologue_convs = spy.recomputes = 0
    with get_backend_object(R).prologue_apart():
        got = _step(apart, x, gy)
    assert spy.prologue_convs == 0, "a conv still applied a training BN in its prologue"
    assert spy.recomputes == 0, "the backward recomputed a BN the forward had applied"
    assert fused_prologues > 0 and fused_recomputes > 0  # what the default path does

    for a, b, what in ((got[0], want[0], "y"), (got[1], want[1], "dx")):
        assert rel_err(a, b) < 1e-12, what
    for (pname, _), a, b in zip(apart.named_parameters(), got[2], want[2], strict=True):
        assert rel_err(a, b) < 1e-12, f"d{pname}"
    for (bname, a), b in zip(apart.named_buffers(), fused.buffers(), strict=True):
        assert rel_err(a.double(), b.double()) < 1e-12, bname


def test_the_choice_per_backend_and_its_context():
    assert ops.fuses_train_prologue("reference") is True
    # triton: measured slower with the prologue (TritonBackend.fuse_train_prologue)
    assert ops.fuses_train_prologue("triton") is False
    # cuda's and cudnn's prologue is an apply pass before the conv either way
    assert ops.fuses_train_prologue("cuda") is False
    assert ops.fuses_train_prologue("cudnn") is False
    assert ops.fuses_train_prologue("auto") is False
    ref = get_backend_object(R)
    with fused_res.use_backend(R):
        assert ops.fuses_train_prologue() is True
        with ref.prologue_apart():
            assert ops.fuses_train_prologue() is False
            with ref.train_prologue(True):
                assert ops.fuses_train_prologue() is True
            assert ops.fuses_train_prologue() is False
            with get_backend_object("triton").prologue_fused():
                assert ops.fuses_train_prologue("triton") is True  # per backend
                assert ops.fuses_train_prologue() is False
        assert ops.fuses_train_prologue() is True
        with pytest.raises(RuntimeError), ref.prologue_apart():
            raise RuntimeError("restored on the way out")
        assert ops.fuses_train_prologue() is True
    with get_backend_object("cuda").train_prologue(True):
        assert ops.fuses_train_prologue("cuda") is True
    assert ops.fuses_train_prologue("cuda") is False
    with pytest.raises(TypeError, match="fused"):
        with ref.train_prologue("no"):
            pass


def test_the_choice_is_per_thread():
    """A context on one thread leaves another thread's choice alone, and overlapping
    contexts on two threads each restore their own."""
    import threading

    ref = get_backend_object(R)
    entered, release, seen = threading.Event(), threading.Event(), {}

    def other():
        with ref.prologue_apart():
            entered.set()
            release.wait(10)
            seen["other inside"] = ops.fuses_train_prologue(R)
        seen["other after"] = ops.fuses_train_prologue(R)

    t = threading.Thread(target=other)
    t.start()
    entered.wait(10)
    seen["main while other inside"] = ops.fuses_train_prologue(R)
    with ref.train_prologue(True):
        release.set()
        t.join(10)
        seen["main inside"] = ops.fuses_train_prologue(R)
    seen["main after"] = ops.fuses_train_prologue(R)
    assert seen == {"main while other inside": True, "other inside": False,
                    "other after": True, "main inside": True, "main after": True}


def test_torch_compile_follows_the_choice():
    """torch.compile traces the choice in force: a graph per choice (2 epilogue ops in the
    Bottleneck with prologues, 4 with the mid BNs in their own pass), and back outside the
    context, the first graph again (no third compile)."""
    if not hasattr(torch, "compile"):
        pytest.skip("this torch has no torch.compile")
    torch.manual_seed(0)
    make, cin = BLOCKS["bottleneck"]
    fused = fused_res.convert(make().train(), backend=R)
    epilogues = []

    def count(gm, example_inputs):
        epilogues.append(sum("epilogue" in str(n.target) for n in gm.graph.nodes))
        return gm
    compiled = torch.compile(fused, fullgraph=True, backend=count)
    x = torch.randn(3, cin, 9, 9)
    for apart in (False, True, False, True):
        with get_backend_object(R).prologue_apart() if apart else contextlib.nullcontext():
            compiled(x)
    assert epilogues == [2, 4]
