"""The ExportedProgram route: prune a ``torch.export`` program and get a slim program back.

This is llmrank as a compiler pass. It never needs the user's ``nn.Module``: everything is
read from the program (``ep.graph`` for the analysis, ``ep.module()`` for weights and for
running calibration), and the result is again an ``ExportedProgram`` whose parameters and
graph have the shrunk shapes, ready for ``torch.onnx.export``, AOTInductor or
``torch.compile``::

    ep = torch.export.export(model, (x,), dynamic_shapes=...)
    res = prune_program(ep, [(x1,), (x2,)], sparsity=0.3)
    res.program            # slim ExportedProgram, same inputs/outputs and dynamic dims
    res.max_abs_diff       # slim vs dense-with-dropped-channels-zeroed, on the inputs

``prune_program`` runs the one pipeline of ``llmrank.passes.pipeline``; what is particular to
programs (adapting the program for ``analyze``, rewriting the widths hard-coded in the groups'
graph regions, re-exporting with the same dynamic dims) is in ``llmrank.passes.exported``,
below the pipeline, and its names are importable from here too.
Analyse the program BEFORE ``run_decompositions()``: the default decomposition turns
``aten.linear`` into transposes + mm, and the weights are no longer recognisable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from llmrank.ir.errors import InputError
from llmrank.passes.calibrate import as_inputs
from llmrank.passes.config import PruneConfig
from llmrank.passes.exported import (
    analyze_program, calibrate_program, example_inputs, mask_program, program_dynamic_shapes, program_traced, reexport,
    rewrite_shapes, shrink_program,
)
from llmrank.passes.pipeline import Pipeline, PruneState
from llmrank.passes.result import PruneResult
from llmrank.passes.shrink import mask

__all__ = [
    "analyze_program",
    "calibrate_program",
    "example_inputs",
    "mask_program",
    "outputs_diff",
    "program_dynamic_shapes",
    "program_traced",
    "prune_program",
    "reexport",
    "rewrite_shapes",
    "shrink_program",
]



# ---------------------------------------------------------------------------------------
# verification


def outputs_diff(reference: nn.Module, candidate: nn.Module, inputs: Sequence[tuple]) -> float:
    """Largest absolute difference over all tensor outputs of two modules on ``inputs``."""
    worst = 0.0
    with torch.no_grad():
        for item in inputs:
            args = as_inputs(item)
            ref = pytree.tree_leaves(reference(*args))
            got = pytree.tree_leaves(candidate(*args))
            if len(ref) != len(got):
                return math.inf
            for a, b in zip(ref, got):
                if isinstance(a, torch.Tensor):
                    if a.shape != b.shape:
                        return math.inf
                    if a.numel():
                        worst = max(worst, float((a.double() - b.double()).abs().max()))
    return worst


# ---------------------------------------------------------------------------------------
# the one call


def prune_program(
    ep: ExportedProgram,
    calibration_inputs: Sequence[Any],
    *,
    config: Any = None,
    dynamic_shapes: Any = None,
    verify_inputs: Sequence[tuple] | None = None,
    refit_inputs: Sequence[Any] | None = None,
    **options: Any,
) -> PruneResult:
    """Prune the channel groups of ``ep`` and return a slim ExportedProgram.

    The same passes as ``llmrank.prune`` (one ``PruneConfig``: ``config`` and/or options such
    as ``sparsity=0.3, compensation="lstsq"``). ``calibration_inputs`` is a list of input
    tuples for the program; ``refit_inputs`` (default: the same) feed the compensation.
    ``dynamic_shapes`` is what the program was exported with (default: rebuilt from the
    program). ``verify_inputs`` defaults to the first calibration input. ``ep`` is not modified.
    """
    config = PruneConfig.from_options(config, **options)
    calibration_inputs = [as_inputs(item) for item in calibration_inputs]
    if not calibration_inputs:
        raise InputError("calibration_inputs is empty: give at least one tuple of inputs")
    checks = [as_inputs(item) for item in verify_inputs] if verify_inputs is not None else calibration_inputs[:1]
    state = Pipeline.default().run(PruneState(
        config=config, program=ep, batches=tuple(calibration_inputs),
        refit_batches=None if refit_inputs is None else tuple(as_inputs(item) for item in refit_inputs),
        example_inputs=checks[0], dynamic_shapes=dynamic_shapes,
    ))
    reference = mask(state.model, state.ir, state.kept, refits=state.refits)
    diff = outputs_diff(reference, state.slim_program.module(), checks)
    widths = {g.name: (g.width, len(state.kept[g.name])) for g in state.ir.groups}
    return PruneResult(
        route="exported program", program=state.slim_program, model=state.slim_program.module(), ir=state.ir,
        kept=state.kept, scores=state.scores, max_abs_diff=diff, norms=state.norms, widths=widths,
        rewrites=list(state.rewrites), timings=state.timings, params_before=_params(ep), params_after=_params(state.slim_program),
        verification=state.verification, output_check=state.output_check, notes=state.notes,
        config={**config.to_dict(), "applied": state.budget.to_dict() if state.budget is not None else None},
    )


def _params(ep: ExportedProgram) -> int:
    return sum(p.numel() for p in ep.parameters())
