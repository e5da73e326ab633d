"""Sweep any dotted config keys with Ray Tune; each trial is a full Ray Train run, ASHA stops bad ones.

    python -m tuning.sweep --config configs/tiny-llama-lora.yaml --space configs/sweeps/lora.yaml --out runs/sweep

Writes <out>/results.csv, <out>/sweep.png and <out>/best.yaml (a preset); TensorBoard: tensorboard --logdir <out>.
<out> is a local folder or a URI (s3://...) that every node of the cluster reaches.
"""

from __future__ import annotations

import argparse

import yaml

from app.cluster import connect
from app.config import apply_overrides, load_config
from app.sweep import load_sweep, run_sweep


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="base preset (only what differs from the defaults)")
    parser.add_argument("--space", required=True, help="sweep file: search space and trial settings (YAML)")
    parser.add_argument("--out", required=True, help="sweep folder: a local path or a URI (s3://...)")
    parser.add_argument("--address", help="Ray cluster address; default $RAY_ADDRESS or a local Ray")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied to the base preset")
    args = parser.parse_args(argv)
    base = load_config(args.config, args.overrides)
    raw = {}
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    raw = apply_overrides(raw, args.overrides)  # best.yaml keeps the command line's overrides too
    spec = load_sweep(args.space, base)
    print(f"ray: {connect(args.address)}", flush=True)
    result = run_sweep(base, spec, raw, args.out)
    print(result.table.drop(columns=["trial_dir"]).to_string(index=False), flush=True)
    print(f"best: {result.best_params} -> {result.best_preset}; plot: {result.plot}", flush=True)


if __name__ == "__main__":
    main()
