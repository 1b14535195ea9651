"""Ops that move or regroup axes: Reshape, Flatten, Transpose, Squeeze/Unsqueeze, Expand, and Shape/Size, which
read a shape. A Reshape may merge the channel axis with the static axes after it, split it into heads, merge the
heads into the batch axis, or split a fused q/k/v projection into a stacked value."""
from __future__ import annotations

from math import prod

import numpy as np
from onnx import helper

from . import F, OpSpec, register, torch
from ..groups import EqualPart, Seg, ShapeConst
from ..shape_functions import dim_value, shape_elements


def _rule_reshape(a, node):
    x, y = node.input[0], node.output[0]
    axis, segs = a.chan[x]
    dims_in = a.shapes.get(x)
    target = a.const(node.input[1]) if node.op_type == "Reshape" else None
    if node.op_type == "Flatten":
        f = a.attr(node, "axis", 1)
        f = f + len(dims_in) if dims_in is not None and f < 0 else f
        dims_out = None if dims_in is None else [dims_in[0] if f == 1 else _prod(dims_in[:f]), _prod(dims_in[f:])]
    else:
        dims_out = _resolve_target(dims_in, target) if target is not None else \
            (_traced_target(a, node, dims_in) or a.shapes.get(y))
    if dims_in is None or dims_out is None:
        return a.unsupported(node, "cannot tell where the channel axis goes (unknown shapes)")
    if not all(isinstance(d, int) and d > 0 for d in dims_in[axis + 1:]):
        return a.unsupported(node, "needs static sizes after the channel axis")
    if _same_dims(dims_in[:axis + 1], dims_out[:axis + 1]):        # channel axis untouched
        a.chan[y] = (axis, segs)
        record_target(a, node, axis, segs)
        return
    inner = prod(dims_in[axis + 1:])
    if len(dims_out) == axis + 1 and _same_dims(dims_in[:axis], dims_out[:axis]) and \
            dims_out[axis] in (None, _prod(dims_in[axis:])):
        new_segs = tuple(Seg(s.space, s.inner * inner) for s in segs)
        a.chan[y] = (axis, new_segs)
        record_target(a, node, axis, new_segs)
        return
    k = axis + len(dims_out) - len(dims_in) - 1        # [.., H*D, ..] -> [.., H, D, ..]: heads (leading 1s may come)
    if k >= axis and _same_dims([d for d in dims_in[:axis] if d != 1], [d for d in dims_out[:k] if d != 1]) and \
            _same_dims(dims_in[axis + 1:], dims_out[k + 2:]) and len(segs) == 1 and segs[0].inner == 1 and \
            isinstance(dims_out[k + 1], int) and isinstance(dims_out[k], int) and \
            dims_out[k] * dims_out[k + 1] == dims_in[axis]:
        a.regrain(segs[0].space, dims_out[k + 1])
        head_segs = (Seg(segs[0].space),)
        a.chan[y] = (k, head_segs)
        record_target(a, node, k, head_segs)
        record_target(a, node, k + 1, (), keep=dims_out[k + 1])     # the head size stays
        return
    if _reshape_leading(a, node, axis, segs, dims_in, dims_out):
        return
    a.unsupported(node, f"reshapes the channel axis ({dims_in} -> {dims_out})")


