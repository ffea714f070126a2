"""ONNX export of (possibly shrunk) Hugging Face causal LMs, checked against PyTorch.

Two forms:

* logits-only (prefill): ``input_ids [batch, seq]``, ``attention_mask [batch, seq]``
  -> ``logits``.
* decoder with KV cache: ``input_ids``, ``attention_mask [batch, past+seq]``,
  ``position_ids [batch, seq]``, ``past_key_values.{i}.key/value [batch, kv_heads,
  past, head_dim]`` -> ``logits``, ``present.{i}.key/value``. The first step is fed
  an empty past (length 0); one graph serves prefill and decode.

Shapes of the MLPs come from the model's own weights (they may be narrower than the
config says, and differ per layer); only KV-cache shapes are probed, by running the
model once. The cache is rebuilt inside a wrapper from flat tensors, so no pytree
registration (a global side effect) is needed. Export goes to a staging folder,
is validated with onnxruntime, and only then moved into place.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_files, check_writable
from .hf import mlp_widths
from llmrank.ir.errors import ExportError

__all__ = [
    "OnnxExportResult",
    "OnnxValidationError",
    "export_onnx",
    "validate_onnx",
    "generate_onnx",
    "read_onnx_metadata",
    "onnx_target",
    "logit_agreement",
    "cast_copy",
    "ONNX_DTYPES",
]

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((2, 16), (1, 37), (1, 1))
# Above this many parameter bytes the weights go to `<name>.onnx.data` (protobuf caps a file at 2 GB).
EXTERNAL_DATA_BYTES = 1 << 30
#: The bound an fp16 file must meet against the fp32 PyTorch model on random token batches
#: (relative L2 error of the logits, share of positions with the same top-1 token). fp16
#: rounding alone gave 5e-4..9e-4 and full agreement on tiny Llama/Gemma-3 models.
FP16_MAX_RELATIVE_ERROR = 1e-2
FP16_MIN_TOP1_AGREEMENT = 0.95
#: dtypes an ONNX file can be written in (onnxruntime's CPU kernels have no bfloat16 MatMul).
ONNX_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class OnnxValidationError(ExportError):
    """onnxruntime disagrees with PyTorch beyond tolerance; `.diffs` holds every case."""

    def __init__(self, diffs: Mapping[str, float], atol: float, rtol: float = 0.0,
                 scales: Mapping[str, float] | None = None):
        self.diffs = dict(diffs)
        self.atol, self.rtol = atol, rtol
        scales = scales or {}
        worst = max(self.diffs, key=lambda k: self.diffs[k] - rtol * scales.get(k, 0.0))
        bound = f"atol {atol:g}" + (f" + rtol {rtol:g} x max|ref| {scales.get(worst, 0.0):.3g}" if rtol else "")
        super().__init__(
            f"ONNX output differs from PyTorch by {self.diffs[worst]:.3g} > {bound} ({worst}); all: {self.diffs}"
        )


@dataclass
class OnnxExportResult:
    """What was written and how well it matched PyTorch."""

    path: Path
    data_path: Path | None
    onnx_bytes: int
    data_bytes: int
    with_past: bool
    max_abs_diff: dict[str, float]
    export_seconds: float
    validate_seconds: float
    optimized: bool
    metadata: dict[str, str] = field(default_factory=dict)
    dtype: str = "float32"
    relative_error: float | None = None  # fp16 only: against the fp32 model (FP16_MAX_RELATIVE_ERROR)
    top1_agreement: float | None = None

    @property
    def total_bytes(self) -> int:
        return self.onnx_bytes + self.data_bytes


# ---------------------------------------------------------------- wrappers


class _LogitsOnly(nn.Module):
    """Prefill graph: no cache in or out (a returned Cache object cannot be exported)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _cache_from_flat(past: Sequence[torch.Tensor]) -> Any:
    """A DynamicCache of plain full layers holding `past` (k0, v0, k1, v1, ...).

    Built without the config on purpose: sliding-window layers would bake the
    window cut into the trace; plain layers keep the whole past and the model's
    sliding mask still applies the window (what transformers' own exporter patches in).
    """
    from transformers import DynamicCache

    pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
    return DynamicCache(ddp_cache_data=pairs)


def _flat_presents(cache: Any) -> list[torch.Tensor]:
    flat: list[torch.Tensor] = []
    for layer in cache.layers:
        flat += [layer.keys, layer.values]
    return flat


