"""Channel permutations over the channel groups of the analysis, and the averaged model they give.

A permutation of a prunable group for member m is an index array `perm` of the group's width: channel j of
the result comes from member m's channel perm[j] (the convention of `transplant`'s kept indices, with every
index inside one member). Frozen axes (graph inputs and outputs, Softmax over channels, ...) are never
permuted; a regrained group's unit is a whole head, so its permutation moves whole heads.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..groups import Analysis, Touch
from ..model_io import FLOAT_TYPES, Member, TensorTable
from ..transplant import MemberTensors, _shared_value, axis_map
from .base import Assembly, Job

Perms = dict[int, np.ndarray]      # group root -> member channel of every result channel


def identity(a: Analysis) -> Perms:
    return {g.id: np.arange(g.width) for g in a.groups() if g.prunable}


def pinned(a: Analysis) -> set[int]:
    """Groups that stay in place (identity) for the alignment methods: the input and output channels of a grouped
    Conv, whose block structure a free permutation would break."""
    return {a.find(s.space) for conv in a.grouped for s in conv.segs + conv.out_segs}


def permute(arr: np.ndarray, axes: dict[int, Touch], a: Analysis, perms: Perms, skip: int | None = None):
    """`arr` with every widened axis (except `skip`) reordered by the permutations of its groups."""
    for axis, touch in axes.items():
        if axis != skip:
            arr = np.take(arr, axis_map(a, touch.segs, perms)[1], axis=axis)
    return arr


def channel_rows(a: Analysis, touch: Touch, root: int, arr: np.ndarray) -> np.ndarray:
    """One row per channel of group `root` on the touch's axis: the channel's slice of `arr`, flattened (a
    channel of a flattened segment is its `inner` consecutive indices; several segments are put side by side)."""
    moved, rows, offset = np.moveaxis(arr, touch.axis, 0), [], 0
    for seg in touch.segs:
        width = a.width(seg.space)
        if a.find(seg.space) == root:
            rows.append(moved[offset:offset + width * seg.inner].reshape(width, -1))
        offset += width * seg.inner
    return np.hstack(rows).astype(np.float64, copy=False)


def touches_by_group(a: Analysis, widened: dict) -> dict[int, list[tuple[str, int]]]:
    """group root -> (tensor, axis) of every widened tensor axis that carries the group's channels."""
    out: dict[int, list[tuple[str, int]]] = {}
    for tensor, axes in widened.items():
        for axis, touch in axes.items():
            for root in dict.fromkeys(a.find(s.space) for s in touch.segs):
                out.setdefault(root, []).append((tensor, axis))
    return out


def averaged(members: list[Member], load: MemberTensors, a: Analysis,
             perms: list[Perms]) -> tuple[onnx.ModelProto, TensorTable]:
    """Member 0's graph with every float tensor the mean of the members' tensors, member m's channels
    reordered by perms[m] first. Shapes, names and dtypes are member 0's. The mean is taken in float64, so
    the mean of identical tensors is that tensor, bit for bit."""
    n = len(members)
    model = onnx.ModelProto()
    model.CopyFrom(members[0].model)
    tensors = TensorTable(model.graph, dict(members[0].tensors.arrays))
    widened = a.widened_touches()
    for name in members[0].tensors.names():
        axes = widened.get(name)
        if axes and members[0].tensors.dtype(name) in FLOAT_TYPES:
            value = sum(permute(load(name, m), axes, a, perms[m]).astype(np.float64) for m in range(n)) / n
        else:
            value = _shared_value(load, name, n, members)
        if value is not None:
            tensors.set(name, value)
    return model, tensors


def aligned(permutations):
    """The build of an alignment method: `permutations(analysis, load, n)` gives every member's permutations
    (member 0's the identity); the result is the members' mean after them."""
    def build(job: Job) -> Assembly:
        perms = permutations(job.analysis, job.load, job.n)
        graph, tensors = averaged(job.members, job.load, job.analysis, perms)
        groups = [{"id": g.id, "width": g.width,
                   "moved_per_member": [int(np.sum(p[g.id] != np.arange(len(p[g.id])))) for p in perms],
                   "layers": g.layers} for g in job.groups]
        return Assembly(graph, tensors, None, groups)
    return build
