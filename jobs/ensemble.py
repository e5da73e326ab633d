"""Calibrate out-of-fold members, fit their ensemble weights, and write the ensemble spec.

    python -m jobs.ensemble --members runs/minilm runs/deberta --out runs/ensemble --mode prob --priors em

Reads member folders written by jobs/cv.py; writes <out>/ensemble.json (for jobs/predict.py --checkpoint and
the Serve app), <out>/calibration.csv and a reliability diagram per member. Folders are local paths or URIs
(s3://...).
"""

from __future__ import annotations

import argparse

import yaml

from app import storage
from app.crossval import build_ensemble, load_members, score_spec_on_holdout
from app.data import load_pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", nargs="+", required=True, help="member folders written by jobs/cv.py")
    parser.add_argument("--out", required=True, help="folder for ensemble.json, calibration.csv and plots")
    parser.add_argument("--mode", choices=["prob", "logit"], default="prob", help="probability or logit averaging")
    parser.add_argument("--priors", help="target class priors: 'calibrated_em' or 'em' (estimated on each test file; "
                        "see predict.priors) or 'pA,pB,pTie'")
    parser.add_argument("--holdout", help="labelled file the members scored (jobs/cv.py --test): report log loss on it")
    args = parser.parse_args(argv)
    priors = args.priors if args.priors in (None, "em", "calibrated_em") else [float(p) for p in yaml.safe_load(f"[{args.priors}]")]
    spec, table = build_ensemble(args.members, args.out, args.mode, priors)
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    print(f"ensemble spec: {storage.join(args.out, 'ensemble.json')} ({len(spec.members)} fold models)", flush=True)
    if args.holdout:
        members, _ = load_members(args.members)
        holdout = score_spec_on_holdout(spec, members, load_pairs(args.holdout, require_labels=True).frame)
        storage.write_csv(storage.join(args.out, "holdout.csv"), holdout)
        print(holdout.to_string(index=False, float_format=lambda value: f"{value:.4f}"), flush=True)


if __name__ == "__main__":
    main()
