"""convert() never changes what a model computes: eval, a full train step, state, revert."""

import copy
import io
import pickle
import warnings

import pytest
import timm
import torch
import torchvision
from helpers import randomize_bn
from torch import nn

import fused_res
from fused_res import models
from fused_res.nn import hooks
from fused_res.testing import rel_err

TV = {n: (lambda n=n: getattr(torchvision.models, n)(num_classes=10))
      for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                "resnext50_32x4d")}
OURS = {f"ours_{n}": (lambda n=n: models.get_model(n, num_classes=10))
        for n in ("resnet18", "resnet50", "resnext50_32x4d")}
CIFAR = {
    f"cifar_{v}_{s}_{b}": (lambda v=v, s=s, b=b: models.cifar_resnet(
        8 if b == "basic" else 11, variant=v, shortcut=s, block=b, shortcut_scale=0.8))
    for v, s, b in [("original", "A", "basic"), ("original", "C", "bottleneck"),
                    ("plain", "A", "basic"), ("bn_after_add", "B", "basic"),
                    ("relu_before_add", "C", "basic"), ("relu_only_preact", "B", "bottleneck"),
                    ("full_preact", "A", "basic"), ("full_preact", "B", "bottleneck")]}
TIMM = {f"timm_{n}": (lambda n=n, kw=kw: timm.create_model(n, num_classes=10, **kw))
        for n, kw in [("resnet18", {}), ("resnet18d", {}), ("resnet26t", {}),
                      ("seresnet18", {}), ("ecaresnet26t", {}),
                      ("resnet34", {"drop_path_rate": 0.2}), ("resnetv2_18", {}),
                      ("resnetv2_50", {}), ("resnetv2_50d", {"drop_path_rate": 0.1})]}
ALL = {**TV, **OURS, **CIFAR, **TIMM}
BIG = {"resnet101", "resnet152", "wide_resnet50_2"}


def _pair(name, seed=0):
    torch.manual_seed(seed)
    model = randomize_bn(ALL[name](), seed)
    return model, fused_res.convert(model, backend="reference")


def _param_errors(a: nn.Module, b: nn.Module, attr=None):
    """Per-parameter relative errors with a floor of 1e-6 of the largest norm, so that
    gradients that are zero up to rounding (a bias followed by a BN) compare sensibly."""
    pa = [(n, getattr(p, attr) if attr else p) for n, p in a.named_parameters()]
    pb = [(n, getattr(p, attr) if attr else p) for n, p in b.named_parameters()]
    assert [n for n, _ in pa] == [n for n, _ in pb]
    floor = 1e-6 * max(t.double().norm() for _, t in pa)
    return {n: float((s - t).double().norm() / max(t.double().norm(), floor))
            for (n, s), (_, t) in zip(pb, pa, strict=True)}


def _train_steps(models_, x, steps=2):
    """SGD steps on every model with the same data and the same random draws; yields
    (step, outputs) with the gradients in place, before each optimizer step."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
            for m in models_]
    target = torch.randint(0, 10, (x.shape[0],))
    for m in models_:
        m.train()
    for step in range(steps):
        outs = []
        for m, opt in zip(models_, opts, strict=True):
            torch.manual_seed(100 + step)  # same drop_path draws in all
            opt.zero_grad()
            xm = x.to(next(m.parameters()).dtype)
            out = m(xm)
            nn.functional.cross_entropy(out, target).backward()
            outs.append(out.detach())
        yield step, outs
        for opt in opts:
            opt.step()


def _within_eager_error(fused_val, eager_val, truth, what):
    """fp32 training is ill-conditioned (BatchNorm over few values), so the fused model is held
    to PyTorch's own fp32 error against float64: at most twice it, plus 1e-6."""
    e_fused, e_eager = rel_err(fused_val, truth), rel_err(eager_val, truth)
    assert e_fused <= 2 * e_eager + 1e-6, (what, e_fused, e_eager)


def _assert_states_match(model, fused, tol):
    for (k, a), (_, b) in zip(model.state_dict().items(), fused.state_dict().items(),
                              strict=True):
        if a.dtype == torch.long:
            assert torch.equal(a, b), k
        else:
            assert rel_err(b, a) <= tol, k


@pytest.mark.parametrize("name", sorted(ALL))
def test_eval_and_train_step_match(name):
    model, fused = _pair(name)
    assert list(fused.state_dict()) == list(model.state_dict())
    assert sum(e.fused for e in fused_res.report(fused)) == len(fused_res.report(model)) > 0
    x = torch.randn(2 if name in BIG else 4, 3, 64, 64)
    model.eval()
    fused.eval()
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5

    # float32, one train step: outputs and running statistics against float64 truth, held to
    # PyTorch's own fp32 error. (fp32 gradients of these randomly initialised nets are
    # ill-conditioned: eager itself is off by up to 1e-2 against float64, so gradients are
    # compared in float64 below, where a wrong one cannot hide in rounding.)
    truth = copy.deepcopy(model).double()
    for _, (out_a, out_b, out_t) in _train_steps([model, fused, truth], x, steps=1):
        _within_eager_error(out_b, out_a, out_t, "train output")
    _within_eager_error(*(torch.cat([b.double().flatten() for b in m.buffers()])
                          for m in (fused, model, truth)), "running statistics")

    # float64: every gradient on its own (rounding no longer hides a wrong small one).
    model, fused = (m.double() for m in _pair(name))
    for step, (out_a, out_b) in _train_steps([model, fused], x.double()):
        assert rel_err(out_b, out_a) <= 1e-8, step
        errs = _param_errors(model, fused, "grad")
        worst = max(errs, key=errs.get)
        assert errs[worst] <= 1e-8, (step, worst, errs[worst])
    _assert_states_match(model, fused, 1e-8)

    reverted = fused_res.revert(fused)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        reverted.eval()
        model.eval()
        assert rel_err(reverted(x.double()), model(x.double())) <= 1e-8


def test_convert_leaves_the_input_model_alone_unless_inplace():
    model = models.resnet18()
    types = [type(m) for m in model.modules()]
    fused = fused_res.convert(model)
    assert [type(m) for m in model.modules()] == types
    assert fused is not model
    same = fused_res.convert(model, inplace=True)
    assert same is model and isinstance(model.layer1[0], fused_res.nn.FusedResidualBlock)
    again = fused_res.convert(model, inplace=True)  # idempotent
    assert [type(m) for m in again.modules()] == [type(m) for m in model.modules()]


def test_filter_and_unrecognised_modules():
    model = torchvision.models.resnet18()
    fused = fused_res.convert(model, filter=lambda name, m: name.startswith("layer1"))
    fused_names = [e.name for e in fused_res.report(fused) if e.fused]
    assert fused_names == ["layer1.0", "layer1.1"]
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    assert [type(m) for m in fused_res.convert(seq).modules()] == [type(m) for m in seq.modules()]
    with pytest.raises(ValueError, match="backend"):
        fused_res.convert(model, backend="tensorrt")
    with pytest.raises(TypeError, match="nn.Module"):
        fused_res.convert("resnet18")


def test_report_is_pinned_for_torchvision_resnet18():
    fused = fused_res.convert(torchvision.models.resnet18(), filter=lambda n, m: n != "layer4.1")
    assert fused_res.format_report(fused) == "\n".join([
        "conv1: stem conv -> bn1 -> relu fused, backend=auto",
        "layer1.0: torchvision.models.resnet.BasicBlock -> fused: original as BasicBlock, "
        "backend=auto, shortcut=identity",
        "layer1.1: torchvision.models.resnet.BasicBlock -> fused: original as BasicBlock, "
        "backend=auto, shortcut=identity",
        "layer2.0: torchvision.models.resnet.BasicBlock -> fused: original as BasicBlock, "
        "backend=auto, shortcut=fused conv+bn",
        "layer2.1: torchvision.models.resnet.BasicBlock -> fused: original as BasicBlock, "
        "backend=auto, shortcut=identity",
        "layer3.0: torchvision.models.resnet.BasicBlock -> fused: original as BasicBlock, "
        "backend=auto, shortcut=fused conv+bn",
        "layer3.1: torchvision.models.resnet.BasicBlock -> fused: original as BasicBlock, "
        "backend=auto, shortcut=identity",
        "layer4.0: torchvision.models.resnet.BasicBlock -> fused: original as BasicBlock, "
        "backend=auto, shortcut=fused conv+bn",
        "layer4.1: torchvision.models.resnet.BasicBlock -> unfused: recognised, not converted",
        "7/8 residual blocks fused",
    ])


