"""Merge a gpu_check.sh run: steps/*.json -> OUTDIR/bench.json, OUTDIR/summary.md (and
OUTDIR/bench.png where matplotlib is present), and print the short summary table.

Standard library only (the plot excepted), so the summary prints even when the package or
torch is broken on the machine. Exit status: 0 when every step passed (or was skipped on
purpose), 1 otherwise.

    python benchmarks/summarize.py OUTDIR [--steps-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from targets import conv_variants, markdown, targets  # noqa: E402  (a sibling script)

SCHEMA = "fused_res.gpu_check/1"


def read_steps(steps_dir: pathlib.Path) -> list[dict]:
    """steps.tsv (written by gpu_check.sh) as dicts."""
    path = steps_dir / "steps.tsv"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    keys = lines[0].split("\t")
    steps = []
    for line in lines[1:]:
        vals = line.split("\t", len(keys) - 1)
        steps.append(dict(zip(keys, vals + [""] * (len(keys) - len(vals)), strict=True)))
    return steps


def read_runs(steps_dir: pathlib.Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(bench runs, other documents) of the steps' JSON files, by step name: a bench run is a
    fused_res.bench document (or an unreadable file, reported as one); the scripts' own
    documents (ops_bandwidth, conv_configs, profile_step) are kept apart, unvalidated."""
    runs, extras = {}, {}
    for path in sorted(steps_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            runs[path.stem] = {"error": f"unreadable: {e}"}
            continue
        is_bench = str(doc.get("schema", "")).startswith("fused_res.bench/")
        (runs if is_bench else extras)[path.stem] = doc
    return runs, extras


def problems(steps: list[dict], rows: list[list[str]], runs: dict[str, dict]) -> list[str]:
    """What went wrong in a run: steps that did not end ok (or skipped), summary rows with
    wrong or crashed contenders, and step files that could not be read (a crash inside a
    step that still exited 0, or a truncated JSON, read as "none" until 2026-11-29)."""
    bad = [s["step"] for s in steps if s["status"] not in ("ok", "skipped")]
    wrong, failed = HEADER.index("wrong"), HEADER.index("failed")
    bad += [f"{r[0]}:{r[1]} wrong={r[wrong]}" for r in rows if r[wrong] != "0"]
    bad += [f"{r[0]}:{r[1]} failed={r[failed]}" for r in rows if r[failed] not in ("0", "-")]
    bad += [f"{name}: {run['error']}" for name, run in runs.items() if "error" in run]
    return bad


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summary_rows(runs: dict[str, dict]) -> list[list[str]]:
    """One row per (step, workload, batch, basis): eager-cl, best compile, cuDNN and the
    fastest correct fused contender (name, img/s, speedup over eager-cl, % of the roofline
    floor), all launched calls or all CUDA-graph replays (a graph row's speedup is over
    eager-cl's graph row; the two bases side by side in one row read as one speedup)."""
    rows = []
    for step, run in runs.items():
        results = run.get("results", [])
        groups: dict[tuple, list[dict]] = {}
        for r in results:
            groups.setdefault((r["workload"], r["batch"]), []).append(r)
        for (workload, batch), every in groups.items():
            for graph in (False, True):
                rs = [r for r in every if bool(r.get("cuda_graph")) == graph]
                if rs:
                    rows.append(_summary_row(step, run, workload, batch, graph, rs))
    return rows


def _summary_row(step: str, run: dict, workload: str, batch: int, graph: bool,
                 rs: list[dict]) -> list[str]:
    ok = {r["contender"].removesuffix("+graph"): r for r in rs if r["status"] == "ok"}

    def ips(name):
        return ok[name]["images_per_s"] if name in ok else None
    comp = max((r["images_per_s"] for n, r in ok.items() if n.startswith("compile")),
               default=None)
    fused = [(n, r) for n, r in ok.items() if n.startswith("fused-")]
    best_name, best = max(fused, key=lambda nr: nr[1]["images_per_s"], default=(None, None))
    wrong = sum(r["status"] == "wrong" for r in rs)
    failed = sum(r["status"] == "skipped" and (r["reason"] or "").startswith("failed")
                 for r in rs)
    cfg = run.get("config", {})
    return [step, workload, cfg.get("mode", "?"), cfg.get("dtype", "?"), str(batch),
            "graph" if graph else "launched", _fmt(ips("eager-cl"), ",.0f"),
            _fmt(comp, ",.0f"), _fmt(ips("cudnn-fused"), ",.0f"), best_name or "-",
            _fmt(best and best["images_per_s"], ",.0f"), _fmt(best and best["speedup"], ".2f"),
            _fmt(best and best["roofline_pct"], ".1f"), str(wrong), str(failed)]


HEADER = ["step", "workload", "mode", "dtype", "batch", "basis", "eager-cl img/s",
          "best compile", "cudnn-fused", "best fused", "its img/s", "its speedup",
          "its % floor", "wrong", "failed"]



def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in [header, *rows])


