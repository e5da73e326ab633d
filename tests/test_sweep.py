"""A real Ray Tune sweep: 4 trials of the tiny MiniLM preset, each a Ray Train run, ASHA on valid_log_loss."""

import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from app import storage
from app.config import ConfigError, load_config
from app.sweep import load_sweep, run_sweep
from app.synthetic import write_builtin_dataset

ROOT = Path(__file__).resolve().parents[1]
# One worker per trial and a small set keep 4 trials to a few minutes on 2 cores.
FAST = {"scaling.num_workers": 1, "data.builtin_rows": 120, "format.max_length": 48}


def test_bad_sweep_files_name_the_key(tmp_path):
    base = load_config(ROOT / "configs" / "tiny.yaml")
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("space:\n  train.lrr: {choice: [1.0e-4]}\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_sweep(str(bad_key), base)
    bad_domain = tmp_path / "bad_domain.yaml"
    bad_domain.write_text("space:\n  train.lr: {loguniform: [1.0e-4]}\n")
    with pytest.raises(ConfigError, match="space.train.lr.loguniform"):
        load_sweep(str(bad_domain), base)
    bad_value = tmp_path / "bad_value.yaml"
    bad_value.write_text("space:\n  train.batch_size: {choice: [0, 8]}\n")
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_sweep(str(bad_value), base)


def test_a_sweep_file_is_read_from_s3(s3, tmp_path):
    from app import storage

    base = load_config(ROOT / "configs" / "tiny.yaml", FAST)
    space = s3() + "/space.yaml"
    storage.write_text(space, (ROOT / "configs" / "sweeps" / "tiny.yaml").read_text())
    assert load_sweep(space, base) == load_sweep(str(ROOT / "configs" / "sweeps" / "tiny.yaml"), base)
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        load_sweep(s3() + "/absent.yaml", base)


def test_four_trial_sweep_writes_results_plot_and_best_preset(ray_session, tmp_path):
    preset = ROOT / "configs" / "tiny.yaml"
    base = load_config(preset, FAST)
    raw = yaml.safe_load(preset.read_text())
    spec = load_sweep(str(ROOT / "configs" / "sweeps" / "tiny.yaml"), base)
    result = run_sweep(base, spec, raw, str(tmp_path / "sweep"))

    table = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert len(table) == 4 and table["valid_log_loss"].notna().all()
    assert set(table["status"]) <= {"done", "stopped early"}
    assert (table["status"] == "stopped early").any()  # ASHA cut at least one trial after its first epoch
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    best = load_config(result.best_preset)  # a valid preset
    winner = table.sort_values("valid_log_loss").iloc[0]
    assert best.train.lr == pytest.approx(winner["train.lr"])
    assert best.train.warmup_ratio == pytest.approx(winner["train.warmup_ratio"])
    assert list((tmp_path / "sweep").rglob("events.out.tfevents*"))  # TensorBoard reads the sweep folder
    # and every trial's own step curves (app/tracking.py), one run folder per trial
    assert len({path.parents[2] for path in (tmp_path / "sweep" / "trials").glob("*/tracking/tensorboard/events*")}) == 4


def test_temperature_sweep_agrees_with_the_fitted_temperature(ray_session, tmp_path):
    import numpy as np

    from app.calibration import fit_temperature
    from app.sweep import run_temperature_sweep

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, (4000, 3))
    shifted = logits / 2.0  # the labels are drawn from softmax(logits / 2): the true temperature is 2
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    table = run_temperature_sweep(logits, labels, str(tmp_path), num_samples=12, temperature_range=(1.0, 4.0),
                                  smoothing=(0.0,))
    fitted = fit_temperature(logits, labels)
    best = table.iloc[0]
    assert best["temperature"] == pytest.approx(fitted, rel=0.15)
    assert len(table) == 12 and table["log_loss"].is_monotonic_increasing  # every trial, best first
    assert (tmp_path / "temperature.csv").exists()


@pytest.mark.timeout(600)
def test_a_sweep_on_s3_keeps_its_trials_and_outputs_there(ray_session, s3, tmp_path):
    """One tfidf_xgb trial (the cheapest kind, one worker) with the sweep folder an s3:// URI. The worker asks for
    every CPU of the session's Ray, as a GPU worker may ask for all of its node's: the trial's own actor must hold
    none (a trial that held 0.01 CPU left the worker waiting for ever)."""
    cpus = ray_session.cluster_resources()["CPU"]
    deadline = time.monotonic() + 60
    while ray_session.available_resources().get("CPU", 0) < cpus:
        assert time.monotonic() < deadline, f"an earlier test holds CPUs: {ray_session.available_resources()}"
        time.sleep(1)
    data = write_builtin_dataset(str(tmp_path / "data"), n_train=160, n_test=50)
    base = load_config(ROOT / "configs" / "tfidf-xgb.yaml", {
        "data.train_path": data["train"], "scaling.num_workers": 1, "scaling.cpus_per_worker": cpus,
        "classical.word_max_features": 200,
        "classical.char_max_features": 300, "classical.prompt_max_features": 50, "classical.num_boost_round": 20,
        "classical.report_every_rounds": 10})
    space = tmp_path / "space.yaml"
    space.write_text("num_samples: 1\nasha: null\nspace:\n  classical.max_depth: {choice: [2, 3]}\n")
    out = s3()
    result = run_sweep(base, load_sweep(str(space), base), {"model": {"kind": "tfidf_xgb"}}, out)

    table = storage.read_csv(storage.join(out, "results.csv"))
    (trial,) = table.itertuples()
    assert trial.valid_log_loss < 1.2 and trial.trial_dir.startswith(f"{out}/tune/")
    (run,) = storage.list_dir(storage.join(out, "trials"))  # the trial's Ray Train run
    summary = storage.read_json(storage.join(out, "trials", run, "summary.json"))
    assert summary["best_checkpoint"].startswith(out)
    # the trial's boosting rounds reached the sweep's storage, and its tracker runs belong to the sweep's group
    assert storage.list_dir(storage.join(out, "trials", run, "tracking", "tensorboard"))
    trial_config = storage.read_json(storage.join(summary["best_checkpoint"], "arena.json"))["config"]
    assert trial_config["tracking"]["run_group"] == out.rsplit("/", 1)[1]
    assert storage.read_bytes(result.plot).startswith(b"\x89PNG") and result.plot == storage.join(out, "sweep.png")
    best = yaml.safe_load(storage.read_text(result.best_preset))
    assert best == {"model": {"kind": "tfidf_xgb"}, "classical": {"max_depth": table["classical.max_depth"][0]}}


def test_a_temperature_sweep_writes_its_table_to_s3(ray_session, s3):
    import numpy as np

    from app.sweep import run_temperature_sweep

    rng = np.random.default_rng(0)
    out = s3()
    table = run_temperature_sweep(rng.normal(0, 1, (200, 3)), rng.integers(0, 3, 200), out, num_samples=3)
    pd.testing.assert_frame_equal(storage.read_csv(storage.join(out, "temperature.csv")), table)
    assert storage.is_dir(storage.join(out, "temperature"))  # Tune's records
