"""Showing a run: the terminal table (rich, or plain text where rich is missing), markdown,
JSON, a PNG chart (matplotlib, skipped with a note where it is missing), and progress."""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import tempfile

from .runner import Progress

COLUMNS = ("workload", "batch", "contender", "status", "median ms", "p10-p90 ms", "img/s",
           "speedup", "peak MiB", "% floor", "rel err", "note / reason")


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def row_cells(r: dict) -> list[str]:
    """One result as table cells (COLUMNS)."""
    t = r["time_s"]
    note = "; ".join(x for x in (r["reason"], r["note"]) if x)
    return [r["workload"], str(r["batch"]), r["contender"], r["status"],
            _f(t and t["median"] * 1e3, ".3f"),
            "-" if t is None else f"{t['p10'] * 1e3:.3f}-{t['p90'] * 1e3:.3f}",
            _f(r["images_per_s"], ",.1f"), _f(r["speedup"], ".2f") + ("x" if r["speedup"] else ""),
            _f(r["peak_memory_bytes"] and r["peak_memory_bytes"] / 2**20, ",.0f"),
            _f(r["roofline_pct"], ".1f"), _f(r["rel_err"], ".1e"), note]


def title(result: dict) -> str:
    c, e = result["config"], result["environment"]
    where = "CPU numbers" if c["device"] == "cpu" else e["device_label"]
    graphs = ", CUDA graphs" if c["cuda_graphs"] else ""
    return (f"fused_res bench: {c['mode']} {c['dtype']} {c['memory_format']}{graphs}, "
            f"{c['repeats']} repeats - {e['device_name']} ({where})")


def footer(result: dict) -> str:
    p, e = result["peaks"] or {}, result["environment"]
    lines = []
    if p:
        lines.append(f"roofline: matmul {p['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s "
                     f"({p['matmul_dtype']}, n={p['matmul_n']}), copy "
                     f"{p['copy_bytes_per_s'] / 1e9:.1f} GB/s, both measured in this run; "
                     "% floor = max(FLOPs/rate, bytes/bandwidth) / median time")
    lines.append(f"torch {e['torch']}, CUDA {e['cuda']}, triton {e['triton']}, fused_res "
                 f"{e['fused_res']} @ {(e['git_commit'] or 'unknown')[:10]}"
                 f"{' (dirty)' if e['git_dirty'] else ''}; speedup is over eager-cl "
                 "(a +graph row's over eager-cl+graph)")
    return "\n".join(lines)


def plain_table(result: dict) -> str:
    rows = [list(COLUMNS)] + [row_cells(r) for r in result["results"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = [title(result)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False))
                     + "  " + r[-1])
    lines.append(footer(result))
    return "\n".join(lines)


def print_table(result: dict, file=None) -> None:
    """The rich table on stdout; plain text where rich is missing."""
    file = file or sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(plain_table(result), file=file)
        return
    table = Table(title=title(result), caption=footer(result), caption_justify="left")
    for col in COLUMNS:
        left = col in ("workload", "contender", "status", "note / reason")
        table.add_column(col, justify="left" if left else "right", overflow="fold")
    styles = {"ok": None, "wrong": "bold red", "skipped": "dim"}
    for r in result["results"]:
        table.add_row(*row_cells(r), style=styles[r["status"]])
    width = None if file.isatty() else 160  # logs: do not squeeze to 80 columns
    Console(file=file, width=width).print(table)


