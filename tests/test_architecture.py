"""The dependency rule: app imports none of jobs/tuning/serve; those three never import each other.

Checked on the source with ast, so it holds for every module whether or not a test imports it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ("jobs", "tuning", "serve")
ALLOWED = {"app": set(), "jobs": {"app"}, "tuning": {"app"}, "serve": {"app"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_the_rule_allows(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        forbidden = imported_packages(path) - ALLOWED[package] - {package}
        assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}"


def test_adapters_do_not_import_each_other_even_relatively():
    for package in ADAPTERS:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 1]
            assert not relative, f"{path.relative_to(ROOT)} climbs out of its package with a relative import"


def test_the_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from jobs.train import main\nimport serve.app\n")
    assert imported_packages(bad) == {"jobs", "serve"}


def test_importing_app_does_no_work(tmp_path):
    """No directories, clusters or models at import time."""
    import subprocess
    import sys

    code = ("import app.config, app.data, app.formatting, app.metrics, app.batching, app.synthetic, "
            "app.calibration, app.priors, app.ensemble; "
            "import sys; assert 'ray' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_full_finetuning_worker_imports_neither_peft_nor_bitsandbytes():
    """What a Ray Train worker of a full finetune imports and builds stays off peft and bitsandbytes (about a
    second of start-up on an idle core, three under load); adapters and 4-bit loading import them when a run
    uses them."""
    import subprocess
    import sys

    code = ("import app.loop, app.training, app.inference, sys; from app.config import load_config; "
            "from app.modeling import build_model; build_model(load_config('configs/tiny.yaml')); "
            "loaded = sorted(m for m in ('peft', 'bitsandbytes', 'deepspeed') if m in sys.modules); "
            "assert not loaded, loaded")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1, 0.5])
def test_the_learning_rate_schedule_is_transformers_cosine_with_warmup(warmup_ratio):
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from app.config import load_config
    from app.engine import build_scheduler

    def learning_rates(make_scheduler) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler, rates = make_scheduler(optimizer), []
        for _ in range(40):
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return rates

    config = load_config(None, [f"train.warmup_ratio={warmup_ratio}"])
    ours = learning_rates(lambda optimizer: build_scheduler(optimizer, config, 37))
    reference = learning_rates(lambda optimizer: get_cosine_schedule_with_warmup(optimizer, round(warmup_ratio * 37), 37))
    assert ours == pytest.approx(reference, abs=1e-12)
