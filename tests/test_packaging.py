"""What an installed copy needs: the built package carries the extension's sources for the JIT
build, a missing source or tool is reported as such, a failed extension build names the
switches that avoid it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fused_res import _ext

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="not a source checkout")
def test_built_package_carries_the_extension_sources(tmp_path):
    lib = tmp_path / "lib"
    env = dict(os.environ, FUSED_RES_BUILD_EXT="0")
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    sources = lib / "fused_res" / "_sources"
    for rel in ("csrc/ops.cpp", "csrc/ops.h", "csrc/cpu/ops_cpu.cpp", "csrc/cuda/ops_cuda.cu"):
        assert (sources / rel).read_bytes() == (ROOT / rel).read_bytes(), rel
    cuh = sorted(p.name for p in (ROOT / "kernels").glob("*.cuh"))
    assert cuh and sorted(p.name for p in (sources / "kernels").glob("*.cuh")) == cuh
    assert not (ROOT / "fused_res" / "_sources").exists()  # the build dir only
    # Imported from there (no checkout beside it), the loader finds the copy.
    code = ("from fused_res import _ext; print(_ext.source_root()); "
            "print(len(_ext._sources(True)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(lib)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(sources), "3"]


def test_missing_sources_are_reported_as_missing_not_as_a_failed_build(tmp_path, monkeypatch):
    monkeypatch.setattr(_ext, "CSRC", tmp_path / "csrc")
    monkeypatch.setattr(_ext, "KERNELS", tmp_path / "kernels")
    monkeypatch.setattr(_ext, "_has_ops", lambda torch: False)
    monkeypatch.setitem(sys.modules, "fused_res._C", None)
    monkeypatch.setenv(_ext.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(_ext.NO_EXT_ENV, raising=False)
    ops, reason, _ = _ext._load()
    assert ops is None
    assert "sources are missing" in reason and "JIT build failed" not in reason, reason
    assert "pip install" in reason and reason.startswith("no prebuilt extension"), reason


def test_a_prebuilt_that_does_not_load_is_named_when_no_jit_build_can_follow(tmp_path,
                                                                            monkeypatch):
    """A wheel's _C built against another torch, on a machine without a compiler: the import
    error is the cause to report (an earlier version said there was no prebuilt at all)."""
    import importlib.abc

    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "fused_res._C":
                raise ImportError("_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")
            return None

    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    monkeypatch.delitem(sys.modules, "fused_res._C", raising=False)
    monkeypatch.setattr(_ext, "_has_ops", lambda torch: False)
    monkeypatch.setenv("CXX", "no-such-c++")
    monkeypatch.setenv(_ext.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(_ext.NO_EXT_ENV, raising=False)
    ops, reason, _ = _ext._load()
    assert ops is None
    assert reason.startswith("the prebuilt extension did not load"), reason
    assert "undefined symbol" in reason and "no C++ compiler" in reason, reason


def test_a_failed_extension_build_logs_the_switches_and_stays_fatal():
    logged = []

    def failing():
        raise RuntimeError("compiler exploded")

    with pytest.raises(RuntimeError, match="compiler exploded") as info:
        _ext.with_build_hint(failing, logged.append)
    assert len(logged) == 1
    assert "FUSED_RES_BUILD_EXT=0" in logged[0] and "FUSED_RES_BUILD_CUDA=0" in logged[0]
    if sys.version_info >= (3, 11):
        assert info.value.__notes__ == [f"fused_res: {logged[0]}"]
    calls = []
    _ext.with_build_hint(lambda: calls.append(1), logged.append)
    assert calls == [1] and len(logged) == 1
