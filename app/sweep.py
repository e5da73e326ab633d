"""Ray Tune sweeps over dotted config keys: every trial is a full Ray Train run (app/training.fit).

A sweep file (YAML) names the search space by the same dotted keys as the command line:

    num_samples: 8                 # trials drawn from the space (grid values multiply it)
    max_concurrent_trials: 2       # trials at once; each holds scaling.num_workers workers
    asha: {grace_period: 1, reduction_factor: 2}   # early stopping on valid_log_loss, per epoch
    space:
      train.lr: {loguniform: [1.0e-5, 1.0e-3]}
      adapter.r: {choice: [8, 16, 32]}
      format.max_length: {choice: [128, 256]}
      train.warmup_ratio: {uniform: [0.0, 0.2]}
      train.batch_size: {randint: [8, 33]}
      seed: {grid: [1, 2]}

Each trial's overrides go through `app.config.apply_overrides`, the function the command line uses, and
its metrics reach Tune through Ray Train's TuneReportCallback (Train V2). Outputs in the sweep folder:
results.csv (one row per trial: swept values, best valid_log_loss, epochs run, status), sweep.png (the
metric against each swept key) and best.yaml (a preset: the base preset with the best trial's values).
Trials show in the Ray dashboard; Tune writes TensorBoard event files under the sweep folder. The sweep folder is
a local path or a URI (s3://...) that every node reaches: Tune's records, the trials' runs (under trials/) and
the outputs all go there.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app import storage
from app.config import Config, ConfigError, apply_overrides, config_to_dict, validate_config

METRIC = "valid_log_loss"
DOMAINS = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None, "grid": None}


class AshaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SweepSpec(BaseModel):
    """A sweep file, validated: unknown keys and malformed domains are errors naming the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_samples: int = Field(4, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    asha: AshaSettings | None = AshaSettings()
    space: dict[str, dict[str, list[Any]]] = Field(min_length=1)

    @field_validator("space")
    @classmethod
    def _domains(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for key, domain in space.items():
            if len(domain) != 1 or next(iter(domain)) not in DOMAINS:
                raise ValueError(f"space.{key}: give exactly one of {sorted(DOMAINS)}, got {sorted(domain)}")
            kind, values = next(iter(domain.items()))
            if not isinstance(values, list) or not values or (DOMAINS[kind] and len(values) != DOMAINS[kind]):
                raise ValueError(f"space.{key}.{kind}: expected a list of {DOMAINS[kind] or 'one or more'} values")
        return space


# What a trial's own actor holds: it only drives a Ray Train run, whose workers hold the CPUs and GPUs. Not a
# fraction of a CPU: on a cluster whose head has no CPUs (cluster.yaml), 0.01 CPU puts the trial on a worker node
# and leaves that node 0.01 CPU short of a worker that asks for all of them, so the run never starts. A bundle
# cannot be empty: a MiB of the memory resource, which every node has, the head too.
TRIAL_DRIVER_RESOURCES = {"memory": 1 << 20}


def load_sweep(path: str, base: Config) -> SweepSpec:
    """Read and validate a sweep file (a local path or a URI); every swept key must be a config key and every
    value valid there."""
    raw = yaml.safe_load(storage.read_text(path)) or {}
    try:
        spec = SweepSpec.model_validate(raw)
    except ValueError as exc:
        raise ConfigError(f"invalid sweep file {path}: {exc}") from None
    for key, domain in spec.space.items():
        for value in next(iter(domain.values())):  # the bounds or every choice must make a valid config
            validate_config(apply_overrides(config_to_dict(base), {key: value}), f"{path}: space.{key}={value!r}")
    return spec


def search_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space, keyed by the dotted config keys."""
    from ray import tune

    builders = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
                "randint": lambda v: tune.randint(*v), "choice": tune.choice, "grid": tune.grid_search}
    return {key: builders[kind](values) for key, domain in spec.space.items() for kind, values in domain.items()}


def run_trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    """One Tune trial: the base config with this trial's overrides, trained by Ray Train, metrics to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from app.training import fit

    context = ray.tune.get_context()
    overrides = {**params, "run.name": f"{base['run']['name']}-{context.get_trial_id()}"}
    fit(validate_config(apply_overrides(base, overrides), "trial config"), callbacks=[TuneReportCallback()])


@dataclass
class SweepResult:
    directory: str
    table: pd.DataFrame
    best_params: dict[str, Any]
    best_preset: str
    plot: str


def run_sweep(base: Config, spec: SweepSpec, base_raw: dict[str, Any], directory: str) -> SweepResult:
    """Run the sweep (ASHA on valid_log_loss when configured) and write results.csv, sweep.png, best.yaml.

    `base_raw` is the base preset as written (only its differences from the defaults), so best.yaml stays a
    preset of differences too.
    """
    from functools import partial

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    directory = storage.absolute(directory)
    trials_storage = storage.join(directory, "trials")
    if base.train.checkpoint_every_steps is not None:
        raise ConfigError("a sweep reports once per epoch to ASHA: unset train.checkpoint_every_steps")
    # every trial's tracker run joins the sweep's group (MLflow nests them under one parent run, W&B groups them)
    group = base.tracking.run_group or directory.rstrip("/").rsplit("/", 1)[-1]
    base_dict = apply_overrides(config_to_dict(base), {"run.storage_path": trials_storage, "tracking.run_group": group})
    scheduler = None
    if spec.asha is not None:
        # training_iteration counts a trial's reports: one per epoch (sweeps take no mid-epoch checkpoints).
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=base.train.epochs,
                                  grace_period=spec.asha.grace_period,
                                  reduction_factor=spec.asha.reduction_factor)
    trainable = tune.with_resources(partial(run_trial, base=base_dict), TRIAL_DRIVER_RESOURCES)
    # The same trials for the same seed; the generator itself bounds how many run at once.
    searcher = tune.search.BasicVariantGenerator(random_state=base.seed, max_concurrent=spec.max_concurrent_trials)
    tuner = tune.Tuner(
        trainable, param_space=search_space(spec),
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", num_samples=spec.num_samples, search_alg=searcher,
                                    scheduler=scheduler),
        run_config=tune.RunConfig(name="tune", storage_path=directory),
    )
    grid = tuner.fit()
    table = results_table(grid, list(spec.space), base.train.epochs)
    storage.write_csv(storage.join(directory, "results.csv"), table)
    plot = plot_sweep(table, list(spec.space), storage.join(directory, "sweep.png"))
    completed = table.dropna(subset=[METRIC])
    if completed.empty:
        raise RuntimeError(f"no trial of the sweep in {directory} reported {METRIC}; see results.csv and the logs")
    best = completed.sort_values(METRIC).iloc[0]
    best_params = {key: _plain(best[key]) for key in spec.space}
    best_preset = storage.join(directory, "best.yaml")
    header = f"# Best of {len(table)} trials ({METRIC} {best[METRIC]:.4f}), written by the sweep in {directory}\n"
    storage.write_text(best_preset, header + yaml.safe_dump(apply_overrides(base_raw, best_params), sort_keys=False))
    return SweepResult(directory, table, best_params, best_preset, plot)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def results_table(grid, keys: list[str], max_epochs: int) -> pd.DataFrame:
    """One row per trial: swept values, the best valid_log_loss it reported, epochs run, and its status."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        losses = history[METRIC] if history is not None and METRIC in history else pd.Series(dtype=float)
        losses = losses[losses < 1e8]  # mid-epoch checkpoints report a placeholder, not a measurement
        rows.append({**{key: result.config.get(key) for key in keys},
                     METRIC: float(losses.min()) if len(losses) else np.nan,
                     "epochs": int(len(losses)),
                     "status": "error" if result.error else ("stopped early" if len(losses) < max_epochs else "done"),
                     "trial_dir": storage.uri_of(result.filesystem, result.path)})
    return pd.DataFrame(rows)


def plot_sweep(table: pd.DataFrame, keys: list[str], path: str) -> str:
    """A PNG with the metric against each swept key (one panel per key), written to `path` (a local file or a
    URI); returns `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4 * len(keys), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    for index, key in enumerate(keys):
        axis = figure.add_subplot(1, len(keys), index + 1)
        values = table[key]
        numeric = pd.api.types.is_numeric_dtype(values)
        x = values if numeric else values.astype(str)
        axis.scatter(x, table[METRIC], c=["tab:blue" if s == "done" else "tab:orange" for s in table["status"]])
        if numeric and (values > 0).all() and values.max() / max(values.min(), 1e-300) > 50:
            axis.set_xscale("log")
        axis.set_xlabel(key)
        axis.set_ylabel(METRIC)
    figure.suptitle("sweep (orange: stopped early or failed)")
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    storage.write_bytes(path, image.getvalue())
    return path


def run_temperature_sweep(logits: np.ndarray, labels: np.ndarray, directory: str, num_samples: int = 48,
                          temperature_range: tuple[float, float] = (0.2, 10.0),
                          smoothing: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1), seed: int = 0) -> pd.DataFrame:
    """Tune over temperature (log-uniform) and probability smoothing toward the label prior on saved logits.

    Each trial scores log loss of smooth(softmax(logits / T), alpha, prior) on the rows; the table (written
    to <directory>/temperature.csv, best first; `directory` a local path or a URI) is the check on
    `app.calibration.fit_temperature`: the best trial's temperature should agree with the fitted one.
    """
    from ray import tune

    from app.calibration import smooth_probabilities
    from app.metrics import log_loss, softmax

    prior = np.bincount(labels, minlength=3) / len(labels)
    logits_ref, labels_ref = _put(logits), _put(labels)

    def trial(params: dict[str, Any]) -> dict[str, float]:
        import ray

        z, y = ray.get(logits_ref), ray.get(labels_ref)
        probs = smooth_probabilities(softmax(z / params["temperature"]), params["smoothing"], prior)
        return {"log_loss": log_loss(probs, y)}

    tuner = tune.Tuner(
        tune.with_resources(trial, {"CPU": 0.5}),
        param_space={"temperature": tune.loguniform(*temperature_range), "smoothing": tune.choice(list(smoothing))},
        tune_config=tune.TuneConfig(metric="log_loss", mode="min", num_samples=num_samples,
                                    search_alg=tune.search.BasicVariantGenerator(random_state=seed)),
        run_config=tune.RunConfig(name="temperature", storage_path=storage.absolute(directory)),
    )
    grid = tuner.fit()
    table = pd.DataFrame([{**result.config, "log_loss": result.metrics.get("log_loss")} for result in grid])
    table = table.sort_values("log_loss").reset_index(drop=True)
    storage.write_csv(storage.join(directory, "temperature.csv"), table)
    return table


def _put(array: np.ndarray):
    import ray

    return ray.put(array)
