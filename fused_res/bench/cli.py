"""`python -m fused_res bench ...`: arguments, validation, and what gets written where."""

from __future__ import annotations

import argparse
import sys

from .config import DTYPES, MEMORY_FORMATS, MODES, BenchConfig, ConfigError, split_list

EXAMPLES = """examples:
  python -m fused_res bench --model resnet18 --batch 2 --device cpu --json out.json
  python -m fused_res bench --model resnet50 --dtype bf16 --batch 64,256 --mode train
  python -m fused_res bench --model rn50-blocks --contenders eager,fused --cuda-graphs
"""


def add_arguments(p: argparse.ArgumentParser, quick: bool = False) -> None:
    """The bench options (also accepted by `python -m fused_res` with no subcommand)."""
    from .contenders import all_names
    from .workloads import GROUPS

    p.add_argument("--model", default="resnet50",
                   help="comma-separated models, block/unit presets or specs, or groups ("
                   + ", ".join(GROUPS) + "); see fused_res.bench.workloads (default resnet50)")
    p.add_argument("--batch", default=None,
                   help="comma-separated batch sizes (default: 64 on CUDA, 2 on the CPU)")
    p.add_argument("--dtype", default=None,
                   help=f"{', '.join(DTYPES)} (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--memory-format", default="channels_last",
                   help=f"{', '.join(MEMORY_FORMATS)} for compile and fused contenders "
                   "(eager-nchw and eager-cl keep theirs)")
    p.add_argument("--mode", default="eval",
                   help=f"{', '.join(MODES)} (train = forward + backward + SGD step)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--contenders", default=None,
                   help="comma-separated names or groups (default, all, eager, compiled, fused, "
                   "cudnn); names: " + ", ".join(all_names()))
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time every contender as a captured CUDA graph")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 3)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed iterations (default: 50 on CUDA, 10 on the CPU)")
    p.add_argument("--rotate", type=int, default=0,
                   help="distinct inputs to cycle through, at most 64 (default: enough to "
                        "exceed 2x L2)")
    p.add_argument("--no-flush-l2", action="store_true",
                   help="do not overwrite the L2 cache between iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write a markdown report")
    p.add_argument("--plot", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    p.set_defaults(quick=quick)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """BenchConfig from parsed arguments, filling the device-dependent defaults."""
    from .config import default_device

    device = args.device or default_device()
    cuda = device == "cuda"
    batch = args.batch or ("64" if cuda else "2")
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    repeats = args.repeats if args.repeats is not None else (
        (20 if args.quick else 50) if cuda else (5 if args.quick else 10))
    warmup = args.warmup if args.warmup is not None else (2 if args.quick and not cuda else 3)
    contenders = split_list(args.contenders) if args.contenders else None
    return BenchConfig(models=tuple(split_list(args.model)), batches=batch, dtype=dtype,
                       memory_format=args.memory_format, mode=args.mode, device=device,
                       contenders=contenders, cuda_graphs=args.cuda_graphs, warmup=warmup,
                       repeats=repeats, rotate=args.rotate, flush_l2=not args.no_flush_l2,
                       seed=args.seed, quick=args.quick)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Validate, run, print the table, write the files asked for. Bad input: parser.error
    (exit status 2) with a message naming the argument, its value and what is accepted."""
    from . import output
    from .runner import run_bench, validate

    try:
        config = config_from_args(args)
        validate(config)
    except ConfigError as e:
        parser.error(str(e))
    for option, path in (("--json", args.json), ("--markdown", args.markdown),
                         ("--plot", args.plot)):
        problem = path and output.output_path_problem(option, path)
        if problem:
            parser.error(problem)

    def save(result: dict) -> None:
        if args.json:
            output.write_json(result, args.json)

    try:
        result = run_bench(config, output.make_progress(not args.no_progress), on_row=save)
    except ConfigError as e:  # what only building a workload finds out
        parser.error(str(e))
    save(result)
    output.print_table(result)
    if args.markdown:
        output.write_markdown(result, args.markdown)
    if args.plot:
        note = output.write_plot(result, args.plot)
        if note:
            print(f"--plot {args.plot}: {note}", file=sys.stderr)
    for what, path in (("JSON", args.json), ("markdown", args.markdown), ("chart", args.plot)):
        if path:
            print(f"{what}: {path}")
    return 0
