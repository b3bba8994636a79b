"""fused_res.ops.bn_scale (a train-mode BatchNorm's scale and running-statistics update) on
the CPU backends, against nn.BatchNorm2d and torch's composite; the triton backend runs the
same checks under the interpreter (tests/test_triton_kernels.py)."""

import pytest
import torch

from fused_res import _ext, ops
from fused_res.ops import library
from tests.helpers import (
    check_bn_ops_match_batchnorm,
    check_bn_scale_gradients,
    check_bn_update_edge_cases,
    check_scale_and_update_is_the_two_ops,
)


@pytest.fixture(params=["reference", "cuda"])
def backend(request):
    if request.param == "cuda" and _ext.load() is None:
        pytest.skip(f"extension unavailable: {_ext.reason()}")
    return request.param


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_ops_match_batchnorm2d(backend, momentum, affine):
    check_bn_ops_match_batchnorm(backend, momentum, affine)


def test_bn_ops_update_half_precision_buffers(backend):
    check_bn_ops_match_batchnorm(backend, 0.1, True, dtype=torch.float16)


def test_a_running_statistics_update_the_kernel_cannot_make_says_so_once(backend):
    """fp16 buffers (model.half()) and strided views: the cuda kernel updates float32
    contiguous buffers in place, and the update falls back to the reference, with one warning
    (there was none) and the reference's values."""
    import warnings

    from fused_res.backends import registry
    mean, var = torch.randn(4), torch.rand(4) + 0.5
    for rm, rv, what in ((torch.zeros(4).half(), torch.ones(4).half(), "float16"),
                         (torch.zeros(8)[::2], torch.ones(8)[::2], "not contiguous")):
        registry._warned.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                ops.bn_scale(mean, var, torch.ones(4), running_mean=rm, running_var=rv,
                             num_batches_tracked=torch.tensor(0), count=10, backend=backend)
        msgs = [str(w.message) for w in caught if "running-statistics" in str(w.message)]
        if backend == "reference":
            assert msgs == []
            continue
        assert len(msgs) == 1 and what in msgs[0] and "running_mean" in msgs[0], msgs
        want = torch.zeros(4)
        for _ in range(2):
            want = want * 0.9 + mean * 0.1
        assert torch.allclose(rm.float(), want, atol=1e-3)


def test_bn_scale_gradients(backend):
    check_bn_scale_gradients(backend)


def test_bn_update_edge_cases(backend):
    check_bn_update_edge_cases(backend)


def test_bn_scale_twice_differentiable():
    var = torch.rand(5, dtype=torch.float64) + 0.1
    w = torch.randn(5, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(
        lambda v, w: ops.bn_scale(torch.zeros(5, dtype=torch.float64), v, w, eps=1e-3,
                                  count=4, backend="reference"),
        (var.requires_grad_(), w.requires_grad_()))


def test_bad_arguments_name_the_argument_and_what_is_accepted():
    m, v = torch.zeros(4), torch.ones(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    cases = [
        (dict(mean=m, var=v, count=1, running_mean=rm, running_var=rv), "count=1"),
        (dict(mean=m, var=v, count=-2), "count=-2"),
        (dict(mean=m, var=torch.ones(3), count=4), "var has shape"),
        (dict(mean=m.half(), var=v, count=4), "mean has shape .* dtype"),
        (dict(mean=m, var=v, weight=torch.ones(5), count=4), "weight has shape"),
        (dict(mean=m, var=v, running_mean=rm, count=4), "given together"),
        (dict(mean=m, var=v, eps=-1.0, count=4), "eps=-1.0"),
        (dict(mean=m, var=v, eps=float("nan"), count=4), "eps=nan"),  # (made the scale NaN)
        (dict(mean=m, var=v, running_mean=torch.zeros(1).expand(4), running_var=rv, count=4),
         "running_mean is an expanded view"),
        (dict(mean=m, var=v, running_mean=rm, running_var=rv, count=4, momentum=None,
              num_batches_tracked=torch.tensor([3, 7])), "num_batches_tracked is shape"),
        (dict(mean=m, var=v, running_mean=rm, running_var=rv, count=4, momentum=None,
              num_batches_tracked=torch.tensor(0.5)), "0-dim int64"),
        (dict(mean=m, var=v, running_mean=rm, running_var=rv, count=4,
              num_batches_tracked=[0]), "num_batches_tracked is list"),
        (dict(mean=m, var=v, weight=torch.ones(4, device="meta"), count=4),
         "but mean is on cpu"),
    ]
    for kwargs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            ops.bn_scale(**kwargs)
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))  # untouched


@pytest.mark.parametrize("name,args", [
    ("bn_scale", lambda: (torch.rand(6) + 0.1, torch.randn(6), 1e-5, "reference")),
    ("bn_update_running", lambda: (torch.randn(6), torch.rand(6), torch.zeros(6),
                                   torch.ones(6), torch.tensor(3), None, 12, "reference")),
])
def test_opcheck(name, args):
    op = getattr(library, name)
    a = args()
    if name == "bn_scale":
        a = (a[0].requires_grad_(), a[1].requires_grad_(), *a[2:])
    torch.library.opcheck(op, a)


def test_compiled_update_mutates_the_buffers_like_eager():
    def step(m, v, w, rm, rv, nbt):
        return ops.bn_scale(m, v, w, running_mean=rm, running_var=rv, num_batches_tracked=nbt,
                            momentum=None, eps=1e-5, count=20, backend="reference")

    g = torch.Generator().manual_seed(3)
    m, v, w = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.1, torch.randn(5)
    bufs = [torch.zeros(5), torch.ones(5), torch.tensor(2)]
    bufs_c = [b.clone() for b in bufs]
    want = step(m, v, w, *bufs)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(m, v, w, *bufs_c)
    assert torch.equal(got, want)
    for a, b in zip(bufs_c, bufs, strict=True):
        assert torch.equal(a, b)


def test_cuda_backend_runs_its_kernels(monkeypatch):
    """The cuda backend's BatchNorm ops call the extension (not the inherited reference);
    float16 running buffers go to the reference update, which the finalize kernel does not
    take."""
    if _ext.load() is None:
        pytest.skip(f"extension unavailable: {_ext.reason()}")
    from fused_res.backends import cuda_backend
    seen = []

    class Spy:
        def __getattr__(self, name):
            seen.append(name)
            return getattr(_ext.load(), name)

    monkeypatch.setattr(cuda_backend, "_ops", lambda: Spy())
    var = (torch.rand(4) + 0.1).requires_grad_()
    # one finalize computes the scale and updates the statistics
    ops.bn_scale(torch.randn(4), var, torch.ones(4), running_mean=torch.zeros(4),
                 running_var=torch.ones(4), count=6, backend="cuda").sum().backward()
    assert seen == ["bn_finalize", "bn_scale_backward"]
    seen.clear()
    ops.bn_scale(torch.randn(4), var.detach(), None, running_mean=torch.zeros(4).half(),
                 running_var=torch.ones(4).half(), count=6, backend="cuda")
    assert seen == ["bn_scale"]


def test_scale_and_update_is_the_two_ops(backend):
    check_scale_and_update_is_the_two_ops(backend)
