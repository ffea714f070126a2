"""``llmrank.prune_layerwise``: the block route for a checkpoint folder, written atomically.

The walks live in ``llmrank.passes.blocks``; this facade does what a public entry point owes its
caller and the passes must not: it batches the token ids as ``llmrank.prune`` does, checks the
options against the block route before anything is read, refuses to write into the input, and
builds the output under a temporary name that is renamed into place only when the run succeeded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from llmrank.api import as_batches
from llmrank.exporters.atomic import atomic_path, check_writable, refuse_input_overlap
from llmrank.passes.blocks.driver import check_config, run_blocks
from llmrank.passes.result import PruneResult
from llmrank.passes.config import PruneConfig

__all__ = ["prune_layerwise"]


def prune_layerwise(
    folder: Path | str,
    calibration_ids: torch.Tensor | None,
    *,
    config: PruneConfig | None = None,
    out_dir: Path | str | None = None,
    refit_ids: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
    hidden_budget_bytes: float = math.inf,
    max_shard_size: int = 2 * 1024**3,
    force: bool | int = False,
    metadata: dict[str, Any] | None = None,
    why: str = "",
    preset: str | None = None,
    **options: Any,
) -> PruneResult:
    """Prune the checkpoint in ``folder`` one decoder block at a time, holding one block's weights.

    The same options as ``llmrank.prune`` (``config`` and/or keywords), the same kept sets and
    logits; an option the block route cannot honour is refused before the checkpoint is read.
    ``calibration_ids`` [N, L] feed the scores, ``refit_ids`` (default: the same) the refit.
    ``out_dir``: where the slim checkpoint goes (None writes nothing). ``why``: how this route was
    chosen, for the refusal's text. ``preset``: as in ``llmrank.prune``.
    """
    from llmrank.presets import with_preset

    config = PruneConfig.from_options(config, **with_preset(preset, config, options))
    check_config(config, why=why)
    folder = Path(folder)
    batches = as_batches(calibration_ids, batch_size=config.batch_size) if calibration_ids is not None else []
    refit = as_batches(refit_ids, batch_size=config.batch_size) if refit_ids is not None else None
    run = dict(config=config, device=device, dtype=dtype, progress=progress, hidden_budget_bytes=hidden_budget_bytes,
               max_shard_size=max_shard_size, metadata=metadata)
    if out_dir is None:
        return run_blocks(folder, batches, refit, **run)
    out_dir = Path(out_dir)
    refuse_input_overlap(out_dir, folder)
    check_writable(out_dir, force)
    with atomic_path(out_dir, force=force) as tmp:
        tmp.mkdir(parents=True)
        result = run_blocks(folder, batches, refit, write_to=tmp, **run)
    result.out_dir = out_dir
    return result
