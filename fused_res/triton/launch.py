"""A shorter host path for launching an already compiled Triton kernel.

`launch(kernel, grid, *args, **kwargs)` does what `kernel[grid](*args, **kwargs)` does. The first
call for a given key goes through Triton's JIT, which compiles (or finds) the kernel, launches
it and returns the compiled kernel; later calls with the same key hand their arguments
straight to that kernel's launcher, the call Triton's JIT ends with.

Why: without CUDA graphs a training step is host-bound. On the H100 of run 5 a ResNet-50
training step with the Triton backend took 98 ms of wall time for 32 ms of kernels, with 424
Triton launches among its 677 kernels (benchmarks/results/2026-11-27-h100-run5, profile-train
and host-profile). Each JIT launch binds its arguments in Python, builds a specialization
list and formats a string key from it; for kernels of 20-70 arguments that is most of the
launch (`python benchmarks/launch_overhead.py` times both paths on any machine, the launcher
itself stubbed out).

Correctness rests on two things:
- The call. The direct path is used only where this Triton's JITFunction.run calls the
  launcher exactly as launch() does (its source is checked once); elsewhere every launch
  takes the JIT. Triton's launcher does not check how many arguments it gets, so a mismatch
  would not fail loudly: hence the check rather than a fallback on error.
- The key. Triton specializes a compiled kernel on the dtype and 16-byte alignment of each
  tensor argument, each integer's value class (== 1, a multiple of 16, its width), the value
  of every constexpr, and its debug and instrumentation switches. The key holds each
  tensor's dtype and alignment, each int's exact value, the type of each float, each bool,
  the keyword arguments' exact values and types, the device, the kernel and those switches:
  whatever changes Triton's choice of compiled kernel changes the key (a finer key only costs
  more first calls). Calls the key cannot describe are never cached and always take the JIT:
  a constexpr passed positionally, a runtime argument passed by keyword, an argument of
  another kind (a TMA descriptor), a callable grid, a kernel with pre-run hooks, a stages
  inspection hook. Launch hooks (profilers) get the same metadata as from the JIT. Not
  checked: the JIT's guard against a global a kernel reads changing after it was compiled.

`FUSED_RES_TRITON_FAST_LAUNCH=0` (read at import) or `set_enabled(False)` turns it off.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch
import triton

# (per-argument keys..., device, kernel, Triton's debug switch and instrumentation mode,
# keyword values..., keyword names..., keyword value types...) -> [launcher, function,
# metadata, compiled kernel, the trailing arguments the JIT fills from keywords and defaults]
_CACHE: dict = {}
_MAX_ENTRIES = 4096  # a ResNet-50 train step makes ~200; a runaway key would grow without end
# Read once: a launch is too short to spend a microsecond on the environment. "compatible":
# whether this Triton's JIT calls the launcher as launch() does (None: not yet checked).
_STATE = {"on": os.environ.get("FUSED_RES_TRITON_FAST_LAUNCH", "1") != "0", "compatible": None}
_PARAMS: dict = {}  # kernel -> (names, defaults, constexpr flags, constexpr names)
_EMPTY = object()
_PLAIN = (bool, int, float, str, type(None))
_JIT = triton.runtime.jit.JITFunction
_TENSOR = torch.Tensor
# What JITFunction.run does last, whitespace aside: the call launch() repeats.
_JIT_LAUNCH = (
    "launch_metadata = kernel.launch_metadata(grid, stream, *bound_args.values())",
    "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, "
    "launch_metadata, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, "
    "*bound_args.values())",
)


def enabled() -> bool:
    """Whether launch() may bypass the JIT after a kernel's first launch."""
    return _STATE["on"] and _compatible()


def set_enabled(on: bool) -> None:
    """Turn the direct path on or off (FUSED_RES_TRITON_FAST_LAUNCH sets it at import); it
    stays off where this Triton's JIT launches differently (see the module docstring)."""
    _STATE["on"] = bool(on)
    _CACHE.clear()


