"""The conv-unit ops against formulas written out with torch.nn.functional, in float64."""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from fused_res import ops
from fused_res.testing import TOLERANCES, rel_err

D = torch.float64


def _ch(v):
    return v.view(1, -1, 1, 1)


def unit_formula(x, w, bias, stride, padding, c_in, a_in, b_in, act_in, a_out, b_out, act_mid,
                 r, lam, d, act_out):
    relu = torch.relu
    p = x - _ch(c_in) if c_in is not None else x
    if a_in is not None:
        p = p * _ch(a_in)
    if b_in is not None:
        p = p + _ch(b_in)
    p = relu(p) if act_in == "relu" else p
    z = F.conv2d(p, w, bias, stride, padding)
    u = z * _ch(a_out) if a_out is not None else z
    u = u + _ch(b_out) if b_out is not None else u
    v = relu(u) if act_mid == "relu" else u
    if d is not None:
        v = v * d.view(-1, 1, 1, 1)
    wsum = v + lam * r if r is not None else v
    return relu(wsum) if act_out == "relu" else wsum


CONFIGS = [
    # (kernel, stride, padding, act_in, affine_in, affine_out, act_mid, residual, branch, act_out)
    (3, 1, 1, "none", False, True, "relu", False, False, "none"),
    (3, 2, 1, "relu", True, True, "none", True, False, "relu"),
    (1, 1, 0, "none", False, True, "none", True, True, "relu"),
    (1, 2, 0, "relu", False, False, "none", False, False, "none"),
    (7, 2, 3, "none", False, True, "relu", False, False, "none"),
    (3, 1, 1, "relu", True, False, "relu", True, True, "none"),
]


def _make(cfg, n=2, cin=5, cout=6, h=9, w=7, seed=0):
    k, s, pad, act_in, aff_in, aff_out, act_mid, res, branch, act_out = cfg
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, dtype=D, generator=g).requires_grad_()
    x, wt, bias = t(n, cin, h, w), t(cout, cin, k, k), t(cout)
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    a_in = (torch.rand(cin, dtype=D, generator=g) + 0.5).requires_grad_() if aff_in else None
    b_in = t(cin) if aff_in else None
    c_in = t(cin) if aff_in else None
    a_out = (torch.rand(cout, dtype=D, generator=g) + 0.5).requires_grad_() if aff_out else None
    b_out = t(cout) if aff_out else None
    r = t(n, cout, oh, ow) if res else None
    d = torch.rand(n, dtype=D, generator=g) if branch else None
    return dict(x=x, w=wt, bias=bias, stride=s, padding=pad, c_in=c_in, a_in=a_in, b_in=b_in,
                act_in=act_in, a_out=a_out, b_out=b_out, act_mid=act_mid, r=r, lam=0.7, d=d,
                act_out=act_out)


def _ours(a):
    return ops.conv_unit(a["x"], a["w"], a["bias"], stride=a["stride"], padding=a["padding"],
                         in_center=a["c_in"], in_scale=a["a_in"], in_shift=a["b_in"],
                         act_in=a["act_in"],
                         out_scale=a["a_out"], out_shift=a["b_out"], act_mid=a["act_mid"],
                         residual=a["r"], res_scale=a["lam"], branch_scale=a["d"],
                         act_out=a["act_out"], backend="reference")


def _ref(a):
    return unit_formula(a["x"], a["w"], a["bias"], a["stride"], a["padding"], a["c_in"],
                        a["a_in"],
                        a["b_in"], a["act_in"], a["a_out"], a["b_out"], a["act_mid"], a["r"],
                        a["lam"], a["d"], a["act_out"])


