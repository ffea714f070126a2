"""Analysis of attention heads: which rows and columns removing one query head touches.

Read from the traced graph, not from module names. Each attention op (``aten.scaled_dot_product
_attention``, or the eager pattern ``matmul(q, k^T) -> softmax -> matmul(p, v)``) is the anchor:
its q, k and v inputs are walked back through ops that keep the head axis (transposes, views that
split the last dim into (heads, head_dim), rotary embeddings and qk-norms acting within head_dim,
the repeat of KV heads: unsqueeze -> expand -> reshape) to the Linears that write them; its output
is walked forward through the merge of the heads to the Linear that reads it (o_proj). Head counts
and head_dim come from the tensor shapes (``meta['val']``). Anything else on the way (a
parameter with one entry per head, a position bias, a reshape that interleaves q, k and v per
head) leaves the layer's heads uncut, with the reason in ``ModelIR.blocked``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from llmrank.ir.graph import HeadGroup, LinearInfo, Port, Slot
from llmrank.passes.ops import BINARY, SHAPE_ONLY, UNARY, linear_data_input, op_name

_PASS_THROUGH = {"clone", "contiguous", "to", "_to_copy", "alias", "detach", "type_as", "dropout", "lift_fresh_copy"}
_ELEMENTWISE = {"rsqrt", "reciprocal", "sin", "cos", "square", "log", "sign"}
_RESHAPES = {"view", "reshape", "_unsafe_view"}
_SOFTMAX_PATH = {"mul", "div", "add", "sub", "tanh", "to", "_to_copy", "type_as", "clone", "contiguous", "alias"}


class _Blocked(Exception):
    """A walk met something it cannot map to heads; the message is the reason."""


def _shape(node: object) -> tuple[str, ...] | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(str(s) for s in value.shape) if isinstance(value, torch.Tensor) else None


def _size(node: fx.Node, axis: int) -> int:
    size = node.meta["val"].shape[axis]
    if not isinstance(size, int):
        raise _Blocked(f"{node.name} has a symbolic size on its head axis")
    return size


def _dim(value: int, rank: int) -> int:
    return value + rank if value < 0 else value


@dataclass
class _Found:
    """Where one of q, k, v comes from: a producer port, its head count, the repeat factor."""

    port: Port
    heads: int
    rep: int


@dataclass
class _Walker:
    """Backward and forward walks from one attention op; ``region`` collects the nodes crossed."""

    linear_of_node: dict[fx.Node, LinearInfo]
    param_of_node: dict[fx.Node, str]
    from_linear: set[fx.Node]
    region: set[fx.Node] = field(default_factory=set)
    readers: set[fx.Node] = field(default_factory=set)

    # ---------------------------------------------------------------- backward, head layout

    def back(self, node: fx.Node, axis: int) -> _Found:
        """Walk ``node`` (head axis ``axis``, head_dim last) back to its producer Linear."""
        found: list[_Found] = []
        stack, seen = [(node, axis, 1)], set()
        while stack:
            cur, a, rep = stack.pop()
            if (cur, a, rep) in seen:
                continue
            seen.add((cur, a, rep))
            self.region.add(cur)
            stack.extend(self._step_back(cur, a, rep, found))
        ports = {(f.port, f.heads, f.rep) for f in found}
        if len(ports) != 1:
            raise _Blocked(f"{node.name} is written by {len(ports)} different producers")
        return found[0]

    def _step_back(self, cur: fx.Node, a: int, rep: int, found: list[_Found]) -> list[tuple[fx.Node, int, int]]:
        name, shape = op_name(cur), _shape(cur)
        if shape is None:
            raise _Blocked(f"{cur.name} has no shape")
        rank = len(shape)
        if cur in self.param_of_node:
            raise _Blocked(f"parameter {self.param_of_node[cur]} has one entry per head")
        if name in _PASS_THROUGH or name in UNARY or name in _ELEMENTWISE:
            return [(cur.args[0], a, rep)]
        if name == "transpose":
            d0, d1 = _dim(int(cur.args[1]), rank), _dim(int(cur.args[2]), rank)
            return [(cur.args[0], d1 if a == d0 else d0 if a == d1 else a, rep)]
        if name == "permute":
            return [(cur.args[0], _dim(int(cur.args[1][a]), rank), rep)]
        if name in BINARY:
            return [(arg, a - (rank - len(_shape(arg))), rep) for arg in cur.args[:2] if self._carries_heads(arg, cur, a)]
        if name in ("mean", "sum", "amax") and a < rank - 1 and cur.kwargs.get("keepdim", cur.args[2] if len(cur.args) > 2 else False):
            dims = [_dim(int(d), len(_shape(cur.args[0]))) for d in (cur.args[1] if isinstance(cur.args[1], (list, tuple)) else [cur.args[1]])]
            if a not in dims:
                return [(cur.args[0], a, rep)]
        if name == "slice" and _dim(int(cur.args[1]) if len(cur.args) > 1 else 0, rank) != a:
            return [(cur.args[0], a, rep)]
        if name == "cat" and _dim(int(cur.args[1]) if len(cur.args) > 1 else 0, rank) != a:
            return [(x, a, rep) for x in cur.args[0]]
        if name in _RESHAPES:
            return self._reshape_back(cur, a, rep, found)
        raise _Blocked(f"{name} ({cur.name}) on the way to the attention")

    def _carries_heads(self, arg: object, cur: fx.Node, a: int) -> bool:
        """Whether a binary op's operand holds the head axis (else it broadcasts over heads, as
        rotary cos/sin do). With one head (MQA) sizes cannot tell: an operand computed from a
        Linear's output carries heads, one computed from positions alone does not."""
        if not isinstance(arg, fx.Node):
            return False
        shape = _shape(arg)
        if shape is None:
            raise _Blocked(f"{arg.name} has no shape")
        pos = a - (len(_shape(cur)) - len(shape))
        if pos < 0 or shape[pos] != _shape(cur)[a]:
            return False
        return shape[pos] != "1" or arg in self.from_linear

    def _reshape_back(self, cur: fx.Node, a: int, rep: int, found: list[_Found]) -> list[tuple[fx.Node, int, int]]:
        src = cur.args[0]
        out, inp = _shape(cur), _shape(src)
        if out == inp:
            return [(src, a, rep)]
        # repeat of KV heads: reshape(expand(unsqueeze(x, a + 1))) merges (kv, n_rep) into heads
        if op_name(src) == "expand" and op_name(src.args[0]) == "unsqueeze":
            unsq = src.args[0]
            x = unsq.args[0]
            if _dim(int(unsq.args[1]), len(inp)) == a + 1 and len(inp) == len(out) + 1 and inp[:a] == out[:a] and inp[a + 2:] == out[a + 1:]:
                self.region.update((src, unsq))
                return [(x, a, rep * _size(src, a + 1))]
        # split of the last dim into (heads, head_dim): the flat producer side
        if a == len(out) - 2 and len(inp) == len(out) - 1 and inp[:-1] == out[:-2]:
            heads, head_dim = _size(cur, a), _size(cur, -1)
            if _size(src, -1) == heads * head_dim:
                found.append(_Found(self._flat_back(src, 0), heads, rep))
                return []
        raise _Blocked(f"reshape {cur.name} {inp} -> {out} does not split the last dim into (heads, head_dim)")

    def _flat_back(self, node: fx.Node, offset: int) -> Port:
        """Heads as blocks of the last dim: back through last-dim slices and splits to a Linear."""
        while True:
            self.region.add(node)
            lin = self.linear_of_node.get(node)
            if lin is not None:
                return Port(lin.name, offset)
            name, rank = op_name(node), len(_shape(node) or ())
            if name in _PASS_THROUGH or (name in ("mul", "div") and isinstance(node.args[1], (int, float))):
                node = node.args[0]  # a cast, or a scale by a number (OPT scales q before the split)
            elif name == "slice" and _dim(int(node.args[1]), rank) == rank - 1:
                offset += int(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else 0
                node = node.args[0]
            elif name == "getitem" and op_name(node.args[0]) in ("split", "split_with_sizes"):
                split = node.args[0]
                if _dim(int(split.args[2]) if len(split.args) > 2 else 0, len(_shape(split.args[0]))) != rank - 1:
                    raise _Blocked(f"{split.name} splits another dim than the channels")
                sizes = split.args[1]
                offset += sizes * node.args[1] if isinstance(sizes, int) else sum(int(s) for s in sizes[: node.args[1]])
                self.region.add(split)
                node = split.args[0]
            else:
                raise _Blocked(f"{name} ({node.name}) between a Linear and the split into heads")

    # ---------------------------------------------------------------- forward, head layout

    def forward(self, node: fx.Node, axis: int) -> Port:
        """Walk the attention output forward through the merge of heads to the Linear reading it."""
        cur, a = node, axis
        while True:
            users = [u for u in cur.users if op_name(u) not in SHAPE_ONLY]
            if len(users) != 1:
                raise _Blocked(f"the attention output {cur.name} is read by {len(users)} ops")
            nxt = users[0]
            name, out, inp = op_name(nxt), _shape(nxt), _shape(cur)
            self.region.add(nxt)
            if name in _PASS_THROUGH:
                cur = nxt
            elif name == "transpose":
                d0, d1 = _dim(int(nxt.args[1]), len(inp)), _dim(int(nxt.args[2]), len(inp))
                cur, a = nxt, d1 if a == d0 else d0 if a == d1 else a
            elif name == "permute":
                cur, a = nxt, [_dim(int(d), len(inp)) for d in nxt.args[1]].index(a)
            elif name in _RESHAPES and out == inp:
                cur = nxt
            elif name in _RESHAPES and a == len(inp) - 2 and len(out) == len(inp) - 1 and out[:-1] == inp[:-2]:
                return self._flat_forward(nxt)
            else:
                raise _Blocked(f"{name} ({nxt.name}) after the attention, before the heads are merged")

    def _flat_forward(self, node: fx.Node) -> Port:
        cur = node
        while True:
            users = [u for u in cur.users if op_name(u) not in SHAPE_ONLY]
            if len(users) != 1:
                raise _Blocked(f"the merged heads {cur.name} are read by {len(users)} ops")
            nxt = users[0]
            lin = self.linear_of_node.get(nxt)
            if lin is not None and linear_data_input(nxt) is cur:
                self.readers.add(nxt)
                return Port(lin.name, 0)
            if op_name(nxt) not in _PASS_THROUGH:
                raise _Blocked(f"{op_name(nxt)} ({nxt.name}) between the merged heads and o_proj")
            self.region.add(nxt)
            cur = nxt


def _anchors(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node, fx.Node, set[fx.Node]] | tuple[fx.Node, str]]:
    """(anchor, q, k, v, output, the attention's own nodes) of every attention op: SDPA, or the
    eager matmul(q, k^T) -> softmax -> matmul(p, v)."""
    found = []
    for node in graph.nodes:
        name = op_name(node)
        if name in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"):
            found.append((node, node.args[0], node.args[1], node.args[2], node, {node}))
        elif name in ("softmax", "_softmax"):
            eager = _eager(node)
            found.append(eager if not isinstance(eager, str) else (node, eager))
    return found


