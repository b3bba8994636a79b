"""A fused model's whole training step captured in one CUDA graph (`pytest -m gpu`).

Launched from Python the fused step is host-bound (README, "Measured so far"); replaying it as
a CUDA graph removes the launch cost, and the benchmark's "+graph" rows are timed that way.
This checks the recipe the README gives users: the step (zero_grad, forward under autocast,
backward, SGD) captured once and replayed gives the parameters and running statistics that the
same steps launched from Python give, for each backend that runs on the GPU.
"""

import contextlib

import pytest
import torch

import fused_res
from fused_res import models
from fused_res.testing import rel_err

pytestmark = pytest.mark.gpu

STEPS = 4


def _initial_state() -> dict:
    torch.manual_seed(0)
    return {k: v.cuda() for k, v in models.resnet20().state_dict().items()}


def _train_state(backend: str, captured: bool, dtype: torch.dtype | None):
    torch.manual_seed(0)
    model = models.resnet20().cuda().to(memory_format=torch.channels_last)
    model = fused_res.convert(model, backend=backend).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randn(16, 3, 32, 32, device="cuda", generator=g).contiguous(
        memory_format=torch.channels_last) for _ in range(STEPS + 3)]
    static = batches[0].clone()

    def step(x):
        opt.zero_grad(set_to_none=True)
        # cache_enabled=False: autocast's cast cache is not capture-safe.
        cast = (torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype is not None
                else contextlib.nullcontext())
        with cast:
            out = model(x)
        loss = out.float().square().mean()
        loss.backward()
        opt.step()
        return loss

    # Three eager steps first, as the recipe does on a side stream: lazy state (momentum
    # buffers, kernel compiles, cuDNN plans) must exist before capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in batches[:3]:
            step(x)
    torch.cuda.current_stream().wait_stream(side)
    if captured:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(static)
        for x in batches[3:]:
            static.copy_(x)
            graph.replay()
    else:
        for x in batches[3:]:
            step(x)
    torch.cuda.synchronize()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
@pytest.mark.parametrize("backend,prologue", [("triton", False), ("triton", True),
                                              ("cuda", False)],
                         ids=["triton", "triton-prologue", "cuda"])
def test_captured_train_step_matches_launched_steps(backend, prologue, dtype, monkeypatch):
    """prologue: each training BN + ReLU in the next conv's prologue (the bench's
    fused-triton-prologue) instead of the backend's default, a pass of its own."""
    # One tile per shape: autotuning every config would spend gpu_check's test budget.
    monkeypatch.setenv("FUSED_RES_TRITON_AUTOTUNE", "0")
    status = fused_res.available_backends()[backend]
    if not status.available:
        pytest.skip(f"backend {backend}: {status.reason}")
    if backend == "cuda":
        from fused_res import _ext
        if not _ext.has_cuda_kernels():
            pytest.skip("the extension was built without its CUDA kernels")
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    # Deterministic cuDNN: the fused kernels are deterministic by design, so the two runs
    # then compute the same values and any difference is the capture's.
    (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = (False, False,
                                                                            True, False)
    try:
        with fused_res.backends.get_backend_object(backend).train_prologue(prologue):
            launched = _train_state(backend, False, dtype)
            replayed = _train_state(backend, True, dtype)
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = flags
    for name, want in launched.items():
        got = replayed[name]
        if not want.is_floating_point():
            assert torch.equal(got, want), name  # num_batches_tracked: one per replay too
            continue
        assert rel_err(got, want) < 1e-5, (name, rel_err(got, want))
    initial = _initial_state()
    assert any(not torch.equal(launched[k], initial[k]) for k in initial
               if k.endswith("conv1.weight")), "no weight moved: the steps did not train"


@pytest.mark.parametrize("backend", ["triton", "cuda", "cudnn"])
def test_float16_eval_captured_before_any_fold_runs_unfolded(backend, monkeypatch):
    """A float16 fold's range check reads values on the host (nn/eval_fold.py), which capture
    forbids: captured with no fold made yet (cleared after the warm-up), the forward runs
    unfolded, raises nothing, and replays eager's answer."""
    from fused_res.nn import eval_fold

    torch.manual_seed(0)
    model = models.resnet20().cuda().half().eval().to(memory_format=torch.channels_last)
    fused = fused_res.convert(model, backend=backend).eval()
    x = torch.randn(8, 3, 32, 32, device="cuda").half().contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fused(x)  # (kernels compiled and tuned, cuDNN plans made) ...
            eval_fold.clear()
            with monkeypatch.context() as m:  # ... for the unfolded path too
                m.setattr(eval_fold, "_capturing", lambda h: True)
                fused(x)
        torch.cuda.current_stream().wait_stream(side)
        eval_fold.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused(x)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, want) <= 5e-3
        block = fused.layer1[0]
        h = torch.empty(8, 16, 32, 32, device="cuda").half().contiguous(
            memory_format=torch.channels_last)
        assert eval_fold.folded_conv(block.conv1, block.bn1, h) is not None  # (after it)
