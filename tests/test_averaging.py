"""Fold-adapter averaging: the mean of K adapters is one loadable adapter checkpoint."""

import json

import pytest
import torch
from modeling_helpers import build, logits_of, tiny_config, train_steps
from safetensors.torch import load_file

from app.averaging import ADAPTER_WEIGHTS, average_adapters
from app.modeling import load_checkpoint, save_checkpoint

LORA = tiny_config("decoder", "random:llama-tiny", "lora")


def trained_checkpoint(directory, config=LORA, lr: float = 2e-3) -> str:
    """A LoRA checkpoint trained a few steps from the shared seeded initialisation (as every fold starts)."""
    model, tokenizer, rows = build(config, seed=0)
    train_steps(model, tokenizer, rows, steps=4, lr=lr)
    save_checkpoint(str(directory), model, tokenizer, config, {}, epoch=0)
    return str(directory)


@pytest.fixture(scope="module")
def folds(tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    return [trained_checkpoint(root / f"fold{k}", lr=lr) for k, lr in enumerate((2e-3, 5e-3))]


def rows_logits(checkpoint: str) -> torch.Tensor:
    loaded = load_checkpoint(checkpoint)
    _, _, rows = build(loaded.config)
    return logits_of(loaded.model, loaded.tokenizer, rows)


def test_the_average_holds_the_mean_of_every_adapter_and_head_tensor(folds, tmp_path):
    out = average_adapters(folds, str(tmp_path / "avg"))
    first, second, mean = (load_file(f"{d}/{ADAPTER_WEIGHTS}") for d in (*folds, out))
    assert set(mean) == set(first) and any("lora_B" in name for name in mean) and any("score" in name for name in mean)
    for name, tensor in mean.items():
        torch.testing.assert_close(tensor, (first[name] + second[name]) / 2, atol=1e-7, rtol=0)
    assert not torch.equal(first[next(n for n in first if "lora_B" in n)], second[next(n for n in first if "lora_B" in n)])
    meta = json.loads((tmp_path / "avg" / "arena.json").read_text())
    assert len(meta["averaged_from"]) == 2 and meta["averaging_weights"] == [0.5, 0.5]


def test_averaging_copies_of_one_adapter_predicts_what_it_does(folds, tmp_path):
    out = average_adapters([folds[0], folds[0], folds[0]], str(tmp_path / "same"))
    torch.testing.assert_close(rows_logits(out), rows_logits(folds[0]), atol=1e-5, rtol=0)


def test_weights_select_the_checkpoint(folds, tmp_path):
    out = average_adapters(folds, str(tmp_path / "second"), weights=[0, 3])
    torch.testing.assert_close(rows_logits(out), rows_logits(folds[1]), atol=1e-5, rtol=0)


def test_different_recipes_and_full_weights_are_refused_by_name(folds, tmp_path):
    other = trained_checkpoint(tmp_path / "r8", tiny_config("decoder", "random:llama-tiny", "lora", **{"adapter.r": 8}))
    with pytest.raises(ValueError, match=r"r is 8, but .* has 4"):
        average_adapters([folds[0], other], str(tmp_path / "bad"))
    full = trained_checkpoint(tmp_path / "full", tiny_config("decoder", "random:llama-tiny", "full"))
    with pytest.raises(ValueError, match="full weights"):
        average_adapters([full, folds[0]], str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="at least two"):
        average_adapters(folds[:1], str(tmp_path / "bad"))
