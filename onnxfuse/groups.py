"""Channel-group analysis: a union-find over the channel spaces of an ONNX graph.

Every Gemm/MatMul/Conv output channel axis opens a *space*. Ops that act channel by channel pass a
space through, ops that combine two activations element-wise unify their spaces, and Flatten/Reshape
turn a channel axis into runs of `inner` consecutive columns. A *group* is a set of unified spaces:
one neuron index of a group is one row of every producer, one column block of every consumer and one
entry of every per-channel parameter it touches. Each op has one rule in RULES; an op without a rule
that touches a channel axis blocks its group and is reported, never guessed at.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np
import onnx
from onnx import helper, shape_inference

from .errors import UnsupportedGraphError
from .model_io import TensorTable, light_model


@dataclass(frozen=True)
class Seg:
    """A run of one axis that belongs to one space: channel c covers indices c*inner .. c*inner+inner-1."""
    space: int
    inner: int = 1


@dataclass
class Touch:
    """An axis of a constant tensor that is indexed by channels: role out (producer rows), in (consumer
    columns), norm (normalization scale: scored) or param (bias, BN statistics: not scored)."""
    tensor: str
    axis: int
    segs: tuple[Seg, ...]
    role: str
    node: str


@dataclass
class ShapeConst:
    """An element of a shape constant (e.g. a Reshape target) that equals the width of a channel axis."""
    tensor: str
    index: int
    segs: tuple[Seg, ...]


@dataclass
class AttrConst:
    """A node attribute (or element `index` of a list attribute) that equals the width of a channel axis,
    e.g. the group count of a depthwise Conv or a Split size."""
    node: int
    name: str
    segs: tuple[Seg, ...]
    index: int | None = None


@dataclass
class EqualPart:
    """One output of a Split with `num_outputs`: its channels must stay as many as every other part's, since
    the node divides its input evenly (checked when the kept channels are known)."""
    node: str
    segs: tuple[Seg, ...]


@dataclass
class DerivedBound:
    """A Slice bound that the graph computes from the sliced tensor's own Shape (the legacy exporter's
    torch.chunk): it follows the pruned width by itself, which is checked when the kept channels are known.
    `compute(shape)` recomputes the bound; `segs` lie before it on an axis laid out as `axis_segs`."""
    node: str
    compute: object
    segs: tuple[Seg, ...]
    axis_segs: tuple[Seg, ...]
    shape: list
    axis: int


@dataclass
class GroupedConv:
    """A Conv with 1 < group < channels: input channel block b (of channels / group) feeds only output block b.
    Both channel axes are kept evenly within blocks (the block count is the group count times the members), and
    the weight's input axis, which indexes a position inside a block, is cut block by block."""
    node: str
    tensor: str
    segs: tuple[Seg, ...]          # the input channels
    out_segs: tuple[Seg, ...]
    groups: int
    index: int                     # the node's position, for its `group` attribute


@dataclass
class Group:
    id: int
    width: int
    spaces: list[int]
    layers: list[str]
    frozen: list[str]          # why the group keeps its width (graph input/output, Softmax over channels, ...)
    blocked: list[str]         # ops without a rule that touch the group

    @property
    def prunable(self) -> bool:
        return not self.frozen and not self.blocked


# Ops that treat every channel independently and keep the layout. "linear" ones commute with averaging.
LINEAR_UNARY = {"Identity", "Dropout", "Neg", "Cast", "CastLike"}
UNARY = LINEAR_UNARY | {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Celu", "HardSwish", "HardSigmoid", "Softplus",
    "Softsign", "Mish", "ThresholdedRelu", "Clip", "Abs", "Exp", "Log", "Sqrt", "Erf", "Reciprocal", "Floor",
    "Ceil", "Round", "Sin", "Cos", "Sign", "Swish", "Not", "IsNaN", "IsInf", "Shrink"}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
