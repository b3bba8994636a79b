"""Command line: `python -m fused_res [bench|demo] ...` (also installed as `fused-res`).

With no subcommand (or only options), runs `bench --quick`: the default model (ResNet-50),
every contender that runs here, on the GPU if present; on the CPU a small batch and few
repeats (a few minutes on a two-core machine).
"""

from __future__ import annotations

import argparse
import sys

_SUBCOMMANDS = ("bench", "demo")


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .bench.cli import EXAMPLES, add_arguments

    parser = argparse.ArgumentParser(prog="fused-res", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fused_res {__version__}")
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="time eager, torch.compile, cuDNN and fused_res "
                           "side by side, with a correctness gate and a roofline",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(bench)
    bench.add_argument("--quick", action="store_true",
                       help="fewer repeats, no max-autotune (what `python -m fused_res` runs)")
    demo = sub.add_parser("demo", help="run the default reference model and print a report")
    demo.add_argument("--model", default="resnet50")
    demo.add_argument("--batch", type=int, default=None)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in _SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv = ["bench", "--quick", *argv]
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench.cli import run
        sub = parser._subparsers._group_actions[0].choices["bench"]
        return run(args, sub)

    from .demo import run_demo
    from .models import MODELS

    demo = parser._subparsers._group_actions[0].choices["demo"]
    if args.model not in MODELS:
        demo.error(f"--model {args.model!r}; accepted: {', '.join(sorted(MODELS))}")
    if args.batch is not None and args.batch < 1:
        demo.error(f"--batch {args.batch!r}; accepted: a positive integer")
    if args.device is not None:
        import torch
        if args.device not in ("cpu", "cuda"):
            demo.error(f"--device {args.device!r}; accepted: cpu, cuda")
        if args.device == "cuda" and not torch.cuda.is_available():
            demo.error("--device 'cuda'; accepted: cpu (no CUDA device is present here)")
    run_demo(args.model, args.batch, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
