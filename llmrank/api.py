"""The one-call API: ``llmrank.prune(model, calibration, sparsity=0.3)``.

A thin facade over the one pipeline (``llmrank.passes.pipeline``): it checks the options
(one ``PruneConfig``) before any work, batches the calibration tokens, runs the passes and
returns everything they produced, so a researcher can inspect the scores and a deployment
engineer can ship the slim model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from llmrank.ir.errors import CalibrationError, InputError
from llmrank.ir.trace import Traced
from llmrank.passes.config import PruneConfig
from llmrank.passes.result import PruneResult
from llmrank.passes.pipeline import Pipeline, PruneState, require_calibration
from llmrank.passes.select import effective_sparsity
from llmrank.passes.headcut import heads_kept

__all__ = ["PruneResult", "as_batches", "count_parameters", "prune"]


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def as_batches(calibration: Any, *, batch_size: int = 4) -> list[torch.Tensor | dict]:
    """Token tensor [N, L] -> batches of ``batch_size``; an iterable of batches is kept as is."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 0:
            raise CalibrationError("calibration is a scalar tensor: give token ids [N, L] (or a list of batches)")
        if calibration.dim() == 1:
            calibration = calibration.unsqueeze(0)
        if calibration.numel() == 0 or calibration.shape[0] == 0:
            raise CalibrationError("calibration data is empty: give at least one sequence of token ids")
        if calibration.dim() != 2 and not calibration.is_floating_point():
            raise CalibrationError(f"calibration token ids must be a [N, L] tensor, got shape {tuple(calibration.shape)}")
        return list(calibration.split(batch_size))
    if isinstance(calibration, (str, bytes)):
        raise InputError("text calibration needs a tokenizer: use llmrank.data.calibration_tokens(tokenizer, source) first")
    if isinstance(calibration, Iterable):
        return list(calibration)
    raise InputError(f"calibration must be a token tensor [N, L] or an iterable of batches, got {type(calibration).__name__}")


def prune(
    model: nn.Module,
    calibration: Any = None,
    *,
    config: PruneConfig | None = None,
    compensation_data: Any = None,
    example_inputs: tuple | None = None,
    traced: Traced | None = None,
    progress: bool = True,
    verify_outputs: bool | None = None,
    preset: str | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``model``'s channel groups and return the result; ``model`` itself is not changed.

    Options are the fields of :class:`~llmrank.passes.config.PruneConfig` (``sparsity=0.3,
    scorer="wpr", compensation="lstsq", ...``), given as keywords or as ``config=``; they are
    all checked before any work. ``calibration`` is a LongTensor of token ids [N, L] (or an
    iterable of batches / kwargs dicts); it may be None only for the weight-only scorers
    (l1, lp, random) without compensation. ``compensation_data`` (default: ``calibration``)
    feeds the least-squares refit, which has about one unknown per kept neuron per output
    row and so wants more tokens than scoring: on SmolLM2 at 30 %, 64 x 512 tokens gave
    perplexity 43.9 where 16 x 512 gave 52.6. A scorer of your own is a
    name given to ``llmrank.register_scorer`` (or ``module:function``), passed as ``scorer=``. ``preset`` ("fast", "balanced", "best"; see llmrank.presets) fills the
    options not given; its ``compensation_samples`` says how many sequences it was measured with.
    """
    from llmrank.presets import with_preset

    if verify_outputs is not None:
        options["verify"] = verify_outputs
    config = PruneConfig.from_options(config, **with_preset(preset, config, options))
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(p.is_meta for p in model.parameters()):
        if getattr(model, "hf_device_map", None) or hasattr(model, "_hf_hook"):
            # accelerate pages offloaded weights in only during a forward; tracing, scoring and
            # shrinking read and rewrite every weight, so the in-memory prune needs them all
            raise InputError("the model's weights are offloaded by accelerate (device_map/max_memory put them on disk "
                             "or the meta device), and the in-memory prune reads and rewrites every weight: prune the "
                             "checkpoint block by block instead (llmrank.prune_layerwise(folder, ids, device='cuda'), "
                             "or `llmrank prune FOLDER --layerwise --device cuda`), which holds one block at a time")
        raise InputError("the model's weights are on the meta device (not loaded): load real weights before pruning")
    batches = tuple(as_batches(calibration, batch_size=config.batch_size)) if calibration is not None else ()
    refit = tuple(as_batches(compensation_data, batch_size=config.batch_size)) if compensation_data is not None else None
    if (calibration is not None and not batches) or (compensation_data is not None and not refit):
        raise CalibrationError("calibration data is empty: give at least one sequence of token ids")
    require_calibration(config, batches, refit)  # before tracing: fail in milliseconds
    params_before = count_parameters(model)
    state = PruneState(config=config, model=model, batches=batches, refit_batches=refit, example_inputs=example_inputs,
                       traced=traced, progress=progress)
    state = Pipeline.default().run(state)
    return result_of(state, params_before)


def result_of(state: PruneState, params_before: int) -> PruneResult:
    """A PruneResult from a finished pipeline state."""
    config, ir, kept = state.config, state.ir, state.kept
    widths = {g.name: (g.width, len(kept[g.name]) if config.mode != "mask-paper" else g.width) for g in ir.groups}
    refit_tokens = state.stats.refit_tokens if state.stats is not None and config.compensation != "none" else 0
    norms = state.norms
    return PruneResult(
        model=state.slim, ir=ir, scores=state.scores, kept=kept, widths=widths, params_before=params_before,
        params_after=count_parameters(state.slim), timings=state.timings, verification=state.verification,
        config={**config.to_dict(), "effective_sparsity": effective_sparsity(ir, kept) if config.mode != "mask-paper" else config.sparsity,
                "compensation_tokens": refit_tokens, "calibration_batches": norms.batches if norms else 0,
                "calibration_tokens": norms.tokens if norms else 0,
                "applied": state.budget.to_dict() if state.budget is not None else None},
        output_check=state.output_check, notes=state.notes,
        heads=heads_kept(ir, kept) if config.heads else {}, norms=state.norms,
    )
