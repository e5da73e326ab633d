"""Print the per-worker accelerator memory plan of a training config, and whether it fits.

    python -m jobs.plan --config configs/demo.yaml train.batch_size=32 scaling.accelerator_memory_gb=24

Reads only the model's config.json (no weights, no Ray). Exits 1 when scaling.accelerator_memory_gb is set
and the plan does not fit it.
"""

from __future__ import annotations

import argparse
import sys

from app.config import load_config
from app.memory import GIB, HEADROOM, plan_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (only what differs from the defaults)")
    parser.add_argument("--world-size", type=int, help="data-parallel workers; default scaling.num_workers")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    plan = plan_memory(config, args.world_size)
    print(plan.render())
    limit_gb = config.scaling.accelerator_memory_gb
    if limit_gb is None:
        print("fits: not checked (set scaling.accelerator_memory_gb=<GiB per worker>)")
        return 0
    usable = limit_gb * GIB * (1 - HEADROOM)
    fits = plan.fits(limit_gb * GIB)
    print(f"fits: {'yes' if fits else 'NO'} ({plan.peak_bytes / GIB:.2f} GiB of {usable / GIB:.2f} GiB usable "
          f"= {limit_gb} GiB less {HEADROOM:.0%} headroom)")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
