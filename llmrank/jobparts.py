"""What the prune job (``llmrank.workflow``) and the heal job (``llmrank.healcmd``) share.

Both load a model by name and may write an ONNX artifact with the same bounds; the heal job
is also a step of the prune job, so these live below both (neither imports the other back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# fp32 logits of real models (|logit| ~ 20-40) differ between onnxruntime and PyTorch kernels by
# ~1e-4 (measured 1.6e-4 on dense SmolLM2); tiny test models stay far below this.
ONNX_ATOL = 1e-3
# ... plus this fraction of the largest |logit| of the case: a model with large logits (a
# heavily pruned one, or a bigger vocabulary) has proportionally larger rounding differences.
ONNX_RTOL = 1e-4


def load(model: str, *, progress: bool = True):
    """(model, tokenizer, source folder or None) for a built-in name, folder or hub id."""
    from llmrank.models import load_model, resolve_model_dir

    loaded, tokenizer = load_model(model)
    try:
        folder = resolve_model_dir(model)
    except Exception:  # noqa: BLE001 - a hub id has no local folder to protect
        folder = None
    return loaded, tokenizer, folder


def export_onnx_artifact(model, path: Path, job: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    """Export and validate ``model`` as ONNX at ``path``; ``job`` (a PruneJob or HealJob) gives
    ``kv_cache``, ``optimize`` and ``force``. Returns the report's entry for it."""
    from llmrank.exporters.onnx import export_onnx
    from llmrank.passes.heap import release_memory

    release_memory()  # what the prune freed goes back to the system before the export's copies are made
    res = export_onnx(model, path, with_past=job.kv_cache, metadata=metadata, optimize=job.optimize, force=job.force, atol=ONNX_ATOL, rtol=ONNX_RTOL)
    rel = Path(path.parent.name) / path.name
    return {
        "path": str(rel), "bytes": res.total_bytes, "with_past": res.with_past,
        "max_abs_diff": res.max_abs_diff, "export_s": res.export_seconds, "validate_s": res.validate_seconds,
    }
