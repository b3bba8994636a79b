"""Backends that compute the conv-unit ops: reference (composite aten, everywhere), and the
fast ones (triton, cuda, cudnn) as they land; 'auto' picks per call."""

from . import auto
from .base import Backend, BackendStatus
from .cuda_backend import CudaBackend  # loads the extension only when first used
from .cudnn_backend import CudnnBackend
from .reference import ReferenceBackend
from .registry import (
    ENV_VAR,
    NAMES,
    available_backends,
    current_backend,
    get_backend_object,
    prepare,
    register_backend,
    resolve,
    set_backend,
    use_backend,
)
from .triton_backend import TritonBackend  # imports no triton until a kernel runs

register_backend("reference", ReferenceBackend)
register_backend("triton", TritonBackend)
register_backend("cuda", CudaBackend)
register_backend("cudnn", CudnnBackend)

__all__ = ["ENV_VAR", "NAMES", "Backend", "auto", "BackendStatus", "CudaBackend", "CudnnBackend",
           "ReferenceBackend", "TritonBackend", "available_backends", "current_backend",
           "get_backend_object", "prepare", "register_backend", "resolve", "set_backend",
           "use_backend"]
