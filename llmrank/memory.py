"""How much memory the in-memory ``llmrank prune`` job needs, from config.json alone.

The estimate is a sum of the buffers that measurably dominate the job's peak resident set
(``benchmarks/bench_memory.py``, results in ``benchmarks/results/memory.json``), taken at the
step where they coexist, so that the route can be chosen before a single weight is read:

- the process itself (Python, torch, transformers, onnx/onnxruntime): ``BASE_BYTES``;
- the dense model in fp32 (4 bytes per parameter), held until the job ends;
- the least-squares refit's statistics: one float64 Gram matrix of each FFN consumer's input
  (``intermediate x intermediate`` per layer), held from calibration until the refit is planned
  (the Compensate pass drops them, so they never meet the rewrite's copies);
- the logits of a calibration batch (``batch x seq_len x vocab`` fp32) and the float copies the
  loss makes of them: ``LOGIT_COPIES`` of them, what makes large vocabularies expensive;
- from the shrink on: the slim model (the dense one minus the cut FFN channels), the refitted
  weights, a masked dense copy for the verification, and for the ONNX export more copies of the
  slim weights (``ONNX_INLINE_COPIES`` or ``ONNX_EXTERNAL_COPIES``).

Every input is a field of config.json; nothing here opens a weight file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Read off the runs in benchmarks/results/memory.json (docs/large-models.md: "How much memory the in-memory prune needs").
#: The process before any model: Python, torch, transformers, onnx and onnxruntime.
BASE_BYTES = 650 * 10**6
#: Calibration batches' logits alive at once (the output and the loss's float copy).
LOGIT_COPIES = 1.5
#: The ONNX export's copies of the slim weights when they are written inside the .onnx file
#: (the exported graph, the protobuf read back to stamp metadata, the onnxruntime session).
ONNX_INLINE_COPIES = 3.7
#: ... and when they go to an external .onnx.data file (from 1 GiB on): the graph's copy only.
ONNX_EXTERNAL_COPIES = 1.0
#: What the export holds per decoder layer beside the weights (its graphs: the exported program,
#: the ONNX IR and the onnxruntime session's nodes): fitted on the export steps of SmolLM2-135M
#: (30 layers), Gemma-3-270M (18), Qwen2.5-0.5B (24) and a 10-layer random Llama; what made the
#: 30-layer SmolLM2's export (3.9-4.3 GB) cost more than its weights said.
ONNX_EXPORT_PER_LAYER = 27 * 10**6
#: From this many bytes of weights the export writes them to .onnx.data (exporters.onnx).
EXTERNAL_DATA_BYTES = 1 << 30
GRAM_BYTES = 8  # float64


@dataclass(frozen=True)
class ModelShape:
    """The config.json fields the estimate needs."""

    params: int
    vocab: int
    hidden: int
    intermediate: int
    layers: int

    @property
    def ffn_params(self) -> int:
        """Parameters of the gated FFNs (gate, up, down), the part a default prune cuts."""
        return 3 * self.hidden * self.intermediate * self.layers


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """A multimodal config keeps the language model's shape in text_config."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def params_from_config(config: dict[str, Any]) -> int | None:
    """Parameter count of a Llama-style decoder (Llama, Mistral, Qwen2/3, Gemma 1-3) from its config;
    None when the config lacks the fields (another architecture)."""
    c = _text_config(config)
    try:
        hidden, inter, layers = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"])
        vocab, heads = int(c["vocab_size"]), int(c["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    kind = str(c.get("model_type", ""))
    attn = hidden * head_dim * (2 * heads + 2 * kv)
    if c.get("attention_bias") or kind == "qwen2":  # Qwen2 always has q/k/v biases
        attn += head_dim * (heads + 2 * kv)
    mlp = 3 * hidden * inter + (2 * inter + hidden if c.get("mlp_bias") else 0)
    norms = (4 * hidden if kind.startswith(("gemma2", "gemma3")) else 2 * hidden)
    if kind.startswith("gemma3") or kind == "qwen3":  # q_norm and k_norm
        norms += 2 * head_dim
    tied = c.get("tie_word_embeddings", config.get("tie_word_embeddings", True))
    return vocab * hidden * (1 if tied else 2) + layers * (attn + mlp + norms) + hidden


def read_shape(folder: Path | str) -> ModelShape | None:
    """The shape from ``folder/config.json`` only (None: not a decoder this module can count)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    params = params_from_config(config)
    if params is None:
        return None
    c = _text_config(config)
    return ModelShape(params=params, vocab=int(c["vocab_size"]), hidden=int(c["hidden_size"]),
                      intermediate=int(c["intermediate_size"]), layers=int(c["num_hidden_layers"]))


def slim_params(shape: ModelShape, sparsity: float) -> int:
    """Parameters left after cutting ``sparsity`` of every FFN's channels."""
    return shape.params - int(sparsity * shape.ffn_params)


def refit_stats_bytes(shape: ModelShape, compensation: str) -> int:
    """The lstsq refit's float64 Gram matrices, one per FFN consumer (none without lstsq)."""
    if "lstsq" not in compensation:
        return 0
    return GRAM_BYTES * shape.layers * shape.intermediate**2


def logits_bytes(vocab: int, seq_len: int, batch_size: int) -> int:
    """One calibration batch's fp32 logits."""
    return 4 * batch_size * seq_len * vocab


def refits_bytes(shape: ModelShape, sparsity: float, compensation: str) -> int:
    """The refitted consumer weights (float64, ``hidden x kept``), held until the prune returns."""
    if "lstsq" not in compensation:
        return 0
    return GRAM_BYTES * shape.layers * shape.hidden * round((1 - sparsity) * shape.intermediate)


def onnx_copies_bytes(weight_bytes: int) -> int:
    """What the ONNX export and its check add on top of the fp32 model they export."""
    copies = ONNX_EXTERNAL_COPIES if weight_bytes >= EXTERNAL_DATA_BYTES else ONNX_INLINE_COPIES
    return int(copies * weight_bytes)


def onnx_export_need(params: int, *, layers: int = 0, stored_bytes_per_param: int = 4) -> int:
    """Bytes a process needs to export (and check) ONNX from a checkpoint of ``params``
    parameters: the process, the model in fp32, the export's copies of its weights, and the
    checkpoint as loaded when it is not fp32 (``stored_bytes_per_param`` 2 for bf16/fp16: the
    fp32 model is a copy of it). For the block-by-block route, which exports the slim checkpoint
    it wrote; ``params`` is what that checkpoint holds (``fp32_size(folder) // 4``), ``layers`` its
    decoder layers."""
    stored = stored_bytes_per_param * params if stored_bytes_per_param != 4 else 0
    return int(BASE_BYTES + stored + 4 * params + onnx_copies_bytes(4 * params) + ONNX_EXPORT_PER_LAYER * layers)


def estimate_in_memory_peak(shape: ModelShape, *, onnx: bool, seq_len: int, batch_size: int = 4, sparsity: float = 0.3,
                            compensation: str = "lstsq") -> int:
    """Peak resident bytes of ``llmrank prune`` in memory (load, calibrate, refit, shrink, verify,
    hf/ and, with ``onnx``, the ONNX export and its check): the largest of its three heavy steps.

    calibrate: the dense model, the Gram matrices being summed, a batch's logits;
    refit: the dense model, the Gram matrices and the refitted weights being solved;
    shrink + verify: the dense model, the slim copy, the masked dense reference and the refitted
    weights (the Grams are gone); export: the dense and slim models, the export's copies and its
    per-layer graphs.
    """
    dense = 4 * shape.params
    slim = 4 * slim_params(shape, sparsity)
    grams = refit_stats_bytes(shape, compensation)
    refits = refits_bytes(shape, sparsity, compensation)
    calibrate = dense + grams + LOGIT_COPIES * logits_bytes(shape.vocab, seq_len, batch_size)
    refit = dense + grams + refits
    verify = 2 * dense + slim + refits
    export = dense + slim + onnx_copies_bytes(slim) + ONNX_EXPORT_PER_LAYER * shape.layers if onnx else 0
    return int(BASE_BYTES + max(calibrate, refit, verify, export))


#: For a checkpoint whose config.json this module cannot count: the peak as a multiple of the
#: fp32 weights, above the largest ratio measured (5.9 x, SmolLM2-135M with ONNX).
FALLBACK_PEAK_RATIO = 6.0


def job_peak(folder: Path | str, *, onnx: bool, seq_len: int, batch_size: int, sparsity: float, compensation: str) -> int | None:
    """The in-memory job's estimated peak for the checkpoint in ``folder`` (config.json only);
    None when its config is not one :func:`params_from_config` can count."""
    shape = read_shape(folder)
    if shape is None:
        return None
    return estimate_in_memory_peak(shape, onnx=onnx, seq_len=seq_len, batch_size=batch_size, sparsity=sparsity,
                                   compensation=compensation)
