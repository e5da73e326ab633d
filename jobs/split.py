"""Split a Kaggle train file into train.csv and a labelled, prompt-grouped holdout.csv.

    python -m jobs.split --input train.csv --fraction 0.15 --out-dir data/split

The holdout is a test set with labels: pass it to jobs/cv.py as --test, and to jobs/predict.py, which
prints log loss and accuracy on it.
"""

from __future__ import annotations

import argparse

from app.data import split_holdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="Kaggle train file (.csv, .csv.gz, .parquet; local or URI)")
    parser.add_argument("--fraction", type=float, default=0.15, help="share of rows held out (by prompt group)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    train, holdout, n_train, n_holdout = split_holdout(args.input, args.fraction, args.seed, args.out_dir)
    print(f"split: {n_train} rows -> {train}, {n_holdout} rows -> {holdout}", flush=True)


if __name__ == "__main__":
    main()
