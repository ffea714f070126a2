"""GGUF files for llama.cpp, written by llama.cpp's own converter.

GGUF is a moving format with per-architecture conventions (tensor names, metadata keys,
tokenizer pre-processing hashes), so llmrank does not write it: it runs the converter that
llama.cpp ships, ``convert_hf_to_gguf.py``, on a slim Hugging Face folder written by
``save_hf``. The converter (with its ``conversion/`` package and its matching ``gguf-py``) is
taken from the llama-cpp-python sdist, which vendors llama.cpp: the sdist is downloaded once
with pip (no compile: only the three pure-Python pieces are extracted) into llmrank's cache.

* The converter runs in a child process (``python -m llmrank.exporters.gguf``), so its
  ``gguf-py`` is on that process's path only and never shadows the installed ``gguf``.
  One behaviour is adjusted there, not in the extracted files: llama.cpp imports
  sentencepiece before it checks that a ``tokenizer.model`` exists, so a folder with only a
  ``tokenizer.json`` would need sentencepiece for nothing; the check is made first.
* Uniform widths and heads only: llama.cpp's ``llama`` architecture takes one FFN width and
  one head count, so a checkpoint with per-layer ones is refused before any work
  (``--allocation uniform`` is the way out).
* f32/f16/bf16/q8_0 come from the converter. K-quants (q4_k_m, ...) need llama.cpp's
  compiled quantizer, reached through llama-cpp-python (``pip install 'llmrank[gguf]'``).
* Checked before it is moved into place: the written file is read back by transformers'
  GGUF loader (an independent reader) and its logits are compared with the slim PyTorch
  model's; its tokenizer must give the same ids as the HF tokenizer on sample text.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmrank.exporters.atomic import atomic_path
from llmrank.ir.errors import ConfigError, ExportError, InputError

if TYPE_CHECKING:  # torch is imported where a check runs: the CLI reads OUTTYPES without it
    import torch

__all__ = [
    "LLAMA_CPP_PYTHON",
    "CONVERTER_TYPES",
    "KQUANT_TYPES",
    "row_multiple",
    "alignment_note",
    "OUTTYPES",
    "ConverterUnavailableError",
    "GgufCheck",
    "GgufExportResult",
    "GgufValidationError",
    "converter_dir",
    "check_outtype",
    "gguf_layout",
    "check_prune_options",
    "export_gguf",
    "validate_gguf",
]

#: The llama-cpp-python release whose sdist supplies llama.cpp's converter (and, installed
#: through the `gguf` extra, the compiled quantizer). One pin, so converter and runtime agree.
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
#: What the converter writes by itself (no compiled code).
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
#: llama.cpp's K-quants and the llama_ftype number llama_model_quantize takes for each.
KQUANT_TYPES = {"q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
                "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
OUTTYPES = CONVERTER_TYPES + tuple(KQUANT_TYPES)
_SDIST_ROOT = "vendor/llama.cpp/"
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE",
            "models/ggml-vocab-qwen2.gguf")  # llama.cpp's vocab-only test file: a real Qwen2 tokenizer for tests
_SAMPLE_TEXT = ("The quick brown fox jumps over the lazy dog. Pruning keeps 70 % of the FFN; "
                "naïve café — 12345 tokens! def f(x):\n    return x * 2\n")


class ConverterUnavailableError(ConfigError):
    """llama.cpp's converter could not be obtained (no network to PyPI, or a damaged download)."""


class GgufValidationError(ExportError):
    """The written GGUF does not read back into the model it was written from."""


# --------------------------------------------------------------------------- the converter


def _version() -> str:
    return LLAMA_CPP_PYTHON.partition("==")[2]


def _manual_fetch_hint(folder: Path) -> str:
    return (f"on a machine with network run: pip download {LLAMA_CPP_PYTHON} --no-deps --no-binary llama-cpp-python "
            f"-d {folder}  (it downloads the sdist only; nothing is compiled), then retry")