def test_report_is_pinned_for_timm_resnetv2_and_seresnet():
    v2 = fused_res.convert(timm.create_model("resnetv2_18d", drop_path_rate=0.1),
                           backend="reference")
    lines = fused_res.format_report(v2).splitlines()
    # timm gives the first block a drop-path rate of 0 (an Identity): nothing to scale.
    assert lines[0] == ("stages.0.blocks.0: timm.models.resnetv2.PreActBasic -> fused: "
                        "full_preact as PreActBasicBlock, backend=reference, "
                        "shortcut=identity")
    assert lines[2] == ("stages.1.blocks.0: timm.models.resnetv2.PreActBasic -> fused: "
                        "full_preact as PreActBasicBlock, backend=reference, "
                        "shortcut=fused conv, drop_path")
    assert lines[-1] == "8/8 residual blocks fused"
    se = fused_res.convert(timm.create_model("seresnet18"))
    lines = fused_res.format_report(se).splitlines()
    assert lines[3] == (
        "layer2.0: timm.models.resnet.BasicBlock -> fused: original as BasicBlock, "
        "backend=auto, shortcut=fused conv+bn, se unfused")
    # The stem is listed too (it was not, though fused), and says when hooks unfuse it.
    assert lines[0] == "conv1: stem conv -> bn1 -> act1 fused, backend=auto"
    handle = se.bn1.register_forward_hook(lambda *args: None)
    assert fused_res.format_report(se).splitlines()[0] == (
        "conv1: stem conv -> bn1 -> act1 fused, backend=auto; running unfused while bn1 has "
        "hooks")
    handle.remove()


def test_sync_batchnorm_is_left_unfused_with_a_reason():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18())
    fused = fused_res.convert(model)
    entries = fused_res.report(fused)
    assert len(entries) == 8 and not any(e.fused for e in entries)
    assert all("SyncBatchNorm" in e.detail for e in entries)


def test_blocks_with_hooked_children_are_left_unfused():
    model = torchvision.models.resnet18()
    seen = []
    model.layer2[1].bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fused = fused_res.convert(model)
    entry = {e.name: e for e in fused_res.report(fused)}["layer2.1"]
    assert not entry.fused and "hooks on bn1" in entry.detail
    fused.eval()(torch.randn(1, 3, 32, 32))
    assert len(seen) == 1


def test_hooks_on_a_block_itself_fire_on_the_fused_block():
    """A converted block runs its own forward: hooks registered on the block (not on its
    children, which stay unfused) carry over, fire once per call, and their handles still
    remove them."""
    model = torchvision.models.resnet18(num_classes=10)
    block = model.layer1[0]
    seen = []
    handles = [block.register_forward_pre_hook(lambda m, i: seen.append("pre")),
               block.register_forward_hook(lambda m, i, o: seen.append("post")),
               block.register_full_backward_hook(lambda m, gi, go: seen.append("back"))]
    fused = fused_res.convert(model, backend="reference", inplace=True)
    entry = {e.name: e for e in fused_res.report(fused)}["layer1.0"]
    assert entry.fused
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    fused(x).sum().backward()
    assert seen == ["pre", "post", "back"], seen
    for h in handles:
        h.remove()
    seen.clear()
    fused(x).sum().backward()
    assert seen == []


def _f64_resnet18(seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10).double()
    randomize_bn(model)
    return model


def test_hooks_added_to_a_child_after_convert_fire_and_prune_trains_alike():
    """torch.nn.utils.prune (a forward pre-hook that recomputes the weight) and feature hooks
    on a child added after convert(): the fused block runs its original modules while they
    are there, with one warning. Before, the hooks never fired: the pruned weight stayed the
    one computed at pruning, and the second step failed (a backward through a freed graph)."""
    import warnings

    import torch.nn.utils.prune as prune

    from fused_res.nn import hooks
    base = _f64_resnet18()
    fused = fused_res.convert(base, backend="reference")
    seen = []
    handle = fused.layer1[0].conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    hooks._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        fused.eval()(x)
        fused(x)
    assert len(seen) == 2 and seen[0] == (2, 64, 8, 8)
    assert sum("hooks on conv2 (or an instance forward) in a fused BasicBlock"
               in str(w.message) for w in caught) == 1
    handle.remove()
    for m in (base, fused):
        prune.l1_unstructured(m.layer2[0].conv1, "weight", amount=0.5)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (base, fused)]
    # (4 x 64 x 64: layer4's BatchNorms see 16 values per channel; with 2 values at 32 x 32
    # a step amplifies float64 rounding ten-thousandfold, fused or not)
    x, target = torch.randn(4, 3, 64, 64, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    for _ in range(3):
        for m, opt in zip((base, fused), opts, strict=True):
            m.train()
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), target).backward()
            opt.step()
    with torch.no_grad():
        assert rel_err(fused.eval()(x), base.eval()(x)) < 1e-10
    entries = {e.name: e for e in fused_res.report(fused)}
    assert entries["layer1.0"].fused and "unfused" not in entries["layer1.0"].detail
    assert entries["layer2.0"].fused
    assert "running unfused while hooks on conv1" in entries["layer2.0"].detail


def test_a_fused_block_built_directly_says_its_childrens_hooks_do_not_fire():
    import warnings

    from fused_res.nn import hooks
    block = fused_res.nn.BasicBlock(8, 8, backend="reference")
    block.conv1.register_forward_hook(lambda m, i, o: None)
    hooks._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        block(torch.randn(2, 8, 6, 6))
    assert any("do not fire" in str(w.message) for w in caught)


@pytest.mark.parametrize("hooked", ["conv1", "bn1", "relu"])
def test_hooks_on_the_fused_stem_see_what_they_would_unfused(hooked):
    """A hook on the stem's conv1 saw relu(bn(conv)), one on bn1 or the ReLU its fused
    placeholder's input. While any of the three has hooks, conv1 computes the plain conv and
    bn1 and the ReLU apply themselves (one warning); without them the stem is fused again.
    No module is swapped: references held to them, a Sequential of the model's children and
    copies stay valid."""
    import warnings

    from fused_res.nn import hooks
    base = _f64_resnet18().eval()
    fused = fused_res.convert(base, backend="reference", filter=lambda n, m: False).eval()
    seen = {}
    handles = [getattr(m, hooked).register_forward_hook(
        lambda mod, i, o, k=k: seen.setdefault(k, o)) for k, m in (("fused", fused),
                                                                    ("ref", base))]
    # The torchvision feature-extractor idiom: the model's children in a Sequential.
    trunk = nn.Sequential(*list(fused.children())[:-2])
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    hooks._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        y, want = fused(x), base(x)
        feats = trunk(x)
    assert sum("fused stem" in str(w.message) for w in caught) == 1
    assert rel_err(y, want) < 1e-12 and rel_err(seen["fused"], seen["ref"]) < 1e-12
    with torch.no_grad():
        ref_trunk = nn.Sequential(*list(base.children())[:-2])
        assert rel_err(feats, ref_trunk(x)) < 1e-12
    assert type(fused.conv1).__name__ == "FusedStemConv"
    for h in handles:
        h.remove()
    with torch.no_grad():
        assert rel_err(fused(x), want) < 1e-12
    assert fused.conv1.__dict__["_state"].fused
    copied = pickle.loads(pickle.dumps(copy.deepcopy(fused)))
    with torch.no_grad():
        assert rel_err(copied(x), want) < 1e-12


def test_a_stem_whose_batchnorm_was_replaced_runs_unfused_from_the_first_call():
    """convert_sync_batchnorm after convert() puts a new SyncBatchNorm where the stem's bn1
    was: the stem sees it in its model before its next call and runs conv1 plain, the new
    BatchNorm and the ReLU as themselves, so that even the first call is eager's (it used to
    normalize twice on that call and only warn on the next). It warns once, the report says
    so, and a deepcopy and a pickle of the model keep seeing it. A model used as converted
    never warns."""
    import warnings

    from fused_res.nn import hooks
    base = _f64_resnet18().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    hooks._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        fused = fused_res.convert(base, backend="reference", filter=lambda n, m: False)
        fused.eval()(x)
        fused(x)
        assert not [w for w in caught if "fused stem" in str(w.message)]
        assert "running unfused" not in fused_res.format_report(fused)
        want = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base)).eval()(x)
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(fused).eval()
        assert rel_err(synced(x), want) < 1e-12
        assert rel_err(synced(x), want) < 1e-12
        for other in (copy.deepcopy(synced), pickle.loads(pickle.dumps(synced))):
            assert rel_err(other(x), want) < 1e-12
    told = [str(w.message) for w in caught if "fused stem" in str(w.message)]
    assert len(told) == 1 and "bn1 was replaced after convert()" in told[0], told
    assert "running unfused: bn1 was replaced" in fused_res.format_report(synced)


