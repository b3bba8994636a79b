"""Fused modules against nn.Conv2d + nn.BatchNorm2d, with every BatchNorm option."""

import copy
import warnings

import pytest
import torch
from helpers import randomize_bn
from torch import nn
from torch.nn import functional as F

import fused_res.nn as fnn
from fused_res import models
from fused_res.nn import hooks
from fused_res.testing import rel_err

D = torch.float64


def _reference_unit(unit: fnn.ConvBNAct2d) -> nn.Module:
    layers = [copy.deepcopy(unit.conv), copy.deepcopy(unit.bn)]
    if unit.act == "relu":
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


BN_OPTIONS = [dict(), dict(momentum=None), dict(momentum=0.3), dict(affine=False),
              dict(track_running_stats=False), dict(eps=1e-3)]


@pytest.mark.parametrize("bn_kwargs", BN_OPTIONS)
@pytest.mark.parametrize("act", ["relu", "none"])
def test_conv_bn_act_matches_modules_over_several_steps(bn_kwargs, act):
    torch.manual_seed(0)
    unit = fnn.ConvBNAct2d(4, 6, 3, stride=2, act=act,
                           norm_layer=lambda c: nn.BatchNorm2d(c, **bn_kwargs)).double()
    randomize_bn(unit)
    ref = _reference_unit(unit)
    for m in (unit, ref):
        # Past a count whose reciprocal float32 rounds (1/6): momentum=None's factor is
        # nn's double 1 / num_batches_tracked, and a float32 one was 3e-8 off in float64.
        for b in m.modules():
            if getattr(b, "num_batches_tracked", None) is not None:
                b.num_batches_tracked.fill_(5)
    for step in range(3):
        x = torch.randn(3, 4, 9, 9, dtype=D, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        for m in (unit, ref):
            m.train(step < 2)
        y, yr = unit(x), ref(xr)
        assert rel_err(y, yr) < 1e-12, step
        g = torch.randn_like(y)
        y.backward(g)
        yr.backward(g)
        assert rel_err(x.grad, xr.grad) < 1e-10
        for p, q in zip(unit.parameters(), ref.parameters(), strict=True):
            assert rel_err(p.grad, q.grad) < 1e-10
    for (k, a), (_, b) in zip(unit.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b) if a.dtype == torch.long else rel_err(a, b) < 1e-12, k


def test_batch_of_one_value_per_channel_raises_like_batchnorm():
    unit = fnn.ConvBNAct2d(3, 4, 1).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        unit(torch.randn(1, 3, 1, 1))


def test_empty_batch_counts_but_does_not_move_running_stats():
    unit = fnn.ConvBNAct2d(3, 4, 3).train()
    randomize_bn(unit)
    before = copy.deepcopy(unit.bn.state_dict())
    y = unit(torch.randn(0, 3, 5, 5))
    assert y.shape == (0, 4, 5, 5)
    assert torch.equal(unit.bn.running_mean, before["running_mean"])
    assert unit.bn.num_batches_tracked.item() == before["num_batches_tracked"].item() + 1


def test_eval_folding_is_never_stale():
    """Eval output follows an optimizer step and load_state_dict immediately."""
    torch.manual_seed(0)
    block = fnn.BasicBlock(8, 8).double().eval()
    randomize_bn(block)
    ref = models.BasicBlock(8, 8).double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=D)
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    block(x).square().sum().backward()
    opt.step()
    ref.load_state_dict(block.state_dict())
    assert rel_err(block(x), ref(x)) < 1e-12
    state = {k: v + 0.1 if v.is_floating_point() else v for k, v in block.state_dict().items()}
    block.load_state_dict(state)
    ref.load_state_dict(state)
    assert rel_err(block(x), ref(x)) < 1e-12


@pytest.mark.parametrize("cls,ref_cls,planes", [(fnn.BasicBlock, models.BasicBlock, 16),
                                                (fnn.Bottleneck, models.Bottleneck, 4)])
def test_post_act_blocks_match_reference_blocks(cls, ref_cls, planes):
    torch.manual_seed(0)
    ds = nn.Sequential(nn.Conv2d(8, planes * cls.expansion, 1, 2, bias=False),
                       nn.BatchNorm2d(planes * cls.expansion))
    block = cls(8, planes, 2, ds).double()
    randomize_bn(block)
    ref = ref_cls(8, planes, 2, copy.deepcopy(ds)).double()
    ref.load_state_dict(block.state_dict())
    assert list(block.state_dict()) == list(ref.state_dict())
    for train in (True, False):
        block.train(train)
        ref.train(train)
        x = torch.randn(3, 8, 9, 9, dtype=D)
        assert rel_err(block(x), ref(x)) < 1e-12


