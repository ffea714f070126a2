"""Scoring pass: turn weights + activation norms into one score per channel of every group.

Representations (which layers form the centrality chain):
- ``isolated``: each FFN is its own two-layer MLP [primary producer (up_proj / fc1), consumer
  (down_proj / fc2)], starting from its own a_in.
- ``chained``: the authors' chain [up_0, down_0, up_1, down_1, ...]; the residual stream is
  the link, attention and norms are skipped.
- ``dataflow``: the chain read from the traced graph. A group's input score is the
  normalised sum of the output scores of every Linear that writes into its producers' input
  without crossing another Linear (the residual stream: earlier down_proj *and* o_proj); a
  down_proj contributes its propagated score, any other writer its normalised a_out. All
  producers are in-edges of a neuron (gate_proj and up_proj: the mean of their transition
  matrices), and the neuron's own activation is the input norm of the consumer, i.e. the
  value that really flows into down_proj (act(gate) * up). For the per-layer baselines the
  dataflow view also scores the whole group: activation = consumer a_in, l1 = producer rows
  plus consumer columns, wanda = sum over producers.
- ``taylor`` (the peers' criterion, a baseline): first-order Taylor importance from the
  gradients of the causal-LM loss (``llmrank.passes.gradients``), summed over every slot of
  the group whatever the representation; it needs the whole model at once. ``taylor`` sums
  w * dL/dw over the channel before the absolute value (the loss change when the whole channel
  goes, LLM-Pruner's "vector-wise"); ``taylor-element`` sums |w * dL/dw| per weight
  (LLM-Pruner's "element-wise", Torch-Pruning's GroupTaylorImportance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from llmrank.ir.errors import CalibrationError, ConfigError, UnsupportedModelError
from llmrank.ir.graph import ChannelGroup, HeadGroup, ModelIR, Port
from llmrank.passes import headscore  # registers the per-layer head scorers
from llmrank.passes import scorers as S
from llmrank.passes.calibrate import ActivationNorms
from llmrank.passes.gradients import FirstOrder, group_parts
from llmrank.passes.registry import ScoreRequest, ScorerSpec, get_scorer, register_scorer

REPRESENTATIONS = ("isolated", "chained", "dataflow")


@dataclass(frozen=True)
class ScoreConfig:
    """Which formula, on which chain, with which parameters."""

    scorer: str = "wpr"
    representation: str = "dataflow"
    theta: float = 0.5
    gamma: float = 0.5
    p: float = 1.0
    z_importance: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        get_scorer(self.scorer)  # unknown names fail here, with the choices
        if self.representation not in REPRESENTATIONS:
            raise ConfigError(f"unknown representation {self.representation!r}; choose one of {', '.join(REPRESENTATIONS)}")
        for name in ("theta", "gamma"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Scores:
    """Per group: a score per channel (sums to 1), and the score of the consumer's output rows;
    per head group (when heads are scored): a score per query head (sums to 1)."""

    groups: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Upstream:
    """What the groups before a slice of a model passed on, so a model can be scored one slice
    (decoder block) at a time with the scores of scoring it whole (``llmrank.passes.blocks.driver``).

    ``residual``: the dataflow view's parts written into the residual stream by earlier slices,
    in graph order (a group consumer's propagated exit score, any other writer's normalised
    a_out); they join the in-slice writers of every group whose input has their width.
    ``chain``: the chained view's last score (the previous group's exit), the next chain's start.
    ``groups`` / ``head_groups``: how many channel / head groups came before (the random
    scorers salt by index in the whole model).
    """

    residual: tuple[torch.Tensor, ...] = ()
    chain: torch.Tensor | None = None
    groups: int = 0
    head_groups: int = 0

    def after(self, ir: ModelIR, norms: ActivationNorms | None, scores: Scores, writers: Sequence[str]) -> Upstream:
        """This plus what ``ir``'s slice passes on: the parts of ``writers`` (its Linears that
        write into the slice's output, in graph order) and its last group's exit score."""
        written = {g.consumers[0].linear: scores.outputs[g.name] for g in ir.groups if g.name in scores.outputs}
        written |= {hg.o.linear: scores.outputs[hg.name] for hg in ir.head_groups if hg.name in scores.outputs}
        a_out = norms.a_out if norms is not None else {}
        parts = tuple(written[w] if w in written else S.normalize(a_out[w]) for w in writers if w in written or w in a_out)
        last = scores.outputs.get(ir.groups[-1].name, self.chain) if ir.groups else self.chain
        return Upstream(self.residual + parts, last, self.groups + len(ir.groups), self.head_groups + len(ir.head_groups))


def _weight(model: nn.Module, ir: ModelIR, port: Port, width: int, *, rows: bool) -> torch.Tensor:
    """A Linear's weight in (out x in) orientation; producer ports are cut to their block."""
    info = ir.linears[port.linear]
    w = model.get_parameter(info.weight).detach()
    w = w.t() if info.kind == "conv1d" else w
    return w[port.offset:port.offset + width] if rows else w