def test_a_pickled_model_keeps_its_stem_watching_and_a_pickled_stem_is_only_the_stem():
    """The stem holds its model weakly; a pickle of the model (torch.save) links the loaded
    stem to the loaded model, so a bn1 replaced after loading is seen on the first call too;
    a pickle of the stem alone carries no model (a review: it carried every weight of
    ResNet-50, then dropped the model on load)."""
    base = _f64_resnet18().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fused = fused_res.convert(base, backend="reference", filter=lambda n, m: False).eval()
    hooks_warned_clear()
    for loaded in (pickle.loads(pickle.dumps(fused)), copy.deepcopy(fused)):
        assert loaded.conv1.__dict__["_parent"]() is loaded
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(loaded).eval()
        want = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base)).eval()
        with pytest.warns(UserWarning, match="bn1 was replaced"), torch.no_grad():
            assert rel_err(synced(x), want(x)) < 1e-12
        hooks_warned_clear()
    replaced = copy.deepcopy(fused)
    replaced.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    fused_res.revert(replaced)  # (the link held the old stem alive and in every pickle)
    assert "_fused_res_stem_link" not in replaced.__dict__
    alone = pickle.dumps(fused.conv1)
    assert len(alone) < 2 * len(pickle.dumps(base.conv1)) + 4096
    assert pickle.loads(alone).__dict__["_parent"]() is None


def hooks_warned_clear():
    from fused_res.nn import hooks
    hooks._WARNED.clear()


def test_a_stem_whose_relu_was_replaced_runs_unfused():
    """A module put in the stem ReLU's place (here a GELU) is the model's activation from
    then on: the stem stops applying its ReLU rather than apply both."""
    base = _f64_resnet18().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fused = fused_res.convert(base, backend="reference", filter=lambda n, m: False).eval()
    base.relu = nn.GELU()
    fused.relu = nn.GELU()
    with pytest.warns(UserWarning, match="relu was replaced"), torch.no_grad():
        assert rel_err(fused(x), base(x)) < 1e-12


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("stem", ["grayscale", "cifar"])
def test_a_stem_whose_conv_was_replaced_applies_its_batchnorm_and_relu(stem, train):
    """The usual transfer-learning stem edit: a new conv1 after convert(). The stem's
    BatchNorm and ReLU apply themselves (they passed the new conv's output through: 1.1 off,
    no gradient for bn1, running statistics frozen); deep copies and pickles too; revert()
    puts plain modules back."""
    base = _f64_resnet18().train(train)
    fused = fused_res.convert(base, backend="reference").train(train)
    c_in = 1 if stem == "grayscale" else 3
    for m in (base, fused):
        torch.manual_seed(5)
        m.conv1 = nn.Conv2d(c_in, 64, 7 if stem == "grayscale" else 3, 2 if stem ==
                            "grayscale" else 1, 3 if stem == "grayscale" else 1,
                            bias=False).double()
    assert "conv1: the fused stem's conv was replaced" in fused_res.format_report(fused)
    x = torch.randn(4, c_in, 32, 32, dtype=torch.float64)
    for model in (fused, copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        ref = copy.deepcopy(base)
        hooks._WARNED.clear()
        with pytest.warns(UserWarning, match="conv1 was replaced"):
            y = model(x)
        want = ref(x)
        assert rel_err(y, want) < 1e-12
        if train:
            y.square().mean().backward()
            want.square().mean().backward()
            assert rel_err(model.bn1.weight.grad, ref.bn1.weight.grad) < 1e-10
            for k, v in ref.bn1.state_dict().items():
                assert rel_err(model.bn1.state_dict()[k].double(), v.double()) < 1e-12, k
    fused_res.revert(fused)
    assert type(fused.bn1) is nn.BatchNorm2d and type(fused.relu) is nn.ReLU


@pytest.mark.parametrize("train", [True, False])
def test_a_stem_whose_conv_was_wrapped_normalizes_once(train):
    """conv1 wrapped after convert() (an input adapter before it): the fused conv inside
    runs as a plain conv and bn1 and the ReLU apply themselves, once (both applied them:
    0.4-0.9 off)."""
    base = _f64_resnet18().train(train)
    fused = fused_res.convert(base, backend="reference").train(train)
    for m in (base, fused):
        torch.manual_seed(5)
        m.conv1 = nn.Sequential(nn.Conv2d(3, 3, 1).double(), m.conv1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.warns(UserWarning, match="no longer its model's conv1"):
        assert rel_err(fused(x), base(x)) < 1e-11
    # revert() puts a plain conv inside the wrapper too (the fused one stayed there: right
    # values, but torch.jit.script refused the model)
    fused_res.revert(fused)
    assert type(fused.conv1[1]) is nn.Conv2d and type(fused.bn1) is nn.BatchNorm2d
    assert not any(type(m).__module__.startswith("fused_res") for m in fused.modules())
    assert rel_err(fused(x), base(x)) < 1e-11


@pytest.mark.parametrize("train", [True, False])
def test_a_stem_conv_set_to_reflect_padding_runs_unfused(train):
    """conv1.padding_mode = 'reflect' after convert(): the stem runs its conv as a plain conv
    (which pads by reflection) and bn1 and the ReLU as themselves, with one warning, and
    report() says so (the fused stem padded with zeros, silently: 0.035 off)."""
    base = _f64_resnet18().train(train)
    fused = fused_res.convert(base, backend="reference").train(train)
    for m in (base, fused):
        m.conv1.padding_mode = "reflect"
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="conv1 was set to padding"):
        y = fused(x)
    want = ref(x)
    assert rel_err(y, want) < 1e-10  # (train, batch 2: layer4's 1x1 maps amplify rounding)
    if train:
        for k, v in ref.bn1.state_dict().items():
            assert rel_err(fused.bn1.state_dict()[k].double(), v.double()) < 1e-12, k
    assert ("running unfused: conv1 was set to padding (3, 3) with padding_mode 'reflect'"
            in fused_res.format_report(fused))


@pytest.mark.parametrize("train", [True, False])
def test_a_stem_moved_beside_a_new_conv_or_called_directly_normalizes(train):
    """The stem's BatchNorm and ReLU pass through only what their own fused conv returned:
    the model's children in a new Sequential with a new conv in front (the fused bn1 passed
    the new conv's output through silently, as did a direct call of bn1 or the ReLU) now
    compute as the plain modules, values, gradients and running statistics."""
    base = _f64_resnet18().train(train)
    fused = fused_res.convert(copy.deepcopy(base), backend="reference").train(train)
    trunks = [nn.Sequential(*list(m.children())[:-2]) for m in (fused, base)]
    for t in trunks:
        torch.manual_seed(5)
        t[0] = nn.Conv2d(3, 64, 3, 1, 1, bias=False).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got, want = (t(x) for t in trunks)
    # (train, batch 2: the BatchNorms of layer4's small maps amplify rounding; unfixed, O(1))
    assert rel_err(got, want) < 1e-10
    if train:
        got.square().mean().backward()
        want.square().mean().backward()
        assert rel_err(fused.bn1.weight.grad, base.bn1.weight.grad) < 1e-9
        assert rel_err(fused.bn1.running_var, base.bn1.running_var) < 1e-12
    t = torch.randn(2, 64, 5, 5, dtype=torch.float64)
    assert rel_err(fused.bn1(t), base.bn1(t)) < 1e-12
    assert torch.equal(fused.relu(t), base.relu(t))
    with torch.no_grad():  # (and the stem fused as before, in the model itself)
        fused.eval(), base.eval()
        assert rel_err(fused(x), base(x)) < 1e-12


@pytest.mark.parametrize("how", ["checkpoint", "checkpoint_reentrant", "checkpoint_offloaded",
                                 "global_hook_copy", "conv_compiled"])
def test_the_stems_output_under_another_tensor_object_is_still_passed_through(how):
    """bn1 and the ReLU get the fused conv's values as a new tensor object: a checkpointed
    segment from bn1 (its recompute's detached input; save_on_cpu's unpacked copy), conv1
    compiled in place (which records nothing). They pass it through as before (a global
    forward hook returning a copy now runs the stem unfused, with the same result): values,
    gradients and running statistics are those of the
    plain model run plainly (a review of the identity rule found the recompute normalizing
    twice; eager checkpointing bn1 would update its statistics twice, the fused conv once)."""
    import contextlib

    from torch.nn.modules.module import register_module_forward_hook
    from torch.utils.checkpoint import checkpoint

    base = _f64_resnet18().train()
    fused = fused_res.convert(copy.deepcopy(base), backend="reference").train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    if how == "conv_compiled":
        fused.conv1.compile(backend="eager")
    outs = []
    for m in (fused, base):
        handle = register_module_forward_hook(
            lambda mod, i, o, c=m.conv1: o.clone() if mod is c else None) \
            if how == "global_hook_copy" and m is fused else None
        ctx = (torch.autograd.graph.save_on_cpu() if how == "checkpoint_offloaded"
               and m is fused else contextlib.nullcontext())
        with ctx:
            h = m.conv1(x)
            if how.startswith("checkpoint") and m is fused:
                h = checkpoint(nn.Sequential(m.bn1, m.relu), h,
                               use_reentrant=how == "checkpoint_reentrant")
            else:
                h = m.relu(m.bn1(h))
            for name in ("maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"):
                h = getattr(m, name)(h)
            out = m.fc(h.flatten(1))
            out.square().mean().backward()
        if handle is not None:
            handle.remove()
        outs.append(out)
    assert rel_err(*outs) < 1e-10
    for get in (lambda m: m.conv1.weight.grad, lambda m: m.bn1.weight.grad,
                lambda m: m.bn1.running_var):
        assert rel_err(get(fused), get(base)) < 1e-9


def test_a_fused_stem_conv_put_in_another_converted_model_is_refused_by_name():
    """model_b.conv1 = model_a.conv1 between two converted models: the conv applies model a's
    bn1 and ReLU, so model b's could only normalize again. It said nothing and ran 0.18 off
    (then warned late that bn1 had not run); now model b's bn1 raises, naming the fix, which
    computes as eager does."""
    base_a, base_b = _f64_resnet18(0).eval(), _f64_resnet18(1).eval()
    fa = fused_res.convert(base_a, backend="reference").eval()
    fb = fused_res.convert(base_b, backend="reference").eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    fb.conv1 = fa.conv1
    with pytest.raises(RuntimeError, match=r"another stem's fused conv .*model_a\.conv1\.as_conv"):
        fb(x)
    fb.conv1 = fa.conv1.as_conv()
    want = copy.deepcopy(base_b)
    want.conv1 = base_a.conv1
    hooks_warned_clear()
    with torch.no_grad(), pytest.warns(UserWarning, match="conv1 was replaced"):
        assert rel_err(fb(x), want(x)) < 1e-12
        assert rel_err(fa(x), base_a(x)) < 1e-12


def test_a_stem_copied_alone_knows_no_model():
    """A deepcopy of the stem conv alone holds no model (not the original's, whose bn1 it
    would then find replaced by nothing it knows): it computes conv -> BN -> ReLU as
    before."""
    base = _f64_resnet18().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fused = fused_res.convert(base, backend="reference", filter=lambda n, m: False).eval()
    alone = copy.deepcopy(fused.conv1)
    assert alone.replaced() is None
    with torch.no_grad():
        assert rel_err(alone(x), base.relu(base.bn1(base.conv1(x)))) < 1e-12


def test_a_stem_conv_checkpointed_alone_says_what_the_recompute_did():
    """torch.utils.checkpoint recomputes a checkpointed conv1 in the backward, and the fused
    conv applies bn1, so the recompute updates bn1's running statistics again: as eager does
    with bn1 inside the segment (the same statistics), unlike eager with conv1 checkpointed
    alone. The stem says so, and not that bn1 was replaced (a probe; a first fix only
    silenced that warning)."""
    import warnings

    from torch.utils.checkpoint import checkpoint

    from fused_res.nn import hooks

    def run(m, segment, reentrant):
        h = x.requires_grad_(reentrant)
        h = checkpoint(nn.Sequential(*[getattr(m, n) for n in segment]), h,
                       use_reentrant=reentrant)
        rest = [n for n in ("conv1", "bn1", "relu") if n not in segment]
        for name in [*rest, "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]:
            h = getattr(m, name)(h)
        out = m.fc(h.flatten(1))
        out.sum().backward()
        return out

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for segment, same_stats in ((("conv1", "bn1", "relu"), True), (("conv1",), False)):
        base = _f64_resnet18().train()
        fused = fused_res.convert(copy.deepcopy(base), backend="reference").train()
        hooks._WARNED.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for reentrant in (False, True, False):
                assert rel_err(run(fused, segment, reentrant),
                               run(base, segment, reentrant)) < 1e-10
        told = [str(w.message) for w in caught if "fused stem" in str(w.message)]
        assert not [t for t in told if "replaced" in t], told
        assert [t for t in told if "recomputed" in t], (segment, told)
        # (float64, but a BatchNorm over 2 values per channel in layer4 amplifies rounding)
        assert rel_err(fused.conv1.weight.grad, base.conv1.weight.grad) < 1e-8
        if same_stats:
            assert torch.equal(fused.bn1.num_batches_tracked, base.bn1.num_batches_tracked)
            assert rel_err(fused.bn1.running_var, base.bn1.running_var) < 1e-10


def test_revert_after_convert_sync_batchnorm():
    """The blocks' error names revert() as the way out of a SyncBatchNorm conversion: it
    raised AttributeError on the stem's SyncBatchNorm."""
    base = _f64_resnet18().eval()
    model = nn.SyncBatchNorm.convert_sync_batchnorm(fused_res.convert(base)).eval()
    fused_res.revert(model)
    ref = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base)).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) < 1e-12
    assert type(model.bn1) is nn.SyncBatchNorm and type(model.relu) is nn.ReLU


