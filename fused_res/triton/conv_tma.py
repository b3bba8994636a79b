"""A 1x1 stride-1 conv of a dense NHWC input as a plain GEMM whose operands arrive by TMA, with
the conv unit's epilogue (conv._conv_epilogue: the folded tail, or z and its statistics).

For a 1x1, stride-1, unpadded conv of a channels_last-dense x, output pixel m reads input
pixel m: A is x viewed as (N*H*W, C_in) and B the weight as (C_in, C_out). Tensor descriptors
let Hopper's TMA unit copy each tile into shared memory, zero-filled past the edges, where
conv.py's loads compute an address and a mask per element in every K step. ResNet-50's 1x1
convs are where conv.py is furthest from cuDNN (H100 run 5: up to 1.58x its time); 33 of its 53
convs are 1x1 stride 1 (28 in eval, where the downsampling blocks' last conv and projection
run as conv_pair.py's one GEMM instead). Whether TMA closes that is a question only a GPU
answers: benchmarks/conv_configs.py times configs.TMA_SWEEP_CONFIGS beside the pointer tiles.
H100 run 7 (benchmarks/README.md, "What runs 7-9 decided"): the best TMA tile 1.18x cuDNN's
time against the best pointer tile's 1.27x (plain, geomean of 5 shapes), level with the
statistics epilogue, one tile at 10x at one shape; a whole ResNet-50 3% faster in eval
(b256) and 2% slower in training (b128). Too little, and too uneven, for a default: the
kernel runs only where asked (a config with tma=True, FUSED_RES_TRITON_TMA=1, or
TritonBackend.tma_loads()).

It also says where conv.py's implicit-GEMM kernel can take only its weight tiles by TMA
(weight_tma_reason, weight_descriptor: any conv whose C_in the tile's BLOCK_K divides).

On sm_80, where Triton lowers descriptor loads to ordinary loads, neither is chosen.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .conv import _conv_epilogue, _tile_coords, autotune_over_conv_configs, cdiv
from .launch import on_device

try:  # host-side tensor descriptors: Triton 3.3 and later
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer kernel runs
    TensorDescriptor = None


@triton.jit
def conv1x1_tma_kernel(
        x_desc, w_desc, bias_ptr, oa_ptr, ob_ptr, res_ptr, bs_ptr, y_ptr, u_ptr, st_mean_ptr,
        st_lo_ptr, st_m2_ptr, st_cnt_ptr,
        M, C_in, C_out, OH, OW, syn, syc, syh, syw, srn, src, srh, srw, res_scale,
        HAS_BIAS: tl.constexpr, HAS_OA: tl.constexpr, HAS_OB: tl.constexpr,
        ACT_MID: tl.constexpr, HAS_RES: tl.constexpr, RES_SCALED: tl.constexpr,
        HAS_BRANCH: tl.constexpr, ACT_OUT: tl.constexpr, STORE_U: tl.constexpr,
        STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """conv_unit_kernel for KH = KW = 1, stride 1, no padding, no prologue: x_desc over x as
    (M, C_in) with block (BLOCK_M, BLOCK_K), w_desc over the weight as (C_in, C_out) with block
    (BLOCK_K, BLOCK_N); the other arguments as conv_unit_kernel's (OH, OW = H, W)."""
    pid_m, pid_n, offs_m, offs_n, mask_m, mask_n, n_idx, oh, ow = _tile_coords(
        M, C_out, OH, OW, BLOCK_M, BLOCK_N, GROUP_M, INDEX_64)
    # Tile coordinates are int32: the launcher admits only M < 2^31 rows.
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C_in, BLOCK_K):
        a = x_desc.load([m0, k0])
        b = w_desc.load([k0, n0])
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    _conv_epilogue(acc, pid_m, offs_m, offs_n, mask_m, mask_n, n_idx, oh, ow, bias_ptr, oa_ptr,
                   ob_ptr, res_ptr, bs_ptr, y_ptr, u_ptr, st_mean_ptr, st_lo_ptr, st_m2_ptr,
                   st_cnt_ptr, C_out, syn, syc, syh, syw, srn, src, srh, srw, res_scale,
                   HAS_BIAS, HAS_OA, HAS_OB, ACT_MID, HAS_RES, RES_SCALED, HAS_BRANCH, ACT_OUT,
                   STORE_U, STATS)


_INTERPRET = not isinstance(conv1x1_tma_kernel, triton.runtime.jit.JITFunction)


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor, stride, padding,
                       prologue: bool) -> str | None:
    """Why this kernel cannot run the conv of x (N, C_in, H, W) with weight (C_out, C_in,
    KH, KW), or None where it can."""
    if TensorDescriptor is None:
        return "this Triton has no host-side tensor descriptors (triton.tools)"
    c_out, c_in, kh, kw = weight.shape
    if c_in == 0 or c_out == 0:
        return f"C_in={c_in}, C_out={c_out}: a descriptor needs a non-empty matrix"
    if (kh, kw) != (1, 1) or tuple(stride) != (1, 1) or tuple(padding) != (0, 0):
        return (f"a {kh}x{kw} kernel with stride {tuple(stride)} and padding "
                f"{tuple(padding)}; TMA tiles take 1x1 kernels, stride 1, no padding")
    if prologue:
        return "an input prologue (BN + ReLU) needs the loaded tile in registers"
    if not x.is_contiguous(memory_format=torch.channels_last):
        return "x is not dense channels_last (NHWC)"
    elt = x.element_size()
    # TMA: 16-byte aligned base and row pitches.
    if (c_in * elt) % 16 or (c_out * elt) % 16:
        return f"C_in={c_in} and C_out={c_out} must each span a multiple of 16 bytes"
    if x.data_ptr() % 16:
        return "x's data is not 16-byte aligned"
    if x.shape[0] * x.shape[2] * x.shape[3] >= 2 ** 31:
        return "2^31 or more output pixels (int32 tile coordinates)"
    return _device_reason(x)


