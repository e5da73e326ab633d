"""Class-prior adaptation under a change of tie rate, on real pairs, from saved out-of-fold logits.

    # once: the 5-fold member whose out-of-fold logits are scored (jobs/cv.py, prompt-grouped folds)
    nice -n 10 .venv/bin/python -m jobs.cv --config configs/tfidf-xgb.yaml data.train_path=$DATA/pairs.csv.gz \
        run.storage_path=$PWD/runs/label_shift run.name=tfidf-xgb scaling.num_workers=1 classical.nthread=1
    # then, training nothing:
    nice -n 10 .venv/bin/python -m bench.label_shift --member runs/label_shift/tfidf-xgb --data $DATA

`--data` is the folder of `pairs_metadata.csv` (`unifiedbias_subsets` of every id); the member folder holds
every row's out-of-fold logits, from the fold model that did not train on it. Calibrations are cross-fitted
too: a row of fold k is calibrated by `app.calibration.fit_prior_calibration` fitted on the out-of-fold
logits of the other folds, so no row is scored by a model or a calibration that saw its fold.

Test sets are drawn from those rows without replacement, at tie shares of 3%, 10%, 20% and 31%, each as large
as the ties (all in the `same_verbo` subset) and the non-tie rows allow. "source mix" draws the non-tie rows
from every subset (pure label shift); the other mixes draw them from one family of upstream subsets only
(`verbo_*`: the longer response won or lost; `self_*`: battles of one model family), so the texts shift too.

Every set is scored unadjusted, with its true class shares as fixed priors (`predict.priors=[...]`, the
re-weighting a user who knew them would apply), with plain EM (`predict.priors=em`), calibrated without a
shift, calibrated and re-weighted to the true shares, and with `predict.priors=calibrated_em` (bias-corrected
calibration, EM with A and B tied, then the safeguard: a minimum shift of 2 x 1.64 x the calibration's held-out
prior error, and a bootstrap of the likelihood gain: `app.priors.shift_calibrated_posteriors`, what `apply_spec`
runs after the calibration), then its ablations (a minimum shift of 2 x the error, no minimum shift, no
safeguard at all, alpha 0.01, BCTS or vector scaling alone). A set's rows come from every fold, so its minimum
shift is measured by the root mean square of the five fold calibrations' `prior_error` (each measured on the
rows that calibration was fitted on). Prints markdown tables and checks the targets of issue 17; `--out` writes
JSON.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from app.calibration import PriorCalibration, fit_prior_calibration
from app.members import LOGIT_COLUMNS, load_member
from app.metrics import log_loss, softmax
from app.priors import (
    EMSettings, class_frequencies, resolve_min_shift, reweight_to_priors, shift_calibrated_posteriors,
    shift_priors_em)
from bench.reporting import write_json

TIE_SHARES = (0.03, 0.10, 0.20, 0.31)
TIE = 2
MIXES = {"source mix": None, "verbo_* only": "verbo_", "self_* only": "self_"}  # subset-name prefix of non-ties
CALIBRATED = ("auto", "bcts", "vector")  # fit_prior_calibration methods: the default, then each alone
ADAPTED = "calibrated_em (auto)"  # what predict.priors=calibrated_em does with its defaults
ONE_SIGMA = "calibrated_em (auto), minimum shift 2 x error"  # a 1-sigma error bound; added after ADAPTED in `main`
VARIANTS = {  # name: (calibration method, EM settings); the first is the default, the rest ablations
    ADAPTED: ("auto", EMSettings()),
    "calibrated_em (auto), no minimum shift": ("auto", EMSettings(min_shift=0)),
    "calibrated_em (auto), no safeguard": ("auto", EMSettings(safeguard_resamples=0, min_shift=0)),
    "calibrated_em (auto), alpha 0.01": ("auto", EMSettings(safeguard_alpha=0.01)),
    "calibrated_em (bcts)": ("bcts", EMSettings()),
    "calibrated_em (vector)": ("vector", EMSettings()),
}


@dataclass
class SetResult:
    """One test set: its make-up, each method's log loss, and what the adaptations estimated and applied."""

    mix: str
    tie_share: float
    rows: int
    ties: int
    log_loss: dict[str, float] = field(default_factory=dict)
    estimated_tie: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def load_rows(member_dir: str, data_dir: str) -> pd.DataFrame:
    """Out-of-fold rows (id, fold, label, logits) with their upstream subsets; raises if an id has none."""
    oof = load_member(member_dir).oof
    meta = pd.read_csv(os.path.join(data_dir, "pairs_metadata.csv"), dtype={"id": str})
    rows = oof.merge(meta[["id", "unifiedbias_subsets"]], on="id", how="left", validate="one_to_one")
    missing = rows["unifiedbias_subsets"].isna()
    if missing.any():
        raise SystemExit(f"{int(missing.sum())} out-of-fold ids (e.g. {rows['id'][missing].iloc[0]}) are not in "
                         f"{data_dir}/pairs_metadata.csv: --data must be the folder the member was trained on")
    return rows


