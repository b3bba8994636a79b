"""Backend registry: default, context manager, environment variable, availability."""

import os
import subprocess
import sys

import pytest
import torch

import fused_res
from fused_res.backends import registry


@pytest.fixture(autouse=True)
def _reset_default():
    fused_res.set_backend(None)
    yield
    fused_res.set_backend(None)


def test_available_backends_say_why_not():
    status = fused_res.available_backends()
    assert set(status) == {"reference", "triton", "cuda", "cudnn", "auto"}
    assert status["reference"].available and status["auto"].available
    for name in ("triton", "cuda", "cudnn"):
        if not status[name].available:
            assert status[name].reason and "unavailable" in str(status[name])


def test_set_and_use_backend_nest_and_restore():
    assert fused_res.current_backend() in registry.NAMES
    fused_res.set_backend("reference")
    assert fused_res.current_backend() == "reference"
    with fused_res.use_backend("auto"):
        assert fused_res.current_backend() == "auto"
        with fused_res.use_backend("reference"):
            assert fused_res.current_backend() == "reference"
        assert fused_res.current_backend() == "auto"
    assert fused_res.current_backend() == "reference"


def test_bad_backend_names():
    with pytest.raises(ValueError, match="accepted"):
        fused_res.set_backend("tensorrt")
    with pytest.raises(ValueError, match="accepted"), fused_res.use_backend("fast"):
        pass


def test_environment_variable_sets_the_default():
    env = dict(os.environ, FUSED_RES_BACKEND="reference")
    code = "import fused_res; print(fused_res.current_backend())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "reference", out.stderr
    env["FUSED_RES_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "FUSED_RES_BACKEND" in out.stderr


def test_auto_resolves_to_an_available_backend():
    x = torch.randn(1, 3, 4, 4)
    name = registry.resolve("auto", x)
    assert fused_res.available_backends()[name].available


def test_cudnn_bias_cast_is_reused_until_the_bias_changes():
    """Reused for a tensor fused_res made (the eval fold's), until it changes; a caller's own
    tensor, which a write through .data could change unseen, is cast per call."""
    from fused_res.backends.constants import mark_constant
    from fused_res.backends.cudnn_backend import cast_cached
    b = mark_constant(torch.randn(8))
    first = cast_cached(b, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, b.to(torch.bfloat16))
    assert cast_cached(b, torch.bfloat16) is first
    assert cast_cached(b, torch.float32) is b
    b.add_(1.0)
    second = cast_cached(b, torch.bfloat16)
    assert second is not first and torch.equal(second, b.to(torch.bfloat16))
    mine = torch.randn(8)
    once = cast_cached(mine, torch.bfloat16)
    mine.data.mul_(2)  # (no version bump)
    assert torch.equal(cast_cached(mine, torch.bfloat16), mine.to(torch.bfloat16))
    assert not torch.equal(once, mine.to(torch.bfloat16))


@pytest.mark.parametrize("act_mid", ["none", "relu"])
@pytest.mark.parametrize("act_out", ["none", "relu"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_branch", [False, True])
def test_cudnn_fast_path_computes_the_unit_wherever_it_applies(monkeypatch, act_mid, act_out,
                                                               with_residual, with_branch):
    """Every unit the cudnn backend sends to cuDNN's fused calls computes the reference's
    function: run here with aten's fused ops emulated in plain aten (CPU), float64."""
    from fused_res.backends.cudnn_backend import CudnnBackend
    from fused_res.backends.reference import ReferenceBackend
    from fused_res.bench.cudnn_fused import emulated_ops

    emu = emulated_ops()
    monkeypatch.setattr(torch.ops.aten, "cudnn_convolution_relu", emu.conv_relu, raising=False)
    monkeypatch.setattr(torch.ops.aten, "cudnn_convolution_add_relu", emu.conv_add_relu,
                        raising=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=g)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=g)
    shift = torch.randn(5, dtype=torch.float64, generator=g)
    r = torch.randn(2, 5, 6, 6, dtype=torch.float64, generator=g) if with_residual else None
    d = torch.rand(2, dtype=torch.float64, generator=g) if with_branch else None
    args = (x, w, None, [1, 1], [1, 1], [1, 1], 1, None, None, None, "none", None, shift,
            act_mid, r, 0.5, d, act_out)
    fused = CudnnBackend.fused_form(None, None, None, "none", act_mid, r, d, act_out)
    assert fused == (d is None and ("relu" in (act_mid, act_out) if r is None
                                    else (act_mid, act_out) == ("none", "relu")))
    if not fused:
        return
    monkeypatch.setattr(CudnnBackend, "fast_path_applies", classmethod(
        lambda cls, x, *a: cls.fused_form(*a)))
    y, u = CudnnBackend().conv_unit_forward(*args)
    y_ref, u_ref = ReferenceBackend().conv_unit_forward(*args)
    assert torch.allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(u > 0, u_ref > 0) or act_mid == "none"