def _preact_reference(block, x):
    """He et al. 2016 (e), written out with the block's own modules."""
    relu = torch.relu
    p = relu(block.bn1(x))
    r = block.downsample(p) if block.downsample is not None else x
    h = block.conv1(p)
    for k in range(2, block.n_convs + 1):
        h = getattr(block, f"conv{k}")(relu(getattr(block, f"bn{k}")(h)))
    return h + block.shortcut_scale * r


@pytest.mark.parametrize("cls,planes", [(fnn.PreActBasicBlock, 8), (fnn.PreActBottleneck, 4)])
@pytest.mark.parametrize("stride", [1, 2])
def test_preact_blocks_match_written_out_unit(cls, planes, stride):
    torch.manual_seed(0)
    block = cls(8, planes, stride, shortcut_scale=0.5).double()
    randomize_bn(block)
    twin = copy.deepcopy(block)
    for train in (True, False):
        block.train(train)
        twin.train(train)
        x = torch.randn(3, 8, 9, 9, dtype=D)
        assert rel_err(block(x), _preact_reference(twin, x)) < 1e-12
    for a, b in zip(block.buffers(), twin.buffers(), strict=True):
        assert rel_err(a, b) < 1e-12


def test_drop_path_scales_the_branch_per_sample():
    torch.manual_seed(0)
    block = fnn.BasicBlock(8, 8, drop_path=0.5).double().train()
    twin = models.BasicBlock(8, 8).double().train()
    twin.load_state_dict(block.state_dict())
    x = torch.randn(16, 8, 5, 5, dtype=D)
    torch.manual_seed(1)
    y = block(x)
    torch.manual_seed(1)
    keep = torch.empty(16, 1, 1, 1, dtype=D).bernoulli_(0.5) / 0.5
    branch = twin.bn2(twin.conv2(twin.relu(twin.bn1(twin.conv1(x)))))
    assert rel_err(y, torch.relu(branch * keep + x)) < 1e-12
    assert 0 < int((keep == 0).sum()) < 16


def test_constructor_validation():
    with pytest.raises(ValueError, match="act"):
        fnn.ConvBNAct2d(3, 4, act="gelu")
    for bad in (1.5, "0.1", True):  # (the argument's own name in the message)
        with pytest.raises(ValueError, match=f"drop_path={bad!r}"):
            fnn.BasicBlock(8, 8, drop_path=bad)
    with pytest.raises(ValueError, match="drop_prob='0.1'"):
        fnn.DropPath("0.1")
    with pytest.raises(TypeError, match="shortcut_scale"):
        fnn.BasicBlock(8, 8, shortcut_scale="1")
    for bad in (float("nan"), float("inf")):  # (the reference CIFAR block refuses them too)
        with pytest.raises(ValueError, match="accepted: a finite float"):
            fnn.Bottleneck(8, 2, shortcut_scale=bad)


