"""Analysis pass: find Linears, their coupled channel groups and the dataflow DAG in an FX graph.

The rule, independent of module names: the input channels of a Linear (a *consumer*) can be
removed when, walking backwards through channel-preserving ops (activations, products, scalar
arithmetic, views that keep the last dim, splits of the last dim), every path ends at the
output of another Linear (a *producer*) and nothing else reads those channels. The producers'
rows, the consumers' columns, matching bias entries and any per-channel parameter met on the
way form one channel group. Walks that meet a norm, a reshape into heads, an embedding, a
residual sum of different writers, or the model output mark the channels as not cuttable.
Attention projections are cut in whole heads instead: ``passes/heads.py`` finds those groups
from the attention ops, and ``analyze`` returns both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from llmrank.ir.graph import ChannelGroup, HeadGroup, LinearInfo, ModelIR, Port, Slot
from llmrank.ir.errors import InputError
from llmrank.ir.trace import Traced
from llmrank.passes.heads import find_head_groups
from llmrank.passes.ops import BINARY, LINEAR_OPS, NONLINEAR, SHAPE_ONLY, SPLITS, UNARY, VIEWS, linear_data_input, linear_weight_arg, op_name

def _val(node: object) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def last_dim(node: object) -> int | None:
    value = _val(node)
    if value is None or value.dim() == 0:
        return None
    size = value.shape[-1]
    return int(size) if isinstance(size, int) else None


@dataclass
class _Graph:
    """Index of a traced graph: Linear nodes and parameter placeholders."""

    traced: Traced
    linear_of_node: dict[fx.Node, LinearInfo] = field(default_factory=dict)
    param_of_node: dict[fx.Node, str] = field(default_factory=dict)

    def info(self, linear: str) -> LinearInfo:
        return next(lin for lin in self.linear_of_node.values() if lin.name == linear)

    def data_input(self, node: fx.Node) -> fx.Node:
        return linear_data_input(node)


def _index(traced: Traced) -> _Graph:
    graph = _Graph(traced)
    model = traced.model
    for node in traced.program.graph.nodes:
        if node.op == "placeholder":
            path = traced.param_path(node.name)
            if path is not None:
                graph.param_of_node[node] = path
    for node in traced.program.graph.nodes:
        name = op_name(node)
        if name not in LINEAR_OPS:
            continue
        weight_node = linear_weight_arg(node)
        if weight_node not in graph.param_of_node:
            continue  # a matmul of two activations (attention), not a layer
        module_path = _module_path(node, traced.prefix)
        module = model.get_submodule(module_path) if module_path else None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        kind = "conv1d" if name == "addmm" else "linear"
        in_f, out_f = (weight.shape[0], weight.shape[1]) if kind == "conv1d" else (weight.shape[1], weight.shape[0])
        bias = getattr(module, "bias", None)
        graph.linear_of_node[node] = LinearInfo(
            name=module_path, weight=f"{module_path}.weight", bias=f"{module_path}.bias" if isinstance(bias, torch.Tensor) else None,
            kind=kind, in_features=int(in_f), out_features=int(out_f), node=node.name,
        )
    return graph


def _module_path(node: fx.Node, prefix: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


@dataclass
class _Walk:
    """State of one backward walk from a consumer's input."""

    width: int
    region: set[fx.Node] = field(default_factory=set)
    producers: dict[Port, bool] = field(default_factory=dict)  # port -> reached by a linear path
    param_slots: set[Slot] = field(default_factory=set)
    escape: str | None = None
    seen: set[tuple[fx.Node, int, bool]] = field(default_factory=set)


