"""The pruning IR: plain data describing which channels of a model can be cut together.

It is derived from a torch.export FX graph (see ``llmrank.passes.analyze``) and refers to
parameters and modules by their dotted paths in the user's model, so it stays valid for a
deep copy of that model and can be serialised as JSON for inspection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class LinearInfo:
    """A matrix multiply with a weight parameter: nn.Linear (``linear``) or GPT-2 Conv1D (``conv1d``).

    ``conv1d`` stores its weight as (in, out), so its output channels live on axis 1.
    """

    name: str
    weight: str
    bias: str | None
    kind: str
    in_features: int
    out_features: int
    node: str

    @property
    def out_axis(self) -> int:
        return 1 if self.kind == "conv1d" else 0

    @property
    def in_axis(self) -> int:
        return 0 if self.kind == "conv1d" else 1


@dataclass(frozen=True)
class Port:
    """A block of ``width`` channels of a Linear's output (producer) or input (consumer).

    ``offset`` is non-zero for fused layers, e.g. Phi-3's gate_up_proj whose up half starts at I.
    """

    linear: str
    offset: int = 0


@dataclass(frozen=True)
class Slot:
    """One parameter axis holding a group's channels (a block starting at ``offset``)."""

    param: str
    axis: int
    offset: int = 0


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together, e.g. one FFN's intermediate neurons.

    ``producers`` write the channels (rows of gate/up, fc1); ``consumers`` read them (columns
    of down, fc2). ``primary`` is the producer the paper scores: the branch that reaches the
    consumer without a nonlinearity (up_proj), or the only producer of a non-gated MLP.
    """

    name: str
    width: int
    producers: tuple[Port, ...]
    consumers: tuple[Port, ...]
    primary: Port
    slots: tuple[Slot, ...]


@dataclass(frozen=True)
class HeadGroup:
    """One attention layer's heads, read from the graph: what removing a query head touches.

    ``q`` / ``k`` / ``v`` are the producer ports (rows in blocks of ``head_dim`` per head; a fused
    qkv_proj gives three ports of one Linear at their offsets) and ``o`` the consumer port (columns
    in blocks of ``head_dim`` per query head). Query head h reads KV head ``h // n_rep`` (GQA,
    MQA: kv_heads = 1). ``q_slots`` hold ``heads * head_dim`` channels indexed by query head (q
    rows, their bias, o_proj columns); ``kv_slots`` hold ``kv_heads * head_dim`` channels indexed
    by KV head (k and v rows and biases). ``module`` is the attention module whose head-count
    attributes the rewrite updates.
    """

    name: str
    module: str
    heads: int
    kv_heads: int
    head_dim: int
    q: Port
    k: Port
    v: Port
    o: Port
    q_slots: tuple[Slot, ...]
    kv_slots: tuple[Slot, ...]

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads

    def kv_of(self, head: int) -> int:
        return head // self.n_rep

    def head_cost(self, linears: dict[str, "LinearInfo"]) -> int:
        """Parameters removed with one query head (q rows + bias, o columns), KV rows excluded."""
        q, o = linears[self.q.linear], linears[self.o.linear]
        return self.head_dim * (q.in_features + (1 if q.bias else 0) + o.out_features)

    def kv_cost(self, linears: dict[str, "LinearInfo"]) -> int:
        """Parameters removed with one KV head (k and v rows and biases)."""
        return sum(self.head_dim * (linears[p.linear].in_features + (1 if linears[p.linear].bias else 0)) for p in (self.k, self.v))


@dataclass
class ModelIR:
    """Everything the passes need to know about a model, in graph order."""

    model_class: str
    linears: dict[str, LinearInfo]
    groups: list[ChannelGroup]
    feeds: dict[str, tuple[str, ...]]
    blocked: dict[str, str] = field(default_factory=dict)
    head_groups: list[HeadGroup] = field(default_factory=list)

    def head_group(self, name: str) -> HeadGroup:
        for g in self.head_groups:
            if g.name == name:
                return g
        raise KeyError(f"no head group named {name!r}; known: {[g.name for g in self.head_groups]}")

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no channel group named {name!r}; known: {[g.name for g in self.groups]}")

    def feeders(self, linear: str) -> list[str]:
        """Linears whose output reaches ``linear``'s input without crossing another Linear."""
        return [src for src, dsts in self.feeds.items() if linear in dsts]

    def calibration_linears(self) -> list[str]:
        """Linears whose norms the scorers read: group members and the writers into producers."""
        names = {port.linear for g in self.groups for port in (*g.producers, *g.consumers)}
        for g in self.groups:
            names.update(self.feeders(g.primary.linear))
        for hg in self.head_groups:
            names.update((hg.q.linear, hg.o.linear, *self.feeders(hg.q.linear)))
        return [n for n in self.linears if n in names]

    def prunable_parameters(self) -> int:
        """Number of weights that removing every channel of every group would delete."""
        return sum(g.width * self.channel_cost(g) for g in self.groups)

    def channel_cost(self, group: ChannelGroup) -> int:
        """Parameters removed with one channel of ``group`` (weights and biases)."""
        cost = 0
        for port in group.producers:
            lin = self.linears[port.linear]
            cost += lin.in_features + (1 if lin.bias else 0)
        for port in group.consumers:
            cost += self.linears[port.linear].out_features
        return cost

    def to_dict(self) -> dict:
        return {
            "model_class": self.model_class,
            "linears": {k: asdict(v) for k, v in self.linears.items()},
            "groups": [asdict(g) for g in self.groups],
            "feeds": {k: list(v) for k, v in self.feeds.items()},
            "blocked": dict(self.blocked),
            "head_groups": [asdict(g) for g in self.head_groups],
        }