def converter_dir(*, download: bool = True) -> Path:
    """The folder holding llama.cpp's ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/``.

    Extracted once from the llama-cpp-python sdist into ``<cache>/llama.cpp/<version>``; the
    sdist is fetched with pip into ``<cache>/wheels`` when it is not there (download=False
    refuses instead). $LLMRANK_LLAMA_CPP may name a llama.cpp checkout to use as it is.
    """
    from llmrank.cache import atomic_dir, cache_dir, log

    override = os.environ.get("LLMRANK_LLAMA_CPP")
    if override:
        folder = Path(override).expanduser()
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise ConverterUnavailableError(f"$LLMRANK_LLAMA_CPP={override} has no convert_hf_to_gguf.py: "
                                            "point it at a llama.cpp checkout, or unset it")
        return folder
    final = cache_dir() / "llama.cpp" / _version()
    if (final / "convert_hf_to_gguf.py").is_file() and (final / "gguf-py").is_dir():
        return final
    sdist = _sdist(download=download)
    log(f"extracting llama.cpp's converter from {sdist.name} ...")
    with atomic_dir(final) as tmp:
        _extract_converter(sdist, tmp)
    return final


def _sdist(*, download: bool) -> Path:
    """The cached llama-cpp-python sdist, downloaded with pip when missing and allowed."""
    from llmrank.cache import _find_download, cache_dir, pip_download

    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = _find_download(wheels, LLAMA_CPP_PYTHON)
    if found is None and not download:
        raise ConverterUnavailableError(f"llama.cpp's converter is not in the cache; {_manual_fetch_hint(wheels)}")
    if found is None:
        try:
            found = pip_download(LLAMA_CPP_PYTHON, no_binary=True)
        except RuntimeError as exc:
            raise ConverterUnavailableError(
                f"could not download {LLAMA_CPP_PYTHON}'s sdist (llama.cpp's converter comes from it): "
                f"{str(exc).splitlines()[0]} {_manual_fetch_hint(wheels)}") from exc
    if not found.name.endswith(".tar.gz"):
        raise ConverterUnavailableError(f"{found} is not the llama-cpp-python sdist (.tar.gz); delete it, then "
                                        f"{_manual_fetch_hint(wheels)}")
    return found


def _extract_converter(sdist: Path, dest: Path) -> None:
    """Copy the converter's pure-Python files out of the sdist (nothing else, nothing built)."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            top = tar.getmembers()[0].name.split("/")[0]
            prefix = f"{top}/{_SDIST_ROOT}"
            members = []
            for member in tar.getmembers():
                if not member.name.startswith(prefix) or not (member.isfile() or member.isdir()):
                    continue
                rel = member.name[len(prefix):]
                if any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in _MEMBERS):
                    member.name = rel
                    members.append(member)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ConverterUnavailableError(f"cannot read {sdist} ({exc}); delete it and retry") from exc
    if not (dest / "convert_hf_to_gguf.py").is_file() or not (dest / "gguf-py" / "gguf").is_dir():
        raise ConverterUnavailableError(f"{sdist} holds no {_SDIST_ROOT}convert_hf_to_gguf.py with gguf-py; "
                                        f"is it the llama-cpp-python sdist ({LLAMA_CPP_PYTHON})?")


def _run_converter_here(folder: Path, layout: str, argv: list[str]) -> None:
    """Child-process entry: llama.cpp's converter with its own gguf-py, adjusted as the module says."""
    sys.path[:0] = [str(folder / "gguf-py"), str(folder)]
    from conversion import base  # llama.cpp's package (the converter dir is first on the path)

    if layout == "deci":
        _convert_llama_as_deci(base)

    original = base.TextModel._create_vocab_sentencepiece

    def sentencepiece_only_when_present(self):  # FileNotFoundError lets the converter try tokenizer.json
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
        return original(self)

    base.TextModel._create_vocab_sentencepiece = sentencepiece_only_when_present
    import runpy

    sys.argv = [str(folder / "convert_hf_to_gguf.py"), *argv]
    runpy.run_path(str(folder / "convert_hf_to_gguf.py"), run_name="__main__")