def _eager(softmax: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node, fx.Node, set[fx.Node]] | str:
    """The eager pattern around ``softmax``, or why it is not one (a position bias, a bmm)."""
    scores = softmax.args[0]
    while isinstance(scores, fx.Node) and op_name(scores) in _SOFTMAX_PATH:
        scores = scores.args[0]
    if not isinstance(scores, fx.Node) or op_name(scores) != "matmul":
        return f"the softmax {softmax.name} is not fed by matmul(q, k^T) through scale, mask and softcap only ({op_name(scores) if isinstance(scores, fx.Node) else scores})"
    probs = softmax
    while True:
        users = [u for u in probs.users if op_name(u) not in SHAPE_ONLY]
        if len(users) != 1 or op_name(users[0]) not in _PASS_THROUGH:
            break
        probs = users[0]
    out = next((u for u in probs.users if op_name(u) == "matmul" and u.args[0] is probs), None)
    k_t = scores.args[1]
    rank = len(_shape(k_t) or ()) if isinstance(k_t, fx.Node) else 0
    if out is None or op_name(k_t) != "transpose" or sorted(_dim(int(d), rank) for d in k_t.args[1:3]) != [rank - 2, rank - 1]:
        return f"the softmax {softmax.name} is not followed by matmul(p, v), or its keys are not k^T"
    return (softmax, scores.args[0], k_t.args[0], out.args[1], out, {scores, k_t, out})


