"""Average the fold adapters of a LoRA / QLoRA member (jobs/cv.py) into one adapter checkpoint.

    python -m jobs.average --member runs/lora --out runs/lora-averaged
    python -m jobs.average --checkpoints runs/a/epoch_001 runs/b/epoch_001 --out runs/ab-averaged

The result is a checkpoint: pass it to jobs/predict.py --checkpoint, an ensemble spec or the Serve app.
"""

from __future__ import annotations

import argparse

from app.averaging import average_adapters
from app.crossval import load_member


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--member", help="a member folder written by jobs/cv.py: its fold checkpoints")
    source.add_argument("--checkpoints", nargs="+", help="adapter checkpoint folders of one recipe")
    parser.add_argument("--weights", nargs="+", type=float, help="one per checkpoint (default: equal)")
    parser.add_argument("--out", required=True, help="folder of the averaged checkpoint")
    args = parser.parse_args(argv)
    checkpoints = load_member(args.member).checkpoints() if args.member else args.checkpoints
    out = average_adapters(checkpoints, args.out, args.weights)
    print(f"average: {len(checkpoints)} adapters -> {out}", flush=True)


if __name__ == "__main__":
    main()