def _convert_llama_as_deci(base: Any) -> None:
    """In the converter's process: a Llama checkpoint with per-layer widths or heads is written as
    llama.cpp's ``deci`` architecture, which takes one FFN width and one head count per layer.

    llama.cpp's own ``DeciModel`` reads those from a Nemotron-NAS ``block_configs`` (widths from a
    multiplier rounded to 256); this subclass reads them from llmrank's ``config.llmrank`` instead
    and keeps the rest (tensor names, q/k permutation per layer, rope factors)."""
    from conversion.deci import DeciModel

    class SlimLlamaAsDeci(DeciModel):
        model_arch = DeciModel.model_arch

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            base.TextModel.__init__(self, *args, **kwargs)  # not DeciModel's block_configs reader
            hp, info = self.hparams, self.hparams.get("llmrank") or {}
            widths, heads = info.get("layer_widths") or {}, info.get("layer_heads") or {}
            shared = (hp["num_attention_heads"], hp.get("num_key_value_heads") or hp["num_attention_heads"])
            self._ffn_dims = [int(widths.get(f"model.layers.{i}.mlp", hp["intermediate_size"])) for i in range(self.block_count)]
            pairs = [heads.get(f"model.layers.{i}.self_attn", shared) for i in range(self.block_count)]
            self._num_heads = [int(h) for h, _ in pairs]
            self._num_kv_heads = [int(kv) for _, kv in pairs]

        def set_vocab(self) -> None:  # Llama's order: sentencepiece when there is a tokenizer.model, else BPE
            try:
                self._set_vocab_sentencepiece()
            except FileNotFoundError:
                self._set_vocab_gpt2()

        def set_gguf_parameters(self) -> None:
            hp, w = self.hparams, self.gguf_writer
            head_dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
            if (rope_theta := self.rope_parameters.get("rope_theta")) is not None:
                w.add_rope_freq_base(rope_theta)
            w.add_head_count(self._num_heads)
            w.add_head_count_kv(self._num_kv_heads)
            w.add_feed_forward_length(self._ffn_dims)
            w.add_block_count(self.block_count)
            w.add_context_length(hp["max_position_embeddings"])
            w.add_embedding_length(hp["hidden_size"])
            w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
            w.add_rope_dimension_count(head_dim)
            w.add_vocab_size(hp["vocab_size"])
            w.add_file_type(self.ftype)

        def modify_tensors(self, data_torch: Any, name: str, bid: int | None) -> Any:
            if bid is not None and name.endswith(("q_proj.weight", "k_proj.weight")):
                n_head, n_kv = self._num_heads[bid], self._num_kv_heads[bid]
                data_torch = DeciModel.permute(data_torch, n_head, n_head if "q_proj" in name else n_kv)
            yield from base.TextModel.modify_tensors(self, data_torch, name, bid)

    import conversion.llama  # noqa: F401 - registers llama.cpp's own Llama class first, so this entry wins

    base.ModelBase._model_classes[base.ModelType.TEXT]["LlamaForCausalLM"] = SlimLlamaAsDeci


def _convert(hf_dir: Path, out_file: Path, outtype: str, layout: str = "uniform") -> str:
    """Run the converter on ``hf_dir`` in a child process; return its log, raise on failure."""
    folder = converter_dir()
    cmd = [sys.executable, "-m", "llmrank.exporters.gguf", str(folder), layout, str(hf_dir),
           "--outtype", outtype, "--outfile", str(out_file)]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0 or not out_file.is_file():
        tail = "\n".join(log.strip().splitlines()[-8:])
        raise ExportError(f"llama.cpp's converter failed on {hf_dir} (exit {proc.returncode}):\n{tail}")
    return log


# --------------------------------------------------------------------------- options