def _compatible() -> bool:
    """Whether this Triton's JITFunction.run ends with the launcher call launch() makes
    (checked once). Its other switches (debug, instrumentation, the stages hook) are read
    where this Triton has them: a Triton without one does not select kernels by it."""
    if _STATE["compatible"] is None:
        try:
            src = " ".join(inspect.getsource(_JIT.run).split())
            ok = (all(" ".join(c.split()) in src for c in _JIT_LAUNCH)
                  and hasattr(triton.knobs.runtime, "launch_enter_hook"))
        except (AttributeError, OSError, TypeError):
            ok = False
        _STATE["compatible"] = ok
    return _STATE["compatible"]


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
    """The kernel's parameter names in order, their defaults (_EMPTY where none), whether
    each is a constexpr, and the set of constexpr names."""
    got = _PARAMS.get(kernel)
    if got is None:
        sig = kernel.signature.parameters
        names = tuple(sig)
        defaults = tuple(_EMPTY if p.default is p.empty else p.default for p in sig.values())
        flags = tuple(bool(p.is_constexpr) for p in kernel.params)
        got = _PARAMS[kernel] = (names, defaults, flags,
                                 {n for n, f in zip(names, flags, strict=True) if f})
    return got


def _tail(kernel, args: tuple, kwargs: dict):
    """The values of the parameters after the positional ones, as the JIT binds them (from
    the keywords, else the defaults); None where the key could not describe the call: a
    constexpr passed positionally (floats are keyed by type), a runtime argument passed by
    keyword (its stored value would be reused), a keyword value that is not plain data, a
    parameter with neither."""
    names, defaults, constexpr, constexpr_names = _params(kernel)
    if any(constexpr[:len(args)]) or not all(k in constexpr_names for k in kwargs
                                             if k in names):
        return None
    if not all(type(v) in _PLAIN for v in kwargs.values()):
        return None
    out = []
    for name, default in zip(names[len(args):], defaults[len(args):], strict=True):
        if name in kwargs:
            out.append(kwargs[name])
        elif default is not _EMPTY:
            out.append(default)
        else:
            return None
    return tuple(out)


def _switches(runtime) -> tuple:
    """Triton's switches that select a compiled kernel: its debug flag and instrumentation
    mode (None where this Triton has no such switch)."""
    return (getattr(runtime, "debug", None),
            getattr(triton.knobs.compilation, "instrumentation_mode", None))


def _direct(kernel, grid) -> bool:
    """Whether a launch of kernel on grid may take the direct path at all."""
    return (_STATE["on"] and type(kernel) is _JIT and type(grid) is tuple
            and not kernel.pre_run_hooks and _compatible()
            and getattr(triton.knobs.runtime, "add_stages_inspection_hook", None) is None)


def _key(kernel, args, kwargs, device) -> tuple | None:
    """The direct path's cache key of this call (see the module docstring), or None where it
    cannot describe it (unhashable where a keyword value is: _entry)."""
    keys = _arg_keys(args)
    if keys is None:
        return None
    keys.append(device)
    keys.append(kernel)
    keys.extend(_switches(triton.knobs.runtime))
    keys.extend(kwargs.values())  # call sites pass their keywords in a fixed order ...
    keys.extend(kwargs)  # ... but the names go in too, for any that does not,
    keys.extend(map(type, kwargs.values()))  # and the types (True == 1 == 1.0)
    return tuple(keys)


def _entry(key: tuple | None):
    """The cached launch of this key (None: none yet, or no key), or False where the key
    cannot be hashed (an unhashable keyword value: only the JIT knows what it means)."""
    if key is None:
        return False
    try:
        return _CACHE.get(key)
    except TypeError:
        return False


def foreign_device(args) -> int | None:
    """The CUDA device of a launch's first tensor argument where it is not the current
    device, else None. Triton launches on the current device and its stream, whatever the
    tensors' device: a model on cuda:1 while cuda:0 is current (model parallelism, no
    set_device) would run its kernels on the wrong GPU."""
    for a in args:
        if isinstance(a, _TENSOR):
            index = a.get_device()
            return index if index >= 0 and index != torch.cuda.current_device() else None
    return None


