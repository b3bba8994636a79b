"""The compiled extension `fused_res._C` (ops `torch.ops.fused_res_C.*`), loaded lazily.

`load()` returns the op namespace or None. It tries, in order: a prebuilt `fused_res._C`
(built by setup.py), then a JIT build of csrc/ (+ kernels/) with ninja into a cache
($FUSED_RES_CACHE, default ~/.cache/fused_res). The sources are a checkout's csrc/ and
kernels/ beside the package, else the copy a wheel carries in fused_res/_sources/. CUDA
sources are compiled when torch has CUDA and a CUDA toolkit (nvcc) is found -- whether a GPU
is present does not matter. On any failure it warns once, remembers why (`reason()`), and
the package runs on its other backends. FUSED_RES_NO_EXT=1 skips the extension entirely.

Importing fused_res does not import this module's heavy parts: nothing here runs before the
first use of the `cuda` backend. Top-level imports are stdlib only, so setup.py can reuse
`find_cuda_home()` and `pip_cuda_include_dirs()` without importing the package.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import threading
import warnings
from pathlib import Path

NO_EXT_ENV = "FUSED_RES_NO_EXT"
CACHE_ENV = "FUSED_RES_CACHE"
JIT_CUDA_ENV = "FUSED_RES_JIT_CUDA"  # "0": JIT-build the CPU kernels only
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

ROOT = Path(__file__).resolve().parent.parent
# Where setup.py's build_py puts a copy of csrc/ and kernels/ in a built package: an installed
# copy has no checkout beside it, and the JIT build needs them.
PACKAGED_SOURCES = Path(__file__).resolve().parent / "_sources"
BUILD_HINT = (
    "FUSED_RES_BUILD_EXT=0 installs the pure-Python package (the 'cuda' backend then JIT-builds "
    "the extension on first use); FUSED_RES_BUILD_CUDA=0 builds the CPU kernels only")


# What a built package carries there (setup.py's build_py), relative to the checkout.
SOURCE_GLOBS = ("csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.h", "kernels/*.cuh", "kernels/*.h")


def source_root() -> Path:
    """The folder holding csrc/ and kernels/: the checkout when fused_res is imported from one
    (its sources may be edited), else the package's _sources/."""
    if (ROOT / "setup.py").is_file() and (ROOT / "csrc" / "ops.cpp").is_file():
        return ROOT
    return PACKAGED_SOURCES


_SOURCE_ROOT = source_root()
CSRC = _SOURCE_ROOT / "csrc"
KERNELS = _SOURCE_ROOT / "kernels"

_lock = threading.Lock()
_state: dict = {"done": False, "ops": None, "reason": "not loaded yet", "source": None,
                "cuda_kernels": False}


# ---- toolkit discovery (stdlib only; shared with setup.py) --------------------------------

def _is_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file()


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder: $CUDA_HOME / $CUDA_PATH when valid; else the toolkit behind
    the nvcc on PATH, following symlinks and wrapper scripts (`exec /usr/local/cuda-X/bin/nvcc
    "$@"`: torch would guess the wrapper's grandparent, which has no headers); else the
    newest /usr/local/cuda*. None when no toolkit is found."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and _is_toolkit(Path(os.environ[var])):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(os.path.realpath(nvcc))
        if _is_toolkit(real.parent.parent):
            return str(real.parent.parent)
        try:
            head = real.read_bytes()[:4096]
        except OSError:
            head = b""
        if head.startswith(b"#!"):
            for m in re.finditer(rb"(/[^\s'\"]+)/bin/nvcc\b", head):
                home = Path(os.path.realpath(m.group(1).decode(errors="replace")))
                if _is_toolkit(home):
                    return str(home)
    cands = [Path("/usr/local/cuda")] + sorted(
        Path("/usr/local").glob("cuda-*"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)], reverse=True)
    for home in cands:
        if _is_toolkit(home):
            return str(home.resolve())
    return None


