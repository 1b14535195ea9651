"""Reductions and pools. Pooling (axis 1 only) passes the channels on; a reduction over other axes keeps them,
one over a widened channel axis mixes the members; Softmax, ArgMax and the like over channels freeze their group."""
from __future__ import annotations

import numpy as np

from . import F, OpSpec, register, torch
from ..errors import UnsupportedGraphError
from .linear import pad_if_asymmetric, window
from .shape import axes_of


def _rule_pool(a, node):
    axis, segs = a.chan[node.input[0]]
    if axis != 1:
        return a.unsupported(node, f"pooling over channels on axis {axis}")
    a.chan[node.output[0]] = (axis, segs)


def _rule_reduce(a, node):
    x = node.input[0]
    axis, segs = a.chan[x]
    rank = a.rank(x)
    axes = a.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = a.const(node.input[1])
    if rank is None or axes is None:
        return a.unsupported(node, "reduction with unknown axes")
    axes = {int(v) % rank for v in np.asarray(axes).reshape(-1)}
    keep = a.attr(node, "keepdims", 1)
    if axis in axes:      # e.g. the mean of a LayerNorm decomposition: the result has no channel axis
        a.mixing[node.name] = f"{node.op_type} '{node.name}' reduces over the members' channels together"
        return
    a.chan[node.output[0]] = (axis if keep else axis - sum(v < axis for v in axes), segs)


def _rule_reducer(a, node):
    axis, segs = a.chan[node.input[0]]
    rank = a.rank(node.input[0]) or axis + 1
    op_axis = a.attr(node, "axis")           # the schema's default: Softmax's is 1 before opset 13
    if op_axis % rank == axis:
        a.freeze(segs, f"{node.op_type} over channels at node '{node.name}'")
        if node.op_type in ("Softmax", "LogSoftmax", "Hardmax"):
            a.chan[node.output[0]] = (axis, segs)
        return
    if node.op_type in ("Softmax", "LogSoftmax", "Hardmax"):
        a.chan[node.output[0]] = (axis, segs)
    else:
        a.unsupported(node, "reduces an axis next to the channel axis")


# ----------------------------------------------------------------------------- torch forwards

def _pool(kind):
    def pool(m, at, x):
        dims = x.dim() - 2
        kernel = at["kernel_shape"]
        strides, pads, dilations = window(at, x.shape[2:], kernel)
        if kind == "max":
            x, padding = pad_if_asymmetric(x, pads, value=float("-inf"))
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
            return fn(x, kernel, strides, padding, dilation=dilations, ceil_mode=bool(at.get("ceil_mode", 0)))
        if pads[:dims] != pads[dims:]:
            raise UnsupportedGraphError("asymmetric AveragePool padding is not supported by the torch bridge")
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
        return fn(x, kernel, strides, pads[:dims], ceil_mode=bool(at.get("ceil_mode", 0)),
                  count_include_pad=bool(at["count_include_pad"]))
    return pool


def _reducer(fn: str):
    """The forward of a reduction by torch.<fn> (named: torch is imported on first use)."""
    def reduce(m, at, x, axes=None):
        axes = axes_of(at, axes)
        dims = tuple(range(x.dim())) if axes is None else tuple(axes)
        return getattr(torch, fn)(x, dim=dims, keepdim=bool(at["keepdims"]))
    return reduce


def _argmax(m, at, x):
    dim = at["axis"]
    if at.get("select_last_index", 0):
        flipped = torch.argmax(x.flip(dim), dim, keepdim=bool(at["keepdims"]))
        return x.shape[dim] - 1 - flipped
    return torch.argmax(x, dim, keepdim=bool(at["keepdims"]))


def _global(fn: str):
    return lambda m, at, x: getattr(x, fn)(dim=tuple(range(2, x.dim())), keepdim=True)


register(
    OpSpec("MaxPool", _rule_pool, forward=_pool("max")),
    OpSpec("AveragePool", _rule_pool, linear=True, forward=_pool("avg")),
    OpSpec("GlobalAveragePool", _rule_pool, linear=True, forward=_global("mean")),
    OpSpec("GlobalMaxPool", _rule_pool, forward=_global("amax")),
    OpSpec("LpPool", _rule_pool, trainable=False), OpSpec("GlobalLpPool", _rule_pool, trainable=False),
    OpSpec("ReduceMean", _rule_reduce, linear=True, forward=_reducer("mean")),
    OpSpec("ReduceSum", _rule_reduce, linear=True, forward=_reducer("sum")),
    OpSpec("ReduceMax", _rule_reduce, forward=_reducer("amax")),
    OpSpec("ReduceL2", _rule_reduce,
           forward=lambda m, at, x, axes=None: torch.sqrt(_reducer("sum")(m, at, x * x, axes))),
    OpSpec("ReduceMin", _rule_reduce, trainable=False), OpSpec("ReduceProd", _rule_reduce, trainable=False),
    OpSpec("ReduceSumSquare", _rule_reduce, trainable=False),
    OpSpec("Softmax", _rule_reducer, batchwise=True, forward=lambda m, at, x: torch.softmax(x, at["axis"])),
    OpSpec("LogSoftmax", _rule_reducer, batchwise=True, forward=lambda m, at, x: torch.log_softmax(x, at["axis"])),
    OpSpec("ArgMax", _rule_reducer, forward=_argmax),
    OpSpec("Hardmax", _rule_reducer, trainable=False), OpSpec("ArgMin", _rule_reducer, trainable=False),
    OpSpec("TopK", _rule_reducer, trainable=False),
)
