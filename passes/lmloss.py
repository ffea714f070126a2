"""The next-token loss of a causal language model, for every pass that reads it.

The taylor scorer and allocation 'fisher' back-propagate it, the loss probe measures it; all
of them run the model the same way (no KV cache) and score the same shifted tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from llmrank.ir.errors import ConfigError


def lm_logits(model: nn.Module, ids: torch.Tensor, *, needed_by: str = "the next-token loss") -> torch.Tensor:
    """The logits [B, T, vocab] of token ids [B, T]; a ConfigError naming ``needed_by`` when
    the model is not a causal LM (an HF model gets ``use_cache=False``: no cache is wanted)."""
    kwargs = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    out = model(input_ids=ids, **kwargs) if hasattr(model, "config") else model(ids)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ConfigError(f"{needed_by} needs a causal language model: token ids [B, T] in, logits [B, T, vocab] out")
    return logits


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, *, reduction: str = "mean",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cross-entropy of each next token (the logits at t against the id at t + 1), computed in
    ``dtype``: fp32 for gradients; the probe asks fp64, since it subtracts two such losses."""
    return F.cross_entropy(logits[:, :-1].to(dtype).reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction=reduction)
