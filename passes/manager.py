"""The pass manager's public names, kept for code written against earlier releases.

The passes, the state and the runner live in ``llmrank.passes.pipeline``; this module only
gives them their earlier names (``PipelineState`` is ``PruneState``, ``PipelineError`` is
``PassError``).
"""

from llmrank.ir.errors import PassError as PipelineError
from llmrank.ir.graph import ModelIR
from llmrank.passes.pipeline import (
    Analyze, Calibrate, CheckOutputs, Compensate, FunctionPass, Pass, PassResult, Pipeline, Score, Select, Shrink, Trace, Verify,
)
from llmrank.passes.pipeline import PruneState as PipelineState

__all__ = [
    "Analyze", "Calibrate", "CheckOutputs", "Compensate", "FunctionPass", "Pass", "PassResult", "Pipeline", "PipelineError",
    "PipelineState", "Score", "Select", "Shrink", "Trace", "Verify", "calibrated_linears",
]


def calibrated_linears(ir: ModelIR) -> list[str]:
    """Group members plus the Linears writing into producers (what the dataflow chain reads)."""
    return ir.calibration_linears()
