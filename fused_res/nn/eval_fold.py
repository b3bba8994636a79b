"""Inference: a conv's weight with its eval-mode BatchNorm folded in, computed once and reused.

Folding per call costs several small kernels per unit (rsqrt of the running variance, the
scaled weight, the autocast cast, a layout change for channels_last) that the fused kernel
then has to wait for; on an H100 they made fused ResNet-50 inference twice as slow as the same
cuDNN kernels on weights folded ahead of time. The cache holds, per conv module, the folded
weight in the compute dtype and memory format, and the folded bias in float32, and is keyed by
everything the fold reads: the identity, version counter and storage of the conv's and BN's
parameters and running statistics (an optimizer step or load_state_dict bumps them), eps,
dtype, device and layout. It is used only where no gradient can flow (no_grad /
inference_mode), never while torch.compile traces (the compiled graph folds on its own), and
never for float64.

The fused optimizers (`torch.optim.SGD/Adam/AdamW(fused=True)`) write the parameters without
bumping their version counters: every optimizer step, of any optimizer, starts a new
generation of the cache (a global step hook), or fine-tuning with frozen BatchNorms would have
validated with the weights from before training.

A write through `.data` (`conv.weight.data.copy_(w)`) bypasses the version counter, so no
cache can see it: write under torch.no_grad() instead, or call clear() after such writes. So
does an in-place change of a vector whose slices torch.nn.utils.vector_to_parameters made
the parameters (it assigns `.data`).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .._eager import transformed
from ..backends.constants import mark_constant
from ..backends.reference import memory_format_of
from ..ops import functional
from .batchnorm import ChannelAffine, running_affine

# conv -> (key, refs, (W', b')): its fold (_kept).
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_generation = 0
# The inference plans made with the folds (fused_res/ops/plans.py), which hold a fold's
# tensors while they live: conv -> its unit's last ops.ConvUnitPlan (nn/unit.py), block -> its
# pair's last ops.ConvPairPlan (nn/blocks.py). One per module; clear() forgets them too.
PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
PAIR_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# bn -> (key, refs, its ChannelAffine): an eval-mode BatchNorm applied to a tensor itself
# (a pre-activation block's first BN, a BN after the addition), kept as the folds are.
_AFFINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    global _generation
    _generation += 1


_previous = globals().get("_STEP_HOOK")
if _previous is not None:  # (importlib.reload: one hook, not two)
    _previous.remove()
_STEP_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


def clear() -> None:
    """Forget every cached fold (after writes the version counters cannot see), and the
    inference plans made with them."""
    _CACHE.clear()
    _AFFINES.clear()
    PLANS.clear()
    PAIR_PLANS.clear()


def applies(h: Tensor) -> bool:
    """Whether the fold may be cached for a call on input h. Not under a torch.func
    transform: vmap's batched parameters (model ensembling) have no storage to key on."""
    return (not torch.is_grad_enabled() and h.dtype != torch.float64
            and h.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not transformed())