def md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=pathlib.Path)
    ap.add_argument("--steps-dir", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    steps_dir = args.steps_dir or args.outdir / "steps"
    steps, (runs, extras) = read_steps(steps_dir), read_runs(steps_dir)
    merged = {"schema": SCHEMA,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "steps": steps, "runs": runs, "extras": extras}
    (args.outdir / "bench.json").write_text(json.dumps(merged, indent=1) + "\n")

    step_rows = [[s["step"], s["status"], s["rc"], s["seconds"]] for s in steps]
    rows = summary_rows(runs)
    bad = problems(steps, rows, runs)
    env = next((r.get("environment") for r in runs.values() if r.get("environment")), {})
    device = env.get("device_label", "unknown device")
    md = [f"# fused_res gpu_check: {device}", "",
          f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
          f"driver {env.get('driver')}, commit {env.get('git_commit')}"
          f"{' (dirty)' if env.get('git_dirty') else ''}", "", "## Steps", "",
          md_table(["step", "status", "rc", "seconds"], step_rows), "",
          *(["## Problems", "", *(f"- {b}" for b in bad), ""] if bad else []),
          "## Summary", "",
          md_table(HEADER, rows), "", "## Targets", "",
          "The issues' performance targets (benchmarks/targets.py): met only where CUDA-graph "
          "replays and launched calls both meet them, over every shape named, none wrong.", "",
          markdown(targets(merged)), ""]
    variants = conv_variants(merged)
    if variants:
        md += ["## Triton conv variants", "",
               "Per shape, the best correct tile's time over cuDNN's plain conv, per "
               "conv_configs variant: what the statistics epilogue and the BN+ReLU prologue "
               "each add.", "", variants, ""]
    for step in [*runs, *extras]:
        md_path = steps_dir / f"{step}.md"
        if md_path.exists():
            md += [f"## {step}", "", md_path.read_text().replace("\n# ", "\n### ", 1)
                   .removeprefix("# ").strip(), ""]
    (args.outdir / "summary.md").write_text("\n".join(md) + "\n")

    try:  # the chart is a bonus: no matplotlib or no package, no chart
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
        from fused_res.bench.output import write_plot
        allres = [r for run in runs.values() for r in run.get("results", [])]
        first = next((r for r in runs.values() if "config" in r), None)
        if first is not None:
            note = write_plot({**first, "results": allres}, args.outdir / "bench.png")
            if note:
                print(f"chart: {note}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        print(f"chart: not drawn ({type(e).__name__}: {e})", file=sys.stderr)

    print()
    print(f"fused_res gpu_check summary ({device}; img/s, bf16 unless the dtype says otherwise)")
    print(text_table(["step", "status", "rc", "seconds"], step_rows))
    print()
    print(text_table(HEADER, rows) if rows else "no benchmark results")
    met = targets(merged)
    print("\ntargets: " + ", ".join(
        f"{sum(t['met'] is v for t in met)} {word}"
        for v, word in ((True, "met"), (False, "not met"), (None, "unmeasured")))
        + " (summary.md lists them)")
    if bad:
        print(f"\nproblems: {', '.join(bad)}")
    print(f"\nfiles: {args.outdir}; problems: {len(bad) if bad else 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