def on_device(args):
    """A context in which a launch with these arguments runs on their tensors' device (see
    foreign_device); for the launches made through Triton's JIT or autotuner directly."""
    index = foreign_device(args)
    return torch.cuda.device(index) if index is not None else contextlib.nullcontext()


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs): a Triton kernel launch, with the JIT's binding skipped
    once the kernel has been compiled for this key. `grid` is a tuple of 1-3 ints. Returns
    what the JIT returns (the compiled kernel). It runs on its tensors' device."""
    index = foreign_device(args)
    if index is not None:
        with torch.cuda.device(index):
            return launch(kernel, grid, *args, **kwargs)
    if not _direct(kernel, grid):
        return kernel[grid](*args, **kwargs)
    runtime = triton.knobs.runtime
    driver = triton.runtime.driver.active
    device = driver.get_current_device()
    key = _key(kernel, args, kwargs, device)
    entry = _entry(key)
    if entry is False:
        return kernel[grid](*args, **kwargs)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        tail = _tail(kernel, args, kwargs)
        if compiled is not None and tail is not None:
            if len(_CACHE) >= _MAX_ENTRIES:
                _CACHE.clear()
            # A list, which Bound launches share: benchmarks/host_overhead.py swaps the
            # launcher in place for theirs too.
            _CACHE[key] = [compiled.run, compiled.function, compiled.packed_metadata, compiled,
                           tail]
        return compiled
    return _run(entry, grid, args, driver, device, runtime)


def _run(entry, grid: tuple, args: tuple, driver, device, runtime):
    """A cached entry's launcher call, as JITFunction.run ends (the module docstring)."""
    run, function, metadata, compiled, tail = entry
    stream = driver.get_current_stream(device)
    full = args + tail
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, function, metadata,
        compiled.launch_metadata(grid, stream, *full), runtime.launch_enter_hook,
        runtime.launch_exit_hook, *full)
    return compiled


def _aligned(t) -> bool:
    """Whether a tensor's address is 16-byte aligned (what Triton specializes on)."""
    return not t.data_ptr() & 15


class Bound:
    """A launch of one compiled kernel on a fixed grid with fixed keywords, for positional
    arguments that keep the bound call's key: launch() without computing the key again.
    Made by bind(); see there for what the caller keeps the same."""

    __slots__ = ("kernel", "grid", "kwargs", "entry", "device", "switches", "tensors",
                 "aligned")

    def __call__(self, args: tuple) -> None:
        """Launch with `args` (a tuple). Where anything the call's key holds and this checks
        has changed (the alignment of a tensor, the current device, Triton's switches, the
        direct path turned off), it launches through launch() instead, which decides
        afresh."""
        kernel, grid = self.kernel, self.grid
        runtime = triton.knobs.runtime
        driver = triton.runtime.driver.active
        device = driver.get_current_device()
        if (device != self.device or not _direct(kernel, grid)
                or _switches(runtime) != self.switches
                or any(_aligned(args[i]) != a
                       for i, a in zip(self.tensors, self.aligned, strict=True))):
            launch(kernel, grid, *args, **self.kwargs)
            return
        _run(self.entry, grid, args, driver, device, runtime)


def bind(kernel, grid, args: tuple, kwargs: dict, varying: tuple | None = None
         ) -> Bound | None:
    """The launch of a call launch() has made (and cached) before, for calls whose positional
    arguments differ from `args` only in which tensors they are: each of the same dtype, and
    every int, float type and bool the same. The caller keeps that promise; the returned
    Bound checks the rest per call: the current device, Triton's switches, and the 16-byte
    alignment of the tensors at the positions `varying` (None: every tensor's; a caller
    that passes the same tensor objects elsewhere on every call, tensors nobody re-points,
    names only the others). None where the direct path does not hold this call (turned off,
    an incompatible Triton, the interpreter, not yet launched with this key)."""
    if not _direct(kernel, grid):
        return None
    device = triton.runtime.driver.active.get_current_device()
    entry = _entry(_key(kernel, args, kwargs, device))
    if not entry:
        return None
    b = Bound()
    b.kernel, b.grid, b.kwargs, b.entry, b.device = kernel, grid, dict(kwargs), entry, device
    b.switches = _switches(triton.knobs.runtime)
    b.tensors = tuple(i for i, a in enumerate(args) if isinstance(a, _TENSOR)
                      and (varying is None or i in varying))
    b.aligned = tuple(_aligned(args[i]) for i in b.tensors)
    return b
