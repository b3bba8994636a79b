"""Which Triton tile config is fastest for the plain conv at ResNet-50's shapes, against cuDNN.

    python benchmarks/conv_configs.py [--batch 64] [--dtype bf16] [--shapes all|few] [--json F]
                                      [--variant plain|train|stats]

Times every configs.CONV_CONFIGS and configs.SWEEP_CONFIGS entry (minus the ones
conv_config_excluded rules out) as CUDA-graph replays beside F.conv2d (cuDNN), checks each
result against cuDNN's, and prints per shape the best config and its time over cuDNN's, beside
the config that runs untuned (configs.default_conv_config) and its time. Where the conv is one
conv_tma.py can run (1x1, stride 1, no prologue, sm_90), configs.TMA_SWEEP_CONFIGS are timed
too, and wherever BLOCK_K divides C_in (sm_90) configs.TMA_B_SWEEP_CONFIGS (the implicit-GEMM
kernel with its weight tiles by TMA); the table gives the best tile of each kind beside the best
pointer tile's: the measurement that decides whether either joins the autotuner (they run only
where asked until then). The
answer decides which configs the autotuner keeps and which one runs untuned; it is a question
only a GPU answers (DESIGN.md §5), so it is a script, not a test.

--variant train times the conv as a training step runs it inside a block with the previous
BN's apply + ReLU in its prologue (TritonBackend.train_prologue(True), the bench's
fused-triton-prologue) and the batch-statistics epilogue, checked against cuDNN's conv
of the activated input (and its per-channel mean). Its ratio is to cuDNN's plain conv, so it
shows what the prologue and the statistics cost per tile. (The AOT compile of that variant
stages the activated A tile through shared memory a second time for the MMA: 116 against
98 KiB at 128x128x64 on sm_90; at 213 and 165 registers per thread both run one block per SM
there, so it is not occupancy that this variant loses. On sm_90 its MMA takes A from
registers, in two K halves each waited on before the next, where the plain and stats-only
variants issue one asynchronous shared-memory wgmma per K step: Triton 3.8's TTGIR.)

--variant stats is the train variant without the prologue: the conv as a training step runs
it when the previous BN + ReLU had a pass of its own (the Triton backend's default since
H100 run 5). Beside --variant train it shows what the prologue alone costs per tile.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from ops_bandwidth import (  # noqa: E402
    CONVS,
    DTYPES,
    conv_cases,
    conv_floor_ms,
    conv_peaks,
    graph_ms,
    rel_err,
)

# Run 5's six, then the two 1x1 shapes furthest from cuDNN in its conv-alone table (1.58x and
# 1.50x), where the TMA tiles are most worth measuring.
FEW = [(256, 64, 56, 1, 1), (64, 64, 56, 3, 1), (128, 128, 28, 3, 1), (1024, 256, 14, 1, 1),
       (256, 256, 14, 3, 1), (512, 2048, 7, 1, 1), (2048, 512, 7, 1, 1), (256, 1024, 14, 1, 1)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--shapes", choices=("all", "few"), default="few")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--variant", choices=("plain", "train", "stats"), default="plain",
                   help="train: BN+ReLU prologue and batch-statistics epilogue; stats: the "
                        "epilogue alone")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("conv_configs: needs a CUDA device; none found", file=sys.stderr)
        return 2
    from fused_res.testing import TOLERANCES
    from fused_res.triton import configs, conv_tma
    from fused_res.triton.conv import conv_launch, sm_count

    dtype = DTYPES[a.dtype]
    torch.backends.cudnn.benchmark = True  # cuDNN's timed choice of algorithm, as in the bench
    # Against cuDNN's own rounded result: DESIGN.md §4's tolerance for the dtype (tf32 for
    # float32, which both take where torch allows it).
    tol = TOLERANCES["tf32" if dtype == torch.float32 else dtype]
    elt = torch.tensor([], dtype=dtype).element_size()
    shapes = CONVS if a.shapes == "all" else FEW
    rows, best = [], []
    peaks = conv_peaks(dtype, torch.device("cuda"))

    def save():
        """The rows so far (after every shape: a step that runs out of time keeps them)."""
        if a.json:
            tmp = pathlib.Path(a.json).with_suffix(".tmp")  # a timeout never leaves half a file
            tmp.write_text(json.dumps(
                {"schema": "fused_res.conv_configs/1", "device": torch.cuda.get_device_name(),
                 "variant": a.variant, "torch": torch.__version__, "dtype": a.dtype,
                 "batch": a.batch, "peaks": peaks.to_dict(), "rows": rows}, indent=1) + "\n")
            tmp.replace(a.json)
    print(f"{torch.cuda.get_device_name()}, batch {a.batch}, {a.dtype}, channels_last, "
          f"{a.variant} conv; ratio = Triton graph time / cuDNN graph time (plain conv)",
          flush=True)
    for cin, cout, hw, k, s in shapes:
        cudnn, _, sets, flops, weight = conv_cases(a.batch, cin, cout, hw, k, s, dtype,
                                                   torch.device("cuda"))
        t_c = graph_ms(cudnn, sets)
        prologue, want_stats, stats = {}, None, a.variant != "plain"
        if a.variant == "train":
            gen = torch.Generator(device="cuda").manual_seed(cin)
            center, scale, shift = (torch.randn(cin, device="cuda", generator=gen) * 0.5
                                    for _ in range(3))
            prologue = dict(in_center=center, in_scale=scale.abs() + 0.5, in_shift=shift)
            x0 = sets[0][0].float()
            act = torch.relu((x0 - center.view(1, -1, 1, 1)) * prologue["in_scale"].view(
                1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype)
            want = cudnn(act)
        else:
            want = cudnn(*sets[0])
        if stats:
            want_stats = want.float().mean(dim=(0, 2, 3))
        per = []
        m = a.batch * ((hw + 2 * (k // 2) - k) // s + 1) ** 2
        untuned = configs.default_conv_config(m, cin, cout, elt, k * k,
                                              configs.flat_k(cin, k * k),
                                              sm_count(torch.device("cuda")))
        tma_ok = conv_tma.unsupported_reason(sets[0][0], weight, (s, s), (k // 2, k // 2),
                                             bool(prologue)) is None
        flat = configs.flat_k(cin, k * k)
        for cfg in (configs.CONV_CONFIGS + configs.SWEEP_CONFIGS + configs.TMA_SWEEP_CONFIGS
                    + configs.TMA_B_SWEEP_CONFIGS):
            why = configs.conv_config_excluded(cfg, elt, k * k)
            if why is not None or (cfg.tma and not tma_ok) or (cfg.tma_b and (
                    conv_tma.weight_tma_reason(sets[0][0], weight, cfg.block_k, flat)
                    is not None)):
                continue

            def tri(x, cfg=cfg, weight=weight, st=(s, s), pad=(k // 2, k // 2), full=False,
                    prologue=prologue, stats=stats):
                pro = ((prologue["in_center"], prologue["in_scale"], prologue["in_shift"],
                        "relu") if prologue else (None, None, None, "none"))
                z, parts = conv_launch(x, weight, None, st, pad, *pro, stats=stats,
                                       memory_format=torch.channels_last, config=cfg)
                return (z, parts) if full else z
            try:
                if stats:
                    z, (t_mean, _, t_cnt) = tri(*sets[0], full=True)
                    mean = (t_mean * t_cnt[:, None]).sum(0) / t_cnt.sum()
                    err = max(rel_err(z, want), rel_err(mean, want_stats))
                else:
                    err = rel_err(tri(*sets[0]), want)
                t = graph_ms(tri, sets)
            except Exception as e:  # a config that fails to compile or launch is data too
                rows.append({"conv": [cin, cout, hw, k, s], "config": str(cfg),
                             "error": repr(e)[:300]})
                print(f"  {(cin, cout, hw, k, s)} {cfg}: FAILED {e!r}"[:300], flush=True)
                continue
            wrong = not err <= tol  # (NaN included)
            rows.append({"conv": [cin, cout, hw, k, s], "config": str(cfg), "ms": t,
                         "cudnn_ms": t_c, "ratio": t / t_c, "rel_err": err,
                         "tflops": flops / (t / 1e3) / 1e12, "wrong": wrong})
            if not wrong:  # a wrong result is reported, never the best config
                per.append((t, cfg, err))
            print(f"  {(cin, cout, hw, k, s)} {cfg}: {t:.4f} ms, {t / t_c:.2f}x cuDNN, "
                  f"err {err:.1e}{f' WRONG (tolerance {tol:.0e})' if wrong else ''}",
                  flush=True)
        tma_best = min((r[0] for r in per if r[1].tma), default=None)
        tma_b_best = min((r[0] for r in per if r[1].tma_b), default=None)
        # "best" is a pointer tile; the TMA kinds apart
        per = [r for r in per if not (r[1].tma or r[1].tma_b)]
        if not per:
            print(f"  {(cin, cout, hw, k, s)}: no pointer tile computed a correct result",
                  flush=True)
        if per:
            t, cfg, err = min(per, key=lambda r: r[0])
            u_ms = next((t_u for t_u, c, _ in per if c == untuned), None)
            if u_ms is None and any(r.get("wrong") and r["config"] == str(untuned)
                                    for r in rows if r["conv"] == [cin, cout, hw, k, s]):
                u_ms = "WRONG"  # the tile that runs by default computed a wrong result
            best.append(((cin, cout, hw, k, s), t_c, t, cfg, untuned, u_ms, tma_best,
                         tma_b_best))
        save()
    print(f"\nfloor = max(FLOPs / {peaks.matmul_flops_per_s / 1e12:.0f} TFLOP/s "
          f"({peaks.matmul_dtype} matmul), fewest bytes / {peaks.copy_bytes_per_s / 1e9:.0f} "
          "GB/s), measured in this run; the plain conv's (the train variants move more)")
    print("\n| conv (cin,cout,hw,k,s) | cuDNN ms | best Triton ms | ratio | floor ms | "
          "cuDNN % floor | best Triton % floor | best config | untuned config | its ratio | "
          "best TMA tile's ratio | best TMA-B tile's ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, t_c, t, cfg, untuned, u_ms, tma_best, tma_b_best in best:
        u_ratio = ("-" if u_ms is None else u_ms if isinstance(u_ms, str)
                   else f"{u_ms / t_c:.2f}")
        kinds = ["-" if v is None else f"{v / t_c:.2f}" for v in (tma_best, tma_b_best)]
        floor = conv_floor_ms(peaks, a.batch, *shape, dtype)
        print(f"| {shape} | {t_c:.4f} | {t:.4f} | {t / t_c:.2f} | {floor:.4f} | "
              f"{100 * floor / t_c:.0f} | {100 * floor / t:.0f} | {cfg} | {untuned} | "
              f"{u_ratio} | {kinds[0]} | {kinds[1]} |")
    if best:
        g = math.exp(sum(math.log(r[2] / r[1]) for r in best) / len(best))
        target = " (issue 5 target <= 1.15)" if a.variant == "plain" else ""
        print(f"\ngeomean best pointer tile/cuDNN over {len(best)} shapes: {g:.2f}{target}")
        for col, kind in ((6, "TMA"), (7, "TMA-B")):
            both = [r for r in best if r[col] is not None]
            if both:
                gp = math.exp(sum(math.log(r[2] / r[1]) for r in both) / len(both))
                gt = math.exp(sum(math.log(r[col] / r[1]) for r in both) / len(both))
                print(f"where {kind} tiles ran ({len(both)} shapes): best pointer tile "
                      f"{gp:.2f}, best {kind} tile {gt:.2f} (time over cuDNN's, geomean)")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
