"""Ops that take channels apart or put them together: Concat, Split, Slice, Gather(ND) and Pad. Cutting a channel
axis refines its groups (each part its own group); an embedding lookup (Gather of a constant table) opens one."""
from __future__ import annotations

import numpy as np
from onnx import helper

from . import F, OpSpec, register, torch
from ..groups import AttrConst, DerivedBound, EqualPart, Seg, ShapeConst, Touch
from ..model_io import FLOAT_TYPES
from ..shape_functions import shape_elements, shape_function
from .elementwise import binary_rule
from .shape import record_target, shape_list


def _rule_concat(a, node):
    rank = a.rank(node.output[0])
    cat = a.attr(node, "axis") % rank if rank else a.attr(node, "axis")
    laid = [a.chan.get(x) for x in node.input]
    axes = {c[0] for c in laid if c}
    if len(axes) != 1:
        return a.unsupported(node, "inputs carry channels on different axes")
    axis = axes.pop()
    if cat != axis:      # stacking along another axis: channels must coincide
        return binary_rule(a, node)
    segs = []
    for x, c in zip(node.input, laid):
        if c is None:      # a part without channel layout keeps its width: its own frozen space
            size = (a.shapes.get(x) or [None] * (axis + 1))[axis]
            if not isinstance(size, int):
                return a.unsupported(node, f"input '{x}' has an unknown size on the concat axis")
            own = (Seg(a.new_space(size, x)),)
            a.freeze(own, f"part of Concat '{node.name}' without a channel layout")
            segs.extend(own)
        else:
            segs.extend(c[1])
    a.chan[node.output[0]] = (axis, tuple(segs))


def _rule_concat_token(a, node):
    """Concat along a non-channel axis of a constant per-channel token (ViT's class token, Expanded over the
    batch) with values that carry channels: the token is a parameter of their channels, like a bias."""
    rank = a.rank(node.output[0])
    laid = [a.chan.get(x) for x in node.input]
    with_chan = [c for c in laid if c]
    cat = a.attr(node, "axis") % rank if rank else None
    if not with_chan or cat is None or cat == with_chan[0][0] or all(laid):
        return _rule_concat(a, node)
    axis, segs = with_chan[0]
    rest = []
    for x, c in zip(node.input, laid):
        if c is not None:
            rest.append(x)
            continue
        source = x
        while source not in a.tensors and source in a.index.producer and \
                a.index.producer[source].op_type in ("Expand", "Identity", "Cast"):
            producer = a.index.producer[source]
            if producer.op_type == "Expand":
                elements = shape_elements(a, producer.input[1]) or []
                e = elements[axis - (rank - len(elements))] if 0 <= axis - (rank - len(elements)) else 1
                if e not in (1, -1):            # the target spells the width: rewrite it
                    count = len(a.shape_consts)
                    record_target(a, helper.make_node("Reshape", list(producer.input), [source]),
                                  axis - (rank - len(elements)), segs)
                    if e != a.size(segs) or len(a.shape_consts) == count:
                        return a.unsupported(node, f"token '{x}' is expanded to a width it cannot rewrite")
            a.chan[source] = (axis, segs)        # the expanded token carries the channels too
            source = producer.input[0]
        if source not in a.tensors or len(a.tensors.shape(source)) != rank or \
                a.tensors.shape(source)[axis] != a.size(segs):
            return _rule_concat(a, node)
        a.touches.append(Touch(source, axis, segs, "param", node.name))
    binary_rule(a, helper.make_node("Concat", rest, node.output, name=node.name, axis=cat))


def _rule_gather(a, node):
    x, idx = node.input
    axis, segs = a.chan[x]
    rank = a.rank(x)
    g = a.attr(node, "axis", 0) % rank if rank else None
    idx_rank = a.rank(idx) if idx not in a.tensors else len(a.tensors.shape(idx))
    if g == axis and _gather_permutes(a, node):
        return
    if g is None or g == axis or idx_rank is None:
        return a.unsupported(node, "gathers along the channel axis")
    a.chan[node.output[0]] = (axis if g > axis else axis + idx_rank - 1, segs)


