"""Train one ensemble member on k prompt-grouped folds and save its out-of-fold (and test) logits.

    python -m jobs.cv --config configs/demo.yaml --test test.csv run.name=minilm data.train_path=train.csv

Writes <run.storage_path>/<run.name>/{member.json, oof.parquet, test.parquet} (format in app/crossval.py).
"""

from __future__ import annotations

import argparse
import json

from app.cluster import connect
from app.config import load_config
from app.crossval import run_cv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (only what differs from the defaults)")
    parser.add_argument("--folds", help="comma-separated fold numbers to run (default: all data.n_folds)")
    parser.add_argument("--test", help="Kaggle test file to score with every fold model")
    parser.add_argument("--address", help="Ray cluster address; default $RAY_ADDRESS or a local Ray")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    folds = [int(fold) for fold in args.folds.split(",")] if args.folds else None
    print(f"ray: {connect(args.address)}", flush=True)
    member = run_cv(config, folds, args.test)
    print(json.dumps({"member": member.directory, "oof_log_loss": member.meta["oof_log_loss"],
                      "oof_accuracy": member.meta["oof_accuracy"],
                      "folds": [{k: fold[k] for k in ("fold", "valid_log_loss", "checkpoint")}
                                for fold in member.meta["folds"]]}, indent=2), flush=True)


if __name__ == "__main__":
    main()
