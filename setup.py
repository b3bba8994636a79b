"""Build script. Metadata lives in pyproject.toml; this file adds the compiled extension
`fused_res._C` (csrc/ + kernels/) when torch is importable, i.e. when building without
build isolation:

    pip install --no-build-isolation -e .

- CUDA sources are compiled when torch has CUDA and a CUDA toolkit is found ($CUDA_HOME, or
  the toolkit behind the nvcc on PATH, wrapper scripts included) -- never decided from
  whether a GPU is present. TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX" (the PTX lets
  newer GPUs JIT-compile the kernels).
- FUSED_RES_BUILD_CUDA=0: build the CPU kernels only. FUSED_RES_BUILD_EXT=0: pure Python.
- MAX_JOBS is honoured; unset, it is capped by CPU count and free memory.
- Without torch (an isolated build) the package is pure Python; the first use of the `cuda`
  backend then JIT-builds the extension (fused_res/_ext.py) from the copy of csrc/ and
  kernels/ that every built package carries in fused_res/_sources/.
- A failed extension build stays fatal, and says how to install without it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _helpers():
    """fused_res/_ext.py by path (its top level is stdlib only): toolkit discovery shared
    with the JIT loader, without importing the package."""
    spec = importlib.util.spec_from_file_location("_fused_res_ext_helpers",
                                                  HERE / "fused_res" / "_ext.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _log(msg: str) -> None:
    print(f"fused_res setup: {msg}", file=sys.stderr)


def _default_jobs() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    try:
        avail_kb = next(int(line.split()[1]) for line in open("/proc/meminfo")
                        if line.startswith("MemAvailable"))
        by_mem = max(1, avail_kb // (3 * 1024 * 1024))  # nvcc on torch headers: ~2-3 GB
    except (OSError, StopIteration, ValueError):
        by_mem = cpus
    return max(1, min(cpus, by_mem))


class BuildPyWithSources(build_py):
    """build_py that also copies the extension's sources into the built package, so that an
    installed copy (no checkout beside it) can JIT-build the extension."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # the package is the checkout: csrc/ is there
            return
        dest = Path(self.build_lib) / "fused_res" / "_sources"
        for pattern in _helpers().SOURCE_GLOBS:
            for src in sorted(HERE.glob(pattern)):
                out = dest / src.relative_to(HERE)
                self.mkpath(str(out.parent))
                self.copy_file(str(src), str(out))


def _ext_modules():
    if os.environ.get("FUSED_RES_BUILD_EXT", "1") == "0":
        _log("FUSED_RES_BUILD_EXT=0: pure-Python build")
        return [], {}
    try:
        import torch
    except ImportError:
        _log("torch is not importable (isolated build?): pure-Python build; the extension "
             "is JIT-built on first use")
        return [], {}
    helpers = _helpers()
    cuda_home = None
    if torch.version.cuda and os.environ.get("FUSED_RES_BUILD_CUDA", "1") != "0":
        cuda_home = helpers.find_cuda_home()
        if cuda_home is None:
            _log(f"torch has CUDA {torch.version.cuda} but no CUDA toolkit (nvcc) was found: "
                 "building the CPU kernels only")
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported; its own guess from
        # a wrapper nvcc (e.g. /usr/local/bin/nvcc) points at a folder without headers.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", helpers.DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", str(_default_jobs()))
    from torch.utils import cpp_extension

    if cuda_home and cpp_extension.CUDA_HOME != cuda_home:
        cpp_extension.CUDA_HOME = cuda_home
    sources = ["csrc/ops.cpp", "csrc/cpu/ops_cpu.cpp"]
    include_dirs = [str(HERE / "kernels")]
    kwargs = {"extra_compile_args": {"cxx": ["-O3"]}}
    if cuda_home:
        sources.append("csrc/cuda/ops_cuda.cu")
        include_dirs += helpers.pip_cuda_include_dirs(cuda_home)
        kwargs["extra_compile_args"]["nvcc"] = ["-O3"]
        ext = cpp_extension.CUDAExtension("fused_res._C", sources, include_dirs=include_dirs,
                                          **kwargs)
        _log(f"building fused_res._C with CUDA ({cuda_home}; TORCH_CUDA_ARCH_LIST="
             f"{os.environ['TORCH_CUDA_ARCH_LIST']}; MAX_JOBS={os.environ['MAX_JOBS']})")
    else:
        ext = cpp_extension.CppExtension("fused_res._C", sources, include_dirs=include_dirs,
                                         **kwargs)
        _log(f"building fused_res._C, CPU kernels only (MAX_JOBS={os.environ['MAX_JOBS']})")

    class BuildExtWithHint(cpp_extension.BuildExtension):
        def run(self):
            helpers.with_build_hint(super().run, _log)

    return [ext], {"build_ext": BuildExtWithHint}


_exts, _cmds = _ext_modules()
setup(ext_modules=_exts, cmdclass={"build_py": BuildPyWithSources, **_cmds})