def check_outtype(outtype: str) -> None:
    """Refuse an unknown type, or a K-quant without llama.cpp's compiled quantizer, before any work."""
    if outtype not in OUTTYPES:
        raise ConfigError(f"GGUF type must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    if outtype in KQUANT_TYPES and not _llama_cpp_available():
        error = ConfigError(
            f"GGUF type {outtype} is a llama.cpp K-quant: it needs llama.cpp's compiled quantizer, from llama-cpp-python "
            f"(pip install 'llmrank[gguf]'; it compiles llama.cpp, which takes a while). Without it use "
            f"{', '.join(CONVERTER_TYPES)}")
        error.hint = "pip install 'llmrank[gguf]', or choose --gguf q8_0 / f16"
        raise error


def check_prune_options(outtype: str, *, hf: bool, mode: str, allocation: str, pruner: str) -> None:
    """`llmrank prune --gguf`: refuse what cannot give a GGUF before the model is read."""
    check_outtype(outtype)
    if not hf:
        raise ConfigError("--gguf is converted from the slim checkpoint hf/: drop --no-hf")
    if mode == "mask-paper":
        raise ConfigError("--gguf needs the slim checkpoint hf/, which --mode mask-paper does not write")
    why = (f"--allocation {allocation} chooses a width per layer" if allocation != "uniform" else
           "--pruner global pools all scores, so each layer keeps its own width" if pruner == "global" else None)
    if why and not _llama_cpp_available():
        error = ConfigError(f"--gguf {outtype}: {why}; llama.cpp takes per-layer widths only as its 'deci' architecture, "
                            f"which transformers cannot read back, so the file is checked in llama.cpp itself: "
                            f"pip install 'llmrank[gguf]' (llama-cpp-python)")
        error.hint = "pip install 'llmrank[gguf]', or use --allocation uniform --pruner local for a GGUF, or drop --gguf"
        raise error


def _llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


#: FFN width multiple a prune for each GGUF type rounds to when the user gives no --multiple.
#: llama.cpp stores q8_0/q4_0 rows in blocks of 32 values and K-quants in blocks of 256; a row of
#: another length is kept in f16 ("unusual shape") or falls back to another type, and its CPU
#: kernels take an odd row length on a slower path. Measured on SmolLM2-135M at 30 % in llama.cpp:
#: widths of 1075 made the slim file slower than the dense one (prefill 0.67x, decode 0.94x at f16;
#: q4_k_m file larger than dense); rounded to 32, 1.12x / 1.19x (benchmarks/README.md, GGUF).
ROW_BLOCK = 32
KQUANT_ROW_BLOCK = 256


def row_multiple(outtype: str) -> int:
    """The FFN width multiple that lets llama.cpp store and run ``outtype`` rows whole."""
    return KQUANT_ROW_BLOCK if outtype in KQUANT_TYPES else ROW_BLOCK


def alignment_note(config: dict[str, Any], outtype: str) -> str | None:
    """A note when the checkpoint's FFN widths are not a multiple of :func:`row_multiple`."""
    info = config.get("llmrank") or {}
    widths = sorted({int(w) for w in (info.get("layer_widths") or {}).values()} or
                    ({int(config["intermediate_size"])} if "intermediate_size" in config else set()))
    multiple = row_multiple(outtype)
    odd = [w for w in widths if w % multiple]
    if not odd:
        return None
    return (f"FFN width{'s' if len(odd) > 1 else ''} {', '.join(map(str, odd[:4]))} {'are' if len(odd) > 1 else 'is'} not a "
            f"multiple of {multiple}: llama.cpp stores such {outtype} rows in another type and runs them on a slower path "
            f"(prune with --multiple {multiple}, which a prune with --gguf {outtype} does by default)")


#: model_type values whose per-layer FFN widths and head counts llama.cpp takes as its ``deci``
#: architecture (Llama blocks: RMSNorm, rotary attention, gated MLP, no biases).
DECI_FAMILIES = ("llama",)


def gguf_layout(config: dict[str, Any] | Path | str) -> str:
    """``"uniform"`` (the family's own GGUF architecture) or ``"deci"`` (per-layer widths or heads,
    Llama family); a ConfigError with the way out for anything else, before any work.

    llama.cpp's ``llama`` architecture (and its siblings) takes one FFN width and one head count;
    its ``deci`` architecture takes one per layer. transformers cannot read ``deci``, so such a
    file is checked in llama.cpp itself, which therefore must be installed."""
    if not isinstance(config, dict):
        config = json.loads((Path(config) / "config.json").read_text(encoding="utf-8"))
    info = config.get("llmrank") or {}
    if info.get("undeclared_biases"):
        raise ConfigError(f"this checkpoint has biases its config cannot declare ({', '.join(info['undeclared_biases'][:3])}"
                          f", ...): llama.cpp's converter would drop them; prune without --compensation bias for a GGUF")
    per_layer = [what for key, what in (("layer_widths", "FFN widths"), ("layer_heads", "attention head counts"))
                 if info.get(key)]
    if not per_layer:
        return "uniform"
    family = config.get("model_type", "?")
    why = f"this checkpoint has per-layer {' and '.join(per_layer)}"
    if family not in DECI_FAMILIES or config.get("attention_bias") or config.get("mlp_bias"):
        error = ConfigError(f"{why}; llama.cpp's {family} GGUF takes one value for all layers, and its per-layer form "
                            f"(deci) is written for {', '.join(DECI_FAMILIES)} checkpoints without biases only")
        error.hint = "prune with --allocation uniform (and without per-layer head options) to get a GGUF"
        raise error
    if not _llama_cpp_available():
        error = ConfigError(f"{why}: llama.cpp takes it as its 'deci' architecture, which transformers cannot read back, "
                            f"so the file is checked in llama.cpp itself: pip install 'llmrank[gguf]' (llama-cpp-python)")
        error.hint = "pip install 'llmrank[gguf]', or prune with --allocation uniform for a stock llama GGUF"
        raise error
    return "deci"


# --------------------------------------------------------------------------- export


@dataclass
class GgufCheck:
    """The written GGUF read back by transformers' GGUF loader against the slim model.

    Logits on `prompts` token sequences: the largest |difference| and its bound (relative to
    the largest |logit| of the slim model), the share of positions whose argmax agrees.
    Tokenizer: the GGUF's tokenizer gives the same ids as the HF tokenizer on sample text.
    """

    outtype: str
    prompts: int
    positions: int
    max_abs_diff: float
    logit_scale: float
    bound: float
    top1_agreement: float
    tokenizer_equal: bool
    passed: bool
    seconds: float
    #: the same comparison with the file run by llama.cpp itself (None when llama-cpp-python is absent)
    llama_cpp: dict[str, Any] | None = None
    #: K-quants: the fields above check the f16 file they were quantized from; this compares the
    #: quantized file's perplexity with that f16 file's, both in llama.cpp, on calibration text
    perplexity: dict[str, Any] | None = None


@dataclass
class GgufExportResult:
    """What was written and how it was checked."""

    path: Path
    outtype: str
    bytes: int
    architecture: str
    convert_seconds: float
    check: GgufCheck | None
    converter: str = LLAMA_CPP_PYTHON
    notes: list[str] = field(default_factory=list)
    log: str = field(default="", repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "log"}
        out["path"] = str(self.path)
        return out


#: Largest |logit difference| allowed, as a share of the slim model's largest |logit|, on random ids.
#: f32 is the same arithmetic in another order; f16/bf16 round each weight; q8_0 quantizes blocks
#: of 32 weights to 8 bits. Measured: tiny random Llama/Qwen2 f32 0, f16 4.5e-4, bf16 3.2e-3, q8_0
#: 9.6e-3; SmolLM2-135M at 30 % (30 layers) f16 2.1e-3, bf16 1.0e-2, q8_0 2.7e-2. A wrong conversion
#: (a permuted or misplaced tensor) is off by the order of the logits themselves.
BOUNDS = {"f32": 1e-4, "f16": 2e-2, "bf16": 5e-2, "q8_0": 1e-1}


def export_gguf(
    hf_dir: str | Path,
    out_path: str | Path,
    *,
    outtype: str = "f16",
    force: bool | int = False,
    check: bool = True,
) -> GgufExportResult:
    """Write ``out_path`` (a .gguf) from a slim HF folder written by llmrank, atomically.

    The converter writes the file under a temporary name; with ``check`` it is read back by
    transformers and compared with the folder's model before it is moved into place.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    check_outtype(outtype)
    if not (hf_dir / "config.json").is_file():
        raise InputError(f"{hf_dir} is not a HF checkpoint folder (no config.json): give the hf/ folder of a prune")
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    layout = gguf_layout(config)
    from llmrank.models import check_tokenizer_files

    check_tokenizer_files(hf_dir)  # a GGUF holds its tokenizer: the converter needs the folder's
    converter_dir()  # fetch before the atomic write starts: a failure here leaves nothing behind
    with atomic_path(out_path, force=force) as tmp:
        start = time.perf_counter()
        staged = tmp.with_name(tmp.name + ".gguf")
        result_check = None
        try:
            if outtype in KQUANT_TYPES:  # llama.cpp quantizes an f16 file: check that one, then the quantized one against it
                log = _convert(hf_dir, staged, "f16", layout)
                _quantize(staged, tmp, outtype)
                seconds = time.perf_counter() - start
                if check:
                    result_check = validate_gguf(staged, hf_dir, "f16")
                    result_check.outtype = outtype
                    result_check.perplexity = quantized_perplexity_check(tmp, staged, outtype)
                    result_check.passed = result_check.passed and result_check.perplexity["passed"]
            else:
                log = _convert(hf_dir, tmp, outtype, layout)
                seconds = time.perf_counter() - start
                result_check = validate_gguf(tmp, hf_dir, outtype) if check else None
        finally:
            staged.unlink(missing_ok=True)
        if result_check is not None and not result_check.passed:
            raise GgufValidationError(_failure_message(result_check))
        size = tmp.stat().st_size
    note = alignment_note(config, outtype)
    return GgufExportResult(out_path, outtype, size, _architecture(out_path), seconds, result_check,
                            notes=[note] if note else [], log=log)


def _failure_message(check: GgufCheck) -> str:
    message = (f"the {check.outtype} GGUF does not match the slim model: max |logit diff| {check.max_abs_diff:.3g} "
               f"(bound {check.bound:g} x {check.logit_scale:.3g}), tokenizer equal: {check.tokenizer_equal}")
    if check.llama_cpp:
        message += f"; in llama.cpp: {check.llama_cpp}"
    if check.perplexity:
        message += f"; perplexity: {check.perplexity}"
    return message


def _quantize(f16_file: Path, out_file: Path, outtype: str) -> None:
    """llama.cpp's own K-quant quantizer through llama-cpp-python (the f16 file as input)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = KQUANT_TYPES[outtype]
    # llama-cpp-python prints llama.cpp's log lines at or above its logger's level: the quantizer
    # reports every tensor at INFO, so keep its warnings (a type fallback) and errors only
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        rc = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out_file).encode(), params)
    finally:
        log.setLevel(level)
    if rc != 0 or not out_file.is_file():
        raise ExportError(f"llama.cpp's quantizer failed on {f16_file.name} -> {outtype} (returned {rc})")