def _block(v: torch.Tensor, port: Port, width: int) -> torch.Tensor:
    return v[port.offset:port.offset + width]


def _need(norms: ActivationNorms, name: str, kind: str) -> torch.Tensor:
    table = norms.a_in if kind == "in" else norms.a_out
    if name not in table:
        raise CalibrationError(f"no calibration norms for {name!r}: the calibration inputs never reached it")
    return table[name]


def score(model: nn.Module, ir: ModelIR, norms: ActivationNorms | None, config: ScoreConfig, *,
          upstream: Upstream | None = None, head_scorer: str | None = None,
          variances: dict[str, torch.Tensor] | None = None, first_order: FirstOrder | None = None,
          scorer: ScorerSpec | None = None) -> Scores:
    """Score every channel group of ``ir`` (pure: reads the model, changes nothing).

    ``scorer``: the spec to run (default: the one registered under ``config.scorer``).
    ``upstream``: what earlier slices of the model passed on when ``ir`` is one slice of it
    (see :class:`Upstream`); None scores ``ir`` as the whole model. ``first_order``: the
    gradient statistics of the taylor scorer (``llmrank.passes.gradients.first_order``).
    ``head_scorer`` (a registered head scorer's name, ``auto`` resolved) also scores the query heads
    of every head group; when it is the neuron scorer's wpr / mpr on the dataflow view, heads and
    neurons are ranked on one graph (the heads' exit scores feed the FFNs after them).
    ``variances``: the o_proj input variances the fluctuation head scorer reads.
    """
    spec = scorer or get_scorer(config.scorer)
    if head_scorer is not None and ir.head_groups:
        head_spec = get_scorer(head_scorer, unit="heads")
        # one graph: the heads' exits feed the FFNs after them (only for the configured scorer itself, not a Score(x) override)
        if shares_graph(config, head_spec.name) and spec is get_scorer(config.scorer) and ir.groups:
            if norms is None:
                raise CalibrationError(f"head scorer {head_spec.name!r} needs calibration data")
            return _dataflow(model, ir, norms, config, upstream or Upstream(), heads=True)
        result = score(model, ir, norms, config, upstream=upstream, first_order=first_order, scorer=spec)
        result.heads = score_heads(model, ir, norms, config, head_spec, upstream=upstream, variances=variances)
        return result
    if not ir.groups:
        raise UnsupportedModelError(f"{ir.model_class} has no prunable channel group; nothing to score")
    if norms is None and "activations" in spec.needs:
        raise CalibrationError(f"scorer {spec.name!r} needs calibration data")
    if "gradients" in spec.needs and first_order is None:
        raise CalibrationError(f"scorer {spec.name!r} needs gradient statistics: run the Gradients pass before Score")
    if upstream is not None and not spec.sliceable:
        raise ConfigError(f"scorer {spec.name!r} is not declared sliceable ({spec.about or 'it may read other blocks'}), "
                          "so it cannot score a model block by block; prune in memory or choose another scorer")
    request = ScoreRequest(model, ir, norms, config, upstream=upstream, first_order=first_order)
    return as_scores(spec.fn(request), ir, spec.name)


def shares_graph(config: ScoreConfig, head_scorer: str) -> bool:
    """Whether heads and neurons are ranked on one dataflow graph (the neuron scorer's wpr / mpr
    with the same head scorer), which scores block by block like the neurons alone."""
    return head_scorer in CENTRALITY and config.scorer == head_scorer and config.representation == "dataflow"