def test_a_subclass_of_a_recognised_block_is_left_alone_and_reported():
    class Plain(models.BasicBlock):
        pass
    model = nn.Sequential(Plain(16, 16)).eval()
    x = torch.randn(2, 16, 8, 8)
    fused = fused_res.convert(model, backend="reference")
    (entry,) = fused_res.report(fused)
    assert not entry.fused and "subclass of" in entry.detail and "Plain" in entry.block_type
    assert type(fused[0]) is Plain and torch.equal(fused(x), model(x))


def test_convert_filter_must_be_callable():
    with pytest.raises(TypeError, match="filter=3"):
        fused_res.convert(models.resnet18(), filter=3)


def test_unsupported_activation_is_left_unfused():
    model = timm.create_model("resnet18", act_layer=nn.SiLU)
    entries = fused_res.report(fused_res.convert(model))
    assert not any(e.fused for e in entries) and "SiLU" in entries[0].detail


def test_deepcopy_pickle_and_lesion_of_a_converted_model():
    model, fused = _pair("resnet18")
    model.eval()
    fused.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert rel_err(clone(x), ref) <= 1e-5
            clone_block = clone.layer1[0]
            assert clone_block.original().conv1 is clone_block.conv1  # sharing survives
        buf = io.BytesIO()
        torch.save(fused.state_dict(), buf)
        buf.seek(0)
        fresh = torchvision.models.resnet18(num_classes=10)
        fresh.load_state_dict(torch.load(buf))
        assert rel_err(fresh.eval()(x), ref) <= 1e-5
        with fused_res.lesion(model, drop=[3]):
            a = model(x)
        with fused_res.lesion(fused, drop=[3]):
            b = fused(x)
        assert rel_err(b, a) <= 1e-5 and rel_err(a, ref) > 1e-3


@pytest.mark.parametrize("train", [False, True])
def test_converted_model_compiles_without_graph_breaks(train):
    model, fused = _pair("cifar_full_preact_B_bottleneck")
    model.train(train)
    fused.train(train)
    x = torch.randn(4, 3, 16, 16)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    assert rel_err(y, model(x)) <= 1e-5
    y.sum().backward()
    assert all(p.grad is not None for p in fused.parameters())


