"""Verification pass: the shrunk model must compute what the masked dense model computes.

The two differ only by floating-point summation order (a GEMM over fewer columns instead of
over zeros), so the bound is ``atol + rtol * max|reference|``: 1e-5 absolute holds for small
models, and deep real models (logits ~30, 30 layers) stay within the relative part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from llmrank.ir.graph import ModelIR
from llmrank.ir.trace import TensorOutput, is_hf_model
from llmrank.passes.shrink import mask


@dataclass(frozen=True)
class Verification:
    ok: bool
    max_abs_diff: float
    atol: float
    inputs: str
    rtol: float = 0.0
    reference_scale: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def compare(cls, reference: torch.Tensor, got: torch.Tensor, inputs: tuple, *, atol: float = 1e-5, rtol: float = 1e-5) -> "Verification":
        """The one bound every route uses: max|got - reference| <= atol + rtol * max|reference|.

        Outputs in a low precision (bf16, fp16) differ by rounding alone by a few units of that
        precision, so ``rtol`` is at least 4 x its machine epsilon (3 % in bf16; fp32 is unchanged:
        4 x 1.2e-7 is below the default 1e-5). A wrong cut moves outputs by O(1), far above it.
        """
        if reference.is_floating_point():
            rtol = max(rtol, 4 * torch.finfo(reference.dtype).eps)
        diff = float((reference.float() - got.float()).abs().max()) if reference.numel() else 0.0
        scale = float(reference.float().abs().max()) if reference.numel() else 0.0
        shape = "x".join(str(s) for s in inputs[0].shape) if inputs and isinstance(inputs[0], torch.Tensor) else "?"
        return cls(ok=bool(diff <= atol + rtol * scale), max_abs_diff=diff, atol=atol, inputs=shape, rtol=rtol, reference_scale=scale)


def sample_tokens(inputs: tuple) -> int | None:
    """Token positions in a verification sample (its first input when that is a token-id tensor)."""
    first = inputs[0] if inputs else None
    return int(first.numel()) if isinstance(first, torch.Tensor) and not first.is_floating_point() else None


def outputs(model: nn.Module, inputs: tuple) -> torch.Tensor:
    """The single tensor a model produces for ``inputs`` (logits for HF models)."""
    runner = TensorOutput(model) if is_hf_model(model) else model
    with torch.no_grad():
        out = runner(*inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def verify(
    original: nn.Module, shrunk: nn.Module, ir: ModelIR, kept: dict[str, torch.Tensor], inputs: tuple, *,
    atol: float = 1e-5, rtol: float = 1e-5, refits: dict | None = None,
) -> Verification:
    """Compare ``shrunk`` with a zero-masked copy of ``original`` on ``inputs`` (fp32 tolerance).

    With ``refits`` the reference carries the same refitted consumer weights.
    """
    reference = outputs(mask(original, ir, kept, refits=refits), inputs)
    return Verification.compare(reference, outputs(shrunk, inputs), inputs, atol=atol, rtol=rtol)


@dataclass(frozen=True)
class OutputCheck:
    """The final model's outputs on the verification sample, against the dense model's.

    ``relative_error`` is ||final - dense|| / ||dense||; ``relative_error_without_refit`` the
    same for the cut model before compensation (None when there was no refit), so a report
    shows what the refit did. ``tokens``: how many token positions the sample holds.
    """

    finite: bool
    relative_error: float
    relative_error_without_refit: float | None = None
    tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
