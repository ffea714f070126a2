"""llmrank: structured pruning of transformer FFNs by graph centrality (LLM-Rank).

Public API: ``prune`` (the whole pipeline), ``PruneConfig`` (every option), the passes one by
one, the pipeline they form (``Pipeline``, ``PruneState``), and the scorer table
(``register_scorer``, ``scorer``) that every route reads.
"""

from llmrank.api import PruneResult, count_parameters, prune
from llmrank.exporters.hf import load_hf as load
from llmrank.ir.errors import (
    CalibrationError, ConfigError, ExportError, InputError, LLMRankError, PassError, TraceError,
    UnsupportedModelError, VerificationError,
)
from llmrank.ir.graph import ChannelGroup, LinearInfo, ModelIR, Port, Slot
from llmrank.ir.trace import Traced, trace
from llmrank.passes.analyze import analyze
from llmrank.passes.calibrate import ActivationNorms, calibrate
from llmrank.passes.config import PruneConfig
from llmrank.layerwise import prune_layerwise
from llmrank.passes.pipeline import Pipeline, PruneState
from llmrank.passes.program import prune_program
from llmrank.passes.registry import ScoreRequest, ScorerSpec, get_scorer, register_scorer, scorer, scorer_names
from llmrank.passes.score import ScoreConfig, Scores, score
from llmrank.passes.select import select
from llmrank.passes.shrink import mask, mask_paper, shrink
from llmrank.passes.verify import Verification, verify

__version__ = "0.2.0"

__all__ = [
    "ActivationNorms", "CalibrationError", "ChannelGroup", "ConfigError", "ExportError", "InputError", "LLMRankError",
    "LinearInfo", "ModelIR", "PassError", "Pipeline", "Port", "PruneConfig",
    "PruneResult", "PruneState", "ScoreConfig", "ScoreRequest", "ScorerSpec", "Scores", "Slot", "TraceError", "Traced", "UnsupportedModelError",
    "Verification", "VerificationError", "analyze", "calibrate", "count_parameters", "get_scorer", "load", "mask", "mask_paper", "prune",
    "prune_layerwise", "prune_program", "register_scorer", "score", "scorer", "scorer_names", "select", "shrink", "trace", "verify",
]