def _architecture(path: Path) -> str:
    """general.architecture of a GGUF file.

    GGUF writers put it first among the key-value pairs, so the header is read directly (gguf's
    GGUFReader parses every field, the whole vocabulary included: seconds per call); a file that
    does not start that way is read with GGUFReader."""
    first = _first_string_field(path)
    if first is not None and first[0] == "general.architecture":
        return first[1]
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    value = reader.fields["general.architecture"]
    return bytes(value.parts[value.data[0]]).decode("utf-8")


#: GGUF's value type number for a string (gguf.GGUFValueType.STRING).
_GGUF_STRING = 8


def _first_string_field(path: Path) -> tuple[str, str] | None:
    """(key, value) of a GGUF file's first key-value pair when its value is a string, else None.
    Layout (little-endian, version 2 and 3): magic, u32 version, u64 tensor count, u64 pair count,
    then each pair as u64-length key, u32 value type, value (a string is u64 length + bytes)."""
    import struct

    def string(fh: Any) -> str | None:
        raw = fh.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        data = fh.read(n) if 0 <= n <= 1 << 16 else b""
        return data.decode("utf-8", "replace") if len(data) == n else None

    with open(path, "rb") as fh:
        head = fh.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            return None
        version, _tensors, pairs = struct.unpack("<IQQ", head[4:])
        if version < 2 or pairs < 1:
            return None
        key = string(fh)
        kind = fh.read(4)
        if key is None or len(kind) < 4 or struct.unpack("<I", kind)[0] != _GGUF_STRING:
            return None
        value = string(fh)
        return None if value is None else (key, value)


