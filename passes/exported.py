"""What is particular to a ``torch.export`` program, for the passes that meet one.

The pipeline's passes read a program through these: a ``Traced`` view whose module paths
resolve (``program_traced``), calibration by an FX interpreter (``calibrate_program``), the
shrink that also rewrites the widths hard-coded in the groups' graph regions
(``shrink_program``, ``rewrite_shapes``) and the re-export with the input program's dynamic
dims (``reexport``). The route's one call, ``prune_program``, is in ``llmrank.passes.program``:
it runs the pipeline, which runs these.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from llmrank.ir.errors import InputError
from llmrank.ir.graph import ModelIR
from llmrank.ir.trace import Traced
from llmrank.passes.analyze import analyze
from llmrank.passes.calibrate import Accumulator, ActivationNorms, Plan, as_inputs, collect_program
from llmrank.passes.ops import LINEAR_OPS, SHAPE_VIEWS, SPLITS, linear_weight_arg, op_name
from llmrank.passes.shrink import mask, shrink

__all__ = ["analyze_program", "calibrate_program", "example_inputs", "mask_program", "program_dynamic_shapes", "program_traced",
           "reexport", "rewrite_shapes", "shrink_program"]


# ---------------------------------------------------------------------------------------
# analysis: a Traced view of an ExportedProgram


def _owner_from_stack(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def program_traced(ep: ExportedProgram, module: nn.Module | None = None) -> Traced:
    """``Traced(program=ep, model=ep.module(), prefix="")`` with module paths that resolve.

    ``analyze`` names each Linear by the last entry of its node's ``nn_module_stack``. In a
    program exported from a user's model those paths are the parameter FQNs of
    ``ep.module()``; in a re-exported GraphModule (and some HF layer loops) they are not.
    When any Linear's path does not own its weight parameter, a copy of the program is
    annotated with the owner derived from the parameter FQN; the caller's ``ep`` is untouched.
    """
    module = ep.module() if module is None else module
    sig = ep.graph_signature
    fixes: dict[str, str] = {}
    for node in ep.graph.nodes:
        name = op_name(node)
        if name not in LINEAR_OPS:
            continue
        weight = linear_weight_arg(node)
        fqn = sig.inputs_to_parameters.get(getattr(weight, "name", None))
        if fqn is None or not fqn.endswith(".weight"):
            continue
        owner = fqn[: -len(".weight")]
        if _owner_from_stack(node) != owner:
            fixes[node.name] = owner
    if fixes:
        ep = copy.deepcopy(ep)
        for node in ep.graph.nodes:
            if node.name in fixes:
                stack = dict(node.meta.get("nn_module_stack") or {})
                stack["llmrank_param_owner"] = (fixes[node.name], "torch.nn.Module")
                node.meta["nn_module_stack"] = stack
    return Traced(program=ep, model=module, prefix="")


def analyze_program(ep: ExportedProgram, module: nn.Module | None = None) -> tuple[Traced, ModelIR]:
    traced = program_traced(ep, module)
    ir = analyze(traced)
    if not ir.linears:
        raise InputError(
            "the program has no aten.linear/aten.addmm with a weight parameter: analyse the program from "
            "torch.export.export BEFORE run_decompositions() (the default table turns linear into mm)"
        )
    return traced, ir


# ---------------------------------------------------------------------------------------
# calibration: per-batch L2 norms of every Linear's input and output, read by an interpreter


def calibrate_program(
    module: fx.GraphModule, ir: ModelIR, calibration_inputs: Iterable[Any], *, linears: Iterable[str] | None = None
) -> ActivationNorms:
    """The scoring norms of ``llmrank.calibrate``, from an FX interpreter over ``ep.module()``.

    Each item of ``calibration_inputs`` is a tuple of positional inputs (a lone tensor is
    accepted); the statistics are those of ``llmrank.passes.calibrate`` (one accumulator).
    """
    names = list(ir.linears) if linears is None else list(linears)
    plan = Plan.build(list(calibration_inputs), None, norms=True, moments=False)
    return collect_program(module, ir, plan, Accumulator(names, ())).norms


# ---------------------------------------------------------------------------------------
# rewrite: shrink parameters, then fix shape constants that hard-code a group's width


def _split_sizes(node: fx.Node) -> list[int]:
    """Old segment sizes of a last-dim split/chunk node (from the arguments and meta)."""
    value = node.args[0].meta.get("val")
    total = int(value.shape[-1])
    arg = node.args[1]
    if op_name(node) == "chunk":
        step = -(-total // int(arg))
        return [min(step, total - i) for i in range(0, total, step)]
    if isinstance(arg, int):
        return [min(arg, total - i) for i in range(0, total, arg)]
    return [int(s) for s in arg]


def rewrite_shapes(gm: fx.GraphModule, ir: ModelIR, kept: dict[str, torch.Tensor], regions: dict[str, Sequence[str]]) -> list[str]:
    """Rewrite, in place, the widths hard-coded in the groups' regions of ``gm``'s graph.

    - view/reshape whose target shape ends with the group's old width (GPT-2 ``view(addmm,
      [b, s, 3072])``, ``view(x, [-1, 3072])``): the last entry becomes the kept width;
    - a last-dim split/chunk whose pieces carry groups (a fused gate_up with
      split_with_sizes): new sizes per piece; it becomes ``split_with_sizes`` when they differ.
    Returns one line per change. ``gm.recompile()`` is called when something changed.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    width: dict[str, tuple[int, int]] = {}
    for g in ir.groups:
        for name in regions[g.name]:
            if name not in nodes:
                raise InputError(f"node {name!r} of group {g.name!r} is not in the module's graph: pass ep.module() of the analysed program")
            width[name] = (g.width, len(kept[g.name]))
    changes: list[str] = []
    for name, (old, new) in width.items():
        node = nodes[name]
        if old == new or op_name(node) not in SHAPE_VIEWS or len(node.args) < 2:
            continue
        shape = node.args[1]
        if isinstance(shape, (list, tuple)) and shape and isinstance(shape[-1], int) and shape[-1] == old:
            node.args = (node.args[0], [*shape[:-1], new], *node.args[2:])
            changes.append(f"{name}: {op_name(node)} last dim {old} -> {new}")
    for node in list(gm.graph.nodes):
        if op_name(node) not in SPLITS or op_name(node) == "tensor_split":
            continue
        items = [u for u in node.users if op_name(u) == "getitem" and u.name in width]
        if not items:
            continue
        sizes = _split_sizes(node)
        new_sizes = list(sizes)
        for item in items:
            new_sizes[int(item.args[1])] = width[item.name][1]
        if new_sizes == sizes:
            continue
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if op_name(node) == "chunk" and len(set(new_sizes)) == 1:
            changes.append(f"{node.name}: chunk keeps {len(sizes)} equal pieces ({sizes[0]} -> {new_sizes[0]})")
            continue
        node.target = torch.ops.aten.split_with_sizes.default
        node.args = (node.args[0], new_sizes, dim)
        node.kwargs = {}
        changes.append(f"{node.name}: split sizes {sizes} -> {new_sizes}")
    if changes:
        gm.recompile()
    return changes


