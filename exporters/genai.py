"""onnxruntime-genai folders (model.onnx + genai_config.json + tokenizer) built by its own builder.

onnxruntime-genai ships a model builder that writes the graph its runtime expects
(GroupQueryAttention, KV cache shared between steps, MatMulNBits int4 weights) and the
genai_config.json that describes it. Writing that graph ourselves would duplicate a moving
target, so this module calls the builder's Python API and only adds what llmrank needs:

* Per-layer FFN widths. The builder reads one scalar ``intermediate_size`` and loads the
  weights with ``AutoModelForCausalLM.from_pretrained``, which cannot rebuild a model whose
  layers have different widths. For such a checkpoint we rebuild it with ``load_hf`` and hand
  the builder that in-memory model, through a subclass of its own architecture class that
  overrides ``load_weights`` (return our model) and ``make_mlp`` (use this layer's width for
  the shape annotations). The installed package is never modified. Uniform widths (and stock
  checkpoints) go through the builder's ``create_model`` unchanged.
* A check before the folder is moved into place: fp32 logits and greedy tokens from
  onnxruntime-genai must equal PyTorch's (to kernel rounding); int4/fp16 must agree with
  PyTorch's top-1 token on a stated share of positions (MIN_TOP1), and the measured numbers
  (top-1 agreement, mean KL divergence, largest logit difference) go into the result.
* Atomic output: the folder is built under a temporary name and renamed only when it passed.

onnxruntime-genai is optional: ``pip install 'llmrank[genai]'``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from llmrank.exporters.atomic import atomic_path, check_writable, refuse_input_overlap
from llmrank.exporters.hf import load_hf, save_hf
from llmrank.ir.errors import ConfigError, ExportError

__all__ = [
    "PRECISIONS",
    "DEVICES",
    "GenaiCheck",
    "GenaiExportResult",
    "GenaiValidationError",
    "export_genai",
    "validate_genai",
    "genai_logits_fn",
    "generate_genai",
    "is_genai_folder",
    "load_genai",
]

PRECISIONS = ("int4", "fp16", "fp32")
DEVICES = ("cpu", "cuda")
INSTALL_HINT = "pip install 'llmrank[genai]'  (onnxruntime-genai and onnx-ir, which its wheel needs but does not declare)"

# fp32: the bound the ONNX exporter uses (workflow.ONNX_ATOL/RTOL): kernel rounding only.
FP32_ATOL = 1e-3
FP32_RTOL = 1e-4
# int4/fp16: share of prompt positions whose top-1 token agrees with PyTorch's. This catches a
# broken build (wrong or misplaced weights agree on ~0 % of positions), not a quality loss:
# builder-default int4 measured 70 % on SmolLM2-135M and 58 % on a random tiny Llama (near-flat
# logits), fp16 100 % (tiny Llama, prefill). Quality is measured separately: perplexity of the deployed folder
# (benchmarks/bench_deploy.py). Raw logit differences are a poor criterion because a constant
# shift per position changes them but not the softmax; the mean KL divergence is recorded.
MIN_TOP1 = {"int4": 0.4, "fp16": 0.9}
# Greedy tokens may legitimately differ where PyTorch's two best logits are this close.
TIE_ATOL = 1e-4

# Short, varied texts: teacher-forced positions for the logit comparison and greedy prompts.
CHECK_PROMPTS = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "Photosynthesis is the process by which green plants use sunlight to make food from carbon dioxide and "
    "water. It takes place mostly in the leaves, where a green pigment called chlorophyll absorbs light. "
    "The oxygen that animals breathe is released as a by-product of",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\n"
    "for i in range(10):\n    print(",
)

# Architecture -> the builder's class that gets per-layer FFN widths (see the module docstring).
# Each was checked with different widths per layer on a tiny model (tests/test_genai.py); any
# other architecture the builder knows still works when all layers have one width.
_PER_LAYER_BUILDERS: dict[str, str] = {
    "LlamaForCausalLM": "LlamaModel",
    "MistralForCausalLM": "MistralModel",
    "Qwen2ForCausalLM": "QwenModel",
    "Qwen3ForCausalLM": "Qwen3Model",
    "GemmaForCausalLM": "GemmaModel",
}
_DOWN_NAMES = ("down_proj", "fc2", "dense_4h_to_h", "w2")


class GenaiValidationError(ExportError):
    """The onnxruntime-genai build disagrees with PyTorch beyond the stated bound; `.check` has the numbers."""

    def __init__(self, message: str, check: "GenaiCheck"):
        super().__init__(message)
        self.check = check


@dataclass
class GenaiCheck:
    """How the built folder compared with PyTorch on `prompts` prompts.

    Logits: teacher-forced, every prompt position: the largest |difference|, the mean KL
    divergence KL(PyTorch || genai) of the next-token distributions (nats), and the share of
    positions whose argmax agrees. Greedy: `new_tokens` tokens per prompt from both runtimes,
    compared up to the first tie (PyTorch's two best logits within TIE_ATOL), counted in `ties`.
    """

    precision: str
    prompts: int
    positions: int
    max_abs_diff: float
    mean_kl: float
    top1_agreement: float
    new_tokens: int
    greedy_equal: bool
    ties: int
    bound: str
    passed: bool
    seconds: float


@dataclass
class GenaiExportResult:
    """What was written, how it was built and how well it matched PyTorch."""

    path: Path
    precision: str
    device: str
    files: list[str]
    bytes: int
    layer_widths: dict[str, int]
    per_layer: bool
    build_seconds: float
    check: GenaiCheck | None
    builder_version: str
    extra_options: dict[str, Any] = field(default_factory=dict)
    log: str = field(default="", repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out.pop("log")
        return out


# ---------------------------------------------------------------- optional dependency


def _og() -> Any:
    """onnxruntime_genai, or an ImportError that says how to install it."""
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise ImportError(f"onnxruntime-genai is not installed: {INSTALL_HINT}") from exc
    return og


def _builder() -> Any:
    """onnxruntime_genai.models.builder (imports onnx_ir, which the wheel does not declare)."""
    _og()
    try:
        from onnxruntime_genai.models import builder
    except ImportError as exc:
        raise ImportError(f"onnxruntime-genai's model builder cannot be imported ({exc}): {INSTALL_HINT}") from exc
    return builder


def _version() -> str:
    og = _og()
    return str(getattr(og, "__version__", "unknown"))


# ---------------------------------------------------------------- building


def _mlp_width(mlp: nn.Module) -> int:
    """FFN width of one layer, read from its down projection (input features)."""
    for name in _DOWN_NAMES:
        proj = getattr(mlp, name, None)
        if isinstance(proj, nn.Linear):
            return proj.in_features
    raise ValueError(f"cannot find the down projection of {type(mlp).__name__} (looked for {', '.join(_DOWN_NAMES)})")


def _architecture(folder: Path) -> str:
    """config.json's first architecture: the builder picks its graph from it."""
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    if not archs:
        raise ValueError(
            f"{folder / 'config.json'} has no 'architectures' entry, from which onnxruntime-genai's builder picks "
            "the graph: save the model with save_pretrained or llmrank's save_hf, or add it (e.g. [\"LlamaForCausalLM\"])"
        )
    return str(archs[0])


def _check_per_layer_supported(folder: Path) -> str:
    """The architecture of a per-layer-width checkpoint, if the builder subclass supports it."""
    arch = _architecture(folder)
    if arch not in _PER_LAYER_BUILDERS:
        raise NotImplementedError(
            f"{arch} with different FFN widths per layer is not supported for onnxruntime-genai "
            f"(supported: {', '.join(sorted(_PER_LAYER_BUILDERS))}). Prune with one width for every layer "
            "(pruner='local') to export it, or export plain ONNX with export_onnx."
        )
    return arch


def _check_buildable(src: Path, device: str) -> None:
    """Refuse, before building, a checkpoint the builder would fail on or build wrongly."""
    config = json.loads((src / "config.json").read_text())
    if (config.get("llmrank") or {}).get("layer_heads"):
        raise NotImplementedError(
            "onnxruntime-genai's builder reads one query/KV head count from config.json, and this checkpoint's attention "
            "layers keep counts it does not hold (per-layer counts, or counts transformers' config refuses, listed under "
            "llmrank.layer_heads): export plain ONNX with export_onnx, or cut heads so that every layer keeps the same "
            "count and it divides hidden_size")
    problem = model_problem(config, device)
    if problem is not None:
        raise NotImplementedError(f"{problem}; export plain ONNX with export_onnx instead")


def _per_layer_class(builder: Any, architecture: str, weights: nn.Module) -> type:
    """The builder's class for `architecture`, extended to take `weights` from memory."""
    name = _PER_LAYER_BUILDERS[architecture]
    base = getattr(builder, name)

    class PerLayerWidths(base):  # type: ignore[misc, valid-type]
        """The builder's own class; weights come from memory and each MLP uses its own width."""

        def load_weights(self, input_path: str) -> nn.Module:
            return weights

        def make_mlp(self, layer_id: int, mlp: nn.Module, root_input: str) -> None:
            scalar = self.intermediate_size
            self.intermediate_size = _mlp_width(mlp)
            try:
                super().make_mlp(layer_id, mlp, root_input)
            finally:
                self.intermediate_size = scalar

    PerLayerWidths.__name__ = f"PerLayer{name}"
    return PerLayerWidths


def _create_per_layer(builder: Any, weights: nn.Module, src: Path, out: Path, precision: str, device: str,
                      cache: Path, options: dict[str, Any]) -> None:
    """The steps of builder.create_model for one architecture, with our in-memory weights.

    create_model picks the class from config.architectures inside its body, so the only way to
    give it other weights without changing the package is to run the same steps on our subclass.
    """
    effective = options.pop("_effective_builder_config", None)
    if effective is not None:
        precision = effective.precision
    details = options.pop("hf_details")
    extra_kwargs, hf_name, config = details["extra_kwargs"], details["hf_name"], details["hf_config"]
    quant = options.get("_quant_config")
    if quant is not None:
        io_dtype, onnx_dtype = quant.to_onnx_dtypes()
    else:
        io_dtype = builder.set_io_dtype(precision, device, options)
        onnx_dtype = builder.set_onnx_dtype(precision, options)
    cls = _per_layer_class(builder, config.architectures[0], weights)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    onnx_model = cls(config, io_dtype, onnx_dtype, device, str(cache), options)
    onnx_model.make_model(str(src))
    onnx_model.save_model(str(out))
    onnx_model.make_genai_config(config, extra_kwargs, str(out))
    onnx_model.save_processing(hf_name, extra_kwargs, str(out))


def _flat_rope(config: Any) -> None:
    """Give the builder the rope fields it reads, on a config that nests them per layer type.

    transformers 5 writes Gemma-3's rope as ``rope_parameters = {"full_attention": {...},
    "sliding_attention": {...}}``; onnxruntime-genai 0.18's Gemma3 builder reads the flat
    transformers-4 form (``rope_parameters["rope_type"]``, ``rope_theta`` and
    ``rope_local_base_freq`` for the sliding layers) and fails with KeyError 'rope_type'. This
    writes that form on the builder's in-memory copy of the config (the checkpoint is untouched);
    the check against PyTorch after the build proves the caches it makes.
    """
    rope = getattr(config, "rope_parameters", None)
    nested = isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values())
    if not nested or "full_attention" not in rope:
        return
    full, sliding = dict(rope["full_attention"]), rope.get("sliding_attention")
    config.rope_parameters = full
    config.rope_theta = full.get("rope_theta", 10000.0)
    if sliding is not None:
        config.rope_local_base_freq = sliding.get("rope_theta", config.rope_theta)