def pip_cuda_include_dirs(cuda_home: str | None) -> list[str]:
    """Header folders of the pip CUDA wheels (nvidia/cu13/include, or the per-library cu12
    ones), needed when the toolkit lacks headers that ATen/cuda/CUDAContext.h includes
    (cusparse.h, cublas_v2.h, cusolverDn.h)."""
    if cuda_home and all((Path(cuda_home) / "include" / h).is_file()
                         for h in ("cusparse.h", "cublas_v2.h", "cusolverDn.h")):
        return []
    out = []
    for entry in sys.path:
        base = Path(entry or ".") / "nvidia"
        if not base.is_dir():
            continue
        for sub in ("cu13", "cu12", "cusparse", "cublas", "cusolver", "curand", "cufft"):
            inc = base / sub / "include"
            if inc.is_dir() and str(inc) not in out:
                out.append(str(inc))
    return out


def with_build_hint(build, log) -> None:
    """Run setup.py's extension build; a failure stays fatal but ends with the switches that
    avoid it, which a failed `pip install` would otherwise never mention."""
    try:
        build()
    except Exception as e:
        hint = (f"building the extension failed ({type(e).__name__}). To install without it: "
                f"{BUILD_HINT}.")
        log(hint)
        if hasattr(e, "add_note"):  # Python 3.11+: also after the traceback that pip shows
            e.add_note(f"fused_res: {hint}")
        raise


# ---- loading ------------------------------------------------------------------------------

def reason() -> str:
    """Why the extension is not loaded ('' when it is)."""
    return _state["reason"]


def has_cuda_kernels() -> bool:
    """Whether the loaded extension has its CUDA kernels (asked once, at load: compiled code
    may read the answer, not make the dispatcher call)."""
    load()
    return _state["cuda_kernels"]


def loaded() -> bool:
    """Whether load() has run (whatever it found); reads no lock, so compiled code may ask."""
    return _state["done"]


def source() -> str | None:
    """'prebuilt' or 'jit' once loaded."""
    return _state["source"]


def load():
    """torch.ops.fused_res_C when the extension is (or can be made) available, else None."""
    if _state["done"]:
        return _state["ops"]
    with _lock:
        if not _state["done"]:
            _state["ops"], _state["reason"], _state["source"] = _load()
            if _state["ops"] is not None:
                import torch

                _state["cuda_kernels"] = torch._C._dispatch_has_kernel_for_dispatch_key(
                    "fused_res_C::epilogue", "CUDA")
            _state["done"] = True
            if _state["ops"] is None and _state["reason"] and not os.environ.get(NO_EXT_ENV):
                warnings.warn(f"fused_res: the C++/CUDA extension is unavailable "
                              f"({_state['reason']}); the 'cuda' backend falls back to "
                              "'reference'", stacklevel=2)
    return _state["ops"]


def _reset_for_tests() -> None:
    _state.update(done=False, ops=None, reason="not loaded yet", source=None, cuda_kernels=False)


def _load():
    if os.environ.get(NO_EXT_ENV, "") not in ("", "0"):
        return None, f"${NO_EXT_ENV} is set", None
    import torch

    if _has_ops(torch):
        _register_fakes()
        return torch.ops.fused_res_C, "", "prebuilt"
    prebuilt_error = None
    try:
        import fused_res._C  # noqa: F401  (registers the ops)

        _register_fakes()
        return torch.ops.fused_res_C, "", "prebuilt"
    except ModuleNotFoundError as e:
        if e.name != "fused_res._C":
            prebuilt_error = str(e)
    except ImportError as e:
        prebuilt_error = str(e)
    # A prebuilt that exists but does not import (built against another torch) is the cause
    # worth reporting, whatever the JIT build then says.
    no_prebuilt = prebuilt_error is None
    extra = "" if no_prebuilt else f"; prebuilt: {prebuilt_error}"
    try:
        _jit_build()
    except _NoBuild as e:  # nothing was compiled: say what is missing, not "build failed"
        head = "no prebuilt extension" if no_prebuilt else "the prebuilt extension did not load"
        return None, f"{head}, and it cannot be JIT-built: {e}{extra}", None
    except Exception as e:  # compiler missing, compile error, ...: say why, keep working
        why = _first_error(e)
        return None, f"JIT build failed: {type(e).__name__}: {why[:300]}{extra}", None
    if not _has_ops(torch):
        return None, "the JIT-built library registered no fused_res_C ops", None
    _register_fakes()
    return torch.ops.fused_res_C, "", "jit"


