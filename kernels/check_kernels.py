#!/usr/bin/env python3
"""Compile kernels/ with bare nvcc (no torch) and report registers and spills per kernel.

    python kernels/check_kernels.py [--arch 80 90] [--nvcc PATH]

Every kernel here is on the hot path (the BN statistics, apply and backward passes), so any
spill store or load fails the check (exit status 1); a compile error exits 2; no nvcc
exits 3. Needs no GPU. Stdlib only, so CI can run it before torch is installed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def find_nvcc(explicit: str | None = None) -> str | None:
    """nvcc from --nvcc, $CUDA_HOME/bin, $PATH, then /usr/local/cuda*/bin."""
    cands = [explicit] if explicit else []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands.append(shutil.which("nvcc"))
    cands += sorted(str(p / "bin" / "nvcc") for p in Path("/usr/local").glob("cuda*"))
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines, strict=True))


def short(name: str) -> str:
    """frk::reduce_nhwc_kernel<frk::StatsOp<__half>, 8, unsigned int>(...) -> compact form."""
    name = name.split("(", 1)[0].replace("frk::", "").replace("__nv_bfloat16", "bf16")
    name = name.replace("__half", "fp16").replace("unsigned int", "i32").replace("long", "i64")
    return name


def parse(log: str) -> list[dict]:
    rows, cur = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2), "regs": None, "stack": 0,
                   "spill_st": 0, "spill_ld": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        if (m := _SPILL.search(line)):
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        if (m := _REGS.search(line)):
            cur["regs"] = int(m.group(1))
        if (m := _SMEM.search(line)):
            cur["smem"] = int(m.group(1))
    return rows


def compile_kernels(nvcc: str, archs: list[str]) -> tuple[int, str]:
    cmd = [nvcc, "-std=c++17", "-O3", "-c", str(HERE / "check_kernels.cu"), "-Xptxas", "-v"]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd += ["-o", os.path.join(tmp, "check_kernels.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["80", "90"], help="SM versions (80 90)")
    ap.add_argument("--nvcc", default=None, help="nvcc to use (default: found)")
    args = ap.parse_args(argv)
    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("check_kernels: nvcc not found (set CUDA_HOME or --nvcc)", file=sys.stderr)
        return 3
    rc, log = compile_kernels(nvcc, args.arch)
    if rc != 0:
        print(log, file=sys.stderr)
        print(f"check_kernels: nvcc failed (exit {rc})", file=sys.stderr)
        return 2
    rows = parse(log)
    if not rows:
        print(log, file=sys.stderr)
        print("check_kernels: ptxas reported no kernels", file=sys.stderr)
        return 2
    names = demangle(sorted({r["name"] for r in rows}))
    print(f"{'arch':6} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'smem':>6}  kernel")
    bad = []
    for r in sorted(rows, key=lambda r: (r["arch"], short(names[r["name"]]))):
        spill = r["spill_st"] + r["spill_ld"]
        flag = "  <-- SPILL" if spill else ""
        print(f"{r['arch']:6} {r['regs']!s:>4} {r['stack']:>5} "
              f"{r['spill_st']:>5}/{r['spill_ld']:<5} {r['smem']:>6}  "
              f"{short(names[r['name']])}{flag}")
        if spill:
            bad.append(r)
    print(f"check_kernels: {len(rows)} kernels for {', '.join('sm_' + a for a in args.arch)}; "
          f"{len(bad)} with spills")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
