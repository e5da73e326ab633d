"""Fold-adapter averaging vs the K-model ensemble it replaces, on a labelled holdout.

    HF_HUB_OFFLINE=1 python -m bench.adapter_averaging --member runs/real/minilm-lora \
        --holdout holdout.csv --out runs/real/minilm-lora-averaged

`--member` is a LoRA / QLoRA member folder written by `jobs/cv.py --test <holdout>`, so its test.parquet
holds every fold model's logits on the holdout rows. Rows of the table:

- each fold model alone (the mean, best and worst of their holdout log losses);
- the K-model ensemble: the fold models' probabilities averaged (what an ensemble spec of the fold
  checkpoints computes with equal weights), and their logits averaged;
- the averaged adapter (`app.averaging.average_adapters`, what `jobs/average.py` writes), scored here over
  Ray Data by `app.prediction.score_rows` with the member's predict settings.

Inference cost is counted in models run per row (K for the ensemble, 1 for the average), and the averaged
adapter's scoring time is printed with it.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from app.averaging import average_adapters
from app.cluster import connect
from app.config import validate_config
from app.crossval import LOGIT_COLUMNS, load_member
from app.data import load_pairs
from app.ensemble import combine
from app.metrics import score, softmax
from app.prediction import score_rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--member", required=True)
    parser.add_argument("--holdout", required=True, help="labelled file the member's test.parquet scored")
    parser.add_argument("--out", required=True, help="folder for the averaged adapter checkpoint")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    member = load_member(args.member)
    if member.test is None:
        raise SystemExit(f"{args.member} has no test.parquet: run jobs/cv.py with --test {args.holdout}")
    holdout = load_pairs(args.holdout, require_labels=True).frame
    labels = holdout["label"].to_numpy()
    folds = sorted(member.test["fold"].unique())
    fold_logits = []
    for fold in folds:
        rows = member.test[member.test["fold"] == fold].set_index("id").loc[holdout["id"]]
        fold_logits.append(rows[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64))
    singles = [score(softmax(logits), labels) for logits in fold_logits]

    connect()
    config = validate_config(member.meta["config"], f"{args.member}/member.json")
    started = time.perf_counter()
    averaged_dir = average_adapters(member.checkpoints(), args.out)
    averaging_s = time.perf_counter() - started
    started = time.perf_counter()
    averaged = score(softmax(score_rows(averaged_dir, holdout, config.predict, output="logits")), labels)
    scoring_s = time.perf_counter() - started

    k = len(folds)
    ensembles = {what: score(combine(fold_logits, [1 / k] * k, mode), labels)
                 for what, mode in (("probabilities", "prob"), ("logits", "logit"))}
    table = [
        ("fold model alone, mean of K", np.mean([s["log_loss"] for s in singles]),
         np.mean([s["accuracy"] for s in singles]), 1),
        ("fold model alone, best", min(s["log_loss"] for s in singles), None, 1),
        ("fold model alone, worst", max(s["log_loss"] for s in singles), None, 1),
        *[(f"K={k} ensemble, {what} averaged", ensemble["log_loss"], ensemble["accuracy"], k)
          for what, ensemble in ensembles.items()],
        (f"averaged adapter (of K={k})", averaged["log_loss"], averaged["accuracy"], 1),
    ]
    print(f"\n{member.name}: {k} folds, {len(holdout)} holdout rows; averaging took {averaging_s:.1f} s, "
          f"scoring the averaged adapter {scoring_s:.1f} s ({len(holdout) / scoring_s:.1f} rows/s)\n")
    print("| predictor | holdout log loss | holdout accuracy | models run per row |")
    print("|---|---:|---:|---:|")
    for name, log_loss, accuracy, models in table:
        shown = "" if accuracy is None else f"{accuracy:.3f}"
        print(f"| {name} | {log_loss:.4f} | {shown} | {models} |")


if __name__ == "__main__":
    main()