def _grad_inputs(a):
    return [v for k, v in a.items() if isinstance(v, torch.Tensor) and v.requires_grad]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_conv_unit_forward_and_gradients_match_formula(cfg):
    a = _make(cfg)
    y, ref = _ours(a), _ref(a)
    assert rel_err(y, ref) < 1e-12
    g = torch.randn_like(ref)
    inputs = _grad_inputs(a)
    for got, want in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g),
                         strict=True):
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("cfg", CONFIGS[:3])
def test_conv_unit_gradcheck(cfg):
    a = _make(cfg, n=2, cin=2, cout=3, h=5, w=4)
    names = [k for k, v in a.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def f(*tensors):
        return _ours({**a, **dict(zip(names, tensors, strict=True))})

    assert torch.autograd.gradcheck(f, [a[k] for k in names])


def test_conv_bn_stats_and_epilogue_compose_to_batchnorm():
    """conv_bn_stats + BN affine + epilogue == conv -> F.batch_norm(training) -> relu -> + r."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, dtype=D, generator=g, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=D, generator=g, requires_grad=True)
    gamma = (torch.rand(6, dtype=D, generator=g) + 0.5).requires_grad_()
    beta = torch.randn(6, dtype=D, generator=g, requires_grad=True)
    r = torch.randn(3, 6, 8, 8, dtype=D, generator=g, requires_grad=True)
    z, mean, var = ops.conv_bn_stats(x, w, padding=1)
    scale = gamma * torch.rsqrt(var + 1e-5)
    y = ops.epilogue(z, scale, beta, center=mean, residual=r, act_out="relu")
    ref = torch.relu(F.batch_norm(F.conv2d(x, w, padding=1), None, None, gamma, beta, True,
                                  0.0, 1e-5) + r)
    assert rel_err(y, ref) < 1e-12
    gy = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, (x, w, gamma, beta, r), gy),
                         torch.autograd.grad(ref, (x, w, gamma, beta, r), gy), strict=True):
        assert rel_err(got, want) < 1e-10
    assert rel_err(var, F.conv2d(x, w, padding=1).var((0, 2, 3), unbiased=False)) < 1e-12


def test_stats_gradcheck():
    x = torch.randn(2, 3, 4, 5, dtype=D, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=D, requires_grad=True)
    a = (torch.rand(3, dtype=D) + 0.5).requires_grad_()
    c = torch.randn(3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, a, c: ops.conv_bn_stats(x, w, padding=1, in_center=c, in_scale=a,
                                             act_in="relu"), (x, w, a, c))
    z = torch.randn(2, 3, 4, 5, dtype=D, requires_grad=True)
    r = torch.randn(2, 3, 4, 5, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z, a, c, r: ops.epilogue(z, a, c * 2, center=c, act_mid="relu", residual=r,
                                        act_out="relu"), (z, a, c, r))
    assert torch.autograd.gradcheck(lambda x: ops.channel_stats(x), (x,))


def _opcheck_samples():
    a = _make(CONFIGS[1], n=2, cin=3, cout=4, h=6, w=5)
    unit = (a["x"], a["w"], a["bias"], [2, 2], [1, 1], [1, 1], 1, a["c_in"], a["a_in"],
            a["b_in"], "relu",
            a["a_out"], a["b_out"], "relu", a["r"], 0.7, None, "relu", "reference")
    stats = (a["x"], a["w"], None, [1, 1], [1, 1], [1, 1], 1, a["c_in"], a["a_in"], a["b_in"],
             "relu", "reference")
    epi = (a["r"], a["b_out"], a["a_out"], a["b_out"], "relu", a["r"].detach().clone(), 0.5,
           torch.rand(2, dtype=D), "relu", "reference")
    lib = ops.library
    return [(lib.conv_unit, unit), (lib.conv_bn_stats, stats),
            (lib.channel_stats, (a["x"], "reference")), (lib.epilogue, epi)]


@pytest.mark.parametrize("index", range(4))
def test_opcheck(index):
    op, args = _opcheck_samples()[index]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_traces_the_ops():
    a = _make(CONFIGS[1])
    f = torch.compile(_ours, fullgraph=True, backend="aot_eager")
    y = f(a)
    assert rel_err(y, _ref(a)) < 1e-12
    y.sum().backward()
    assert a["x"].grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_within_dtype_tolerance(dtype):
    a = _make(CONFIGS[1], n=4, cin=16, cout=16, h=12, w=12)
    low = {k: (v.detach().to(dtype) if isinstance(v, torch.Tensor) and v.dim() == 4 else
               (v.detach().float() if isinstance(v, torch.Tensor) else v)) for k, v in a.items()}
    assert rel_err(_ours(low), _ref(a)) <= TOLERANCES[dtype]


def test_output_follows_input_memory_format_and_accepts_non_contiguous():
    a = _make(CONFIGS[1], cin=4, cout=4)
    cl = {**a, "x": a["x"].detach().to(memory_format=torch.channels_last)}
    y = _ours(cl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(y, _ref(a)) < 1e-12
    nc = {**a, "x": a["x"].detach().transpose(2, 3).contiguous().transpose(2, 3)}
    assert not nc["x"].is_contiguous()
    assert rel_err(_ours(nc), _ref(a)) < 1e-12


def test_empty_batch_and_one_by_one_spatial():
    a = _make(CONFIGS[1])
    empty = {**a, "x": a["x"][:0], "r": a["r"][:0]}
    y = _ours(empty)
    assert y.shape == (0, 6, 5, 4)
    y.sum().backward()
    z, mean, var = ops.conv_bn_stats(a["x"][:0].detach(), a["w"].detach(), padding=1)
    assert z.shape[0] == 0 and torch.equal(mean, torch.zeros(6, dtype=D))
    x1 = torch.randn(2, 5, 1, 1, dtype=D)
    y1 = ops.conv_unit(x1, a["w"].detach(), padding=1, act_out="relu")
    assert rel_err(y1, torch.relu(F.conv2d(x1, a["w"].detach(), padding=1))) < 1e-12


def test_nan_and_inf_propagate_like_the_reference():
    a = _make(CONFIGS[0])
    x = a["x"].detach().clone()
    x[0, 0, 0, 0] = float("nan")
    x[1, 1, 2, 2] = float("inf")
    b = {**a, "x": x}
    y, ref = _ours(b), _ref(b)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))


def test_relu_backward_is_eagers():
    from tests.helpers import check_relu_backward_matches_eager
    check_relu_backward_matches_eager("reference")


def test_autocast_computes_in_the_autocast_dtype():
    a = _make(CONFIGS[1])
    f32 = {k: (v.detach().float() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _ours(f32)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, _ref(a)) <= TOLERANCES[torch.bfloat16]


BAD = [
    (dict(x=torch.randn(2, 5, 9)), ValueError, "4-D"),
    (dict(x=torch.randint(0, 3, (2, 5, 9, 7))), TypeError, "dtype"),
    (dict(w=torch.randn(6, 4, 3, 3, dtype=D)), ValueError, "channels"),
    (dict(stride=0), ValueError, "stride"),
    (dict(act_mid="gelu"), ValueError, "act_mid"),
    (dict(a_out=torch.ones(5, dtype=D)), ValueError, "out_scale"),
    (dict(r=torch.randn(2, 6, 4, 4, dtype=D)), ValueError, "residual"),
    (dict(x=torch.randn(2, 5, 9, 7, dtype=torch.float32)), TypeError, "dtype"),
    (dict(x=torch.randn(2, 5, 9, 7, dtype=D, device="meta")), ValueError, "device"),
    (dict(d=torch.ones(3, dtype=D)), ValueError, "branch_scale"),
    (dict(x=torch.randn(2, 5, 1, 1, dtype=D), padding=0), ValueError, "kernel span"),
    (dict(w=torch.randn(0, 5, 3, 3, dtype=D)), ValueError, "0 output channels"),
    (dict(x=torch.randn(2, 0, 9, 7, dtype=D), w=torch.randn(6, 0, 3, 3, dtype=D)), ValueError,
     "0 channels"),
    # (the Triton kernel returned the bias over the padded grid for these two)
    (dict(x=torch.randn(2, 5, 0, 7, dtype=D)), ValueError, r"H >= 1 and W >= 1"),
    (dict(w=torch.randn(6, 5, 0, 3, dtype=D)), ValueError, r"at least 1x1"),
    (dict(d=torch.ones(2, dtype=D, requires_grad=True)), ValueError,
     "branch_scale requires grad"),
]


@pytest.mark.parametrize("change,exc,match", BAD)
def test_bad_input_raises_clear_error(change, exc, match):
    a = {k: (v.detach() if isinstance(v, torch.Tensor) else v)
         for k, v in _make(CONFIGS[1]).items()}
    with pytest.raises(exc, match=match):
        _ours({**a, **change})


def test_a_branch_scale_that_requires_grad_is_fine_without_grad_mode():
    a = {k: (v.detach() if isinstance(v, torch.Tensor) else v)
         for k, v in _make(CONFIGS[1]).items()}
    d = torch.rand(2, dtype=D, requires_grad=True)
    with torch.no_grad():
        y = _ours({**a, "d": d})
        ref = _ref({**a, "d": d.detach()})
    assert rel_err(y, ref) < 1e-12


def test_unknown_backend_name_raises():
    a = _make(CONFIGS[0])
    with pytest.raises(ValueError, match="accepted"):
        ops.conv_unit(a["x"], a["w"], backend="tensorrt")


def test_unavailable_backend_falls_back_with_one_warning():
    a = _make(CONFIGS[0])
    from fused_res.backends import registry
    registry._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            y = ops.conv_unit(a["x"], a["w"], padding=1, backend="triton")
    msgs = [str(w.message) for w in caught if "fused_res" in str(w.message)]
    assert len(msgs) == 1 and "triton" in msgs[0] and "reference" in msgs[0]
    assert rel_err(y, F.conv2d(a["x"], a["w"], padding=1)) < 1e-12


@pytest.mark.parametrize("groups,dilation", list(itertools.product([1, 2], [1, 2])))
def test_groups_and_dilation_on_the_reference(groups, dilation):
    x = torch.randn(2, 4, 9, 9, dtype=D)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=D)
    y = ops.conv_unit(x, w, padding=dilation, dilation=dilation, groups=groups, act_out="relu")
    ref = torch.relu(F.conv2d(x, w, None, 1, dilation, dilation, groups))
    assert rel_err(y, ref) < 1e-12


def test_pre_activation_is_kept_only_where_the_output_cannot_stand_in_for_it():
    """conv-BN-ReLU: y = relu(u), so the backward reads y's sign and u is never returned (an
    inference pass writes y only); with a residual after the ReLU, u is needed and kept.
    Gradients agree with autograd through the plain formula either way."""
    from fused_res.ops import library
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(2, 5, 6, 6, dtype=torch.float64, generator=g)
    for residual, keeps_u in ((None, False), (r, True)):
        y, u = library.conv_unit(x, w, None, [1, 1], [1, 1], [1, 1], 1, None, None, None,
                                 "none", None, None, "relu", residual, 1.0, None, "none",
                                 "reference")
        assert (u.numel() > 0) == keeps_u
        want = F.relu(F.conv2d(x, w, padding=1)) + (0 if residual is None else residual)
        gy = torch.randn(want.shape, dtype=torch.float64, generator=g)
        got = torch.autograd.grad(y, (x, w), gy)
        ref = torch.autograd.grad(want, (x, w), gy)
        for a, b in zip(got, ref, strict=True):
            assert rel_err(a, b) < 1e-12


def test_eager_twins_match_the_custom_ops_and_yield_to_the_dispatcher(monkeypatch):
    """In plain eager mode the ops run as their eager twins (same impl and autograd, no
    dispatcher); values and gradients are identical to the custom ops', and anything that
    needs the dispatcher (meta tensors, dispatch modes) still gets the custom op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fused_res import _eager
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.rand(3, dtype=torch.float64, generator=g, requires_grad=True)

    def run():
        z, mean, var = ops.conv_bn_stats(x, w, padding=1, in_scale=s, act_in="relu",
                                         backend="reference")
        y = ops.epilogue(z, torch.rsqrt(var + 1e-5), center=mean, act_mid="relu",
                         backend="reference")
        out = ops.conv_unit(y, w.transpose(0, 1).flip(2, 3).contiguous()[:, :4], padding=1,
                            act_mid="relu", backend="reference")
        m, v = ops.channel_stats(out, backend="reference")
        loss = (out * out).sum() + m.sum() + v.sum()
        return out, torch.autograd.grad(loss, (x, w, s)), z.grad_fn

    monkeypatch.setattr(_eager, "ENABLED", True)
    out_t, grads_t, fn_t = run()
    monkeypatch.setattr(_eager, "ENABLED", False)
    out_o, grads_o, fn_o = run()
    assert type(fn_t).__name__.startswith("Eager_")
    assert not type(fn_o).__name__.startswith("Eager_")
    assert torch.equal(out_t, out_o)
    for a, b in zip(grads_t, grads_o, strict=True):
        assert torch.equal(a, b)

    monkeypatch.setattr(_eager, "ENABLED", True)
    meta = ops.conv_unit(x.to("meta"), w.to("meta"), padding=1, backend="reference")
    assert meta.device.type == "meta" and meta.shape == (2, 4, 6, 6)
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))
    with Record():
        ops.conv_unit(x.detach(), w.detach(), padding=1, backend="reference")
    assert any("fused_res.conv_unit" in f for f in seen), seen[:5]


