"""Write the wide or fused model: every initializer assembled from the members' tensors by kept indices.

With every channel kept this is the wide model (concatenation); with the top-k it is the transplanted
model. Entries that would be zero in the block-diagonal wide weights are never materialized.
"""
from __future__ import annotations

import numpy as np
import onnx

from .errors import IncompatibleMembersError, UnsupportedGraphError
from .groups import Analysis
from .model_io import FLOAT_TYPES, Member, TensorTable, drop_unread, fresh_name
from .select import tensor_scale


class MemberTensors:
    """Member m's tensor that corresponds to member 0's tensor `name`, in the compute dtype."""

    def __init__(self, members: list[Member], name_maps: list[dict[str, str]]):
        self.members, self.maps = members, name_maps
        wide_float = any(m.tensors.dtype(n) == onnx.TensorProto.DOUBLE for m in members for n in m.tensors.names())
        self.dtype = np.float64 if wide_float else np.float32

    def __call__(self, name: str, m: int) -> np.ndarray:
        member = self.members[m]
        arr = member.tensors.array(self.maps[m].get(name, name))
        return arr.astype(self.dtype, copy=False) if member.tensors.dtype(name if m == 0 else self.maps[m].get(
            name, name)) in FLOAT_TYPES else arr

    def differing(self) -> set[str]:
        """Float tensors of member 0 whose values differ in another member."""
        out = set()
        for name in self.members[0].tensors.names():
            if self.members[0].tensors.dtype(name) in FLOAT_TYPES:
                first = self(name, 0)
                if any(not np.array_equal(first, self(name, m)) for m in range(1, len(self.members))):
                    out.add(name)
        return out


