"""The Triton backend's TMA conv (fused_res/triton/conv_tma.py: 1x1 stride-1 convs with
TMA-loaded operands, opt-in) on an sm_90 or newer GPU (`pytest -m gpu`): every benchmark tile
against the float64 reference, and ResNet-50 stages under FUSED_RES_TRITON_TMA=1 as accurate
as the pointer kernels. A file of its own so that gpu_check.sh runs it as a step of its own:
its compiles cannot push the other Triton GPU tests past their time limit."""

import pytest
import torch
from test_triton_gpu import D, _case, _within, triton_backend  # noqa: F401 (autouse fixture)

from fused_res import ops
from fused_res.testing import TOLERANCES, rel_err

pytestmark = pytest.mark.gpu


def _hopper() -> bool:
    return torch.cuda.get_device_capability()[0] >= 9


def _tma_tiles():
    from fused_res.triton import configs
    return [str(c) for c in configs.TMA_SWEEP_CONFIGS]


# (C_in, C_out, hw): ResNet-50's 1x1 shape furthest from cuDNN in run 5 (2048 -> 512 at 7x7),
# and one with a partial last K and N tile for every TMA tile (72 = 64 + 8 channels in, 80
# out), where the descriptors' zero fill past the edges is what keeps the sums right. At
# batch 5 both leave a partial last row tile too (245 and 405 output pixels).
@pytest.mark.parametrize("shape", [(2048, 512, 7), (72, 80, 9)], ids=["l4_conv1", "edges"])
@pytest.mark.parametrize("tile", _tma_tiles())
def test_tma_tiles_on_gpu(tile, shape):
    """The benchmark's TMA tiles (conv_tma.py, configs.TMA_SWEEP_CONFIGS) on the GPU, bf16:
    the statistics epilogue and the full tail with u, against the float64 reference. sm_90
    and newer only (TMA). The tiles FUSED_RES_TRITON_TMA=1 runs take the model test below."""
    if not _hopper():
        pytest.skip("TMA tiles run on sm_90 and newer")
    from fused_res.triton import configs
    from fused_res.triton.conv import conv_launch
    from fused_res.triton.elementwise import stats_finalize
    cfg = next(c for c in configs.TMA_SWEEP_CONFIGS if str(c) == tile)
    cin, cout, hw = shape
    ours, ref, _ = _case(1, 1, 0, cin, cout, n=5, h=hw, w=hw)
    a = {k: v.detach() for k, v in ours.items()}
    r = {k: v.detach() for k, v in ref.items()}
    with torch.no_grad():
        z, parts = conv_launch(a["x"], a["w"], a["bias"], (1, 1), (0, 0), None, None, None,
                               "none", stats=True, memory_format=torch.channels_last,
                               config=cfg)
        mean, var = stats_finalize(parts, z.shape[1])
        z_ref, _, _ = ops.conv_bn_stats(r["x"], r["w"], r["bias"], backend="reference")
        y, u = conv_launch(a["x"], a["w"], a["bias"], (1, 1), (0, 0), None, None, None,
                           "none", out_scale=a["a_out"], out_shift=a["b_out"],
                           act_mid="relu", residual=a["r"], res_scale=0.7,
                           branch_scale=a["d"], act_out="relu", store_u=True,
                           memory_format=torch.channels_last, config=cfg)
        y_ref = ops.conv_unit(r["x"], r["w"], r["bias"], out_scale=r["a_out"],
                              out_shift=r["b_out"], act_mid="relu", residual=r["r"],
                              res_scale=0.7, branch_scale=r["d"], act_out="relu",
                              backend="reference")
    assert rel_err(z, z_ref) <= TOLERANCES[torch.bfloat16]
    assert rel_err(y, y_ref) <= TOLERANCES[torch.bfloat16]
    zd = z.double()
    assert rel_err(mean, zd.mean((0, 2, 3))) <= TOLERANCES[torch.float32]
    assert rel_err(var, zd.var((0, 2, 3), unbiased=False)) <= TOLERANCES[torch.float32]


def _resnet50_stage_runs(dtype, monkeypatch):
    """ResNet-50's layer1 + layer2 (eval forward) and layer1's second block (a train step
    with a random output gradient): float64, then fused with the pointer kernels, then with
    FUSED_RES_TRITON_TMA=1. Returns {run: [tensors]} and the count of TMA launches."""
    import copy

    import fused_res
    import fused_res.triton.conv_tma as conv_tma
    from fused_res import models
    torch.manual_seed(0)
    net = models.resnet50()
    stages = torch.nn.Sequential(net.layer1, net.layer2).cuda().to(
        memory_format=torch.channels_last)
    block = net.layer1[1]  # 256 -> 64 -> 256, stride 1: conv1 and conv3 are TMA's
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4, 64, 20, 20, device="cuda", generator=g).contiguous(
        memory_format=torch.channels_last)
    xb = torch.randn(4, 256, 20, 20, device="cuda", generator=g).contiguous(
        memory_format=torch.channels_last)
    gy = torch.randn(4, 256, 20, 20, device="cuda", generator=g, dtype=D)
    import fused_res.triton.conv as conv
    launches, descs = [], []
    real = conv_tma.launch
    monkeypatch.setattr(conv_tma, "launch", lambda *q, **k: launches.append(1) or real(*q, **k))
    real_desc = conv._weight_descriptor

    def counted_desc(*q):
        d = real_desc(*q)
        descs.append(d is not None)
        return d
    monkeypatch.setattr(conv, "_weight_descriptor", counted_desc)

    def run(s, b, xx, xxb, autocast):
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=autocast):
            y_eval = s.eval()(xx)
        b.train()
        xa = xxb.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            y = b(xa)
        y.backward(gy.to(y.dtype))
        return [y_eval, y, xa.grad, *(p.grad for p in b.parameters()),
                *(t for t in b.buffers() if t.is_floating_point())]

    out = {"ref": run(copy.deepcopy(stages).double(), copy.deepcopy(block).double(),
                      x.double(), xb.double(), False)}
    low = dtype != torch.float32
    for name, tma in (("pointer", "0"), ("tma", "1")):
        monkeypatch.setenv("FUSED_RES_TRITON_TMA", tma)
        n0, d0 = len(launches), sum(descs)
        out[name] = run(fused_res.convert(copy.deepcopy(stages), backend="triton"),
                        fused_res.convert(copy.deepcopy(block), backend="triton"), x, xb, low)
        # Both TMA paths ran exactly when asked: the 1x1 kernel, and weight tiles by TMA for
        # the 3x3 convs and stride-2 projections.
        assert (len(launches) > n0) == (tma == "1"), name
        assert (sum(descs) > d0) == (tma == "1"), name
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, torch.bfloat16),
                                       (torch.float32, torch.float32)], ids=["bf16", "fp32"])
