"""``python -m benchmarks run [--ci] [--out DIR] [--retries MODE]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks.runner import main_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="measure, then write results.json, summary.md, plots")
    run.add_argument("--ci", action="store_true", help="short run with checks (make bench-ci)")
    run.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    run.add_argument(
        "--retries",
        choices=["by_method", "safe", "never"],
        default=os.environ.get("BENCH_ROUTE_RETRIES", "by_method"),
        help="the benchmark route's retries (never: shows the CI checks failing); "
        "default $BENCH_ROUTE_RETRIES or by_method",
    )
    args = parser.parse_args(argv)
    return main_run(args.out, args.ci, args.retries)


if __name__ == "__main__":
    sys.exit(main())