def _rule_reshape_heads(a, node):
    """Reshapes of a channel axis beyond _rule_reshape's: heads merged into the batch axis and back (the new
    exporter's attention), and reshapes that move only the leading axes while the channel axis stays last
    ([B*T, C] -> [B, T, C], window partitions, channel-independent patches)."""
    if _channel_shuffle(a, node):
        return
    x, y = node.input[0], node.output[0]
    axis, segs = a.chan[x]
    dims_in = a.shapes.get(x)
    symbol = None
    if dims_in is not None and not isinstance(dims_in[axis], int):   # the analysis knows the channel count
        symbol, dims_in = dims_in[axis], [*dims_in[:axis], a.size(segs), *dims_in[axis + 1:]]
    dims_out = _traced_target(a, node, dims_in) or a.shapes.get(y)
    if dims_in is None or dims_out is None:
        return _rule_reshape(a, node)
    if symbol is not None:
        dims_out = [a.size(segs) if d == symbol else d for d in dims_out]
    size = a.size(segs)
    if _split_fused_projection(a, node, x, y, dims_in, dims_out):
        return
    if x in a.batch_merged:                # [B*H, T, D] -> [B, H, T, D]
        k = len(dims_out) - len(dims_in)
        if axis == 0 and k >= 1 and dims_out[k] == size and _same_dims(dims_out[k + 1:], dims_in[1:]):
            a.chan[y] = (k, segs)
            record_target(a, node, k, segs)
            return
        return a.unsupported(node, f"reshapes heads merged into the batch axis ({dims_in} -> {dims_out})")
    if _same_dims(dims_in[:axis + 1], dims_out[:axis + 1]):        # channel axis untouched (symbolic rest)
        a.chan[y] = (axis, segs)
        record_target(a, node, axis, segs)
        return
    for k in range(1, len(dims_in) - axis if len(dims_out) > axis else 0):   # [.., H, r, T] -> [.., H*r, T]
        merged = dims_in[axis:axis + k + 1]
        if all(isinstance(d, int) for d in merged) and dims_out[axis] == prod(merged) and \
                _same_dims(dims_in[:axis], dims_out[:axis]) and _same_dims(dims_in[axis + k + 1:], dims_out[axis + 1:]):
            if any(s.inner != 1 for s in segs) and prod(merged[1:]) > 1:
                break
            new_segs = tuple(Seg(s.space, s.inner * prod(merged[1:])) for s in segs)
            a.chan[y] = (axis, new_segs)
            record_target(a, node, axis, new_segs)
            return
    elements = shape_elements(a, node.input[1])
    known = elements or [None] * len(dims_out)
    if axis >= 1 and axis == len(dims_in) - 1 and len(dims_out) == len(dims_in) == len(known) and len(segs) == 1 \
            and segs[0].inner == 1 and isinstance(dims_out[axis], int) and 1 < dims_out[axis] < size and \
            size % dims_out[axis] == 0 and _same_dims(dims_out[:axis - 1], dims_in[:axis - 1]) and \
            not isinstance(dims_out[axis - 1], int) and not isinstance(known[axis - 1], int):
        factor = None if elements is None or elements[axis - 1] == -1 else \
            _head_factor(a, node, axis - 1, size // dims_out[axis])
        if elements is None or (elements[axis - 1] != -1 and factor is None):
            return a.unsupported(node, "merges heads into the batch axis with a size it cannot rewrite")
        a.regrain(segs[0].space, dims_out[axis])     # [T, B, H*D] -> [T, B*H, D]: heads into the batch axis
        head_segs = (Seg(a.chan[x][1][0].space),)
        a.chan[y] = (axis - 1, head_segs)
        a.batch_merged.add(y)
        if factor is not None:
            a.shape_consts.append(ShapeConst(factor[0], 0, head_segs, factor[1]))
        record_target(a, node, axis, (), keep=dims_out[axis])               # the head size stays
        return
    rest = dims_in[axis + 1:]
    if len(dims_out) == 1 and all(d == 1 for d in rest):       # [B, C, 1, 1] -> [B*C]
        rest = []
    if 0 < axis and len(segs) == 1 and _same_dims(dims_out[1:], rest) and \
            not (isinstance(elements[0], int) and elements[0] > 0):      # [B, H, T, D] -> [B*H, T, D]
        a.chan[y] = (0, segs)
        a.batch_merged.add(y)
        return
    if _channels_last(a, node, x, y, dims_in, dims_out):
        return
    return _rule_reshape(a, node)


def _channel_shuffle(a, node) -> bool:
    """[.., C, ..] -> [.., g, C/g, ..] -> the two swapped -> [.., C, ..]: ShuffleNet's channel shuffle, a fixed
    permutation of the channel axis (output channel i*g + j is input channel j*C/g + i), recorded as one."""
    x, y = node.input[0], node.output[0]
    axis, segs = a.chan[x]
    dims_in, dims_out = a.shapes.get(x), a.shapes.get(y)
    if dims_in is None or dims_out is None or len(dims_out) != len(dims_in) + 1 or \
            not all(isinstance(d, int) and d > 1 for d in (*dims_out[axis:axis + 2], dims_in[axis])) or \
            dims_out[axis] * dims_out[axis + 1] != dims_in[axis] or \
            not _same_dims(dims_in[:axis], dims_out[:axis]) or not _same_dims(dims_in[axis + 1:], dims_out[axis + 2:]):
        return False
    swap = list(range(len(dims_out)))
    swap[axis], swap[axis + 1] = axis + 1, axis
    chain, value = [node], y
    for op in ("Transpose", "Reshape"):
        users = a.index.consumers.get(value, [])
        if len(users) != 1 or users[0].op_type != op or value in {o.name for o in a.index.model.graph.output}:
            return False
        chain.append(users[0])
        value = users[0].output[0]
    if list(a.attr(chain[1], "perm") or []) != swap or a.shapes.get(value) is None or \
            not _same_dims(a.shapes[value], dims_in):
        return False
    g, k = dims_out[axis], dims_out[axis + 1]
    return a.permute(x, value, chain, tuple(j * k + i for i in range(k) for j in range(g)))


def _traced_target(a, node, dims_in):
    """A computed Reshape target as output dims (ints, symbols of the input's dims, or None), with 0 and -1
    resolved; None if it cannot be traced."""
    elements = shape_elements(a, node.input[1])
    if elements is None or dims_in is None:
        return None
    out = [dim_value(a, e, node.input[0]) for e in elements]
    out = [dims_in[i] if d == 0 and not a.attr(node, "allowzero", 0) and i < len(dims_in) else d
           for i, d in enumerate(out)]
    if -1 in out:
        rest_in, rest_out = list(dims_in), [d for d in out if d != -1]
        for d in list(rest_out):
            if not isinstance(d, int) and d is not None and d in rest_in:
                rest_in.remove(d)
                rest_out.remove(d)
        symbols = [d for d in rest_in if not isinstance(d, int)]
        static = _prod([d for d in rest_in if isinstance(d, int)])
        if all(isinstance(d, int) for d in rest_out) and _prod(rest_out) and not symbols:
            out[out.index(-1)] = static // _prod(rest_out)
        elif all(isinstance(d, int) for d in rest_out) and len(symbols) == 1 and static == _prod(rest_out):
            out[out.index(-1)] = symbols[0]          # e.g. [B, T, 64] -> [B, -1, 4, 16]: -1 is T
        else:
            out[out.index(-1)] = None
    inferred = a.shapes.get(node.output[0])
    if inferred is not None and len(inferred) == len(out):
        out = [i if d is None else d for d, i in zip(out, inferred)]
    return out


def _reshape_leading(a, node, axis: int, segs, dims_in, dims_out) -> bool:
    """A Reshape that keeps the channel axis and everything after it, and regroups only the axes before it
    (channel-last windows: [B, H, W, C] -> [B, H/w, w, W/w, w, C] or [B*H*W, C]): each channel's values stay
    where they were relative to the channel axis, which moves to its place counted from the end."""
    tail = len(dims_in) - axis
    if len(dims_out) < tail or not _same_dims(dims_in[axis:], dims_out[len(dims_out) - tail:]):
        return False
    out_axis = len(dims_out) - tail
    a.chan[node.output[0]] = (out_axis, segs)
    record_target(a, node, out_axis, segs)
    return True


def record_target(a, node, axis: int, segs, keep: int | None = None) -> None:
    """The element of a Reshape target that spells out the channel axis' size, to be rewritten with the width.

    The target is a constant, or (legacy torch exports of x.view(b, t, h, d)) a Concat of pieces of which
    the one holding that element is a constant, or is computed from a shape: then the piece is replaced by a
    constant of the kept width (Swin computes x.size(-1) of the residual stream, whose width another group
    decides). `keep`: the element must keep this value instead (a head size, C // heads, computed).
    """
    if node.op_type != "Reshape":
        return
    name, index = node.input[1], axis
    producer, position = a.index.producer, a.index.position
    use = (position[id(node)], 1) if id(node) in position else None
    piece_use = None          # the Concat input that holds the element, when the graph computes that piece
    while name not in a.tensors and name in producer and producer[name].op_type == "Concat":
        offset = 0
        for j, piece in enumerate(producer[name].input):
            shape = a.shapes.get(piece) or (list(a.tensors.shape(piece)) if piece in a.tensors else None)
            length = shape[0] if shape and len(shape) == 1 and isinstance(shape[0], int) else (1 if shape == [] else None)
            if length is None:
                return
            if offset <= index < offset + length:
                use = (position[id(producer[name])], j)
                piece_use = (piece, use) if shape == [1] else None
                name, index = piece, index - offset
                break
            offset += length
        else:
            return
        while name in producer and producer[name].op_type in ("Unsqueeze", "Identity", "Cast") and \
                name not in a.tensors:
            use = (position[id(producer[name])], 0)
            name = producer[name].input[0]
    if name in a.tensors:
        value = np.asarray(a.tensors.array(name)).reshape(-1)
        if keep is None and index < len(value) and value[index] > 0:
            a.shape_consts.append(ShapeConst(name, index, segs, use))
    elif piece_use is not None:
        piece, use = piece_use
        a.shape_consts.append(ShapeConst(piece, 0, () if keep is not None else segs, use, private=True,
                                         computed=np.array([a.size(segs) if keep is None else keep], np.int64)))


def _prod(dims):
    return prod(dims) if all(isinstance(d, int) for d in dims) else None


def _same_dims(d1, d2) -> bool:
    return len(d1) == len(d2) and all(p == q and p is not None for p, q in zip(d1, d2))


def _resolve_target(dims_in, target):
    if dims_in is None:
        return None
    out = [dims_in[i] if t == 0 else int(t) for i, t in enumerate(target.tolist())]
    if -1 in out:
        known = _prod([d for d in out if d != -1])
        static = prod(d for d in dims_in if isinstance(d, int))
        symbolic = [d for d in dims_in if not isinstance(d, int)]
        if not known:
            inferred = None
        elif not symbolic:
            inferred = static // known
        else:  # e.g. [batch, 16, 2, 2] -> [-1, 64]: -1 is the symbolic batch
            inferred = symbolic[0] if len(symbolic) == 1 and static == known else None
        out[out.index(-1)] = inferred
    return out


# ops that work on each index of axis 0 (the batch) by itself, for values whose heads are merged into it


def _channels_last(a, node, x, y, dims_in, dims_out) -> bool:
    """[..., C, d1, d2] -> [..., C*d1*d2] with any leading axes ([B*T, C] -> [B, T, C], [B, T, H, D] ->
    [B*T, H*D], window partitions): the last axis holds the channel axis and the static axes after it, in
    order; which leading axes there are does not matter."""
    axis, segs = a.chan[x]
    trailing = dims_in[axis + 1:]
    if not trailing and dims_in[axis] is not None and dims_out[-1] == dims_in[axis] and len(dims_out) != len(dims_in):
        a.chan[y] = (len(dims_out) - 1, segs)         # the same (symbolic) size: the channel axis stays last
        record_target(a, node, len(dims_out) - 1, segs)
        return True
    if not all(isinstance(d, int) and d > 0 for d in trailing) or not isinstance(dims_in[axis], int) or \
            dims_out[-1] != prod(dims_in[axis:]) or _same_dims(dims_in[:axis + 1], dims_out[:axis + 1]):
        return False
    inner = prod(trailing)
    if inner > 1 and any(s.inner != 1 for s in segs):
        return False
    new_segs = tuple(Seg(s.space, s.inner * inner) for s in segs)
    a.chan[y] = (len(dims_out) - 1, new_segs)
    record_target(a, node, len(dims_out) - 1, new_segs)
    return True


def _split_fused_projection(a, node, x, y, dims_in, dims_out) -> bool:
    """[.., 3*H*D] -> [.., 3, H, D]: a fused q/k/v in-projection (timm ViT).
    The group is cut into its parts (each its own group, of equal width: the Reshape needs that), each part is
    split into heads, and the result is *stacked*: part i of the channels lies at index i of the stack axis."""
    axis, segs = a.chan[x]
    if len(dims_out) == axis + 2 and _parts_taken_apart(a, y, axis):       # [.., 3*E] -> [.., 3, E]
        dims_out = [*dims_out, 1]
    if axis != len(dims_in) - 1 or len(segs) != 1 or segs[0].inner != 1 or len(dims_out) != axis + 3 \
            or not _same_dims(dims_in[:axis], dims_out[:axis]) or not all(isinstance(d, int) for d in dims_out[axis:]):
        return False
    parts, size = dims_out[axis], a.size(segs)
    if parts < 2 or prod(dims_out[axis:]) != size:
        return False
    width = size // parts
    cut = a.cut(x, axis, [width * i for i in range(1, parts)])
    if cut is None or len(cut) != parts:
        return False
    for seg in a.chan[x][1]:
        a.regrain(seg.space, dims_out[axis + 2])
    part_segs = [(Seg(s.space),) for s in a.chan[x][1]]
    a.stacked[y] = (axis, part_segs)
    a.chan[y] = (axis + 1, part_segs[0])
    for part in part_segs:
        a.equal_parts.append(EqualPart(node.name or y, part))
    record_target(a, node, axis + 1, part_segs[0])
    record_target(a, node, axis + 2, (), keep=dims_out[axis + 2])     # the head size stays
    return True


def _head_factor(a, node, index: int, heads: int):
    """Element `index` of a Reshape target computed as batch * heads (Mul of a size by a constant head count,
    through Concat/Reshape/Unsqueeze/Cast): that constant and where it is read, to rewrite it with the kept
    head count; None if the element is computed otherwise."""
    name, position = node.input[1], a.index.position
    producer = a.index.producer.get(name)
    if producer is None or producer.op_type != "Concat":
        return None
    offset = 0
    for piece in producer.input:
        shape = a.shapes.get(piece) or (list(a.tensors.shape(piece)) if piece in a.tensors else None)
        length = shape[0] if shape and len(shape) == 1 and isinstance(shape[0], int) else (1 if shape == [] else None)
        if length is None:
            return None
        if offset <= index < offset + length:
            break
        offset += length
    else:
        return None
    while piece in a.index.producer and a.index.producer[piece].op_type in ("Reshape", "Unsqueeze", "Cast", "Identity"):
        piece = a.index.producer[piece].input[0]
    mul = a.index.producer.get(piece)
    if mul is None or mul.op_type != "Mul":
        return None
    for j, c in enumerate(mul.input):
        if c in a.tensors and np.asarray(a.tensors.array(c)).size == 1 and int(np.asarray(a.tensors.array(c))) == heads:
            return c, (position[id(mul)], j)
    return None


def _parts_taken_apart(a, value: str, axis: int) -> bool:
    """Whether axis `axis` of `value` is, through Unsqueeze/Transpose/Squeeze of other axes, only indexed by
    Gathers of constant indices (nn.MultiheadAttention's q, k, v = proj.unflatten(-1, (3, E))...[i]): then a
    [.., 3, E] Reshape is a fused projection, not a split into heads."""
    consumers = a.index.consumers.get(value, [])
    if not consumers:
        return False
    for node in consumers:
        rank = a.rank(node.input[0])
        if node.op_type == "Gather" and rank and a.attr(node, "axis", 0) % rank == axis and node.input[1] in a.tensors:
            continue
        if node.op_type == "Transpose" and rank:
            perm = list(a.attr(node, "perm") or reversed(range(rank)))
            if not _parts_taken_apart(a, node.output[0], perm.index(axis)):
                return False
            continue
        if node.op_type in ("Unsqueeze", "Squeeze") and rank:
            axes = a.attr(node, "axes")
            axes = a.const(node.input[1]) if axes is None and len(node.input) > 1 else axes
            out_rank = a.rank(node.output[0])
            if axes is None or out_rank is None:
                return False
            if node.op_type == "Squeeze":
                axes = [int(v) % rank for v in np.asarray(axes).reshape(-1)]
                new = None if axis in axes else axis - sum(v < axis for v in axes)
            else:
                axes = {int(v) % out_rank for v in np.asarray(axes).reshape(-1)}
                new = [p for p in range(out_rank) if p not in axes][axis]
            if new is None or not _parts_taken_apart(a, node.output[0], new):
                return False
            continue
        return False
    return True


def _rule_flatten_last(a, node):
    """Flatten that keeps the channel axis (and what follows it) last, e.g. [B, T, C] -> [B*T, C]."""
    x = node.input[0]
    dims_in = a.shapes.get(x)
    f = a.attr(node, "axis", 1)
    if dims_in is not None and f % len(dims_in) > 1 and a.chan[x][0] >= f % len(dims_in) and \
            _channels_last(a, node, x, node.output[0], dims_in, [None, _prod(dims_in[f % len(dims_in):])]):
        return
    return _rule_reshape(a, node)


def _rule_transpose(a, node):
    axis, segs = a.chan[node.input[0]]
    rank = a.rank(node.input[0])
    perm = a.attr(node, "perm") or list(reversed(range(rank)))
    a.chan[node.output[0]] = (list(perm).index(axis), segs)


def _rule_squeeze(a, node):
    axis, segs = a.chan[node.input[0]]
    axes = a.attr(node, "axes")
    if axes is None and len(node.input) > 1:
        axes = a.const(node.input[1])
    in_rank, out_rank = a.rank(node.input[0]), a.rank(node.output[0])
    if axes is None or in_rank is None or out_rank is None:
        return a.unsupported(node, "axes or ranks unknown")
    if node.op_type == "Squeeze":
        axes = [int(x) % in_rank for x in axes]
        if axis in axes:
            return a.unsupported(node, "squeezes the channel axis")
        new = axis - sum(x < axis for x in axes)
    else:
        axes = {int(x) % out_rank for x in axes}
        new = [p for p in range(out_rank) if p not in axes][axis]
    a.chan[node.output[0]] = (new, segs)


def _rule_expand(a, node):
    """Expand of a value with channels (GQA's repeat of k/v heads: [B, Hkv, 1, T, D] -> [B, Hkv, r, T, D]):
    the channel axis must keep its size (1 -> size is not channel-wise); new leading axes shift it."""
    x, y = node.input[0], node.output[0]
    if x not in a.chan or node.input[1] in a.chan:
        return a.unsupported(node, "expands by a shape that carries channels")
    axis, segs = a.chan[x]
    rank_in, rank_out = a.rank(x), a.rank(y)
    elements = shape_elements(a, node.input[1])
    if rank_in is None or rank_out is None or elements is None:
        return a.unsupported(node, "expand with unknown ranks")
    out_axis = axis + rank_out - rank_in
    e = elements[out_axis - (rank_out - len(elements))] if out_axis - (rank_out - len(elements)) >= 0 else 1
    if dim_value(a, e, x) != 1 and dim_value(a, e, x) != a.size(segs):
        return a.unsupported(node, "expands along the channel axis (or to a size it cannot tell)")
    if isinstance(e, int) and e != 1:        # the target spells the width: rewritten like a Reshape target
        count = len(a.shape_consts)
        target = node.input[1]
        where = a.index.producer.get(target)
        if where is not None and where.op_type == "Where" and target not in a.tensors:
            target = where.input[2]        # the legacy exporter's expand(-1): Where(Equal(s, -1), 1, s)
        record_target(a, helper.make_node("Reshape", [x, target], [y]),
                      out_axis - (rank_out - len(elements)), segs)
        if len(a.shape_consts) == count:
            return a.unsupported(node, "expand target spells the channel count in a value it cannot rewrite")
    a.chan[y] = (out_axis, segs)


def _rule_shape(a, node):
    """Reading a shape is allowed: the result carries no channels."""


# ----------------------------------------------------------------------------- torch forwards

def _flatten(m, at, x):
    axis = at["axis"] % max(x.dim(), 1) if at["axis"] < 0 else at["axis"]
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _reshape(m, at, x, shape):
    target = [int(s) for s in shape.tolist()]
    if not at.get("allowzero", 0):
        target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
    return x.reshape(target)


def axes_of(at, axes) -> list[int] | None:
    """The `axes` of a node: its input (newer opsets) or its attribute."""
    if axes is not None:
        return [int(a) for a in axes.tolist()]
    return list(at["axes"]) if "axes" in at else None


def _squeeze(m, at, x, axes=None):
    axes = axes_of(at, axes)
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _unsqueeze(m, at, x, axes=None):
    axes = sorted(a % (x.dim() + len(axes_of(at, axes))) for a in axes_of(at, axes))
    for a in axes:
        x = x.unsqueeze(a)
    return x


def shape_list(shape) -> list[int]:
    return [int(s) for s in shape.tolist()]


def _expand(m, at, x, shape):
    return torch.broadcast_to(x, torch.broadcast_shapes(tuple(x.shape), tuple(shape_list(shape))))


def _shape(m, at, x):
    return torch.tensor(x.shape[at.get("start", 0):at.get("end", x.dim())], dtype=torch.int64)


def _rule_resize(a, node):
    """Resizing of other axes (HRNet's and FPNs' upsampling of H and W) passes the channels on: the channel
    axis' scale is 1, or its target size is the width (rewritten with the kept width)."""
    x, y = node.input[0], node.output[0]
    axis, segs = a.chan[x]
    inputs = list(node.input) + [""] * 4
    scales = a.const(inputs[2] if node.op_type == "Resize" else inputs[1])
    sizes = a.const(inputs[3]) if node.op_type == "Resize" else None
    axes = a.attr(node, "axes")
    if axes is not None:
        rank = a.rank(x)
        axes = [d % rank if rank else d for d in axes]
        if axis not in axes:                   # only other axes are resized
            a.chan[y] = (axis, segs)
            return
    index = axis if axes is None else axes.index(axis)
    if scales is not None and scales.size > index and float(scales.reshape(-1)[index]) == 1.0:
        a.chan[y] = (axis, segs)
    elif sizes is not None and sizes.size > index and int(sizes.reshape(-1)[index]) == a.size(segs):
        a.chan[y] = (axis, segs)
        a.shape_consts.append(ShapeConst(inputs[3], index, segs, (a.index.index(node), 3)))
    else:
        a.unsupported(node, "resizes the channel axis, or by sizes the analysis cannot read")


def _resize(m, at, x, roi=None, scales=None, sizes=None):
    """ONNX Resize / Upsample of the spatial axes by torch's interpolate, for the modes both define alike:
    nearest with asymmetric coordinates and floor (torch 'nearest'), (bi/tri)linear with half_pixel or
    align_corners, cubic (A = -0.75) likewise on 2-D."""
    text = lambda v: v.decode() if isinstance(v, bytes) else v          # noqa: E731
    mode, coords = text(at.get("mode", "nearest")), text(at.get("coordinate_transformation_mode", "asymmetric"))
    spatial = x.dim() - 2
    if sizes is not None and sizes.numel():
        target = {"size": [int(v) for v in sizes.tolist()[-spatial:]]}
    else:
        target = {"scale_factor": [float(v) for v in scales.tolist()[-spatial:]]}
    if mode == "nearest" and coords == "asymmetric" and text(at.get("nearest_mode", "floor")) == "floor":
        return F.interpolate(x, mode="nearest", **target)
    kinds = {"linear": {1: "linear", 2: "bilinear", 3: "trilinear"}, "cubic": {2: "bicubic"}}
    if mode in kinds and spatial in kinds[mode] and coords in ("half_pixel", "pytorch_half_pixel", "align_corners") \
            and (mode != "cubic" or at.get("cubic_coeff_a", -0.75) == -0.75):
        return F.interpolate(x, mode=kinds[mode][spatial], align_corners=coords == "align_corners", **target)
    raise NotImplementedError(f"Resize mode {mode} with {coords} coordinates has no torch equivalent here")


def _upsample(m, at, x, scales):
    return _resize(m, {**at, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, x, None,
                   scales)


register(
    OpSpec("Resize", _rule_resize, linear=True, size_inputs=frozenset({1, 2, 3}), forward=_resize),
    OpSpec("Upsample", _rule_resize, linear=True, size_inputs=frozenset({1}), forward=_upsample),
    OpSpec("Reshape", _rule_reshape_heads, linear=True, shape_arithmetic=True, size_inputs=frozenset({1}),
           batchwise=True, forward=_reshape),
    OpSpec("Flatten", _rule_flatten_last, linear=True, forward=_flatten),
    OpSpec("Transpose", _rule_transpose, linear=True, batchwise=True,
           forward=lambda m, at, x: x.permute(at.get("perm", list(reversed(range(x.dim())))))),
    OpSpec("Squeeze", _rule_squeeze, linear=True, shape_arithmetic=True, forward=_squeeze),
    OpSpec("Unsqueeze", _rule_squeeze, linear=True, shape_arithmetic=True, forward=_unsqueeze),
    OpSpec("Expand", _rule_expand, size_inputs=frozenset({1}), forward=_expand),
    OpSpec("Tile", size_inputs=frozenset({1}), trainable=False),
    OpSpec("Shape", _rule_shape, linear=True, reads_shape=True, batchwise=True, forward=_shape),
    OpSpec("Size", _rule_shape, linear=True, reads_shape=True, trainable=False),
)
