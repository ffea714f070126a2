"""The model -> slim artefacts job shared by the CLI and the demo.

It loads, calibrates, prunes (llmrank.prune) and hands the slim model to the exporters; it
never scores or shrinks on its own. A checkpoint that does not fit the memory budget (or
``--layerwise``) goes block by block instead (``llmrank.passes.blocks.driver``), which writes the
slim checkpoint as it goes; ``--max-memory`` and ``--device`` are execution options of the job,
not pruning options, so they live here and not in PruneConfig. All outputs go into one folder that is built under a
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
from llmrank.jobparts import ONNX_ATOL, ONNX_RTOL, export_onnx_artifact, load  # noqa: F401 - this module's names too
from llmrank.passes import routes
from llmrank.passes.config import CLI_DEFAULTS, PruneConfig
from llmrank.report import plot_prune


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
    preset: str | None = None  # the preset the CLI filled the options from (recorded in report.json)
    seq_len: int = 512
    onnx: bool = True
    kv_cache: bool = True
    hf: bool = True
    optimize: bool = False
    quantize: str | None = None  # "int8": also onnx/model.int8.onnx
    genai: str | None = None  # int4 | fp16 | fp32: also genai/, an onnxruntime-genai folder
    genai_device: str = "cpu"
    gguf: str | None = None  # f16 | bf16 | q8_0 | f32 | q4_k_m ...: also gguf/model-<type>.gguf, by llama.cpp's converter
    force: bool | int = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    # execution options (how, not what, to prune): they never change the result
    layerwise: bool = False
    max_memory: int | None = None  # bytes; None: what the machine has available
    device: str = "cpu"
    # heal before export (``llmrank.healcmd``): a budget turns it on
    heal_tokens: int | None = None
    heal_minutes: float | None = None
    heal_lr: float | None = None
    heal_train: str = "weights"
    heal_bf16: bool = False

    @property
    def heal_options(self):
        """The heal this job asks for (None: no heal); calibration text and seed are the prune's."""
        if self.heal_tokens is None and self.heal_minutes is None:
            return None
        from llmrank.healcmd import HealOptions

        return HealOptions(tokens=self.heal_tokens, minutes=self.heal_minutes, lr=self.heal_lr, train=self.heal_train,
                           bf16=self.heal_bf16, seq_len=self.seq_len, calib=self.calib, seed=self.config.seed)

    def check(self, *, loaded: bool = False) -> tuple[bool, str, Path | None]:
        """Every setting and combination, before the model is read (ConfigError names the flag);
        returns the route (block by block?, why, the model's local folder), each option checked
        against it. ``loaded``: the caller holds the model already (the in-memory route)."""
        if self.genai is not None:
            from llmrank.exporters.genai import check_options

            check_options(self.genai, self.genai_device)
            if self.config.mode == "mask-paper":
                raise ConfigError("--genai needs a shrunk model: --mode mask-paper keeps the dense shapes")
        if self.gguf is not None:
            from llmrank.exporters.gguf import check_prune_options

            check_prune_options(self.gguf, hf=self.hf, mode=self.config.mode, allocation=self.config.allocation,
                                pruner=self.config.pruner)
        if self.quantize not in (None, "int8"):
            raise ConfigError(f"--quantize {self.quantize!r}: choose int8")
        if self.quantize and not self.onnx:
            raise ConfigError("--quantize int8 quantizes the ONNX file: drop --no-onnx")
        for flag, value in (("--samples", self.samples), ("--compensation-samples", self.compensation_samples),
                            ("--seq-len", self.seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{flag} must be an integer >= 1, got {value!r}")
        if self.max_memory is not None and (not isinstance(self.max_memory, int) or self.max_memory < 1):
            raise ConfigError(f"--max-memory must be a positive size such as 16GB, got {self.max_memory!r}")
        check_device(self.device)
        if self.heal_options is not None:
            if self.config.mode != "shrink":
                raise ConfigError(f"a heal trains the shrunk model: --mode {self.config.mode} is not supported with --heal-tokens")
            self.heal_options.check()
        if loaded and self.layerwise:
            raise ConfigError("--layerwise streams the checkpoint from its folder: it cannot take an already loaded model")
        route = choose_route(self) if not loaded else (False, "in memory (a loaded model)", None)
        check_route(self, route[0], route[1])
        check_writable(Path(self.out), self.force)
        from llmrank.models import check_seq_len, read_config

        config = read_config(self.model)  # config.json only, no weights (None: not local yet)
        if config is not None:
            check_seq_len(config, self.seq_len)
            if self.genai is not None:
                from llmrank.exporters.genai import check_model

                check_model(config, self.genai_device)
        return route


def parse_size(text: str | int) -> int:
    """Bytes from ``16GB``, ``16G``, ``500MiB``, ``1e9`` (decimal units; KiB/MiB/GiB binary).

    nan, inf and overflowing numbers are option errors like any other typo; a size below one
    byte names the likely slip (a bare ``0.5`` meant as GB); a budget under 64 MB is allowed
    but warned about, since no model runs in it (at least one block is always held).
    """
    import logging
    import math

    small = 64 * 10**6
    raw = str(text).strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number):]
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9, "T": 10**12,
             "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError, OverflowError):
        raise ConfigError(f"--max-memory must be a size such as 16GB, 500MiB or 1e9 (bytes), got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"--max-memory must be a finite size such as 16GB, got {text!r}")
    if value <= 0:
        raise ConfigError(f"--max-memory must be a positive size such as 16GB, got {text!r}")
    if value < 1:
        slip = f": a number without a unit counts bytes; did you mean {number}GB?" if not unit else ""
        raise ConfigError(f"--max-memory {text!r} is less than one byte{slip}")
    if value < small:
        logging.getLogger("llmrank").warning(
            "--max-memory %s is %s bytes: a run holds at least one decoder block and its calibration hidden states, so "
            "it will use more than that (give a unit: 16GB, 500MiB)", text, f"{int(value):,}")
    return int(value)


def check_device(device: str) -> None:
    """A device torch knows and this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (psutil, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is an optional dependency
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return 2**63 - 1


def in_memory_need(job: PruneJob, folder: Path) -> tuple[int, str]:
    """(bytes, how they were found) the in-memory job needs for the checkpoint in ``folder``."""
    from llmrank.memory import FALLBACK_PEAK_RATIO, job_peak
    from llmrank.passes.blocks.checkpoint import fp32_size

    c = job.config
    need = job_peak(folder, onnx=job.onnx, seq_len=job.seq_len, batch_size=c.batch_size, sparsity=c.sparsity,
                    compensation=c.compensation)
    if need is not None:
        return need, "estimated from config.json: fp32 model, refit statistics, calibration logits, slim copy" + (
            " and ONNX export" if job.onnx else "")
    return int(FALLBACK_PEAK_RATIO * fp32_size(folder)), f"{FALLBACK_PEAK_RATIO:g} x the fp32 weights"


def choose_route(job: PruneJob) -> tuple[bool, str, Path | None]:
    """(layerwise?, why, the model's local folder) from --layerwise and the memory budget.

    The in-memory job's peak is estimated from config.json (``llmrank.memory``: the fp32 model,
    the refit's Gram matrices, a calibration batch's logits, the slim copy, the ONNX export);
    past ``--max-memory`` (default: the memory available now) a local safetensors checkpoint is
    pruned block by block instead.
    """
    from llmrank.models import resolve_model_dir
    from llmrank.ir.errors import InputError
    from llmrank.passes.blocks.checkpoint import INDEX_NAME, Checkpoint

    if Path(job.model).expanduser().is_dir():
        folder = resolve_model_dir(job.model)  # a local folder: its faults (a broken index) are the user's to see
    else:
        try:
            folder = resolve_model_dir(job.model)
        except Exception:  # noqa: BLE001 - a hub id or a .gguf file has no safetensors folder to stream from
            folder = None
    streamable = False
    if folder is not None:
        try:
            Checkpoint(folder)
            streamable = True
        except InputError:
            if job.layerwise or (folder / INDEX_NAME).is_file():
                raise  # a broken index (or a folder --layerwise cannot read): the error names the file and the fault
        except Exception:  # noqa: BLE001 - not a safetensors folder: the in-memory route only
            pass
    if job.layerwise:
        if not streamable:
            raise ConfigError(f"--layerwise reads a local Hugging Face folder with safetensors weights; {job.model} is not one")
        return True, "asked for (--layerwise)", folder
    if not streamable:
        return False, "in memory (not a local safetensors folder)", folder
    budget = job.max_memory if job.max_memory is not None else available_memory()
    need, how = in_memory_need(job, folder)
    if need > budget:
        return True, (f"the in-memory prune needs about {need / 1e9:.3g} GB ({how}), more than the "
                      f"{budget / 1e9:.3g} GB {'of --max-memory' if job.max_memory is not None else 'available'}"), folder
    return False, f"in memory (about {need / 1e9:.3g} GB needed, {how}; {budget / 1e9:.3g} GB budget)", folder


def check_route(job: PruneJob, layerwise: bool, why: str) -> None:
    """Every option against the route that will run it, before any weight is read (``passes/routes.py``)."""
    route = routes.BLOCKS if layerwise else routes.IN_MEMORY
    routes.check(job.config, route, heal=job.heal_options is not None, why="" if job.layerwise else why)
    if not layerwise and torch.device(job.device).type != "cpu":
        raise ConfigError(f"--device {job.device} runs the block-by-block route only; the in-memory prune runs on the CPU: "
                          "add --layerwise to prune on the device, or drop --device")


def run_prune(job: PruneJob, *, loaded=None) -> dict[str, Any]:
    """Run the job; returns the report (also written as report.json in ``job.out``)."""
    from llmrank.data import calibration_tokens

    layerwise, why, folder = job.check(loaded=loaded is not None)
    out, config = Path(job.out), job.config
    if layerwise:
        return run_prune_layerwise(job, folder, why)
    clock = time.perf_counter()
    model, tokenizer, folder = loaded or load(job.model, progress=job.progress)
    refuse_input_overlap(out, folder)
    if hasattr(model, "config"):
        from llmrank.models import check_seq_len

        check_seq_len(model.config, job.seq_len)
        if job.genai is not None:  # a built-in not yet converted had no config.json to check before the load
            from llmrank.exporters.genai import check_model

            check_model(model.config, job.genai_device, architecture=type(model).__name__)
    load_s = time.perf_counter() - clock

    calib = calibration_tokens(tokenizer, job.calib, n=job.samples, seq_len=job.seq_len, seed=config.seed)
    refit = None
    if config.compensation != "none" and job.compensation_samples != job.samples:
        refit = calibration_tokens(tokenizer, job.calib, n=job.compensation_samples, seq_len=job.seq_len, seed=config.seed)
    result = prune(model, calib, config=config, compensation_data=refit, progress=job.progress)
    heal_part = None
    if job.heal_options is not None:
        from llmrank.healcmd import group_linears, heal_slim

        healed, heal_part = heal_slim(result.model, model, tokenizer, job.heal_options, progress=job.progress,
                                      targets=group_linears(result.ir))
        result.model = healed.model  # what is exported: the pipeline's checks were of the model before the heal
    report = build_report(job, result, load_s)
    if heal_part is not None:
        relabel_after_heal(report, model, result.model, verification_sample(calib, config))
    with atomic_path(out, force=job.force) as tmp:
        tmp.mkdir(parents=True)
        if heal_part is not None:
            from llmrank.healcmd import write_heal_plot

            report["heal"] = heal_part
            report["timings_s"]["heal"] = heal_part["wall_seconds"]
            write_heal_plot(tmp, heal_part, f"{job.model}: heal after {config.scorer}, sparsity {config.sparsity}", report)
        failed = write_artifacts(tmp, job, result, tokenizer, report)
    if failed is not None:  # the folder is in place with what did work; the run still fails
        raise failed_artifact_error(out, job, report, failed)
    # paths in the report point at the final folder
    return json.loads((out / "report.json").read_text())


def verification_sample(calib: torch.Tensor, config: PruneConfig) -> tuple:
    """The inputs the pipeline verified and checked the outputs on (its first calibration batch, cut short)."""
    from llmrank.api import as_batches
    from llmrank.passes.pipeline import PruneState

    return PruneState(config=config, batches=tuple(as_batches(calib, batch_size=config.batch_size))).verification_inputs()


def relabel_after_heal(report: dict[str, Any], dense: torch.nn.Module, healed: torch.nn.Module, sample: tuple) -> None:
    """report["output_check"] of the healed model (what hf/ and onnx/ hold); the pipeline's
    verification and output check, both of the model before the heal, move to report["before_heal"].

    The shrunk == masked verification has no counterpart after a heal (the heal changes the
    weights), so report["verification"] becomes None.
    """
    from llmrank.ir.errors import VerificationError
    from llmrank.passes.verify import outputs

    before = {"verification": report.get("verification"), "output_check": report.get("output_check")}
    training = healed.training
    healed.eval()
    try:
        got, ref = outputs(healed, sample).double(), outputs(dense, sample).double()
    finally:
        healed.train(training)
    finite = bool(torch.isfinite(got).all())
    if not finite:
        raise VerificationError("the healed model produces NaN/Inf outputs on the verification sample: lower --heal-lr, "
                                "or drop --heal-bf16")
    relative = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    before_rel = (before["output_check"] or {}).get("relative_error")
    report["output_check"] = {"finite": finite, "relative_error": relative, "relative_error_without_refit": None,
                              "relative_error_before_heal": before_rel, "of": "the healed model"}
    report["verification"] = None
    report["before_heal"] = before
    report.setdefault("notes", []).append(
        "output_check is of the healed model that hf/ and onnx/ hold; verification (shrunk == masked dense) and the "
        "output check of the model before the heal are under before_heal")


def failed_artifact_error(out: Path, job: PruneJob, report: dict[str, Any], failed: BaseException) -> Exception:
    """The error a run ends with when an artefact failed after others were written and kept."""
    from llmrank.ir.errors import ExportError

    first = (str(failed).strip().splitlines() or [""])[0]
    kept = ", ".join(sorted(report["artifacts"])) or "nothing else"
    error = ExportError(f"genai/ was not built ({type(failed).__name__}: {first}); {out}/ holds the rest ({kept}) "
                        f"and report.json records the error under failed.genai")
    if "hf" in report["artifacts"]:
        error.hint = (f"fix the cause, then build it from the checkpoint: llmrank export {out / 'hf'} --genai {job.genai} "
                      f"--genai-device {job.genai_device} --out {out / 'genai'}")
    return error


def build_report(job: PruneJob, result: PruneResult, load_s: float) -> dict[str, Any]:
    from llmrank import __version__

    job_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(job).items() if k != "config"}
    return {
        "llmrank_version": __version__,
        "model": job.model,
        "preset": job.preset,
        "job": job_dict,
        "route": result.route,
        **result.to_dict(),
        "requested_sparsity": None if job.config.target_params is not None else job.config.sparsity,
        "requested_target_params": job.config.target_params,
        "effective_sparsity": result.config.get("effective_sparsity"),
        "timings_s": {"load": load_s, **result.timings},
        "artifacts": {},
    }


def _metadata(job: PruneJob, widths: dict[str, tuple[int, int]]) -> dict[str, Any]:
    c = job.config
    return {"source_model": job.model, "scorer": c.scorer, "representation": c.representation, "sparsity": c.sparsity,
            "pruner": c.pruner, "compensation": c.compensation, "layer_widths": {k: a for k, (_, a) in widths.items()},
            **({"head_sparsity": c.head_sparsity, "head_scorer": c.head_scoring} if c.heads else {})}


def _write_scores_and_plot(folder: Path, job: PruneJob, result: Any, report: dict[str, Any]) -> None:
    c = job.config
    tensors = {f"{name}": s.to(torch.float32).contiguous() for name, s in result.scores.groups.items()}
    tensors.update({f"{name}.kept": k.contiguous() for name, k in result.kept.items()})
    tensors.update({f"{name}.heads": s.to(torch.float32).contiguous() for name, s in result.scores.heads.items()})
    save_file(tensors, str(folder / "scores.safetensors"), metadata={"scorer": c.scorer})
    report["artifacts"]["scores"] = "scores.safetensors"
    title = f"{job.model}: {c.scorer}/{c.representation}, sparsity {c.sparsity}"
    if plot_prune(result.widths, result.scores.groups, folder / "plot.png", title) is not None:
        report["artifacts"]["plot"] = "plot.png"


def write_artifacts(folder: Path, job: PruneJob, result: PruneResult, tokenizer, report: dict[str, Any]) -> Exception | None:
    """scores.safetensors, plot.png, hf/, model.onnx, genai/ and report.json inside ``folder``.

    genai/ comes last and its failure does not discard the others: it is recorded in the
    report (``failed``) and returned, for the caller to fail the run after keeping the folder.
    """
    from llmrank.exporters.hf import check_reload, save_hf
    from llmrank.passes.heap import release_memory

    release_memory()  # the prune's freed memory goes back to the system before the writers' copies and reloads
    c = job.config
    metadata = _metadata(job, result.widths)
    _write_scores_and_plot(folder, job, result, report)
    if job.hf and c.mode != "mask-paper":
        saved = save_hf(result.model, tokenizer, folder / "hf", metadata=metadata)
        # reload it the way the report says it reloads, and compare with the model in memory
        diff = check_reload(folder / "hf", result.model, stock=saved.stock_loadable)
        report["artifacts"]["hf"] = {"path": "hf", "uniform": saved.uniform, "stock_loadable": saved.stock_loadable,
                                     "loader": "transformers" if saved.stock_loadable else "llmrank.load",
                                     "reload_max_abs_diff": diff}
    if job.onnx:
        report["artifacts"]["onnx"] = export_onnx_artifact(result.model, folder / "onnx" / "model.onnx", job, metadata)
        write_int8(folder, job, result.model, report)
    if job.gguf and "hf" in report["artifacts"]:
        write_gguf(folder, job, report)
    failed = None
    if job.genai:
        failed = try_genai(folder, job, folder / "hf" if "hf" in report["artifacts"] else result.model, tokenizer, report)
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    return failed


def write_gguf(folder: Path, job: PruneJob, report: dict[str, Any], check: bool = True) -> None:
    """gguf/model-<type>.gguf: llama.cpp's converter on the written hf/, read back and checked before it is kept."""
    from llmrank.exporters.gguf import export_gguf

    path = Path("gguf") / f"model-{job.gguf}.gguf"
    built = export_gguf(folder / "hf", folder / path, outtype=job.gguf, check=check)
    report["artifacts"]["gguf"] = {**built.to_dict(), "path": str(path)}
    report.setdefault("notes", []).extend(built.notes)
    if not check:
        report.setdefault("notes", []).append(f"{path} was not read back and compared: the check holds two fp32 copies "
                                              "of the slim model, more than the memory budget")


def write_genai(folder: Path, job: PruneJob, source, tokenizer, report: dict[str, Any]) -> None:
    """genai/: an onnxruntime-genai folder built by its own builder from ``source`` (a folder or model)."""
    from llmrank.exporters.genai import export_genai

    built = export_genai(source, folder / "genai", precision=job.genai, device=job.genai_device, tokenizer=tokenizer)
    report["artifacts"]["genai"] = {**built.to_dict(), "path": "genai"}


def try_genai(folder: Path, job: PruneJob, source, tokenizer, report: dict[str, Any]) -> Exception | None:
    """write_genai, with a failure recorded in the report and returned instead of raised."""
    try:
        write_genai(folder, job, source, tokenizer, report)
    except Exception as exc:  # noqa: BLE001 - any failure of the builder or its check: keep what was written
        report.setdefault("failed", {})["genai"] = {"precision": job.genai, "device": job.genai_device,
                                                    "error": f"{type(exc).__name__}: {exc}"}
        return exc
    return None


def write_int8(folder: Path, job: PruneJob, model, report: dict[str, Any]) -> None:
    """onnx/model.int8.onnx next to the exported ONNX file, when ``--quantize int8`` asks for it."""
    if job.quantize != "int8":
        return
    from llmrank.exporters.quantize import quantize_onnx

    q = quantize_onnx(folder / "onnx" / "model.onnx", folder / "onnx" / "model.int8.onnx", model)
    report["artifacts"]["onnx_int8"] = {**q.to_dict(), "path": "onnx/model.int8.onnx"}


def run_prune_layerwise(job: PruneJob, folder: Path, why: str) -> dict[str, Any]:
    """The job block by block (``llmrank.passes.blocks.driver``): the slim checkpoint is written as it
    is built; ONNX is exported from it only when it fits the memory budget."""
    from llmrank.data import calibration_tokens
    from llmrank.exporters.hf import load_hf
    from llmrank.models import check_seq_len, load_tokenizer, read_config
    from llmrank.layerwise import prune_layerwise
    from llmrank.memory import onnx_export_need, read_shape
    from llmrank.passes.blocks.checkpoint import Checkpoint, fp32_size

    out, config = Path(job.out), job.config
    refuse_input_overlap(out, folder)
    clock = time.perf_counter()
    model_config = read_config(str(folder))
    if model_config is not None:
        check_seq_len(model_config, job.seq_len)
    tokenizer = load_tokenizer(str(folder))
    load_s = time.perf_counter() - clock
    calib = calibration_tokens(tokenizer, job.calib, n=job.samples, seq_len=job.seq_len, seed=config.seed)
    refit = None
    if config.compensation != "none" and job.compensation_samples != job.samples:
        refit = calibration_tokens(tokenizer, job.calib, n=job.compensation_samples, seq_len=job.seq_len, seed=config.seed)
    budget = job.max_memory if job.max_memory is not None else available_memory()
    notes: list[str] = []
    genai_failure = None
    with atomic_path(out, force=job.force) as tmp:
        tmp.mkdir(parents=True)
        hf_dir = tmp / "hf"
        # the hidden states of the calibration batches get a quarter of the budget, then go to disk
        result = prune_layerwise(folder, calib, config=config, refit_ids=refit, out_dir=hf_dir, device=job.device,
                                 progress=job.progress, hidden_budget_bytes=budget / 4, metadata={"source_model": job.model})
        report = build_report(job, result, load_s)
        report["route"] = f"layerwise: {why}"
        report["notes"] = list(result.notes)
        _write_scores_and_plot(tmp, job, result, report)
        report["artifacts"]["hf"] = {"path": "hf", "uniform": result.uniform_width is not None,
                                     "stock_loadable": _stock_loadable(hf_dir), "loader": "transformers" if _stock_loadable(hf_dir) else "llmrank.load"}
        stored = Checkpoint(hf_dir).dtype().itemsize
        shape = read_shape(hf_dir)
        slim_need = onnx_export_need(fp32_size(hf_dir) // 4, layers=shape.layers if shape else 0, stored_bytes_per_param=stored)
        if job.gguf:  # the converter streams the checkpoint; its read-back check holds two fp32 copies
            write_gguf(tmp, job, report, check=2 * fp32_size(hf_dir) <= budget)
        exports = [flag for flag, asked in (("ONNX", job.onnx), ("--genai", job.genai)) if asked]
        if exports and slim_need > budget:
            notes.append(f"{' and '.join(exports)} skipped: the slim checkpoint needs about {slim_need / 1e9:.3g} GB in fp32 to "
                         f"export, more than the {budget / 1e9:.3g} GB budget; run `llmrank export {out / 'hf'} --out "
                         f"{out / 'onnx'}` on a larger machine")
        elif exports:
            slim = load_hf(hf_dir)  # in the checkpoint's dtype: the computation the run's sample logits came from
            report["artifacts"]["hf"]["reload_max_abs_diff"] = _check_layerwise_reload(slim, result, config)
            if job.onnx:
                report["artifacts"]["onnx"] = export_onnx_artifact(slim.float(), tmp / "onnx" / "model.onnx", job,
                                                                   _metadata(job, result.widths))
                write_int8(tmp, job, slim.float(), report)
            del slim
            if job.genai:  # last: a failed build keeps what was written
                genai_failure = try_genai(tmp, job, hf_dir, tokenizer, report)
        if not job.hf:
            import shutil

            shutil.rmtree(hf_dir)
            del report["artifacts"]["hf"]
        report["notes"] += notes
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    if genai_failure is not None:
        raise failed_artifact_error(out, job, report, genai_failure) from genai_failure
    return json.loads((out / "report.json").read_text())


def _stock_loadable(folder: Path) -> bool:
    info = json.loads((folder / "config.json").read_text()).get("llmrank") or {}
    return info.get("loader") != "llmrank.load"


def _check_layerwise_reload(slim, result, config: PruneConfig) -> float:
    """The reloaded checkpoint's logits on the verification sample against those the
    block-by-block run computed, within the verification bound."""
    from llmrank.exporters.hf import ReloadMismatchError

    if result.sample_logits is None:
        return float("nan")
    with torch.no_grad():
        got = slim(input_ids=result.sample_ids, use_cache=False).logits.float()
    ref = result.sample_logits.float()
    diff = float((got - ref).abs().max())
    bound = config.verify_atol + config.verify_rtol * float(ref.abs().max())
    if not diff <= bound:
        raise ReloadMismatchError(f"the written checkpoint's logits differ from the block-by-block run's by {diff:.3g} "
                                  f"(bound {bound:.3g}); please report this")
    return diff