def _compute_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ops.conv_unit will run the weight in (autocast casts float32 only)."""
    dt = functional._autocast_dtype(h)
    return dt if dt is not None and weight.dtype == torch.float32 else weight.dtype


def _inputs(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple:
    """What the fold reads: the conv's weight and bias, the BN's weight, bias and running
    statistics (none without a BN). Read from the modules' own dicts: through
    nn.Module.__getattr__ these six lookups cost more than the rest of a cache hit (this runs
    for every unit of every eval call); a module whose weight is not a plain parameter
    (torch.nn.utils.parametrize) is read through its attributes (a new tensor per read:
    never a cache hit)."""
    try:
        pc = conv._parameters
        own = pc["weight"], pc["bias"]
    except KeyError:
        own = conv.weight, conv.bias
    return own if bn is None else own + _bn_inputs(bn)


def _refs(tensors: tuple) -> tuple:
    """Each tensor itself and a weak reference to its storage, for _same. The tensors are held
    strongly: a weak reference on a tensor makes torch.utils.swap_tensors refuse it (which
    nn.Module._apply and load_state_dict use under set_swap_module_params_on_conversion, and
    for tensor subclasses), and an id without the object can be reused by another tensor
    (functional_call's). Held, a replaced tensor stays alive until this conv folds again or
    clear(): one set of its inputs per conv at most."""
    return tuple(None if t is None else (t, weakref.ref(t.untyped_storage())) for t in tensors)


def _same(refs: tuple, tensors: tuple) -> bool:
    """Whether `tensors` are the very objects `refs` hold, on the very storages. Identity, not
    just address and version: a storage made after another was freed may take its address,
    with the same version (a weight computed per call; `p.data = ...`, which
    model.half().float() does, keeps the Parameter and its version but swaps the storage),
    and would pass for it."""
    return all((r is None) if t is None else
               (r is not None and r[0] is t and r[1]() is t.untyped_storage())
               for r, t in zip(refs, tensors, strict=True))


def _key(tensors: tuple) -> tuple | None:
    """The address, version counter, dtype and geometry of each tensor, or None when one was
    created under inference_mode (no version counter to key on)."""
    key = []
    for t in tensors:
        if t is None:
            key.append(None)
        elif t.is_inference():
            return None
        else:
            key += (t.data_ptr(), t._version, t.dtype, t.shape, t.stride())
    return tuple(key)


# In float16, a fold whose bias reaches this far (or whose weight overflows) is not made: the
# conv output a backend materializes in float16 before adding the float32 bias is about
# y - b', and must stay below 65504 wherever eager's BatchNorm output y does.
_HALF_BIAS_LIMIT = 2.0 ** 14


def _in_half_range(w: Tensor, b: Tensor) -> bool:
    """Whether a float16 fold (w float16, b float32) can be used as safely as eager's separate
    conv and BatchNorm (reference.affine_apart says why). One host sync, once per fold."""
    ok = torch.isfinite(w).all()
    if b.numel():
        ok = ok & (b.abs().amax() < _HALF_BIAS_LIMIT)
    return bool(ok)


def _fold(tensors: tuple, bn: nn.BatchNorm2d, h: Tensor, dtype: torch.dtype,
          fmt: torch.memory_format) -> tuple[Tensor, Tensor] | None:
    # The conv's weight and bias as _inputs read them: read again, a parametrized weight is
    # computed again (spectral_norm's power iteration ran twice per forward).
    weight, bias = tensors[0], tensors[1]
    if bn is None:  # (a conv without a BN: its weight and bias as constants of their own)
        w = weight.detach().to(dtype, copy=True).contiguous(memory_format=fmt)
        b = None if bias is None else mark_constant(bias.detach().float().clone())
        return mark_constant(w), b
    scale, shift = running_affine(bn, h).folded()
    w = (weight.detach().float() * scale.view(-1, 1, 1, 1)).to(dtype)
    b = shift if bias is None else shift + bias.detach().float() * scale
    if dtype == torch.float16 and not _in_half_range(w, b):
        return None
    # Fresh tensors no one else holds: the backends may cache what they derive from them.
    return (mark_constant(w.contiguous(memory_format=fmt)),
            mark_constant(b.detach().float().contiguous()))


def _capturing(h: Tensor) -> bool:
    """Whether h's device stream is being captured into a CUDA graph."""
    return h.is_cuda and torch.cuda.is_current_stream_capturing()


def folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, h: Tensor
                ) -> tuple[Tensor, Tensor | None] | None:
    """(W', b') with conv(h, W') + b' == bn(conv(h)) for eval-mode bn. W' (C_out, C_in, KH,
    KW) in the dtype the conv computes in (the autocast dtype under autocast), in h's memory
    format; b' (C_out,) float32. bn None (a conv without a BN, a pre-activation block's
    last): the conv's own weight and bias, so kept (b' None where it has no bias). None
    where a float16 fold would leave float16's range (_in_half_range): the caller runs the
    conv and the BatchNorm's affine unfolded."""
    tensors = _inputs(conv, bn)
    dtype = _compute_dtype(h, tensors[0])
    fmt = memory_format_of(h)
    state = _key(tensors)
    # A float16 fold's range check reads its values on the host, which a CUDA graph capture
    # forbids: a fold not made before the capture is not made during it (unfolded then).
    now = not (bn is not None and dtype == torch.float16 and _capturing(h))
    if state is None:
        return _fold(tensors, bn, h, dtype, fmt) if now else None
    key = (dtype, h.device, fmt, None if bn is None else bn.eps, _generation, state)
    return _kept(_CACHE, conv, key, tensors, lambda: _fold(tensors, bn, h, dtype, fmt), now)


def _kept(store, owner, key: tuple, tensors: tuple, compute, now: bool = True):
    """store[owner]'s value where it was computed for this key from these very tensors,
    else compute() kept there in its place (now=False: None, nothing kept). Computed as
    ordinary tensors even under inference_mode: an inference tensor has no version counter,
    so the caches downstream (the Triton weight matrix, the cuDNN bias cast) could not key
    on it, and raised reading it. (inference_mode(False) also turns grad mode back on:
    no_grad keeps it a leaf.)"""
    hit = store.get(owner)
    if hit is not None and hit[0] == key and _same(hit[1], tensors):
        return hit[2]
    if not now:
        return None
    with torch.inference_mode(False), torch.no_grad():
        value = compute()
    store[owner] = (key, _refs(tensors), value)
    return value


def _bn_inputs(bn: nn.BatchNorm2d) -> tuple:
    """What a BN's running affine reads, as _inputs reads a fold's."""
    try:
        pb, bb = bn._parameters, bn._buffers
        return pb["weight"], pb["bias"], bb["running_mean"], bb["running_var"]
    except KeyError:
        return bn.weight, bn.bias, bn.running_mean, bn.running_var


def affine(bn: nn.BatchNorm2d, h: Tensor) -> ChannelAffine:
    """batchnorm.running_affine(bn, h) (an eval-mode bn applied to h itself), computed once
    per state of bn's parameters and running statistics and kept as folded_conv keeps a
    fold: fresh float32 tensors marked constant, so that the conv whose prologue applies
    them can be planned, and no per-call kernels compute them. For calls where applies(h)."""
    tensors = _bn_inputs(bn)
    state = _key(tensors)
    if state is None:
        return running_affine(bn, h)
    def compute() -> ChannelAffine:
        a = running_affine(bn, h)
        # (Copies: the center may be the running mean itself, the shift the bias.)
        return ChannelAffine(*(None if t is None else mark_constant(t.detach().clone())
                               for t in (a.center, a.scale, a.shift)))
    return _kept(_AFFINES, bn, (h.device, bn.eps, _generation, state), tensors, compute)
