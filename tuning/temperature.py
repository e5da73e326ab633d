"""Tune temperature and probability smoothing on a member's saved out-of-fold logits, next to the fitted value.

    python -m tuning.temperature --member runs/minilm --out runs/minilm/temperature

--member and --out are local folders or URIs (s3://...).
"""

from __future__ import annotations

import argparse

from app import storage
from app.calibration import fit_temperature
from app.cluster import connect
from app.members import load_member
from app.sweep import run_temperature_sweep


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--member", required=True, help="member folder written by jobs/cv.py")
    parser.add_argument("--out", required=True, help="folder for temperature.csv and Tune's records")
    parser.add_argument("--samples", type=int, default=48, help="Tune trials")
    parser.add_argument("--address", help="Ray cluster address; default $RAY_ADDRESS or a local Ray")
    args = parser.parse_args(argv)
    member = load_member(args.member)
    labels = member.oof["label"].to_numpy()
    storage.make_dirs(args.out)
    print(f"ray: {connect(args.address)}", flush=True)
    table = run_temperature_sweep(member.oof_logits, labels, args.out, args.samples)
    print(table.head(10).to_string(index=False), flush=True)
    print(f"best swept temperature {table.iloc[0]['temperature']:.3f} (smoothing {table.iloc[0]['smoothing']}); "
          f"fitted temperature {fit_temperature(member.oof_logits, labels):.3f}", flush=True)


if __name__ == "__main__":
    main()