LINEAR_POOLS = {"AveragePool", "GlobalAveragePool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "PRelu"}
CHANNEL_REDUCERS = {"Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin", "TopK"}
SHAPE_READERS = {"Shape", "Size"}
LINEAR_LAYERS = {"Gemm", "MatMul", "Conv"}

RULES: dict[str, callable] = {}


def rule(*op_types):
    def register(fn):
        for op in op_types:
            RULES[op] = fn
        return fn
    return register


@dataclass
class Analysis:
    """The result of analysing one member graph; read by stack, select and slice."""
    model: onnx.ModelProto
    tensors: TensorTable
    shapes: dict[str, list]
    chan: dict[str, tuple[int, tuple[Seg, ...]]] = field(default_factory=dict)   # value -> (axis, segments)
    parent: dict[int, int] = field(default_factory=dict)
    space_width: dict[int, int] = field(default_factory=dict)
    space_layer: dict[int, str] = field(default_factory=dict)
    touches: list[Touch] = field(default_factory=list)
    shape_consts: list[ShapeConst] = field(default_factory=list)
    frozen: dict[int, list[str]] = field(default_factory=dict)
    blocked: dict[int, list[str]] = field(default_factory=dict)
    attr_consts: list[AttrConst] = field(default_factory=list)
    equal_parts: list[EqualPart] = field(default_factory=list)
    derived_bounds: list[DerivedBound] = field(default_factory=list)
    grouped: list[GroupedConv] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)    # unsupported ops touching channels
    mixing: dict[str, str] = field(default_factory=dict)  # node -> why it mixes channels of one axis
    retired: set[int] = field(default_factory=set)          # spaces replaced by their parts (refine)

    # -- union-find
    def new_space(self, width: int, layer: str) -> int:
        space = len(self.parent)
        self.parent[space] = space
        self.space_width[space] = int(width)
        self.space_layer[space] = layer
        return space

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int, node: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.space_width[ra] != self.space_width[rb]:
            raise UnsupportedGraphError(f"node '{node}' combines channel axes of widths "
                                        f"{self.space_width[ra]} and {self.space_width[rb]}")
        self.parent[max(ra, rb)] = min(ra, rb)

    def regrain(self, space: int, factor: int) -> None:
        """Make the unit of a group `factor` consecutive channels (an attention head of `factor` dims):
        its width divides by `factor` and every segment of it covers `factor` times more indices."""
        root = self.find(space)
        if factor == 1:
            return
        if self.space_width[root] % factor:
            raise UnsupportedGraphError(f"cannot split width {self.space_width[root]} into units of {factor}")
        members = {s for s in self.parent if self.find(s) == root}
        for s in members:
            self.space_width[s] //= factor
        self._rewrite(lambda segs: tuple(Seg(g.space, g.inner * factor) if g.space in members else g
                                         for g in segs))

    def refine(self, space: int, cuts: list[int]) -> None:
        """Split a group into consecutive parts at channel positions `cuts` (a Split or Slice of its channels):
        each part becomes a group of its own, laid out part by part in the wide model."""
        root = self.find(space)
        sizes = np.diff([0, *cuts, self.space_width[root]]).tolist()
        group = [s for s in self.parent if self.find(s) == root and s not in self.retired]
        parts = {s: [self.new_space(size, self.space_layer[s]) for size in sizes] for s in group}
        for s in group:
            for part in parts[s]:
                self.frozen[part] = list(self.frozen.get(s, []))
                self.blocked[part] = list(self.blocked.get(s, []))
            for mine, first in zip(parts[s], parts[group[0]]):
                self.union(mine, first, "refine")
        self.retired.update(group)
        split = lambda segs: tuple(Seg(p, g.inner) for g in segs for p in (parts[g.space] if g.space in parts
                                                                            else [g.space]))
        self._rewrite(split)

    def _rewrite(self, fn) -> None:
        for value, (axis, segs) in self.chan.items():
            self.chan[value] = (axis, fn(segs))
        for item in self.touches + self.shape_consts + self.attr_consts + self.equal_parts + self.derived_bounds:
            item.segs = fn(item.segs)
        for item in self.derived_bounds:
            item.axis_segs = fn(item.axis_segs)
        for item in self.grouped:
            item.segs, item.out_segs = fn(item.segs), fn(item.out_segs)

    def width(self, space: int) -> int:
        return self.space_width[self.find(space)]

    def freeze(self, segs, reason: str) -> None:
        for seg in segs:
            self.frozen.setdefault(seg.space, []).append(reason)

    def block(self, segs, reason: str) -> None:
        for seg in segs:
            self.blocked.setdefault(seg.space, []).append(reason)

    def is_widened(self, space: int) -> bool:
        root = self.find(space)
        return not any(self.find(s) == root and (self.frozen[s] if s in self.frozen else self.blocked[s])
                       for s in list(self.frozen) + list(self.blocked) if s not in self.retired)

    def axis_size(self, segs, widths) -> int:
        """Size of an axis laid out as `segs`, given a width per group root."""
        return sum(widths[self.find(s.space)] * s.inner for s in segs)

    def size(self, segs) -> int:
        """Size of an axis laid out as `segs` in the analysed graph (every group at its own width)."""
        return sum(self.width(s.space) * s.inner for s in segs)

    def blocks(self) -> dict[int, tuple[int, str]]:
        """group root -> (blocks per member, node): channels of the group are kept evenly within that many
        consecutive blocks (a grouped Conv's; the finest when several meet)."""
        out: dict[int, tuple[int, str]] = {}
        for conv in self.grouped:
            for seg in conv.segs + conv.out_segs:
                root = self.find(seg.space)
                have = out.get(root, (1, conv.node))[0]
                need = max(have, conv.groups)
                if need % min(have, conv.groups) or self.space_width[root] % need:
                    raise UnsupportedGraphError(f"grouped convolutions '{out[root][1]}' and '{conv.node}' cut one "
                                                f"channel group into {have} and {conv.groups} blocks")
                out[root] = (need, conv.node if need == conv.groups else out[root][1])
        return out

    # -- groups, for reports and for selection
    def groups(self) -> list[Group]:
        roots = sorted({self.find(s) for s in self.parent if s not in self.retired})
        frozen = {r: [] for r in roots}
        blocked = {r: [] for r in roots}
        for space, reasons in self.frozen.items():
            if space not in self.retired:
                frozen[self.find(space)] += [r for r in reasons if r not in frozen[self.find(space)]]
        for space, reasons in self.blocked.items():
            if space not in self.retired:
                blocked[self.find(space)] += [r for r in reasons if r not in blocked[self.find(space)]]
        result = []
        for root in roots:
            spaces = [s for s in self.parent if self.find(s) == root and s not in self.retired]
            layers = list(dict.fromkeys(self.space_layer[s] for s in spaces))     # parts of one layer: once
            result.append(Group(root, self.space_width[root], spaces, layers,
                                frozen[root], blocked[root]))
        return result

    def widened_touches(self) -> dict[str, dict[int, Touch]]:
        """tensor -> axis -> touch, for the axes whose channels are concatenated in the wide model."""
        result: dict[str, dict[int, Touch]] = {}
        for touch in self.touches:
            flags = {self.is_widened(s.space) for s in touch.segs}
            if flags == {True}:
                axes = result.setdefault(touch.tensor, {})
                old = axes.get(touch.axis)
                if old is not None and [self.find(s.space) for s in old.segs] != [self.find(s.space) for s in touch.segs]:
                    raise UnsupportedGraphError(f"tensor '{touch.tensor}' is shared by layers with different "
                                                f"channel groups ('{old.node}', '{touch.node}')")
                if old is None or touch.role != "param":
                    axes[touch.axis] = touch
            elif flags == {True, False}:
                raise UnsupportedGraphError(f"tensor '{touch.tensor}' of node '{touch.node}' mixes fused and "
                                            f"fixed-width channels on one axis")
        for touch in self.touches:      # one tensor read by a fused layer and by a fixed-width one
            if touch.axis in result.get(touch.tensor, {}) and not all(self.is_widened(s.space) for s in touch.segs):
                raise UnsupportedGraphError(f"tensor '{touch.tensor}' is shared by a fused layer "
                                            f"('{result[touch.tensor][touch.axis].node}') and a fixed-width one "
                                            f"('{touch.node}')")
        return result


