"""Resume at another world size, on a real local Ray: a run of 2 workers fails after a mid-epoch checkpoint and is
resubmitted at 1 worker (the global batch kept: 1 worker accumulating twice the micro-batches), under DDP and under
every DeepSpeed ZeRO stage (stages 1-3 through DeepSpeed's universal checkpoint). It ends where the uninterrupted
2-worker run ends, and every training row is trained once per epoch across the change of world size."""

from pathlib import Path

import pytest
from test_resume import assert_each_row_once_per_epoch, fit_while_killing

from app.config import load_config
from app.training import fit

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The random-weight Llama has no dropout, so a resumed run can follow the uninterrupted one to float rounding.
SETTINGS = {"train.max_steps": None, "train.epochs": 1, "data.builtin_rows": 150, "format.max_length": 64,
            "train.checkpoint_every_steps": 2, "run.keep_checkpoints": 1, "train.precision": "fp32"}
TOLERANCE = 1e-3  # valid log loss: a resize may change the order of float sums, nothing else


def llama(storage: Path, name: str, **overrides):
    return load_config(CONFIGS / "tiny-llama-zero3.yaml",
                       {"run.storage_path": str(storage), "run.name": name, **SETTINGS, **overrides})


@pytest.fixture(scope="module")
def straight(ray_session, tmp_path_factory):
    """The uninterrupted run at 2 workers, plain DDP: ZeRO follows DDP's trajectory (test_llm_training.py)."""
    return fit(llama(tmp_path_factory.mktemp("runs"), "straight", **{"deepspeed.enabled": False}))


# make test runs DDP and ZeRO-3 (the one with a loader of its own, and a fix of ours); stage 0 (whose fp32 optimizer
# loads as it is) and stages 1 and 2 (the converter's shared path) run in `make rehearsal`, which keeps make test
# within its time.
LATER = pytest.mark.rehearsal


@pytest.mark.parametrize("stage", [None, pytest.param(0, marks=LATER), pytest.param(1, marks=LATER),
                                   pytest.param(2, marks=LATER), 3], ids=["ddp", "zero0", "zero1", "zero2", "zero3"])
def test_a_run_resumes_at_another_world_size(straight, tmp_path, stage):
    engine = {"deepspeed.enabled": False} if stage is None else {"deepspeed.stage": stage}
    config = llama(tmp_path, "resized", **engine)
    outcome = fit_while_killing(config, tmp_path / "resized")
    assert "error" in outcome  # max_failures=0: the 2-worker run fails after its checkpoint
    smaller = llama(tmp_path, "resized", **engine, **{"scaling.num_workers": 1, "train.grad_accum_steps": 2})
    result = fit(smaller)
    assert 0 < result.history[-1]["resumed_from_step"] < result.history[-1]["step"]
    assert result.history[-1]["step"] == straight.history[-1]["step"]
    assert result.best_metrics["valid_log_loss"] == pytest.approx(straight.best_metrics["valid_log_loss"],
                                                                  abs=TOLERANCE)
    assert_each_row_once_per_epoch(result, smaller)