def _first_error(e: BaseException) -> str:
    """The first compiler 'error' line of a failed build, else the exception's last line."""
    cause = e.__cause__
    out = getattr(cause, "output", None) or getattr(cause, "stderr", None) or b""
    text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip() + " (VERBOSE=1 shows the build log)"
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def _has_ops(torch) -> bool:
    try:
        torch.ops.fused_res_C.epilogue  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def jit_with_cuda() -> tuple[bool, str | None]:
    """(compile CUDA sources?, toolkit folder): torch built with CUDA and a toolkit found."""
    import torch

    if os.environ.get(JIT_CUDA_ENV) == "0" or not torch.version.cuda:
        return False, None
    home = find_cuda_home()
    return home is not None, home


class _NoBuild(RuntimeError):
    """A JIT build that was not attempted (sources or tools missing)."""


def _sources(cuda: bool) -> list[str]:
    srcs = [CSRC / "ops.cpp", CSRC / "cpu" / "ops_cpu.cpp"]
    if cuda:
        srcs.append(CSRC / "cuda" / "ops_cuda.cu")
    missing = [str(s) for s in srcs if not s.is_file()]
    if missing:
        raise _NoBuild(f"its sources are missing ({', '.join(missing)}); install fused_res from "
                       "its sdist or a wheel built by its setup.py (they carry the sources), "
                       "or build it in a checkout: pip install --no-build-isolation .")
    return [str(s) for s in srcs]


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fused_res")
    return Path(base)


def _jit_build() -> None:
    import torch

    cuda, home = jit_with_cuda()
    srcs = _sources(cuda)
    h = hashlib.sha256()
    for s in srcs + sorted(str(p) for p in KERNELS.glob("*.cuh")):
        h.update(Path(s).read_bytes())
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{cuda}|{arch}".encode())
    build_dir = cache_dir() / f"ext-{h.hexdigest()[:16]}"
    if not (build_dir / "fused_res_C.so").is_file():  # else ninja finds it up to date
        if shutil.which("ninja") is None:
            try:
                import ninja  # noqa: F401
            except ImportError:
                raise _NoBuild("ninja is not installed (pip install ninja)") from None
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            raise _NoBuild(f"no C++ compiler ({cxx!r} not found)")
    build_dir.mkdir(parents=True, exist_ok=True)

    from torch.utils import cpp_extension

    env_saved = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    saved_home = getattr(cpp_extension, "CUDA_HOME", None)
    include = [str(KERNELS)]
    cflags = ["-O3"]
    cuda_flags = []
    try:
        if cuda:
            os.environ["CUDA_HOME"] = home
            # torch computed its CUDA_HOME at import time, possibly from a wrapper script.
            cpp_extension.CUDA_HOME = home
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
            include += pip_cuda_include_dirs(home)
            cuda_flags = ["-O3"]
        cpp_extension.load(
            name="fused_res_C", sources=srcs, extra_include_paths=include,
            extra_cflags=cflags, extra_cuda_cflags=cuda_flags, build_directory=str(build_dir),
            with_cuda=cuda, is_python_module=False, verbose=bool(os.environ.get("VERBOSE")))
    finally:
        for k, v in env_saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        cpp_extension.CUDA_HOME = saved_home


# ---- fake (meta) kernels: shapes, dtypes, strides of every op -----------------------------

_fakes_registered = [False]