# ----------------------------------------------------------------------------- shapes

def infer_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Shapes of every value (ints, or None/str for unknown/symbolic dims), inferred on a weight-less copy."""
    light = light_model(model)
    try:
        inferred = shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:
        inferred = light
    shapes = {}
    for v in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        tt = v.type.tensor_type
        if tt.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in tt.shape.dim]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


# ----------------------------------------------------------------------------- the analysis

def analyze(model: onnx.ModelProto, tensors: TensorTable | None = None, source: str = "model") -> Analysis:
    """Find the channel groups of a graph. Ops must be in topological order (an ONNX requirement)."""
    tensors = tensors or TensorTable(model.graph)
    a = Analysis(model, tensors, infer_shapes(model))
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        touching = [x for x in node.input if x in a.chan]
        fn = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else _rule_ml if node.domain == "ai.onnx.ml" else None
        if not touching and node.op_type not in LINEAR_LAYERS:
            continue          # the op never sees a channel axis: nothing to do
        if fn is None:
            _unsupported(a, node, f"op {node.op_type}{' (domain ' + node.domain + ')' if node.domain else ''} "
                                  f"has no channel rule")
            continue
        fn(a, node)
    for out in model.graph.output:
        if out.name in a.chan:
            a.freeze(a.chan[out.name][1], f"reaches graph output '{out.name}'")
    return a


def _unsupported(a: Analysis, node, why: str) -> None:
    label = f"node '{node.name}' ({node.op_type}): {why}"
    a.problems.append(label)
    for x in node.input:
        if x in a.chan:
            a.block(a.chan[x][1], label)


def _rank(a: Analysis, name: str) -> int | None:
    shape = a.shapes.get(name)
    return len(shape) if shape is not None else None


def _attr(node, name, default=None):
    for at in node.attribute:
        if at.name == name:
            return helper.get_attribute_value(at)
    return default


def _const(a: Analysis, name: str):
    return a.tensors.array(name) if name and name in a.tensors else None


def _open_space(a: Analysis, node, width: int, out: str, axis: int) -> tuple[Seg, ...]:
    segs = (Seg(a.new_space(width, node.name or node.output[0])),)
    a.chan[out] = (axis, segs)
    return segs


def _weight_layer(a, node, x: str, w: str, in_axis: int, out_axis: int, x_axis: int, out_chan_axis: int):
    """Shared by Gemm, MatMul and Conv: weight `w` consumes x's channels on in_axis, opens a space on out_axis."""
    if w not in a.tensors:
        return _unsupported(a, node, "weight is not a constant")
    if x in a.chan:
        axis, segs = a.chan[x]
        if axis != x_axis:
            return _unsupported(a, node, f"channels on axis {axis} of its input, expected axis {x_axis}")
        if a.tensors.shape(w)[in_axis] != a.size(segs):
            return _unsupported(a, node, "weight does not match its input's channel count")
        a.touches.append(Touch(w, in_axis, segs, "in", node.name))
    out_segs = _open_space(a, node, a.tensors.shape(w)[out_axis], node.output[0], out_chan_axis)
    a.touches.append(Touch(w, out_axis, out_segs, "out", node.name))
    return out_segs


@rule("Gemm")
def _rule_gemm(a, node):
    trans_a, trans_b = _attr(node, "transA", 0), _attr(node, "transB", 0)
    segs = _weight_layer(a, node, node.input[0], node.input[1], in_axis=1 if trans_b else 0,
                         out_axis=0 if trans_b else 1, x_axis=0 if trans_a else 1, out_chan_axis=1)
    if segs and len(node.input) > 2:
        _bias(a, node, node.input[2], node.output[0])


@rule("MatMul")
def _rule_matmul(a, node):
    x, w = node.input
    rank = _rank(a, x)
    if w not in a.tensors and x in a.chan or w in a.chan:
        return _activation_matmul(a, node)
    if w not in a.tensors or len(a.tensors.shape(w)) != 2 or rank is None:
        return _unsupported(a, node, "MatMul with a weight of rank > 2 (or an unknown rank) touching a channel axis")
    _weight_layer(a, node, x, w, in_axis=0, out_axis=1, x_axis=rank - 1, out_chan_axis=rank - 1)


def _activation_matmul(a, node):
    """A @ B of two activations (attention): channels on a batch axis (heads) are unified and kept; channels
    on the rows of A or the columns of B carry through; a contracted channel axis is not supported."""
    y = node.output[0]
    out_rank = _rank(a, y)
    result = None
    for pos, x in enumerate(node.input):
        if x not in a.chan:
            continue
        axis, segs = a.chan[x]
        rank = _rank(a, x)
        from_end = rank - axis
        contracted = 1 if pos == 0 else 2
        if from_end == contracted or rank < 2 or out_rank is None:
            return _unsupported(a, node, "contracts a channel axis of two activations")
        out_axis = out_rank - from_end
        if result is not None:
            if result[0] != out_axis or len(result[1]) != len(segs):
                return _unsupported(a, node, "its inputs carry channels on different axes")
            for s, r in zip(segs, result[1]):
                a.union(s.space, r.space, node.name)
        result = (out_axis, segs)
    a.chan[y] = result