# --------------------------------------------------------------------------- the check


def _sample_ids(vocab: int, n: int = 3, length: int = 24) -> torch.Tensor:
    import torch

    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def validate_gguf(gguf_file: Path, hf_dir: Path, outtype: str, sample_ids: torch.Tensor | None = None) -> GgufCheck:
    """Read ``gguf_file`` back with transformers and compare it with the model in ``hf_dir``, and
    run it in llama.cpp when llama-cpp-python is installed.

    A file transformers' reader cannot load (a ``deci`` file, Gemma-3's byte-level vocabulary) is
    checked in llama.cpp only, and refused when llama.cpp is not installed."""
    import torch

    from llmrank.exporters.hf import load_hf

    start = time.perf_counter()
    gguf_file, hf_dir = Path(gguf_file), Path(hf_dir)
    slim = load_hf(hf_dir, dtype=torch.float32).eval()  # per-layer widths and heads too
    bound = BOUNDS[outtype]
    ids = sample_ids if sample_ids is not None else _sample_ids(slim.config.vocab_size)
    with torch.no_grad():
        want = slim(ids).logits
    try:
        read = _read_back(gguf_file)
        tok_equal = _tokenizers_agree(gguf_file, hf_dir)
    except GgufValidationError as exc:
        if not _llama_cpp_available():
            raise
        in_llama = _llama_cpp_check(gguf_file, hf_dir, want, ids, bound)
        in_llama["transformers"] = "could not read the file back: " + str(exc).split("; install")[0][:300]
        return GgufCheck(outtype, int(ids.shape[0]), int(ids.numel()), in_llama["max_abs_diff"], float(want.abs().max()),
                         in_llama["bound"], in_llama["top1_agreement"], in_llama["tokenizer_equal"], in_llama["passed"],
                         time.perf_counter() - start, in_llama)
    with torch.no_grad():
        got = read(ids).logits
    diff = float((want - got).abs().max())
    scale = float(want.abs().max())
    top1 = float((want.argmax(-1) == got.argmax(-1)).float().mean())
    passed = diff <= bound * max(scale, 1e-6) and tok_equal
    in_llama = _llama_cpp_check(gguf_file, hf_dir, want, ids, bound) if _llama_cpp_available() else None
    passed = passed and (in_llama is None or in_llama["passed"])
    return GgufCheck(outtype, int(ids.shape[0]), int(ids.numel()), diff, scale, bound, top1, tok_equal, passed,
                     time.perf_counter() - start, in_llama)