def _run_builder(src: Path, out: Path, precision: str, device: str, cache: Path, weights: nn.Module | None,
                 extra_options: Mapping[str, Any]) -> None:
    builder = _builder()
    pairs = [f"{k}={v}" for k, v in extra_options.items()]
    # A local folder as input_path and no model name: the builder reads only that folder.
    options = builder.parse_extra_options(None, str(src), str(out), precision, device, str(cache), pairs)
    _flat_rope(options["hf_details"]["hf_config"])
    if weights is None:
        builder.create_model(None, str(src), str(out), precision, device, str(cache), **options)
    else:
        _create_per_layer(builder, weights, src, out, precision, device, cache, options)


@contextlib.contextmanager
def _captured(verbose: bool) -> Iterator[io.StringIO]:
    """The builder prints every step and progress bar, and the int4 quantizers log one INFO line
    per node; keep the prints for error messages and drop INFO logs, unless verbose."""
    buf = io.StringIO()
    if verbose:
        yield buf
        return
    disabled = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf
    finally:
        logging.disable(disabled)


@contextlib.contextmanager
def _root_logger_kept() -> Iterator[None]:
    """onnxruntime's int4 quantizer calls logging.basicConfig(level=INFO) when it is imported
    (by the builder): undo that, or every later INFO record of the process reaches stderr."""
    handlers, level = list(logging.root.handlers), logging.root.level
    try:
        yield
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _tokenizer_object(tokenizer: Any, fallback: Path | None) -> Any:
    """A tokenizer with save_pretrained, from an object, a folder, or the model's own folder."""
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    folder = Path(tokenizer) if tokenizer is not None else fallback
    if folder is None or not _has_tokenizer(folder):
        raise ValueError(
            "onnxruntime-genai's builder copies the tokenizer into the folder it writes, and none was found: "
            "pass tokenizer= (a tokenizer object or a folder that holds one)"
        )
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _checkpoint_widths(folder: Path) -> dict[str, int]:
    """FFN width of every layer, read from the down projections' tensor shapes in the
    safetensors files (no weights loaded), keyed like mlp_widths ("model.layers.0.mlp")."""
    from safetensors import safe_open

    widths: dict[str, int] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                parts = key.split(".")
                if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in _DOWN_NAMES:
                    shape = f.get_slice(key).get_shape()
                    if len(shape) == 2:
                        widths[".".join(parts[:-2])] = int(shape[1])
    return dict(sorted(widths.items(), key=lambda kv: [int(t) if t.isdigit() else t for t in kv[0].split(".")]))