def test_a_model_whose_backend_falls_back_compiles_fullgraph_before_any_eager_call():
    """A probe: the fallback's warning (float64 on the cuda backend) raised inside dynamo's
    trace, so torch.compile(fullgraph=True) failed, every time, until an eager call had
    warned; inside a compiled checkpoint the write to the warned set failed it too. The
    trace now warns nothing; the eager call still warns once."""
    from torch.utils.checkpoint import checkpoint

    from fused_res.backends import registry

    torch.manual_seed(0)
    model = randomize_bn(models.resnet20()).double()
    fused = fused_res.convert(model, backend="cuda")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    registry._warned.clear()
    torch._dynamo.reset()
    for m in (model, fused):
        m.eval()
    with torch.no_grad():
        assert rel_err(torch.compile(fused, backend="eager", fullgraph=True)(x),
                       model(x)) < 1e-12
    for m in (model, fused):
        m.train()
    torch._dynamo.reset()
    y = torch.compile(lambda t: checkpoint(fused, t, use_reentrant=False), backend="aot_eager",
                      fullgraph=True)(x)
    assert rel_err(y, model(x)) < 1e-10
    fused.eval()
    with pytest.warns(UserWarning, match="backend 'cuda' .*using the reference backend"):
        fused(x)


def test_converted_model_compiles_with_inductor():
    model, fused = _pair("cifar_original_A_basic")
    model.eval()
    fused.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(torch.compile(fused, fullgraph=True)(x), model(x)) <= 1e-5


@pytest.mark.parametrize("name", ["resnet18", "timm_resnetv2_18"])
def test_autocast_matches_the_unconverted_model(name):
    model, fused = _pair(name)
    truth = copy.deepcopy(model).double()
    x = torch.randn(4, 3, 64, 64)
    for train in (False, True):
        for m in (model, fused, truth):
            m.train(train)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = model(x), fused(x)
        assert a.dtype == b.dtype == torch.bfloat16
        ref = truth(x.double())
        # bf16 budget of DESIGN.md §4, or PyTorch's own bf16 error where training is worse
        # conditioned than that (BatchNorm over few values).
        assert rel_err(b, ref) <= max(2e-2, 2 * rel_err(a, ref)), train
    for bn_a, bn_b in zip(model.buffers(), fused.buffers(), strict=True):
        assert bn_a.dtype == bn_b.dtype


def test_the_model_functions_refuse_what_is_not_a_model_or_a_flag():
    """Probes: revert/report/format_report/residual_blocks(None) raised AttributeError deep
    inside, and convert(m, inplace="no") converted the caller's own model (a truthy
    string)."""
    for fn in (fused_res.revert, fused_res.report, fused_res.format_report,
               models.residual_blocks):
        with pytest.raises(TypeError, match="model must be an nn.Module; got NoneType"):
            fn(None)
    m = models.resnet18()
    for kwargs in (dict(inplace="no"), dict(stem="no")):
        with pytest.raises(TypeError, match=f"{next(iter(kwargs))}='no'; accepted: True"):
            fused_res.convert(m, **kwargs)
    with pytest.raises(TypeError, match="inplace=1; accepted"):
        fused_res.revert(m, inplace=1)


def test_model_level_bad_input():
    fused = fused_res.convert(models.resnet18())
    with pytest.raises(TypeError, match="dtype"):
        fused.layer1(torch.randn(2, 64, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="channels"):
        fused.layer1(torch.randn(2, 3, 8, 8))


def test_float64_model_and_channels_last_input():
    model, fused = _pair("resnet18")
    model.double().eval()
    fused.double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).to(memory_format=torch.channels_last)
    with torch.no_grad():
        feats = fused.layer1(fused.maxpool(fused.relu(fused.bn1(fused.conv1(x)))))
        assert feats.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(fused(x), model(x)) < 1e-12


@pytest.mark.parametrize("name,fused_stem", [("ours_resnet18", True), ("resnet18", True),
                                             ("timm_resnet18", True), ("timm_resnet18d", False),
                                             ("cifar_original_A_basic", False)])
def test_the_stem_is_fused_in_place_of_its_modules(name, fused_stem):
    """conv1 -> bn1 -> ReLU becomes one fused conv unit under the same state_dict keys (bn1
    passes its already-applied input through); a deep stem (an nn.Sequential conv1) and
    stem=False stay as they are; revert restores the plain modules. (Values, gradients and
    running statistics: test_eval_and_train_step_match, which converts the stems too.)"""
    from fused_res.nn.stem import AppliedBatchNorm2d, FusedStemConv
    model, fused = _pair(name)
    assert isinstance(getattr(fused, "conv1", None), FusedStemConv) == fused_stem
    assert list(fused.state_dict()) == list(model.state_dict())
    if fused_stem:
        assert type(fused.bn1) is AppliedBatchNorm2d
        assert fused.conv1.__dict__["_norm"] is fused.bn1
        copied = copy.deepcopy(fused)
        assert copied.conv1.__dict__["_norm"] is copied.bn1
        restored = pickle.loads(pickle.dumps(fused))
        assert restored.conv1.__dict__["_norm"] is restored.bn1
        fused.eval()  # reaches the BatchNorm the stem uses
        assert not fused.conv1.__dict__["_norm"].training
        reverted = fused_res.revert(copy.deepcopy(fused))
        assert type(reverted.conv1) is nn.Conv2d and type(reverted.bn1) is nn.BatchNorm2d
    plain = fused_res.convert(model, backend="reference", stem=False)
    assert not isinstance(getattr(plain, "conv1", None), FusedStemConv)


def test_a_stem_with_hooks_is_left_alone():
    from fused_res.nn.stem import FusedStemConv
    model = models.resnet18()
    model.bn1.register_forward_hook(lambda m, i, o: None)
    assert not isinstance(fused_res.convert(model).conv1, FusedStemConv)


@pytest.mark.parametrize("cache", ["missing", "present"])
def test_default_backend_model_compiles_fullgraph_on_its_first_call(cache, tmp_path,
                                                                      monkeypatch):
    """convert()'s default backend, 'auto', reads its cache of measured winners from a file,
    which dynamo cannot trace: convert() reads it in eager code, so the first call may be the
    one torch.compile traces (failed with "Failed to trace builtin operator open" before)."""
    import json

    from fused_res.backends import auto

    path = tmp_path / "auto.json"
    if cache == "present":
        path.write_text(json.dumps({"cpu|conv_unit|float32|nchw|x=1|()": {"backend":
                                                                          "reference"}}))
    monkeypatch.setenv("FUSED_RES_AUTO_CACHE", str(path))
    auto.reset()
    try:
        torch.manual_seed(0)
        model = models.cifar_resnet(8)
        fused = fused_res.convert(model)
        x = torch.randn(2, 3, 16, 16)
        for train in (True, False):
            model.train(train)
            fused.train(train)
            torch._dynamo.reset()
            y = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
            assert rel_err(y, model(x)) <= 1e-5
    finally:
        auto.reset()


def test_a_model_with_nothing_to_fuse_says_so():
    """A family convert() does not know (here a plain conv stack, as timm's byobnet or regnet
    are to it) comes back computing as before, and convert says so once per call rather than
    let the caller take it for fused; a recognised model, a model already converted and a
    filtered call do not warn."""
    import warnings

    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.warns(UserWarning, match="nothing in this Sequential was fused"):
        out = fused_res.convert(plain)
    assert type(out[0]) is nn.Conv2d
    import fused_res.nn as fnn
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (built of fused_res's own units: nothing to say)
        fused_res.convert(nn.Sequential(fnn.ConvBNAct2d(3, 8), fnn.ConvBNAct2d(8, 8)))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18())
    with pytest.warns(UserWarning, match="its 8 recognised residual blocks cannot be"):
        fused_res.convert(synced)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fused_res.convert(torchvision.models.resnet18(), backend="reference")
        fused_res.convert(fused, backend="reference")
        fused_res.convert(torchvision.models.resnet18(), backend="reference",
                          filter=lambda n, m: False, stem=False)


def test_blocks_whose_convs_pad_by_name_are_fused_and_compute_the_same():
    """nn.Conv2d's padding='same' (odd span) and 'valid' are zero paddings the ops can take:
    convert() fuses such blocks (it left them unfused, shortcut convs included); 'same' of an
    even span pads one side more and stays unfused, saying so."""
    def named(conv, padding):
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                        padding, bias=False)
        new.weight = conv.weight
        return new

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18()).double()
    for layer in (model.layer1, model.layer3):
        layer[1].conv1 = named(layer[1].conv1, "same")
    model.layer3[0].downsample[0] = named(model.layer3[0].downsample[0], "valid")
    fused = fused_res.convert(model, backend="reference")
    assert "unfused" not in fused_res.format_report(fused), fused_res.format_report(fused)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    model.eval(), fused.eval()
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) < 1e-12
    for _, outs in _train_steps([model, fused], x):
        assert rel_err(outs[1], outs[0]) < 1e-10
        assert max(_param_errors(model, fused, "grad").values()) < 1e-9
    _assert_states_match(model, fused, 1e-10)
    model.layer2[1].conv2 = nn.Conv2d(128, 128, 2, padding="same", bias=False)
    report = fused_res.format_report(fused_res.convert(model, backend="reference"))
    assert "layer2.1: torchvision.models.resnet.BasicBlock -> unfused: padding 'same' with " \
        "kernel_size (2, 2) and dilation (1, 1) pads one side more" in report, report


