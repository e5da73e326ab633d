"""What step logging costs a training run: the same Ray Train run with no step records, with TensorBoard at every
step, and with TensorBoard, MLflow and W&B at every step.

    HF_HUB_OFFLINE=1 python -m bench.tracking_overhead --rows 600 --repeats 2 --json-out tracking.json

Every variant trains the packaged MiniLM on the same built-in rows with the same seed, steps and 2 workers
(`app.training.fit`, tiny preset); only `train.log_every_steps` and the `tracking.*` sinks differ:

1. evaluations only: `train.log_every_steps` past the run's last step (the epochs' evaluations still go to
   TensorBoard, which is always on): the baseline;
2. tensorboard: a record every optimizer step (an all-reduce of the step sums over the ranks, memory read, then
   rank 0 writes the event file);
3. all sinks: the same records to TensorBoard, to a real `mlflow server` (SQLite, 127.0.0.1, started here) and to
   W&B offline.

Training speed is the epochs' `train_rows_per_s` (training time only: evaluations and checkpoints excluded), and
the fit's wall time (everything, the trackers' start and close included). Variants run in turn, the order reversed
every other repeat; the table gives medians and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import mlflow_server
from bench.reporting import write_json

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("evaluations only", "tensorboard", "all sinks")


@dataclass
class Measurement:
    variant: str
    log_points: int  # step records per run
    rows_per_s: float  # median over repeats of the epochs' mean train_rows_per_s
    wall_s: float  # median fit wall time
    valid_log_loss: float
    details: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=600, help="built-in rows (4/5 train)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json-out")
    return parser.parse_args(argv)


def overrides(variant: str, mlflow_uri: str) -> dict[str, Any]:
    if variant == "evaluations only":
        return {"train.log_every_steps": 10**6}
    if variant == "tensorboard":
        return {"train.log_every_steps": 1}
    return {"train.log_every_steps": 1, "tracking.mlflow_uri": mlflow_uri, "tracking.mlflow_experiment": "bench",
            "tracking.wandb_project": "bench", "tracking.wandb_mode": "offline"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("WANDB_SILENT", "true")
    import ray

    from app.config import load_config
    from app.training import fit

    runs: dict[str, list[tuple[float, float, float, int]]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench_tracking_") as scratch:
        uri, server = mlflow_server.start(scratch)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            for repeat in range(args.repeats):
                for variant in VARIANTS if repeat % 2 == 0 else reversed(VARIANTS):
                    config = load_config(ROOT / "configs" / "tiny.yaml", {
                        "run.storage_path": os.path.join(scratch, "runs"), "run.name": f"{variant}-{repeat}".replace(" ", "-"),
                        "data.builtin_rows": args.rows, "format.max_length": args.max_length,
                        "train.epochs": args.epochs, **overrides(variant, uri)})
                    started = time.perf_counter()
                    result = fit(config)
                    wall = time.perf_counter() - started
                    rows_per_s = statistics.mean(row["train_rows_per_s"] for row in result.history)
                    steps = int(result.history[-1]["step"])
                    points = steps if config.train.log_every_steps == 1 else 0
                    runs[variant].append((rows_per_s, wall, result.best_metrics["valid_log_loss"], points))
                    print(f"{variant} (repeat {repeat}): {rows_per_s:.1f} rows/s, fit {wall:.1f} s, {steps} steps",
                          flush=True)
        finally:
            ray.shutdown()
            mlflow_server.stop(server)
    results = [Measurement(variant, runs[variant][0][3], statistics.median(r[0] for r in runs[variant]),
                           statistics.median(r[1] for r in runs[variant]), runs[variant][0][2],
                           {"repeats": [{"rows_per_s": r[0], "wall_s": r[1]} for r in runs[variant]]})
               for variant in VARIANTS]
    base = results[0]
    lines = ["| step records to | records per run | train rows/s | vs evaluations only | fit wall s | "
             "vs evaluations only | valid log loss |", "|---|---|---|---|---|---|---|"]
    for m in results:
        lines.append(f"| {m.variant} | {m.log_points} | {m.rows_per_s:.1f} | {m.rows_per_s / base.rows_per_s:.3f}x "
                     f"| {m.wall_s:.1f} | {m.wall_s / base.wall_s:.3f}x | {m.valid_log_loss:.4f} |")
    import torch

    settings = {"rows": args.rows, "epochs": args.epochs, "max_length": args.max_length, "repeats": args.repeats,
                "model": "packaged all-MiniLM-L6-v2, 2 workers (configs/tiny.yaml)",
                "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch "
                           f"{torch.__version__}, ray {ray.__version__}"}
    print("\n" + "\n".join(f"{key}: {value}" for key, value in settings.items()) + "\n\n" + "\n".join(lines))
    if args.json_out:
        write_json(args.json_out, settings, results)


if __name__ == "__main__":
    main()