def _walk_back(g: _Graph, node: fx.Node, offset: int, activated: bool, walk: _Walk) -> None:
    stack = [(node, offset, activated)]
    while stack and walk.escape is None:
        node, offset, activated = stack.pop()
        if (node, offset, activated) in walk.seen:
            continue
        walk.seen.add((node, offset, activated))
        walk.region.add(node)
        lin = g.linear_of_node.get(node)
        if lin is not None:
            port = Port(lin.name, offset)
            walk.producers[port] = walk.producers.get(port, False) or not activated
            continue
        name = op_name(node)
        if name in UNARY:
            stack.append((node.args[0], offset, activated or name in NONLINEAR))
        elif name in BINARY:
            for arg in node.args[:2]:
                if not isinstance(arg, fx.Node) or _broadcasts(arg):
                    continue
                if arg in g.param_of_node and last_dim(arg) == walk.width:
                    walk.param_slots.add(Slot(g.param_of_node[arg], _val(arg).dim() - 1, 0))
                else:
                    stack.append((arg, offset, activated))
        elif name in VIEWS and last_dim(node.args[0]) == last_dim(node) == walk.width:
            stack.append((node.args[0], offset, activated))
        elif name == "slice" and _dim(node, 1) not in (-1, _val(node).dim() - 1):
            stack.append((node.args[0], offset, activated))
        elif name == "getitem" and _is_last_dim_split(node.args[0]):
            split = node.args[0]
            stack.append((split.args[0], offset + _split_offset(split, node.args[1]), activated))
        else:
            walk.escape = f"{name} ({_module_path(node, g.traced.prefix) or node.name})"


def _broadcasts(node: fx.Node) -> bool:
    value = _val(node)
    return value is None or value.dim() == 0 or value.shape[-1] == 1


def _dim(node: fx.Node, position: int, default: int = 0) -> int:
    if len(node.args) > position:
        return int(node.args[position])
    return int(node.kwargs.get("dim", default))


def _is_last_dim_split(node: object) -> bool:
    if not isinstance(node, fx.Node) or op_name(node) not in SPLITS:
        return False
    value = _val(node.args[0])
    dim = _dim(node, 2)
    return value is not None and dim in (-1, value.dim() - 1)


