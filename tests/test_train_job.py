"""jobs/train.py refuses, before starting Ray, a job the memory planner says cannot fit."""

import pytest

from app.memory import MemoryBudgetError
from jobs import train


def test_train_job_refuses_a_job_that_cannot_fit(monkeypatch):
    started = []
    monkeypatch.setattr(train, "connect", lambda address=None: started.append(address))
    with pytest.raises(MemoryBudgetError, match="accelerator_memory_gb"):
        train.main(["scaling.accelerator_memory_gb=0.01", "format.max_length=512"])
    assert not started  # no cluster was touched