#: llama.cpp keeps its KV cache in f16 and may reorder sums: its bound is at least this share of the largest |logit|.
LLAMA_CPP_MIN_BOUND = 2e-2


def _llama_cpp_check(gguf_file: Path, hf_dir: Path, want: torch.Tensor, ids: torch.Tensor, bound: float) -> dict[str, Any]:
    """The file run by llama.cpp's own kernels against the slim model's logits, and llama.cpp's
    tokenizer against the folder's on sample text."""
    import torch
    import transformers

    from llmrank.exporters.llamacpp import llama_logits, load_llama, tokenize

    llm = load_llama(gguf_file, n_ctx=max(64, int(ids.shape[1])), threads=1)
    got = torch.stack([llama_logits(llm, row.tolist()) for row in ids])
    diff, scale = float((want - got).abs().max()), float(want.abs().max())
    bound = max(bound, LLAMA_CPP_MIN_BOUND)
    hf_ids = transformers.AutoTokenizer.from_pretrained(hf_dir)(_SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    tok_equal = tokenize(llm, _SAMPLE_TEXT) == hf_ids
    top1 = float((want.argmax(-1) == got.argmax(-1)).float().mean())
    return {"max_abs_diff": diff, "bound": bound, "top1_agreement": top1, "tokenizer_equal": tok_equal,
            "passed": diff <= bound * max(scale, 1e-6) and tok_equal}


#: Largest perplexity ratio (K-quant file / the f16 file it came from, both run by llama.cpp on the
#: same windows of calibration text) a K-quant may show. Measured in llama.cpp on SmolLM2-135M
#: (wiki evaluation text): q4_k_m / f16 1.05 dense, 1.05 slim at 30 % (widths 1,088), 1.06 slim at
#: 33 % (widths 1,024). A quantizer fed the wrong file or the wrong tensor types is off by far more.
KQUANT_PPL_BOUND = 1.25

#: Calibration-text windows the K-quant check scores (tokens each, how many).
_PPL_WINDOW, _PPL_WINDOWS = 256, 4


def quantized_perplexity_check(quantized: Path, f16_file: Path, outtype: str) -> dict[str, Any]:
    """Perplexity of ``quantized`` over that of ``f16_file``, both in llama.cpp with its own tokenizer,
    on the first windows of the built-in calibration text."""
    from llmrank.data import wiki_text
    from llmrank.evaluate import perplexity
    import torch

    from llmrank.exporters.llamacpp import gguf_logits_fn, load_llama, tokenize

    start = time.perf_counter()
    text = wiki_text("calib")[: 8 * _PPL_WINDOW * _PPL_WINDOWS]
    ids = torch.tensor(tokenize(load_llama(f16_file, n_ctx=_PPL_WINDOW, threads=1), text)[: _PPL_WINDOW * _PPL_WINDOWS])
    ppl = {}
    for name, path in (("f16", f16_file), (outtype, quantized)):
        fn = gguf_logits_fn(path, n_ctx=_PPL_WINDOW, threads=None)
        ppl[name] = perplexity(fn, ids, seq_len=_PPL_WINDOW, progress=False).ppl
    ratio = ppl[outtype] / ppl["f16"]
    return {"text": "wiki calib", "tokens": int(ids.numel()), "ppl_f16": ppl["f16"], f"ppl_{outtype}": ppl[outtype],
            "ratio": ratio, "bound": KQUANT_PPL_BOUND, "passed": ratio <= KQUANT_PPL_BOUND,
            "seconds": time.perf_counter() - start}


def _read_back(gguf_file: Path):
    try:
        return load_gguf_model(gguf_file)
    except GgufValidationError:
        raise
    except Exception as exc:  # noqa: BLE001 - an architecture transformers' GGUF loader does not know, or a bad file
        raise GgufValidationError(
            f"transformers cannot read the written GGUF back to check it ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); install llmrank[gguf] to check it in llama.cpp instead, "
            "or export_gguf(..., check=False) writes it unchecked") from exc


def load_gguf_model(gguf_file: Path):
    """transformers' GGUF loader on one file (it wants a folder and a file name): float32, eval mode.

    Per-layer widths (architecture ``deci``) are not in transformers' reader: refused by name."""
    import torch
    import transformers

    arch = _architecture(gguf_file)
    if arch == "deci":
        raise GgufValidationError(f"{gguf_file.name} is a 'deci' GGUF (per-layer widths or heads), which transformers' "
                                  "GGUF reader cannot load; evaluate the hf/ checkpoint next to it instead")
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()


def _tokenizers_agree(gguf_file: Path, hf_dir: Path) -> bool:
    """The GGUF's tokenizer (as transformers rebuilds it) and the folder's give the same ids."""
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    try:
        gguf_tok = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as exc:  # noqa: BLE001 - e.g. Gemma-3's byte-level vocabulary as llama.cpp writes it
        raise GgufValidationError(
            f"transformers cannot read the written GGUF's tokenizer back to check it ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); install llmrank[gguf] to check it in llama.cpp instead, "
            "or export_gguf(..., check=False) writes it unchecked") from exc
    return hf_tok(_SAMPLE_TEXT)["input_ids"] == gguf_tok(_SAMPLE_TEXT)["input_ids"]


if __name__ == "__main__":  # the child process of _convert: <converter dir> <converter args...>
    _run_converter_here(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