def test_tma_requested_resnet50_is_as_accurate_as_the_pointer_kernels(dtype, tol,
                                                                       monkeypatch):
    """FUSED_RES_TRITON_TMA=1 (the 1x1 stride-1 convs through conv_tma, the 3x3 convs and
    stride-2 projections with TMA weight tiles) on ResNet-50's first two stages (eval) and one
    of its blocks (a train step: output, every gradient, the running statistics): each tensor
    within the
    dtype's tolerance of float64, or within EAGER_FACTOR times the pointer kernels' own error
    where rounding makes that larger (the two differ in tile and accumulation order, not in
    quality; float32 without tf32)."""
    if not _hopper():
        pytest.skip("TMA tiles run on sm_90 and newer")
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        out = _resnet50_stage_runs(dtype, monkeypatch)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    failed = []
    for i, (tma, ref, pointer) in enumerate(zip(out["tma"], out["ref"], out["pointer"],
                                                strict=True)):
        ok, msg = _within(tma, ref, pointer, tol)
        if not ok:
            failed.append(f"tensor {i}: {msg}")
    assert not failed, "; ".join(failed)
    # The check can fail: the eval output 5% off is out of budget.
    assert not _within(out["tma"][0] * 1.05, out["ref"][0], out["pointer"][0], tol)[0]


def _tma_b_tiles():
    from fused_res.triton import configs
    return [str(c) for c in configs.TMA_B_SWEEP_CONFIGS]


@pytest.mark.parametrize("tile", _tma_b_tiles())
def test_tma_b_tiles_on_gpu(tile):
    """The implicit-GEMM kernel with its weight tiles loaded by TMA (configs with tma_b) on
    the GPU, bf16: a 3x3 stride-2 conv on an odd 15x15 input with the BN+ReLU prologue and the
    statistics epilogue, and with the full tail; C_out = 136 leaves a partial last N tile for
    every tile (zero-filled by the descriptor). Against the float64 reference; sm_90 and
    newer only."""
    if not _hopper():
        pytest.skip("TMA tiles run on sm_90 and newer")
    from test_triton_gpu import check_tile_with_prologue_on_gpu

    from fused_res.triton import configs
    cfg = next(c for c in configs.TMA_B_SWEEP_CONFIGS if str(c) == tile)
    check_tile_with_prologue_on_gpu(cfg, 2, 128, 136, n=6, hw=15)


@pytest.mark.parametrize("kind", ["1x1", "weights"])
def test_autotuned_tma_on_gpu(kind, monkeypatch):
    """Autotuning on (what FUSED_RES_TRITON_TMA=1 runs outside gpu_check, whose steps tune
    nothing): every TMA config is timed with the descriptor blocks its pre-hook set, and the
    winner computes the conv and its statistics, bf16, against float64. 1x1: conv_tma's
    kernel; weights: a 3x3 conv with TMA weight tiles."""
    if not _hopper():
        pytest.skip("TMA tiles run on sm_90 and newer")
    import fused_res.triton.conv as conv
    from fused_res.triton.elementwise import stats_finalize
    monkeypatch.setattr(conv, "autotune_enabled", lambda: True)
    k, pad, cin, cout = (1, 0, 256, 128) if kind == "1x1" else (3, 1, 96, 128)
    ours, ref, _ = _case(k, 1, pad, cin, cout, n=4, h=14, w=14)
    a = {n: v.detach() for n, v in ours.items()}
    r = {n: v.detach() for n, v in ref.items()}
    with torch.no_grad():
        z, parts = conv.conv_launch(a["x"], a["w"], a["bias"], (1, 1), (pad, pad), None, None,
                                    None, "none", stats=True,
                                    memory_format=torch.channels_last, tma=True)
        mean, var = stats_finalize(parts, z.shape[1])
        z_ref, _, _ = ops.conv_bn_stats(r["x"], r["w"], r["bias"], padding=pad,
                                        backend="reference")
    assert rel_err(z, z_ref) <= TOLERANCES[torch.bfloat16]
    zd = z.double()
    assert rel_err(mean, zd.mean((0, 2, 3))) <= TOLERANCES[torch.float32]
    assert rel_err(var, zd.var((0, 2, 3), unbiased=False)) <= TOLERANCES[torch.float32]
