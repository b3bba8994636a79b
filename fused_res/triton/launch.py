"""A shorter host path for launching an already compiled Triton kernel.

`launch(kernel, grid, *args, **kwargs)` does what `kernel[grid](*args, **kwargs)` does. The first
call for a given key goes through Triton's JIT, which compiles (or finds) the kernel, launches
it and returns the compiled kernel; later calls with the same key hand their arguments
straight to that kernel's launcher, the call Triton's JIT ends with.

Why: without CUDA graphs a training step is host-bound. On the H100 of run 5 a ResNet-50
training step with the Triton backend took 98 ms of wall time for 32 ms of kernels, with 424
Triton launches among its 677 kernels (benchmarks/results/2026-11-27-h100-run5, profile-train
and host-profile). Each JIT launch binds its arguments in Python, builds a specialization
list and formats a string key from it; for kernels of 20-40 arguments that is most of the
launch (`python benchmarks/launch_overhead.py` times both paths on any machine, the launcher
itself stubbed out).

Correctness rests on the key. Triton specializes a compiled kernel on the dtype and the
16-byte alignment of each tensor argument, on each integer's value class (== 1, a multiple
of 16, the integer width) and on every constexpr. The key here holds each tensor's dtype and
alignment, each integer's exact value, the type of each float, the keyword arguments' exact
values (constexprs and launch options), the device, and the kernel: anything that changes
Triton's choice of compiled kernel changes the key (a finer key only costs more first calls).
Calls with any other kind of argument (a TMA descriptor, a callable grid, a tensor passed
by keyword) take Triton's own path every time. Launch hooks (profilers) get the same
metadata as from the JIT. Not in the key: Triton's debug switches (TRITON_DEBUG, knobs),
which the JIT reads per launch; a process that flips them after a kernel's first launch
keeps the kernel compiled before.

`FUSED_RES_TRITON_FAST_LAUNCH=0` turns it off. If the installed Triton's launcher does not
take arguments the way this expects (a TypeError on the first direct call), the fast path
turns itself off with one warning and that call is relaunched through the JIT.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton

# (per-argument keys..., device, kernel, keyword values..., keyword names...) -> (launcher,
# function, metadata, compiled kernel, the trailing arguments the JIT fills from keywords and
# defaults)
_CACHE: dict = {}
_MAX_ENTRIES = 4096  # a ResNet-50 train step makes ~200; a runaway key would grow without end
# Read once: a launch is too short to spend a microsecond on the environment.
_STATE = {"on": os.environ.get("FUSED_RES_TRITON_FAST_LAUNCH", "1") != "0"}
_PARAMS: dict = {}  # kernel -> (parameter names in order, their defaults)
_EMPTY = object()
_PLAIN = (bool, int, float, str, type(None))
_JIT = triton.runtime.jit.JITFunction
_TENSOR = torch.Tensor


def enabled() -> bool:
    """Whether launch() may bypass the JIT after a kernel's first launch."""
    return _STATE["on"]


def set_enabled(on: bool) -> None:
    """Turn the direct path on or off (FUSED_RES_TRITON_FAST_LAUNCH sets it at import)."""
    _STATE["on"] = bool(on)
    _CACHE.clear()


def _hooks():
    """(enter hook, exit hook) as the JIT passes them to the launcher, or None where this
    Triton keeps them somewhere this module does not know (then every call takes the JIT)."""
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "launch_enter_hook"):
        return None
    return runtime.launch_enter_hook, runtime.launch_exit_hook


def _arg_keys(args) -> list | None:
    """What of each argument selects Triton's compiled kernel: a tensor's dtype (paired with
    False when its address is not 16-byte aligned), an int's value, the type of a float,
    ("u1", b) for a bool, None; None for an argument of any other kind (the JIT's then)."""
    out = []
    for a in args:
        t = type(a)
        if t is _TENSOR or (t not in _PLAIN and isinstance(a, _TENSOR)):
            out.append(a.dtype if not a.data_ptr() & 15 else (a.dtype, False))
        elif t is int or a is None:
            out.append(a)
        elif t is float:
            out.append(float)
        elif t is bool:
            out.append(("u1", a))
        else:
            return None
    return out


def _params(kernel):
    """The kernel's parameter names in order and their defaults (_EMPTY where none)."""
    got = _PARAMS.get(kernel)
    if got is None:
        sig = kernel.signature.parameters
        names = tuple(sig)
        defaults = tuple(_EMPTY if p.default is p.empty else p.default for p in sig.values())
        got = _PARAMS[kernel] = (names, defaults)
    return got


def _tail(kernel, n_args: int, kwargs: dict):
    """The values of the parameters after the positional ones, as the JIT binds them (from
    the keywords, else the defaults); None if one has neither."""
    names, defaults = _params(kernel)
    out = []
    for name, default in zip(names[n_args:], defaults[n_args:], strict=True):
        if name in kwargs:
            out.append(kwargs[name])
        elif default is not _EMPTY:
            out.append(default)
        else:
            return None
    return tuple(out)


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs): a Triton kernel launch, with the JIT's binding skipped
    once the kernel has been compiled for this key. `grid` is a tuple of 1-3 ints. Returns
    what the JIT returns (the compiled kernel)."""
    if not _STATE["on"] or type(kernel) is not _JIT or type(grid) is not tuple:
        return kernel[grid](*args, **kwargs)
    keys = _arg_keys(args)
    hooks = _hooks()
    if keys is None or hooks is None:
        return kernel[grid](*args, **kwargs)
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    keys.append(device)
    keys.append(kernel)
    keys.extend(kwargs.values())  # call sites pass their keywords in a fixed order ...
    keys.extend(kwargs)  # ... but the names go in too, for any that does not
    try:
        key = tuple(keys)
        entry = _CACHE.get(key)
    except TypeError:  # an unhashable keyword value: only the JIT knows what it means
        return kernel[grid](*args, **kwargs)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        tail = _tail(kernel, len(args), kwargs)
        # Keywords go into the key by value: only plain values may (a tensor or descriptor
        # there would be keyed, and kept alive, by identity).
        if (compiled is not None and tail is not None
                and all(type(v) in _PLAIN for v in kwargs.values())):
            if len(_CACHE) >= _MAX_ENTRIES:
                _CACHE.clear()
            _CACHE[key] = (compiled.run, compiled.function, compiled.packed_metadata, compiled,
                           tail)
        return compiled
    run, function, metadata, compiled, tail = entry
    stream = driver.get_current_stream(device)
    full = args + tail
    n = len(grid)
    g = (grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1)
    try:
        run(g[0], g[1], g[2], stream, function, metadata,
            compiled.launch_metadata(g, stream, *full), hooks[0], hooks[1], *full)
    except TypeError as e:
        # The launcher parses its arguments before launching anything: a mismatch means this
        # Triton passes them differently, never that a kernel ran with the wrong ones.
        set_enabled(False)
        warnings.warn(f"fused_res: Triton {triton.__version__}'s launcher rejected a direct "
                      f"call ({e}); launching through Triton's JIT from now on",
                      RuntimeWarning, stacklevel=2)
        return kernel[grid](*args, **kwargs)
    return compiled
