"""Inference folds each BN into its conv once (fused_res/nn/eval_fold.py): the cached fold must
equal the per-call one, follow every change of the parameters and running statistics, and
never be used where a gradient could flow."""

import copy

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import fused_res
from fused_res.models import resnet18
from fused_res.nn import eval_fold
from fused_res.testing import rel_err


def _pair(backend="reference"):
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics and affine
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    fused = fused_res.convert(copy.deepcopy(model), backend=backend).eval()
    return model, fused


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_cached_fold_matches_eager_and_is_reused(backend):
    if backend not in fused_res.available_backends() or \
            not fused_res.available_backends()[backend].available:
        pytest.skip(f"{backend} is not available here")
    model, fused = _pair(backend)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        got = fused(x)
        assert rel_err(got, want) <= 1e-5
        conv, bn = fused.conv1, fused.bn1
        w1, _ = eval_fold.folded_conv(conv, bn, x)
        w2, _ = eval_fold.folded_conv(conv, bn, x)
    assert w1 is w2  # the second call is a cache hit
    assert w1.is_contiguous(memory_format=torch.channels_last)


def test_parameters_stay_swappable_after_a_cached_fold():
    """torch.utils.swap_tensors refuses a tensor with a weak reference; the cache once held
    one on every parameter it folded, so after one eval forward load_state_dict and .to()
    failed under set_swap_module_params_on_conversion ("Couldn't swap Conv2d.weight").
    After the swaps the fold follows the new values."""
    model, fused = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused(x)  # fill the cache
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        other = resnet18(num_classes=10).eval().state_dict()
        for m in (model, fused):
            m.load_state_dict(other)
        with torch.no_grad():
            assert rel_err(fused(x), model(x)) <= 1e-5
        for m in (model, fused):
            m.to(torch.bfloat16).float()
        with torch.no_grad():
            assert rel_err(fused(x), model(x)) <= 1e-5
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def test_functional_call_with_views_of_one_storage_is_never_served_a_stale_fold():
    """torch.func.functional_call puts each given tensor in the module's parameter dict. Views
    of one storage (a transpose, a plain view) share its address and version; freed between
    calls, a new one took the old one's id, and a key on (id, address, version) served the
    transpose's fold to the plain view (a review: max |diff| 14.5)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
    bn.running_var.uniform_(0.5, 2.0)
    bn.running_mean.uniform_(-0.5, 0.5)
    ref = nn.Sequential(conv, bn, nn.ReLU()).eval()
    unit = fused_res.nn.ConvBNAct2d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), "relu",
                                                backend="reference").eval()
    x, base = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3)
    for i in range(8):
        with torch.no_grad():
            w = base.transpose(2, 3) if i % 2 == 0 else base.view_as(base)
            got = functional_call(unit, {"conv.weight": w}, (x,))
            want = functional_call(ref, {"0.weight": w}, (x,))
            del w
        assert rel_err(got, want) <= 1e-5, i


def test_fold_follows_in_place_changes_and_state_dict_loads():
    model, fused = _pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused(x)  # fill the cache
        for m in (model, fused):
            m.layer1[0].bn1.running_var.mul_(3.0)
            m.layer2[0].conv1.weight.add_(0.1)
        assert rel_err(fused(x), model(x)) <= 1e-5
        other = resnet18(num_classes=10).eval()
        model.load_state_dict(other.state_dict())
        fused.load_state_dict(other.state_dict())
        assert rel_err(fused(x), model(x)) <= 1e-5
        fused.layer3[1].bn2.eps = 0.5  # a plain attribute, not a tensor: part of the key too
        model.layer3[1].bn2.eps = 0.5
        assert rel_err(fused(x), model(x)) <= 1e-5


def test_no_cache_where_gradients_flow():
    model, fused = _pair()
    x = torch.randn(2, 3, 32, 32)
    assert not eval_fold.applies(x)  # grad mode on
    with torch.no_grad():
        assert eval_fold.applies(x)
        assert not eval_fold.applies(x.double())
    fused(x).sum().backward()
    model(x).sum().backward()
    g, g_ref = fused.conv1.weight.grad, model.conv1.weight.grad
    assert g is not None and rel_err(g, g_ref) <= 1e-4


def test_autocast_dtype_and_layout_are_part_of_the_key():
    _, fused = _pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        w32, _ = eval_fold.folded_conv(fused.conv1, fused.bn1, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            wbf, _ = eval_fold.folded_conv(fused.conv1, fused.bn1, x)
        wcl, _ = eval_fold.folded_conv(fused.conv1, fused.bn1,
                                       x.contiguous(memory_format=torch.channels_last))
    assert w32.dtype == torch.float32 and wbf.dtype == torch.bfloat16
    assert wcl.is_contiguous(memory_format=torch.channels_last) and w32.is_contiguous()


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_inference_mode_folds_once_into_ordinary_tensors(backend):
    """Under inference_mode the cached fold is an ordinary tensor (no gradient, a version
    counter for the caches that key on it: the Triton weight matrix, the cuDNN bias cast),
    reused by the next call; parameters made under inference_mode (no version counter) fold
    per call."""
    if not fused_res.available_backends()[backend].available:
        pytest.skip(f"{backend} is not available here")
    model, fused = _pair(backend)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
    with torch.inference_mode():
        got = fused(x)
        conv = fused.layer1[0].conv1
        w, b = eval_fold._CACHE[conv][2]
        again = fused(x)
        assert eval_fold._CACHE[conv][2][0] is w
    assert not w.is_inference() and not b.is_inference() and not w.requires_grad
    assert rel_err(got, want) <= 1e-5 and torch.equal(again, got)
    with torch.inference_mode():
        _, made_inside = _pair(backend)
        assert made_inside.layer1[0].conv1.weight.is_inference()
        assert rel_err(made_inside(x), want) <= 1e-5


def test_cudnn_bias_cast_takes_inference_tensors():
    from fused_res.backends.cudnn_backend import cast_cached
    with torch.inference_mode():
        t = torch.randn(5)
    out = cast_cached(t, torch.float16)
    assert out.dtype == torch.float16 and torch.equal(out, t.half())


def test_fold_reads_a_parametrized_weight_and_follows_it():
    """A conv whose weight is computed (torch.nn.utils.parametrize) has no 'weight' in its
    parameter dict: the fold reads the computed weight, and a change of the underlying
    parameter is a new fold."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        calls = 0

        def forward(self, w):
            Doubled.calls += 1
            return 2 * w

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6).eval()
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    parametrize.register_parametrization(conv, "weight", Doubled())
    assert "weight" not in conv._parameters
    unit = fused_res.nn.ConvBNAct2d.from_modules(conv, bn, "relu", backend="reference").eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        for _ in range(4):
            before = Doubled.calls
            y = unit(x)
            # Computed once per call, as eager does (spectral_norm's power iteration ran
            # twice per call, its buffers drifting from eager's).
            assert Doubled.calls - before == 1
            assert rel_err(y, torch.relu(bn(conv(x)))) <= 1e-6
            conv.parametrizations.weight.original.mul_(-1.5)  # in place: a new version


