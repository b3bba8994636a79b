"""The 'auto' backend's memory: per call signature, the fastest backend that was measured AND
verified against the reference on this device, cached on disk.

Outside a tuning session, 'auto' looks the call up and uses the recorded winner, or the
reference when there is none (so an unmeasured backend is never chosen silently). Inside
`fused_res.autotune()`, every available backend runs each new call signature: outputs are
compared with the reference (DESIGN.md §4 tolerance for the dtype), the verified ones are
timed, and the fastest is recorded. The cache is the JSON file $FUSED_RES_AUTO_CACHE (default
~/.cache/fused_res/auto.json), keyed by device name (with the fused_res, torch and Triton
versions the winner was verified under), op, dtype, layout, shapes and flags.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import registry

_cache: dict[str, dict] | None = None
_tuning: list[bool] = [False]
_device_names: dict[str, str] = {}


def cache_path() -> Path:
    path = os.environ.get("FUSED_RES_AUTO_CACHE")
    if path:
        return Path(path)
    return Path(os.path.expanduser("~")) / ".cache" / "fused_res" / "auto.json"


def _load() -> dict[str, dict]:
    global _cache
    if _cache is None:
        path = cache_path()
        try:
            data = json.loads(path.read_text())
        except OSError:  # no cache yet
            data = {}
        except ValueError as e:
            warnings.warn(f"fused_res: the auto cache {path} is not JSON ({e}); ignoring it",
                          stacklevel=3)
            data = {}
        _cache = _valid_entries(data, path)
    return _cache


def _is_entry(key, value) -> bool:
    return isinstance(key, str) and isinstance(value, dict) and isinstance(
        value.get("backend"), str)


def _valid_entries(data, path: Path) -> dict[str, dict]:
    """The entries of a loaded cache that have the shape this module writes (signature ->
    {"backend": name, ...}); one warning naming the file if anything else was in it."""
    if not isinstance(data, dict):
        warnings.warn(f"fused_res: the auto cache {path} holds a {type(data).__name__}, not "
                      "an object of call signatures; ignoring it", stacklevel=4)
        return {}
    good = {k: v for k, v in data.items() if _is_entry(k, v)}
    if len(good) != len(data):
        warnings.warn(f"fused_res: the auto cache {path} has {len(data) - len(good)} entries "
                      "that are not {\"backend\": name, ...}; ignoring them", stacklevel=4)
    return good


def cached() -> dict[str, dict]:
    """The in-memory cache: call signature -> recorded entry."""
    return _load()


def reset() -> None:
    """Forget the in-memory cache (it is read again from disk on next use)."""
    global _cache
    _cache = None


def _device_name(t: torch.Tensor) -> str:
    """The device's name and the versions of what a recorded winner was verified with: a
    winner verified under another fused_res, torch or Triton (kernels, tolerances, aten's
    convs all change between releases) is not one here, and the call runs the reference
    until autotune() measures it again."""
    key = str(t.device)
    if key not in _device_names:
        from .. import __version__
        name = (torch.cuda.get_device_name(t.device) if t.device.type == "cuda"
                else t.device.type)
        try:
            import triton
            tv = triton.__version__
        except ImportError:
            tv = "none"
        _device_names[key] = (f"{name} (fused_res {__version__}, torch {torch.__version__}, "
                              f"triton {tv})")
    return _device_names[key]


def signature(op: str, tensors: dict[str, torch.Tensor | None], settings: tuple) -> str:
    """The cache key of one call: device, op, dtype, layout, every tensor's shape (or '-'),
    and the non-tensor settings (stride, padding, acts, ...)."""
    x = next(t for t in tensors.values() if t is not None)
    layout = "cl" if (x.dim() == 4 and not x.is_contiguous() and
                      x.is_contiguous(memory_format=torch.channels_last)) else "nchw"
    shapes = ",".join(f"{k}={'x'.join(map(str, t.shape)) if t is not None else '-'}"
                      for k, t in tensors.items())
    return "|".join([_device_name(x), op, str(x.dtype).replace("torch.", ""), layout, shapes,
                     repr(settings)])


def lookup(key: str) -> str:
    """The recorded winner for `key` if it can still run here, else 'reference'."""
    entry = _load().get(key)
    if entry is None:
        return "reference"
    name = entry.get("backend", "reference")
    if name not in registry.NAMES or name == "auto":
        return "reference"
    return name if registry.get_backend_object(name).status().available else "reference"


def tuning() -> bool:
    return _tuning[0]


# The signatures looked up inside recording_uses() contexts (innermost last).
_recording: list[set] = []


def record_use(key: str) -> None:
    """Note that an op call on 'auto' looked up `key` (for recording_uses)."""
    if _recording:
        _recording[-1].add(key)


@contextlib.contextmanager
def recording_uses() -> Iterator[set]:
    """Yields the set of signatures 'auto' looks up within the context: what one model's run
    used, out of a cache that may hold other models' too."""
    used: set = set()
    _recording.append(used)
    try:
        yield used
    finally:
        _recording.pop()


