"""Trace a model into an FX graph with torch.export.

Hugging Face models are wrapped so that they return a single tensor (logits, or the last
hidden state of an encoder) with ``use_cache=False``: torch.export rejects the cache objects
and the ModelOutput containers they otherwise return.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmrank.ir.errors import TraceError

WRAPPER_PREFIX = "model."


class TensorOutput(nn.Module):
    """Calls a Hugging Face model and returns one tensor, so torch.export sees plain data."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=False) if accepts_cache(self.model) else self.model(input_ids=input_ids)
        if isinstance(out, torch.Tensor):
            return out
        for key in ("logits", "last_hidden_state"):
            value = getattr(out, key, None)
            if value is not None:
                return value
        return out[0]


@dataclass
class Traced:
    """An ExportedProgram plus the map from its parameter names to the user's model."""

    program: torch.export.ExportedProgram
    model: nn.Module
    prefix: str

    def param_path(self, placeholder: str) -> str | None:
        """Dotted path in the user's model of the parameter behind a graph placeholder."""
        sig = self.program.graph_signature
        path = sig.inputs_to_parameters.get(placeholder) or sig.inputs_to_buffers.get(placeholder)
        if path is None:
            return None
        return path[len(self.prefix):] if path.startswith(self.prefix) else path


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type")


def accepts_cache(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``use_cache`` (HF decoders do; encoders and plain modules don't)."""
    return "use_cache" in inspect.signature(model.forward).parameters


def example_tokens(model: nn.Module, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    """A deterministic token batch for tracing (batch >= 2 so torch.export keeps it dynamic)."""
    config = model.config
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 256)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(vocab), (batch, seq), generator=gen)


def trace(model: nn.Module, example_inputs: tuple[Any, ...] | None = None, *, dynamic: bool = True) -> Traced:
    """Export ``model`` to an FX graph; HF models need no example inputs.

    Dynamic batch and sequence dims are requested for token inputs so that the graph is the
    one a deployment would run; for other modules dim 0 is made dynamic when possible.
    """
    modes = {module: module.training for module in model.modules()}  # restored one by one: train(True) would
    model.eval()                                                        # switch on dropout a caller had off
    try:
        if is_hf_model(model) and example_inputs is None:
            wrapped, prefix = TensorOutput(model), WRAPPER_PREFIX
            inputs: tuple[Any, ...] = (example_tokens(model),)
            shapes = ({0: torch.export.Dim("batch", max=4096), 1: torch.export.Dim("seq", max=_max_positions(model))},) if dynamic else None
        else:
            if example_inputs is None:
                raise TraceError(
                    f"cannot trace {type(model).__name__}: it is not a Hugging Face model, so llmrank "
                    "cannot invent inputs for it. Pass example_inputs=(tensor, ...) with a batch of at least 2."
                )
            wrapped, prefix, inputs = model, "", tuple(example_inputs)
            shapes = _batch_dynamic_shapes(inputs) if dynamic else None
        return Traced(_export(wrapped, inputs, shapes, model), model, prefix)
    finally:
        for module, training in modes.items():
            module.training = training


def _max_positions(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None) or getattr(getattr(config, "text_config", None), key, None)
        if isinstance(value, int) and value > 16:
            return value
    return 4096


def _batch_dynamic_shapes(inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if not all(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] >= 2 for x in inputs):
        return None
    batch = torch.export.Dim("batch")
    return tuple({0: batch} for _ in inputs)


def _export(module: nn.Module, inputs: tuple[Any, ...], shapes: Any, original: nn.Module) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad():
            return torch.export.export(module, inputs, dynamic_shapes=shapes, strict=False)
    except Exception as first:  # noqa: BLE001 - retried without dynamic shapes, then explained
        if shapes is not None:
            try:
                with torch.no_grad():
                    return torch.export.export(module, inputs, strict=False)
            except Exception:  # noqa: BLE001 - the first error is the informative one
                pass
        raise TraceError(_explain(original, first)) from first


def _explain(model: nn.Module, error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    failing = lines[0][:300] if lines else type(error).__name__
    hints = ["pass example_inputs matching the model's forward (batch >= 2)"]
    if is_hf_model(model):
        hints.insert(0, 'load it with attn_implementation="eager"')
        hints.append("check that the model runs with use_cache=False")
    return f"torch.export failed on {type(model).__name__}: {type(error).__name__}: {failing}. Try: " + "; ".join(hints) + "."