def markdown(result: dict) -> str:
    """A markdown report: title, configuration, environment, the table, the roofline note."""
    e, c = result["environment"], result["config"]
    out = [f"# {title(result)}", "",
           f"- device: {e['device_name']} (driver {e['driver']}, capability "
           f"{e['compute_capability']})",
           f"- versions: torch {e['torch']}, CUDA {e['cuda']}, cuDNN {e['cudnn']}, triton "
           f"{e['triton']}, Python {e['python']}, fused_res {e['fused_res']}",
           f"- git: {e['git_commit']}{' (dirty)' if e['git_dirty'] else ''}; {e['created']}",
           f"- config: `{json.dumps({k: v for k, v in c.items() if k != 'extra'})}`", "",
           "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in result["results"]:
        out.append("| " + " | ".join(x.replace("|", "/") for x in row_cells(r)) + " |")
    out += ["", footer(result).replace("\n", "  \n"), ""]
    return "\n".join(out)


# The chart formats matplotlib's Agg backend writes whatever else is installed.
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp")


def output_path_problem(option: str, path: str | os.PathLike) -> str | None:
    """Why `path` cannot receive an output file, for a usage error before the run (creating
    its missing folders), or None."""
    p = pathlib.Path(path)
    if p.is_dir():
        return f"{option} {str(path)!r}: a directory; accepted: a file path"
    if option == "--plot" and p.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        # (matplotlib picks the format by the suffix and refused an unknown one only after
        # the whole run)
        return (f"{option} {str(path)!r}: suffix {p.suffix!r}; accepted: a file name ending "
                f"in one of {', '.join('.' + f for f in PLOT_FORMATS)}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{option} {str(path)!r}: its folder cannot be made ({e.strerror}); " \
               "accepted: a path in a writable folder"
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        return f"{option} {str(path)!r}: not writable; accepted: a path in a writable folder"
    if not (p.is_symlink() or p.exists() and not p.is_file()):
        # The file _atomic_write makes beside it, made once now: os.access says yes to root
        # in folders no file can be made in (/proc, /sys), where the run ended in a traceback.
        try:
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
        except OSError as e:
            return f"{option} {str(path)!r}: no file can be made there ({e.strerror}); " \
                   "accepted: a path in a writable folder"
        os.close(fd)
        pathlib.Path(tmp).unlink(missing_ok=True)
    return None


def _atomic_write(path: str | os.PathLike, text: str) -> None:
    path = pathlib.Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        # A link, a device, a pipe: written through, never replaced by a file of our own.
        with open(path, "w") as f:
            f.write(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        # mkstemp's file is private (0600); the report gets the mode a plain open would give.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _finite(obj):
    """obj with every NaN or infinite float replaced by None: JSON has no such numbers (a
    bare NaN or Infinity breaks strict readers); a wrong row's reason says what it was."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(result: dict, path) -> None:
    """Write atomically, so a run killed mid-write leaves the previous complete file."""
    _atomic_write(path, json.dumps(_finite(result), indent=1, allow_nan=False) + "\n")


def write_markdown(result: dict, path) -> None:
    _atomic_write(path, markdown(result))


def plot_labels(result: dict, rows: list[dict]) -> tuple[str, list[str]]:
    """The chart's title and one label per bar. Rows of several runs (gpu_check merges its
    steps) name their own mode and dtype, and the title names no one run's settings (it took
    the first step's, and eval and train bars of one workload read alike, until 2026-11-28)."""
    kinds = {(r["mode"], r["dtype"]) for r in rows}
    if len(kinds) == 1:
        return title(result), [f"{r['workload']} b{r['batch']} {r['contender']}" for r in rows]
    e = result["environment"]
    return (f"fused_res bench: {len(kinds)} runs merged, mode and dtype per bar - "
            f"{e['device_name']}",
            [f"{r['workload']} b{r['batch']} {r['mode']} {r['dtype']} {r['contender']}"
             for r in rows])


def write_plot(result: dict, path) -> str | None:
    """Horizontal bars of images/s per (workload, batch, contender). Returns a note when the
    chart cannot be drawn (matplotlib missing, nothing timed), else None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; no chart written"
    rows = [r for r in result["results"] if r["status"] == "ok"]
    if not rows:
        return "nothing was timed; no chart written"
    chart_title, labels = plot_labels(result, rows)
    values = [r["images_per_s"] for r in rows]
    colors = ["tab:orange" if r["contender"].startswith("fused-") else
              "tab:gray" if r["contender"].startswith("eager") else "tab:blue" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.5))
    ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("images / s (higher is better)")
    ax.set_title(chart_title, fontsize=8)
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


class LineProgress(Progress):
    """One line per finished row on stderr (logs, no terminal)."""

    def __init__(self, file=None) -> None:
        self.file, self.n, self.total = file or sys.stderr, 0, 0

    def begin(self, total: int) -> None:
        self.total = total

    def step(self, label: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.total}] {label} ...", file=self.file, flush=True)

    def done(self, row: dict) -> None:
        t = row["time_s"]
        what = f"{t['median'] * 1e3:.3f} ms" if t else f"{row['status']}: {row['reason']}"
        print(f"    {row['contender']}: {what}", file=self.file, flush=True)


class RichProgress(Progress):
    """A transient progress bar on a terminal."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                            transient=True, console=Console(stderr=True))
        self.task = None

    def begin(self, total: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("starting", total=total)

    def step(self, label: str) -> None:
        if self.bar.tasks[0].description != "starting":
            self.bar.advance(self.task)
        self.bar.update(self.task, description=label)

    def end(self) -> None:
        self.bar.update(self.task, completed=self.bar.tasks[0].total)
        self.bar.stop()


def make_progress(enabled: bool = True) -> Progress:
    """A bar on a terminal, log lines otherwise, nothing when disabled."""
    if not enabled:
        return Progress()
    if sys.stderr.isatty():
        try:
            return RichProgress()
        except ImportError:
            pass
    return LineProgress()
