"""Print a training config's per-worker accelerator memory plan, whether it fits, and what checkpoints cost.

    python -m jobs.plan --config configs/llama3-8b-full-zero3.yaml run.storage_path=s3://bucket/runs
    python -m jobs.plan --config configs/demo.yaml train.batch_size=32 scaling.accelerator_memory_gb=24

Reads only the model's config.json, or offline the shape app/model_shapes.py stores for it (no weights, no
Ray). Checkpoint times, the step time and the checkpoints' share of training time are estimated for GPU
configs on cluster.yaml's node types (app/checkpoint_plan.py states the assumptions). Exits 1 when
scaling.accelerator_memory_gb is set and the plan does not fit it.
"""

from __future__ import annotations

import argparse
import sys

from app.checkpoint_plan import KAGGLE_TRAIN_ROWS, plan_checkpoints
from app.config import load_config
from app.memory import plan_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (only what differs from the defaults)")
    parser.add_argument("--world-size", type=int, help="data-parallel workers for the memory plan; "
                                                        "default scaling.num_workers")
    parser.add_argument("--rows", type=int, default=KAGGLE_TRAIN_ROWS,
                        help="rows of the training file, before the validation fold is held out "
                             f"(default {KAGGLE_TRAIN_ROWS:,}, Kaggle's train.csv)")
    parser.add_argument("--instance", help="node type to time checkpoints and steps on, e.g. p5.48xlarge; default the "
                                           "smallest of cluster.yaml's with scaling.accelerator_type for all workers")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    memory = plan_memory(config, args.world_size)
    print(memory.render())
    fits, line = memory.describe_fit(config.scaling.accelerator_memory_gb)
    print(line)
    if memory.needs_accelerator:
        print(plan_checkpoints(config, memory.architecture, args.rows, args.instance).render())
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
