"""Attention: values whose heads are merged into the batch axis or whose q/k/v parts are stacked (hooks that the
analysis runs before an op's own rule), and the ops that build masks and positions."""
from __future__ import annotations

import numpy as np
import onnx

from . import OpSpec, register, spec_of, torch
from .shape import shape_list


def batch_merged_ok(a, node) -> bool:
    """A value whose channels are merged into the batch axis ([B, H, T, D] -> [B*H, T, D], the new exporter's
    attention) may only meet ops that treat each batch index alone; their results stay merged."""
    chans = [x for x in node.input if x in a.chan]
    spec = spec_of(node)
    ok = spec is not None and spec.batchwise and all(x in a.batch_merged for x in chans) and \
        not (node.op_type in ("Softmax", "LogSoftmax") and
             a.attr(node, "axis") % (a.rank(chans[0]) or 1) == a.chan[chans[0]][0])
    if not ok:
        a.unsupported(node, "meets a value whose attention heads are merged into the batch axis")
        return False
    if node.op_type not in ("Reshape", "Shape"):
        spec.rule(a, node)
        a.batch_merged.update(y for y in node.output if y in a.chan)
        return False
    return True


def stacked_rule(a, node) -> None:
    """Ops on a stacked value (see _split_fused_projection): moving axes, and taking one part out of the stack
    axis (Gather of a constant index, Slice of one index, Split into ones, then Squeeze)."""
    x = next(v for v in node.input if v in a.stacked)
    stack, parts = a.stacked[x]
    axis = a.chan[x][0]
    rank = a.rank(x)
    op = node.op_type

    def put(y, new_stack, new_axis, new_parts):
        if len(new_parts) == 1 and new_stack is None:
            a.chan[y] = (new_axis, new_parts[0])
        else:
            a.stacked[y] = (new_stack, new_parts)
            a.chan[y] = (new_axis, new_parts[0])
    if rank is None or any(v in a.chan and v != x for v in node.input):
        return a.unsupported(node, "meets fused q/k/v channels it cannot follow")
    if op == "Transpose":
        perm = list(a.attr(node, "perm") or reversed(range(rank)))
        return put(node.output[0], perm.index(stack), perm.index(axis), parts)
    if op in ("Squeeze", "Unsqueeze"):
        axes = a.attr(node, "axes")
        axes = a.const(node.input[1]) if axes is None and len(node.input) > 1 else axes
        out_rank = a.rank(node.output[0])
        if axes is None or out_rank is None:
            return a.unsupported(node, "axes unknown")
        if op == "Squeeze":
            axes = [int(v) % rank for v in np.asarray(axes).reshape(-1)]
            if axis in axes or (stack in axes and len(parts) != 1):
                return a.unsupported(node, "squeezes fused q/k/v channels")
            shift = lambda p: p - sum(v < p for v in axes)
            return put(node.output[0], None if stack in axes else shift(stack), shift(axis), parts)
        axes = {int(v) % out_rank for v in np.asarray(axes).reshape(-1)}
        keep = [p for p in range(out_rank) if p not in axes]
        return put(node.output[0], keep[stack], keep[axis], parts)
    if op in ("Gather", "Slice", "Split"):
        g = a.attr(node, "axis", 0) % rank
        if op == "Gather" and g == stack and node.input[1] in a.tensors and a.tensors.shape(node.input[1]) == ():
            i = int(a.tensors.array(node.input[1])) % len(parts)
            return put(node.output[0], None, axis - (axis > stack), [parts[i]])
        if op == "Slice":
            starts, ends = a.const(node.input[1]), a.const(node.input[2])
            axes = a.const(node.input[3]) if len(node.input) > 3 and node.input[3] else [0]
            if starts is not None and ends is not None and [int(v) % rank for v in axes] == [stack] and \
                    int(ends[0]) == int(starts[0]) + 1 and (len(node.input) < 5 or not node.input[4]):
                return put(node.output[0], stack, axis, [parts[int(starts[0])]])
        if op == "Split" and g == stack and len(node.output) == len(parts):
            sizes = a.const(node.input[1]) if len(node.input) > 1 and node.input[1] else a.attr(node, "split")
            if sizes is None or all(int(v) == 1 for v in np.asarray(sizes).reshape(-1)):
                for y, part in zip(node.output, parts):
                    put(y, stack, axis, [part])
                return
    if spec_of(node) is not None and spec_of(node).reads_shape:
        return
    a.unsupported(node, "meets fused q/k/v channels it cannot follow")


# ----------------------------------------------------------------------------- torch forwards

def _constant_of_shape(m, at, shape):
    value = onnx.numpy_helper.to_array(at["value"]).copy() if "value" in at else np.zeros(1, np.float32)
    return torch.full(shape_list(shape), value.reshape(-1)[0].item(), dtype=torch.from_numpy(value).dtype)


def _cumsum(m, at, x, axis):
    dim = int(axis.reshape(-1)[0])
    if at["reverse"]:
        x = x.flip(dim)
    out = torch.cumsum(x, dim)
    if at["exclusive"]:
        out = out - x
    return out.flip(dim) if at["reverse"] else out


register(
    OpSpec("ConstantOfShape", forward=_constant_of_shape),
    OpSpec("Range", forward=lambda m, at, start, limit, delta: torch.arange(start.item(), limit.item(), delta.item(),
                                                                          dtype=start.dtype)),
    OpSpec("CumSum", forward=_cumsum),
)