@pytest.mark.parametrize("name", ["resnet18", "resnet26t", "resnetv2_18", "resnetv2_50"])
def test_timm_init_weights_reaches_the_fused_blocks_zero_init_last(name):
    """timm's init_weights(zero_init_last=True) calls zero_init_last() on every module that
    has one; a fused block answers for its original (it skipped them without a word)."""
    model = randomize_bn(timm.create_model(name, num_classes=10))
    fused = fused_res.convert(model, backend="reference")
    for m in (model, fused):
        torch.manual_seed(3)
        m.init_weights(zero_init_last=True)
    ref, got = model.state_dict(), fused.state_dict()
    assert list(got) == list(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    blocks = [m for m in fused.modules() if isinstance(m, fused_res.nn.FusedResidualBlock)]
    last = {"resnet18": "bn2", "resnet26t": "bn3", "resnetv2_18": "conv2",
            "resnetv2_50": "conv3"}[name]
    assert blocks and all(not b.get_submodule(last).weight.any() for b in blocks)
    with pytest.raises(AttributeError, match="no_such_method"):
        blocks[0].no_such_method  # noqa: B018


def test_a_method_of_the_original_that_replaces_a_child_replaces_the_fused_blocks(
        monkeypatch):
    """A delegated method runs on the original; a child or attribute it assigns is the fused
    block's too (the fused block kept running the old child, and the next original() call
    undid the new one)."""
    def reset_last_norm(self):
        self.bn2 = nn.BatchNorm2d(self.bn2.num_features)
        nn.init.zeros_(self.bn2.weight)
        self.tag = "reset"
    monkeypatch.setattr(torchvision.models.resnet.BasicBlock, "reset_last_norm",
                        reset_last_norm, raising=False)
    model, fused = _pair("resnet18")
    model.eval()
    fused.eval()
    for m in (model, fused):
        m.layer1[0].reset_last_norm()
    block = fused.layer1[0]
    assert block.tag == "reset" and not block.bn2.weight.any()
    assert block.original().bn2 is block.bn2
    assert not fused.state_dict()["layer1.0.bn2.weight"].any()
    x = torch.randn(2, 3, 32, 32)
    assert rel_err(fused(x), model(x)) <= 1e-5


class _LoRAConv2d(nn.Conv2d):
    """A conv with a low-rank update of its own forward (as LoRA libraries do)."""

    def __init__(self, conv: nn.Conv2d, rank: int = 2) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                         conv.padding, bias=False)
        self.weight = conv.weight
        self.down = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride,
                              conv.padding, bias=False)
        self.up = nn.Conv2d(rank, conv.out_channels, 1, bias=False)

    def forward(self, x):
        return super().forward(x) + self.up(self.down(x))


def _frozen_model(source: str) -> nn.Module:
    """A ResNet whose BatchNorms are frozen ones with random buffers, float64."""
    torch.manual_seed(0)
    if source == "torchvision":  # (a detection backbone's norm layer)
        model = torchvision.models.resnet18(
            num_classes=10, norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)
    elif source == "cifar_preact":  # (pre-activation: the block's first norm on its input)
        model = models.CifarResNet(14, variant="full_preact", shortcut="B",
                                   norm_layer=torchvision.ops.misc.FrozenBatchNorm2d)
    else:  # timm's freeze(): BatchNorm2d -> FrozenBatchNorm2d, BatchNormAct2d (ResNetV2's,
        # pre-activation) -> FrozenBatchNormAct2d
        model = timm.layers.freeze_batch_norm_2d(timm.create_model(
            "resnet18" if source == "timm" else "resnetv2_18", num_classes=10))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_var") and m.running_var is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.double()


@pytest.mark.parametrize("source", ["torchvision", "timm", "timm_v2", "cifar_preact"])
def test_frozen_batchnorms_are_fused_as_the_eval_batchnorms_they_are(source):
    """torchvision's FrozenBatchNorm2d (its detection backbones) and timm's freeze() left
    every block unfused. A frozen BatchNorm normalizes with its buffers in training too: the
    blocks are fused with it applied as an eval-mode BatchNorm (folded, or in the conv's
    epilogue), values and gradients those of the model, its buffers never updated. The stem
    with a frozen bn1 stays as it was (its fused form stands in for a BatchNorm2d)."""
    model = _frozen_model(source)
    fused = fused_res.convert(copy.deepcopy(model), backend="reference")
    n = 6 if source == "cifar_preact" else 8
    assert fused_res.format_report(fused).endswith(f"{n}/{n} residual blocks fused")
    assert not any(type(m).__name__ == "FusedStemConv" for m in fused.modules())
    frozen = {type(m).__name__ for m in fused.modules() if "Frozen" in type(m).__name__}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert frozen == {"FrozenBatchNormAct2d" if source == "timm_v2" else "FrozenBatchNorm2d"}
    buffers = [b.clone() for b in fused.buffers()]
    for train in (True, False):
        model.train(train)
        fused.train(train)
        xa, xb = (x.clone().requires_grad_() for _ in range(2))
        want, y = model(xa), fused(xb)
        assert rel_err(y, want) < 1e-12
        want.square().mean().backward()
        y.square().mean().backward()
        assert rel_err(xb.grad, xa.grad) < 1e-12
        errs = _param_errors(model, fused, "grad")
        assert max(errs.values()) < 1e-10, max(errs, key=errs.get)
        model.zero_grad()
        fused.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(buffers, fused.buffers(), strict=True))
    with torch.no_grad():  # (inference: the fold)
        assert rel_err(fused.eval()(x), model.eval()(x)) < 1e-12


def test_a_frozen_batchnorms_block_under_autocast_returns_what_the_original_does():
    """Under autocast torchvision's FrozenBatchNorm2d returns float32 (its float32 buffers
    promote the conv's bf16 output), so the original blocks do; the fused ones now return
    float32 too (they returned bf16: a float32 layer after them outside autocast failed),
    within bf16's tolerance of the original."""
    model = _frozen_model("torchvision").float().eval()
    fused = fused_res.convert(copy.deepcopy(model), backend="reference").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for name in ("layer1", "layer2"):
            h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            want, got = model.layer1(h), fused.layer1(h)
            if name == "layer2":
                want, got = model.layer2(want), fused.layer2(want)
            assert got.dtype == want.dtype == torch.float32
            assert rel_err(got, want) < 2e-2
        assert fused(x).dtype == model(x).dtype
        assert rel_err(fused(x), model(x)) < 3e-2


def _reflect(conv: nn.Conv2d) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, bias=False, padding_mode="reflect")
    new.weight = conv.weight
    return new


_SURGERY = {
    "relu_to_gelu": lambda b: setattr(b, "relu", nn.GELU()),
    "reflect_padded_conv": lambda b: setattr(b, "conv1", _reflect(b.conv1)),
    "reflect_in_place": lambda b: setattr(b.conv2, "padding_mode", "reflect"),
    "lora_conv": lambda b: setattr(b, "conv2", _LoRAConv2d(b.conv2)),
    "groupnorm": lambda b: setattr(b, "bn1", nn.GroupNorm(4, b.bn1.num_features)),
    "frozen_bn": lambda b: setattr(b, "bn2", torchvision.ops.misc.FrozenBatchNorm2d(
        b.bn2.num_features)),
    "shortcut_appended": lambda b: b.downsample.append(nn.Dropout(0.0)),
    "projection_on_identity": lambda b: setattr(b, "downsample", nn.Sequential(
        nn.Conv2d(b.bn2.num_features, b.bn2.num_features, 1, bias=False),
        nn.BatchNorm2d(b.bn2.num_features))),
}


