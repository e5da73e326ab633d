"""Methods side by side on the same prompt-grouped folds: one table of log loss, accuracy and cost.

A comparison plan (YAML, e.g. configs/compare/real.yaml) lists methods; each is a config (preset +
overrides) and a runner that turns it into an out-of-fold member folder (app/crossval.py format):

    cv       `app.crossval.run_cv`: any trained model kind (encoder, decoder, T5, tfidf_xgb), and with config keys
             the trained variants (distill.teacher, train.swap_mode, retrieval.enabled, predict.tta_*)
    prompt   `app.fewshot.prompt_cv`: zero/few-shot label-word scoring, no training

Every method is trained and scored on the plan's folds of the same rows (`data.*` and `seed` in the plan's
common overrides), so the table compares like with like; scores are recomputed here from each member's
out-of-fold logits on exactly those folds' rows. Runs resume: a method whose fold runs finished is only
scored again, and keeps the training time recorded when it trained (app.crossval.record_train_seconds).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.config import Config, ConfigError, PredictConfig, config_to_dict, load_config
from app.ensemble import finish_probabilities
from app.members import LOGIT_COLUMNS, Member, is_member_dir, load_member
from app.metrics import score, softmax
from app.priors import class_frequencies

TABLE_COLUMNS = ("method", "log_loss", "accuracy", "rows", "train_seconds", "predict_seconds_per_1000_rows", "note")


class MethodPlan(BaseModel):
    """One row of the comparison."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="the row's name and its run name")
    runner: Literal["cv", "prompt"] = "cv"
    config: str | None = Field(None, description="a preset YAML, relative to the plan file or the working directory")
    overrides: list[str] = Field(default_factory=list, description="section.key=value, after the plan's common ones")
    train_runs: str | None = Field(
        None, description="reuse the fold runs of this earlier method (same training; only predict.* differs): "
                          "its models are scored again with this method's predict settings")
    note: str = Field("", description="shown in the table, e.g. what model stands in for a method")


class ComparisonPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    folds: list[int] | None = Field(None, description="held-out folds to run; None = all data.n_folds")
    overrides: list[str] = Field(default_factory=list, description="applied to every method (data, seed, steps)")
    methods: list[MethodPlan] = Field(min_length=1)


