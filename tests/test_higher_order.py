"""Double backward, forward-mode AD and torch.func transforms through the ops and the fused
modules, on every CPU backend, against an independent float64 composite of torch.nn.functional.

The fast backends' kernels have no derivative and no jvp or batching rule of their own; these
tests hold the ops to giving the right answer anyway (the reference backward, or the reference
composite, with one warning), never a silently wrong one: before, a create_graph backward
through 'cuda' returned second-order gradients missing terms, and a torch.func.jvp tangent came
back wrong on every backend.
"""

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from fused_res import _ext, convert, models, ops
from fused_res.backends import registry
from fused_res.nn import ConvBNAct2d
from fused_res.testing import TOLERANCES, rel_err
from tests.helpers import randomize_bn

TOL = TOLERANCES[torch.float32]
BACKENDS = ["reference", "cuda"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cuda" and _ext.load() is None:
        pytest.skip(f"extension unavailable: {_ext.reason()}")
    return request.param


def _r(g, *shape, positive=False):
    t = torch.randn(*shape, dtype=torch.float64, generator=g)
    return t.abs() + 0.5 if positive else t


def _ch(v):
    return v.view(1, -1, 1, 1)


# Each case: (make inputs from a generator, the op through fused_res, the same math in plain
# torch.nn.functional). Inputs are float64 leaves; the op runs on float32 copies.
def _unit_inputs(g):
    return dict(x=_r(g, 2, 5, 7, 6), w=_r(g, 6, 5, 3, 3) * 0.3, bias=_r(g, 6),
                c=_r(g, 5), a=_r(g, 5, positive=True), b=_r(g, 5), oa=_r(g, 6, positive=True),
                ob=_r(g, 6), r=_r(g, 2, 6, 4, 3), d=_r(g, 2, positive=True))


def _unit_op(t, backend):
    return ops.conv_unit(t["x"], t["w"], t["bias"], stride=2, padding=1, in_center=t["c"],
                         in_scale=t["a"], in_shift=t["b"], act_in="relu", out_scale=t["oa"],
                         out_shift=t["ob"], act_mid="relu", residual=t["r"], res_scale=0.5,
                         branch_scale=t["d"], act_out="relu", backend=backend)


def _unit_truth(t):
    p = F.relu((t["x"] - _ch(t["c"])) * _ch(t["a"]) + _ch(t["b"]))
    u = F.conv2d(p, t["w"], t["bias"], stride=2, padding=1) * _ch(t["oa"]) + _ch(t["ob"])
    return F.relu(t["d"].view(-1, 1, 1, 1) * F.relu(u) + 0.5 * t["r"])


def _stats_inputs(g):
    return dict(x=_r(g, 3, 4, 5, 5), w=_r(g, 6, 4, 3, 3) * 0.3, c=_r(g, 4),
                a=_r(g, 4, positive=True), b=_r(g, 4))


def _stats_op(t, backend):
    z, mean, var = ops.conv_bn_stats(t["x"], t["w"], padding=1, in_center=t["c"],
                                     in_scale=t["a"], in_shift=t["b"], act_in="relu",
                                     backend=backend)
    # A train-mode BatchNorm + ReLU on top, so the statistics' second derivatives matter.
    return F.relu((z - _ch(mean)) * _ch(torch.rsqrt(var + 1e-5)))


def _stats_truth(t):
    p = F.relu((t["x"] - _ch(t["c"])) * _ch(t["a"]) + _ch(t["b"]))
    z = F.conv2d(p, t["w"], padding=1)
    var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    return F.relu((z - _ch(mean)) * _ch(torch.rsqrt(var + 1e-5)))


def _epi_inputs(g):
    return dict(z=_r(g, 3, 4, 5, 6), c=_r(g, 4), a=_r(g, 4, positive=True), b=_r(g, 4),
                r=_r(g, 3, 4, 5, 6))


def _epi_op(t, backend):
    y = ops.epilogue(t["z"], t["a"], t["b"], center=t["c"], act_mid="relu", residual=t["r"],
                     res_scale=2.0, act_out="relu", backend=backend)
    mean, var = ops.channel_stats(y, backend=backend)
    return y * _ch(mean + var)


def _epi_truth(t):
    y = F.relu(F.relu((t["z"] - _ch(t["c"])) * _ch(t["a"]) + _ch(t["b"])) + 2.0 * t["r"])
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    return y * _ch(mean + var)


CASES = {"conv_unit": (_unit_inputs, _unit_op, _unit_truth),
         "conv_bn_stats": (_stats_inputs, _stats_op, _stats_truth),
         "epilogue+channel_stats": (_epi_inputs, _epi_op, _epi_truth)}


# branch_scale (the drop-path / lesion factor) is not differentiable, by the ops' contract.
FIXED = {"d"}


def _leaves(t, dtype):
    return {k: v.to(dtype).detach().requires_grad_(k not in FIXED) for k, v in t.items()}


def _first_and_second(f, t, gy, v):
    """dL/dt and d(Σ v·dL/dt)/dt for L = Σ gy·f(t), the first taken with create_graph."""
    names = [k for k in t if t[k].requires_grad]
    y = f(t)
    first = torch.autograd.grad(y, [t[k] for k in names], gy.to(y.dtype), create_graph=True)
    inner = sum((a * v[k].to(a.dtype)).sum() for a, k in zip(first, names, strict=True))
    second = torch.autograd.grad(inner, [t[k] for k in names], allow_unused=True)
    return dict(zip(names, first, strict=True)), dict(zip(names, second, strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_double_backward_matches_functional(case, backend):
    make, op, truth = CASES[case]
    g = torch.Generator().manual_seed(5)
    t64 = make(g)
    gy = torch.randn(truth(t64).shape, dtype=torch.float64, generator=g)
    v = {k: torch.randn(x.shape, dtype=torch.float64, generator=g) for k, x in t64.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time warning is tested below
        got1, got2 = _first_and_second(lambda t: op(t, backend), _leaves(t64, torch.float32),
                                       gy, v)
    want1, want2 = _first_and_second(truth, _leaves(t64, torch.float64), gy, v)
    for k in want1:
        assert rel_err(got1[k], want1[k]) <= TOL, (case, "first", k)
        # None (not in the second-order graph) is a zero: piecewise-linear in that input.
        zero = torch.zeros(t64[k].shape, dtype=torch.float64)
        got, want = (zero if a is None else a for a in (got2[k], want2[k]))
        assert rel_err(got, want) <= TOL, (case, "second", k)


def test_the_reference_backward_is_twice_differentiable_exactly():
    """gradgradcheck in float64: the composite the fast backends' double backward runs."""
    g = torch.Generator().manual_seed(6)
    t = _unit_inputs(g)
    names = list(t)

    def f(*xs):
        return _unit_op(dict(zip(names, xs, strict=True)), "reference")
    xs = [x.detach().requires_grad_(k not in FIXED) for k, x in t.items()]
    assert torch.autograd.gradgradcheck(f, xs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_double_backward_warns_once_and_first_order_does_not(backend):
    if backend == "reference":
        pytest.skip("the reference backward is the double backward: nothing to warn about")
    registry._warned.clear()
    g = torch.Generator().manual_seed(7)
    t = _leaves(_unit_inputs(g), torch.float32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.autograd.grad(_unit_op(t, backend).sum(), [t["x"], t["w"]])
        assert not [r for r in rec if "fused_res" in str(r.message)]
        for _ in range(2):
            gx, = torch.autograd.grad(_unit_op(t, backend).square().sum(), t["x"],
                                      create_graph=True)
            gx.sum().backward()
    said = [str(r.message) for r in rec if "create_graph" in str(r.message)]
    assert len(said) == 1 and repr(backend) in said[0]


@pytest.mark.parametrize("case", list(CASES))
def test_forward_mode_ad_matches_functional(case, backend):
    make, op, truth = CASES[case]
    g = torch.Generator().manual_seed(8)
    t64 = make(g)
    tangents = {k: torch.randn(x.shape, dtype=torch.float64, generator=g)
                for k, x in t64.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fwAD.dual_level():
            dual = {k: fwAD.make_dual(x.float(), tangents[k].float()) for k, x in t64.items()}
            got = fwAD.unpack_dual(op(dual, backend)).tangent
        names = list(t64)
        _, got_func = torch.func.jvp(
            lambda *xs: op(dict(zip(names, xs, strict=True)), backend),
            tuple(t64[k].float() for k in names), tuple(tangents[k].float() for k in names))
    _, want = torch.func.jvp(lambda *xs: truth(dict(zip(names, xs, strict=True))),
                             tuple(t64[k] for k in names), tuple(tangents[k] for k in names))
    assert got is not None, "the tangent was dropped"
    assert rel_err(got, want) <= TOL
    assert rel_err(got_func, want) <= TOL


def test_torch_func_grad_and_vmap(backend):
    """Per-sample gradients (vmap over torch.func.grad), as Opacus-style code computes them."""
    g = torch.Generator().manual_seed(9)
    t64 = _unit_inputs(g)
    w = t64["w"]

    def loss(w, x, op):
        t = {**t64, "x": x[None], "r": t64["r"][:1], "d": t64["d"][:1], "w": w}
        return op(t).square().sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None))(
            w.float(), t64["x"].float(),
            lambda t: _unit_op({k: v.float() for k, v in t.items()}, backend))
    want = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None))(
        w, t64["x"], _unit_truth)
    assert got.shape == (2, *w.shape)
    assert rel_err(got, want) <= TOL


def test_vmap_of_a_train_mode_model_says_why_it_cannot_and_works_as_eager_does(backend):
    """vmap over a train-mode converted model: a per-sample batch statistic cannot go into
    one unbatched running buffer (eager refuses too). It said "Batching rule not implemented
    for aten::_foreach_add_"; it now names the buffers and the ways out, and the usual way
    out (torch.func.replace_all_batch_norm_modules_) gives eager's values."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(11)
    # (a torchvision ResNet: its stem's BatchNorm is fused too, so none runs as nn's)
    model = randomize_bn(torchvision.models.resnet18(num_classes=3)).double().train()
    fused = convert(copy.deepcopy(model), backend=backend)
    x = torch.randn(2, 2, 3, 32, 32, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = {k: v.clone() for k, v in fused.state_dict().items() if "running" in k}
        with pytest.raises(RuntimeError, match="running_mean and running_var, which it "
                           "updates in place, are not batched"):
            torch.func.vmap(fused)(x)
        # (a review: the refused update had already scaled running_mean by 1 - momentum
        # twice; nn leaves it as it was)
        assert all(torch.equal(fused.state_dict()[k], v) for k, v in before.items())
        torch.func.replace_all_batch_norm_modules_(fused)
        got = torch.func.vmap(fused)(x)
    torch.func.replace_all_batch_norm_modules_(model)
    assert rel_err(got, torch.func.vmap(model)(x)) <= 1e-10


def test_vmap_over_an_ensemble_updates_its_stacked_running_statistics(backend):
    """Model ensembling (torch.func.stack_module_state): the running buffers are batched as
    the statistics are, which nn.BatchNorm2d supports; the fused update had no vmap rule
    (foreach ops) and now matches nn's outputs and buffers (a review)."""
    torchvision = pytest.importorskip("torchvision")
    from torch.func import functional_call, stack_module_state

    torch.manual_seed(12)
    nets = [randomize_bn(torchvision.models.resnet18(num_classes=3)).double().train()
            for _ in range(2)]
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)

    def run(ms):
        params, buffers = stack_module_state(ms)
        shell = copy.deepcopy(ms[0]).to("meta")
        out = torch.func.vmap(lambda p, b, x: functional_call(shell, (p, b), (x,)),
                              in_dims=(0, 0, None))(params, buffers, x)
        return out, buffers

    want, want_buffers = run(nets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, got_buffers = run([convert(m, backend=backend) for m in nets])
    assert rel_err(got, want) <= 1e-10
    for name in ("bn1.running_var", "layer4.1.bn2.running_mean"):
        assert rel_err(got_buffers[name], want_buffers[name]) <= 1e-12


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_vmap_over_an_eval_model_and_an_eval_ensemble(backend, grad):
    """A probe: vmap over a converted eval model raised "NYI: querying is_contiguous inside
    of vmap" (memory_format_of asked a batched tensor for its layout), and the ensembling
    recipe under no_grad raised in the eval-fold cache (it keyed on the batched parameters'
    data pointers)."""
    from torch.func import functional_call, stack_module_state

    torch.manual_seed(13)
    model = randomize_bn(models.resnet20()).eval()
    fused = convert(model, backend=backend).eval()
    xs = torch.randn(3, 2, 3, 16, 16)
    units = [randomize_bn(ConvBNAct2d(3, 4, 3, padding=1, backend=backend))
             .eval() for _ in range(2)]
    params, buffers = stack_module_state(units)
    x = torch.randn(2, 3, 8, 8)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.func.vmap(fused)(xs)
        got_t = torch.func.vmap(fused, in_dims=1)(xs.transpose(0, 1))
        ens = torch.func.vmap(lambda p, b: functional_call(units[0], (p, b), (x,)))(
            params, buffers)
    want = torch.func.vmap(model)(xs)
    assert rel_err(got, want) <= 1e-5 and rel_err(got_t, want) <= 1e-5
    want_ens = torch.stack([torch.relu(u.bn(u.conv(x))) for u in units])
    assert rel_err(ens, want_ens) <= 1e-5


def test_a_gradient_penalty_through_a_fused_resnet(backend):
    """A gradient penalty (‖∂loss/∂x‖², as in WGAN-GP) through a converted train-mode ResNet:
    the parameters' gradients of it agree with the unfused model's."""
    torch.manual_seed(10)
    model = randomize_bn(models.cifar_resnet(8))
    fused = convert(copy.deepcopy(model), backend=backend)
    x = torch.randn(4, 3, 16, 16)
    ref = copy.deepcopy(model).double()

    def penalty(m, x):
        x = x.detach().requires_grad_()
        gx, = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
        return gx.square().sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        penalty(fused, x).backward()
    penalty(ref, x.double()).backward()
    penalty(model, x).backward()
    params = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        want = params[name].grad
        eager = dict(model.named_parameters())[name].grad
        # Within twice the unfused float32 model's own error (plus a floor).
        assert rel_err(p.grad, want) <= 2 * rel_err(eager, want) + TOL, name


def test_compiled_forward_mode_ad_matches_functional(backend):
    """torch.compile traces the transform check too: a compiled jvp gets the composite, not
    the custom op (which has no jvp rule and returned a zero tangent)."""
    make, op, truth = CASES["conv_unit"]
    g = torch.Generator().manual_seed(11)
    t64 = make(g)
    tx = torch.randn(t64["x"].shape, dtype=torch.float64, generator=g)

    def jvp(fn, dtype):
        rest = {k: v.to(dtype) for k, v in t64.items() if k != "x"}
        return torch.func.jvp(lambda x: fn({**rest, "x": x}), (t64["x"].to(dtype),),
                              (tx.to(dtype),))[1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch._dynamo.reset()
        got = torch.compile(lambda: jvp(lambda t: op(t, backend), torch.float32),
                            backend="aot_eager", fullgraph=True)()
    assert rel_err(got, jvp(truth, torch.float64)) <= TOL