def test_without_grad_the_ops_skip_autograd_and_give_the_same_values(monkeypatch):
    """Under no_grad the eager path calls each op's impl directly (its autograd.Function
    would only save tensors for a backward that cannot come): same values as with grad on."""
    from fused_res import _eager
    from fused_res.ops import library
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=g)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g)
    s = torch.rand(3, dtype=torch.float64, generator=g) + 0.5

    def run():
        z, mean, var = ops.conv_bn_stats(x, w, padding=1, in_scale=s, act_in="relu",
                                         backend="reference")
        scale = ops.bn_scale(mean, var, s.new_ones(4), count=72, backend="reference")
        y = ops.epilogue(z, scale, center=mean, act_mid="relu", backend="reference")
        out = ops.conv_unit(y, w.transpose(0, 1).contiguous()[:, :4], padding=1,
                            act_mid="relu", residual=x, backend="reference")
        return (z, mean, var, scale, y, out, *ops.channel_stats(out, backend="reference"))

    monkeypatch.setattr(_eager, "ENABLED", True)
    with_grad = run()

    def refuse(*args):
        raise AssertionError("an autograd.Function ran under no_grad")
    for name, (_op, twin) in library._OPS.items():
        if name != "bn_update_running":  # no autograd: its twin is the impl
            monkeypatch.setattr(twin, "apply", refuse)
    with torch.no_grad():
        without = run()
    for a, b in zip(with_grad, without, strict=True):
        assert torch.equal(a, b) and b.grad_fn is None


