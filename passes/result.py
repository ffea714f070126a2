"""``PruneResult``: what a prune produced, the same type on every route.

The in-memory prune fills ``model`` (the slim module); the exported-program route fills
``program`` (the slim ExportedProgram; ``model`` is its module) and ``rewrites``; the block route
writes a checkpoint (``out_dir``) instead of holding a model, and fills ``blocks`` and the memory
fields. Everything else (kept sets, scores, widths, parameter counts, checks, notes, the applied
budget in ``config["applied"]``) means the same on every route, so reports and tests read one type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from llmrank.ir.graph import ModelIR
from llmrank.passes.calibrate import ActivationNorms
from llmrank.passes.score import Scores
from llmrank.passes.verify import OutputCheck, Verification

ROUTES = ("in memory", "block by block", "exported program")


@dataclass
class PruneResult:
    """What a prune produced; ``model`` is a new module unless ``inplace=True`` was asked."""

    ir: ModelIR
    scores: Scores
    kept: dict[str, torch.Tensor]
    widths: dict[str, tuple[int, int]]
    params_before: int
    params_after: int
    timings: dict[str, float]
    verification: Verification | None
    config: dict[str, Any] = field(default_factory=dict)
    output_check: OutputCheck | None = None
    notes: tuple[str, ...] = ()
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    route: str = "in memory"
    model: nn.Module | None = None
    norms: ActivationNorms | None = None
    # the exported-program route
    program: ExportedProgram | None = None
    rewrites: list[str] = field(default_factory=list)  # the shape constants changed in the program's graph
    max_abs_diff: float | None = None  # slim program vs the masked dense one, on the verification inputs
    # the block route
    blocks: list[Any] = field(default_factory=list)  # per block: seconds per phase, RSS, its verification
    out_dir: Path | None = None
    dtype: str = ""
    device: str = "cpu"
    peak_rss_bytes: int | None = None
    peak_device_bytes: int | None = None
    hidden_bytes: int = 0
    spilled: bool = False
    sample_ids: torch.Tensor | None = None
    sample_logits: torch.Tensor | None = None  # the slim model's logits on sample_ids: a reload is checked against them

    @property
    def uniform_width(self) -> int | None:
        after = {w for _, w in self.widths.values()}
        return after.pop() if len(after) == 1 else None

    def to_dict(self, *, include_scores: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_class": self.ir.model_class,
            "config": self.config,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "param_reduction": 1 - self.params_after / self.params_before if self.params_before else 0.0,
            "widths": {k: {"before": b, "after": a} for k, (b, a) in self.widths.items()},
            "timings_s": self.timings,
            "verification": self.verification.to_dict() if self.verification else None,
            "output_check": self.output_check.to_dict() if self.output_check else None,
            "notes": list(self.notes),
            "blocked": self.ir.blocked,
        }
        if self.heads:
            out["heads"] = self.heads
        if self.route == "block by block":
            out.update({"layerwise": True, "blocks": [b.to_dict() for b in self.blocks], "peak_rss_bytes": self.peak_rss_bytes,
                        "peak_device_bytes": self.peak_device_bytes, "hidden_bytes": self.hidden_bytes,
                        "spilled": self.spilled, "dtype": self.dtype, "device": self.device,
                        "out_dir": str(self.out_dir) if self.out_dir else None})
        if self.route == "exported program":
            out.update({"rewrites": self.rewrites, "max_abs_diff": self.max_abs_diff})
        if include_scores:
            out["scores"] = {k: v.tolist() for k, v in self.scores.groups.items()}
            if self.scores.heads:
                out["head_scores"] = {k: v.tolist() for k, v in self.scores.heads.items()}
            out["kept"] = {k: v.tolist() for k, v in self.kept.items()}
        return out
