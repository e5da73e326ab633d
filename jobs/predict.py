"""Write a Kaggle submission.csv from a checkpoint with Ray Data batch prediction.

    python -m jobs.predict --checkpoint runs/demo/checkpoint_... --input test.csv --output submission.csv predict.tta_swap=true

When the input has label columns, log loss and accuracy are printed too. With `predict.priors` the report says
what the class-prior shift did (priors estimated, converged or not, fallback or not), and a run record
(`<output stem>.record.json`) keeps it beside the submission.
"""

from __future__ import annotations

import argparse
import json

from app.cluster import connect
from app.config import load_config
from app.prediction import predict_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or URI, or an ensemble spec .json (jobs/ensemble.py)")
    parser.add_argument("--input", required=True, help="Kaggle test.csv / train.csv (.csv, .csv.gz, .parquet; local or URI)")
    parser.add_argument("--output", default="submission.csv")
    parser.add_argument("--config", help="YAML preset whose predict and data sections apply")
    parser.add_argument("--address", help="Ray cluster address; default $RAY_ADDRESS or a local Ray")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. predict.tta_swap=true")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    print(f"ray: {connect(args.address)}", flush=True)
    report = predict_file(args.checkpoint, args.input, args.output, config.predict,
                          on_bad_rows=config.data.on_bad_rows, rejects_path=config.data.rejects_path)
    if report.prior_shift is not None:
        print(f"priors: {report.prior_shift.summary()}", flush=True)
    print(json.dumps({"submission": report.output, "rows": report.rows, "seconds": round(report.seconds, 1),
                      "rejected_rows": report.n_rejected, **report.metrics,
                      "prior_shift": None if report.prior_shift is None else report.prior_shift.model_dump(mode="json"),
                      "record": report.record}, indent=2), flush=True)


if __name__ == "__main__":
    main()