def _model_folder_name(model: nn.Module) -> Path | None:
    name = getattr(model, "name_or_path", None) or ""
    return Path(name) if name and Path(name).is_dir() else None


def _source_folder(model_or_folder: nn.Module | str | Path, tokenizer: Any, work: Path) -> Path:
    """The folder the builder reads: a module is saved there with save_hf; a folder is used as
    is, or its files are linked next to the given tokenizer."""
    if isinstance(model_or_folder, nn.Module):
        tok = _tokenizer_object(tokenizer, _model_folder_name(model_or_folder))
        src = work / "hf"
        save_hf(model_or_folder, tok, src)
        return src
    folder = Path(model_or_folder).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if tokenizer is None:
        if not _has_tokenizer(folder):
            _tokenizer_object(None, None)  # raises the explanation
        return folder
    src = work / "hf"
    src.mkdir(parents=True)
    for item in folder.iterdir():
        if not item.name.startswith("tokenizer") and item.name != "special_tokens_map.json":
            (src / item.name).symlink_to(item.resolve())
    _tokenizer_object(tokenizer, None).save_pretrained(src)
    return src


@contextlib.contextmanager
def _reference(model_or_folder: nn.Module | str | Path, src: Path) -> Iterator[nn.Module]:
    """The PyTorch model the build is checked against, in eval mode: the caller's float32 module
    (its training flag restored afterwards), else the checkpoint rebuilt in float32 by load_hf,
    which reads the safetensors itself, independently of the builder."""
    module = model_or_folder if isinstance(model_or_folder, nn.Module) else None
    if module is None or any(p.dtype != torch.float32 for p in module.parameters()):
        yield load_hf(src, dtype=torch.float32)
        return
    training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(training)


