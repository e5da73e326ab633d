"""Out-of-fold training (real Ray, tiny MiniLM), the ensemble built from members, and predict with its spec."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app import storage
from app.config import load_config
from app.crossval import LOGIT_COLUMNS, build_ensemble, load_member, run_cv, score_spec_on_holdout
from app.data import load_pairs
from app.ensemble import EnsembleMember, EnsembleReport, EnsembleSpec, apply_spec_to_member_logits, load_spec, save_spec
from app.inference import Predictor
from app.prediction import predict_file
from app.synthetic import write_builtin_dataset
from app.training import load_training_rows, run_directory

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def member(ray_session, tmp_path_factory):
    storage = tmp_path_factory.mktemp("cv")
    config = load_config(TINY, {"run.storage_path": str(storage), "run.name": "minilm", "data.n_folds": 2,
                                "data.builtin_rows": 160, "format.max_length": 64, "train.epochs": 1, "train.max_steps": 6, "predict.precision": "fp32",
                                "run.keep_checkpoints": 1})
    test_path = storage / "holdout.csv"  # a labelled test file
    frame, _ = load_training_rows(config, run_directory(config))  # writes the built-in data
    shutil.copy(Path(run_directory(config)) / "builtin_data" / "holdout.csv", test_path)
    return config, run_cv(config, test_path=str(test_path)), test_path, frame


def test_every_training_row_gets_one_out_of_fold_logit(member):
    config, result, test_path, frame = member
    oof = result.oof
    assert sorted(oof["id"]) == sorted(frame["id"].astype(str))  # each row exactly once
    assert set(oof["fold"]) == {0, 1} and np.isfinite(oof[list(LOGIT_COLUMNS)].to_numpy()).all()
    test = pd.read_csv(test_path)
    assert len(result.test) == 2 * len(test)  # every fold model on every test row
    assert load_member(result.directory).meta["oof_log_loss"] == pytest.approx(result.meta["oof_log_loss"])
    assert len(result.checkpoints()) == 2


def write_member_like(source, directory: Path, name: str, logits: np.ndarray) -> str:
    """A copy of a real member folder (same rows, folds and fold checkpoints) with other out-of-fold logits."""
    shutil.copytree(source.directory, directory, ignore=shutil.ignore_patterns("builtin_data", "test.parquet"))
    oof = source.oof.copy()
    oof[list(LOGIT_COLUMNS)] = logits
    oof.to_parquet(directory / "oof.parquet", index=False)
    meta = (directory / "member.json").read_text().replace(f'"member": "{source.name}"', f'"member": "{name}"')
    (directory / "member.json").write_text(meta)
    return str(directory)


def test_ensemble_favours_the_better_member_and_predict_uses_its_spec(member, tmp_path):
    config, trained, test_path, _ = member
    # A few steps on 80 rows leave the real member's out-of-fold logits without signal (temperature fitting
    # rightly refuses them), so the ensemble is fitted on controlled logits over the member's real rows,
    # folds and checkpoints: "sharp" knows the label, "noisy" is half of sharp and half another row's.
    labels = trained.oof["label"].to_numpy()
    rng = np.random.default_rng(0)
    sharp = np.eye(3)[labels] * 1.5 + rng.normal(0, 1, (len(labels), 3))
    noisy = 0.5 * sharp + 0.5 * sharp[rng.permutation(len(labels))]
    directories = [write_member_like(trained, tmp_path / "sharp", "sharp", sharp),
                   write_member_like(trained, tmp_path / "noisy", "noisy", noisy)]

    spec, table = build_ensemble(directories, str(tmp_path / "ensemble"), mode="prob")
    weights = {m.name.split("/")[0]: 0.0 for m in spec.members}
    for m in spec.members:
        weights[m.name.split("/")[0]] += m.weight
    assert weights["sharp"] > weights["noisy"]
    assert len(spec.members) == 4  # 2 members x 2 fold models
    assert (tmp_path / "ensemble" / "reliability_sharp.png").stat().st_size > 0
    assert set(table["member"]) >= {"sharp", "noisy"}
    assert load_spec(tmp_path / "ensemble" / "ensemble.json") == spec

    output = tmp_path / "submission.csv"
    predict_file(str(tmp_path / "ensemble" / "ensemble.json"), str(test_path), str(output), config.predict)
    submission = pd.read_csv(output)
    frame = load_pairs(str(test_path), require_labels=False).frame
    texts = (list(frame["prompt"]), list(frame["response_a"]), list(frame["response_b"]))
    member_logits = {m.name: Predictor(m.checkpoint, precision="fp32").predict_logits(*texts) for m in spec.members}
    expected = apply_spec_to_member_logits(spec, member_logits)
    np.testing.assert_allclose(submission.iloc[:, 1:].to_numpy(), expected, atol=1e-5)


def test_holdout_scores_from_saved_test_logits_match_predict(member, tmp_path):
    """jobs/ensemble.py --holdout scores a spec from the members' saved test logits: predict agrees."""
    config, trained, test_path, _ = member
    folds = [EnsembleMember(name=f"minilm/fold{k}", checkpoint=checkpoint, weight=0.5, temperature=1.3)
             for k, checkpoint in enumerate(trained.checkpoints())]
    spec = EnsembleSpec(members=tuple(folds), mode="prob", priors=(0.3, 0.3, 0.4), train_priors=(0.4, 0.4, 0.2),
                        report=EnsembleReport(n_rows=1, member_log_loss={m.name: 1.0 for m in folds},
                                              ensemble_log_loss=1.0))
    holdout = load_pairs(str(test_path)).frame
    table = score_spec_on_holdout(spec, [trained], holdout).set_index("predictor")
    save_spec(spec, tmp_path / "ensemble.json")
    report = predict_file(str(tmp_path / "ensemble.json"), str(test_path), str(tmp_path / "s.csv"), config.predict)
    ensemble = table.loc[table.index.str.startswith("ensemble spec")].iloc[0]
    assert ensemble["holdout_log_loss"] == pytest.approx(report.metrics["log_loss"], abs=1e-5)
    assert table.loc["class shares of the training rows", "holdout_log_loss"] > 0
    assert len(table) == 4  # prior, member raw, member with its temperature, ensemble