def _split_offset(split: fx.Node, index: int) -> int:
    total = last_dim(split.args[0])
    sizes = split.args[1]
    if op_name(split) == "chunk":
        chunk = -(-total // int(sizes))
        return chunk * index
    if isinstance(sizes, int):
        return sizes * index
    return sum(int(s) for s in sizes[:index])


def _consumers_of(g: _Graph, walk: _Walk) -> tuple[set[fx.Node], str | None]:
    """Linears reading the region, or the first reader that is neither region nor Linear."""
    consumers: set[fx.Node] = set()
    for node in walk.region:
        for user in node.users:
            if user in walk.region or op_name(user) in SHAPE_ONLY:
                continue
            if user in g.linear_of_node and g.data_input(user) is node:
                consumers.add(user)
            elif op_name(user) in SPLITS and all(item in walk.region for item in user.users):
                continue
            else:
                return consumers, f"{op_name(user)} ({_module_path(user, g.traced.prefix) or user.name})"
    return consumers, None


def _mixes_writers(g: _Graph, walk: _Walk) -> bool:
    """True when an add/sub joins tensors written by different producers (a residual sum)."""
    for node in walk.region:
        if op_name(node) not in ("add", "sub", "add_", "sub_"):
            continue
        sources = [frozenset(_sources(g, arg, walk.region)) for arg in node.args[:2] if isinstance(arg, fx.Node) and arg in walk.region]
        if len(sources) == 2 and sources[0] != sources[1]:
            return True
    return False


def _sources(g: _Graph, node: fx.Node, region: set[fx.Node]) -> set[str]:
    found, queue, seen = set(), deque([node]), set()
    while queue:
        cur = queue.popleft()
        if cur in seen or cur not in region:
            continue
        seen.add(cur)
        if cur in g.linear_of_node:
            found.add(g.linear_of_node[cur].name)
            continue
        queue.extend(a for a in cur.all_input_nodes)
    return found


def _find_group(g: _Graph, consumer: fx.Node) -> tuple[_Walk, set[fx.Node]] | str:
    """Grow a group from one consumer until closed; return it or the reason it cannot be cut."""
    width = g.linear_of_node[consumer].in_features
    walk = _Walk(width)
    consumers: set[fx.Node] = set()
    pending = [consumer]
    while pending:
        node = pending.pop()
        consumers.add(node)
        _walk_back(g, g.data_input(node), 0, False, walk)
        if walk.escape:
            return f"its input channels come from {walk.escape}"
        found, escape = _consumers_of(g, walk)
        if escape:
            return f"its input channels are also read by {escape}"
        pending.extend(found - consumers)
    if not walk.producers:
        return "no Linear writes its input channels"
    if _mixes_writers(g, walk):
        return "its input channels are a residual sum of several Linears"
    return walk, consumers


def _shared_params(model: nn.Module) -> set[str]:
    """Parameter paths that share storage with another path (tied weights)."""
    by_ptr: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_ptr.setdefault(param.data_ptr(), []).append(name)
    return {name for names in by_ptr.values() if len(names) > 1 for name in names}


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for tokens in zip(*parts):
        if len(set(tokens)) != 1:
            break
        common.append(tokens[0])
    return ".".join(common) or names[0]


def reach_forward(node: fx.Node, linears: Mapping[fx.Node, str]) -> tuple[tuple[str, ...], bool]:
    """Where ``node``'s output goes without crossing a Linear: the Linears it feeds (breadth
    first) and whether it reaches the graph's output (then the Linear writes the residual stream)."""
    reached: list[str] = []
    output = False
    queue, seen = deque(node.users), set()
    while queue:
        cur = queue.popleft()
        if cur in seen:
            continue
        seen.add(cur)
        target = linears.get(cur)
        if target is not None:
            if target not in reached:
                reached.append(target)
            continue
        output = output or cur.op == "output"
        queue.extend(cur.users)
    return tuple(reached), output


def _feeds(g: _Graph) -> dict[str, tuple[str, ...]]:
    names = {node: lin.name for node, lin in g.linear_of_node.items()}
    return {lin.name: reach_forward(node, names)[0] for node, lin in g.linear_of_node.items()}


def residual_writers(traced: Traced, ir: ModelIR) -> list[str]:
    """Linears whose output reaches the traced graph's output without crossing another Linear
    (a decoder block's o_proj and down_proj: the residual stream's writers), in graph order."""
    by_name = {info.node: name for name, info in ir.linears.items()}
    names = {node: by_name[node.name] for node in traced.program.graph.nodes if node.name in by_name}
    return [name for node, name in names.items() if reach_forward(node, names)[1]]


def analyze(traced: Traced, *, prune_tied: bool = False) -> ModelIR:
    """Build the pruning IR of a traced model: groups in graph order, feeds, and what is blocked."""
    g = _index(traced)
    shared = set() if prune_tied else _shared_params(traced.model)
    groups: list[ChannelGroup] = []
    blocked: dict[str, str] = {}
    claimed: set[fx.Node] = set()
    order = {node: i for i, node in enumerate(traced.program.graph.nodes)}
    for consumer in g.linear_of_node:
        if consumer in claimed:
            continue
        found = _find_group(g, consumer)
        if isinstance(found, str):
            blocked.setdefault(g.linear_of_node[consumer].name, f"input side: {found}")
            continue
        walk, consumers = found
        claimed |= consumers
        group = _make_group(g, walk, consumers, order)
        tied = [s.param for s in group.slots if s.param in shared]
        if tied:
            blocked[group.name] = f"tied weights: {', '.join(tied)}"
            continue
        groups.append(group)
    groups.sort(key=lambda grp: min(order[_node_of(g, p.linear)] for p in grp.producers))
    _dedupe_names(groups)
    producers = {p.linear for grp in groups for p in grp.producers}
    for lin in g.linear_of_node.values():
        if lin.name not in producers:
            blocked.setdefault(lin.name, "its output channels are not a prunable group (residual stream, attention heads or model output)")
    heads, heads_blocked = find_head_groups(traced.program.graph, g.linear_of_node, g.param_of_node,
                                            lambda node: _module_path(node, traced.prefix))
    heads = _untied_heads(heads, shared, blocked, {grp.name for grp in groups})
    blocked.update(heads_blocked)
    return ModelIR(type(traced.model).__name__, {lin.name: lin for lin in g.linear_of_node.values()}, groups, _feeds(g), blocked, heads)


def _untied_heads(heads: list[HeadGroup], shared: set[str], blocked: dict[str, str], taken: set[str]) -> list[HeadGroup]:
    """Head groups whose parameters are not tied elsewhere, under names no channel group uses."""
    out = []
    for hg in heads:
        tied = [s.param for s in (*hg.q_slots, *hg.kv_slots) if s.param in shared]
        if tied:
            blocked[f"heads:{hg.name}"] = f"tied weights: {', '.join(tied)}"
        elif hg.name in taken or any(o.name == hg.name for o in out):
            blocked[f"heads:{hg.name}"] = "two attention ops in one module"
        else:
            out.append(hg)
    return out


def _node_of(g: _Graph, linear: str) -> fx.Node:
    return next(node for node, lin in g.linear_of_node.items() if lin.name == linear)


def _make_group(g: _Graph, walk: _Walk, consumers: set[fx.Node], order: dict[fx.Node, int]) -> ChannelGroup:
    producers = tuple(sorted(walk.producers, key=lambda p: (order[_node_of(g, p.linear)], p.offset)))
    linear_paths = [p for p, plain in walk.producers.items() if plain]
    primary = min(linear_paths or list(producers), key=lambda p: (order[_node_of(g, p.linear)], p.offset))
    cons = tuple(Port(g.linear_of_node[c].name, 0) for c in sorted(consumers, key=order.__getitem__))
    slots: list[Slot] = []
    for port in producers:
        info = g.info(port.linear)
        slots.append(Slot(info.weight, info.out_axis, port.offset))
        if info.bias:
            slots.append(Slot(info.bias, 0, port.offset))
    for port in cons:
        info = g.info(port.linear)
        slots.append(Slot(info.weight, info.in_axis, 0))
    slots.extend(sorted(walk.param_slots, key=lambda s: s.param))
    name = _common_prefix([p.linear for p in producers] + [c.linear for c in cons])
    return ChannelGroup(name, walk.width, producers, cons, primary, tuple(slots))


def _dedupe_names(groups: list[ChannelGroup]) -> None:
    seen: dict[str, int] = {}
    for i, grp in enumerate(groups):
        if grp.name in seen:
            seen[grp.name] += 1
            groups[i] = ChannelGroup(f"{grp.name}#{seen[grp.name]}", grp.width, grp.producers, grp.consumers, grp.primary, grp.slots)
        else:
            seen[grp.name] = 0


def group_regions(traced: Traced, ir: ModelIR) -> dict[str, tuple[str, ...]]:
    """FX node names (in ``traced.program.graph``) that carry each group's channels.

    The region is what the backward walk of ``analyze`` covered: the producers, the
    channel-preserving ops between them and the consumers' inputs. A graph rewrite that
    shrinks a group updates the shape constants (view sizes, split sizes) of these nodes.
    """
    g = _index(traced)
    by_name = {node.name: node for node in g.linear_of_node}
    order = {node: i for i, node in enumerate(traced.program.graph.nodes)}
    regions: dict[str, tuple[str, ...]] = {}
    for group in ir.groups:
        found = _find_group(g, by_name[ir.linears[group.consumers[0].linear].node])
        if isinstance(found, str):
            raise InputError(f"group {group.name!r} no longer closes in this graph: {found}")
        regions[group.name] = tuple(node.name for node in sorted(found[0].region, key=order.__getitem__))
    return regions
