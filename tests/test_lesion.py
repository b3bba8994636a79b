"""Veit et al. 2016 lesion study: dropping a block = the model without that residual branch."""

import copy

import pytest
import timm
import torch
import torchvision
from helpers import randomize_bn

from fused_res import lesion, models, residual_blocks
from fused_res.testing import rel_err


def _without_branch(model, index):
    """A copy of `model` whose block `index` has a residual branch that outputs exactly zero:
    the last layer of the branch is zeroed (a BN's affine, or a conv for pre-activation)."""
    twin = copy.deepcopy(model)
    block = residual_blocks(twin)[index]
    with torch.no_grad():
        convs = [n for n, _ in block.named_children() if n.startswith("conv")]
        last = max(convs, key=lambda n: int(n[4:]))
        norm = "bn" + last[4:]
        preact = (getattr(block, "variant", "") in ("full_preact",) or
                  hasattr(block, "norm1"))
        if preact or not hasattr(block, norm):
            getattr(block, last).weight.zero_()
        elif getattr(block, "variant", "") == "bn_after_add":
            getattr(block, last).weight.zero_()
        else:
            getattr(block, norm).weight.zero_()
            getattr(block, norm).bias.zero_()
    return twin


MODELS = {
    "ours_original": lambda: models.cifar_resnet(14, shortcut="B"),
    "ours_full_preact": lambda: models.cifar_resnet(14, variant="full_preact", shortcut="B"),
    "ours_relu_before_add": lambda: models.cifar_resnet(14, variant="relu_before_add"),
    "ours_bn_after_add": lambda: models.cifar_resnet(14, variant="bn_after_add"),
    "ours_relu_only_preact": lambda: models.cifar_resnet(14, variant="relu_only_preact",
                                                          shortcut="C"),
    "ours_imagenet": lambda: models.resnet18(num_classes=10),
    "torchvision_resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "torchvision_resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "timm_resnet18d": lambda: timm.create_model("resnet18d", num_classes=10),
    "timm_resnetv2_18": lambda: timm.create_model("resnetv2_18", num_classes=10),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lesion_equals_model_without_branch(name):
    torch.manual_seed(0)
    model = randomize_bn(MODELS[name]()).eval()
    blocks = residual_blocks(model)
    assert len(blocks) >= 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        for i in (0, 1, len(blocks) - 1):
            with lesion(model, drop=[i]) as m:
                dropped = m(x)
            expected = _without_branch(model, i)(x)
            assert rel_err(dropped, expected) <= 1e-6, (name, i)
            assert rel_err(dropped, full) > 1e-4, (name, i)
        # State restored: same output as before, no instance-level forward left behind.
        assert torch.equal(model(x), full)
    assert all("forward" not in b.__dict__ for b in blocks)


def test_lesion_several_blocks_and_negative_index():
    torch.manual_seed(0)
    model = randomize_bn(models.cifar_resnet(20)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        with lesion(model, drop=[1, -1]):
            a = model(x)
        twin = _without_branch(_without_branch(model, 1), 8)
        assert rel_err(a, twin(x)) <= 1e-6


def test_lesion_restores_on_error():
    model = models.cifar_resnet(8).eval()
    with pytest.raises(RuntimeError, match="boom"), lesion(model, drop=[0]):
        raise RuntimeError("boom")
    assert "forward" not in residual_blocks(model)[0].__dict__


def test_residual_blocks_order_is_forward_order():
    model = torchvision.models.resnet18().eval()
    order = []
    blocks = residual_blocks(model)
    hooks = [b.register_forward_pre_hook(lambda m, i: order.append(m)) for b in blocks]
    model(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert order == blocks and len(blocks) == 8


@pytest.mark.parametrize("drop,exc", [([9], ValueError), ([-10], ValueError), (["0"], TypeError),
                                      (3, TypeError), (None, TypeError), ([True], TypeError),
                                      ([torch.tensor(1.5)], TypeError)])
def test_lesion_bad_index(drop, exc):
    model = models.cifar_resnet(20)
    with pytest.raises(exc, match="accepted"), lesion(model, drop=drop):
        pass


def test_lesion_takes_numpy_and_torch_integers_and_needs_blocks():
    import numpy as np
    model = models.cifar_resnet(8).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        with lesion(model, [1]):
            want = model(x)
        for i in (np.int64(1), torch.tensor(1)):
            with lesion(model, [i]):
                assert torch.equal(model(x), want)
    with pytest.raises(ValueError, match="no residual blocks"), lesion(torch.nn.Linear(2, 2),
                                                                        [0]):
        pass


def test_a_lesioned_block_never_writes_its_input():
    """A lesioned block returns a new tensor, as the whole block does: timm's in-place SiLU
    overwrote the caller's tensor, and our ReLU-only pre-activation unit returned it, which
    the net's in-place final ReLU then wrote (what a hook had captured changed)."""
    m = timm.create_model("resnet18", act_layer="silu").eval()
    x = torch.randn(1, 64, 8, 8)
    x0 = x.clone()
    with torch.no_grad(), lesion(m, [1]):
        y = residual_blocks(m)[1](x)
    assert torch.equal(x, x0) and y.data_ptr() != x.data_ptr()

    net = models.cifar_resnet(14, variant="relu_only_preact").eval()
    seen = []
    net.layer3[0].register_forward_hook(lambda mod, i, o: seen.append((o, o.clone())))
    with torch.no_grad(), lesion(net, [-1]):
        net(torch.randn(2, 3, 16, 16))
    assert torch.equal(*seen[0])
