"""Where the numbers come from: device, driver, library versions, git commit."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess
import sys
from importlib import metadata

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: pathlib.Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _checkout_commit() -> tuple[str | None, str | None]:
    """(commit, `git status --porcelain`) of the fused_res checkout this module runs from; both
    None for an installed copy, whose ROOT (site-packages) may sit inside some other repository
    whose commit would otherwise be recorded as fused_res's."""
    if not ((ROOT / "fused_res" / "__init__.py").is_file() and (ROOT / "setup.py").is_file()):
        return None, None
    top = _run(["git", "rev-parse", "--show-toplevel"], ROOT)
    if top is None or pathlib.Path(top).resolve() != ROOT.resolve():
        return None, None
    return (_run(["git", "rev-parse", "HEAD"], ROOT),
            _run(["git", "status", "--porcelain", "--untracked-files=no"], ROOT))


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Everything that decides what a number means. Reads only (nvidia-smi, git rev-parse,
    git status); every field that cannot be found is None."""
    from .. import __version__

    cuda = device == "cuda"
    props = torch.cuda.get_device_properties(0) if cuda else None
    driver = None
    if cuda:
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = smi.splitlines()[0].strip() if smi else None
    commit, status = _checkout_commit()
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if cuda else _cpu_name(),
        "device_label": torch.cuda.get_device_name(0) if cuda else "CPU",
        "device_memory_bytes": props.total_memory if props else None,
        "compute_capability": f"{props.major}.{props.minor}" if props else None,
        "driver": driver,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "fused_res": __version__,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "argv": list(sys.argv),
        # The package's switches (Triton autotuning, BN placement, ...) decide what a number
        # measures as much as the versions do.
        "fused_res_env": {k: v for k, v in sorted(os.environ.items())
                          if k.startswith("FUSED_RES_")},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