#: onnxruntime's CPU GroupQueryAttention kernel, the attention the builder emits for CPU graphs,
#: refuses other head sizes at the first run ("head_size shall be a multiple of 16", 0.18).
CPU_HEAD_MULTIPLE = 16


def builder_architectures() -> set[str]:
    """The config.architectures names the installed builder's create_model dispatches on
    (read from its source, so a newer builder's list is used as it is); empty if unreadable."""
    import inspect
    import re

    try:
        source = inspect.getsource(_builder().create_model)
    except (OSError, TypeError):  # pragma: no cover - no source shipped
        return set()
    return set(re.findall(r'architectures\[0\]\s*==\s*"(\w+)"', source))


def _field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def model_problem(config: Any, device: str, *, architecture: str | None = None) -> str | None:
    """Why the builder cannot make a working folder of a model with this config (None: it can).

    Read from the config alone (no weights), so ``llmrank prune --genai`` refuses before the
    prune instead of after it. ``config``: a transformers config or a config.json dict.
    """
    archs = _field(config, "architectures") or ([architecture] if architecture else [])
    known = builder_architectures()
    if archs and known and archs[0] not in known:
        return (f"onnxruntime-genai {_version()}'s model builder does not build {archs[0]} (it builds "
                f"{', '.join(sorted(a for a in known if a.endswith('CausalLM')))}, ...)")
    text = config.get("text_config") or config if isinstance(config, Mapping) else _text(config)
    head_dim = _field(text, "head_dim")
    hidden, heads = _field(text, "hidden_size"), _field(text, "num_attention_heads")
    if not isinstance(head_dim, int) and isinstance(hidden, int) and isinstance(heads, int) and heads:
        head_dim = hidden // heads
    if device == "cpu" and isinstance(head_dim, int) and head_dim % CPU_HEAD_MULTIPLE:
        return (f"head_dim {head_dim} is not a multiple of {CPU_HEAD_MULTIPLE}, which onnxruntime's CPU "
                "GroupQueryAttention (the attention the builder emits) requires")
    return None