def _tolerance(x: torch.Tensor) -> float:
    from ..testing import TOLERANCES
    if x.dtype == torch.float32 and x.device.type == "cuda" and (
            torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32):
        return TOLERANCES["tf32"]
    return TOLERANCES.get(x.dtype, 1e-5)


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def tune_call(key: str, x: torch.Tensor, candidates: list[str],
              run: Callable[[str], object], repeats: int = 5) -> str:
    """Run every candidate backend (the reference among them) on this call, keep those within
    tolerance of the reference, record and return the fastest. Candidates that raise are
    recorded as such."""
    from ..testing import rel_err
    with torch.no_grad():
        ref = _first_tensor(run("reference"))
        tol = _tolerance(x)
        times, errors, failures = {}, {}, {}
        for name in candidates:
            try:
                out = _first_tensor(run(name))  # warm-up (compiles, autotunes) and check
                err = rel_err(out, ref)
                errors[name] = err
                if not err <= tol:
                    failures[name] = f"relative error {err:.2e} > {tol:.0e}"
                    continue
                samples = []
                for _ in range(repeats):
                    _sync(x)
                    t0 = time.perf_counter()
                    run(name)
                    _sync(x)
                    samples.append(time.perf_counter() - t0)
                times[name] = statistics.median(samples)
            except Exception as e:  # noqa: BLE001  a failing backend must not stop tuning
                failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    winner = min(times, key=times.get) if times else "reference"
    _load()[key] = {"backend": winner, "seconds": times, "rel_err": errors,
                    "failed": failures}
    return winner


def candidates_for(x, weight, groups, dilation) -> list[str]:
    """Every registered backend that is available and accepts this call."""
    out = []
    for name in registry.NAMES:
        if name == "auto":
            continue
        backend = registry.get_backend_object(name)
        if backend.status().available and backend.unsupported_reason(
                x, weight, groups, dilation) is None:
            out.append(name)
    return out


def save() -> Path:
    """Merge the in-memory cache into the file on disk; returns its path."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        on_disk = json.loads(path.read_text())
    except (OSError, ValueError):
        on_disk = {}
    if not isinstance(on_disk, dict):  # (what _load warned about is dropped here)
        on_disk = {}
    on_disk = {k: v for k, v in on_disk.items() if _is_entry(k, v)}
    on_disk.update(_load())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(on_disk, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


@contextlib.contextmanager
def autotune() -> Iterator[dict[str, dict]]:
    """Within the context, every op call on backend 'auto' with a new signature measures and
    verifies every available backend and records the winner; on exit the cache is saved.
    Yields the in-memory cache (signature -> entry). Run a representative forward pass inside
    it (eval and train, at the batch size you will use)."""
    _tuning[0] = True
    try:
        yield _load()
    finally:
        _tuning[0] = False
        save()
