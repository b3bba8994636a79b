"""Backend selection: a process-wide default, a context manager, an environment variable,
and per-call resolution with a reference fallback that warns once per reason."""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

from .base import Backend, BackendStatus

ENV_VAR = "FUSED_RES_BACKEND"
NAMES = ("reference", "triton", "cuda", "cudnn", "auto")

_factories: dict[str, Callable[[], Backend]] = {}
_instances: dict[str, Backend] = {}
_state = threading.local()
_default: list[str | None] = [None]
_warned: set[str] = set()


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register (or replace) backend `name`. The object is made now, not on first use: a first
    use inside a torch.compile frame would mutate state that dynamo is guarding. Factories
    must therefore be cheap and import nothing heavy (triton, the extension) themselves."""
    _factories[name] = factory
    _instances[name] = factory()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"backend={name!r}; accepted: {', '.join(map(repr, NAMES))}")
    return name


def get_backend_object(name: str) -> Backend:
    _check_name(name)
    if name == "auto":
        raise ValueError("backend='auto' has no object of its own; call resolve()")
    if name not in _instances:
        _instances[name] = _factories[name]()
    return _instances[name]


def instance(name: str) -> Backend | None:
    """The object registered as `name` now (None: none made yet); no checks, for callers
    that ask per call whether an object they hold is still the one in use."""
    return _instances.get(name)


def available_backends() -> dict[str, BackendStatus]:
    """Every backend name with whether it can run here and, if not, why."""
    out = {n: get_backend_object(n).status() for n in NAMES if n != "auto"}
    out["auto"] = BackendStatus(True, "per call, the backend measured fastest and verified "
                                         "by fused_res.autotune() here; else reference")
    return out


def current_backend() -> str:
    """The backend in force: use_backend() > set_backend() > $FUSED_RES_BACKEND > 'auto'."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    if _default[0] is not None:
        return _default[0]
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return _check_name(env)
        except ValueError as e:
            raise ValueError(f"${ENV_VAR}: {e}") from None
    return "auto"


def tracing() -> bool:
    """Whether dynamo is tracing this Python code (not run for real: a non-strict
    torch.export runs it, and may load what it likes)."""
    return getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)()


def prepare(name: str | None) -> str | None:
    """Load what backend `name` needs now, in eager code: the C++/CUDA extension, and for
    'auto' its cache of measured winners (a file) and the backends recorded there. Dynamo
    cannot trace a load (a lock, a file, maybe a build), and a model's first call may be the
    one torch.compile traces: convert(), the fused modules, set_backend() and use_backend()
    call this so that the load is done by then. None stands for the backend in force now
    (current_backend()). Returns `name`."""
    if tracing():
        return name
    names = [current_backend() if name is None else _check_name(name)]
    if names[0] == "auto":
        from . import auto

        names = sorted({e.get("backend") for e in auto.cached().values()} & set(NAMES))
    for n in names:
        if n not in ("auto", "reference"):
            get_backend_object(n).status()
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (None: back to $FUSED_RES_BACKEND or 'auto')."""
    _default[0] = None if name is None else _check_name(name)
    prepare(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed code with backend `name` (thread-local, nests)."""
    _check_name(name)
    prepare(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def warn_once(reason: str) -> None:
    """One warning per reason that a call falls back to the reference. None while dynamo
    traces: it cannot trace warnings.warn (torch.compile(fullgraph=True) of a model whose
    backend falls back failed until an eager call had warned), nor a write to _warned inside
    a higher-order op (checkpoint). The compiled graph runs the same fallback, unannounced."""
    if reason not in _warned and not tracing():
        _warned.add(reason)
        warnings.warn(f"fused_res: {reason}; using the reference backend", stacklevel=3)


def resolve(name: str | None, x: torch.Tensor, weight: torch.Tensor | None = None,
            groups: int = 1, dilation: tuple[int, ...] = (1, 1)) -> str:
    """The concrete backend that runs this call. 'auto' picks the fastest available backend
    that supports the call (today: reference); an explicit backend that cannot run it falls
    back to 'reference' with one warning naming the reason."""
    name = _check_name(name) if name is not None else current_backend()
    if name == "auto":
        # Callers that know the whole call use backends.auto (measured, verified winners per
        # call signature); without that knowledge the safe choice is the reference.
        return "reference"
    if name == "reference":
        return name
    backend = get_backend_object(name)
    status = backend.status()
    if not status.available:
        warn_once(f"backend {name!r} is unavailable ({status.reason})")
        return "reference"
    reason = backend.unsupported_reason(x, weight, groups, dilation)
    if reason is not None:
        warn_once(f"backend {name!r} does not support {reason}")
        return "reference"
    return name