def load_plan(path: str) -> ComparisonPlan:
    """Read and validate a plan file; errors name the bad key's path (e.g. `methods.2.runner`)."""
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    try:
        plan = ComparisonPlan.model_validate(raw)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors()]
        raise ConfigError(f"invalid comparison plan {path}:\n" + "\n".join(lines)) from None
    names = [method.name for method in plan.methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: method names must be unique; got {names}")
    for index, method in enumerate(plan.methods):
        if method.train_runs is not None and method.train_runs not in names[:index]:
            raise ConfigError(f"{path}: methods.{index}.train_runs: '{method.train_runs}' is not an earlier method")
        if method.train_runs is not None and method.runner != "cv":
            raise ConfigError(f"{path}: methods.{index}.train_runs: only a cv method has fold runs to reuse")
    base = Path(path).parent
    for method in plan.methods:  # presets are found next to the plan when not found from here
        if method.config and not os.path.exists(method.config) and (base / method.config).exists():
            method.config = str(base / method.config)
    return plan


def method_config(plan: ComparisonPlan, method: MethodPlan, storage_path: str, extra: Sequence[str] = ()) -> Config:
    """The method's validated config: its preset, the plan's common overrides, `extra` (command line), its own
    overrides, then its run name (that of `train_runs` when it reuses another method's fold runs) and the
    comparison's storage folder."""
    return load_config(method.config, [*plan.overrides, *extra, *method.overrides,
                                       f"run.name={method.train_runs or method.name}",
                                       f"run.storage_path={storage_path}"])


def run_method(method: MethodPlan, config: Config, folds: list[int] | None, storage_path: str) -> Member:
    """Train (or resume) and score one method on the folds into <storage_path>/<method>; returns its member."""
    member_dir = os.path.join(storage_path, method.name)
    done = finished_member(member_dir, config, folds)
    if done is not None:
        print(f"compare: {method.name}: read back from {member_dir} (same config, folds done)", flush=True)
        return done
    if method.runner == "prompt":
        from app.fewshot import prompt_cv

        return prompt_cv(config, folds=folds)
    from app.crossval import run_cv

    return run_cv(config, folds, member_dir=member_dir)


def finished_member(member_dir: str, config: Config, folds: list[int] | None) -> Member | None:
    """The method's member folder when a previous comparison wrote it with this very config and these folds
    (so a rerun only tabulates it), else None."""
    if not is_member_dir(member_dir):
        return None
    member = load_member(member_dir)
    wanted = set(range(config.data.n_folds)) if folds is None else set(folds)
    scored = {int(fold["fold"]) for fold in member.meta.get("folds", [])}
    same_config = member.meta.get("config") == json.loads(json.dumps(config_to_dict(config)))
    return member if same_config and scored == wanted else None


def fold_train_priors(member: Member) -> dict[int, np.ndarray]:
    """Per fold, the class shares its model was trained on: from the fold checkpoint's meta when it has
    them, else from the member's rows of the other folds.

    Raises:
        ValueError: neither is available for a fold (one fold scored, with no checkpoint).
    """
    from app.modeling import CHECKPOINT_META, read_checkpoint_meta  # torch: only where shares are needed

    labels = member.oof[["fold", "label"]].to_numpy(dtype=np.int64)
    shares = {}
    for fold in member.meta["folds"]:
        checkpoint = fold.get("checkpoint")
        has_meta = bool(checkpoint) and os.path.exists(os.path.join(checkpoint, CHECKPOINT_META))
        recorded = read_checkpoint_meta(checkpoint)[0].get("train_priors") if has_meta else None
        others = labels[labels[:, 0] != fold["fold"], 1]
        if recorded is None and others.size == 0:
            raise ValueError(f"member {member.directory}, fold {fold['fold']}: no class shares to smooth toward "
                             "(no checkpoint records them and no other fold was scored)")
        shares[int(fold["fold"])] = np.asarray(recorded) if recorded is not None else class_frequencies(others)
    return shares


def test_time_probabilities(oof: pd.DataFrame, member: Member, predict: PredictConfig) -> np.ndarray:
    """(N, 3) probabilities of a member's out-of-fold rows after `predict.temperature` and `predict.smoothing`
    (its TTA settings are already in the logits), each fold smoothed toward its training class shares, as
    predict does with the shares a checkpoint records."""
    probs = softmax(oof[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float64))
    if predict.temperature is None and not predict.smoothing:
        return probs
    shares = fold_train_priors(member)
    for fold in np.unique(oof["fold"]):
        rows = (oof["fold"] == fold).to_numpy()
        probs[rows] = finish_probabilities(probs[rows], predict.temperature or 1.0, None, shares[int(fold)],
                                           predict.smoothing or 0.0)
    return probs


def method_row(method: MethodPlan, member: Member, folds: list[int] | None, predict: PredictConfig) -> dict:
    """The method's scores on the plan's folds, from its out-of-fold logits (after the test-time temperature
    and smoothing of `predict`), and its costs as the member recorded them (a prompting member trains nothing).
    """
    oof = member.oof if folds is None else member.oof[member.oof["fold"].isin(folds)]
    if oof.empty:
        raise ValueError(f"method '{method.name}': its member {member.directory} has no rows of folds {folds}")
    probs = test_time_probabilities(oof, member, predict)
    metrics = score(probs, oof["label"].to_numpy())
    train_seconds = 0.0 if method.runner == "prompt" else member.meta.get("train_seconds")
    return {"method": method.name, "log_loss": metrics["log_loss"], "accuracy": metrics["accuracy"],
            "rows": len(oof), "train_seconds": train_seconds,
            "predict_seconds_per_1000_rows": member.meta.get("predict_seconds_per_1000_rows"),
            "note": method.note}


def uniform_row(labels: np.ndarray) -> dict:
    """The reference every method must beat: 1/3 for each class (log loss ln 3)."""
    metrics = score(np.full((len(labels), 3), 1.0 / 3.0), labels)
    return {"method": "uniform (reference)", **metrics, "rows": len(labels), "train_seconds": 0.0,
            "predict_seconds_per_1000_rows": 0.0, "note": "no model"}


def class_share_row(member: Member, folds: list[int] | None) -> dict:
    """The second reference: every row predicted as its fold's training class shares (what a model that
    ignores the texts can reach), from a trained member's fold checkpoints."""
    oof = member.oof if folds is None else member.oof[member.oof["fold"].isin(folds)]
    shares = fold_train_priors(member)
    probs = np.stack([shares[int(fold)] for fold in oof["fold"]])
    return {"method": "class shares (reference)", **score(probs, oof["label"].to_numpy()), "rows": len(oof),
            "train_seconds": 0.0, "predict_seconds_per_1000_rows": 0.0, "note": "the training folds' label shares"}


def run_comparison(plan: ComparisonPlan, storage_path: str, extra: Sequence[str] = (),
                   only: Sequence[str] | None = None, report_only: bool = False) -> pd.DataFrame:
    """Run every method (or the `only` ones) and write <storage_path>/comparison.{csv,md}; returns the table.
    The table has every method of the plan that has a member folder in `storage_path`: those not run now
    (not in `only`, or all with `report_only`) are tabulated as they are; one with no folder yet is named and
    left out.

    Raises:
        ConfigError: an unknown name in `only`, or a method's config is invalid (checked before any run starts).
    """
    unknown = set(only or ()) - {method.name for method in plan.methods}
    if unknown:
        raise ConfigError(f"--only names no method of the plan: {sorted(unknown)}")
    configs = {method.name: method_config(plan, method, storage_path, extra) for method in plan.methods}
    rows, labels, references = [], None, []
    for method in plan.methods:
        member_dir = os.path.join(storage_path, method.name)
        if not report_only and (only is None or method.name in only):
            print(f"compare: {method.name} ({method.runner})", flush=True)
            member = run_method(method, configs[method.name], plan.folds, storage_path)
        elif is_member_dir(member_dir):
            member = load_member(member_dir)
        else:
            print(f"compare: {method.name}: not run yet (no {member_dir}), left out of the table", flush=True)
            continue
        rows.append(method_row(method, member, plan.folds, configs[method.name].predict))
        print(f"compare: {method.name}: log loss {rows[-1]['log_loss']:.4f}", flush=True)
        if labels is None:
            oof = member.oof if plan.folds is None else member.oof[member.oof["fold"].isin(plan.folds)]
            labels = oof["label"].to_numpy()
        if not references and method.runner == "cv":
            references.append(class_share_row(member, plan.folds))
    if labels is None:
        raise ValueError(f"no method of the plan has a member folder in {storage_path}: nothing to tabulate")
    table = pd.DataFrame([uniform_row(labels), *references, *rows], columns=list(TABLE_COLUMNS))
    os.makedirs(storage_path, exist_ok=True)
    table.to_csv(os.path.join(storage_path, "comparison.csv"), index=False)
    Path(storage_path, "comparison.md").write_text(render_markdown(table), encoding="utf-8")
    return table


def render_markdown(table: pd.DataFrame) -> str:
    """The comparison as a Markdown table, best log loss first (the reference rows stay on top)."""
    is_reference = table["method"].str.endswith("(reference)")
    reference, methods = table[is_reference], table[~is_reference].sort_values("log_loss", kind="stable")

    def cell(value: object, digits: int) -> str:
        return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"

    lines = ["| method | log loss | accuracy | rows | training s | inference s / 1,000 rows | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in pd.concat([reference, methods]).itertuples(index=False):
        lines.append(f"| {row.method} | {cell(row.log_loss, 4)} | {cell(row.accuracy, 3)} | {row.rows} | "
                     f"{cell(row.train_seconds, 0)} | {cell(row.predict_seconds_per_1000_rows, 1)} | {row.note} |")
    return "\n".join(lines) + "\n"