def _register_fakes() -> None:
    if _fakes_registered[0]:
        return
    _fakes_registered[0] = True
    import torch

    from .backends.reference import memory_format_of

    def like(t):
        return torch.empty_like(t, memory_format=memory_format_of(t))

    def one_device(primary, **others):
        """The C++ ops' device check, which never runs once one argument is on `meta`: the
        dispatcher then sends the whole call to these fakes, and a CPU op given a meta
        vector returned uninitialised memory and skipped its in-place updates."""
        for name, t in others.items():
            if isinstance(t, torch.Tensor) and t.device != primary.device:
                raise RuntimeError(f"fused_res_C: {name} is on {t.device}; accepted: the main "
                                   f"input's device {primary.device}")

    def vec(t, n):
        return t.new_empty((n,), dtype=torch.float32)

    @torch.library.register_fake("fused_res_C::channel_stats")
    def _(x):
        return vec(x, x.shape[1]), vec(x, x.shape[1])

    @torch.library.register_fake("fused_res_C::stats_backward")
    def _(gz, gmean, gvar, z, mean):
        one_device(z, gz=gz, gmean=gmean, gvar=gvar, mean=mean)
        return like(z)

    @torch.library.register_fake("fused_res_C::epilogue")
    def _(z, center, scale, shift, relu_mid, residual, res_scale, branch_scale, relu_out):
        one_device(z, center=center, scale=scale, shift=shift, residual=residual,
                   branch_scale=branch_scale)
        return like(z)

    @torch.library.register_fake("fused_res_C::epilogue_backward")
    def _(gy, z, y, center, scale, shift, relu_mid, res_scale, branch_scale, relu_out,
          need_gz, need_gr, need_sums, need_center_grad=False):
        one_device(gy, z=z, y=y, center=center, scale=scale, shift=shift,
                   branch_scale=branch_scale)
        c = gy.shape[1]
        return (like(gy) if need_gz else gy.new_empty((0,)),
                like(gy) if need_gr else gy.new_empty((0,)),
                vec(gy, c) if need_sums else vec(gy, 0),
                vec(gy, c) if (need_sums and z is not None) else vec(gy, 0),
                vec(gy, c) if need_center_grad else vec(gy, 0))

    @torch.library.register_fake("fused_res_C::bn_finalize")
    def _(mean, var, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
          eps, count):
        one_device(mean, var=var, weight=weight, bias=bias, running_mean=running_mean,
                   running_var=running_var, num_batches_tracked=num_batches_tracked)
        return torch.empty_like(mean), torch.empty_like(mean)

    @torch.library.register_fake("fused_res_C::channel_stats_bn")
    def _(x, weight, running_mean, running_var, num_batches_tracked, momentum, eps):
        one_device(x, weight=weight, running_mean=running_mean, running_var=running_var,
                   num_batches_tracked=num_batches_tracked)
        return vec(x, x.shape[1]), vec(x, x.shape[1]), vec(x, x.shape[1])

    @torch.library.register_fake("fused_res_C::bn_epilogue_backward")
    def _(gy, z, y, center, scale, shift, relu_mid, res_scale, branch_scale, relu_out, need_gz,
          need_gr, need_center_grad, bn_var, bn_weight, bn_eps, need_bn_var, need_bn_weight):
        one_device(gy, z=z, y=y, center=center, scale=scale, shift=shift,
                   branch_scale=branch_scale, bn_var=bn_var, bn_weight=bn_weight)
        c = gy.shape[1]
        need_w = need_bn_weight and bn_weight is not None
        return (like(gy) if need_gz else gy.new_empty((0,)),
                like(gy) if need_gr else gy.new_empty((0,)),
                vec(gy, c), vec(gy, c) if need_center_grad else vec(gy, 0),
                torch.empty_like(bn_var) if need_bn_var else vec(gy, 0),
                torch.empty_like(bn_weight) if need_w else vec(gy, 0))

    @torch.library.register_fake("fused_res_C::bn_scale")
    def _(var, weight, eps):
        one_device(var, weight=weight)
        return torch.empty_like(var)

    @torch.library.register_fake("fused_res_C::bn_scale_backward")
    def _(grad, var, weight, eps, need_var, need_weight):
        one_device(var, grad=grad, weight=weight)
        need_weight = need_weight and weight is not None
        return (torch.empty_like(var) if need_var else vec(var, 0),
                torch.empty_like(weight) if need_weight else vec(var, 0))
