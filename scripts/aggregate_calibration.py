#!/usr/bin/env python
"""Print one table of the jobs of a `fastif hvp-calibrate -m ...` sweep (no run folder is written).

    python scripts/aggregate_calibration.py outputs/hvp-calibrate/demo/multirun/<timestamp> [--csv table.csv]

`fastif hvp-calibrate aggregate=<folder>` does the same inside a versioned run folder and also
writes recommended.yaml and tradeoff.png for the sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastif import calibration as C
from fastif.errors import FastifError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", type=Path)
    parser.add_argument("--csv", type=Path, default=None, help="also write the table as CSV here")
    parser.add_argument("--metric", default="spearman", choices=C.QUALITY_METRICS)
    parser.add_argument("--statistic", default="median", choices=C.STATISTICS)
    parser.add_argument("--target", type=float, default=0.99)
    args = parser.parse_args()
    try:
        _, summary, skipped = C.aggregate_jobs(args.multirun_dir, quality_metric=args.metric, quality_target=args.target, statistic=args.statistic)
    except FastifError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for message in skipped:
        print(f"skipped job {message}", file=sys.stderr)
    print(C.summary_markdown(summary))
    if args.csv is not None:
        summary.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
