"""llmrank: structured pruning of transformer FFNs by graph centrality (LLM-Rank).

Public API: ``prune`` (the whole pipeline) and the passes one by one.
"""

from llmrank.api import PruneError, PruneResult, count_parameters, prune
from llmrank.exporters.hf import load_hf as load
from llmrank.ir.graph import ChannelGroup, LinearInfo, ModelIR, Port, Slot
from llmrank.ir.trace import TraceError, Traced, trace
from llmrank.passes.analyze import analyze
from llmrank.passes.calibrate import ActivationNorms, CalibrationError, calibrate
from llmrank.passes.score import ScoreConfig, Scores, score
from llmrank.passes.select import select
from llmrank.passes.shrink import mask, mask_paper, shrink
from llmrank.passes.verify import Verification, verify
from llmrank.passes.program import ProgramResult, prune_program
from llmrank.passes.manager import Pipeline, PipelineState

__version__ = "0.1.0"

__all__ = [
    "ActivationNorms", "CalibrationError", "ChannelGroup", "LinearInfo", "ModelIR", "Port", "PruneError", "PruneResult",
    "ScoreConfig", "Scores", "Slot", "TraceError", "Traced", "Verification", "Pipeline", "PipelineState", "ProgramResult", "prune_program", "analyze", "calibrate", "count_parameters",
    "load", "mask", "mask_paper", "prune", "score", "select", "shrink", "trace", "verify",
]