class _DecoderWithPast(nn.Module):
    """KV graph: flat past tensors in, logits and flat present tensors out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_cache_from_flat(past),
            use_cache=True,
        )
        return (out.logits, *_flat_presents(out.past_key_values))


# ---------------------------------------------------------------- shapes


def kv_layout(model: nn.Module) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) per cache layer, measured by one tiny forward (robust to
    per-layer head dims and families whose config names differ)."""
    with torch.no_grad():
        ids = torch.zeros(1, 2, dtype=torch.long)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in out.past_key_values.layers]


def _input_names(n_layers: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(n_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def _output_names(n_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _vocab(model: nn.Module) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` with floating parameters and buffers in ``dtype``; the caller's model
    is untouched. Each tensor is cast straight into the copy (no second full-precision copy);
    tied parameters stay tied."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo.setdefault(id(p), nn.Parameter(p.detach().to(dtype) if p.is_floating_point() else p.detach().clone(),
                                            requires_grad=False))
    for b in model.buffers():
        memo.setdefault(id(b), b.to(dtype) if b.is_floating_point() else b.clone())
    return copy.deepcopy(model, memo)


# ---------------------------------------------------------------- export


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Export and compare in eval mode (dropout off), restoring the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _export_program(model: nn.Module, with_past: bool, opset: int | None) -> Any:
    """torch.onnx.export (dynamo) with dynamic batch/seq/past; a sample batch of 2,
    and distinct sample sizes, so no axis gets specialised to its sample value."""
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("seq")
    vocab = _vocab(model)
    gen = torch.Generator().manual_seed(0)
    b, s = 2, 5
    ids = torch.randint(0, vocab, (b, s), generator=gen)
    kwargs: dict[str, Any] = dict(dynamo=True, opset_version=opset, verbose=False, external_data=False)
    if not with_past:
        mask = torch.ones(b, s, dtype=torch.long)
        return torch.onnx.export(
            _LogitsOnly(model).eval(),
            (ids, mask),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
            **kwargs,
        )
    layout = kv_layout(model)
    p = 3
    past_dim, total = Dim("past"), Dim("total")
    dtype = _param_dtype(model)
    past = []
    for heads, head_dim in layout:
        past += [torch.randn(b, heads, p, head_dim, generator=gen, dtype=torch.float32).to(dtype) for _ in range(2)]
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    shapes = (
        {0: batch, 1: seq},
        {0: batch, 1: total},
        {0: batch, 1: seq},
        tuple({0: batch, 2: past_dim} for _ in past),
    )
    return torch.onnx.export(
        _DecoderWithPast(model).eval(),
        (ids, mask, pos, *past),
        input_names=_input_names(len(layout)),
        output_names=_output_names(len(layout)),
        dynamic_shapes=shapes,
        **kwargs,
    )


def _llmrank_version() -> str:
    try:
        import llmrank

        return str(getattr(llmrank, "__version__", "unknown"))
    except ImportError:  # pragma: no cover
        return "unknown"


def _default_metadata(model: nn.Module, with_past: bool) -> dict[str, str]:
    """Facts read off the model (never recomputed scores): source, widths, eos."""
    meta = {
        "llmrank.version": _llmrank_version(),
        "llmrank.form": "decoder_with_past" if with_past else "logits",
        "layer_widths": json.dumps(mlp_widths(model), sort_keys=True),
    }
    source = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if source:
        meta["source_model"] = str(source)
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is not None:
        meta["eos_token_id"] = json.dumps(eos)
    return meta


def _as_strings(metadata: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}


def _stamp_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    """Write string key/values into `metadata_props`, leaving external weights where they are."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def _ort_optimize(src: Path, dst: Path, external: bool) -> None:
    """Let onnxruntime fuse/fold the graph offline and save the result (extended level:
    the output may use ORT contrib ops, so it is meant for onnxruntime)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    if external:
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def onnx_target(out: str | os.PathLike, name: str = "model.onnx") -> Path:
    """The file an export to `out` writes: `out/model.onnx` when `out` means a folder (a
    trailing slash, or an existing folder), else `out` itself. Path() drops a trailing
    slash, so callers must pass the user's text, not a Path made from it."""
    text = os.fspath(out)
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir():
        return path / name
    return path


def export_onnx(
    model: nn.Module,
    path: Path | str,
    *,
    with_past: bool,
    metadata: Mapping[str, Any] | None = None,
    opset: int | None = None,
    optimize: bool = False,
    force: bool | int = False,
    external_data: bool | None = None,
    validate_shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    atol: float = 1e-4,
    rtol: float = 0.0,
    dtype: torch.dtype | None = None,
) -> OnnxExportResult:
    """Export, validate against PyTorch, then move `.onnx` (+ `.onnx.data`) into place.

    `external_data=None` puts weights in `<path>.data` only for models whose exported
    weights reach 1 GiB (protobuf cannot hold more than 2 GB in one file).
    Raises `OnnxValidationError` (nothing left at `path`) if any validation case
    differs by more than `atol + rtol * max|PyTorch output|`.

    `dtype=torch.float32` exports an fp32 copy of a bf16/fp16 `model` (validated as above against
    that copy). `dtype=torch.float16` exports an fp16 copy (weights, activations and KV cache in
    fp16) and checks it against `model` itself, which should be fp32: fp16 is lossy, so the
    check is a bound on the relative logit error and the top-1 agreement
    (`FP16_MAX_RELATIVE_ERROR`, `FP16_MIN_TOP1_AGREEMENT`, an `ExportError` beyond it) and the
    max differences per case are reported, not bounded.
    """
    path = check_writable(path, force)
    data_path = path.with_name(path.name + ".data")
    if dtype is not None and dtype not in ONNX_DTYPES.values():
        raise ExportError(f"ONNX export in {dtype} is not supported: choose fp32 or fp16")
    exported = cast_copy(model, dtype) if dtype not in (None, _param_dtype(model)) else model
    # a cast to fp16 loses precision: checked against the caller's model within the fp16 bound;
    # a cast up to fp32 is exact: the fp32 copy is the reference, within atol/rtol
    lossy = _param_dtype(exported) == torch.float16 and _param_dtype(model) != torch.float16
    reference = model if lossy else exported
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in exported.parameters()) >= EXTERNAL_DATA_BYTES
    meta = _default_metadata(model, with_past)
    meta["dtype"] = str(_param_dtype(exported)).replace("torch.", "")
    meta.update(_as_strings(metadata or {}))

    agreement: tuple[float, float] | None = None
    with atomic_files([data_path, path], force=force) as staging, known_export_noise_hidden(), \
            _steps(f"ONNX export of {type(model).__name__}") as step:
        start = time.perf_counter()
        step("torch.export and conversion (about a minute for 100M+ parameters)")
        with _eval_mode(exported):
            program = _export_program(exported, with_past, opset)
        if lossy:
            del exported  # the check runs against the caller's model; the program holds the fp16 weights
        target = staging / path.name
        step("optimizing and saving" if optimize else "saving")
        if optimize:
            raw = staging / "unoptimized.onnx"
            program.save(str(raw), external_data=external_data)
            _ort_optimize(raw, target, external_data)
            for leftover in (raw, raw.with_name(raw.name + ".data")):
                leftover.unlink(missing_ok=True)
        else:
            program.save(str(target), external_data=external_data)
        _stamp_metadata(target, meta)
        export_seconds = time.perf_counter() - start

        start = time.perf_counter()
        step("checking onnxruntime against PyTorch")
        diffs = validate_onnx(reference, target, validate_shapes, with_past=with_past, atol=None if lossy else atol, rtol=rtol)
        if lossy:
            agreement = logit_agreement(reference, target)
            _check_fp16(*agreement)
        validate_seconds = time.perf_counter() - start

    has_data = data_path.exists()
    return OnnxExportResult(
        path=path,
        data_path=data_path if has_data else None,
        onnx_bytes=path.stat().st_size,
        data_bytes=data_path.stat().st_size if has_data else 0,
        with_past=with_past,
        max_abs_diff=diffs,
        export_seconds=export_seconds,
        validate_seconds=validate_seconds,
        optimized=optimize,
        metadata=meta,
        dtype=meta["dtype"],
        relative_error=agreement[0] if agreement else None,
        top1_agreement=agreement[1] if agreement else None,
    )


#: Loggers that print the same lines on every export: torch.onnx's registry lists the torchvision
#: ops it skips (torchvision is not a dependency), and transformers notes a renamed argument
#: that the traced forward still passes.
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration", "transformers.utils.generic")
#: Warnings torch.export and transformers raise on every export: known, and not the user's to act on.
_NOISY_WARNINGS = (".*axis name.*will not be used.*", ".*LeafSpec.*", ".*`past_key_values` is deprecated.*",
                   ".*torchvision.*")


@contextlib.contextmanager
def known_export_noise_hidden() -> Iterator[None]:
    """Hide the export's known, repeated warnings and log lines during the export only; any
    other warning still shows, and the loggers' levels are restored afterwards."""
    import logging

    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for message in _NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


@contextlib.contextmanager
def _steps(what: str) -> Iterator[Any]:
    """A progress bar over the export's steps (a minute without output looks like a hang);
    ``--quiet`` disables it with every other tqdm bar."""
    from tqdm.auto import tqdm

    bar = tqdm(total=3, desc=what, unit="step", leave=False, bar_format="{desc} ({n}/{total} steps, {elapsed})")
    started = False

    def step(name: str) -> None:
        nonlocal started
        if started:
            bar.update(1)
        started = True
        bar.set_description_str(f"{what}: {name}")

    try:
        yield step
        bar.update(bar.total - bar.n)
    finally:
        bar.close()


def _check_fp16(error: float, agreement: float) -> None:
    if not (error <= FP16_MAX_RELATIVE_ERROR and agreement >= FP16_MIN_TOP1_AGREEMENT):
        raise ExportError(f"the fp16 file is too far from the fp32 model: relative logit error {error:.3g} (bound "
                          f"{FP16_MAX_RELATIVE_ERROR}), top-1 agreement {agreement:.3f} (bound {FP16_MIN_TOP1_AGREEMENT}); "
                          "activations may overflow fp16's range: export in fp32 for this model")


# ---------------------------------------------------------------- onnxruntime side


def ort_session(path: Path | str, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _past_specs(session: Any) -> list[tuple[str, int, int, np.dtype]]:
    """(name, kv_heads, head_dim, dtype) of every past input, read from the graph."""
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
    specs = []
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            specs.append((inp.name, int(inp.shape[1]), int(inp.shape[3]), dtypes.get(inp.type, np.float32)))
    return specs


def has_past(session: Any) -> bool:
    return any(i.name.startswith("past_key_values.") for i in session.get_inputs())


def empty_past(session: Any, batch: int) -> dict[str, np.ndarray]:
    return {name: np.zeros((batch, heads, 0, dim), dtype=dt) for name, heads, dim, dt in _past_specs(session)}


def feed_from_presents(session: Any, outputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Map `present.{i}.*` outputs onto `past_key_values.{i}.*` inputs."""
    names = [o.name for o in session.get_outputs()]
    by_name = dict(zip(names, outputs))
    return {
        name: by_name[name.replace("past_key_values.", "present.", 1)]
        for name, *_ in _past_specs(session)
    }


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    ref = b.detach().float().numpy()
    return float(np.max(np.abs(a.astype(np.float32) - ref))) if ref.size else 0.0


def _scale(*refs: torch.Tensor) -> float:
    return max((float(r.detach().abs().max()) for r in refs if r.numel()), default=0.0)


def validate_onnx(
    model: nn.Module,
    path: Path | str,
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    *,
    with_past: bool | None = None,
    atol: float | None = 1e-4,
    rtol: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Max |onnxruntime - PyTorch| per case; raises `OnnxValidationError` above
    `atol + rtol * max|PyTorch output|` of that case (pass `atol=None` to only measure).
    fp32 kernels of two runtimes differ by summation order, which grows with the size of
    the values: a relative term keeps large-logit models from failing on rounding alone.

    Every shape is a prefill (empty past for the KV form). The KV form also runs a
    decode step fed with onnxruntime's own presents, compared with PyTorch given
    the same cache, so an error in the presents shows up in the next logits.
    """
    session = ort_session(path)
    if with_past is None:
        with_past = has_past(session)
    vocab = _vocab(model)
    gen = torch.Generator().manual_seed(seed)
    diffs: dict[str, float] = {}
    scales: dict[str, float] = {}
    with _eval_mode(model):
        for batch, seq in shapes:
            ids = torch.randint(0, vocab, (batch, seq), generator=gen)
            mask = torch.ones(batch, seq, dtype=torch.long)
            if not with_past:
                ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                (logits,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
                diffs[f"prefill_{batch}x{seq}"] = _max_diff(logits, ref)
                scales[f"prefill_{batch}x{seq}"] = _scale(ref)
                continue
            pos = torch.arange(seq).expand(batch, seq).contiguous()
            feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
            feed.update(empty_past(session, batch))
            outputs = session.run(None, feed)
            # A plain (non-sliding) cache, as in the graph: presents keep the whole past.
            ref = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=_cache_from_flat([]),
                use_cache=True,
            )
            case = f"{batch}x{seq}"
            diffs[f"prefill_{case}"] = _max_diff(outputs[0], ref.logits)
            scales[f"prefill_{case}"] = _scale(ref.logits)
            presents = _flat_presents(ref.past_key_values)
            diffs[f"present_{case}"] = max(_max_diff(o, r) for o, r in zip(outputs[1:], presents))
            scales[f"present_{case}"] = _scale(*presents)
            # One decode step on top of onnxruntime's presents.
            step = torch.randint(0, vocab, (batch, 1), generator=gen)
            past = feed_from_presents(session, outputs)
            feed = {
                "input_ids": step.numpy(),
                "attention_mask": np.ones((batch, seq + 1), dtype=np.int64),
                "position_ids": np.full((batch, 1), seq, dtype=np.int64),
                **past,
            }
            dec = session.run(None, feed)
            dtype = _param_dtype(model)  # an fp16 file's cache checked against an fp32 model: cast
            torch_past = _cache_from_flat([torch.from_numpy(past[n]).to(dtype) for n, *_ in _past_specs(session)])
            ref = model(
                input_ids=step,
                attention_mask=torch.from_numpy(feed["attention_mask"]),
                position_ids=torch.from_numpy(feed["position_ids"]),
                past_key_values=torch_past,
                use_cache=True,
            )
            presents = _flat_presents(ref.past_key_values)
            diffs[f"decode_{case}+1"] = max(
                _max_diff(dec[0], ref.logits), *(_max_diff(o, r) for o, r in zip(dec[1:], presents)),
            )
            scales[f"decode_{case}+1"] = _scale(ref.logits, *presents)
    if atol is not None and any(d > atol + rtol * scales.get(k, 0.0) or not np.isfinite(d) for k, d in diffs.items()):
        raise OnnxValidationError(diffs, atol, rtol, scales)
    return diffs


def logit_agreement(model: nn.Module, path: Path | str, *, shape: tuple[int, int] = (2, 32),
                    seed: int = 0) -> tuple[float, float]:
    """(relative L2 logit error, top-1 agreement) of an ONNX file against ``model`` on random ids:
    the check for lossy files (int8 weights, fp16), where bit-level bounds do not apply."""
    session = ort_session(path)
    batch, seq = shape
    ids = torch.randint(0, _vocab(model), shape, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, seq, dtype=torch.long)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    if has_past(session):
        feed["position_ids"] = torch.arange(seq).expand(batch, seq).contiguous().numpy()
        feed.update(empty_past(session, batch))
    got = torch.from_numpy(np.asarray(session.run(["logits"], feed)[0])).double()
    with _eval_mode(model), torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.double()
    error = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    agreement = float((got.argmax(-1) == ref.argmax(-1)).double().mean())
    return error, agreement


def read_onnx_metadata(path: Path | str) -> dict[str, str]:
    """The string key/values stored in the file's `metadata_props` (weights not loaded)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def _eos_ids(path: Path | str, eos_token_id: int | Sequence[int] | None | str) -> set[int]:
    if eos_token_id == "auto":
        raw = read_onnx_metadata(path).get("eos_token_id")
        eos_token_id = json.loads(raw) if raw else None
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


def generate_onnx(
    path: Path | str,
    prompt: Sequence[int] | str,
    max_new_tokens: int = 20,
    *,
    tokenizer: Any | None = None,
    eos_token_id: int | Sequence[int] | None | str = "auto",
) -> list[int]:
    """Greedy decoding in onnxruntime; returns the new token ids (prompt excluded).

    With a KV graph the prompt is one prefill on an empty past, then one token per
    step on the returned presents; a logits-only graph recomputes the whole sequence
    each step. Stops after an eos token (kept, as `model.generate` does); eos is read
    from the file's metadata unless given (`None` never stops early). A string
    prompt needs `tokenizer`.
    """
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer")
        prompt = tokenizer(prompt)["input_ids"]
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("empty prompt")
    stop = _eos_ids(path, eos_token_id)
    session = ort_session(path)
    kv = has_past(session)
    new: list[int] = []
    feed: dict[str, np.ndarray] = {
        "input_ids": np.asarray([ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
    }
    if kv:
        feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None, :]
        feed.update(empty_past(session, 1))
    for _ in range(max_new_tokens):
        outputs = session.run(None, feed)
        token = int(np.argmax(outputs[0][0, -1]))
        new.append(token)
        if token in stop:
            break
        total = len(ids) + len(new)
        if kv:
            feed = {
                "input_ids": np.asarray([[token]], dtype=np.int64),
                "attention_mask": np.ones((1, total), dtype=np.int64),
                "position_ids": np.asarray([[total - 1]], dtype=np.int64),
                **feed_from_presents(session, outputs),
            }
        else:
            feed = {
                "input_ids": np.asarray([ids + new], dtype=np.int64),
                "attention_mask": np.ones((1, total), dtype=np.int64),
            }
    return new
