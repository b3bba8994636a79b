"""benchmarks/summarize.py: the gpu_check summary table and chart on synthetic runs."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import summarize as S  # noqa: E402

from fused_res.bench.output import plot_labels  # noqa: E402


def _r(contender, ips, speedup, mode="eval", dtype="bf16", status="ok"):
    return {"contender": contender, "cuda_graph": contender.endswith("+graph"),
            "workload": "resnet50", "batch": 256, "mode": mode, "dtype": dtype,
            "status": status, "reason": None if status == "ok" else "x", "images_per_s": ips,
            "speedup": speedup, "roofline_pct": 10.0}


def test_summary_rows_keep_launched_and_graph_rows_apart():
    """A probe: the best fused contender could be a +graph row (its speedup over eager's
    graph row) printed beside eager-cl's launched img/s, as if one speedup."""
    run = {"config": {"mode": "eval", "dtype": "bf16"},
           "results": [_r("eager-cl", 100.0, 1.0), _r("eager-cl+graph", 200.0, 1.0),
                       _r("fused-x", 150.0, 1.5), _r("fused-x+graph", 1000.0, 5.0),
                       _r("fused-y+graph", None, None, status="wrong")]}
    rows = S.summary_rows({"step": run})
    col = {h: i for i, h in enumerate(S.HEADER)}
    assert [r[col["basis"]] for r in rows] == ["launched", "graph"]
    launched, graph = rows
    assert (launched[col["eager-cl img/s"]], launched[col["best fused"]],
            launched[col["its img/s"]], launched[col["its speedup"]]) == (
        "100", "fused-x", "150", "1.50")
    assert launched[col["wrong"]] == "0" and graph[col["wrong"]] == "1"
    assert (graph[col["eager-cl img/s"]], graph[col["its img/s"]],
            graph[col["its speedup"]]) == ("200", "1,000", "5.00")


def test_a_chart_of_merged_runs_names_each_bar_mode_and_dtype():
    """A probe: the merged chart took its title from the first step's config, and an eval
    and a train bar of one workload and contender had the same label."""
    result = {"config": {"mode": "eval", "dtype": "bf16", "memory_format": "channels_last",
                         "cuda_graphs": False, "repeats": 5, "device": "cuda"},
              "environment": {"device_name": "GPU", "device_label": "GPU"}}
    rows = [_r("fused-x", 1.0, 1.0), _r("fused-x", 1.0, 1.0, mode="train")]
    chart_title, labels = plot_labels(result, rows)
    assert "eval" not in chart_title and "2 runs merged" in chart_title
    assert labels == ["resnet50 b256 eval bf16 fused-x", "resnet50 b256 train bf16 fused-x"]
    one_title, one = plot_labels(result, rows[:1])
    assert one == ["resnet50 b256 fused-x"] and "eval bf16" in one_title


def test_problems_name_crashed_contenders_and_unreadable_step_files(tmp_path):
    """A probe: a contender that crashed inside a step that exited 0, and a truncated step
    JSON, left "problems: none" (exit 0) and nothing in summary.md."""
    import json

    steps_dir = tmp_path / "steps"
    steps_dir.mkdir()
    (steps_dir / "steps.tsv").write_text("step\tstatus\trc\tseconds\tlimit\tcommand\n"
                                         "a\tok\t0\t1\t1\t\nb\tok\t0\t1\t1\t\n")
    crashed = {**_r("fused-x", None, None, status="skipped"), "reason": "failed: boom"}
    run = {"schema": "fused_res.bench/1", "config": {"mode": "eval", "dtype": "bf16"},
           "results": [_r("eager-cl", 100.0, 1.0), crashed]}
    (steps_dir / "a.json").write_text(json.dumps(run))
    (steps_dir / "b.json").write_text('{"schema": "fused_res.bench/1", "resu')
    assert S.main([str(tmp_path)]) == 1
    md = (tmp_path / "summary.md").read_text()
    assert "## Problems" in md and "failed=1" in md and "b: unreadable" in md