@pytest.mark.parametrize("surgery", sorted(_SURGERY))
def test_a_child_replaced_after_convert_by_what_the_block_cannot_compute(surgery):
    """The block runs its original forward, which calls the new child, with one warning
    naming it, and report() says so (the fused block computed the old child: a GELU as a
    ReLU, a reflect-padded or LoRA conv as a plain one, a GroupNorm's or an appended shortcut
    module's work dropped; 0.05 to 0.7 off)."""
    model, fused = _pair("resnet18")
    name = "layer2.0" if surgery == "shortcut_appended" else "layer1.1"
    for m in (model, fused):
        torch.manual_seed(7)
        _SURGERY[surgery](m.get_submodule(name))
        m.double()  # (batch 2 at 1x1 in layer4: float32 rounding is amplified there)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        fused.train(train)
        hooks._WARNED.clear()
        with pytest.warns(UserWarning, match="runs its original forward, unfused"):
            y = fused(x)
        want = model(x)
        assert rel_err(y, want) <= 1e-10
        if train:
            y.square().mean().backward()
            want.square().mean().backward()
            errs = _param_errors(model, fused, "grad")
            assert max(errs.values()) <= 1e-8, max(errs, key=errs.get)
    assert fused_res.format_report(fused).endswith(
        "8/8 residual blocks fused, 1 of them running unfused now")
    line = next(e for e in fused_res.report(fused) if e.name == name)
    want = {"shortcut_appended": "downsample.2 was added",
            "projection_on_identity": "downsample was added",
            "reflect_in_place": "conv2 was set to padding (1, 1) with padding_mode 'reflect'"
            }.get(surgery, "was replaced by")
    assert "running unfused: " in line.detail and want in line.detail


def _train_then_eval(model, fused):
    """Yields (x, model's output) in train, then in eval (float64), fused set alike and the
    seed reset for its call (drop paths draw)."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        fused.train(train)
        torch.manual_seed(4)
        want = model(x)
        torch.manual_seed(4)
        yield x, want


def _assert_still_fused_and_equal(model, fused):
    """fused computes as model in train and eval, without a warning, and report() says
    nothing runs unfused."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, want in _train_then_eval(model, fused):
            assert rel_err(fused(x), want) <= 1e-10
    assert "running unfused" not in fused_res.format_report(fused)


def test_a_child_replaced_like_for_like_keeps_the_block_fused():
    """A fresh BatchNorm2d or plain conv in a child's place (a re-initialisation) is
    computed fused, without a warning: the block reads each child's parameters per call."""
    model, fused = _pair("resnet18")
    for m in (model, fused):
        torch.manual_seed(7)
        block = m.layer1[0]
        block.bn2 = randomize_bn(nn.BatchNorm2d(64), seed=3)
        block.conv1 = nn.Conv2d(64, 64, 3, 1, 1, bias=False)
        m.double()
    _assert_still_fused_and_equal(model, fused)


def test_a_conv_parametrized_after_convert_keeps_the_block_fused():
    """weight_norm / spectral_norm add a `parametrizations` container under the conv: how
    its weight is computed, which the fused ops read; not a change of what the block
    computes (the layout check first took it for an added module and ran unfused)."""
    from torch.nn.utils import parametrizations
    model, fused = _pair("resnet18")
    for m in (model, fused):
        parametrizations.weight_norm(m.layer1[0].conv1)
        m.eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            assert rel_err(fused(x), model(x)) <= 1e-5
    assert "running unfused" not in fused_res.format_report(fused)


@pytest.mark.parametrize("change", ["se_inner_act", "se_removed", "weight_normed_conv"])
def test_changes_the_fused_block_computes_as_they_are_keep_it_fused(change):
    """The block calls its attention module itself, so its replacement is computed as it
    is; a conv replaced by a weight-normed one is a plain conv to the ops. All stay fused,
    without a warning (the layout check first ran such blocks unfused)."""
    from torch.nn.utils import parametrizations
    make = "resnet18" if change == "weight_normed_conv" else "seresnet18"
    model = randomize_bn(timm.create_model(make, num_classes=10))
    fused = fused_res.convert(model, backend="reference")
    for m in (model, fused):
        torch.manual_seed(2)
        block = m.layer2[1]
        if change == "se_inner_act":
            block.se.act = nn.SiLU()
        elif change == "se_removed":
            block.se = nn.Identity()
        else:
            block.conv2 = parametrizations.weight_norm(nn.Conv2d(128, 128, 3, 1, 1, bias=False))
        m.double()
    _assert_still_fused_and_equal(model, fused)


def test_a_subclass_of_a_built_block_may_add_modules_after_the_constructor():
    class Gated(fused_res.nn.BasicBlock):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.gate = nn.Identity()

    block = Gated(8, 8, backend="reference")
    x = torch.randn(2, 8, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block(x)


def _surgery_case(make, name, change):
    """(model, fused) in float64 after the same change to block `name` of both."""
    model = randomize_bn(make())
    fused = fused_res.convert(model, backend="reference")
    for m in (model, fused):
        torch.manual_seed(2)
        change(m.get_submodule(name))
        m.double()
    return model, fused


class _ChannelScale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


@pytest.mark.parametrize("case", ["preact_option_a_wrapped", "drop_path_to_layer_scale",
                                  "se_set_to_none", "drop_path_set_to_none",
                                  "shortcut_scale_with_a_misfit"])
def test_slot_changes_the_plan_depends_on_run_the_original(case):
    """Changes the fused forward would get wrong or crash on: a full-preact option-A
    shortcut wrapped in a Sequential (which makes it read the pre-activation: 0.51 off), a
    drop path replaced by a per-channel scale (0.24 off), an SE or drop path set to None
    (AttributeError), a shortcut_scale set on the block before it falls back (the original
    kept the old one: 0.08 off)."""
    if case == "preact_option_a_wrapped":
        model, fused = _surgery_case(
            lambda: models.cifar_resnet(20, variant="full_preact", shortcut="A"), "layer2.0",
            lambda b: setattr(b, "downsample", nn.Sequential(b.downsample)))
    elif case == "drop_path_to_layer_scale":
        model, fused = _surgery_case(
            lambda: timm.create_model("resnet18", num_classes=10, drop_path_rate=0.1),
            "layer2.1", lambda b: setattr(b, "drop_path", _ChannelScale(128)))
    elif case == "se_set_to_none":
        model, fused = _surgery_case(lambda: timm.create_model("seresnet18", num_classes=10),
                                     "layer1.0", lambda b: setattr(b, "se", None))
    elif case == "drop_path_set_to_none":
        model, fused = _surgery_case(
            lambda: timm.create_model("resnet18", num_classes=10, drop_path_rate=0.1),
            "layer2.0", lambda b: setattr(b, "drop_path", None))
    else:
        def change(b):
            b.shortcut_scale = 0.5
            b.conv2 = nn.Conv2d(16, 16, 3, 1, 1, bias=False, padding_mode="circular")
        model, fused = _surgery_case(lambda: models.cifar_resnet(20), "layer1.1", change)
    for x, want in _train_then_eval(model, fused):
        hooks._WARNED.clear()
        with pytest.warns(UserWarning, match="runs its original forward"):
            y = fused(x)
        assert rel_err(y, want) <= 1e-10


def test_a_block_pickled_before_layouts_is_held_to_its_original_children():
    """A block without the layout keys (pickled by an earlier version) takes the children
    its original holds as the baseline, not whatever it holds at its first call."""
    model, fused = _pair("resnet18")
    block = fused.layer1[0]
    for key in ("_layout", "_layout_named", "_layout_skip"):
        block.__dict__.pop(key)
    block.relu = nn.GELU()
    model.layer1[0].relu = nn.GELU()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="relu was replaced by GELU"):
        assert rel_err(fused.eval()(x), model.eval()(x)) <= 1e-5


def test_report_of_a_built_block_that_cannot_run_says_so():
    block = fused_res.nn.BasicBlock(8, 8)
    block.relu = nn.GELU()
    wrapper = nn.Sequential(block)
    (entry,) = fused_res.report(wrapper)
    assert "cannot run: relu of a BasicBlock built" in entry.detail


def test_a_block_built_fused_refuses_a_child_it_cannot_compute():
    block = fused_res.nn.BasicBlock(8, 8)
    block.relu = nn.GELU()
    with pytest.raises(TypeError, match="relu of a BasicBlock built.*GELU.*accepted"):
        block(torch.randn(2, 8, 4, 4))


def test_a_block_built_fused_delegates_nothing():
    block = fused_res.nn.BasicBlock(8, 8)
    with pytest.raises(AttributeError, match="zero_init_last"):
        block.zero_init_last  # noqa: B018


