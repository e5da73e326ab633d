"""jobs/compare.py's library side: plans, rows from out-of-fold members, test-time options, the table; and one
real comparison of a TF-IDF + XGBoost member with a rescored (swap-TTA) copy of its fold runs."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.comparison import (ComparisonPlan, MethodPlan, finished_member, load_plan, method_config, method_row,
                            render_markdown, run_comparison)
from app.config import ConfigError, PredictConfig
from app.members import LOGIT_COLUMNS, Member
from app.metrics import log_loss, softmax


def write_plan(tmp_path, text: str) -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return str(path)


def test_a_plan_is_validated_with_the_bad_keys_path(tmp_path):
    with pytest.raises(ConfigError, match=r"methods\.0\.runner"):
        load_plan(write_plan(tmp_path, "methods:\n  - {name: a, runner: magic}\n"))
    with pytest.raises(ConfigError, match="unique"):
        load_plan(write_plan(tmp_path, "methods:\n  - {name: a}\n  - {name: a}\n"))
    with pytest.raises(ConfigError, match="not an earlier method"):
        load_plan(write_plan(tmp_path, "methods:\n  - {name: a, train_runs: b}\n  - {name: b}\n"))
    (tmp_path / "preset.yaml").write_text("model:\n  kind: tfidf_xgb\n")
    plan = load_plan(write_plan(tmp_path, "folds: [0]\nmethods:\n  - {name: a, config: preset.yaml}\n"))
    assert plan.methods[0].config == str(tmp_path / "preset.yaml")  # found next to the plan


def fake_member(tmp_path, folds=(0, 1), rows_per_fold=40, seed=0) -> Member:
    rng = np.random.default_rng(seed)
    parts = []
    for fold in folds:
        labels = rng.choice(3, size=rows_per_fold, p=[0.5, 0.3, 0.2])
        logits = rng.normal(size=(rows_per_fold, 3)) + 2.0 * np.eye(3)[labels]
        parts.append(pd.DataFrame(logits, columns=list(LOGIT_COLUMNS)).assign(fold=fold, label=labels))
    oof = pd.concat(parts, ignore_index=True)
    oof.insert(0, "id", [str(i) for i in range(len(oof))])
    meta = {"folds": [{"fold": fold, "checkpoint": None, "rows": rows_per_fold} for fold in folds],
            "train_seconds": 12.0, "predict_seconds_per_1000_rows": 3.5}
    return Member("m", str(tmp_path), oof, None, meta)


def test_a_row_scores_only_the_plans_folds_and_applies_test_time_options(tmp_path):
    member = fake_member(tmp_path)
    method = MethodPlan(name="m")
    fold0 = member.oof[member.oof["fold"] == 0]
    plain = method_row(method, member, [0], PredictConfig())
    expected = log_loss(softmax(fold0[list(LOGIT_COLUMNS)].to_numpy()), fold0["label"].to_numpy())
    assert plain["log_loss"] == pytest.approx(expected) and plain["rows"] == 40
    assert (plain["train_seconds"], plain["predict_seconds_per_1000_rows"]) == (12.0, 3.5)
    smoothed = method_row(method, member, [0], PredictConfig(temperature=2.0, smoothing=0.1))
    fold1_shares = np.bincount(member.oof.loc[member.oof["fold"] == 1, "label"], minlength=3) / 40
    z = fold0[list(LOGIT_COLUMNS)].to_numpy()
    manual = 0.9 * softmax(z / 2.0) + 0.1 * fold1_shares  # fold 0 smoothed toward its training folds' shares
    assert smoothed["log_loss"] == pytest.approx(log_loss(manual, fold0["label"].to_numpy()))
    with pytest.raises(ValueError, match="no rows of folds"):
        method_row(method, member, [7], PredictConfig())
    prompting = method_row(MethodPlan(name="p", runner="prompt"), member, None, PredictConfig())
    assert (prompting["train_seconds"], prompting["predict_seconds_per_1000_rows"]) == (0.0, 3.5)  # nothing trained


def test_the_shipped_plans_and_their_method_configs_are_valid(tmp_path):
    plans = sorted((Path(__file__).resolve().parents[1] / "configs" / "compare").glob("*.yaml"))
    assert plans
    for path in plans:
        plan = load_plan(str(path))
        for method in plan.methods:
            method_config(plan, method, str(tmp_path), ["data.train_path=train.csv"])


def test_the_markdown_table_keeps_the_reference_first_and_sorts_methods():
    table = pd.DataFrame([
        {"method": "uniform (reference)", "log_loss": math.log(3), "accuracy": 0.33, "rows": 10, "train_seconds": 0.0,
         "predict_seconds_per_1000_rows": 0.0, "note": "no model"},
        {"method": "worse", "log_loss": 1.0, "accuracy": 0.4, "rows": 10, "train_seconds": None,
         "predict_seconds_per_1000_rows": 2.0, "note": ""},
        {"method": "better", "log_loss": 0.9, "accuracy": 0.5, "rows": 10, "train_seconds": 30.0,
         "predict_seconds_per_1000_rows": 1.0, "note": ""}])
    lines = render_markdown(table).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["uniform (reference)", "better", "worse"]
    assert "| n/a |" in lines[4]


QUICK = ["data.builtin_rows=300", "data.n_folds=3", "classical.word_max_features=500",
         "classical.char_max_features=1000", "classical.min_df=1", "classical.num_boost_round=60",
         "classical.early_stopping_rounds=20", "classical.report_every_rounds=20", "scaling.num_workers=1"]


def test_a_comparison_runs_methods_on_the_same_fold_and_reuses_fold_runs(ray_session, tmp_path):
    plan = ComparisonPlan(folds=[0], overrides=QUICK, methods=[
        MethodPlan(name="xgb", overrides=["model.kind=tfidf_xgb"]),
        MethodPlan(name="xgb-tta", overrides=["model.kind=tfidf_xgb", "predict.tta_swap=true",
                                               "predict.tta_combine=prob"], train_runs="xgb")])
    out = tmp_path / "compare"
    table = run_comparison(plan, str(out))
    assert table["method"].tolist() == ["uniform (reference)", "class shares (reference)", "xgb", "xgb-tta"]
    assert table["rows"].nunique() == 1  # every method on the same held-out rows
    assert table.loc[0, "log_loss"] == pytest.approx(math.log(3))
    assert (table.loc[2:, "log_loss"] < math.log(3)).all()  # both learn on the built-in data
    assert table.loc[2, "train_seconds"] > 0 and table.loc[3, "train_seconds"] == table.loc[2, "train_seconds"]
    assert not (out / "xgb-tta-fold0").exists()  # the TTA row scored the xgb fold runs again, trained nothing
    tta = json.loads((out / "xgb-tta" / "member.json").read_text())
    assert tta["tta_swap"] is True and tta["folds"][0]["checkpoint"].startswith(str(out / "xgb-fold0"))
    assert "| xgb-tta |" in (out / "comparison.md").read_text()
    assert pd.read_csv(out / "comparison.csv")["method"].tolist() == table["method"].tolist()
    again = run_comparison(plan, str(out))  # the same plan again: both members are read back, nothing reruns
    pd.testing.assert_frame_equal(again, table)
    changed = plan.model_copy(update={"methods": [plan.methods[0], plan.methods[1].model_copy(
        update={"overrides": [*plan.methods[1].overrides, "predict.tta_combine=logit"]})]})
    assert finished_member(str(out / "xgb"), method_config(plan, plan.methods[0], str(out)), [0]) is not None
    assert finished_member(str(out / "xgb-tta"), method_config(changed, changed.methods[1], str(out)), [0]) is None
    reported = run_comparison(plan, str(out), report_only=True)  # tabulates the folders, runs nothing
    pd.testing.assert_frame_equal(reported.drop(columns=["predict_seconds_per_1000_rows"]),
                                  table.drop(columns=["predict_seconds_per_1000_rows"]))
    rerun = run_comparison(plan, str(out), only=["xgb-tta"])  # one method again: the others stay in the table
    pd.testing.assert_frame_equal(rerun, table)
    with_new = plan.model_copy(update={"methods": [*plan.methods, MethodPlan(name="later")]})
    assert run_comparison(with_new, str(out), report_only=True)["method"].tolist() == table["method"].tolist()
