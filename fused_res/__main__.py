"""Command line: `python -m fused_res [demo|...]` (also installed as `fused-res`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fused-res", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="run the default reference model and print a report")
    demo.add_argument("--model", default="resnet50")
    demo.add_argument("--batch", type=int, default=None)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    args = parser.parse_args(argv)

    from .demo import run_demo
    from .models import MODELS

    command = args.command or "demo"
    if command == "demo":
        model = getattr(args, "model", "resnet50")
        if model not in MODELS:
            parser.error(f"--model {model!r}; accepted: {', '.join(sorted(MODELS))}")
        run_demo(model, getattr(args, "batch", None), getattr(args, "device", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