def test_an_epilogue_with_nothing_to_do_returns_a_new_tensor():
    """Op outputs never alias inputs (the custom op refuses it), on the eager path too."""
    from fused_res import _eager
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    for enabled in (True, False):
        old, _eager.ENABLED = _eager.ENABLED, enabled
        try:
            y = ops.epilogue(z, backend="reference")
        finally:
            _eager.ENABLED = old
        assert torch.equal(y, z) and y.untyped_storage().data_ptr() != z.untyped_storage(
        ).data_ptr()
        (gz,) = torch.autograd.grad(y.sum(), z)
        assert torch.equal(gz, torch.ones_like(z))


def test_an_epilogue_names_z_in_its_device_errors():
    """ops.epilogue's input is z: its device errors said "x" (a probe)."""
    z = torch.randn(2, 3, 4, 4)
    v = torch.randn(3)
    meta = dict(device="meta")
    cases = [(dict(center=v.to(**meta)), "center is on meta but z is on cpu"),
             (dict(residual=torch.empty(2, 3, 4, 4, **meta)), "residual is on meta but z is on"),
             (dict(branch_scale=torch.empty(2, **meta)), "branch_scale is on meta but z is on")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            ops.epilogue(z, backend="reference", **kwargs)
    with pytest.raises(ValueError, match="scale is on cpu but z is on meta"):
        ops.epilogue(z.to(**meta), scale=v, backend="reference")