def cross_fitted_calibrations(logits: np.ndarray, labels: np.ndarray, folds: np.ndarray,
                              method: str) -> dict[int, PriorCalibration]:
    """Per fold k, the prior calibration fitted on the out-of-fold rows of every other fold."""
    return {int(fold): fit_prior_calibration(logits[folds != fold], labels[folds != fold], method)
            for fold in np.unique(folds)}


def calibrated_posteriors(logits: np.ndarray, folds: np.ndarray, calibrations: dict[int, PriorCalibration],
                          source: np.ndarray) -> np.ndarray:
    """Each row calibrated by its fold's calibration, then moved from that calibration's source priors to the
    common `source` (Bayes' rule; the folds' shares differ by a few thousandths), so EM has one start."""
    probs = np.empty_like(logits)
    for fold, calibration in calibrations.items():
        rows = folds == fold
        probs[rows] = reweight_to_priors(calibration.apply(logits[rows]), np.array(calibration.source_priors), source)
    return probs


def draw_set(rows: pd.DataFrame, tie_share: float, prefix: str | None, rng: np.random.Generator) -> np.ndarray:
    """Row indices of a set with this tie share, as many rows as the ties and eligible non-ties allow."""
    ties = np.flatnonzero(rows["label"].to_numpy() == TIE)
    eligible = rows["label"].to_numpy() != TIE
    if prefix is not None:
        eligible &= rows["unifiedbias_subsets"].str.split(";").map(lambda names: any(
            name.startswith(prefix) for name in names)).to_numpy()
    others = np.flatnonzero(eligible)
    n_ties = min(len(ties), int(np.floor(tie_share / (1 - tie_share) * len(others))))
    n_others = min(len(others), int(round(n_ties * (1 - tie_share) / tie_share)))
    return np.concatenate([rng.choice(ties, n_ties, replace=False), rng.choice(others, n_others, replace=False)])


