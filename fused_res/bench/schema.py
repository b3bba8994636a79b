"""The JSON that `python -m fused_res bench --json PATH` writes (benchmarks/README.md has the
prose). `validate(obj)` checks keys and types and returns the problems found (empty: valid).

Top level:
  schema       str    "fused_res.bench/1"
  complete     bool   false while a run is still going (the file is rewritten after every row)
  environment  dict   ENVIRONMENT below: device, driver, versions, git commit
  config       dict   CONFIG below: the full configuration
  peaks        dict   PEAKS below: matmul rate and copy bandwidth measured in this run
  results      list   one RESULT per (workload, batch, contender[, +graph])

Units: seconds, bytes, FLOPs (2 per multiply-add), images (samples) per second, percent.
A result's status is "ok" (timed), "wrong" (failed the correctness gate; not timed) or
"skipped" (could not run here; `reason` says why). Timing fields are null unless "ok".
"""

from __future__ import annotations

SCHEMA = "fused_res.bench/1"

NUM = (int, float)
OPT_NUM = (int, float, type(None))
OPT_STR = (str, type(None))

ENVIRONMENT = {
    "device": str, "device_name": str, "device_label": str,
    "device_memory_bytes": (int, type(None)), "compute_capability": OPT_STR, "driver": OPT_STR,
    "cpu": str, "cpu_count": (int, type(None)),
    "torch_threads": int, "python": str, "platform": str, "torch": str, "cuda": OPT_STR,
    "cudnn": (int, type(None)), "triton": OPT_STR, "fused_res": str, "git_commit": OPT_STR,
    "git_dirty": (bool, type(None)), "argv": list, "created": str,
}
CONFIG = {
    "models": list, "batches": list, "dtype": str, "memory_format": str, "mode": str,
    "device": str, "contenders": (list, type(None)), "cuda_graphs": bool, "warmup": int,
    "repeats": int, "rotate": int, "flush_l2": bool, "seed": int, "quick": bool, "extra": dict,
}
# Added 2026-11-28 (absent before): the FUSED_RES_* environment variables of the run.
ENVIRONMENT_OPTIONAL = {"fused_res_env": dict}
PEAKS = {
    "matmul_flops_per_s": NUM, "matmul_dtype": str, "matmul_n": int,
    "copy_bytes_per_s": NUM, "copy_bytes": int,
}
TIME = {
    "median": NUM, "p10": NUM, "p90": NUM, "iqr": NUM, "min": NUM, "max": NUM, "mean": NUM,
    "stdev": NUM, "n": int, "samples": list,
}
RESULT = {
    "workload": str, "kind": str, "spec": str, "input_shape": list, "batch": int, "mode": str,
    "dtype": str, "device": str, "flops": NUM, "bytes_min": NUM, "floor_s": NUM,
    "reference": str, "contender": str, "cuda_graph": bool, "memory_format": OPT_STR,
    "status": str, "reason": OPT_STR, "note": str, "rel_err": OPT_NUM, "rel_err_output": OPT_NUM,
    "rel_err_grad": OPT_NUM, "tolerance": OPT_NUM, "time_s": (dict, type(None)),
    "images_per_s": OPT_NUM, "speedup": OPT_NUM, "peak_memory_bytes": (int, type(None)),
    "roofline_pct": OPT_NUM, "build_s": OPT_NUM,
}
# Keys added after the first GPU results were committed: checked when present. In train mode,
# tolerance_grad bounds rel_err_grad and grads_gated says how many parameter gradients had a
# budget tight enough to reject a zeroed gradient ("10/161"); tolerance bounds rel_err_output.
# Since 2026-11-28 a train row gates the BatchNorm running statistics after its step too:
# rel_err_stats over the update (after - before) of all running means and variances,
# bounded by tolerance_stats.
RESULT_OPTIONAL = {"tolerance_grad": OPT_NUM, "grads_gated": OPT_STR, "rel_err_stats": OPT_NUM,
                   "tolerance_stats": OPT_NUM}
STATUSES = ("ok", "wrong", "skipped")


def _check(obj, spec: dict, where: str, problems: list[str], optional: dict | None = None
           ) -> None:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object, got {type(obj).__name__}")
        return
    optional = optional or {}
    for key, types in {**spec, **optional}.items():
        if key not in obj:
            if key not in optional:
                problems.append(f"{where}.{key}: missing")
        elif not isinstance(obj[key], types) or (isinstance(obj[key], bool)
                                                 and bool not in _as_tuple(types)):
            problems.append(f"{where}.{key}: {type(obj[key]).__name__} is not {types}")
    for key in obj:
        if key not in spec and key not in optional:
            problems.append(f"{where}.{key}: not in the schema")


def _as_tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)


def validate(obj) -> list[str]:
    """Problems with `obj` as a fused_res.bench/1 document (an empty list when it is valid)."""
    problems: list[str] = []
    _check(obj, {"schema": str, "complete": bool, "environment": dict, "config": dict,
                 "peaks": (dict, type(None)), "results": list}, "$", problems)
    if problems:
        return problems
    if obj["schema"] != SCHEMA:
        problems.append(f"$.schema: {obj['schema']!r} is not {SCHEMA!r}")
    _check(obj["environment"], ENVIRONMENT, "$.environment", problems, ENVIRONMENT_OPTIONAL)
    _check(obj["config"], CONFIG, "$.config", problems)
    if obj["peaks"] is not None:
        _check(obj["peaks"], PEAKS, "$.peaks", problems)
    for i, r in enumerate(obj["results"]):
        where = f"$.results[{i}]"
        _check(r, RESULT, where, problems, RESULT_OPTIONAL)
        if not isinstance(r, dict):
            continue
        if r.get("status") not in STATUSES:
            problems.append(f"{where}.status: {r.get('status')!r} is not one of {STATUSES}")
        if r.get("status") == "ok":
            _check(r.get("time_s"), TIME, f"{where}.time_s", problems)
            if r.get("images_per_s") is None:
                problems.append(f"{where}.images_per_s: null for an ok result")
        elif r.get("time_s") is not None:
            problems.append(f"{where}.time_s: set for a {r.get('status')} result")
        if r.get("status") != "ok" and not r.get("reason"):
            problems.append(f"{where}.reason: missing for a {r.get('status')} result")
    return problems