def test_what_a_unit_or_block_cannot_compute_exactly_is_refused_when_built():
    """Probes: from_modules ran a reflect-padded conv zero-padded and skipped a BatchNorm
    subclass's own forward (both silently wrong); a GroupNorm norm_layer, a tuple kernel and
    padding='same' failed later with internal errors; a pre-activation block given the
    wrong channels named its BN's weight."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)

    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    for conv, norm, match in (
            (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), bn,
             "conv: padding .* with padding_mode 'reflect'"),
            (nn.Conv2d(4, 6, 2, padding="same"), bn, "conv: padding 'same' .* pads one side more"),
            (nn.Linear(4, 6), bn, "conv: Linear is not an nn.Conv2d"),
            (nn.Conv2d(4, 6, 3), MyBN(6), "bn .*MyBN is a subclass of nn.BatchNorm2d, "
             "whose forward may differ"),
            (nn.Conv2d(4, 6, 3), nn.GroupNorm(2, 6), "bn .*GroupNorm is not a BatchNorm2d")):
        with pytest.raises(ValueError, match=match):
            fnn.ConvBNAct2d.from_modules(conv, norm)
    with pytest.raises(ValueError, match="act='gelu'"):
        fnn.ConvBNAct2d.from_modules(nn.Conv2d(4, 6, 3), bn, act="gelu")
    gn = lambda c: nn.GroupNorm(1, c)  # noqa: E731
    with pytest.raises(ValueError, match="GroupNorm is not a BatchNorm2d"):
        fnn.ConvBNAct2d(4, 6, norm_layer=gn)
    for cls, planes in ((fnn.BasicBlock, 8), (fnn.Bottleneck, 2), (fnn.PreActBasicBlock, 8),
                        (fnn.PreActBottleneck, 2)):
        with pytest.raises(ValueError, match="norm_layer built bn. as GroupNorm"):
            cls(8, planes, norm_layer=gn)
    with pytest.raises(ValueError, match=r"x has shape \(2, 6, 8, 8\); accepted: 8 channels"):
        fnn.PreActBasicBlock(8, 8)(torch.randn(2, 6, 8, 8))
    # What nn.Conv2d takes and the unit can run: tuple kernels, 'same' and 'valid' padding.
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    for kw in (dict(kernel_size=(3, 1)), dict(kernel_size=(5, 3), padding="same"),
               dict(kernel_size=3, padding="valid"), dict(kernel_size=3, dilation=2)):
        unit = fnn.ConvBNAct2d(4, 6, backend="reference", **kw).double().eval()
        # (nn.Conv2d given the same padding string, where there is one)
        twin = nn.Conv2d(4, 6, **kw, bias=False).double() if "padding" in kw else unit.conv
        twin.load_state_dict(unit.conv.state_dict())
        with torch.no_grad():
            assert rel_err(unit(x), torch.relu(unit.bn(twin(x)))) < 1e-12, kw
    with pytest.raises(ValueError, match="padding='same' with kernel_size=2"):
        fnn.ConvBNAct2d(4, 6, kernel_size=2, padding="same")
    # ... and from_modules of such convs (it refused 'valid' and any 'same').
    for kw in (dict(kernel_size=3, padding="valid"), dict(kernel_size=(5, 3), padding="same"),
               dict(kernel_size=3, padding="same", dilation=2)):
        conv = nn.Conv2d(4, 6, **kw).double()
        unit = fnn.ConvBNAct2d.from_modules(conv, nn.BatchNorm2d(6).double(),
                                            backend="reference")
        for train in (True, False):
            unit.train(train)
            want = torch.relu(F.batch_norm(conv(x), unit.bn.running_mean.clone(),
                                           unit.bn.running_var.clone(), unit.bn.weight,
                                           unit.bn.bias, train))
            assert rel_err(unit(x), want) < 1e-12, (kw, train)
    with pytest.raises(ValueError, match="padding='same' with stride=2; accepted: stride 1"):
        fnn.ConvBNAct2d(4, 6, stride=2, padding="same")


def test_a_unit_whose_conv_has_hooks_runs_them():
    """torch.nn.utils.prune recomputes the weight in a forward pre-hook of the conv, which
    the fused unit never called: after an optimizer step it ran the stale weight (a review).
    While a child has hooks, the unit runs its modules unfused (one warning)."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1).double(), nn.BatchNorm2d(6).double()
    twin = nn.Module()
    twin.conv, twin.bn = copy.deepcopy(conv), copy.deepcopy(bn)
    for c in (conv, twin.conv):
        prune.l1_unstructured(c, "weight", amount=0.5)  # (deterministic: the same mask)
    unit = fnn.ConvBNAct2d.from_modules(conv, bn, backend="reference").train()
    twin.forward = lambda x: torch.relu(twin.bn(twin.conv(x)))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    import warnings

    from fused_res.nn import hooks
    hooks._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in (unit, twin):
            opt = torch.optim.SGD(m.parameters(), lr=0.5)
            m(x).sum().backward()
            opt.step()
        got = unit(x)
    assert rel_err(got, twin(x)) < 1e-12
    assert [w for w in caught
            if "hooks on the conv (or an instance forward) of a ConvBNAct2d" in str(w.message)]


def test_a_batchnorm_subclass_that_only_changes_defaults_still_builds_and_matches():
    """A norm_layer class that keeps BatchNorm2d's forward (here other default momentum) is
    what the fused ops compute: blocks and units built with it work as they did before the
    norm_layer check (a review caught the check refusing it)."""
    class SlowBN(nn.BatchNorm2d):
        def __init__(self, c):
            super().__init__(c, momentum=0.01)

    torch.manual_seed(3)
    block = fnn.BasicBlock(8, 8, norm_layer=SlowBN, backend="reference").double().train()
    twin = models.BasicBlock(8, 8, norm_layer=SlowBN).double().train()
    twin.load_state_dict(block.state_dict())
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    assert rel_err(block(x), twin(x)) < 1e-12
    assert rel_err(block.bn1.running_var, twin.bn1.running_var) < 1e-12
    fnn.ConvBNAct2d(4, 6, norm_layer=SlowBN)