def weight_tma_reason(x: torch.Tensor, weight: torch.Tensor, block_k: int,
                      flat: bool) -> str | None:
    """Why the implicit-GEMM kernel cannot load this conv's weight tiles by TMA with tiles
    block_k deep, or None. x (N, C_in, H, W), weight (C_out, C_in, KH, KW)."""
    if TensorDescriptor is None:
        return "this Triton has no host-side tensor descriptors (triton.tools)"
    c_out, c_in = weight.shape[:2]
    if flat:
        return "the flattened (kh, kw, c) K of a narrow input gathers its weight rows"
    if c_out == 0:
        return "C_out=0: a descriptor needs a non-empty matrix"
    if c_in == 0 or c_in % block_k:
        # A chunk past C_in would read the next tap's rows, where the pointer load masks.
        return f"C_in={c_in} is not a multiple of BLOCK_K={block_k}"
    if (c_out * weight.element_size()) % 16:
        return f"C_out={c_out} must span a multiple of 16 bytes"
    return _device_reason(x)


def weight_descriptor(w_mat: torch.Tensor, block_k: int, block_n: int):
    """A tensor descriptor over the (K, C_out) weight matrix with block (block_k, block_n);
    an unaligned matrix (a view weight_matrix handed back as it is) is copied first."""
    if w_mat.data_ptr() % 16:
        w_mat = w_mat.clone()
    return TensorDescriptor.from_tensor(w_mat, [block_k, block_n])


def _device_reason(x: torch.Tensor) -> str | None:
    """Why x's device has no TMA (the interpreter emulates it), or None."""
    if not _INTERPRET and (x.device.type != "cuda" or _major(x.device) < 9):
        return "TMA needs an sm_90 or newer GPU"
    return None


_MAJOR: dict = {}


def _major(device: torch.device) -> int:
    """The compute capability's major version (cached: this runs for every eligible conv)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _MAJOR:
        _MAJOR[idx] = torch.cuda.get_device_capability(idx)[0]
    return _MAJOR[idx]


def _set_block_shapes(nargs) -> None:
    """Autotuner pre-hook: the descriptors' blocks follow the config being run."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


_TUNE_KEY = ["M", "C_in", "C_out", "STATS", "HAS_RES", "STORE_U", "INDEX_64"]
_AUTOTUNED: dict = {}


def _autotuned_kernel():
    if "tma" not in _AUTOTUNED:
        _AUTOTUNED["tma"] = autotune_over_conv_configs(
            conv1x1_tma_kernel, _TUNE_KEY, pre_hook=_set_block_shapes,
            reset_to_zero=["st_cnt_ptr"])
    return _AUTOTUNED["tma"]


# conv_unit_kernel's constexprs that this kernel takes too (the rest describe what it never
# does: taps, padding, a prologue).
_FLAGS = ("HAS_BIAS", "HAS_OA", "HAS_OB", "ACT_MID", "HAS_RES", "RES_SCALED", "HAS_BRANCH",
          "ACT_OUT", "STORE_U", "STATS", "DOT_PRECISION", "INDEX_64")


def launch(x: torch.Tensor, w_mat: torch.Tensor, ptrs: tuple, y: torch.Tensor,
           r: torch.Tensor, res_scale: float, flags: dict,
           cfg: configs.ConvConfig | None) -> None:
    """Run the kernel. x (N, C_in, H, W) dense channels_last; w_mat (C_in, C_out) contiguous;
    ptrs conv_unit_kernel's tensor arguments from bias_ptr to st_cnt_ptr without the input
    prologue's three (bias, oa, ob, res, bs, y, u, st_mean, st_lo, st_m2, st_cnt; dummies where
    unused); y the output and r the residual (or y) for their strides; flags
    conv_unit_kernel's constexprs; cfg the tile, or None to autotune over CONV_CONFIGS as TMA
    tiles. The caller has checked unsupported_reason."""
    n, c_in, h, w = x.shape
    m, c_out = n * h * w, w_mat.shape[1]
    rows = x.permute(0, 2, 3, 1).reshape(m, c_in)  # a view: x is dense NHWC
    # Under autotuning the pre-hook sets each config's blocks before it runs.
    bm, bn, bk = ((cfg.block_m, cfg.block_n, cfg.block_k) if cfg is not None
                  else (configs.CONV_MIN_BLOCK_M, configs.DOT_MIN, configs.DOT_MIN))
    args = (TensorDescriptor.from_tensor(rows, [bm, bk]), weight_descriptor(w_mat, bk, bn),
            *ptrs,
            m, c_in, c_out, h, w, *y.stride(), *r.stride(), float(res_scale))
    kept = {k: flags[k] for k in _FLAGS}
    with on_device((x,)):
        if cfg is not None:
            grid = (cdiv(m, cfg.block_m) * cdiv(c_out, cfg.block_n),)
            conv1x1_tma_kernel[grid](*args, **kept, **cfg.meta, GROUP_M=8,
                                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        else:
            grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(c_out, meta["BLOCK_N"]),)
            _autotuned_kernel()[grid](*args, **kept)