# --- every output on S3 (moto): a tfidf_xgb member, its ensemble, and predict from there ------------------------

XGB = Path(__file__).resolve().parents[1] / "configs" / "tfidf-xgb.yaml"
# One worker, small vocabularies and few shallow rounds: a fold takes a few seconds on 2 shared cores.
XGB_QUICK = {"data.n_folds": 2, "scaling.num_workers": 1, "classical.word_max_features": 300,
             "classical.char_max_features": 500, "classical.prompt_max_features": 50, "classical.max_depth": 3,
             "classical.learning_rate": 0.2, "classical.num_boost_round": 30, "classical.early_stopping_rounds": 10,
             "classical.report_every_rounds": 10}


@pytest.fixture(scope="module")
def s3_member(ray_session, s3, tmp_path_factory):
    """A 2-fold tfidf_xgb member whose fold runs, checkpoints and member folder are all on S3."""
    data = write_builtin_dataset(str(tmp_path_factory.mktemp("s3cv")), n_train=300, n_test=60, seed=0)
    config = load_config(XGB, {"run.storage_path": s3(), "run.name": "xgb", "data.train_path": data["train"],
                               **XGB_QUICK})
    return config, run_cv(config, test_path=data["holdout"]), data


def test_a_member_folder_on_s3_holds_what_a_local_one_does(s3_member):
    config, member, _ = s3_member
    assert member.directory == run_directory(config) and member.directory.startswith("s3://")
    assert {"member.json", "oof.parquet", "test.parquet"} <= set(storage.list_dir(member.directory))
    again = load_member(member.directory)
    pd.testing.assert_frame_equal(again.oof, member.oof)
    assert again.meta == member.meta and member.meta["oof_log_loss"] < 1.0
    for fold in member.meta["folds"]:
        assert fold["checkpoint"].startswith(f"{config.run.storage_path}/xgb-fold{fold['fold']}/")
        arena = storage.read_json(storage.join(fold["checkpoint"], "arena.json"))  # rewritten on S3
        assert arena["kind"] == "tfidf_xgb" and arena["prior_calibration"]["n_rows"] == fold["rows"]
        assert arena["config"]["tracking"]["run_group"] == "xgb"  # the folds' tracker runs nest under the member
        assert storage.list_dir(f"{config.run.storage_path}/xgb-fold{fold['fold']}/tracking/tensorboard")
        timing = storage.read_json(f"{config.run.storage_path}/xgb-fold{fold['fold']}/timing.json")
        assert timing["train_seconds"] == pytest.approx(fold["train_seconds"])


def test_a_finished_s3_fold_run_is_reused_with_its_recorded_time(s3_member, s3):
    config, member, _ = s3_member
    rescored = run_cv(config, folds=[0], member_dir=s3())  # the fold run finished before: read back, not trained
    (fold,) = rescored.meta["folds"]
    assert fold["checkpoint"] == member.meta["folds"][0]["checkpoint"]
    assert fold["train_seconds"] == pytest.approx(member.meta["folds"][0]["train_seconds"])


def test_jobs_ensemble_on_s3_members_writes_its_spec_and_tables_to_s3(s3_member, s3):
    from jobs import ensemble as ensemble_job

    _, member, data = s3_member
    out = s3()
    ensemble_job.main(["--members", member.directory, "--out", out, "--holdout", data["holdout"]])
    assert {"ensemble.json", "calibration.csv", "reliability_xgb.png", "holdout.csv"} <= set(storage.list_dir(out))
    assert storage.read_bytes(storage.join(out, "reliability_xgb.png")).startswith(b"\x89PNG")
    spec = load_spec(storage.join(out, "ensemble.json"))
    assert [m.checkpoint for m in spec.members] == member.checkpoints()  # the fold checkpoints' s3:// URIs
    assert spec.member_dirs == {"xgb": member.directory}
    calibration = storage.read_csv(storage.join(out, "calibration.csv")).set_index("member")
    assert calibration.loc["xgb", "log_loss_before"] == pytest.approx(member.meta["oof_log_loss"])
    holdout = storage.read_csv(storage.join(out, "holdout.csv"))  # scored from the member's s3 test.parquet
    assert len(holdout) == 4 and holdout["holdout_log_loss"].notna().all()