def score_heads(model: nn.Module, ir: ModelIR, norms: ActivationNorms | None, config: ScoreConfig, spec: ScorerSpec, *,
                upstream: Upstream | None = None, variances: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every head group's query-head scores by the head scorer ``spec``, normalised per layer."""
    if norms is None and "activations" in spec.needs:
        raise CalibrationError(f"head scorer {spec.name!r} needs calibration data")
    if "variances" in spec.needs and not variances:
        raise CalibrationError(f"head scorer {spec.name!r} needs the o_proj input variances: calibrate with "
                               "variance_linears=headscore.variance_linears(ir) (PruneConfig does when it names this scorer)")
    if upstream is not None and not spec.sliceable:
        raise ConfigError(f"head scorer {spec.name!r} is not declared sliceable ({spec.about or 'it may read other blocks'}), "
                          "so it cannot score heads block by block; use head_scorer 'auto' (the neuron scorer's graph), "
                          "'activation' or 'fluctuation'")
    request = ScoreRequest(model, ir, norms, config, upstream=upstream, variances=variances)
    return as_head_scores(spec.fn(request), ir, spec.name)


def as_head_scores(value: object, ir: ModelIR, name: str) -> dict[str, torch.Tensor]:
    """A head scorer's answer, checked (one finite score per query head of every head group) and
    normalised to sum 1 per layer."""
    if not isinstance(value, dict):
        raise ConfigError(f"head scorer {name!r} must return a dict of head group name -> tensor, got {type(value).__name__}")
    out = {}
    for hg in ir.head_groups:
        got = value.get(hg.name)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (hg.heads,):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ConfigError(f"head scorer {name!r} gave {shape} scores for head group {hg.name!r} of {hg.heads} heads")
        out[hg.name] = S.normalize(got)
    return out


def as_scores(value: object, ir: ModelIR, name: str) -> Scores:
    """A scorer's answer as checked ``Scores``: one finite score per channel of every group."""
    scores = value if isinstance(value, Scores) else Scores(groups=dict(value)) if isinstance(value, dict) else None
    if scores is None:
        raise ConfigError(f"scorer {name!r} must return Scores or a dict of group name -> tensor, got {type(value).__name__}")
    for g in ir.groups:
        got = scores.groups.get(g.name)
        if got is None:
            raise ConfigError(f"scorer {name!r} gave no scores for group {g.name!r}")
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (g.width,):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise ConfigError(f"scorer {name!r} gave {shape} scores for group {g.name!r} of width {g.width}")
    return scores


def _up_down(model: nn.Module, ir: ModelIR, norms: ActivationNorms, g: ChannelGroup) -> list[S.ChainLayer]:
    up, down = g.primary, g.consumers[0]
    return [
        S.ChainLayer(_weight(model, ir, up, g.width, rows=True), _block(_need(norms, up.linear, "out"), up, g.width)),
        S.ChainLayer(_weight(model, ir, down, g.width, rows=False), _need(norms, down.linear, "out")),
    ]


def _run_chain(chain: list[S.ChainLayer], a_in: torch.Tensor, config: ScoreConfig, *, normalized: bool = False) -> list[torch.Tensor]:
    if config.scorer == "wpr":
        return S.wpr_chain(chain, a_in, theta=config.theta, gamma=config.gamma, normalized=normalized)
    return S.mpr_chain(chain, a_in, z_importance=config.z_importance, normalized=normalized)


def _chains(model: nn.Module, ir: ModelIR, norms: ActivationNorms, config: ScoreConfig, up: Upstream) -> Scores:
    out = Scores()
    if config.representation == "isolated":
        for g in ir.groups:
            up_s, down_s = _run_chain(_up_down(model, ir, norms, g), _need(norms, g.primary.linear, "in"), config)
            out.groups[g.name], out.outputs[g.name] = up_s, down_s
        return out
    chain = [layer for g in ir.groups for layer in _up_down(model, ir, norms, g)]
    _check_chain(chain, ir)
    if up.chain is not None:  # the previous slice's last exit score starts this slice's chain
        if up.chain.numel() != chain[0].weight.shape[1]:
            raise _chain_widths(ir, up.chain.numel(), chain[0].weight.shape[1])
        scores = _run_chain(chain, up.chain, config, normalized=True)
    else:
        scores = _run_chain(chain, _need(norms, ir.groups[0].primary.linear, "in"), config)
    for i, g in enumerate(ir.groups):
        out.groups[g.name], out.outputs[g.name] = scores[2 * i], scores[2 * i + 1]
    return out


def _check_chain(chain: list[S.ChainLayer], ir: ModelIR) -> None:
    for prev, nxt in zip(chain, chain[1:]):
        if prev.weight.shape[0] != nxt.weight.shape[1]:
            raise _chain_widths(ir, prev.weight.shape[0], nxt.weight.shape[1])


def _chain_widths(ir: ModelIR, out_width: int, in_width: int) -> ConfigError:
    return ConfigError(f"the chained representation needs each FFN's output width to equal the next FFN's input width "
                       f"({ir.model_class}: {out_width} vs {in_width}); use representation='isolated'")


def _dataflow(model: nn.Module, ir: ModelIR, norms: ActivationNorms, config: ScoreConfig, up: Upstream,
              *, heads: bool = False) -> Scores:
    """Neurons (and, with ``heads``, attention heads) in graph order on one dataflow graph.

    A head group is scored like an FFN whose hidden channels are the o_proj inputs: the flow
    into channel (h, d) is the mean of the transitions of its q row and of the k and v rows of
    its KV head; its activation the o_proj input norm; a head's score is the flow through its
    block of o_proj columns, i.e. the sum of its channels' scores (columns of the transition
    matrix sum to 1). The o_proj exit score then feeds the residual stream in place of its
    normalised a_out, so the FFNs after it see what the heads pass on.
    """
    out = Scores()
    written: dict[str, torch.Tensor] = {}  # consumer Linear -> propagated output score
    order = {name: i for i, name in enumerate(ir.linears)}
    items: list = list(ir.groups) + (list(ir.head_groups) if heads else [])
    items.sort(key=lambda it: order[(it.primary if isinstance(it, ChannelGroup) else it.q).linear])
    for item in items:
        reader = item.primary.linear if isinstance(item, ChannelGroup) else item.q.linear
        hidden = ir.linears[reader].in_features
        writers = [w for w in ir.feeders(reader) if ir.linears[w].out_features == hidden]
        parts = [p for p in up.residual if p.numel() == hidden]  # writers in earlier slices come first in graph order
        parts += [written[w] if w in written else S.normalize(norms.a_out[w]) for w in writers if w in written or w in norms.a_out]
        r = S.normalize(torch.stack(parts).sum(0)) if parts else S.normalize(_need(norms, reader, "in"))
        if isinstance(item, ChannelGroup):
            weights = [_weight(model, ir, p, item.width, rows=True) for p in item.producers]
            down, expand = item.consumers[0], None
            w_down = _weight(model, ir, down, item.width, rows=False)
        else:
            hg = item
            kv_rows = hg.kv_heads * hg.head_dim
            weights = [_weight(model, ir, hg.q, hg.heads * hg.head_dim, rows=True)]
            weights += [_weight(model, ir, p, kv_rows, rows=True) for p in (hg.k, hg.v)]
            down, expand = hg.o, _kv_index(hg)
            w_down = _weight(model, ir, down, 0, rows=False)[:, down.offset:down.offset + hg.heads * hg.head_dim]
        mid, exit_ = _flow(weights, expand, w_down, r, S.normalize(_need(norms, down.linear, "in")),
                           S.normalize(_need(norms, down.linear, "out")), config)
        if isinstance(item, ChannelGroup):
            out.groups[item.name], out.outputs[item.name] = mid, exit_
        else:
            out.heads[item.name] = S.normalize(mid.view(item.heads, item.head_dim).sum(1))
            out.outputs[item.name] = exit_  # what the block passes on to the next (Upstream.after)
        written[down.linear] = exit_
    return out


def _kv_index(hg: HeadGroup) -> torch.Tensor:
    """For each o_proj input channel (h, d): the row of its KV head's k / v block."""
    heads = torch.arange(hg.heads).repeat_interleave(hg.head_dim)
    return (heads // hg.n_rep) * hg.head_dim + torch.arange(hg.head_dim).repeat(hg.heads)


def _flow(weights: list[torch.Tensor], expand: torch.Tensor | None, w_down: torch.Tensor, r: torch.Tensor,
          mid_act: torch.Tensor, a_down: torch.Tensor, config: ScoreConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One producers -> hidden -> consumer step of wpr / mpr: the hidden and the exit scores.

    ``expand`` maps the rows of the producers after the first (k, v) onto the hidden channels.
    """
    def into(step) -> torch.Tensor:
        flows = [step(w) @ (r if config.scorer == "wpr" else r_in) for w in weights]
        if expand is not None:
            flows = flows[:1] + [f[expand] for f in flows[1:]]
        return torch.stack(flows).mean(0)

    if config.scorer == "wpr":
        mid = S.normalize(config.gamma * into(lambda w: S.transition(w, config.theta)) + (1 - config.gamma) * mid_act)
        return mid, S.normalize(config.gamma * (S.transition(w_down, config.theta) @ mid) + (1 - config.gamma) * a_down)
    r_in = r.clone()
    if config.z_importance:
        r_in[S.lowest(r_in, int(config.z_importance * r_in.numel()))] = 0.0
    mid = S.normalize(into(lambda w: w.to(torch.float64).abs()) * mid_act)
    mid_in = mid.clone()
    if config.z_importance:
        mid_in[S.lowest(mid_in, int(config.z_importance * mid_in.numel()))] = 0.0
    return mid, S.normalize((w_down.to(torch.float64).abs() @ mid_in) * a_down)


def _hits(request: ScoreRequest) -> Scores:
    """Forward authority (neuron output norm) times backward hub (where its output is read).

    The downstream importance of residual channel i for group g is how strongly the next
    group's producers read it, weighted by their neurons' output norms:
    sum_p sum_k |W_p[k, i]| * a_mid_next[k].
    """
    model, ir, norms, config = request.model, request.ir, request.norms, request.config
    out = Scores()
    for i, g in enumerate(ir.groups):
        down = g.consumers[0]
        w_down = _weight(model, ir, down, g.width, rows=False)
        downstream = None
        if i + 1 < len(ir.groups):
            nxt = ir.groups[i + 1]
            a_next = S.normalize(_need(norms, nxt.consumers[0].linear, "in"))
            reads = [_weight(model, ir, p, nxt.width, rows=True) for p in nxt.producers]
            if all(w.shape[1] == w_down.shape[0] for w in reads):
                downstream = sum(w.to(torch.float64).abs().T @ a_next for w in reads)
        out.groups[g.name] = S.hits(_need(norms, down.linear, "in"), w_down, downstream, gamma=config.gamma)
        out.outputs[g.name] = S.activation(_need(norms, down.linear, "out"))
    return out


def _taylor(request: ScoreRequest) -> Scores:
    """|sum of w * dL/dw over the group's slots| per channel (for taylor-element the parts are
    already sums of |w * dL/dw|, so this adds them); the consumer's output rows (read only by
    mask-paper) get their activation norm."""
    ir, norms, first_order = request.ir, request.norms, request.first_order
    out = Scores()
    for name, parts in group_parts(ir, first_order).items():
        out.groups[name] = S.taylor(parts)
        out.outputs[name] = S.activation(_need(norms, ir.group(name).consumers[0].linear, "out"))
    return out


def _per_layer(model: nn.Module, ir: ModelIR, norms: ActivationNorms | None, config: ScoreConfig, up: Upstream) -> Scores:
    out = Scores()
    dataflow = config.representation == "dataflow"
    for i, g in enumerate(ir.groups, start=up.groups):
        up, down = g.primary, g.consumers[0]
        w_up = _weight(model, ir, up, g.width, rows=True)
        w_down = _weight(model, ir, down, g.width, rows=False)
        if config.scorer in ("l1", "lp"):
            p = config.p if config.scorer == "lp" else 1.0
            if dataflow:
                rows = sum(torch.linalg.vector_norm(_weight(model, ir, q, g.width, rows=True).to(torch.float64), ord=p, dim=1) for q in g.producers)
                cols = torch.linalg.vector_norm(w_down.to(torch.float64), ord=p, dim=0)
                mid = S.normalize(rows + cols)
            else:
                mid = S.lp_norm(w_up, p)
            exit_ = S.lp_norm(w_down, p)
        elif config.scorer == "activation":
            mid = S.activation(_need(norms, down.linear, "in") if dataflow else _block(_need(norms, up.linear, "out"), up, g.width))
            exit_ = S.activation(_need(norms, down.linear, "out"))
        elif config.scorer == "wanda":
            if dataflow:
                mid = S.normalize(sum(S.wanda(_weight(model, ir, q, g.width, rows=True), _need(norms, q.linear, "in")) for q in g.producers))
            else:
                mid = S.wanda(w_up, _need(norms, up.linear, "in"))
            exit_ = S.wanda(w_down, _need(norms, down.linear, "in"))
        else:  # random
            mid = S.random_scores(g.width, config.seed, salt=2 * i)
            exit_ = S.random_scores(w_down.shape[0], config.seed, salt=2 * i + 1)
        out.groups[g.name], out.outputs[g.name] = mid, exit_
    return out


def _centrality(request: ScoreRequest) -> Scores:
    r = request
    up = r.upstream or Upstream()
    if r.config.representation == "dataflow":
        return _dataflow(r.model, r.ir, r.norms, r.config, up)
    return _chains(r.model, r.ir, r.norms, r.config, up)


def _per_layer_request(request: ScoreRequest) -> Scores:
    return _per_layer(request.model, request.ir, request.norms, request.config, request.upstream or Upstream())


_ACTS, _GRADS = ("activations",), ("activations", "gradients")
_REP = ("representation",)
#: The built-in scorers: name, function, what it reads besides the weights, whether it can score
#: block by block, which ScoreConfig parameters it reads, and what it is (why not block by block).
_BUILTINS = (
    ("wpr", _centrality, _ACTS, True, _REP + ("theta", "gamma"), "weighted PageRank along the chain (LLM-Rank)"),
    ("mpr", _centrality, _ACTS, True, _REP + ("z_importance",), "modified PageRank (MLP-Rank)"),
    ("hits", _hits, _ACTS, False, ("gamma",), "reads the next block's weights"),
    ("l1", _per_layer_request, (), True, _REP, "L1 norm of the weights"),
    ("lp", _per_layer_request, (), True, _REP + ("p",), "Lp norm of the weights"),
    ("activation", _per_layer_request, _ACTS, True, _REP, "activation norm"),
    ("wanda", _per_layer_request, _ACTS, True, _REP, "|W| times the input norm"),
    ("random", _per_layer_request, (), True, ("seed",), "seeded uniform"),
    ("taylor", _taylor, _GRADS, False, (), "the whole model's next-token loss, channel-wise"),
    ("taylor-element", _taylor, _GRADS, False, (), "the whole model's next-token loss, weight-wise"),
)
for _name, _fn, _needs, _sliceable, _reads, _about in _BUILTINS:
    register_scorer(_name, _fn, needs=_needs, sliceable=_sliceable, reads=_reads, about=_about, builtin=True)


def _centrality_heads(name: str) -> Callable[[ScoreRequest], dict[str, torch.Tensor]]:
    def score_heads_on_graph(r: ScoreRequest) -> dict[str, torch.Tensor]:
        head_config = replace(r.config, scorer=name, representation="dataflow")
        return _dataflow(r.model, r.ir, r.norms, head_config, Upstream(), heads=True).heads
    return score_heads_on_graph


#: The scorers that rank heads and neurons on one dataflow graph (beside another neuron scorer, heads on a graph of their own).
CENTRALITY = ("wpr", "mpr")
for _name in CENTRALITY:
    register_scorer(_name, _centrality_heads(_name), needs=_ACTS, sliceable=False,
                    reads=("theta", "gamma") if _name == "wpr" else ("z_importance",),
                    about="ranks heads on a second dataflow graph of the whole model", builtin=True, unit="heads")

#: The built-in scorers' names (``llmrank.passes.registry`` holds yours beside them).
SCORERS = tuple(entry[0] for entry in _BUILTINS)
HEAD_SCORERS = CENTRALITY + headscore.PER_LAYER
