"""Run the methods of a comparison plan on the same prompt-grouped folds and print their table.

    python -m jobs.compare --plan configs/compare/real.yaml --out runs/compare data.train_path=train.csv

Writes <out>/comparison.csv and <out>/comparison.md (method, log loss, accuracy, rows, training seconds,
inference seconds per 1,000 rows) and each method's member folder <out>/<method>/. Overrides after the
options apply to every method (after the plan's own common overrides). A rerun resumes finished methods.
"""

from __future__ import annotations

import argparse

from app.cluster import connect
from app.comparison import load_plan, run_comparison


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", required=True, help="comparison plan YAML (methods, folds, common overrides)")
    parser.add_argument("--out", required=True, help="folder for the methods' runs and the table")
    parser.add_argument("--only", help="comma-separated method names to run (default: all); the methods already run stay in the table")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: tabulate the member folders already in --out")
    parser.add_argument("--address", help="Ray cluster address; default $RAY_ADDRESS or a local Ray")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every method")
    args = parser.parse_args(argv)
    plan = load_plan(args.plan)
    if not args.report_only:
        print(f"ray: {connect(args.address)}", flush=True)
    table = run_comparison(plan, args.out, args.overrides, args.only.split(",") if args.only else None,
                           report_only=args.report_only)
    print(table.to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
