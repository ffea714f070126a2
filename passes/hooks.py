"""Forward hooks on a model's modules for the length of a ``with`` block, always removed after.

Calibration, the loss gradients, the loss probe and the sequential refit all watch (or swap)
what some Linears compute during a forward pass; a hook left behind by an exception would
keep changing the caller's model, so every one of them goes through this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import nn

#: ``hook(module, args, output)``; a non-None return replaces the module's output
ForwardHook = Callable[[nn.Module, tuple, Any], Any]


@contextmanager
def forward_hooks(model: nn.Module, hooks: Mapping[str | nn.Module, ForwardHook]) -> Iterator[None]:
    """Register ``hooks`` (module path in ``model``, or the module itself -> forward hook) and
    remove every one of them when the block ends, however it ends."""
    handles = []
    try:
        for target, hook in hooks.items():
            module = model.get_submodule(target) if isinstance(target, str) else target
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
