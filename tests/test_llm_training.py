"""Integration: every model family and adapter path trains on 2 real Ray Train workers (tiny random-weight
models on the CPU), DeepSpeed off, ZeRO-2 and ZeRO-3; the loss goes down and the exported checkpoint
reloads, without DeepSpeed, to the predictions the workers scored."""

from pathlib import Path

import numpy as np
import pytest

from app.config import load_config
from app.inference import Predictor
from app.metrics import log_loss
from app.training import fit, load_training_rows, split_train_valid

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# (preset, extra overrides): each combination covers a path the others do not.
CASES = {
    "decoder-lora-zero2": ("tiny-llama-lora.yaml", {"deepspeed.enabled": True, "deepspeed.stage": 2}),
    # lr 2e-3: at the preset's 1e-3 this 4-bit random Gemma-2's epoch-mean training loss rose in epoch 2
    "decoder-qlora-ddp": ("tiny-gemma2-qlora.yaml", {"train.lr": 2e-3}),
    "decoder_lm-ddp": ("tiny-qwen2-decoder-lm.yaml", {}),
    "t5-ddp": ("tiny-t5.yaml", {}),
}


def train_two_epochs(preset: str, storage: Path, **extra):
    # Two full epochs (not the preset's max_steps) so that the epoch losses can be compared.
    config = load_config(CONFIGS / preset, {"run.storage_path": str(storage), "train.max_steps": None,
                                            "train.epochs": 2, **extra})
    return config, fit(config)


@pytest.mark.parametrize("case", list(CASES))
def test_family_trains_on_two_workers_and_reloads(ray_session, tmp_path, case):
    preset, extra = CASES[case]
    config, result = train_two_epochs(preset, tmp_path, **extra)
    check_learns_and_reloads(config, result)


def test_zero3_trains_what_ddp_trains(ray_session, tmp_path):
    """Full finetuning under ZeRO-3 (partitioned loading, sharded weights, gathered export) follows the
    same trajectory as plain DDP on the same rows."""
    config, zero3 = train_two_epochs("tiny-llama-zero3.yaml", tmp_path)
    check_reloads(config, zero3)  # what is claimed is DDP's trajectory: this tiny random Llama barely learns in 2 epochs
    _, ddp = train_two_epochs("tiny-llama-zero3.yaml", tmp_path, **{"deepspeed.enabled": False, "run.name": "ddp"})
    for sharded, plain in zip(zero3.history, ddp.history, strict=True):
        assert sharded["train_loss"] == pytest.approx(plain["train_loss"], abs=1e-3)
        assert sharded["valid_log_loss"] == pytest.approx(plain["valid_log_loss"], abs=1e-3)


def check_learns_and_reloads(config, result) -> None:
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 2 and losses[-1] < losses[0], losses
    check_reloads(config, result)


def check_reloads(config, result) -> None:
    """The best checkpoint, loaded without DeepSpeed, predicts what the workers scored on the validation rows."""
    frame, _ = load_training_rows(config, result.run_dir)
    _, valid = split_train_valid(frame, config)
    texts = (list(valid["prompt"]), list(valid["response_a"]), list(valid["response_b"]))
    probs = Predictor(result.best_checkpoint, precision="fp32").predict(*texts)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert log_loss(probs, valid["label"].to_numpy()) == pytest.approx(result.best_metrics["valid_log_loss"], abs=1e-4)
