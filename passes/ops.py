"""The FX op vocabulary every graph pass shares: how aten ops are named and grouped.

``analyze`` walks these categories to find channel groups; the program rewrite and the
interpreter tap of calibration read layers the same way, so a new op is taught in one place.
"""

from __future__ import annotations

import operator

from torch import fx

UNARY = {
    "silu", "gelu", "relu", "tanh", "sigmoid", "erf", "leaky_relu", "softplus", "mish", "elu",
    "hardswish", "hardsigmoid", "hardtanh", "relu6", "celu", "selu", "gelu_", "silu_", "relu_",
    "neg", "abs", "exp", "sqrt", "pow", "square", "dropout", "clone", "contiguous", "to",
    "_to_copy", "alias", "detach", "type_as", "lift_fresh_copy", "native_dropout",
}
NONLINEAR = UNARY - {"neg", "abs", "dropout", "clone", "contiguous", "to", "_to_copy", "alias", "detach", "type_as", "lift_fresh_copy", "native_dropout"}
BINARY = {"mul", "add", "sub", "div", "mul_", "add_", "sub_", "div_", "true_divide", "multiply", "maximum", "minimum"}
VIEWS = {"view", "reshape", "_unsafe_view", "flatten", "unflatten"}
SHAPE_VIEWS = ("view", "reshape", "_unsafe_view")  # views whose target shape is a literal list
SPLITS = {"split", "split_with_sizes", "chunk", "tensor_split"}
SHAPE_ONLY = {"sym_size", "_assert_tensor_metadata", "sym_numel", "sym_stride"}
LINEAR_OPS = ("linear", "addmm", "matmul", "mm")  # ops that can be a layer with a weight parameter
TRANSPOSES = ("t", "transpose", "permute", "numpy_T")


def op_name(node: fx.Node) -> str:
    """'silu' for aten.silu.default, 'getitem' for operator.getitem, the node's op for non-calls."""
    if node.op != "call_function":
        return node.op
    if node.target is operator.getitem:
        return "getitem"
    packet = getattr(node.target, "_overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(node.target, "__name__", str(node.target))


def transposed_param(node: object) -> object:
    """``W`` for ``x @ W.T`` written by hand (e.g. Falcon's Linear): matmul(x, t(W))."""
    if isinstance(node, fx.Node) and op_name(node) in TRANSPOSES and node.args:
        return node.args[0]
    return None


def linear_weight_arg(node: fx.Node) -> object:
    """The weight operand of a layer node (under the transpose for a hand-written x @ W.T)."""
    name = op_name(node)
    if name == "addmm":
        return node.args[2]
    if name in ("matmul", "mm"):
        return transposed_param(node.args[1])
    return node.args[1]


def linear_data_input(node: fx.Node) -> fx.Node:
    """The activation operand of a layer node (addmm: bias, input, weight)."""
    return node.args[1] if op_name(node) == "addmm" else node.args[0]
