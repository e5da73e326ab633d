"""A real Ray Tune sweep: 4 trials of the tiny MiniLM preset, each a Ray Train run, ASHA on valid_log_loss."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from app.config import ConfigError, load_config
from app.sweep import load_sweep, run_sweep

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