def _gather_permutes(a, node) -> bool:
    """A Gather of constant indices that permute the channel axis (a channel shuffle written as one Gather, as
    onnxfuse writes it where the widths change): recorded as a ChannelPermutation."""
    x, idx = node.input
    axis, segs = a.chan[x]
    order = a.const(idx)
    size = a.size(segs)
    if order is None or order.ndim != 1 or not np.issubdtype(order.dtype, np.integer) or \
            sorted((order % size).tolist()) != list(range(size)):
        return False
    return a.permute(x, node.output[0], [node], tuple(int(i) % size for i in order))


def _is_lookup(a, node) -> bool:
    """Gather of rows of a constant float table by indices (an embedding lookup)."""
    return node.op_type == "Gather" and node.input[0] in a.tensors and node.input[0] not in a.chan and \
        len(a.tensors.shape(node.input[0])) == 2 and a.tensors.dtype(node.input[0]) in FLOAT_TYPES and \
        a.attr(node, "axis", 0) == 0


def _rule_gather_lookup(a, node):
    """An embedding lookup opens a channel space on the table's embedding axis, like a layer's output (the
    residual stream of a transformer starts here); other Gathers follow _rule_gather."""
    if node.input[0] in a.chan:
        return _rule_gather(a, node)
    table, idx = node.input
    idx_rank = a.rank(idx) if idx not in a.tensors else len(a.tensors.shape(idx))
    if idx_rank is None:
        return a.unsupported(node, "embedding lookup with indices of unknown rank")
    segs = a.open_space(node, a.tensors.shape(table)[1], node.output[0], idx_rank)
    a.touches.append(Touch(table, 1, segs, "out", node.name))


def _rule_gather_nd(a, node):
    """GatherND that picks positions on axes before the channel axis (pooling the last token)."""
    x, idx = node.input[0], node.input[1]
    axis, segs = a.chan[x]
    b = a.attr(node, "batch_dims", 0)
    idx_shape = a.shapes.get(idx)
    if idx in a.chan or idx_shape is None or not isinstance(idx_shape[-1], int):
        return a.unsupported(node, "gathers with indices of unknown shape")
    k = idx_shape[-1]
    if b <= axis < b + k:
        return a.unsupported(node, "gathers along the channel axis")
    a.chan[node.output[0]] = (axis if axis < b else len(idx_shape) - 1 + axis - b - k, segs)


