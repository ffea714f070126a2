"""Routes and what each can do: a PruneConfig is checked against its route once, before any model is read.

The passes are one list (``pipeline.py``); a route is how they are fed and applied:

- **in memory**: an ``nn.Module`` held whole (``llmrank.prune``);
- **block by block**: a safetensors checkpoint streamed one decoder block at a time
  (``llmrank.passes.blocks``), for models larger than the memory budget;
- **exported program**: a ``torch.export`` program, rewritten in its graph (``prune_program``).

Each route declares its capabilities as data. An option either runs the same way on every
route that has what it needs, or is refused here, with the reason and the way out, before any
weight is read. Nothing downstream checks a route again.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmrank.ir.errors import ConfigError
from llmrank.passes.config import PruneConfig
from llmrank.passes.score import shares_graph

#: Capability names (fields of :class:`Route`) and what each means, for the refusal text.
CAPABILITIES = {
    "whole_model_loss": "a forward and backward pass of the whole model's next-token loss",
    "heads": "attention heads that can be cut",
    "whole_model_weights": "every block's weights at once while scoring",
    "decoder_blocks": "decoder blocks to walk with a pruned stream",
    "masks": "dense shapes with zeroed channels (the mask modes)",
    "inplace": "the caller's model object to rewrite",
}


@dataclass(frozen=True)
class Route:
    """A way to run the passes, and what it can honour."""

    name: str
    whole_model_loss: bool
    heads: bool
    whole_model_weights: bool
    decoder_blocks: bool
    masks: bool
    inplace: bool
    way_out: str


IN_MEMORY = Route("in memory", whole_model_loss=True, heads=True, whole_model_weights=True, decoder_blocks=True,
                  masks=True, inplace=True, way_out="")
BLOCKS = Route("block by block", whole_model_loss=False, heads=True, whole_model_weights=False, decoder_blocks=True,
               masks=False, inplace=False,
               way_out="prune in memory instead (drop --layerwise, or raise --max-memory on a machine that has it)")
PROGRAM = Route("exported program", whole_model_loss=False, heads=False, whole_model_weights=True, decoder_blocks=False,
                masks=False, inplace=False,
                way_out="prune the nn.Module with llmrank.prune, which has the whole model")
ROUTES = {r.name: r for r in (IN_MEMORY, BLOCKS, PROGRAM)}


def needs(config: PruneConfig, *, heal: bool = False) -> list[tuple[str, str]]:
    """(capability, which option needs it) for every capability ``config`` (and a heal) relies on."""
    out: list[tuple[str, str]] = []
    spec = config.scorer_spec
    if "gradients" in spec.needs:
        out.append(("whole_model_loss", f"scorer {config.scorer!r}"))
    if config.allocation in ("fisher", "loss"):
        out.append(("whole_model_loss", f"allocation {config.allocation!r}"))
    if heal:
        out.append(("whole_model_loss", "a heal (--heal-tokens/--heal-minutes)"))
    if not spec.sliceable and "gradients" not in spec.needs:  # a loss walk is refused on its own
        why = spec.about if spec.builtin else "not registered with sliceable=True"
        out.append(("whole_model_weights", f"scorer {config.scorer!r} ({why})"))
    if config.heads:
        out.append(("heads", "head_sparsity" if config.head_sparsity > 0 else "target_params with head_share > 0"))
    if config.heads and not config.head_scorer_spec.sliceable and not shares_graph(config.scoring, config.head_scoring):
        head = config.head_scorer_spec
        why = head.about if head.builtin else "not registered with sliceable=True"
        out.append(("whole_model_weights", f"head_scorer {config.head_scoring!r} beside scorer {config.scorer!r} "
                                         f"({config.representation}; {why})"))
    if config.refit_inputs != "dense":
        out.append(("decoder_blocks", f"refit_inputs {config.refit_inputs!r}"))
    if config.mode != "shrink":
        out.append(("masks", f"mode {config.mode!r}"))
    if config.inplace:
        out.append(("inplace", "inplace=True"))
    return out


def refusals(config: PruneConfig, route: Route, *, heal: bool = False) -> list[str]:
    """Why ``route`` cannot honour ``config`` (empty: it can, all of it)."""
    return [f"{option} needs {CAPABILITIES[cap]}, which the {route.name} route does not have"
            for cap, option in needs(config, heal=heal) if not getattr(route, cap)]


def check(config: PruneConfig, route: Route, *, heal: bool = False, why: str = "") -> None:
    """Raise a ConfigError naming every option ``route`` cannot honour, why, and the way out.

    ``why`` says how the route was chosen (e.g. that the model does not fit the memory budget),
    so a user who never asked for that route learns why it was taken.
    """
    reasons = refusals(config, route, heal=heal)
    if not reasons:
        return
    head = f"this prune runs {route.name}" + (f" ({why})" if why else "")
    raise ConfigError(f"{head}: " + "; ".join(reasons) + (f". Either {route.way_out}, or drop those options" if route.way_out
                                                        else ". Drop those options"))