@rule("Conv")
def _rule_conv(a, node):
    group = _attr(node, "group", 1)
    if group != 1:
        return _depthwise_conv(a, node, group)
    segs = _weight_layer(a, node, node.input[0], node.input[1], in_axis=1, out_axis=0, x_axis=1, out_chan_axis=1)
    if segs and len(node.input) > 2 and node.input[2] in a.tensors:
        a.touches.append(Touch(node.input[2], 0, segs, "param", node.name))


def _depthwise_conv(a, node, group: int):
    """group == input channels: output channel o comes from input channel o // multiplier, so the output
    keeps the input's channels (each repeated `multiplier` times) and the group count is their width."""
    x, w = node.input[0], node.input[1]
    if x not in a.chan or w not in a.tensors:
        return _unsupported(a, node, f"grouped convolution (group={group}) of a graph input")
    axis, segs = a.chan[x]
    if axis == 1 and len(segs) == 1 and segs[0].inner == 1 and a.size(segs) % group == 0 and \
            a.size(segs) != group:
        return _grouped_conv(a, node, group)
    if axis != 1 or len(segs) != 1 or segs[0].inner != 1 or a.size(segs) != group:
        return _unsupported(a, node, f"grouped convolution with group={group} (only depthwise, group = input "
                                     f"channels, is supported)")
    multiplier = a.tensors.shape(w)[0] // group
    out_segs = (Seg(segs[0].space, multiplier),)
    a.touches.append(Touch(w, 0, out_segs, "out", node.name))
    if len(node.input) > 2 and node.input[2]:
        a.touches.append(Touch(node.input[2], 0, out_segs, "param", node.name))
    a.attr_consts.append(AttrConst(_node_index(a, node), "group", segs))
    a.chan[node.output[0]] = (1, out_segs)


def _grouped_conv(a, node, group: int):
    """1 < group < channels (ResNeXt, RegNet): the output opens a space; input and output channels are kept
    evenly within the conv's blocks, see GroupedConv and `Analysis.blocks`."""
    x, w = node.input[0], node.input[1]
    segs = a.chan[x][1]
    shape = a.tensors.shape(w)
    if shape[1] * group != a.size(segs) or shape[0] % group:
        return _unsupported(a, node, f"grouped convolution (group={group}) whose weight {list(shape)} does not "
                                     f"match its input's {a.size(segs)} channels")
    out_segs = _open_space(a, node, shape[0], node.output[0], 1)
    a.touches.append(Touch(w, 0, out_segs, "out", node.name))
    if len(node.input) > 2 and node.input[2] in a.tensors:
        a.touches.append(Touch(node.input[2], 0, out_segs, "param", node.name))
    a.grouped.append(GroupedConv(node.name, w, segs, out_segs, group, _node_index(a, node)))


def _node_index(a, node) -> int:
    return next(i for i, n in enumerate(a.model.graph.node) if n is node)


def _bias(a, node, b: str, y: str):
    """A constant added to (or multiplying) y: touches its channel axis unless it broadcasts over it."""
    if b not in a.tensors:
        return
    axis, segs = a.chan[y]
    shape = a.tensors.shape(b)
    rank = _rank(a, y) or axis + 1
    b_axis = axis - (rank - len(shape))
    size = a.size(segs)
    # a size-1 axis on a 1-wide layer is taken as per-channel: concatenating it is right either way
    if b_axis >= 0 and shape[b_axis] == size:
        a.touches.append(Touch(b, b_axis, segs, "param", node.name))
    elif b_axis >= 0 and shape[b_axis] != 1:
        _unsupported(a, node, f"constant '{b}' has {shape[b_axis]} entries on a channel axis of size {size}")


@rule(*UNARY, *POOLS)
def _rule_pass(a, node):
    x = node.input[0]
    axis, segs = a.chan[x]
    if node.op_type in POOLS and axis != 1:
        return _unsupported(a, node, f"pooling over channels on axis {axis}")
    a.chan[node.output[0]] = (axis, segs)


@rule("BatchNormalization", "InstanceNormalization")
def _rule_norm(a, node):
    axis, segs = a.chan[node.input[0]]
    if axis != 1:
        return _unsupported(a, node, f"normalization of axis 1, but channels are on axis {axis}")
    for i, x in enumerate(node.input[1:], start=1):
        if x and x in a.tensors:
            a.touches.append(Touch(x, 0, segs, "norm" if i == 1 else "param", node.name))
    a.chan[node.output[0]] = (axis, segs)


@rule(*BINARY)
def _rule_binary(a, node):
    y = node.output[0]
    out_rank = _rank(a, y)
    laid = [(x, a.chan[x]) for x in node.input if x in a.chan]
    # align channel axes from the right (numpy broadcasting)
    ref_x, (ref_axis, ref_segs) = laid[0]
    ref_from_end = (_rank(a, ref_x) or ref_axis + 1) - ref_axis
    for x, (axis, segs) in laid[1:]:
        if (_rank(a, x) or axis + 1) - axis != ref_from_end or len(segs) != len(ref_segs) or \
                any(s.inner != r.inner for s, r in zip(segs, ref_segs)):
            return _unsupported(a, node, "combines tensors whose channels are laid out differently")
        for s, r in zip(segs, ref_segs):
            a.union(s.space, r.space, node.name)
    out_axis = (out_rank or ref_from_end) - ref_from_end
    a.chan[y] = (out_axis, ref_segs)
    for x in node.input:
        if x in a.chan or not x:
            continue
        if x in a.tensors:
            _bias(a, node, x, y)
        else:
            shape = a.shapes.get(x)
            b_axis = None if shape is None else out_axis - ((out_rank or 0) - len(shape))
            if shape is None or (b_axis is not None and b_axis >= 0 and shape[b_axis] != 1):
                return _unsupported(a, node, f"input '{x}' has no channel layout but spans the channel axis")


