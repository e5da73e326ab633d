"""Train a student on a teacher's out-of-fold probabilities (knowledge distillation): one run, or a cv member.

    python -m jobs.distill --config configs/demo.yaml distill.teacher=runs/deberta run.name=minilm-student
    python -m jobs.distill --cv --test holdout.csv --config configs/demo.yaml \\
        distill.teacher=runs/ensemble/ensemble.json distill.temperature=2 distill.alpha=0.7 run.name=minilm-kd

The teacher (distill.teacher) is a member folder written by jobs/cv.py or an ensemble spec written by
jobs/ensemble.py; it must have scored every training row out of fold. The loss is
alpha * T^2 * KL(teacher || student) at temperature T plus (1 - alpha) * cross-entropy on the labels
(distill.alpha, distill.temperature). With --cv the student is itself a member folder (as jobs/cv.py writes),
ready for jobs/ensemble.py. Prints the student's and the teacher's log loss on the same held-out rows.
"""

from __future__ import annotations

import argparse
import json

from app.cluster import connect
from app.config import load_config
from app.students import train_student


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (only what differs from the defaults)")
    parser.add_argument("--cv", action="store_true", help="train every fold and write a member folder (jobs/cv.py)")
    parser.add_argument("--folds", help="with --cv: comma-separated fold numbers (default: all data.n_folds)")
    parser.add_argument("--test", help="with --cv: Kaggle test file to score with every fold model")
    parser.add_argument("--address", help="Ray cluster address; default $RAY_ADDRESS or a local Ray")
    parser.add_argument("overrides", nargs="*", help="section.key=value; distill.teacher=<folder or .json> is required")
    args = parser.parse_args(argv)
    if not args.cv and (args.folds or args.test):
        parser.error("--folds and --test need --cv")
    config = load_config(args.config, args.overrides)
    if config.distill.teacher is None:
        parser.error("name the teacher: distill.teacher=<member folder (jobs/cv.py) or ensemble .json>")
    folds = [int(fold) for fold in args.folds.split(",")] if args.folds else None
    print(f"ray: {connect(args.address)}", flush=True)
    print(json.dumps(train_student(config, args.cv, folds, args.test), indent=2), flush=True)


if __name__ == "__main__":
    main()
