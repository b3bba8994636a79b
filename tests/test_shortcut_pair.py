"""ops.conv_shortcut_pair, a block's last conv and its 1x1 projection shortcut as one op in
inference: its argument checks, the reference's result, and where the blocks route through it
(every backend that has no kernel for it runs the two units as before; the Triton kernel
itself is tested under the interpreter in test_triton_kernels.py)."""

import copy

import pytest
import torch
from helpers import randomize_bn
from torch.nn import functional as F

import fused_res
from fused_res import models, ops
from fused_res.backends.reference import ReferenceBackend
from fused_res.testing import rel_err


def _args(n=2, cout=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return dict(x=t(n, 6, 5, 4), w=t(cout, 6, 3, 3), b=t(cout), x2=t(n, 5, 9, 8),
                w2=t(cout, 5, 1, 1), b2=t(cout))


def _call(a, **kw):
    kw = {"stride": 1, "padding": 1, "stride2": 2, "act_out": "relu", **kw}
    return ops.conv_shortcut_pair(a["x"], a["w"], a["b"], a["x2"], a["w2"], a["b2"], **kw)


def test_reference_is_the_sum_of_the_two_convs():
    a = _args()
    want = (F.conv2d(a["x"], a["w"], a["b"], 1, 1) + F.conv2d(a["x2"], a["w2"], a["b2"], 2))
    assert rel_err(_call(a, backend="reference"), want.relu()) < 1e-12
    assert rel_err(_call(a, act_out="none", backend="reference"), want) < 1e-12


@pytest.mark.parametrize("change,error,match", [
    ({"w2": torch.randn(8, 5, 3, 3, dtype=torch.float64)}, ValueError, "1x1 projection"),
    ({"w2": torch.randn(8, 5, 3, 3, dtype=torch.float64),
      "x2": torch.randn(2, 5, 1, 1, dtype=torch.float64)}, ValueError, "1x1 projection"),
    ({"w2": torch.randn(8, 5, 1, 1, dtype=torch.float64, device="meta")}, ValueError,
     "weight2 is on meta but x2 is on cpu"),
    ({"w2": torch.randn(7, 5, 1, 1, dtype=torch.float64)}, ValueError, "output channels"),
    ({"x2": torch.randn(2, 5, 12, 8, dtype=torch.float64)}, ValueError, "same output shape"),
    ({"x2": torch.randn(2, 5, 9, 8)}, TypeError, "weight2 has dtype .* but x2 has"),
    ({"x2": torch.randn(2, 5, 9, 8), "w2": torch.randn(8, 5, 1, 1)}, TypeError, "x2 has dtype"),
    ({"b2": torch.randn(3, dtype=torch.float64)}, ValueError, "bias2 has shape"),
    ({"x2": torch.randn(2, 5, 9, 8, dtype=torch.float64).requires_grad_()}, RuntimeError,
     "no backward"),
])
def test_bad_arguments_are_named(change, error, match):
    # (float32 x2 beside float64 x: autocast is off, so nothing reconciles them.)
    with pytest.raises(error, match=match):
        _call({**_args(), **change}, backend="reference")
    with pytest.raises(ValueError, match="act_out"):
        _call(_args(), act_out="gelu", backend="reference")


def test_which_backends_fuse_the_pair():
    assert not ops.fuses_shortcut_conv("reference")
    assert not ops.fuses_shortcut_conv("cuda") and not ops.fuses_shortcut_conv("cudnn")
    assert not ops.fuses_shortcut_conv("auto")
    assert ops.fuses_shortcut_conv("triton")  # (its kernel: test_triton_kernels.py)
    triton = fused_res.backends.get_backend_object("triton")
    with triton.unfused():
        assert not ops.fuses_shortcut_conv("triton")


@pytest.fixture
def routed(monkeypatch):
    """The reference backend taking the pair (its own two units behind it): where the blocks
    route through ops.conv_shortcut_pair, without needing a kernel for it."""
    calls = []
    real = ReferenceBackend.conv_pair_forward

    def spy(self, *args):
        calls.append(args[0].shape)
        return real(self, *args)
    monkeypatch.setattr(ReferenceBackend, "fuses_shortcut_conv", lambda self: True)
    monkeypatch.setattr(ReferenceBackend, "conv_pair_forward", spy)
    return calls


def test_resnet50_eval_routes_its_four_projections(routed):
    torch.manual_seed(0)
    model = randomize_bn(models.resnet50()).eval()
    fused = fused_res.convert(copy.deepcopy(model), backend="reference")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = fused(x)
        want = model.double()(x.double())
    assert len(routed) == 4  # layer1..4 block 0: the downsampling blocks
    assert rel_err(y, want) <= 1e-5


@pytest.mark.parametrize("case", ["train", "grad", "lambda", "preact", "projections"])
def test_blocks_keep_two_units_where_the_pair_does_not_apply(case, routed):
    torch.manual_seed(0)
    variant = "full_preact" if case == "preact" else "original"
    scale = 0.5 if case == "lambda" else 1.0
    model = randomize_bn(models.cifar_resnet(20, variant=variant, shortcut="C" if case ==
                                             "projections" else "B", shortcut_scale=scale))
    model.train(case == "train")
    fused = fused_res.convert(copy.deepcopy(model), backend="reference")
    x = torch.randn(2, 3, 16, 16)
    if case == "projections":  # shortcut C projects in every block: routed, as a control
        with torch.no_grad():
            fused(x)
        assert len(routed) == 9
        return
    with torch.no_grad() if case != "grad" else torch.enable_grad():
        y = fused(x)
        want = copy.deepcopy(model).double()(x.double())
    assert routed == []
    assert rel_err(y, want) <= 1e-5


def test_the_ab_benchmark_says_it_needs_cuda():
    import pathlib
    import subprocess
    import sys
    if torch.cuda.is_available():
        pytest.skip("a CUDA device: the script would run")
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "pair_ab.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr


def test_deciding_on_the_pair_draws_no_random_mask(routed, monkeypatch):
    """A block whose drop path still trains (frozen BatchNorms, fine-tuning) under no_grad:
    no pair, and no mask drawn to find that out, so the block draws what it draws without
    the pair on offer (asking _drop_path_scale drew one mask more per downsampling block)."""
    from torch.nn import Sequential

    from fused_res import nn as fnn
    from fused_res.models.imagenet import conv1x1
    torch.manual_seed(0)
    down = Sequential(conv1x1(16, 32, 2), torch.nn.BatchNorm2d(32))
    block = randomize_bn(fnn.Bottleneck(16, 8, 2, down, drop_path=0.5, backend="reference"))
    block.train()
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x = torch.randn(4, 16, 8, 8)
    outs = []
    for offered in (True, False):
        monkeypatch.setattr(ReferenceBackend, "fuses_shortcut_conv", lambda self, o=offered: o)
        torch.manual_seed(1)
        with torch.no_grad():
            outs.append((block(x), torch.get_rng_state()))
    assert routed == []
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
