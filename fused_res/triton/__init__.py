"""Triton kernels for the conv-unit ops (DESIGN.md §2, §5 rungs 2 and 3).

    conv.py         implicit-GEMM NHWC conv2d with the fused prologue (input BN + ReLU, zero
                    padding after it) and epilogue (folded affine, act, residual, act) or a
                    statistics epilogue (per-tile mean and M2 of z for train-mode BatchNorm)
    conv_pair.py    a block's last conv and its 1x1 projection shortcut as one GEMM (inference)
    elementwise.py  the epilogue apply pass, its backward (with per-channel Σg and Σg·(t-c)),
                    per-channel statistics and their finalize, the statistics backward
    configs.py      autotune configurations as data, with the rule that excludes bad ones
    aot.py          ahead-of-time compile of every kernel and config for sm_80 / sm_90

Nothing here imports triton at package import: the kernel modules do, and only the triton
backend (fused_res.backends.triton_backend) imports them, lazily. TRITON_INTERPRET is read by
triton when a kernel is decorated, i.e. when conv.py / elementwise.py are first imported.
"""
