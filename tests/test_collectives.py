"""Collectives go through app/collectives.py, which puts their tensors on the worker's device (NCCL refuses
CPU tensors: a CPU tensor in `dist.all_reduce` raised at the first evaluation of a multi-GPU ZeRO-3 run)."""

import ast
from pathlib import Path

import pytest
import torch

from app import collectives

ROOT = Path(__file__).resolve().parents[1]
OWNER = ROOT / "app" / "collectives.py"


def distributed_uses(path: Path) -> list[str]:
    """Lines of `path` that import torch.distributed or reach it as `torch.distributed.<name>`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno} import {alias.name}" for alias in node.names
                      if alias.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("torch.distributed") or (
                    node.module == "torch" and any(alias.name == "distributed" for alias in node.names)):
                found.append(f"{path.name}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name) \
                and node.value.id == "torch":
            found.append(f"{path.name}:{node.lineno} torch.distributed")
    return found


def test_no_module_of_app_but_the_helper_calls_torch_distributed():
    uses = [use for path in sorted((ROOT / "app").rglob("*.py")) if path != OWNER for use in distributed_uses(path)]
    assert not uses, f"call these through app.collectives: {uses}"


def test_the_checker_sees_every_spelling(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nimport torch.distributed as dist\nfrom torch import distributed\n"
                   "from torch.distributed import all_reduce\ntorch.distributed.barrier()\n")
    assert len(distributed_uses(bad)) == 4


class RecordingGroup:
    """The narrowest piece of a process group: all_reduce records where its tensor lives, and refuses a
    tensor that is not on the group's device, as NCCL refuses CPU tensors."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seen = device, []

    def all_reduce(self, tensor, op=None):
        self.seen.append((tensor.device, op))
        if tensor.device != self.device:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")


def test_all_reduce_moves_the_tensor_to_the_given_device(monkeypatch):
    meta = torch.device("meta")
    group = RecordingGroup(meta)
    monkeypatch.setattr(torch.distributed, "all_reduce", group.all_reduce)
    result = collectives.all_reduce(torch.tensor([3]), meta, op="max")
    assert result.device == meta
    assert group.seen == [(meta, torch.distributed.ReduceOp.MAX)]


def test_a_cpu_tensor_in_the_group_of_another_device_is_what_fails(monkeypatch):
    group = RecordingGroup(torch.device("meta"))
    monkeypatch.setattr(torch.distributed, "all_reduce", group.all_reduce)
    with pytest.raises(RuntimeError, match="device type cpu"):
        torch.distributed.all_reduce(torch.tensor([3]))  # what app/loop.py did before the helper
