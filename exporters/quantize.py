"""int8 weights for the slim ONNX file, with onnxruntime's own quantizer (pruning, then quantization).

``onnxruntime.quantization.quantize_dynamic`` turns every MatMul weight into int8 (per tensor,
activations quantized on the fly), which cuts the file about 4x and speeds up the GEMMs on
CPUs with int8 dot products. Pruning and quantization compose: the shrunk Linears are simply
smaller int8 matrices. The quantized file is checked against the fp32 PyTorch model before it
is moved into place; int8 is lossy, so the check is a stated bound on the relative logit error
and the top-1 agreement, not bit equality.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from llmrank.exporters.atomic import atomic_files, check_writable
from llmrank.exporters.onnx import logit_agreement
from llmrank.ir.errors import ExportError

#: The bound a quantized file must meet on random token batches: relative L2 error of the
#: logits against fp32 PyTorch, and the share of positions whose top-1 token is unchanged.
MAX_RELATIVE_ERROR = 0.1
MIN_TOP1_AGREEMENT = 0.9


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    bytes: int
    relative_error: float
    top1_agreement: float
    seconds: float

    def to_dict(self) -> dict:
        return {"path": str(self.path), "bytes": self.bytes, "relative_error": self.relative_error,
                "top1_agreement": self.top1_agreement, "seconds": self.seconds, "weights": "int8 (MatMul, per tensor)",
                "bound": {"max_relative_error": MAX_RELATIVE_ERROR, "min_top1_agreement": MIN_TOP1_AGREEMENT}}


def quantize_onnx(src: Path | str, dst: Path | str, model: nn.Module, *, force: bool | int = False,
                  shape: tuple[int, int] = (2, 32), seed: int = 0) -> QuantizeResult:
    """Write an int8-weight copy of ``src`` to ``dst`` and check it against ``model`` (fp32)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as error:  # pragma: no cover - onnxruntime is in the onnx extra
        raise ExportError("int8 quantization needs onnxruntime: pip install 'llmrank[onnx]'") from error
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ExportError(f"refusing to quantize {src} onto itself: give another output path")
    check_writable(dst, force)
    data = src.with_name(src.name + ".data")
    start = time.perf_counter()
    with atomic_files([dst], force=force) as staging:
        target = staging / dst.name
        quantize_dynamic(str(src), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         use_external_data_format=data.exists() and data.stat().st_size > 2**31 - 1)
        error, agreement = logit_agreement(model, target, shape=shape, seed=seed)
        if not (error <= MAX_RELATIVE_ERROR and agreement >= MIN_TOP1_AGREEMENT):
            raise ExportError(f"the int8 file is too far from the fp32 model: relative logit error {error:.3g} "
                              f"(bound {MAX_RELATIVE_ERROR}), top-1 agreement {agreement:.3f} (bound {MIN_TOP1_AGREEMENT}); "
                              "keep the fp32 ONNX for this model")
    return QuantizeResult(dst, dst.stat().st_size, error, agreement, time.perf_counter() - start)
