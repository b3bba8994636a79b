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
    from fused_res.backends.cudnn_backend import cast_cached
    b = torch.randn(8)
    first = cast_cached(b, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, b.to(torch.bfloat16))
    assert cast_cached(b, torch.bfloat16) is first
    assert cast_cached(b, torch.float32) is b
    b.add_(1.0)
    second = cast_cached(b, torch.bfloat16)
    assert second is not first and torch.equal(second, b.to(torch.bfloat16))
