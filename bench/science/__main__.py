"""``python -m bench.science [--quick] [--seeds N] [--jobs N] [--out DIR] [--data PATH] [--device cpu|cuda]
[--only STUDY ...]``."""

from __future__ import annotations

import argparse
import pathlib
import sys

from . import STUDIES, run_science


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.science", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a handful of steps on tiny data per study (smoke test)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/science"), help="output folder")
    parser.add_argument("--data", default=None, help="MNIST IDX images file instead of scikit-learn's digits")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per training (default 3, 1 with --quick)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes (default: one per core, at most 4, on a CPU full run; 1 with --quick)")
    parser.add_argument("--only", nargs="+", choices=STUDIES, default=None, help="run only these studies")
    args = parser.parse_args(argv)
    results = run_science(args.out, quick=args.quick, data=args.data, device=args.device,
                          studies=tuple(args.only) if args.only else None, seeds=args.seeds, jobs=args.jobs)
    for r in results:
        print(f"{r.number}. {r.title}: {r.outcome} — {r.verdict}")
    print(f"wrote {args.out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
