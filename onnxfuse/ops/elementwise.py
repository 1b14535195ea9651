"""Element-wise ops: unary ones pass the channels through, binary ones (and Where) unify the channel spaces of
their inputs and touch the constants they combine with."""
from __future__ import annotations

import numpy as np
from onnx import helper

from ..groups import Touch
from ..model_io import FLOAT_TYPES
from . import F, OpSpec, register, torch
from .linear import bias_touch


def pass_through(a, node):
    """Every channel by itself, the layout kept."""
    a.chan[node.output[0]] = a.chan[node.input[0]]


def binary_rule(a, node):
    y = node.output[0]
    out_rank = a.rank(y)
    laid = [(x, a.chan[x]) for x in node.input if x in a.chan]
    # align channel axes from the right (numpy broadcasting)
    ref_x, (ref_axis, ref_segs) = laid[0]
    ref_from_end = (a.rank(ref_x) or ref_axis + 1) - ref_axis
    for x, (axis, segs) in laid[1:]:
        if (a.rank(x) or axis + 1) - axis == ref_from_end and (len(segs) != len(ref_segs) or
                                                               any(s.inner != r.inner for s, r in zip(segs, ref_segs))):
            _align(a, x, ref_x)
            (axis, segs), (ref_axis, ref_segs) = a.chan[x], a.chan[ref_x]
        if (a.rank(x) or axis + 1) - axis != ref_from_end or len(segs) != len(ref_segs) or \
                any(s.inner != r.inner for s, r in zip(segs, ref_segs)):
            return a.unsupported(node, "combines tensors whose channels are laid out differently")
        for s, r in zip(segs, ref_segs):
            a.union(s.space, r.space, node.name)
    out_axis = (out_rank or ref_from_end) - ref_from_end
    a.chan[y] = (out_axis, ref_segs)
    for x in node.input:
        if x in a.chan or not x:
            continue
        if x in a.tensors:
            bias_touch(a, node, x, y)
        else:
            shape = a.shapes.get(x)
            b_axis = None if shape is None else out_axis - ((out_rank or 0) - len(shape))
            found = None if b_axis is None or b_axis < 0 else _gathered_param(a, x, b_axis, a.size(ref_segs))
            if found is not None:
                a.touches.append(Touch(*found, ref_segs, "param", node.name))
            elif shape is None or (b_axis is not None and b_axis >= 0 and shape[b_axis] != 1):
                return a.unsupported(node, f"input '{x}' has no channel layout but spans the channel axis")


def _gathered_param(a, x: str, axis: int, size: int) -> tuple[str, int] | None:
    """x = a lookup of rows of a float parameter T by constant indices, whose axis `axis` is an axis of T with
    `size` entries: a per-channel parameter read through a lookup (LeViT's attention biases: biases[:, idxs], one
    row per head; the new exporter's GatherND of the transposed table, then a Transpose). (T, its axis) or None."""
    node = a.index.producer.get(x)
    if node is not None and node.op_type == "Transpose":
        rank = a.rank(x)
        perm = list(a.attr(node, "perm") or reversed(range(rank or 0)))
        if axis >= len(perm):
            return None
        axis, node = perm[axis], a.index.producer.get(node.input[0])
    if node is None or node.op_type not in ("Gather", "GatherND") or len(node.input) < 2:
        return None
    table, idx = node.input[0], node.input[1]
    idx_shape = a.tensors.shape(idx) if idx in a.tensors else a.shapes.get(idx)
    if table not in a.tensors or idx in a.chan or idx_shape is None or not isinstance(idx_shape[-1], int) or \
            a.tensors.dtype(table) not in FLOAT_TYPES:
        return None
    shape = a.tensors.shape(table)
    if node.op_type == "Gather":
        g = a.attr(node, "axis", 0) % len(shape)
        t_axis = axis if axis < g else None            # axes before the gathered one are the table's
    else:                                              # rows of the table's first axis: [..., 1] indices
        lead = len(idx_shape) - 1
        t_axis = axis - lead + 1 if a.attr(node, "batch_dims", 0) == 0 and idx_shape[-1] == 1 and axis >= lead \
            else None
    if t_axis is None or not 0 <= t_axis < len(shape) or shape[t_axis] != size:
        return None
    return table, t_axis


def _align(a, x: str, ref: str) -> None:
    """Cut two layouts of one channel axis at each other's segment boundaries, so that they pair segment by
    segment (GhostNet adds its shortcut to the concat of a conv's output and of its depthwise copy)."""
    def bounds(value):
        sizes = [a.width(s.space) * s.inner for s in a.chan[value][1]]
        return set(np.cumsum(sizes)[:-1].tolist()), sum(sizes)
    (mine, total), (theirs, ref_total) = bounds(x), bounds(ref)
    if total == ref_total:
        cuts = sorted(mine | theirs)
        a.cut(x, a.chan[x][0], cuts)
        a.cut(ref, a.chan[ref][0], cuts)


def _rule_where(a, node):
    """Where(condition, x, y) (masks, e.g. the causal mask): x and y combine like Add; the condition must
    not vary along the channel axis."""
    cond = node.input[0]
    if cond in a.chan:          # e.g. Where(IsNaN(p), 0, p): element by element, the channels line up
        return binary_rule(a, node)
    binary_rule(a, helper.make_node("Where", node.input[1:], node.output, name=node.name))
    y = node.output[0]
    if y in a.chan:
        axis, segs = a.chan[y]
        shape = a.shapes.get(cond)
        c_axis = None if shape is None else axis - ((a.rank(y) or 0) - len(shape))
        if shape is None or (c_axis is not None and c_axis >= 0 and shape[c_axis] != 1):
            a.unsupported(node, f"condition '{cond}' may vary along the channel axis")


