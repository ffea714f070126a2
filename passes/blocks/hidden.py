"""The calibration hidden states between two decoder blocks, held once, spilled to disk past a budget."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class SpillBudget:
    """Bytes of hidden states allowed in memory, shared by every store that draws on it (the dense
    stream and the sequential refit's pruned stream count against one budget)."""

    def __init__(self, budget_bytes: float = math.inf):
        self.limit = budget_bytes
        self.used = 0
        self.peak = 0


class HiddenStates:
    """The calibration hidden states between two blocks, one tensor per batch; kept in memory,
    or spilled to a temporary folder once the budget (``budget_bytes``, or a ``SpillBudget``
    shared with another store) is spent."""

    def __init__(self, budget_bytes: float = math.inf, *, shared: SpillBudget | None = None):
        self.pool = shared if shared is not None else SpillBudget(budget_bytes)
        self.memory: dict[int, torch.Tensor] = {}
        self.spill: Path | None = None
        self.devices: dict[int, torch.device] = {}

    @property
    def bytes(self) -> int:
        """Bytes this store holds in memory."""
        return sum(x.numel() * x.element_size() for x in self.memory.values())

    def put(self, k: int, x: torch.Tensor) -> None:
        size = x.numel() * x.element_size()
        old = self.memory.pop(k, None)
        if old is not None:
            self.pool.used -= old.numel() * old.element_size()
        if self.spill is None and self.pool.used + size > self.pool.limit:
            self.spill = Path(tempfile.mkdtemp(prefix="llmrank-hidden-"))
            log.info("calibration hidden states exceed %.3g GB: spilling them to %s", self.pool.limit / 1e9, self.spill)
        if self.spill is not None and k not in self.memory:
            self.devices[k] = x.device
            torch.save(x.detach().cpu(), self.spill / f"{k}.pt")
            return
        self.memory[k] = x
        self.pool.used += size
        self.pool.peak = max(self.pool.peak, self.pool.used)

    def get(self, k: int) -> torch.Tensor:
        if k in self.memory:
            return self.memory[k]
        return torch.load(self.spill / f"{k}.pt", weights_only=True).to(self.devices[k])

    def close(self) -> None:
        self.pool.used -= self.bytes
        self.memory.clear()
        if self.spill is not None:
            shutil.rmtree(self.spill, ignore_errors=True)
            self.spill = None
