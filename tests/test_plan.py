"""`python -m jobs.plan` answers offline for every preset; every GPU preset fits its node's GPU memory and
keeps checkpoints under 5% of its training time, by the planner's estimates."""

from functools import cache
from pathlib import Path

import pytest

from app.architecture import read_architecture
from app.config import ModelConfig, load_config
from app.hardware import instance_for
from app.memory import GIB, HEADROOM, plan_memory
from jobs.plan import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
GPU_CONFIGS = [path for path in CONFIGS if load_config(path).scaling.use_gpu]
ON_CLUSTER = ["run.storage_path=s3://bucket/runs"]  # README's submit command: checkpoints go to S3


@cache
def architecture(model: ModelConfig):
    return read_architecture(model)


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_plan_answers_offline_for_every_preset(path, capsys):
    """conftest.py sets HF_HUB_OFFLINE=1, and this machine has no hub cache of the presets' models."""
    config = load_config(path)
    assert main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fits: " in out
    if config.model.kind == "tfidf_xgb":
        assert "no accelerator memory needed" in out and "checkpoints" not in out
    else:
        assert "peak" in out and "resume state" in out
    if config.scaling.use_gpu:
        assert "fits: yes" in out and "step time" in out and "of training time" in out


def test_there_are_gpu_presets():
    assert len(GPU_CONFIGS) >= 6


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[path.name for path in GPU_CONFIGS])
def test_every_gpu_preset_fits_its_nodes_gpu_memory(path):
    config = load_config(path)
    gpu = instance_for(config.scaling.accelerator_type, config.scaling.num_workers).gpu
    plan = plan_memory(config, architecture=architecture(config.model))
    assert plan.fits(gpu.memory_gib * GIB), (
        f"{path.name}: {plan.peak_bytes / GIB:.2f} GiB > {1 - HEADROOM:.0%} of {gpu.memory_gib:.2f} GiB\n"
        + plan.render())


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[path.name for path in GPU_CONFIGS])
def test_every_gpu_preset_checkpoints_in_under_five_percent_of_training_time(path):
    from app.checkpoint_plan import OVERHEAD_TARGET, plan_checkpoints

    config = load_config(path, ON_CLUSTER)
    plan = plan_checkpoints(config, architecture(config.model))
    assert plan.mode == "async" and plan.step is not None
    assert plan.overhead < OVERHEAD_TARGET, plan.render()
    assert plan.uploads_keep_up, plan.render()
    assert config.train.checkpoint_every_steps, f"{path.name}: bound the work a preemption loses"
    assert plan.interval_s <= 20 * 60, f"{path.name}: a checkpoint interval of {plan.interval_s / 60:.0f} min"
