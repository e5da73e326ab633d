"""Train a preference classifier on Ray Train.

    python -m jobs.train --config configs/demo.yaml train.lr=3e-5 scaling.num_workers=2

Runs against the cluster in $RAY_ADDRESS (as under `ray job submit`) or --address, else an embedded local Ray.
"""

from __future__ import annotations

import argparse
import json

from app.cluster import connect
from app.config import load_config
from app.memory import check_fits
from app.training import fit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (only what differs from the defaults)")
    parser.add_argument("--address", help="Ray cluster address; default $RAY_ADDRESS or a local Ray")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    plan = check_fits(config)  # refuses, with the numbers, a job that cannot fit scaling.accelerator_memory_gb
    if plan is not None:
        print(plan.render(), flush=True)
    print(f"ray: {connect(args.address)}", flush=True)
    result = fit(config)
    metrics = result.best_metrics
    print(json.dumps({"best_checkpoint": result.best_checkpoint,
                      "valid_log_loss": metrics["valid_log_loss"], "valid_accuracy": metrics["valid_accuracy"],
                      "epoch": metrics["epoch"], "rejected_rows": result.n_rejected}, indent=2), flush=True)
    print(f"BEST_CHECKPOINT={result.best_checkpoint}", flush=True)


if __name__ == "__main__":
    main()
