"""The calibration hidden states between two decoder blocks, held once, spilled to disk past a budget."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class HiddenStates:
    """The calibration hidden states between two blocks, one tensor per batch; kept in memory,
    or spilled to a temporary folder when they exceed ``budget_bytes``."""

    def __init__(self, budget_bytes: float = math.inf):
        self.budget = budget_bytes
        self.memory: dict[int, torch.Tensor] = {}
        self.spill: Path | None = None
        self.devices: dict[int, torch.device] = {}
        self.bytes = 0

    def put(self, k: int, x: torch.Tensor) -> None:
        size = x.numel() * x.element_size()
        old = self.memory.pop(k, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        if self.spill is None and self.bytes + size > self.budget:
            self.spill = Path(tempfile.mkdtemp(prefix="llmrank-hidden-"))
            log.info("calibration hidden states exceed %.3g GB: spilling them to %s", self.budget / 1e9, self.spill)
        if self.spill is not None and k not in self.memory:
            self.devices[k] = x.device
            torch.save(x.detach().cpu(), self.spill / f"{k}.pt")
            return
        self.memory[k] = x
        self.bytes += size

    def get(self, k: int) -> torch.Tensor:
        if k in self.memory:
            return self.memory[k]
        return torch.load(self.spill / f"{k}.pt", weights_only=True).to(self.devices[k])

    def close(self) -> None:
        self.memory.clear()
        if self.spill is not None:
            shutil.rmtree(self.spill, ignore_errors=True)
            self.spill = None