@pytest.mark.parametrize("fused_step", [True, False])
def test_fold_follows_an_optimizer_step_that_bumps_no_version_counter(fused_step):
    """torch.optim's fused optimizers write the parameters without bumping their version
    counters: fine-tuning with every BN frozen changed nothing else the fold keys on, and
    validation in eval ran the weights from before training (1e-1 to 5e0 off)."""
    model, fused = _pair()
    x = torch.randn(2, 3, 32, 32)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, fused=fused_step)
            for m in (model, fused)]
    for step in range(3):
        with torch.no_grad():
            assert rel_err(fused(x), model(x)) <= 1e-5, step
        for m, opt in zip((model, fused), opts, strict=True):
            m.train()
            for bn in m.modules():
                if isinstance(bn, nn.BatchNorm2d):
                    bn.eval()
            opt.zero_grad()
            m(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(step))
              ).logsumexp(1).mean().backward()
            opt.step()
            m.eval()
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5


def _small_unit():
    """A reference ConvBNAct2d in eval (conv 4 -> 6, 3x3), its BN, and an input."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6).eval()
    unit = fused_res.nn.ConvBNAct2d.from_modules(conv, bn, "relu", backend="reference").eval()
    return unit, bn, torch.randn(2, 4, 8, 8)


def test_fold_is_not_fooled_by_a_new_tensor_with_the_old_ones_storage_and_version():
    """A parameter replaced by another tensor with the same storage, version and dtype (what
    a tensor allocated at a freed one's address looks like: model.half().float(), a weight
    computed per call), holding other values: the cache must refold, not hand back the fold
    of the tensor it replaced (the key once held only storage, version and dtype)."""
    unit, bn, x = _small_unit()
    with torch.no_grad():
        unit(x)
        old = unit.conv.weight
        new = nn.Parameter(old.data)  # .data: the storage, with a version counter of its own
        old.data.neg_()  # other values, through an alias whose version counter is its own
        while new._version < old._version:
            new.add_(0)  # the same version number as well
        assert (new.data_ptr(), new._version, new.dtype) == (old.data_ptr(), old._version,
                                                            old.dtype)
        unit.conv.weight = new
        assert rel_err(unit(x), torch.relu(bn(unit.conv(x)))) <= 1e-6


def test_clear_forgets_a_write_the_version_counter_cannot_see():
    """A write through .data is invisible to the key (documented); clear() refolds."""
    unit, bn, x = _small_unit()
    with torch.no_grad():
        unit(x)
        unit.conv.weight.data.mul_(-2.0)
        eval_fold.clear()
        assert rel_err(unit(x), torch.relu(bn(unit.conv(x)))) <= 1e-6


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_fold_follows_a_train_step_without_parameter_changes(backend):
    if not fused_res.available_backends()[backend].available:
        pytest.skip(f"{backend} is not available here")
    from helpers import check_fold_follows_a_train_step_without_parameter_changes
    check_fold_follows_a_train_step_without_parameter_changes(backend)


def test_identity_check_sees_a_swapped_storage():
    """`p.data = t` keeps the Parameter object and its version but swaps its storage (what
    Module._apply does for model.half().float()); should the new storage land at the old
    address, only the storage's identity tells them apart."""
    p = nn.Parameter(torch.randn(5))
    refs = eval_fold._refs((p, None))
    assert eval_fold._same(refs, (p, None))
    version = p._version
    p.data = torch.randn(5)
    assert p._version == version and not eval_fold._same(refs, (p, None))