@rule("Flatten", "Reshape")
def _rule_reshape(a, node):
    x, y = node.input[0], node.output[0]
    axis, segs = a.chan[x]
    dims_in = a.shapes.get(x)
    target = _const(a, node.input[1]) if node.op_type == "Reshape" else None
    if node.op_type == "Flatten":
        f = _attr(node, "axis", 1)
        f = f + len(dims_in) if dims_in is not None and f < 0 else f
        dims_out = None if dims_in is None else [dims_in[0] if f == 1 else _prod(dims_in[:f]), _prod(dims_in[f:])]
    else:
        dims_out = _resolve_target(dims_in, target) if target is not None else a.shapes.get(y)
    if dims_in is None or dims_out is None:
        return _unsupported(a, node, "cannot tell where the channel axis goes (unknown shapes)")
    if not all(isinstance(d, int) and d > 0 for d in dims_in[axis + 1:]):
        return _unsupported(a, node, "needs static sizes after the channel axis")
    if _same_dims(dims_in[:axis + 1], dims_out[:axis + 1]):        # channel axis untouched
        a.chan[y] = (axis, segs)
        _record_target(a, node, axis, segs)
        return
    inner = prod(dims_in[axis + 1:])
    if len(dims_out) == axis + 1 and _same_dims(dims_in[:axis], dims_out[:axis]) and \
            dims_out[axis] in (None, _prod(dims_in[axis:])):
        new_segs = tuple(Seg(s.space, s.inner * inner) for s in segs)
        a.chan[y] = (axis, new_segs)
        _record_target(a, node, axis, new_segs)
        return
    if len(dims_out) == len(dims_in) + 1 and _same_dims(dims_in[:axis], dims_out[:axis]) and \
            _same_dims(dims_in[axis + 1:], dims_out[axis + 2:]) and len(segs) == 1 and segs[0].inner == 1 and \
            isinstance(dims_out[axis + 1], int) and isinstance(dims_out[axis], int) and \
            dims_out[axis] * dims_out[axis + 1] == dims_in[axis]:     # [.., H*D, ..] -> [.., H, D, ..]: heads
        a.regrain(segs[0].space, dims_out[axis + 1])
        head_segs = (Seg(segs[0].space),)
        a.chan[y] = (axis, head_segs)
        _record_target(a, node, axis, head_segs)
        return
    if _reshape_leading(a, node, axis, segs, dims_in, dims_out):
        return
    _unsupported(a, node, f"reshapes the channel axis ({dims_in} -> {dims_out})")


def _reshape_leading(a, node, axis: int, segs, dims_in, dims_out) -> bool:
    """A Reshape that keeps the channel axis and everything after it, and regroups only the axes before it
    (channel-last windows: [B, H, W, C] -> [B, H/w, w, W/w, w, C] or [B*H*W, C]): each channel's values stay
    where they were relative to the channel axis, which moves to its place counted from the end."""
    tail = len(dims_in) - axis
    if len(dims_out) < tail or not _same_dims(dims_in[axis:], dims_out[len(dims_out) - tail:]):
        return False
    out_axis = len(dims_out) - tail
    a.chan[node.output[0]] = (out_axis, segs)
    _record_target(a, node, out_axis, segs)
    return True


def _record_target(a, node, axis: int, segs) -> None:
    """The element of a Reshape target that spells out the channel axis' size, to be rewritten with the width.

    The target is a constant, or (legacy torch exports of x.view(b, t, h, d)) a Concat of pieces of which
    the one holding that element is a constant.
    """
    if node.op_type != "Reshape":
        return
    name, index = node.input[1], axis
    producer = {o: n for n in a.model.graph.node for o in n.output}
    while name not in a.tensors and name in producer and producer[name].op_type == "Concat":
        offset = 0
        for piece in producer[name].input:
            shape = a.shapes.get(piece) or (list(a.tensors.shape(piece)) if piece in a.tensors else None)
            length = shape[0] if shape and len(shape) == 1 and isinstance(shape[0], int) else (1 if shape == [] else None)
            if length is None:
                return
            if offset <= index < offset + length:
                name, index = piece, index - offset
                break
            offset += length
        else:
            return
        while name in producer and producer[name].op_type in ("Unsqueeze", "Identity", "Cast") and \
                name not in a.tensors:
            name = producer[name].input[0]
    if name in a.tensors:
        value = np.asarray(a.tensors.array(name)).reshape(-1)
        if index < len(value) and value[index] > 0:
            a.shape_consts.append(ShapeConst(name, index, segs))


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