# ----------------------------------------------------------------------------- torch forwards

def _div(m, at, a, b):
    """ONNX Div of integers (shape arithmetic) truncates; torch.div would return floats."""
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return torch.div(a, b)


ONNX_TO_TORCH = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool"}


def _cast(m, at, x):
    target = getattr(torch, ONNX_TO_TORCH[at["to"]])
    # computation stays in float32 (float64 members stay float64) inside the bridge
    return x if x.is_floating_point() and target.is_floating_point else x.to(target)


def _clip(m, at, x, lo=None, hi=None):
    lo = lo if lo is not None else at.get("min")
    hi = hi if hi is not None else at.get("max")
    return torch.clamp(x, min=lo, max=hi)


def _dropout(m, at, x, ratio=None, training_mode=None):
    p = float(ratio) if ratio is not None else at.get("ratio", 0.5)      # an attribute before opset 12
    return F.dropout(x, p, training=m.training)


def _selu(m, at, x):
    return at["gamma"] * torch.where(x > 0, x, at["alpha"] * (torch.exp(x) - 1))


def _gelu(m, at, x):
    return F.gelu(x, approximate="tanh" if at["approximate"] in (b"tanh", "tanh") else "none")


def unary(op_type: str, torch_fn: str | None = None, *, module=torch, **fields) -> OpSpec:
    """A pass-through op; `torch_fn` names its torch function of one tensor (`module.torch_fn(x)`)."""
    if torch_fn is not None:
        fields["forward"] = lambda m, at, x: getattr(module, torch_fn)(x)
    return OpSpec(op_type, pass_through, **fields)


def binary(op_type: str, torch_fn: str | None = None, **fields) -> OpSpec:
    """An op of two tensors, with broadcasting; `torch_fn` names its torch function (`torch.torch_fn(a, b)`)."""
    if torch_fn is not None:
        fields["forward"] = lambda m, at, a, b: getattr(torch, torch_fn)(a, b)
    return OpSpec(op_type, binary_rule, **fields)


def logic(op_type: str, torch_fn: str) -> OpSpec:
    """Comparisons and logic of masks: no channel rule."""
    return OpSpec(op_type, forward=lambda m, at, a, b: getattr(torch, torch_fn)(a, b))


register(
    unary("Identity", forward=lambda m, at, x: x, linear=True, shape_arithmetic=True, batchwise=True),
    unary("Dropout", forward=_dropout, linear=True, batchwise=True),
    unary("Neg", "neg", linear=True, shape_arithmetic=True),
    unary("Cast", forward=_cast, linear=True, shape_arithmetic=True, batchwise=True),
    unary("CastLike", linear=True, trainable=False),
    unary("Relu", "relu"), unary("Sigmoid", "sigmoid"), unary("Tanh", "tanh"), unary("Abs", "abs"),
    unary("Exp", "exp"), unary("Log", "log"), unary("Sqrt", "sqrt"), unary("Erf", "erf"),
    unary("Reciprocal", "reciprocal"), unary("Sign", "sign"), unary("Sin", "sin"), unary("Cos", "cos"),
    unary("Floor", "floor", shape_arithmetic=True), unary("Ceil", "ceil", shape_arithmetic=True),
    unary("Not", "logical_not"), unary("IsNaN", "isnan"),
    unary("Softsign", "softsign", module=F), unary("Mish", "mish", module=F),
    unary("HardSwish", "hardswish", module=F), unary("Softplus", "softplus", module=F),
    unary("LeakyRelu", forward=lambda m, at, x: F.leaky_relu(x, at["alpha"])),
    unary("Elu", forward=lambda m, at, x: F.elu(x, at["alpha"])),
    unary("Celu", forward=lambda m, at, x: F.celu(x, at["alpha"])),
    unary("Selu", forward=_selu), unary("Gelu", forward=_gelu),
    unary("HardSigmoid", forward=lambda m, at, x: torch.clamp(at["alpha"] * x + at["beta"], 0, 1)),
    unary("ThresholdedRelu", forward=lambda m, at, x: torch.where(x > at["alpha"], x, torch.zeros_like(x))),
    unary("Clip", forward=_clip),
    unary("Swish", trainable=False), unary("IsInf", trainable=False), unary("Shrink", trainable=False),
    unary("Round", trainable=False),
    binary("Add", "add", linear=True, shape_arithmetic=True, batchwise=True),
    binary("Sub", "sub", linear=True, shape_arithmetic=True, batchwise=True),
    binary("Mul", "mul", shape_arithmetic=True, batchwise=True),
    binary("Div", forward=_div, shape_arithmetic=True, batchwise=True),
    binary("Max", "maximum", shape_arithmetic=True), binary("Min", "minimum", shape_arithmetic=True),
    binary("Pow", "pow"),
    binary("PRelu", forward=lambda m, at, x, slope: torch.where(x >= 0, x, x * slope)),
    binary("Sum", trainable=False), binary("Mean", trainable=False),
    OpSpec("Where", _rule_where, batchwise=True, forward=lambda m, at, c, a, b: torch.where(c, a, b)),
    logic("Equal", "eq"), logic("Less", "lt"), logic("Greater", "gt"), logic("LessOrEqual", "le"),
    logic("GreaterOrEqual", "ge"), logic("And", "logical_and"), logic("Or", "logical_or"),
    OpSpec("Mod", forward=lambda m, at, a, b: torch.fmod(a, b) if at["fmod"] else torch.remainder(a, b)),
)