def find_head_groups(
    graph: fx.Graph, linear_of_node: dict[fx.Node, LinearInfo], param_of_node: dict[fx.Node, str], module_of: Callable[[fx.Node], str],
) -> tuple[list[HeadGroup], dict[str, str]]:
    """Head groups of every attention op in ``graph``, and the reason for each one left uncut."""
    groups: list[HeadGroup] = []
    blocked: dict[str, str] = {}
    from_linear = _descendants(linear_of_node)
    for anchor in _anchors(graph):
        if isinstance(anchor[1], str):  # a softmax that is not the eager attention pattern
            blocked[f"heads:{module_of(anchor[0]) or anchor[0].name}"] = anchor[1]
            continue
        anchor, q, k, v, out, own = anchor
        where = module_of(anchor) or anchor.name
        try:
            groups.append(_group(q, k, v, out, own, linear_of_node, param_of_node, from_linear, where))
        except _Blocked as reason:
            blocked[f"heads:{where}"] = str(reason)
    return groups, blocked


def _group(q: fx.Node, k: fx.Node, v: fx.Node, out: fx.Node, own: set[fx.Node], linear_of_node: dict[fx.Node, LinearInfo],
           param_of_node: dict[fx.Node, str], from_linear: set[fx.Node], where: str) -> HeadGroup:
    shape = _shape(q)
    if shape is None or len(shape) < 3:
        raise _Blocked("the query has no (…, heads, tokens, head_dim) shape")
    axis = len(shape) - 3
    walker = _Walker(linear_of_node, param_of_node, from_linear)
    fq, fk, fv = walker.back(q, axis), walker.back(k, axis), walker.back(v, axis)
    heads, head_dim = _size(q, axis), _size(q, -1)
    if fq.rep != 1 or fq.heads != heads:
        raise _Blocked("the query heads are repeated")
    if (fk.heads, fk.rep) != (fv.heads, fv.rep) or fk.heads * fk.rep * (heads // max(_size(k, axis), 1)) != heads:
        raise _Blocked(f"keys ({fk.heads} heads) and values ({fv.heads} heads) do not map onto {heads} query heads")
    if _size(k, -1) != head_dim or _size(v, -1) != head_dim:
        raise _Blocked("q, k and v have different head dims")
    o = walker.forward(out, axis)
    infos = {lin.name: lin for lin in linear_of_node.values()}
    if infos[o.linear].in_features != heads * head_dim:
        raise _Blocked(f"{o.linear} reads {infos[o.linear].in_features} channels, not {heads} x {head_dim}")
    _check_closed(walker.region, own | walker.readers)
    return HeadGroup(
        name=where, module=where, heads=heads, kv_heads=fk.heads, head_dim=head_dim, q=fq.port, k=fk.port, v=fv.port, o=o,
        q_slots=_row_slots(infos, fq.port) + (Slot(infos[o.linear].weight, infos[o.linear].in_axis, 0),),
        kv_slots=_row_slots(infos, fk.port) + _row_slots(infos, fv.port),
    )


def _descendants(linear_of_node: dict[fx.Node, LinearInfo]) -> set[fx.Node]:
    """Every node computed from some Linear's output."""
    out: set[fx.Node] = set()
    stack = list(linear_of_node)
    while stack:
        node = stack.pop()
        if node not in out:
            out.add(node)
            stack.extend(node.users)
    return out


def _row_slots(infos: dict[str, LinearInfo], port: Port) -> tuple[Slot, ...]:
    lin = infos[port.linear]
    slots = (Slot(lin.weight, lin.out_axis, port.offset),)
    return slots + ((Slot(lin.bias, 0, port.offset),) if lin.bias else ())


def _check_closed(region: set[fx.Node], own: set[fx.Node]) -> None:
    """Nothing but the attention may read the per-head tensors (no cache write, no second reader)."""
    for node in region:
        for user in node.users:
            if user not in region and user not in own and op_name(user) not in SHAPE_ONLY:
                raise _Blocked(f"{node.name} is also read by {op_name(user)} ({user.name})")
