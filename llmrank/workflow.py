"""The model -> slim artefacts job shared by the CLI and the demo.

It loads, calibrates, prunes (llmrank.prune) and hands the slim model to the exporters; it
never scores or shrinks on its own. All outputs go into one folder that is built under a
temporary name and renamed into place at the end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmrank.api import PruneResult, prune
from llmrank.exporters.atomic import atomic_path, check_writable, refuse_input_overlap
from llmrank.ir.errors import ConfigError
from llmrank.passes.config import CLI_DEFAULTS, PruneConfig
from llmrank.report import plot_prune


# fp32 logits of real models (|logit| ~ 20-40) differ between onnxruntime and PyTorch kernels by
# ~1e-4 (measured 1.6e-4 on dense SmolLM2); tiny test models stay far below this.
ONNX_ATOL = 1e-3
# ... plus this fraction of the largest |logit| of the case: a model with large logits (a
# heavily pruned one, or a bigger vocabulary) has proportionally larger rounding differences.
ONNX_RTOL = 1e-4


@dataclass
class PruneJob:
    """``llmrank prune``: what to load, the pruning options (one PruneConfig), what to write.

    The job's own fields are about data and outputs; every pruning option lives in
    ``config``. ``check()`` validates them all before anything is loaded.
    """

    model: str
    out: Path
    config: PruneConfig = field(default_factory=lambda: PruneConfig(**CLI_DEFAULTS))
    calib: str = "wiki"
    samples: int = 16
    compensation_samples: int = 64
    seq_len: int = 512
    onnx: bool = True
    kv_cache: bool = True
    hf: bool = True
    optimize: bool = False
    quantize: str | None = None  # "int8": also onnx/model.int8.onnx
    genai: str | None = None  # int4 | fp16 | fp32: also genai/, an onnxruntime-genai folder
    genai_device: str = "cpu"
    force: bool | int = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Every setting and combination, before the model is read (ConfigError names the flag)."""
        if self.genai is not None:
            from llmrank.exporters.genai import check_options

            check_options(self.genai, self.genai_device)
            if self.config.mode == "mask-paper":
                raise ConfigError("--genai needs a shrunk model: --mode mask-paper keeps the dense shapes")
        if self.quantize not in (None, "int8"):
            raise ConfigError(f"--quantize {self.quantize!r}: choose int8")
        if self.quantize and not self.onnx:
            raise ConfigError("--quantize int8 quantizes the ONNX file: drop --no-onnx")
        for flag, value in (("--samples", self.samples), ("--compensation-samples", self.compensation_samples),
                            ("--seq-len", self.seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{flag} must be an integer >= 1, got {value!r}")
        check_writable(Path(self.out), self.force)
        from llmrank.models import check_seq_len, read_config

        config = read_config(self.model)  # config.json only, no weights (None: not local yet)
        if config is not None:
            check_seq_len(config, self.seq_len)


def load(model: str, *, progress: bool = True):
    """(model, tokenizer, source folder or None) for a built-in name, folder or hub id."""
    from llmrank.models import load_model, resolve_model_dir

    loaded, tokenizer = load_model(model)
    try:
        folder = resolve_model_dir(model)
    except Exception:  # noqa: BLE001 - a hub id has no local folder to protect
        folder = None
    return loaded, tokenizer, folder


def run_prune(job: PruneJob, *, loaded=None) -> dict[str, Any]:
    """Run the job; returns the report (also written as report.json in ``job.out``)."""
    from llmrank.data import calibration_tokens

    job.check()
    out, config = Path(job.out), job.config
    clock = time.perf_counter()
    model, tokenizer, folder = loaded or load(job.model, progress=job.progress)
    refuse_input_overlap(out, folder)
    if hasattr(model, "config"):
        from llmrank.models import check_seq_len

        check_seq_len(model.config, job.seq_len)
    load_s = time.perf_counter() - clock

    calib = calibration_tokens(tokenizer, job.calib, n=job.samples, seq_len=job.seq_len, seed=config.seed)
    refit = None
    if config.compensation != "none" and job.compensation_samples != job.samples:
        refit = calibration_tokens(tokenizer, job.calib, n=job.compensation_samples, seq_len=job.seq_len, seed=config.seed)
    result = prune(model, calib, config=config, compensation_data=refit, progress=job.progress)
    report = build_report(job, result, load_s)
    with atomic_path(out, force=job.force) as tmp:
        tmp.mkdir(parents=True)
        write_artifacts(tmp, job, result, tokenizer, report)
    # paths in the report point at the final folder
    return json.loads((out / "report.json").read_text())


def build_report(job: PruneJob, result: PruneResult, load_s: float) -> dict[str, Any]:
    from llmrank import __version__

    job_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(job).items() if k != "config"}
    return {
        "llmrank_version": __version__,
        "model": job.model,
        "job": job_dict,
        **result.to_dict(),
        "requested_sparsity": job.config.sparsity,
        "effective_sparsity": result.config.get("effective_sparsity"),
        "timings_s": {"load": load_s, **result.timings},
        "artifacts": {},
    }


def write_artifacts(folder: Path, job: PruneJob, result: PruneResult, tokenizer, report: dict[str, Any]) -> None:
    """scores.safetensors, plot.png, hf/, model.onnx and report.json inside ``folder``."""
    from llmrank.exporters.hf import check_reload, save_hf

    c = job.config
    metadata = {
        "source_model": job.model, "scorer": c.scorer, "representation": c.representation, "sparsity": c.sparsity,
        "pruner": c.pruner, "compensation": c.compensation, "layer_widths": {k: a for k, (_, a) in result.widths.items()},
    }
    tensors = {f"{name}": s.to(torch.float32).contiguous() for name, s in result.scores.groups.items()}
    tensors.update({f"{name}.kept": k.contiguous() for name, k in result.kept.items()})
    save_file(tensors, str(folder / "scores.safetensors"), metadata={"scorer": c.scorer})
    report["artifacts"]["scores"] = "scores.safetensors"
    title = f"{job.model}: {c.scorer}/{c.representation}, sparsity {c.sparsity}"
    if plot_prune(result.widths, result.scores.groups, folder / "plot.png", title) is not None:
        report["artifacts"]["plot"] = "plot.png"
    if job.hf and c.mode != "mask-paper":
        saved = save_hf(result.model, tokenizer, folder / "hf", metadata=metadata)
        # reload it the way the report says it reloads, and compare with the model in memory
        diff = check_reload(folder / "hf", result.model, stock=saved.stock_loadable)
        report["artifacts"]["hf"] = {"path": "hf", "uniform": saved.uniform, "stock_loadable": saved.stock_loadable,
                                     "loader": "transformers" if saved.stock_loadable else "llmrank.load",
                                     "reload_max_abs_diff": diff}
    if job.genai:
        from llmrank.exporters.genai import export_genai

        source = folder / "hf" if "hf" in report["artifacts"] else result.model
        built = export_genai(source, folder / "genai", precision=job.genai, device=job.genai_device, tokenizer=tokenizer)
        report["artifacts"]["genai"] = {**built.to_dict(), "path": "genai"}
    if job.onnx:
        onnx = export_onnx_artifact(result.model, folder / "onnx" / "model.onnx", job, metadata)
        report["artifacts"]["onnx"] = onnx
        if job.quantize == "int8":
            from llmrank.exporters.quantize import quantize_onnx

            q = quantize_onnx(folder / "onnx" / "model.onnx", folder / "onnx" / "model.int8.onnx", result.model)
            report["artifacts"]["onnx_int8"] = {**q.to_dict(), "path": "onnx/model.int8.onnx"}
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))


def export_onnx_artifact(model, path: Path, job: PruneJob, metadata: dict[str, Any]) -> dict[str, Any]:
    from llmrank.exporters.onnx import export_onnx

    res = export_onnx(model, path, with_past=job.kv_cache, metadata=metadata, optimize=job.optimize, force=job.force, atol=ONNX_ATOL, rtol=ONNX_RTOL)
    rel = Path(path.parent.name) / path.name
    return {
        "path": str(rel), "bytes": res.total_bytes, "with_past": res.with_past,
        "max_abs_diff": res.max_abs_diff, "export_s": res.export_seconds, "validate_s": res.validate_seconds,
    }
