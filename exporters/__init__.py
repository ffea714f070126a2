"""Exporters: slim ONNX (prefill or with KV cache), HF checkpoints, onnxruntime-genai folders, atomic writes.

Exporters take an already pruned model; they never score or shrink.
"""

from llmrank.exporters.atomic import atomic_path, refuse_input_overlap
from llmrank.exporters.genai import export_genai, genai_logits_fn, generate_genai  # onnxruntime-genai imported on use
from llmrank.exporters.hf import check_reload, load_hf, mlp_widths, save_hf
from llmrank.exporters.onnx import export_onnx, generate_onnx, read_onnx_metadata, validate_onnx

__all__ = [
    "atomic_path", "check_reload", "export_genai", "export_onnx", "genai_logits_fn", "generate_genai", "generate_onnx", "load_hf",
    "mlp_widths", "read_onnx_metadata", "refuse_input_overlap",
    "save_hf", "validate_onnx",
]