def test_sync_batchnorm_swapped_in_after_construction_is_refused():
    block = nn.SyncBatchNorm.convert_sync_batchnorm(fnn.BasicBlock(8, 8)).eval()
    with pytest.raises(TypeError, match="SyncBatchNorm"):
        block(torch.randn(2, 8, 4, 4))


def _saved_bytes(fn, x) -> int:
    """Bytes of the distinct storages autograd saves for backward during fn(x)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


@pytest.mark.parametrize("make, shape", [
    (lambda: models.imagenet.Bottleneck(64, 16, 1, nn.Sequential(
        nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64))), (4, 64, 14, 14)),
    (lambda: models.imagenet.BasicBlock(32, 32), (4, 32, 14, 14)),
    (lambda: models.cifar.CifarBlock(16, 32, 2, "full_preact", "B"), (4, 16, 16, 16)),
    (lambda: models.cifar.CifarBlock(16, 16, 1, "bn_after_add"), (4, 16, 16, 16)),
    (lambda: models.cifar.CifarBlock(16, 64, 1, "original", "B", "bottleneck"),
     (4, 16, 16, 16)),
    (lambda: models.cifar.CifarBlock(16, 32, 2, "relu_only_preact", "B"), (4, 16, 16, 16)),
    (lambda: models.cifar.CifarBlock(16, 32, 2, "relu_before_add", "B"), (4, 16, 16, 16)),
], ids=["bottleneck", "basic", "cifar_preact", "cifar_bn_after_add", "cifar_bottleneck",
        "cifar_relu_only_preact", "cifar_relu_before_add"])
@pytest.mark.parametrize("bn_pass", [False, True], ids=["prologue", "bn_pass"])
@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_saved_for_backward_is_no_larger_than_eager(make, shape, bn_pass, backend):
    """Issue 5: a fused block in training keeps no more for its backward than the eager
    block it replaces (distinct storages; parameters count on both sides), with training
    BNs in the next conv's prologue and in their own pass (Backend.prologue_apart); on the
    cuda backend's CPU kernels the units in their own pass are one autograd node each
    (ops/train_unit.py)."""
    import contextlib

    import fused_res
    if not fused_res.backends.get_backend_object(backend).status().available:
        pytest.skip(f"backend {backend!r} is unavailable here")
    torch.manual_seed(0)
    block = make().train()
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    eager = _saved_bytes(block, x)
    fused = fused_res.convert(copy.deepcopy(block), backend=backend)
    assert isinstance(fused, fused_res.nn.FusedResidualBlock)
    apart = fused_res.backends.get_backend_object(backend).prologue_apart
    with apart() if bn_pass else contextlib.nullcontext():
        ours = _saved_bytes(fused, x)
    assert ours <= eager, f"fused saves {ours} bytes, eager {eager}"


@pytest.mark.parametrize("swap", ["reflect_conv", "reflect_in_place", "conv_subclass",
                                  "groupnorm"])
def test_conv_bn_act_with_a_child_swapped_after_construction_runs_it_unfused(swap):
    """A child set since construction that the constructor would have refused runs as
    itself, unfused, with one warning (a reflect-padded conv ran zero-padded and a conv
    subclass's own forward was skipped: 0.9 and 1.8 off; a GroupNorm raised a TypeError)."""
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    unit = fnn.ConvBNAct2d(4, 8, 3, backend="reference")
    if swap == "reflect_conv":
        unit.conv = nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect", bias=False)
    elif swap == "reflect_in_place":
        unit(torch.randn(2, 4, 9, 9))  # (checked once as built)
        unit.conv.padding_mode = "reflect"
    elif swap == "conv_subclass":
        unit.conv = Doubled(4, 8, 3, padding=1, bias=False)
    else:
        unit.bn = nn.GroupNorm(2, 8)
    x = torch.randn(2, 4, 9, 9)
    for train in (True, False):
        unit.train(train)
        hooks._WARNED.clear()
        with pytest.warns(UserWarning, match="replaced since it was built"):
            y = unit(x)
        assert rel_err(y, torch.relu(unit.bn(unit.conv(x)))) <= 1e-6
    unit.conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)  # fits again: fused, no warning
    unit.bn = nn.BatchNorm2d(8).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_err(unit(x), torch.relu(unit.bn(unit.conv(x)))) <= 1e-6