def axis_map(a: Analysis, segs, kept: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """For a widened axis: the member and the member-local index of every output index."""
    members, local = [], []
    offset = 0
    for seg in segs:
        root = a.find(seg.space)
        width = a.space_width[root]
        m, c = np.divmod(kept[root], width)
        local.append((offset + c[:, None] * seg.inner + np.arange(seg.inner)).ravel())
        members.append(np.repeat(m, seg.inner))
        offset += width * seg.inner
    return np.concatenate(members), np.concatenate(local)


def _as_index(idx: np.ndarray):
    """A contiguous run becomes a slice (a view, no copy)."""
    if len(idx) and idx[-1] - idx[0] == len(idx) - 1:
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def assemble(arrays: list[np.ndarray], maps: dict[int, tuple], scale: float) -> np.ndarray:
    """The output tensor: on each widened axis, index i comes from member maps[axis][0][i], local index
    maps[axis][1][i]; entries whose indices come from different members are zero (block structure)."""
    shape = list(arrays[0].shape)
    for axis, (member, _) in maps.items():
        shape[axis] = len(member)
    out = np.zeros(shape, dtype=arrays[0].dtype)
    for m, arr in enumerate(arrays):
        picks = {}
        for axis, (member, local) in maps.items():
            sel = member == m
            if not sel.any():
                break
            picks[axis] = (np.flatnonzero(sel), local[sel])
        else:
            _copy_block(out, arr, picks, scale)
    return out


SLAB_BYTES = 64 << 20


def _copy_block(out: np.ndarray, arr: np.ndarray, picks: dict, scale: float) -> None:
    """out[dst] = arr[src] * scale over the picked indices, one slab of the first picked axis at a time, so
    the temporaries stay small whatever the tensor's size."""
    first = min(picks)
    dst_first, src_first = picks[first]
    step = max(1, SLAB_BYTES * arr.shape[first] // max(arr.nbytes, 1))
    for start in range(0, len(dst_first), step):
        part = dict(picks)
        part[first] = (dst_first[start:start + step], src_first[start:start + step])
        value = arr[_outer(arr.shape, {axis: src for axis, (_, src) in part.items()})]
        out[_outer(out.shape, {axis: dst for axis, (dst, _) in part.items()})] = value * scale if scale != 1 else value


def _outer(shape, indices: dict) -> tuple:
    """An index that selects the outer product of per-axis index lists (contiguous runs become slices)."""
    index = [_as_index(indices[axis]) if axis in indices else slice(None) for axis in range(len(shape))]
    if sum(isinstance(i, np.ndarray) for i in index) > 1:
        return np.ix_(*[i if isinstance(i, np.ndarray) else np.arange(n)[i] for i, n in zip(index, shape)])
    return tuple(index)


def transplant(members: list[Member], load: MemberTensors, a: Analysis, kept: dict[int, np.ndarray],
               release: bool = False) -> tuple[onnx.ModelProto, TensorTable]:
    """Member 0's graph (without weight data) and its tensors rebuilt from all members for the kept channels.

    With `release`, each member tensor is dropped as soon as its output is built (the members are used up):
    the peak memory is then the inputs plus one output tensor, not inputs plus outputs."""
    n = len(members)
    model = onnx.ModelProto()
    model.CopyFrom(members[0].model)
    tensors = TensorTable(model.graph, members[0].tensors.arrays)
    widened = a.widened_touches()
    grouped = grouped_convs(a)
    for name in members[0].tensors.names():
        axes = widened.get(name)
        if axes:
            maps = {axis: axis_map(a, touch.segs, kept) for axis, touch in axes.items()}
            value = assemble([load(name, m) for m in range(n)], maps, tensor_scale(axes, n))
            if name in grouped:
                value = _grouped_inputs(a, grouped[name], value, kept, n)
        else:
            value = _shared_value(load, name, n, members)
        if value is not None:
            tensors.set(name, value)
        if release:
            for m, member in enumerate(members):
                member.tensors.arrays.pop(load.maps[m].get(name, name), None)
    widths = {r: (len(kept[r]) if r in kept else a.space_width[r]) for r in {a.find(s) for s in a.parent}}
    _check_runtime_sizes(a, widths)
    written: dict[tuple, int] = {}
    resized = any(widths[r] != a.space_width[r] for r in widths)
    for const in a.shape_consts:
        if const.computed is not None and not resized:     # at the members' widths the graph computes it right
            continue
        target = (tensors.array(const.tensor) if const.computed is None else const.computed).copy()
        size = a.axis_size(const.segs, widths) if const.segs else int(const.computed[0])     # () : a fixed size
        target.reshape(-1)[const.index] = size
        where = (const.tensor, const.use if const.private else None, const.index)
        if written.setdefault(where, size) != size:
            raise UnsupportedGraphError(f"shape constant '{const.tensor}' is shared by channel groups that keep "
                                        f"different widths ({written[where]} and {size}): use a --keep that "
                                        f"keeps them equal")
        if const.private:
            if const.computed is None and np.array_equal(target, tensors.array(const.tensor)):
                continue                     # the width it already spells: no copy
            private_shape_const(model, const, target)
        else:
            tensors.set(const.tensor, target)
    for conv in a.grouped:
        if a.is_widened(conv.out_segs[0].space):
            next(at for at in model.graph.node[conv.index].attribute if at.name == "group").i = conv.groups * n
    for const in a.attr_consts:
        attr = next(at for at in model.graph.node[const.node].attribute if at.name == const.name)
        if const.index is None:
            attr.i = a.axis_size(const.segs, widths)
        else:
            attr.ints[const.index] = a.axis_size(const.segs, widths)
    if resized:                                                # shape annotations of resized values go
        gone = _permute_by_gather(model, tensors, a, widths)
        resized = set(a.chan) | set(widened) | gone
        for node in model.graph.node:         # and what is computed from them (a bias read through a lookup)
            if any(x in resized for x in node.input):
                resized.update(node.output)
        keep = [v for v in model.graph.value_info if v.name not in resized]
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
    drop_unread(model, {const.tensor for const in a.shape_consts if const.private},     # every use has a copy
                tensors.arrays)
    return model, tensors


def _permute_by_gather(model: onnx.ModelProto, tensors: TensorTable, a: Analysis,
                       widths: dict[int, int]) -> set[str]:
    """Each channel permutation becomes one Gather of the kept channels in their permuted order (the channel
    shuffle's Reshape/Transpose/Reshape only fits the members' widths). Returns the values that are gone."""
    gone, replaced, drop = set(), set(), []
    for perm in a.permutations:
        sizes = [widths[a.find(s.space)] * s.inner for s in perm.segs]
        starts = np.cumsum([0, *sizes])
        order = np.concatenate([np.arange(starts[i], starts[i] + sizes[i]) for i in perm.order]).astype(np.int64)
        first, last = model.graph.node[perm.nodes[0]], model.graph.node[perm.nodes[-1]]
        if first.op_type == "Gather" and first.input[1] in tensors and a.index.uses(first.input[1]) == 1:
            tensors.set(first.input[1], order)        # a permutation onnxfuse wrote before: its own indices
            continue
        name = fresh_name(f"{last.output[0]}__onnxfuse_order", {t.name for t in model.graph.initializer})
        model.graph.initializer.append(onnx.numpy_helper.from_array(order, name))
        gather = onnx.helper.make_node("Gather", [first.input[0], name], [last.output[0]],
                                       name=first.name or last.output[0], axis=perm.axis)
        gone.update(o for i in perm.nodes[:-1] for o in model.graph.node[i].output)
        replaced.update(x for i in perm.nodes for x in model.graph.node[i].input)
        drop.extend(perm.nodes[1:])
        first.CopyFrom(gather)
    for i in sorted(drop, reverse=True):
        del model.graph.node[i]
    drop_unread(model, replaced, tensors.arrays)
    return gone


def private_shape_const(model: onnx.ModelProto, const, value: np.ndarray) -> None:
    """A shape constant the exporter shares between a width and other sizes: the rewritten value goes into a
    new initializer read only by this use (one node input renamed; nothing else changes)."""
    node_index, position = const.use
    name = f"{const.tensor}__onnxfuse_{node_index}_{position}"
    existing = next((t for t in model.graph.initializer if t.name == name), None)
    if existing is not None:            # two rewritten elements of one use
        value = np.where(np.arange(value.size).reshape(value.shape) == const.index, value,
                         onnx.numpy_helper.to_array(existing))
        existing.CopyFrom(onnx.numpy_helper.from_array(np.asarray(value), name))
    else:
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    model.graph.node[node_index].input[position] = name


def _check_runtime_sizes(a: Analysis, widths: dict[int, int]) -> None:
    """Sizes the graph computes at run time must follow the kept channels: a Split with num_outputs divides
    its input evenly, a Slice bound computed from the input's shape (torch.chunk) moves with it."""
    sizes: dict[str, list[int]] = {}
    for part in a.equal_parts:
        sizes.setdefault(part.node, []).append(a.axis_size(part.segs, widths))
    for node, parts in sizes.items():
        if len(set(parts)) > 1:
            raise UnsupportedGraphError(f"Split '{node}' divides its channels into {len(parts)} equal parts "
                                        f"(num_outputs), but the kept channels per part would be {parts}: "
                                        f"use a --keep that keeps them equal, or export explicit split sizes")
    for bound in a.derived_bounds:
        size = a.axis_size(bound.axis_segs, widths)
        shape = list(bound.shape)
        shape[bound.axis] = size
        want = a.axis_size(bound.segs, widths)
        try:
            got = bound.compute(shape)
        except Exception as exc:            # the graph's own arithmetic failed for the kept width
            raise UnsupportedGraphError(f"Slice '{bound.node}': its bound cannot be computed for {size} kept "
                                        f"channels ({type(exc).__name__})") from None
        if got != want and not got >= size == want:          # an end past the last channel is clamped
            raise UnsupportedGraphError(f"Slice '{bound.node}' computes its bound from the input's shape: with "
                                        f"{size} channels kept it would cut at {got}, not at {want} where the "
                                        f"kept channels of its part end")


def _shared_value(load: MemberTensors, name: str, n: int, members: list[Member]):
    """A tensor without widened channels: the members' mean (floats) or their common value (integers)."""
    arrays = [load(name, m) for m in range(n)]
    if all(np.array_equal(arrays[0], x) for x in arrays[1:]):
        return None
    if members[0].tensors.dtype(name) in FLOAT_TYPES:
        return np.mean(arrays, axis=0)
    raise IncompatibleMembersError(f"non-float tensor '{name}' differs between {members[0].name} and the "
                                   f"other members; it cannot be averaged")


def grouped_convs(a: Analysis) -> dict:
    """weight -> GroupedConv, for the grouped convolutions whose channels are fused; a grouped Conv whose input
    and output are not both fused (or both fixed) cannot keep its block structure and is refused."""
    out = {}
    for conv in a.grouped:
        fused = {a.is_widened(s.space) for s in conv.segs + conv.out_segs}
        if fused == {True, False}:
            raise UnsupportedGraphError(f"grouped convolution '{conv.node}' (group={conv.groups}): its input and "
                                        f"output channels must both be fused or both keep their width")
        if fused == {True}:
            out[conv.tensor] = conv
    return out


def _grouped_inputs(a: Analysis, conv, value: np.ndarray, kept: dict, n: int) -> np.ndarray:
    """Cut a grouped Conv's weight (rows already assembled) on its input axis block by block: the rows of
    block b read the positions, inside block b, of the input channels kept there."""
    root = a.find(conv.segs[0].space)
    blocks, size = conv.groups * n, a.space_width[root] // conv.groups
    positions = kept[root].reshape(blocks, -1) - (np.arange(blocks) * size)[:, None]
    rows = value.reshape(blocks, value.shape[0] // blocks, *value.shape[1:])
    return np.concatenate([np.take(rows[b], positions[b], axis=1) for b in range(blocks)])