@rule("Pad")
def _rule_pad(a, node):
    """Padding of other axes (a channel-last window partition pads H and W) passes the channels on; padding the
    channel axis itself, or pads the analysis cannot read, is not supported."""
    x = node.input[0]
    axis, segs = a.chan[x]
    rank = _rank(a, x)
    pads = _const(a, node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "pads")
    axes = _const(a, node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if len(node.input) > 3 and node.input[3] and axes is None or rank is None:
        return _unsupported(a, node, "pads of unknown axes")
    tries = [pads]
    if pads is None:       # computed from x's shape (the legacy exporter's padding to whole windows)
        compute = _shape_function(a, node.input[1], x) if len(node.input) > 1 else None
        if compute is None:
            return _unsupported(a, node, "pads that are neither constants nor computed from the input's shape")
        shape = list(a.shapes[x])
        tries = [compute(shape[:axis] + [width] + shape[axis + 1:]) for width in (a.size(segs), 2 * a.size(segs) + 1)]
    axes = [int(v) % rank for v in (axes if axes is not None else range(rank))]
    for pads in tries:
        pads = np.asarray(pads).reshape(-1)
        if axis in axes and (pads[axes.index(axis)] or pads[len(axes) + axes.index(axis)]):
            return _unsupported(a, node, "pads the channel axis")
    a.chan[node.output[0]] = (axis, segs)


@rule("Transpose")
def _rule_transpose(a, node):
    axis, segs = a.chan[node.input[0]]
    rank = _rank(a, node.input[0])
    perm = _attr(node, "perm") or list(reversed(range(rank)))
    a.chan[node.output[0]] = (list(perm).index(axis), segs)


@rule("Squeeze", "Unsqueeze")
def _rule_squeeze(a, node):
    axis, segs = a.chan[node.input[0]]
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1:
        axes = _const(a, node.input[1])
    in_rank, out_rank = _rank(a, node.input[0]), _rank(a, node.output[0])
    if axes is None or in_rank is None or out_rank is None:
        return _unsupported(a, node, "axes or ranks unknown")
    if node.op_type == "Squeeze":
        axes = [int(x) % in_rank for x in axes]
        if axis in axes:
            return _unsupported(a, node, "squeezes the channel axis")
        new = axis - sum(x < axis for x in axes)
    else:
        axes = {int(x) % out_rank for x in axes}
        new = [p for p in range(out_rank) if p not in axes][axis]
    a.chan[node.output[0]] = (new, segs)


@rule("Concat")
def _rule_concat(a, node):
    rank = _rank(a, node.output[0])
    cat = _attr(node, "axis") % rank if rank else _attr(node, "axis")
    laid = [a.chan.get(x) for x in node.input]
    axes = {c[0] for c in laid if c}
    if len(axes) != 1:
        return _unsupported(a, node, "inputs carry channels on different axes")
    axis = axes.pop()
    if cat != axis:      # stacking along another axis: channels must coincide
        return _rule_binary(a, node)
    segs = []
    for x, c in zip(node.input, laid):
        if c is None:      # a part without channel layout keeps its width: its own frozen space
            size = (a.shapes.get(x) or [None] * (axis + 1))[axis]
            if not isinstance(size, int):
                return _unsupported(a, node, f"input '{x}' has an unknown size on the concat axis")
            own = (Seg(a.new_space(size, x)),)
            a.freeze(own, f"part of Concat '{node.name}' without a channel layout")
            segs.extend(own)
        else:
            segs.extend(c[1])
    a.chan[node.output[0]] = (axis, tuple(segs))


@rule("LayerNormalization")
def _rule_layernorm(a, node):
    x = node.input[0]
    axis, segs = a.chan[x]
    rank = _rank(a, x) or axis + 1
    first = _attr(node, "axis", -1) % rank
    if axis >= first:
        for i, t in enumerate(node.input[1:3], start=1):
            if t and t in a.tensors:
                a.touches.append(Touch(t, axis - (rank - len(a.tensors.shape(t))), segs,
                                       "norm" if i == 1 else "param", node.name))
        a.mixing[node.name] = f"LayerNormalization '{node.name}' normalizes over the members' channels together"
    a.chan[node.output[0]] = (axis, segs)


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceProd", "ReduceSumSquare")
def _rule_reduce(a, node):
    x = node.input[0]
    axis, segs = a.chan[x]
    rank = _rank(a, x)
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = _const(a, node.input[1])
    if rank is None or axes is None:
        return _unsupported(a, node, "reduction with unknown axes")
    axes = {int(v) % rank for v in np.asarray(axes).reshape(-1)}
    keep = _attr(node, "keepdims", 1)
    if axis in axes:      # e.g. the mean of a LayerNorm decomposition: the result has no channel axis
        a.mixing[node.name] = f"{node.op_type} '{node.name}' reduces over the members' channels together"
        return
    a.chan[node.output[0]] = (axis if keep else axis - sum(v < axis for v in axes), segs)


@rule("Gather")
def _rule_gather(a, node):
    x, idx = node.input
    axis, segs = a.chan[x]
    rank = _rank(a, x)
    g = _attr(node, "axis", 0) % rank if rank else None
    idx_rank = _rank(a, idx) if idx not in a.tensors else len(a.tensors.shape(idx))
    if g is None or g == axis or idx_rank is None:
        return _unsupported(a, node, "gathers along the channel axis")
    a.chan[node.output[0]] = (axis if g > axis else axis + idx_rank - 1, segs)


def _cut(a, x, axis: int, positions: list[int]) -> tuple[Seg, ...] | None:
    """Refine x's channel groups so that each index position in `positions` falls between channels."""
    for pos in positions:
        offset = 0
        for seg in a.chan[x][1]:
            size = a.width(seg.space) * seg.inner
            if offset < pos < offset + size:
                if (pos - offset) % seg.inner:
                    return None
                a.refine(seg.space, [(pos - offset) // seg.inner])
                break
            offset += size
    return a.chan[x][1]


def _segs_between(a, segs, start: int, end: int) -> tuple[Seg, ...]:
    out, offset = [], 0
    for seg in segs:
        size = a.width(seg.space) * seg.inner
        if start <= offset and offset + size <= end:
            out.append(seg)
        offset += size
    return tuple(out)


@rule("Split")
def _rule_split(a, node):
    x = node.input[0]
    axis, segs = a.chan[x]
    rank = _rank(a, x)
    split_axis = _attr(node, "axis", 0) % rank if rank else None
    if split_axis != axis:
        for y in node.output:
            a.chan[y] = (axis, segs)
        return
    sizes = _const(a, node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "split")
    even = sizes is None                  # opset 18's num_outputs (torch.chunk): equal parts
    if even:
        size, count = a.size(segs), len(node.output)
        if size % count:
            return _unsupported(a, node, f"splits {size} channels into {count} unequal parts (num_outputs)")
        sizes = [size // count] * count
    sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
    bounds = np.cumsum([0, *sizes]).tolist()
    segs = _cut(a, x, axis, bounds[1:-1])
    if segs is None:
        return _unsupported(a, node, "splits inside a flattened channel")
    for i, y in enumerate(node.output):
        part = _segs_between(a, segs, bounds[i], bounds[i + 1])
        a.chan[y] = (axis, part)
        if even:
            a.equal_parts.append(EqualPart(node.name or node.output[0], part))
        elif len(node.input) > 1 and node.input[1]:
            a.shape_consts.append(ShapeConst(node.input[1], i, part))
        else:
            a.attr_consts.append(AttrConst(_node_index(a, node), "split", part, i))


@rule("Slice")
def _rule_slice(a, node):
    x = node.input[0]
    axis, segs = a.chan[x]
    rank = _rank(a, x)
    starts, ends = _const(a, node.input[1]), _const(a, node.input[2])
    axes = _const(a, node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = _const(a, node.input[4]) if len(node.input) > 4 and node.input[4] else None
    size = a.size(segs)
    derived = {}
    for which, value in (("starts", starts), ("ends", ends)):
        if value is None and rank is not None:
            derived[which] = _shape_function(a, node.input[1 if which == "starts" else 2], x)
    if derived:
        if not all(derived.values()):
            return _unsupported(a, node, "slice bounds are neither constants nor computed from the sliced "
                                         "tensor's shape")
        shape = list(a.shapes[x])
        shape[axis] = size
        starts = derived["starts"](shape) if "starts" in derived else starts
        ends = derived["ends"](shape) if "ends" in derived else ends
        if len(starts) != len(ends) or (axes is not None and len(axes) != len(starts)):
            return _unsupported(a, node, "slice bounds of different lengths")
    if starts is None or ends is None or rank is None:
        return _unsupported(a, node, "slice bounds are not constants")
    axes = [int(v) % rank for v in (axes if axes is not None else range(len(starts)))]
    if axis not in axes:
        a.chan[node.output[0]] = (axis, segs)
        return
    i = axes.index(axis)
    start, end = int(starts[i]), min(int(ends[i]), size)
    if start < 0 or end < 0 or (steps is not None and int(steps[i]) != 1):
        return _unsupported(a, node, "slices channels with negative bounds or a step")
    segs = _cut(a, x, axis, [start, end])
    if segs is None:
        return _unsupported(a, node, "slices inside a flattened channel")
    a.chan[node.output[0]] = (axis, _segs_between(a, segs, start, end))
    label = node.name or node.output[0]
    if "starts" in derived:
        a.derived_bounds.append(DerivedBound(label, lambda sh: int(derived["starts"](sh)[i]),
                                             _segs_between(a, segs, 0, start), segs, shape, axis))
    elif start > 0:
        a.shape_consts.append(ShapeConst(node.input[1], i, _segs_between(a, segs, 0, start)))
    if "ends" in derived:
        a.derived_bounds.append(DerivedBound(label, lambda sh: int(derived["ends"](sh)[i]),
                                             _segs_between(a, segs, 0, end), segs, shape, axis))
    elif int(ends[i]) <= size:
        a.shape_consts.append(ShapeConst(node.input[2], i, _segs_between(a, segs, 0, end)))


SHAPE_ARITHMETIC = {"Gather", "Add", "Sub", "Mul", "Div", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity",
                    "Slice", "Floor", "Ceil", "Max", "Min", "Reshape", "Neg"}


def _shape_function(a: Analysis, value: str, x: str):
    """If `value` is computed from constants and Shape(x) alone (how the legacy exporter writes torch.chunk's
    bounds), a function of x's shape that recomputes it with onnx's reference evaluator; else None. The
    unknown (symbolic) dims of x must not matter: the result is checked to be the same for two guesses."""
    from onnx.reference import ReferenceEvaluator
    producer = {out: (i, node) for i, node in enumerate(a.model.graph.node) for out in node.output}
    needed, todo = {}, [value]
    while todo:
        v = todo.pop()
        if not v or v in needed or v in a.tensors:
            continue
        if v not in producer:
            return None
        i, node = producer[v]
        if node.op_type == "Shape":
            if node.input[0] != x or node.attribute:
                return None
        elif node.op_type not in SHAPE_ARITHMETIC or node.domain not in ("", "ai.onnx"):
            return None
        else:
            todo.extend(node.input)
        for out in node.output:
            needed[out] = (i, node)
    nodes = []
    for _, node in sorted({id(n): (i, n) for i, n in needed.values()}.values(), key=lambda t: t[0]):
        if node.op_type == "Shape":
            node = helper.make_node("Identity", ["onnxfuse_shape"], list(node.output))
        nodes.append(node)
    leaves = {v for n in nodes for v in n.input if v and v in a.tensors and v not in needed}
    inits = [onnx.numpy_helper.from_array(np.asarray(a.tensors.array(v)), v) for v in sorted(leaves)]
    shape_input = helper.make_tensor_value_info("onnxfuse_shape", onnx.TensorProto.INT64, [None])
    result = helper.make_tensor_value_info(value, onnx.TensorProto.UNDEFINED, None)
    graph = helper.make_graph(nodes, "bound", [shape_input], [result], inits)
    model = helper.make_model(graph, opset_imports=list(a.model.opset_import), ir_version=a.model.ir_version)
    try:
        evaluator = ReferenceEvaluator(model)
    except Exception:
        return None

    def compute(shape, guess=1):
        dims = [d if isinstance(d, int) else guess for d in shape]
        return np.asarray(evaluator.run(None, {"onnxfuse_shape": np.array(dims, dtype=np.int64)})[0]).reshape(-1)

    try:
        first = a.shapes.get(x)
        if first is None or not np.array_equal(compute(first, 1), compute(first, 7)):
            return None
    except Exception:
        return None
    return compute


@rule(*CHANNEL_REDUCERS)
def _rule_reducer(a, node):
    axis, segs = a.chan[node.input[0]]
    rank = _rank(a, node.input[0]) or axis + 1
    op_axis = _attr(node, "axis", -1 if node.op_type in ("Softmax", "LogSoftmax", "Hardmax", "TopK") else 0)
    if op_axis % rank == axis:
        a.freeze(segs, f"{node.op_type} over channels at node '{node.name}'")
        if node.op_type in ("Softmax", "LogSoftmax", "Hardmax"):
            a.chan[node.output[0]] = (axis, segs)
        return
    if node.op_type in ("Softmax", "LogSoftmax", "Hardmax"):
        a.chan[node.output[0]] = (axis, segs)
    else:
        _unsupported(a, node, "reduces an axis next to the channel axis")


@rule(*SHAPE_READERS)
def _rule_shape(a, node):
    """Reading a shape is allowed: the result carries no channels."""


def _rule_ml(a, node):
    """ai.onnx.ml ops (ZipMap, LabelEncoder, ...) after a classifier: their inputs keep their width."""
    for x in node.input:
        if x in a.chan:
            a.freeze(a.chan[x][1], f"{node.op_type} (ai.onnx.ml) at node '{node.name}'")


def is_linear(node) -> bool:
    """Ops that commute with averaging over members (used to tell whether a wide model is exact)."""
    return node.op_type in LINEAR_UNARY | LINEAR_POOLS | {"Flatten", "Reshape", "Transpose", "Squeeze",
                                                          "Unsqueeze", "Add", "Sub", "Concat", "Shape", "Size", "Pad",
                                                          "ReduceMean", "ReduceSum"}


SIZE_INPUTS = {"Slice": {1, 2, 3, 4}, "Reshape": {1}, "Split": {1}, "Expand": {1}, "Tile": {1}}


def _shape_state(node, ins: list) -> tuple[str, str | None] | None:
    """Exactness of a node that reads the shape of a widened value, or computes with such a shape: the
    result is 'shape' (sizes, checked where they meet the channels), or None when the shape values only
    give a data op its sizes (then the op is judged on its data inputs)."""
    if node.op_type in SHAPE_READERS or node.op_type in SHAPE_ARITHMETIC and all(
            s[0] in ("shape", "same") for s in ins):
        return ("shape", None)
    if all(s[0] != "shape" or i in SIZE_INPUTS.get(node.op_type, ()) for i, s in enumerate(ins)):
        return None
    return ("derived", f"{node.op_type} at node '{node.name}' computes with the shape of a widened value")


def output_exactness(a: Analysis, differing: set[str]) -> dict[str, str | None]:
    """For each graph output: None if the wide model's output is exactly the mean of the members' outputs
    (or identical to them), else the reason why not.

    A value is 'wide' (widened channels: the members side by side), 'mean' (the members' mean), 'same'
    (identical in every member) or derived (a function of averaged values that is not their mean).
    """
    state: dict[str, tuple[str, str | None]] = {}
    for node in a.model.graph.node:
        if node.op_type == "Constant":
            continue
        ins = [state.get(x, ("same", None)) for x in node.input if x]
        if any(s[0] == "shape" for s in ins) or (node.op_type in SHAPE_READERS and ins[0][0] != "same"):
            result = _shape_state(node, [state.get(x, ("same", None)) for x in node.input])
            if result is not None:
                for y in node.output:
                    state[y] = result
                continue
            ins = [("same", None) if s[0] == "shape" else s for s in ins]
        derived = next((s for s in ins if s[0] == "derived"), None)
        out_wide = node.output[0] in a.chan and all(a.is_widened(s.space) for s in a.chan[node.output[0]][1])
        in_wide = node.input[0] in a.chan and all(a.is_widened(s.space) for s in a.chan[node.input[0]][1])
        averaged = [x for x in node.input if x in differing]
        if derived:
            result = derived
        elif node.name in a.mixing and any(s[0] == "wide" for s in ins):
            result = ("derived", a.mixing[node.name])
        elif out_wide:
            result = ("wide", None)
        elif node.op_type in LINEAR_LAYERS and in_wide:
            result = ("mean", None)
        elif any(s[0] in ("mean", "wide") for s in ins) or averaged:
            linear = is_linear(node) and (not averaged or node.op_type in ("Add", "Sub"))
            why = (f"{node.op_type} at node '{node.name}' is applied to averaged values" if not averaged else
                   f"tensor '{averaged[0]}' of node '{node.name}' differs between members and is averaged")
            result = ("mean", None) if linear else ("derived", why)
        else:
            result = ("same", None)
        for y in node.output:
            state[y] = result
    return {o.name: (None if state.get(o.name, ("same", None))[0] in ("mean", "same", "shape")
                     else state[o.name][1]) for o in a.model.graph.output}