def _text(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def check_model(config: Any, device: str, *, architecture: str | None = None, flag: str = "--genai") -> None:
    """ConfigError when :func:`model_problem` finds one, with the way out; needs the extra."""
    try:
        _builder()
    except ImportError as exc:
        raise ConfigError(f"{flag} needs onnxruntime-genai: {INSTALL_HINT}") from exc
    problem = model_problem(config, device, architecture=architecture)
    if problem is not None:
        raise ConfigError(f"{flag}: {problem}; drop {flag} and deploy the ONNX export (onnx/) instead")


def check_options(precision: str, device: str) -> None:
    """Refuse a precision/device pair before any work (the CLI calls this before loading)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if precision == "fp16" and device == "cpu":
        raise ConfigError(
            "fp16 is built for CUDA only (device='cuda'): an fp16 CPU build of onnxruntime-genai 0.18 fails at its "
            "first decode step (buffer shape mismatch in a cast onnxruntime inserts). On CPU use int4 or fp32")


def export_genai(
    model_or_folder: nn.Module | str | Path,
    out_dir: str | Path,
    *,
    precision: str = "int4",
    device: str = "cpu",
    tokenizer: Any | None = None,
    force: bool = False,
    check: bool = True,
    extra_options: Mapping[str, Any] | None = None,
    verbose: bool = False,
) -> GenaiExportResult:
    """Build a ready onnxruntime-genai folder (model.onnx(.data), genai_config.json, tokenizer) at `out_dir`.

    `model_or_folder`: a (slim) causal LM, or a Hugging Face folder, slim ones written by
    `save_hf` included. `precision` int4 (the builder's MatMulNBits, 4 bits, block 32), fp16 or
    fp32; `device` is the execution provider the graph is built for. `tokenizer` (object or
    folder) is needed when the model's folder has none. With `check` the folder is compared with
    PyTorch before it is moved into place (see `validate_genai`); `GenaiValidationError` leaves
    nothing at `out_dir`. A check of a CUDA build needs onnxruntime-genai with CUDA here.
    `extra_options` go to the builder as its KEY=VALUE options (e.g. {"accuracy_level": 1},
    {"algo_config": "k_quant_last"}); its defaults are used otherwise.
    """
    check_options(precision, device)
    with _root_logger_kept():
        return _export(model_or_folder, out_dir, precision=precision, device=device, tokenizer=tokenizer, force=force,
                       check=check, extra_options=extra_options, verbose=verbose)


def _export(model_or_folder: nn.Module | str | Path, out_dir: str | Path, *, precision: str, device: str, tokenizer: Any | None,
            force: bool | int, check: bool, extra_options: Mapping[str, Any] | None, verbose: bool) -> GenaiExportResult:
    _builder()  # fail before any work when the extra is missing
    out_dir = check_writable(out_dir, force)
    if not isinstance(model_or_folder, nn.Module):
        refuse_input_overlap(out_dir, model_or_folder)
    else:
        refuse_input_overlap(out_dir, _model_folder_name(model_or_folder))

    with tempfile.TemporaryDirectory(prefix="llmrank-genai-") as scratch:
        work = Path(scratch)
        src = _source_folder(model_or_folder, tokenizer, work)
        _check_buildable(src, device)
        widths = _checkpoint_widths(src)
        per_layer = len(set(widths.values())) > 1
        _check_per_layer_supported(src) if per_layer else _architecture(src)
        weights = load_hf(src, dtype=torch.float32) if per_layer else None
        options = {str(k): v for k, v in (extra_options or {}).items()}
        with atomic_path(out_dir, force=force) as tmp:
            start = time.perf_counter()
            with _captured(verbose) as buf:
                try:
                    _run_builder(src, tmp, precision, device, work / "cache", weights, options)
                except Exception as exc:
                    what = type(model_or_folder).__name__ if isinstance(model_or_folder, nn.Module) else str(model_or_folder)
                    raise RuntimeError(
                        f"onnxruntime-genai's builder failed on {what} ({precision}, {device}): {type(exc).__name__}: {exc}\n"
                        f"last builder output:\n{buf.getvalue()[-2000:]}"
                    ) from exc
                log = buf.getvalue()
            build_seconds = time.perf_counter() - start
            del weights
            result_check = None
            if check:
                with _reference(model_or_folder, src) as reference:
                    result_check = validate_genai(tmp, reference, precision=precision, device=device)
                if not result_check.passed:
                    raise GenaiValidationError(
                        f"onnxruntime-genai {precision} build differs from PyTorch beyond its bound ({result_check.bound}): "
                        f"top-1 agreement {result_check.top1_agreement:.3f}, mean KL {result_check.mean_kl:.3g} nats, "
                        f"max |logit diff| {result_check.max_abs_diff:.3g}, greedy equal {result_check.greedy_equal}",
                        result_check,
                    )
    files = sorted(p.name for p in out_dir.iterdir())
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    return GenaiExportResult(
        path=out_dir, precision=precision, device=device, files=files, bytes=size, layer_widths=widths,
        per_layer=per_layer, build_seconds=build_seconds, check=result_check, builder_version=_version(),
        extra_options=options, log=log,
    )


# ---------------------------------------------------------------- runtime side


def is_genai_folder(path: str | Path) -> bool:
    """True for a folder that onnxruntime-genai can load (it has genai_config.json)."""
    return (Path(path) / "genai_config.json").is_file()


def load_genai(folder: str | Path, *, threads: int | None = None, device: str | None = None) -> Any:
    """og.Model for a folder; `threads` sets onnxruntime's intra-op threads, `device="cpu"`
    drops the providers the folder was built for."""
    og = _og()
    folder = Path(folder)
    if not is_genai_folder(folder):
        raise FileNotFoundError(f"{folder} is not an onnxruntime-genai folder (no genai_config.json); build one with export_genai")
    config = og.Config(str(folder))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
    if device == "cpu":
        config.clear_providers()
    elif device is not None and device != "cpu":
        config.clear_providers()
        config.append_provider(device)
    return og.Model(config)


def _genai_config(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "genai_config.json").read_text())


def _eos_ids(folder: str | Path) -> set[int]:
    eos = _genai_config(folder)["model"].get("eos_token_id")
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def _window(folder: str | Path) -> int:
    """The sliding window of a folder's local layers (0: none).

    With the builder's default window-sized KV cache (Gemma-3), onnxruntime's attention refuses
    a generator whose max_length is below the window ("KV cache capacity (20) must be at least
    local_window_size (512)"), so every generator here asks for at least this length.
    """
    model = _genai_config(folder)["model"]
    window = int(((model.get("decoder") or {}).get("sliding_window") or {}).get("window_size") or 0)
    context = int(model.get("context_length") or window)
    return min(window, context)  # a window past the context (Mistral's 4096 of 512) caps at the context


def _prefill_logits(model: Any, ids: np.ndarray, min_length: int = 0) -> np.ndarray:
    """float32 logits [B, T, V] of one prefill (the builder's graph returns every position)."""
    og = _og()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(int(ids.shape[1]), min_length), batch_size=int(ids.shape[0]))
    generator = og.Generator(model, params)
    generator.append_tokens(ids.astype(np.int32))
    logits = np.asarray(generator.get_output("logits"))
    if logits.shape[:2] != ids.shape:
        raise RuntimeError(f"onnxruntime-genai returned logits of shape {logits.shape} for input {ids.shape}")
    return logits.astype(np.float32)


def genai_logits_fn(folder: str | Path, *, threads: int | None = None, device: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """An llmrank.evaluate LogitsFn (input_ids [B, T] -> float logits [B, T, V]) for a genai folder.

    Each call is one prefill through onnxruntime-genai's Generator, so perplexity and
    multiple-choice scores measure the deployed artefact itself (int4 weights, its attention
    kernels). The model is loaded once; `threads`: onnxruntime intra-op threads.
    """
    model = load_genai(folder, threads=threads, device=device)
    window = _window(folder)

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.detach().cpu().numpy()
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"expected token ids [batch, seq>0], got shape {tuple(ids.shape)}")
        return torch.from_numpy(_prefill_logits(model, ids, window))

    return fn


def generate_genai(
    folder: str | Path,
    prompt: Sequence[int] | str,
    max_new_tokens: int = 20,
    *,
    tokenizer: Any | None = None,
    threads: int | None = None,
    device: str | None = None,
    model: Any | None = None,
) -> list[int]:
    """Greedy decoding with onnxruntime-genai; returns the new token ids (prompt excluded).

    Stops after an eos token of genai_config.json (kept, as `model.generate` does). A string
    prompt is encoded with `tokenizer` (a transformers tokenizer) or, without one, with the
    folder's own tokenizer through og.Tokenizer. `model`: an already loaded og.Model.
    """
    og = _og()
    model = model if model is not None else load_genai(folder, threads=threads, device=device)
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt)["input_ids"]) if tokenizer is not None else list(og.Tokenizer(model).encode(prompt))
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("empty prompt")
    if max_new_tokens < 1:
        return []
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(len(ids) + max_new_tokens, _window(folder)), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    new: list[int] = []
    while not generator.is_done() and len(new) < max_new_tokens:
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    return new


# ---------------------------------------------------------------- check against PyTorch


def _torch_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        device = next(model.parameters()).device
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return out.logits[0].float().cpu()


def _torch_greedy(model: nn.Module, ids: list[int], steps: int, stop: set[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens by recomputing the whole sequence each step (no cache: independent of any
    KV-cache logic), with the logits of every step for the tie check."""
    new: list[int] = []
    rows: list[torch.Tensor] = []
    for _ in range(steps):
        row = _torch_logits(model, ids + new)[-1]
        rows.append(row)
        new.append(int(row.argmax()))
        if new[-1] in stop:
            break
    return new, rows


def _compare_greedy(ref: list[int], rows: list[torch.Tensor], got: list[int]) -> tuple[bool, int]:
    """(equal up to the first tie, number of ties): a differing token where PyTorch's top two
    logits are within TIE_ATOL is a tie, and both runs may then continue differently."""
    for step, (a, row) in enumerate(zip(ref, rows)):
        if step >= len(got):
            return False, 0
        if got[step] != a:
            gap = float(row[a] - row[got[step]])
            return (True, 1) if gap <= TIE_ATOL else (False, 0)
    return len(got) == len(ref), 0


def _check_prompts(folder: Path, vocab: int, seed: int = 0) -> list[list[int]]:
    """The CHECK_PROMPTS through the folder's tokenizer, or random ids when it has none that loads."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        prompts = [list(tok(text)["input_ids"]) for text in CHECK_PROMPTS]
        if all(prompts) and max(max(p) for p in prompts) < vocab:
            return prompts
    except Exception:  # noqa: BLE001 - a folder without a usable tokenizer still gets checked
        pass
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in (7, 19, 33)]


def validate_genai(
    folder: str | Path,
    reference: nn.Module,
    *,
    precision: str,
    device: str = "cpu",
    prompts: Sequence[Sequence[int]] | None = None,
    new_tokens: int = 8,
    min_top1: float | None = None,
) -> GenaiCheck:
    """Compare an onnxruntime-genai folder with the PyTorch model it was built from.

    Bound: fp32: every logit within FP32_ATOL + FP32_RTOL x max|PyTorch logit| and greedy tokens
    equal (up to exact ties); int4/fp16: top-1 agreement at least `min_top1` (default MIN_TOP1).
    The measured numbers are returned either way; `passed` says whether the bound held.
    """
    start = time.perf_counter()
    folder = Path(folder)
    try:
        model = load_genai(folder, device=device)
    except Exception as exc:
        raise RuntimeError(
            f"cannot load the {device} build in onnxruntime-genai on this machine ({exc}); "
            "check it where that device is available, or pass check=False"
        ) from exc
    vocab = int(_genai_config(folder)["model"]["vocab_size"])
    prompts = [list(map(int, p)) for p in prompts] if prompts is not None else _check_prompts(folder, vocab)
    stop = _eos_ids(folder)
    diffs, refs, kls, agree = [], [], [], []
    greedy_equal, ties = True, 0
    for ids in prompts:
        got = torch.from_numpy(_prefill_logits(model, np.asarray([ids]), _window(folder)))[0]
        ref = _torch_logits(reference, ids)
        diffs.append((got - ref).abs().max())
        refs.append(ref.abs().max())
        logp, logq = ref.log_softmax(-1), got.log_softmax(-1)
        kls.append((logp.exp() * (logp - logq)).sum(-1))
        agree.append((got.argmax(-1) == ref.argmax(-1)).float())
        ref_tokens, rows = _torch_greedy(reference, ids, new_tokens, stop)
        equal, tie = _compare_greedy(ref_tokens, rows, generate_genai(folder, ids, new_tokens, model=model))
        greedy_equal &= equal
        ties += tie
    max_abs = float(torch.stack(diffs).max())
    mean_kl = float(torch.cat(kls).mean())
    top1 = float(torch.cat(agree).mean())
    if precision == "fp32":
        limit = FP32_ATOL + FP32_RTOL * float(torch.stack(refs).max())
        bound = f"max |logit diff| <= {FP32_ATOL:g} + {FP32_RTOL:g} x max|ref| = {limit:.3g} and greedy tokens equal"
        passed = max_abs <= limit and greedy_equal
    else:
        limit = MIN_TOP1[precision] if min_top1 is None else min_top1
        bound = f"top-1 agreement >= {limit:g}"
        passed = top1 >= limit
    return GenaiCheck(
        precision=precision, prompts=len(prompts), positions=int(sum(len(p) for p in prompts)), max_abs_diff=max_abs,
        mean_kl=mean_kl, top1_agreement=top1, new_tokens=new_tokens, greedy_equal=greedy_equal,
        ties=ties, bound=bound, passed=passed, seconds=time.perf_counter() - start,
    )
