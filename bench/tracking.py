"""Peak tensor memory of training steps on any device, counted from the tensors themselves.

`LiveTensorMemory` is a TorchDispatchMode that counts the bytes of live tensor storages: those registered
with `track` / `track_module` before the steps (weights, buffers, inputs), plus every storage an op
creates inside the mode (activations, gradients, optimizer state, temporaries), less those freed. On the
CPU, where there is no `torch.cuda.max_memory_allocated`, this is what the memory planner's estimate is
checked against (tests/test_memory.py, bench/memory.py).

What it does not see: storages created outside the mode and never tracked (e.g. `torch.from_numpy`
inputs), allocator caching and fragmentation, and memory that libraries hold outside torch tensors.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages: the ones registered with `track`, plus every storage an op
    creates inside the mode (forward, backward and optimizer step), minus those freed."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = self.peak = 0

    def track(self, *tensors: object) -> None:
        """Count these tensors' storages (non-tensors, empty storages and ones already counted are skipped)."""
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self._live:
                continue  # empty, or a view of a storage already counted
            self._live[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), storage.nbytes())
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)

    def track_module(self, module: torch.nn.Module) -> None:
        """Count a module's parameters, buffers and bitsandbytes 4-bit quantization constants (absmax and
        code tables: tensors on the weights' `quant_state`, not parameters or buffers)."""
        self.track(*module.parameters(), *module.buffers())
        for parameter in module.parameters():
            state = getattr(parameter, "quant_state", None)
            while state is not None:  # double quantization nests a second state for the absmax constants
                self.track(*(value for value in vars(state).values() if isinstance(value, torch.Tensor)))
                state = getattr(state, "state2", None)

    def _free(self, key: int) -> None:
        _, size = self._live.pop(key, (None, 0))
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(*tree_flatten(out)[0])
        return out


def measure_training_peak(model: torch.nn.Module, train_step: Callable[[], None], steps: int,
                          inputs: Iterable[torch.Tensor] = ()) -> int:
    """Peak live tensor bytes over `steps` calls of `train_step` (one optimizer step each: forward,
    backward, optimizer), counting `model`'s resident tensors and `inputs` from the start.

    Run it from the first step, so that the optimizer's state is created inside the tracker and counted;
    the peak of every later step then repeats the second one's for batches of the same shape.
    """
    tracker = LiveTensorMemory()
    tracker.track_module(model)
    tracker.track(*inputs)
    with tracker:
        for _ in range(steps):
            train_step()
    return tracker.peak
