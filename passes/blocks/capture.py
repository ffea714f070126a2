"""Capturing and replaying what a decoder model hands its layers.

The model's own forward runs with stand-ins for its decoder layers: :class:`Recorder` records
each layer's hidden states and arguments (masks, rotary tables) and :class:`Stop` ends the
forward after the last one; :class:`Replay` feeds a given final hidden state to the rest of the
forward (final norm, head). :class:`Holder` then calls one real block with the recorded
arguments, under its path in the model, so traces and scores carry the in-memory names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from llmrank.ir.errors import InputError


class Stop(Exception):
    """Raised by the last recorder: the rest of the forward (final norm, head) is not needed."""


class Recorder(nn.Module):
    """Stands in for decoder layer ``index``: records what the model hands it, passes the input on."""

    def __init__(self, index: int, sink: dict[int, tuple], last: bool):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.sink[self.index] = (hidden_states, args, kwargs)
        if self.last:
            raise Stop
        return hidden_states


class Holder(nn.Module):
    """Holds one block under its path in the model (``model.layers.3``), so the trace, the IR,
    the groups and the scores carry the names the in-memory prune gives them.

    ``forward(hidden, *leaves)`` calls the block with the recorded positional and keyword
    arguments whose tensors are ``leaves``.
    """

    def __init__(self, path: str, index: int, block: nn.Module, spec: pytree.TreeSpec, constants: list[Any]):
        super().__init__()
        parts = path.split(".")
        parent: nn.Module = self
        for part in parts[:-1]:
            child = nn.Module()
            parent.add_module(part, child)
            parent = child
        parent.add_module(parts[-1], nn.ModuleDict({str(index): block}))
        object.__setattr__(self, "block", block)  # a plain reference: the block's parameters are listed once, under its path
        self.spec, self.constants = spec, constants
        self.train(block.training)  # a new Module starts in training mode; the holder takes its block's mode

    def forward(self, hidden_states: torch.Tensor, *leaves: torch.Tensor) -> torch.Tensor:
        it = iter(leaves)
        values = [next(it) if c is TENSOR else c for c in self.constants]
        args, kwargs = pytree.tree_unflatten(values, self.spec)
        out = self.block(hidden_states, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class TENSOR:
    """Marks where a tensor argument goes among the recorded constants (a class survives deepcopy)."""


def split_call(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], pytree.TreeSpec, list[Any]]:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    constants = [TENSOR if isinstance(x, torch.Tensor) else x for x in leaves]
    return tensors, spec, constants


def layers_path(model: nn.Module, n_layers: int) -> str:
    """Dotted path of the decoder layers' ModuleList (``model.layers``)."""
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers and name]
    if not found:
        raise InputError(f"{type(model).__name__} has no list of {n_layers} decoder layers: block-by-block pruning needs "
                         "a decoder with model.layers (Llama, Qwen2, Mistral, Gemma-3 style)")
    return min(found, key=len)


class Replay(nn.Module):
    """A stand-in layer for the final check: passes its input on, or returns ``final``."""

    def __init__(self, final: torch.Tensor | None):
        super().__init__()
        self.final = final

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.final is None else self.final
