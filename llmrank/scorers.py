"""The neuron scoring formulas, as a public import path (they live in ``llmrank.passes.scorers``)."""

from llmrank.passes.scorers import *  # noqa: F401,F403
from llmrank.passes.scorers import lowest  # noqa: F401