def test_a_preactivation_bns_affine_is_kept_and_follows_its_state():
    """eval_fold.affine: a pre-activation block's first BN in eval, kept per state of its
    statistics as the folds are (fresh constants, so the conv applying it can be planned),
    and computed anew after an in-place change, an eps change, an optimizer step, clear()."""
    from fused_res import nn as fnn
    from fused_res.backends.constants import is_constant
    from fused_res.nn.batchnorm import running_affine

    torch.manual_seed(0)
    block = randomize_bn(fnn.PreActBottleneck(16, 4, backend="reference")).eval()
    ref = copy.deepcopy(block)
    x = torch.randn(2, 16, 6, 6)
    bn = block.bn1
    with torch.no_grad():
        a = eval_fold.affine(bn, x)
        assert eval_fold.affine(bn, x) is a
        assert all(is_constant(t) for t in (a.center, a.scale, a.shift))
        assert a.center is not bn.running_mean and a.shift is not bn.bias

        def check():
            want = running_affine(bn, x)
            got = eval_fold.affine(bn, x)
            for u, v in ((got.center, want.center), (got.scale, want.scale),
                         (got.shift, want.shift)):
                assert torch.equal(u, v)
            return got

        for change in (lambda: bn.running_var.mul_(2.0), lambda: bn.weight.add_(0.5),
                       lambda: setattr(bn, "eps", 0.25)):
            change()
            assert check() is not a
            a = eval_fold.affine(bn, x)
        opt = torch.optim.SGD(block.parameters(), lr=0.1)
        opt.step()  # (no gradients: nothing moves, but a new generation)
        assert eval_fold.affine(bn, x) is not a
        a = eval_fold.affine(bn, x)
        eval_fold.clear()
        assert eval_fold.affine(bn, x) is not a
        for m in (block, ref):
            m.bn1.running_mean.add_(1.0)
        ref.bn1.eps = block.bn1.eps
        ref.bn1.weight.copy_(block.bn1.weight)
        ref.bn1.running_var.copy_(block.bn1.running_var)
        # The block computes with it exactly what it computes without the cache.
        saved = eval_fold.affine
        try:
            y = block(x)
            eval_fold.affine = lambda bn, h: running_affine(bn, h)
            assert torch.equal(y, ref(x))
        finally:
            eval_fold.affine = saved