def _rule_split(a, node):
    x = node.input[0]
    axis, segs = a.chan[x]
    rank = a.rank(x)
    split_axis = a.attr(node, "axis", 0) % rank if rank else None
    if split_axis != axis:
        for y in node.output:
            a.chan[y] = (axis, segs)
        return
    sizes = a.const(node.input[1]) if len(node.input) > 1 and node.input[1] else a.attr(node, "split")
    even = sizes is None                  # opset 18's num_outputs (torch.chunk): equal parts
    if even:
        size, count = a.size(segs), len(node.output)
        if size % count:
            return a.unsupported(node, f"splits {size} channels into {count} unequal parts (num_outputs)")
        sizes = [size // count] * count
    sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
    bounds = np.cumsum([0, *sizes]).tolist()
    segs = a.cut(x, axis, bounds[1:-1])
    if segs is None:
        return a.unsupported(node, "splits inside a flattened channel")
    for i, y in enumerate(node.output):
        part = a.segs_between(segs, bounds[i], bounds[i + 1])
        a.chan[y] = (axis, part)
        if even:
            a.equal_parts.append(EqualPart(node.name or node.output[0], part))
        elif len(node.input) > 1 and node.input[1]:
            a.shape_consts.append(ShapeConst(node.input[1], i, part))
        else:
            a.attr_consts.append(AttrConst(a.index.index(node), "split", part, i))


def _rule_slice(a, node):
    x = node.input[0]
    axis, segs = a.chan[x]
    rank = a.rank(x)
    starts, ends = a.const(node.input[1]), a.const(node.input[2])
    axes = a.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = a.const(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    size = a.size(segs)
    derived = {}
    for which, value in (("starts", starts), ("ends", ends)):
        if value is None and rank is not None:
            derived[which] = shape_function(a, node.input[1 if which == "starts" else 2], x)
    if derived:
        if not all(derived.values()):
            return a.unsupported(node, "slice bounds are neither constants nor computed from the sliced "
                                       "tensor's shape")
        shape = list(a.shapes[x])
        shape[axis] = size
        starts = derived["starts"](shape) if "starts" in derived else starts
        ends = derived["ends"](shape) if "ends" in derived else ends
        if len(starts) != len(ends) or (axes is not None and len(axes) != len(starts)):
            return a.unsupported(node, "slice bounds of different lengths")
    if starts is None or ends is None or rank is None:
        return a.unsupported(node, "slice bounds are not constants")
    axes = [int(v) % rank for v in (axes if axes is not None else range(len(starts)))]
    if axis not in axes:
        a.chan[node.output[0]] = (axis, segs)
        return
    i = axes.index(axis)
    start, end = int(starts[i]), min(int(ends[i]), size)
    if start < 0 or end < 0 or (steps is not None and int(steps[i]) != 1):
        return a.unsupported(node, "slices channels with negative bounds or a step")
    segs = a.cut(x, axis, [start, end])
    if segs is None:
        return a.unsupported(node, "slices inside a flattened channel")
    a.chan[node.output[0]] = (axis, a.segs_between(segs, start, end))
    label = node.name or node.output[0]
    if "starts" in derived:
        a.derived_bounds.append(DerivedBound(label, lambda sh: int(derived["starts"](sh)[i]),
                                             a.segs_between(segs, 0, start), segs, shape, axis))
    elif start > 0:
        a.shape_consts.append(ShapeConst(node.input[1], i, a.segs_between(segs, 0, start)))
    if "ends" in derived:
        a.derived_bounds.append(DerivedBound(label, lambda sh: int(derived["ends"](sh)[i]),
                                             a.segs_between(segs, 0, end), segs, shape, axis))
    elif int(ends[i]) <= size:
        a.shape_consts.append(ShapeConst(node.input[2], i, a.segs_between(segs, 0, end)))


def _rule_slice_other_axis(a, node):
    """A Slice whose (constant) axes leave the channel axis alone passes the channels on, whatever its bounds
    (T5 slices its position bias by a computed length); every other Slice follows _rule_slice."""
    x = node.input[0]
    axes = a.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    rank = a.rank(x)
    if axes is not None and rank is not None and a.chan[x][0] not in [int(v) % rank for v in axes.reshape(-1)]:
        a.chan[node.output[0]] = a.chan[x]
        return
    return _rule_slice(a, node)


def _rule_pad(a, node):
    """Padding of other axes (a channel-last window partition pads H and W) passes the channels on; padding the
    channel axis itself, or pads the analysis cannot read, is not supported."""
    x = node.input[0]
    axis, segs = a.chan[x]
    rank = a.rank(x)
    pads = a.const(node.input[1]) if len(node.input) > 1 and node.input[1] else a.attr(node, "pads")
    axes = a.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if len(node.input) > 3 and node.input[3] and axes is None or rank is None:
        return a.unsupported(node, "pads of unknown axes")
    if any(v in a.chan for v in node.input[1:]):
        return a.unsupported(node, "pad sizes carry channels")
    tries = [pads]
    traced = shape_elements(a, node.input[1]) if pads is None and len(node.input) > 1 else None
    if traced is not None and axis in (axes_list := [int(v) % rank for v in (axes if axes is not None else
                                                                              range(rank))]):
        j = axes_list.index(axis)           # traced pads (Swin's): only the channel axis' two entries matter
        if len(traced) == 2 * len(axes_list) and traced[j] == 0 and traced[len(axes_list) + j] == 0:
            a.chan[node.output[0]] = (axis, segs)
            return
    if pads is None:       # computed from x's shape (the legacy exporter's padding to whole windows)
        compute = shape_function(a, node.input[1], x) if len(node.input) > 1 else None
        if compute is None:
            return a.unsupported(node, "pads that are neither constants nor computed from the input's shape")
        shape = list(a.shapes[x])
        tries = [compute(shape[:axis] + [width] + shape[axis + 1:]) for width in (a.size(segs), 2 * a.size(segs) + 1)]
    axes = [int(v) % rank for v in (axes if axes is not None else range(rank))]
    for pads in tries:
        pads = np.asarray(pads).reshape(-1)
        if axis in axes and (pads[axes.index(axis)] or pads[len(axes) + axes.index(axis)]):
            return a.unsupported(node, "pads the channel axis")
    a.chan[node.output[0]] = (axis, segs)


# ----------------------------------------------------------------------------- torch forwards

def _split(m, at, x, split=None):
    sizes = split.tolist() if split is not None else at.get("split")
    axis = at["axis"]
    if sizes is None:
        n = at["num_outputs"]
        sizes = [-(-x.shape[axis] // n)] * n
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    return tuple(torch.split(x, sizes, dim=axis))


def _slice(m, at, x, starts, ends, axes=None, steps=None):
    index = [slice(None)] * x.dim()
    axes = axes.tolist() if axes is not None else list(range(len(starts)))
    steps = steps.tolist() if steps is not None else [1] * len(axes)
    backwards = []
    for s, e, a, st in zip(starts.tolist(), ends.tolist(), axes, steps):
        size = x.shape[a]
        if st > 0:
            index[a] = slice(max(min(s, size), -size), max(min(e, size), -size - 1), st)
        else:              # torch has no negative steps: ONNX's bounds are Python's, so let range() pick them
            backwards.append((a, torch.tensor(list(range(size)[slice(s, e, st)]), dtype=torch.long)))
    x = x[tuple(index)]
    for a, picked in backwards:
        x = torch.index_select(x, a, picked.to(x.device))
    return x


def _gather(m, at, x, idx):
    axis = at["axis"] % x.dim()
    flat = idx.reshape(-1).long()
    flat = torch.where(flat < 0, flat + x.shape[axis], flat)       # ONNX counts negative indices from the end
    return torch.index_select(x, axis, flat).reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def _gather_nd(m, at, data, idx):
    b = at["batch_dims"]
    k = idx.shape[-1]
    d = data.reshape(-1, *data.shape[b:])
    i = idx.reshape(d.shape[0], -1, k)
    batch = torch.arange(d.shape[0], device=data.device).view(-1, 1).expand(-1, i.shape[1])
    out = d[(batch, *[i[..., j] for j in range(k)])]
    return out.reshape(*idx.shape[:-1], *data.shape[b + k:])


def _pad(m, at, x, pads, value=None, axes=None):
    pads = shape_list(pads)
    axes = list(range(x.dim())) if axes is None else [int(a) % x.dim() for a in axes.tolist()]
    half = len(pads) // 2
    full = [0] * (2 * x.dim())
    for i, a in enumerate(axes):
        full[a], full[x.dim() + a] = pads[i], pads[half + i]
    torch_pads = [p for a in reversed(range(x.dim())) for p in (full[a], full[x.dim() + a])]
    mode = at["mode"]
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "constant":
        return F.pad(x, torch_pads, value=0.0 if value is None or value.numel() == 0 else value.item())
    return F.pad(x, torch_pads, mode={"edge": "replicate", "reflect": "reflect", "wrap": "circular"}[mode])


register(
    OpSpec("Concat", _rule_concat_token, linear=True, shape_arithmetic=True,
           forward=lambda m, at, *xs: torch.cat(xs, dim=at["axis"])),
    OpSpec("Split", _rule_split, size_inputs=frozenset({1}), forward=_split),
    OpSpec("Slice", _rule_slice_other_axis, shape_arithmetic=True, size_inputs=frozenset({1, 2, 3, 4}),
           forward=_slice),
    OpSpec("Gather", _rule_gather_lookup, opens_space=_is_lookup, shape_arithmetic=True, forward=_gather),
    OpSpec("GatherND", _rule_gather_nd, forward=_gather_nd),
    OpSpec("Pad", _rule_pad, linear=True, forward=_pad),
)
