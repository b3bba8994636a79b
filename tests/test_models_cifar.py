"""CIFAR ResNets: parameter counts of the papers, every variant, and bad arguments."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fused_res import models
from fused_res.testing import rel_err


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# He et al. 2015, Table 6 (option A, 10 classes), in millions, as printed (2 significant digits).
@pytest.mark.parametrize("depth,millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85),
                                            (110, 1.7), (1202, 19.4)])
def test_parameter_counts_of_he_2015(depth, millions):
    m = getattr(models, f"resnet{depth}")()
    digits = 2 if millions < 1 else (1 if millions < 10 else 1)
    assert round(n_params(m) / 1e6, digits) == millions


def test_parameter_counts_of_he_2016():
    assert round(n_params(models.resnet164()) / 1e6, 1) == 1.7
    assert 10.2e6 <= n_params(models.resnet1001()) <= 10.35e6


def test_plain_net_has_no_shortcuts_and_same_weights_as_option_a():
    plain, res = models.cifar_resnet(20, variant="plain"), models.cifar_resnet(20)
    assert n_params(plain) == n_params(res)
    assert models.residual_blocks(plain) == []
    assert len(models.residual_blocks(res)) == 9


CASES = list(itertools.product(models.VARIANTS, models.SHORTCUTS, models.BLOCKS))


@pytest.mark.parametrize("variant,shortcut,block", CASES)
def test_every_variant_forward_backward(variant, shortcut, block):
    torch.manual_seed(0)
    depth = 8 if block == "basic" else 11
    m = models.cifar_resnet(depth, variant=variant, shortcut=shortcut, block=block,
                            shortcut_scale=0.5, num_classes=7)
    x = torch.randn(3, 3, 16, 16, requires_grad=True)
    y = m(x)
    assert y.shape == (3, 7)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    m.eval()
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()


def test_projection_counts_by_option():
    def n_proj(shortcut):
        m = models.cifar_resnet(20, shortcut=shortcut)
        return sum(isinstance(b.downsample, torch.nn.Sequential)
                   for b in models.residual_blocks(m))
    assert (n_proj("A"), n_proj("B"), n_proj("C")) == (0, 2, 9)


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                        bn.eps)


def _expected_block(b, x, first=False):
    """The units of He et al. 2016 Fig. 4 written out independently of CifarBlock."""
    c1 = lambda t: F.conv2d(t, b.conv1.weight, stride=b.stride, padding=1)
    c2 = lambda t: F.conv2d(t, b.conv2.weight, padding=1)
    relu = F.relu

    def shortcut(t):
        if b.downsample is None:
            r = t
        elif isinstance(b.downsample, models.PadShortcut):
            r = t[:, :, ::b.stride, ::b.stride]
            r = torch.cat([r, r.new_zeros(r.shape[0], b.out_channels - b.in_channels,
                                          *r.shape[2:])], 1)
        else:
            r = F.conv2d(t, b.downsample[0].weight, stride=b.stride)
            if len(b.downsample) > 1:
                r = _bn(r, b.downsample[1])
        return b.shortcut_scale * r

    v = b.variant
    if v == "original":
        return relu(_bn(c2(relu(_bn(c1(x), b.bn1))), b.bn2) + shortcut(x))
    if v == "plain":
        return relu(_bn(c2(relu(_bn(c1(x), b.bn1))), b.bn2))
    if v == "bn_after_add":
        return relu(_bn(c2(relu(_bn(c1(x), b.bn1))) + shortcut(x), b.bn2))
    if v == "relu_before_add":
        return relu(_bn(c2(relu(_bn(c1(x), b.bn1))), b.bn2)) + shortcut(x)
    # A pre-activation unit's projection reads the activated input; so does any shortcut of
    # the net's first unit (He et al. 2016 §4.1: "we adopt the first activation right after
    # conv1 and before splitting into two paths").
    shared = isinstance(b.downsample, torch.nn.Sequential) or first
    if v == "relu_only_preact":
        p = relu(x)
        r = shortcut(p) if shared else shortcut(x)
        return _bn(c2(relu(_bn(c1(p), b.bn1))), b.bn2) + r
    p = relu(_bn(x, b.bn1))
    r = shortcut(p) if shared else shortcut(x)
    return c2(relu(_bn(c1(p), b.bn2))) + r


@pytest.mark.parametrize("variant,shortcut", list(itertools.product(models.VARIANTS,
                                                                    models.SHORTCUTS)))
@pytest.mark.parametrize("stride,cin,cout,first", [(1, 8, 8, False), (2, 8, 16, False),
                                                   (1, 8, 8, True), (1, 8, 16, True)])
def test_block_matches_written_out_unit(variant, shortcut, stride, cin, cout, first):
    torch.manual_seed(1)
    b = models.CifarBlock(cin, cout, stride, variant, shortcut, shortcut_scale=0.7,
                          shares_preact=first).eval()
    from helpers import randomize_bn
    randomize_bn(b)
    x = torch.randn(2, cin, 9, 9, dtype=torch.float64)
    b.double()
    with torch.no_grad():
        assert rel_err(b(x), _expected_block(b, x, first)) < 1e-12


@pytest.mark.parametrize("variant", ["relu_only_preact", "full_preact"])
def test_only_the_first_unit_of_a_preact_net_shares_its_activation(variant):
    m = models.cifar_resnet(14, variant=variant, shortcut="A")
    shared = [b.shares_preact for b in models.residual_blocks(m)]
    assert shared == [True] + [False] * (len(shared) - 1)
    assert not any(b.shares_preact for b in models.residual_blocks(
        models.cifar_resnet(14, variant="original")))


@pytest.mark.parametrize("kwargs,match", [
    (dict(depth=21), "6n\\+2"), (dict(depth=2), "6n\\+2"), (dict(depth=21, block="bottleneck"),
                                                            "9n\\+2"),
    (dict(depth=20, variant="preact"), "full_preact"), (dict(depth=20, shortcut="D"), "'A'"),
    (dict(depth=20, block="wide"), "bottleneck"), (dict(depth=20, num_classes=0), "positive"),
    (dict(depth=20.0), "6n\\+2"),
    (dict(depth=8, shortcut_scale="x"), "shortcut_scale='x'; accepted"),
    (dict(depth=8, shortcut_scale=True), "shortcut_scale=True; accepted"),
    (dict(depth=8, shortcut_scale=float("nan")), "shortcut_scale=nan; accepted"),
    (dict(depth=8, num_classes=10.5), "num_classes=10.5; accepted"),
    (dict(depth=8, widths=(16.5, 32, 64)), "widths=.*; accepted"),
    (dict(depth=8, widths=5), "widths=5; accepted"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.cifar_resnet(**kwargs)


def test_stage_resolution_and_widths():
    m = models.cifar_resnet(20)
    shapes = []
    for stage in (m.layer1, m.layer2, m.layer3):
        stage.register_forward_hook(lambda mod, i, o: shapes.append(tuple(o.shape[1:])))
    m(torch.randn(1, 3, 32, 32))
    assert shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