def score_set(raw: np.ndarray, calibrated: dict[str, np.ndarray], labels: np.ndarray, train_priors: np.ndarray,
              source: dict[str, np.ndarray], prior_error: dict[str, float],
              variants: dict[str, tuple[str, EMSettings]], result: SetResult) -> None:
    """Every method on one set's rows, into `result`."""
    def record(name: str, probs: np.ndarray, tie: float | None = None, note: str = "") -> None:
        result.log_loss[name] = log_loss(probs, labels)
        result.estimated_tie[name] = tie
        if note:
            result.notes[name] = note

    true_shares = class_frequencies(labels)
    record("unadjusted", raw)
    record("true priors", reweight_to_priors(raw, train_priors, true_shares), float(true_shares[TIE]))
    plain, shift = shift_priors_em(raw, train_priors)
    record("em", plain, shift.estimated_priors[TIE], f"{'converged' if shift.converged else 'NOT converged'} "
                                                     f"in {shift.n_iter}")
    record("calibrated, no shift", calibrated["auto"])
    record("true priors, calibrated", reweight_to_priors(calibrated["auto"], source["auto"], true_shares))
    for name, (method, settings) in variants.items():
        probs, shift = shift_calibrated_posteriors(calibrated[method], source[method], raw, settings,
                                                   prior_error=prior_error[method])
        record(name, probs, shift.estimated_priors[TIE] if shift.estimated_priors else None,
               ("FALLBACK: " if shift.fallback else "") + shift.reason)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--member", required=True, help="out-of-fold member folder (jobs/cv.py)")
    parser.add_argument("--data", required=True, help="folder with pairs_metadata.csv (unifiedbias_subsets)")
    parser.add_argument("--seed", type=int, default=0, help="the draws of the test sets")
    parser.add_argument("--out", help="write settings and results as JSON here")
    args = parser.parse_args(argv)

    rows = load_rows(args.member, args.data)
    logits = rows[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64)
    labels, folds = rows["label"].to_numpy(), rows["fold"].to_numpy()
    train_priors = class_frequencies(labels)  # what fit_ensemble records as the member's train_priors
    raw = softmax(logits)
    calibrated, source, prior_error = {}, {}, {}
    for method in CALIBRATED:
        calibrations = cross_fitted_calibrations(logits, labels, folds, method)
        source[method] = np.mean([c.source_priors for c in calibrations.values()], axis=0)
        calibrated[method] = calibrated_posteriors(logits, folds, calibrations, source[method])
        prior_error[method] = float(np.sqrt(np.mean([c.prior_error ** 2 for c in calibrations.values()])))
        if method == "auto":
            chosen = [f"fold {fold}: {c.describe()}, held-out prior error {c.prior_error:.4f}"
                      for fold, c in calibrations.items()]
    print(f"{len(rows)} out-of-fold rows in {len(np.unique(folds))} folds, class shares "
          f"{np.round(train_priors, 4).tolist()}, out-of-fold log loss {log_loss(raw, labels):.4f}")
    print("cross-fitted calibrations (auto):\n  " + "\n  ".join(chosen))
    print("held-out prior error (root mean square over the folds' calibrations) and the minimum shift it sets: "
          + ", ".join(f"{method} {error:.4f} -> {resolve_min_shift(EMSettings(), error):.4f}"
                      for method, error in prior_error.items()))

    variants = {ADAPTED: VARIANTS[ADAPTED], ONE_SIGMA: ("auto", EMSettings(min_shift=2 * prior_error["auto"])),
                **VARIANTS}  # the min_shift of ONE_SIGMA needs the calibrations' prior error
    rng = np.random.default_rng(args.seed)
    results = []
    for mix, prefix in MIXES.items():
        for tie_share in TIE_SHARES:
            index = draw_set(rows, tie_share, prefix, rng)
            result = SetResult(mix, tie_share, len(index), int((labels[index] == TIE).sum()))
            score_set(raw[index], {m: p[index] for m, p in calibrated.items()}, labels[index], train_priors,
                      source, prior_error, variants, result)
            results.append(result)
    print_tables(results)
    if args.out:
        write_json(args.out, {"member": args.member, "data": args.data, "seed": args.seed,
                              "tie_shares": TIE_SHARES, "mixes": MIXES}, results)


def print_tables(results: list[SetResult]) -> None:
    """Log loss and estimated tie share per set and method, the notes of calibrated_em, and the targets."""
    methods = list(results[0].log_loss)
    print("\n| mix | ties | rows (ties) | " + " | ".join(methods) + " |")
    print("|---|---:|---:|" + "---:|" * len(methods))
    for r in results:
        print(f"| {r.mix} | {r.tie_share:.0%} | {r.rows} ({r.ties}) | "
              + " | ".join(f"{r.log_loss[m]:.4f}" for m in methods) + " |")
    estimated = [m for m in methods if any(r.estimated_tie[m] is not None for r in results)]
    print("\nestimated tie share (true share in the first column of numbers):\n")
    print("| mix | ties | " + " | ".join(estimated) + " |")
    print("|---|---:|" + "---:|" * len(estimated))
    for r in results:
        print(f"| {r.mix} | {r.ties / r.rows:.3f} | " + " | ".join(
            "" if r.estimated_tie[m] is None else f"{r.estimated_tie[m]:.3f}" for m in estimated) + " |")
    print(f"\n{ADAPTED}, what was applied:")
    for r in results:
        print(f"  {r.mix}, {r.tie_share:.0%}: {r.notes.get(ADAPTED, '')}")
    print("\ntargets: calibrated_em <= unadjusted on every set; <= true priors + 0.02 at 20% and 31% ties")
    failed = 0
    for r in results:
        adapted = r.log_loss[ADAPTED]
        checks = [("<= unadjusted", adapted <= r.log_loss["unadjusted"])]
        if r.tie_share >= 0.2:
            checks.append(("<= true priors + 0.02", adapted <= r.log_loss["true priors"] + 0.02))
        failed += sum(not ok for _, ok in checks)
        print(f"  {r.mix}, {r.tie_share:.0%}: adapted {adapted:.4f}, unadjusted {r.log_loss['unadjusted']:.4f}, "
              f"true priors {r.log_loss['true priors']:.4f}: "
              + ", ".join(f"{name} {'met' if ok else 'NOT MET'}" for name, ok in checks))
    print(f"\n{failed} target check(s) not met")


if __name__ == "__main__":
    main()