def shrink_program(
    module: fx.GraphModule, ir: ModelIR, kept: dict[str, torch.Tensor], regions: dict[str, Sequence[str]], *,
    refits: dict | None = None,
) -> tuple[fx.GraphModule, list[str]]:
    """A copy of ``module`` (``ep.module()``) with shrunk parameters and rewritten shape constants."""
    slim = shrink(module, ir, kept, refits=refits)
    return slim, rewrite_shapes(slim, ir, kept, regions)


def mask_program(module: fx.GraphModule, ir: ModelIR, kept: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The reference: a copy of ``module`` with the dropped channels zeroed (same shapes)."""
    return mask(module, ir, kept)


# ---------------------------------------------------------------------------------------
# re-export with the program's dynamic dims


def program_dynamic_shapes(ep: ExportedProgram) -> Any:
    """Dynamic shapes for re-exporting ``ep.module()``, reconstructed from the program.

    Every user-input dim that is a plain symbol becomes a ``Dim`` with the program's range
    (one Dim per symbol, so dims that were equal stay equal); a derived dim becomes
    ``Dim.AUTO``. The structure follows the program's input spec: a tuple for positional
    inputs (plus a dict by name for keyword inputs).
    """
    user = set(ep.graph_signature.user_inputs)
    dims: dict[Any, Any] = {}
    specs: list[Any] = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            specs.append(None)
            continue
        spec: dict[int, Any] = {}
        for i, size in enumerate(value.shape):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            if not expr.is_Symbol:
                spec[i] = Dim.AUTO
                continue
            if expr not in dims:
                dims[expr] = Dim(f"dim_{expr}", **_range_kwargs(ep.range_constraints.get(expr)))
            spec[i] = dims[expr]
        specs.append(spec or None)
    if not dims and not any(specs):
        return None
    args, kwargs = pytree.tree_unflatten(specs, ep.call_spec.in_spec)
    if kwargs:
        return {**_names_for(ep, len(args), args), **kwargs}
    return tuple(args)


def _names_for(ep: ExportedProgram, n: int, values: Sequence[Any]) -> dict[str, Any]:
    import inspect

    params = list(inspect.signature(ep.module().forward).parameters)
    return dict(zip(params[:n], values))


def _range_kwargs(vr: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    if vr is None:
        return out
    lower, upper = vr.lower, vr.upper
    try:
        if lower is not None and math.isfinite(float(lower)) and int(lower) > 0:
            out["min"] = int(lower)
        if upper is not None and math.isfinite(float(upper)) and int(upper) < (1 << 62):
            out["max"] = int(upper)
    except (TypeError, ValueError, OverflowError):
        pass  # int_oo and friends: unbounded
    return out


def reexport(module: nn.Module, example_inputs: tuple, dynamic_shapes: Any = None, *, kwargs: dict | None = None) -> ExportedProgram:
    """``torch.export.export`` of a (rewritten) ``ep.module()``; non-strict, under no_grad."""
    try:
        with torch.no_grad():
            return torch.export.export(module, tuple(example_inputs), kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as error:  # noqa: BLE001 - explained
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise InputError(
            f"re-exporting the shrunk program failed: {type(error).__name__}: {first}. A shape constant outside the "
            "groups' regions may still hard-code an old width; pass dynamic_shapes= explicitly if the dims were the issue"
        ) from error


def example_inputs(ep: ExportedProgram, calibration_inputs: Sequence[Any]) -> tuple[tuple, dict]:
    """The program's own example inputs, else the first calibration input."""
    example = getattr(ep, "example_inputs", None)
    if example is not None:
        args, kwargs = example
        return tuple(args), dict(kwargs or {})
    if not calibration_inputs:
        raise InputError("the program carries no example inputs: give calibration or example inputs to re-export it")
    return as_inputs(calibration_inputs[0]), {}
