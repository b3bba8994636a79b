"""The triton backend on a CUDA device (`pytest -m gpu`): bf16 / fp16 / fp32 (with and without
tf32) against the float64 reference, forward and backward, and a convergence check: a CIFAR
ResNet trained a few hundred steps on synthetic data with and without fusion, same seed, loss
curves agreeing within bf16 noise."""

import copy

import pytest
import torch

from fused_res import ops
from fused_res.backends import registry
from fused_res.testing import TOLERANCES, rel_err

pytestmark = pytest.mark.gpu
D = torch.float64


@pytest.fixture(autouse=True)
def triton_backend():
    from fused_res.backends.triton_backend import TritonBackend
    old = registry._factories["triton"]
    registry.register_backend("triton", TritonBackend)
    registry.get_backend_object("triton")
    yield
    registry.register_backend("triton", old)


def _case(k, s, pad, cin, cout, n=4, h=14, w=13, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, dtype=D, generator=g)
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    maps = dict(x=t(n, cin, h, w), w=t(cout, cin, k, k) / (cin * k * k) ** 0.5, bias=t(cout),
                r=t(n, cout, oh, ow))
    vecs = dict(c_in=t(cin), a_in=torch.rand(cin, dtype=D, generator=g) + 0.5, b_in=t(cin),
                a_out=torch.rand(cout, dtype=D, generator=g) + 0.5, b_out=t(cout),
                d=torch.rand(n, dtype=D, generator=g))
    ours = {k2: v.to("cuda", dtype).contiguous(memory_format=torch.channels_last)
            if v.dim() == 4 else v.to("cuda", dtype) for k2, v in maps.items()}
    ours.update({k2: v.to("cuda", torch.float32) for k2, v in vecs.items()})
    for k2, v in ours.items():
        v.requires_grad_(k2 != "d")
    ref = {k2: v.detach().double().requires_grad_(v.requires_grad) for k2, v in ours.items()}
    return ours, ref, dict(stride=s, padding=pad)


def _unit(a, geo, backend):
    return ops.conv_unit(a["x"], a["w"], a["bias"], **geo, in_center=a["c_in"],
                         in_scale=a["a_in"], in_shift=a["b_in"], act_in="relu",
                         out_scale=a["a_out"], out_shift=a["b_out"], act_mid="relu",
                         residual=a["r"], res_scale=0.7, branch_scale=a["d"], act_out="relu",
                         backend=backend)


SHAPES = [(3, 1, 1, 64, 64), (3, 2, 1, 32, 64), (1, 1, 0, 64, 256), (7, 2, 3, 3, 64),
          (1, 2, 0, 48, 96)]


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, torch.bfloat16),
                                       (torch.float16, torch.float16),
                                       (torch.float32, torch.float32),
                                       (torch.float32, "tf32")],
                         ids=["bf16", "fp16", "fp32", "tf32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "k{}s{}p{}_{}x{}".format(*s))
def test_conv_unit_forward_backward_on_gpu(shape, dtype, tol):
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tol == "tf32"
    try:
        ours, ref, geo = _case(*shape, dtype=dtype)
        y = _unit(ours, geo, "triton")
        y_ref = _unit(ref, geo, "reference")
        assert rel_err(y, y_ref) <= TOLERANCES[tol]
        gy = torch.randn(y_ref.shape, dtype=D, device="cuda")
        names = [k for k, v in ours.items() if v.requires_grad]
        got = torch.autograd.grad(y, [ours[k] for k in names], gy.to(dtype))
        want = torch.autograd.grad(y_ref, [ref[k] for k in names], gy)
        for name, a, b in zip(names, got, want, strict=True):
            err = rel_err(a, b)
            assert err <= TOLERANCES[tol], f"d{name}: {err:.3e}"
    finally:
        torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_conv_bn_stats_and_channel_stats_on_gpu(dtype):
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ours, ref, geo = _case(3, 1, 1, 64, 128, n=8, h=17, w=17, dtype=dtype)
        run = lambda a, b: ops.conv_bn_stats(a["x"], a["w"], a["bias"], **geo,
                                             in_center=a["c_in"], in_scale=a["a_in"],
                                             in_shift=a["b_in"], act_in="relu", backend=b)
        out, out_ref = run(ours, "triton"), run(ref, "reference")
        for o, r in zip(out, out_ref, strict=True):
            assert rel_err(o, r) <= TOLERANCES[dtype]
        x = (torch.randn(16, 64, 28, 28, device="cuda") + 500).to(dtype)
        m, v = ops.channel_stats(x, backend="triton")
        xd = x.double()
        assert rel_err(m, xd.mean((0, 2, 3))) <= TOLERANCES[torch.float32]
        assert rel_err(v, xd.var((0, 2, 3), unbiased=False)) <= TOLERANCES[torch.float32]
    finally:
        torch.backends.cudnn.allow_tf32 = old


def _train(model, steps, seed):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    # Synthetic but learnable: labels are a fixed random linear function of the input.
    proj = torch.randn(3 * 32 * 32, 10, device="cuda", generator=gen) / 55.0
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 3, 32, 32, device="cuda", generator=gen)
        y = (x.flatten(1) @ proj).argmax(1)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_cifar_resnet_converges_like_unfused_in_bf16():
    import fused_res
    from fused_res.models.cifar import cifar_resnet
    torch.manual_seed(0)
    base = cifar_resnet(20).cuda().to(memory_format=torch.channels_last)
    fused = fused_res.convert(copy.deepcopy(base), backend="triton")
    steps = 200
    l_ref = _train(base, steps, seed=1)
    l_fused = _train(fused, steps, seed=1)
    assert torch.isfinite(l_fused).all()
    # It learns: the last 20 steps are well below the first 20.
    assert l_fused[-20:].mean() < 0.8 * l_fused[:20].mean()
    # Same trajectory within bf16 noise: smoothed curves within 5% of each other.
    smooth = lambda v: v.unfold(0, 20, 10).mean(1)
    diff = (smooth(l_fused) - smooth(l_ref)).abs() / smooth(l_ref)
    assert diff.max() < 0.05, f"loss curves diverge: max smoothed rel diff {diff.max():.3f}"