def test_torch_jit_script_refuses_a_fused_model_by_name_and_scripts_the_reverted_one():
    model, fused = _pair("resnet18")
    x = torch.randn(2, 3, 32, 32)
    for m in (fused, fused_res.nn.ConvBNAct2d(3, 8)):
        with pytest.raises(RuntimeError, match=r"cannot compile fused_res's \w+.*revert"):
            torch.jit.script(m)
    assert isinstance(fused.layer1[0], fused_res.nn.FusedResidualBlock)  # (left as it was)
    scripted = torch.jit.script(fused_res.revert(fused).eval())
    assert rel_err(scripted(x), model.eval()(x)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_jit_trace_of_a_converted_model_in_train_and_eval(dtype):
    """torch.jit.trace (with its check that two traces agree) of a converted model computes
    what the unconverted one does, running statistics included. Train tracing failed on the
    batch count a trace records as a tensor; eval tracing on the fold cache, whose hit and
    miss traced different graphs."""
    model, fused = _pair("resnet18")
    model, fused = model.to(dtype), fused.to(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for train in (True, False):
        model.train(train)
        fused.train(train)
        traced = torch.jit.trace(fused, x)
        model.load_state_dict(fused.state_dict())
        x2 = torch.randn_like(x)
        assert rel_err(traced(x2), model(x2)) <= tol
        for a, b in zip(traced.buffers(), model.buffers(), strict=True):
            assert rel_err(a.double(), b.double()) <= tol


@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_train_mode_trace_updates_the_running_statistics_at_another_batch_size(momentum):
    """The unbiased variance's n / (n - 1) follows the batch a trace is run at (through the
    op, the traced batch's count was a constant of the trace: 0.7% off at N=4 for N=2)."""
    model, fused = _pair("resnet18")
    model, fused = model.double().train(), fused.double().train()
    for m in (model, fused):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = momentum
    traced = torch.jit.trace(fused, torch.randn(2, 3, 64, 64, dtype=torch.double),
                             check_trace=False)
    model.load_state_dict(fused.state_dict())
    for n in (4, 3):
        x = torch.randn(n, 3, 64, 64, dtype=torch.double)
        assert rel_err(traced(x), model(x)) <= 1e-10
    got, ref = dict(traced.named_buffers()), dict(model.named_buffers())
    assert list(got) == list(ref)
    for k in ref:
        assert rel_err(got[k].double(), ref[k].double()) <= 1e-12, k


def test_torch_export_with_a_dynamic_batch_in_train_mode():
    """The batch count is symbolic under torch.export with a dynamic batch (it was refused:
    'count=256*s77; accepted: an int')."""
    model, fused = _pair("resnet18")
    model.train()
    fused.train()
    ep = torch.export.export(fused, (torch.randn(4, 3, 32, 32),),
                             dynamic_shapes=({0: torch.export.Dim("n", min=2, max=64)},))
    exported = ep.module()
    model.load_state_dict(exported.state_dict())
    x = torch.randn(6, 3, 32, 32)
    assert rel_err(exported(x), model(x)) <= 1e-4
    got, ref = dict(exported.named_buffers()), dict(model.named_buffers())
    for k in ref:
        assert rel_err(got[k].double(), ref[k].double()) <= 1e-5, k


def test_fx_symbolic_tracing_of_a_converted_model_says_what_to_use_instead():
    """torchvision's create_feature_extractor (torch.fx symbolic tracing) cannot trace the
    fused ops; the error says so (it was 'x must be a torch.Tensor; got Proxy'), and the
    reverted model traces."""
    from torchvision.models.feature_extraction import create_feature_extractor
    model, fused = _pair("resnet18")
    with pytest.raises(TypeError, match="torch.fx symbolic tracing.*revert"):
        create_feature_extractor(fused, {"layer2": "f"})
    # In eval too (it failed there with fx's generic "symbolically traced variables cannot
    # be used as inputs to control flow", in the BatchNorm's coefficients), with and without
    # the stem fused.
    for m in (fused.eval(), fused_res.convert(model, backend="reference", stem=False).eval()):
        with pytest.raises(TypeError, match="torch.fx symbolic tracing.*revert"):
            torch.fx.symbolic_trace(m)
    fused.train()
    x = torch.randn(2, 3, 32, 32)
    got = create_feature_extractor(fused_res.revert(fused).eval(), {"layer2": "f"})(x)["f"]
    want = create_feature_extractor(model.eval(), {"layer2": "f"})(x)["f"]
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("surgery", ["shortcut_appended", "relu_to_gelu"])
def test_lesion_of_a_block_changed_after_convert_uses_the_original(surgery):
    """forward_shortcut_only follows the same layout check as the forward (a module appended
    to the shortcut was dropped from the lesioned block: 0.39 off)."""
    model, fused = _pair("resnet18")
    name = "layer2.0" if surgery == "shortcut_appended" else "layer1.1"
    for m in (model, fused):
        _SURGERY[surgery](m.get_submodule(name))
        if surgery == "shortcut_appended":
            m.get_submodule(name).downsample[-1] = nn.Hardtanh()
        m.double().eval()
    drop = [fused_res.residual_blocks(fused).index(fused.get_submodule(name))]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with fused_res.lesion(model, drop=drop):
        want = model(x)
    with fused_res.lesion(fused, drop=drop), pytest.warns(UserWarning):
        got = fused(x)
    assert rel_err(got, want) <= 1e-10


def test_global_module_hooks_fire_in_a_fused_model_as_in_the_original():
    """Hooks registered for every module (register_module_forward_hook: fake quantization,
    a tracker) fired only on the modules a fused model calls: a conv-scaling one changed its
    output silently. While they are registered, the blocks and the stem run their original
    modules (one warning); removed, the model runs fused again."""
    base = _f64_resnet18().eval()
    fused = fused_res.convert(copy.deepcopy(base), backend="reference").eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def scale_convs(mod, inp, out):
        return out * 1.5 if isinstance(mod, nn.Conv2d) else None

    calls = {}

    def count(mod, inp, out):
        calls[id(mod)] = calls.get(id(mod), 0) + 1

    hooks._WARNED.clear()
    with torch.no_grad():
        plain = base(x)
        assert rel_err(fused(x), plain) < 1e-12
        handle = nn.modules.module.register_module_forward_hook(scale_convs)
        try:
            with pytest.warns(UserWarning, match="global module hooks in a fused"):
                got = fused(x)
            want = base(x)
        finally:
            handle.remove()
        assert rel_err(want, plain) > 0.1  # (the hook matters)
        assert rel_err(got, want) < 1e-12
        handle = nn.modules.module.register_module_forward_hook(count)
        try:
            base(x)
            n_base = sum(calls.values())
            calls.clear()
            fused(x)
            n_fused = sum(calls.values())
        finally:
            handle.remove()
        assert n_fused == n_base
        assert rel_err(fused(x), plain) < 1e-12
    assert fused_res.report(fused)[0].fused


@pytest.mark.parametrize("where", ["layer1.0.conv2", "layer2.0.downsample.1", "conv1", "bn1",
                                   "relu"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_forward_set_on_a_child_instance_runs(where, when):
    """A forward set on a module instance (accelerate's add_hook_to_module, a monkeypatch):
    a fused block never called it (its output changed silently), and convert() copied a
    stem module's, bound to the module it replaced (bn1 normalized twice). Before convert()
    the block or stem stays unfused; on a block's child afterwards the block runs its
    original modules. (On the fused stem's conv1 afterwards it is taken to run the fused
    conv: the README says so; this one scales its input instead.)"""
    import types

    def scaled(self, inp):
        return type(self).forward(self, inp * 2.0)

    base = _f64_resnet18().eval()
    if when == "before":
        mod = base.get_submodule(where)
        mod.forward = types.MethodType(scaled, mod)
    fused = fused_res.convert(copy.deepcopy(base), backend="reference").eval()
    if when == "after":
        for m in (base, fused):
            mod = m.get_submodule(where)
            mod.forward = types.MethodType(scaled, mod)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            assert rel_err(fused(x), base(x)) < 1e-12
    if when == "before":
        entries = {e.name: e for e in fused_res.report(fused)}
        block = where.split(".conv")[0].split(".bn")[0].split(".downsample")[0]
        if block in entries:
            assert not entries[block].fused and "instance" in entries[block].detail
        else:
            assert not isinstance(fused.conv1, fused_res.nn.stem.FusedStemConv)
