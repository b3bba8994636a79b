"""The reference ImageNet ResNets are torchvision's, module for module."""

import pytest
import torch
import torchvision
from helpers import randomize_bn

from fused_res import models
from fused_res.testing import rel_err

NAMES = sorted(models.IMAGENET_MODELS)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_same_keys_shapes_and_outputs_as_torchvision(name):
    torch.manual_seed(0)
    tv = randomize_bn(getattr(torchvision.models, name)(num_classes=17))
    ours = models.get_model(name, num_classes=17)
    tv_sd, our_sd = tv.state_dict(), ours.state_dict()
    assert list(our_sd) == list(tv_sd)
    assert all(our_sd[k].shape == tv_sd[k].shape for k in tv_sd)
    ours.load_state_dict(tv_sd)
    x = torch.randn(2, 3, 64, 48)
    for train in (False, True):
        tv.train(train)
        ours.train(train)
        with torch.no_grad():
            ref, out = tv(x), ours(x)
        assert rel_err(out, ref) <= 1e-6, (name, train)
    # Train mode updated the running statistics identically.
    for k, v in tv.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_equivalence_test_can_fail(name):
    """A single changed weight deep inside must be visible at the tolerance used above."""
    torch.manual_seed(0)
    tv = randomize_bn(getattr(torchvision.models, name)()).eval()
    ours = models.get_model(name).eval()
    ours.load_state_dict(tv.state_dict())
    with torch.no_grad():
        ours.layer3[0].conv1.weight[0, 0, 0, 0] += 0.1
        x = torch.randn(2, 3, 64, 64)
        assert rel_err(ours(x), tv(x)) > 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_and_constructor_options(name):
    tv = getattr(torchvision.models, name)()
    assert n_params(models.get_model(name)) == n_params(tv)
    m = models.get_model(name, zero_init_residual=True, num_classes=5)
    last_bns = [b.bn3 if hasattr(b, "bn3") else b.bn2 for b in models.residual_blocks(m)]
    assert last_bns and all(bool((bn.weight == 0).all()) for bn in last_bns)
    assert m.fc.out_features == 5


def test_norm_layer_is_used():
    m = models.resnet18(norm_layer=lambda c: torch.nn.GroupNorm(1, c))
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    y = m(torch.randn(1, 3, 32, 32))
    assert y.shape == (1, 1000)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    m = models.resnet18(num_classes=4)
    m(torch.randn(2, 3, 32, 32)).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("kwargs", [dict(layers=[2, 2, 2]), dict(layers=[2, 2, 0, 2]),
                                    dict(layers=[2, 2, 2, 2], num_classes=0),
                                    dict(layers=[2, 2, 2, "a"]),
                                    dict(layers=[2, 2, 2, 2], num_classes=10.5),
                                    dict(layers=[2, 2, 2, 2], width_per_group=0),
                                    dict(layers=[2, 2, 2, 2], replace_stride_with_dilation=True),
                                    # (strings are truthy: these built a dilated network)
                                    dict(layers=[2, 2, 2, 2],
                                         replace_stride_with_dilation=["no", "no", "no"])])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match="accepted"):
        models.ResNet(models.BasicBlock, **kwargs)


def test_bad_block_norm_layer_and_name_say_what_is_accepted():
    """Probes: these raised AttributeError / 'str' object is not callable / unhashable."""
    with pytest.raises(TypeError, match="block='bottleneck'; accepted"):
        models.ResNet("bottleneck", [1, 1, 1, 1])
    with pytest.raises(TypeError, match="norm_layer='bn'; accepted"):
        models.ResNet(models.BasicBlock, [1, 1, 1, 1], norm_layer="bn")
    with pytest.raises(ValueError, match=r"model=\['resnet18'\]; accepted"):
        models.get_model(["resnet18"])


def test_unknown_model_name():
    with pytest.raises(ValueError, match="resnet18"):
        models.get_model("resnet19")
