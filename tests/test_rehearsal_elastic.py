"""Elastic training on the rehearsal cluster (`make rehearsal`; tests/rehearsal.py): a run of `scaling.num_workers:
[1, 2]` starts on both worker nodes, loses one (SIGKILL of the node's every process), goes on with one worker, gets
a new node, grows back to two and ends there.

What it must show: each resize resumes from the latest checkpoint on the same data plan (the logs say at which step
and world size), every training row is trained once per epoch across both resizes, and the final validation log loss
lies within the spread of three uninterrupted 2-worker runs of different seeds (the same validation rows:
`data.split_seed` fixed). It reports the four losses, and the seconds without progress at each resize: from the
last step line before the resize to the first one after it, as the job log delivered them.
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
from rehearsal import BUCKET
from test_rehearsal import TRAIN, cluster, data, wait_for_checkpoint  # noqa: F401 - fixtures
from test_rehearsal_full import record

from app import rowlog

pytestmark = [pytest.mark.integration, pytest.mark.rehearsal]
STORAGE = f"s3://{BUCKET}/elastic"
# Two epochs (20 steps at 2 workers) so that the run is still going when the new node is up; the fold assignment is
# the tiny preset's (seed 42), whatever the run's seed, so all four runs are scored on the same validation rows.
RUN = "train.epochs=2 train.log_every_steps=1 data.split_seed=42 run.max_failures=4"
SEEDS = (1, 2, 3)
STEP_LINE = re.compile(r"epoch (\d+) step (\d+)/(\d+)")
RESUMED = re.compile(r"resumed at epoch (\d+) step (\d+): (\d+) workers wrote the checkpoint, (\d+) go on")


class TimedLog:
    """The job's output as it arrives, each line with the time it was read (polled every 0.1 s)."""

    def __init__(self, path) -> None:
        self.path, self.lines, self.done = path, [], False
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        offset = 0
        while not self.done:
            text = self.path.read_text(errors="replace") if self.path.exists() else ""
            now = time.monotonic()
            fresh, offset = text[offset:], len(text)
            self.lines += [(now, line) for line in fresh.splitlines()]
            time.sleep(0.1)

    def wait_for(self, pattern: re.Pattern, job, after: re.Match | None = None, timeout: float = 600) -> re.Match:
        """The first line matching `pattern`, after the line of `after` when given."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [line for _, line in list(self.lines)]
            start = next((index for index, line in enumerate(lines) if after.group(0) in line), len(lines)) \
                if after is not None else 0
            for line in lines[start:]:
                if found := pattern.search(line):
                    return found
            assert job.poll() is None, f"the job ended first:\n{self.path.read_text()[-4000:]}"
            time.sleep(0.2)
        raise AssertionError(f"no line like {pattern.pattern!r} in {timeout} s")

    def stall(self, resumed: re.Match) -> dict:
        """Seconds between the last step line before the resize announced by `resumed` and the first step line
        after it, and the steps done again (those past the checkpoint it resumed from)."""
        at = next(index for index, (_, line) in enumerate(self.lines) if resumed.group(0) in line)
        before = [(t, int(m.group(2))) for t, line in self.lines[:at] if (m := STEP_LINE.search(line))]
        after = [(t, int(m.group(2))) for t, line in self.lines[at:] if (m := STEP_LINE.search(line))]
        return {"from_workers": int(resumed.group(3)), "to_workers": int(resumed.group(4)),
                "resumed_at_step": int(resumed.group(2)), "last_step_before": before[-1][1],
                "steps_redone": before[-1][1] - int(resumed.group(2)),
                "seconds_without_progress": round(after[0][0] - before[-1][0], 1)}


def final_loss(cluster, name: str) -> float:
    return json.loads(cluster.read(f"{STORAGE}/{name}/summary.json"))["best_metrics"]["valid_log_loss"]


def test_an_elastic_run_shrinks_grows_and_ends_within_the_seed_spread(cluster, data, tmp_path):  # noqa: F811
    train, _, train_ids = data
    baselines = {}
    for seed in SEEDS:
        cluster.submit(TRAIN.format(train=train, storage=STORAGE, name=f"seed{seed}", extra=f"{RUN} seed={seed}"),
                       timeout=1200)
        baselines[seed] = final_loss(cluster, f"seed{seed}")

    log = tmp_path / "elastic.log"
    started = time.monotonic()
    job = cluster.submit_async(TRAIN.format(train=train, storage=STORAGE, name="elastic",
                                            extra=f"{RUN} seed={SEEDS[0]} scaling.num_workers=[1,2] "
                                                  "scaling.elastic_resize_interval_s=5"), log)
    lines = TimedLog(log)
    try:
        wait_for_checkpoint(cluster, "elastic/elastic/", job, log)
        killed = cluster.kill_node("worker-2")
        shrunk = lines.wait_for(re.compile(RESUMED.pattern.replace(r"(\d+) go on", "1 go on")), job)
        lines.wait_for(STEP_LINE, job, after=shrunk)  # training at one worker
        cluster.add_node("worker-3", wait=False)  # capacity comes back: the run grows at its next resize check
        grown = lines.wait_for(re.compile(RESUMED.pattern.replace(r"(\d+) go on", "2 go on")), job, after=shrunk)
        assert job.wait(timeout=1200) == 0, log.read_text()[-6000:]
    finally:
        lines.done = True
    seconds = time.monotonic() - started
    output = log.read_text()
    assert "BEST_CHECKPOINT=" in output

    elastic = final_loss(cluster, "elastic")
    spread = (min(baselines.values()), max(baselines.values()))
    accounted = []
    for epoch in range(2):
        logs = [json.loads(cluster.read(f"s3://{BUCKET}/{key}")) for key in cluster.keys("elastic/elastic/rows/")
                if key.endswith(".json") and f"epoch_{epoch:03d}_" in key]
        counts = rowlog.account(logs, train_ids, sits_out=len(train_ids) % 16)  # 16 rows a step: 8 x 1 x 2 workers
        assert counts | {"lost": 0, "repeated": 0, "unknown": 0} == counts, (epoch, counts)
        accounted.append(counts)
    resizes = [lines.stall(RESUMED.search(shrunk.group(0))), lines.stall(RESUMED.search(grown.group(0)))]
    measured = {"baselines_valid_log_loss": {f"seed {seed}": loss for seed, loss in baselines.items()},
                "elastic_valid_log_loss": elastic, "spread": list(spread), "resizes": resizes,
                "elastic_seconds": round(seconds, 1), "killed": killed, "rows": accounted}
    record("elastic", measured)
    print(json.dumps(measured, indent=2))
    assert spread[0] <= elastic <= spread[1], measured
