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
from .model_io import FLOAT_TYPES, TensorTable, light_model
from .sessions import session


@dataclass(frozen=True)
class Seg:
    """A run of one axis that belongs to one space: channel c covers indices c*inner .. c*inner+inner-1."""
    space: int
    inner: int = 1


@dataclass
class Touch:
    """An axis of a constant tensor that is indexed by channels: role out (producer rows), in (consumer
    columns), norm (normalization scale: scored) or param (bias, BN statistics: not scored); fixed (no
    segments) marks a weight axis that consumes a fixed-width input, so that a tensor shared with a fused layer
    is refused rather than widened under it."""
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
    use: tuple[int, int] | None = None      # (node index, input position) where the graph reads it
    private: bool = False                   # shared with other uses: the rewrite goes into a copy for `use`


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
    producer: dict = field(default_factory=dict)            # value -> the node that computes it
    batch_merged: set[str] = field(default_factory=set)     # values whose channels are merged into axis 0
    stacked: dict = field(default_factory=dict)   # value -> (stack axis, [segs of part i]): fused q/k/v

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
        for value, (axis, parts) in self.stacked.items():
            self.stacked[value] = (axis, [fn(p) for p in parts])
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
                if old is None or touch.role != "param" and old.role != "out":     # tied: kept at scale 1
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
    return _value_shapes(inferred, model)


def _value_shapes(inferred: onnx.ModelProto, model: onnx.ModelProto) -> dict[str, list]:
    """value -> dims (ints, or None/str for unknown/symbolic) of a shape-inferred copy; initializers' own dims."""
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

def symbolic_shapes(model: onnx.ModelProto) -> dict[str, list] | None:
    """Shapes from onnxruntime's symbolic shape inference, which follows computed shapes (Expand, Where,
    Reshape of a Concat of Shape pieces) where onnx's own inference gives up or invents new symbols."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        inferred = SymbolicShapeInference.infer_shapes(light_model(model), auto_merge=True)
    except Exception:
        return None
    if inferred is None:
        return None
    return _value_shapes(inferred, model)


def analyze(model: onnx.ModelProto, tensors: TensorTable | None = None, source: str = "model") -> Analysis:
    """Find the channel groups of a graph. Ops must be in topological order (an ONNX requirement). Where onnx's
    shape inference leaves problems (computed shapes), the graph is analysed again with onnxruntime's
    symbolic shape inference, and the analysis with fewer problems is kept."""
    tensors = tensors or TensorTable(model.graph)
    a = _analyze(model, tensors, infer_shapes(model))
    if a.problems:          # first on the (small) subgraph that computes the problems' channel-free inputs
        shapes = _run_shapes(_problem_subgraph(a))
        if shapes is not None:
            b = _analyze(model, tensors, _merge_shapes(a.shapes, shapes))
            if not b.problems:
                return b
    if a.problems:
        shapes = symbolic_shapes(model)
        if shapes is not None:
            b = _analyze(model, tensors, _merge_shapes(a.shapes, shapes))
            if len(b.problems) < len(a.problems):
                return b
    return a


class _Aliased:
    """The constants of a graph plus values that are only an Identity or Transpose of one (the legacy exporter's
    Identity(initializer) of a shared weight, the new exporter's Transpose(initializer)): rules see them as
    constants; touches of them are moved onto the source tensor afterwards (_resolve_aliases)."""

    def __init__(self, table: TensorTable, graph):
        self.table, self.alias = table, {}
        for node in graph.node:
            x = node.input[0] if node.input else None
            if node.op_type in ("Identity", "Transpose") and x and (x in table or x in self.alias):
                src, perm = self.alias.get(x, (x, list(range(len(table.shape(x))))))
                step = _attr(node, "perm") or list(reversed(range(len(perm)))) if node.op_type == "Transpose" \
                    else list(range(len(perm)))
                self.alias[node.output[0]] = (src, [perm[i] for i in step])

    def __contains__(self, name) -> bool:
        return name in self.alias or name in self.table

    def shape(self, name):
        if name in self.alias:
            src, perm = self.alias[name]
            return tuple(self.table.shape(src)[i] for i in perm)
        return self.table.shape(name)

    def array(self, name):
        if name in self.alias:
            src, perm = self.alias[name]
            return np.transpose(self.table.array(src), perm)
        return self.table.array(name)

    def dtype(self, name):
        return self.table.dtype(self.alias[name][0] if name in self.alias else name)

    def __getattr__(self, attr):
        return getattr(self.table, attr)


def _resolve_aliases(a: Analysis, aliased: _Aliased) -> None:
    """Touches of an alias become touches of its source tensor (on the source's axis); then every tensor axis
    touched several times (a weight shared by layers, ALBERT's shared layers, a tied embedding) unifies the
    groups of its touches, so the one tensor is cut the same way for every use."""
    for t in a.touches:
        if t.tensor in aliased.alias:
            src, perm = aliased.alias[t.tensor]
            t.tensor, t.axis = src, perm[t.axis]
    for c in a.shape_consts:            # 1-D: an alias has the same elements
        if c.tensor in aliased.alias:
            c.tensor = aliased.alias[c.tensor][0]
    by_axis: dict[tuple, list[Touch]] = {}
    for t in a.touches:
        by_axis.setdefault((t.tensor, t.axis), []).append(t)
    for (tensor, axis), touches in by_axis.items():
        fixed = [t for t in touches if t.role == "fixed"]
        touches = [t for t in touches if t.role != "fixed"]
        if fixed and touches:
            label = (f"tensor '{tensor}' is shared by a layer whose input channels are fused ('{touches[0].node}') "
                     f"and one whose input is fixed-width ('{fixed[0].node}')")
            a.problems.append(label)
            for t in touches:
                a.block(t.segs, label)
            continue
        if not touches:
            continue
        first = touches[0]
        for other in touches[1:]:
            if len(other.segs) != len(first.segs) or any(s.inner != f.inner for s, f in zip(other.segs, first.segs)):
                _unsupported(a, helper.make_node("Identity", [], [], name=other.node),
                             f"tensor '{tensor}' is used with different channel layouts")
                continue
            try:
                for s, f in zip(other.segs, first.segs):
                    a.union(s.space, f.space, other.node)
            except UnsupportedGraphError as exc:
                a.problems.append(f"node '{other.node}': {exc}")
        roles = {t.role for t in touches}
        if {"out", "in"} <= roles:         # a tied embedding / output layer: one tensor cannot be both
            for t in touches:
                if t.role == "in":
                    a.mixing[t.node] = (f"weight '{tensor}' is tied to an embedding: the wide model sums the "
                                        f"members' outputs of node '{t.node}' instead of averaging them")


def _merge_shapes(shapes: dict, better: dict) -> dict:
    merged = dict(shapes)
    for k, v in better.items():       # static sizes from either inference win over symbols
        old = merged.get(k)
        merged[k] = v if old is None or len(old) != len(v) else \
            [o if isinstance(o, int) and not isinstance(d, int) else d for o, d in zip(old, v)]
    return merged


def _problem_subgraph(a: Analysis) -> onnx.ModelProto:
    """The nodes that compute the channel-free inputs of the nodes with problems (attention masks, position
    biases: small), as a model whose outputs are those inputs."""
    names = {p.split("'")[1] for p in a.problems if p.startswith("node '")}
    wanted = [x for n in a.model.graph.node if n.name in names for x in n.input if x and x not in a.chan
              and x not in a.tensors]
    needed, todo = set(), list(wanted)
    while todo:
        v = todo.pop()
        node = a.producer.get(v)
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        todo.extend(x for x in node.input if x)
    nodes = [n for n in a.model.graph.node if id(n) in needed]
    used = {x for n in nodes for x in n.input}
    types = {v.name: v.type.tensor_type.elem_type for v in shape_inference.infer_shapes(
        light_model(a.model)).graph.value_info} if wanted else {}
    graph = helper.make_graph(nodes, "masks", [i for i in a.model.graph.input if i.name in used],
                              [helper.make_tensor_value_info(v, types.get(v, onnx.TensorProto.UNDEFINED), None)
                               for v in dict.fromkeys(wanted)],
                              [t for t in a.model.graph.initializer if t.name in used])
    return helper.make_model(graph, opset_imports=list(a.model.opset_import), ir_version=a.model.ir_version)


def _run_shapes(sub: onnx.ModelProto) -> dict[str, list] | None:
    """Output shapes of a small channel-free subgraph (masks) from two onnxruntime runs with different sizes for
    the symbolic input dims: a dim equal in both runs is static, one that follows an input symbol is it."""
    if not sub.graph.node or not sub.graph.output:
        return None
    try:
        sess = session(sub, log_level=4)          # a subgraph it cannot run is a fallback, not an error to show
        symbols = sorted({d.dim_param or "?" for i in sub.graph.input for d in i.type.tensor_type.shape.dim
                          if not d.HasField("dim_value")})
        runs = []
        for base, step in ((3, 2), (7, 3)):
            guess = {sym: base + step * k for k, sym in enumerate(symbols)}
            feeds = {}
            for i in sub.graph.input:
                tt = i.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else guess[d.dim_param or "?"] for d in tt.shape.dim]
                feeds[i.name] = np.ones(dims, helper.tensor_dtype_to_np_dtype(tt.elem_type))
            runs.append((guess, [np.shape(v) for v in sess.run(None, feeds)]))
    except Exception:
        return None
    shapes = {}
    for k, out in enumerate(sub.graph.output):
        (g1, s1), (g2, s2) = runs[0], (runs[1][0], runs[1][1])
        dims = []
        for d1, d2 in zip(s1[k], s2[k]):
            match = [sym for sym in symbols if g1[sym] == d1 and g2[sym] == d2]
            dims.append(d1 if d1 == d2 else (match[0] if match else None))
        shapes[out.name] = dims
    return shapes


def _analyze(model: onnx.ModelProto, tensors: TensorTable, shapes: dict) -> Analysis:
    aliased = _Aliased(tensors, model.graph)
    a = Analysis(model, aliased if aliased.alias else tensors, shapes)
    a.producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        if any(x in a.batch_merged for x in node.input) and not _batch_merged_ok(a, node):
            continue
        if any(x in a.stacked for x in node.input):
            _rule_stacked(a, node)
            continue
        touching = [x for x in node.input if x in a.chan]
        fn = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else _rule_ml if node.domain == "ai.onnx.ml" else None
        if not touching and node.op_type not in LINEAR_LAYERS and not _is_lookup(a, node):
            continue          # the op never sees a channel axis: nothing to do
        if fn is None:
            _unsupported(a, node, f"op {node.op_type}{' (domain ' + node.domain + ')' if node.domain else ''} "
                                  f"has no channel rule")
            continue
        fn(a, node)
    for out in model.graph.output:
        if out.name in a.chan:
            a.freeze(a.chan[out.name][1], f"reaches graph output '{out.name}'")
    _resolve_aliases(a, aliased)
    _check_shape_consts(a)
    a.tensors = tensors
    return a


def _check_shape_consts(a: Analysis) -> None:
    """A shape constant that is rewritten with a width must not be used for anything else (exporters share one
    constant such as [2] between a head count and an unrelated size)."""
    uses: dict[str, int] = {}
    for node in a.model.graph.node:
        for x in node.input:
            uses[x] = uses.get(x, 0) + 1
    for tensor in dict.fromkeys(c.tensor for c in a.shape_consts):
        count = len({(c.index, tuple(c.segs)) for c in a.shape_consts if c.tensor == tensor}) and \
            sum(1 for c in a.shape_consts if c.tensor == tensor)
        mine = [c for c in a.shape_consts if c.tensor == tensor]
        if uses.get(tensor, 0) > len({c.use for c in mine}) and all(c.use is not None for c in mine) and \
                tensor not in getattr(a.tensors, "alias", {}):
            for c in mine:          # each rewritten use reads its own copy (transplant.private_shape_const)
                c.private = True
        elif uses.get(tensor, 0) > count:
            a.problems.append(f"shape constant '{tensor}' holds a width to rewrite but is also used elsewhere "
                              f"({uses[tensor]} uses)")


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
    else:               # a graph input or fixed-width value: if `w` is shared, its other uses must not widen this axis
        a.touches.append(Touch(w, in_axis, (), "fixed", node.name))
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
        dims_out = _resolve_target(dims_in, target) if target is not None else \
            (_traced_target(a, node, dims_in) or a.shapes.get(y))
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


def _shape_elements(a, name: str, depth: int = 0):
    """The elements of a 1-D int64 value computed from constants and Shape ops (how exporters write a Reshape
    target): each an int, a dimension `("dim", value, index)` of a value, or None (unknown); None if the
    length is unknown."""
    if name in a.tensors:
        return [int(v) for v in np.asarray(a.tensors.array(name)).reshape(-1)]
    producer = a.producer.get(name)
    if producer is None or depth > 12:
        return None
    op, ins = producer.op_type, producer.input
    if op == "Shape":
        rank = _rank(a, ins[0])
        if rank is None:
            return None
        start, end = _attr(producer, "start", 0), _attr(producer, "end", rank)
        return [("dim", ins[0], j) for j in range(rank)[start:end]]
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze") or (op == "Reshape" and _rank(a, ins[0]) == 1):
        return _shape_elements(a, ins[0], depth + 1)
    if op == "Where" and ins[0] in a.producer and a.producer[ins[0]].op_type == "Equal" and \
            ins[2] in a.producer[ins[0]].input:    # the legacy exporter's expand(-1): Where(Equal(s, -1), 1, s)
        source = _shape_elements(a, ins[2], depth + 1)
        return None if source is None else [1 if e == -1 else e for e in source]
    if op == "Concat":
        parts = [_shape_elements(a, x, depth + 1) for x in ins]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if op in ("Gather", "Slice"):
        source = _shape_elements(a, ins[0], depth + 1)
        if source is not None and op == "Gather" and ins[1] in a.tensors:
            return [source[int(i)] for i in np.asarray(a.tensors.array(ins[1])).reshape(-1)]
        consts = [_const(a, x) for x in ins[1:]]
        if source is not None and op == "Slice" and all(c is not None for c in consts[:2]) and \
                all(c is None or int(np.asarray(c).reshape(-1)[0]) in (0, 1) for c in consts[2:4]):
            return source[int(consts[0][0]):int(consts[1][0])]
    shape = a.shapes.get(name)
    if shape and len(shape) == 1 and isinstance(shape[0], int):
        return _evaluated_elements(a, name, shape[0]) or [None] * shape[0]
    return None


def _evaluated_elements(a, name: str, length: int):
    """Elements of a shape value computed by any ops (e.g. the legacy exporter's expand(-1): Where(Equal(shape,
    -1), 1, shape)) from Shape ops and constants alone: evaluated with onnx's reference evaluator for two
    guesses of the symbolic dims; an element that is the same for both is a constant, the others None."""
    from onnx.reference import ReferenceEvaluator
    nodes, leaves, todo, seen = [], {}, [name], set()
    while todo:
        v = todo.pop()
        if not v or v in seen or v in a.tensors:
            continue
        seen.add(v)
        node = a.producer.get(v)
        if node is None or node.domain not in ("", "ai.onnx") or any(x in a.chan for x in node.input
                                                                         if node.op_type != "Shape"):
            return None
        if node.op_type == "Shape":
            dims = a.shapes.get(node.input[0])
            if dims is None or any(d is None for d in dims):
                return None
            start, end = _attr(node, "start", 0), _attr(node, "end", len(dims))
            leaves[v] = dims[start:end]
        else:
            nodes.append(node)
            todo.extend(node.input)
        if len(nodes) > 200:
            return None
    order = {id(n): i for i, n in enumerate(a.model.graph.node)}
    nodes.sort(key=lambda n: order[id(n)])
    consts = {x for n in nodes for x in n.input if x and x in a.tensors and x not in leaves}
    symbols = sorted({d for dims in leaves.values() for d in dims if not isinstance(d, int)})
    results = []
    try:
        graph = helper.make_graph(nodes, "shape", [helper.make_tensor_value_info(v, onnx.TensorProto.INT64, [len(d)])
                                                   for v, d in leaves.items()],
                                  [helper.make_tensor_value_info(name, onnx.TensorProto.INT64, [length])],
                                  [onnx.numpy_helper.from_array(np.asarray(a.tensors.array(c)), c) for c in consts])
        model = helper.make_model(graph, opset_imports=list(a.model.opset_import), ir_version=a.model.ir_version)
        evaluator = ReferenceEvaluator(model)
        for guess in (3, 7):
            values = {sym: guess + 2 * i for i, sym in enumerate(symbols)}
            feeds = {v: np.array([values.get(d, d) for d in dims], np.int64) for v, dims in leaves.items()}
            results.append(np.asarray(evaluator.run(None, feeds)[0]).reshape(-1).tolist())
    except Exception:
        return None
    if len(results[0]) != length:
        return None
    return [int(p) if p == q else None for p, q in zip(*results)]


def _dim_value(a, element, x):
    """An element of a traced shape as a dimension: an int, a shape symbol, or None. The channel axis of a
    value read by Shape counts as x's own channel axis only when it is the same channel layout (it then
    follows the kept width by itself)."""
    if element is None or isinstance(element, int):
        return element
    _, value, j = element
    if value in a.chan and a.chan[value][0] == j:
        same = x in a.chan and [a.find(s.space) for s in a.chan[value][1]] == [a.find(s.space) for s in
                                                                            a.chan[x][1]]
        return a.size(a.chan[value][1]) if same else None
    dims = a.shapes.get(value)
    return dims[j] if dims and j < len(dims) else None


def _traced_target(a, node, dims_in):
    """A computed Reshape target as output dims (ints, symbols of the input's dims, or None), with 0 and -1
    resolved; None if it cannot be traced."""
    elements = _shape_elements(a, node.input[1])
    if elements is None or dims_in is None:
        return None
    out = [_dim_value(a, e, node.input[0]) for e in elements]
    out = [dims_in[i] if d == 0 and not _attr(node, "allowzero", 0) and i < len(dims_in) else d
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
    position = {id(n): i for i, n in enumerate(a.model.graph.node)}
    use = (position[id(node)], 1) if id(node) in position else None
    while name not in a.tensors and name in producer and producer[name].op_type == "Concat":
        offset = 0
        for j, piece in enumerate(producer[name].input):
            shape = a.shapes.get(piece) or (list(a.tensors.shape(piece)) if piece in a.tensors else None)
            length = shape[0] if shape and len(shape) == 1 and isinstance(shape[0], int) else (1 if shape == [] else None)
            if length is None:
                return
            if offset <= index < offset + length:
                use = (position[id(producer[name])], j)
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
        if index < len(value) and value[index] > 0:
            a.shape_consts.append(ShapeConst(name, index, segs, use))


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
BATCHWISE = {"Transpose", "MatMul", "Softmax", "LogSoftmax", "Mul", "Div", "Add", "Sub", "Where", "Cast",
             "Dropout", "Identity", "Reshape", "Shape"}


def _batch_merged_ok(a, node) -> bool:
    """A value whose channels are merged into the batch axis ([B, H, T, D] -> [B*H, T, D], the new exporter's
    attention) may only meet ops that treat each batch index alone; their results stay merged."""
    chans = [x for x in node.input if x in a.chan]
    ok = node.op_type in BATCHWISE and all(x in a.batch_merged for x in chans) and \
        not (node.op_type in ("Softmax", "LogSoftmax") and
             _attr(node, "axis", -1) % (_rank(a, chans[0]) or 1) == a.chan[chans[0]][0])
    if not ok:
        _unsupported(a, node, "meets a value whose attention heads are merged into the batch axis")
        return False
    if node.op_type not in ("Reshape", "Shape"):
        RULES[node.op_type](a, node)
        a.batch_merged.update(y for y in node.output if y in a.chan)
        return False
    return True


@rule("MatMul")
def _rule_matmul_free(a, node):
    """A MatMul that sees no channels and has no 2-D constant weight (rotary embeddings: inv_freq @
    positions) opens no channel space; every other MatMul follows _rule_matmul."""
    w = node.input[1]
    if not any(x in a.chan for x in node.input) and not (w in a.tensors and len(a.tensors.shape(w)) == 2):
        return
    if all(x in a.chan for x in node.input):      # GQA: query heads meet repeated kv heads
        (ax1, s1), (ax2, s2) = a.chan[node.input[0]], a.chan[node.input[1]]
        if len(s1) == len(s2) == 1 and a.size(s1) == a.size(s2) and s1[0].inner != s2[0].inner:
            fine, coarse = sorted((s1[0], s2[0]), key=lambda g: g.inner)
            if coarse.inner % fine.inner == 0:
                a.regrain(fine.space, coarse.inner // fine.inner)   # a unit is a kv head with its query group
    return _rule_matmul(a, node)


@rule("Expand")
def _rule_expand(a, node):
    """Expand of a value with channels (GQA's repeat of k/v heads: [B, Hkv, 1, T, D] -> [B, Hkv, r, T, D]):
    the channel axis must keep its size (1 -> size is not channel-wise); new leading axes shift it."""
    x, y = node.input[0], node.output[0]
    if x not in a.chan or node.input[1] in a.chan:
        return _unsupported(a, node, "expands by a shape that carries channels")
    axis, segs = a.chan[x]
    rank_in, rank_out = _rank(a, x), _rank(a, y)
    elements = _shape_elements(a, node.input[1])
    if rank_in is None or rank_out is None or elements is None:
        return _unsupported(a, node, "expand with unknown ranks")
    out_axis = axis + rank_out - rank_in
    e = elements[out_axis - (rank_out - len(elements))] if out_axis - (rank_out - len(elements)) >= 0 else 1
    if _dim_value(a, e, x) != 1 and _dim_value(a, e, x) != a.size(segs):
        return _unsupported(a, node, "expands along the channel axis (or to a size it cannot tell)")
    if isinstance(e, int) and e != 1:        # the target spells the width: rewritten like a Reshape target
        count = len(a.shape_consts)
        target = node.input[1]
        where = a.producer.get(target)
        if where is not None and where.op_type == "Where" and target not in a.tensors:
            target = where.input[2]        # the legacy exporter's expand(-1): Where(Equal(s, -1), 1, s)
        _record_target(a, helper.make_node("Reshape", [x, target], [y]),
                       out_axis - (rank_out - len(elements)), segs)
        if len(a.shape_consts) == count:
            return _unsupported(a, node, "expand target spells the channel count in a value it cannot rewrite")
    a.chan[y] = (out_axis, segs)


@rule("GatherND")
def _rule_gather_nd(a, node):
    """GatherND that picks positions on axes before the channel axis (pooling the last token)."""
    x, idx = node.input[0], node.input[1]
    axis, segs = a.chan[x]
    b = _attr(node, "batch_dims", 0)
    idx_shape = a.shapes.get(idx)
    if idx in a.chan or idx_shape is None or not isinstance(idx_shape[-1], int):
        return _unsupported(a, node, "gathers with indices of unknown shape")
    k = idx_shape[-1]
    if b <= axis < b + k:
        return _unsupported(a, node, "gathers along the channel axis")
    a.chan[node.output[0]] = (axis if axis < b else len(idx_shape) - 1 + axis - b - k, segs)


def _rule_concat_token(a, node):
    """Concat along a non-channel axis of a constant per-channel token (ViT's class token, Expanded over the
    batch) with values that carry channels: the token is a parameter of their channels, like a bias."""
    rank = _rank(a, node.output[0])
    laid = [a.chan.get(x) for x in node.input]
    with_chan = [c for c in laid if c]
    cat = _attr(node, "axis") % rank if rank else None
    if not with_chan or cat is None or cat == with_chan[0][0] or all(laid):
        return _rule_concat(a, node)
    axis, segs = with_chan[0]
    rest = []
    for x, c in zip(node.input, laid):
        if c is not None:
            rest.append(x)
            continue
        source = x
        while source not in a.tensors and source in a.producer and \
                a.producer[source].op_type in ("Expand", "Identity", "Cast"):
            producer = a.producer[source]
            if producer.op_type == "Expand":
                elements = _shape_elements(a, producer.input[1]) or []
                e = elements[axis - (rank - len(elements))] if 0 <= axis - (rank - len(elements)) else 1
                if e not in (1, -1):            # the target spells the width: rewrite it
                    count = len(a.shape_consts)
                    _record_target(a, helper.make_node("Reshape", list(producer.input), [source]),
                                   axis - (rank - len(elements)), segs)
                    if e != a.size(segs) or len(a.shape_consts) == count:
                        return _unsupported(a, node, f"token '{x}' is expanded to a width it cannot rewrite")
            a.chan[source] = (axis, segs)        # the expanded token carries the channels too
            source = producer.input[0]
        if source not in a.tensors or len(a.tensors.shape(source)) != rank or \
                a.tensors.shape(source)[axis] != a.size(segs):
            return _rule_concat(a, node)
        a.touches.append(Touch(source, axis, segs, "param", node.name))
    _rule_binary(a, helper.make_node("Concat", rest, node.output, name=node.name, axis=cat))


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
    cut = _cut(a, x, axis, [width * i for i in range(1, parts)])
    if cut is None or len(cut) != parts:
        return False
    for seg in a.chan[x][1]:
        a.regrain(seg.space, dims_out[axis + 2])
    part_segs = [(Seg(s.space),) for s in a.chan[x][1]]
    a.stacked[y] = (axis, part_segs)
    a.chan[y] = (axis + 1, part_segs[0])
    for part in part_segs:
        a.equal_parts.append(EqualPart(node.name or y, part))
    _record_target(a, node, axis + 1, part_segs[0])
    return True


def _head_factor(a, node, index: int, heads: int):
    """Element `index` of a Reshape target computed as batch * heads (Mul of a size by a constant head count,
    through Concat/Reshape/Unsqueeze/Cast): that constant and where it is read, to rewrite it with the kept
    head count; None if the element is computed otherwise."""
    name, position = node.input[1], {id(n): i for i, n in enumerate(a.model.graph.node)}
    producer = a.producer.get(name)
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
    while piece in a.producer and a.producer[piece].op_type in ("Reshape", "Unsqueeze", "Cast", "Identity"):
        piece = a.producer[piece].input[0]
    mul = a.producer.get(piece)
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
    consumers = [n for n in a.model.graph.node if value in n.input]
    if not consumers:
        return False
    for node in consumers:
        rank = _rank(a, node.input[0])
        if node.op_type == "Gather" and rank and _attr(node, "axis", 0) % rank == axis and node.input[1] in a.tensors:
            continue
        if node.op_type == "Transpose" and rank:
            perm = list(_attr(node, "perm") or reversed(range(rank)))
            if not _parts_taken_apart(a, node.output[0], perm.index(axis)):
                return False
            continue
        if node.op_type in ("Unsqueeze", "Squeeze") and rank:
            axes = _attr(node, "axes")
            axes = _const(a, node.input[1]) if axes is None and len(node.input) > 1 else axes
            out_rank = _rank(a, node.output[0])
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


def _rule_stacked(a, node) -> None:
    """Ops on a stacked value (see _split_fused_projection): moving axes, and taking one part out of the stack
    axis (Gather of a constant index, Slice of one index, Split into ones, then Squeeze)."""
    x = next(v for v in node.input if v in a.stacked)
    stack, parts = a.stacked[x]
    axis = a.chan[x][0]
    rank = _rank(a, x)
    op = node.op_type

    def put(y, new_stack, new_axis, new_parts):
        if len(new_parts) == 1 and new_stack is None:
            a.chan[y] = (new_axis, new_parts[0])
        else:
            a.stacked[y] = (new_stack, new_parts)
            a.chan[y] = (new_axis, new_parts[0])
    if rank is None or any(v in a.chan and v != x for v in node.input):
        return _unsupported(a, node, "meets fused q/k/v channels it cannot follow")
    if op == "Transpose":
        perm = list(_attr(node, "perm") or reversed(range(rank)))
        return put(node.output[0], perm.index(stack), perm.index(axis), parts)
    if op in ("Squeeze", "Unsqueeze"):
        axes = _attr(node, "axes")
        axes = _const(a, node.input[1]) if axes is None and len(node.input) > 1 else axes
        out_rank = _rank(a, node.output[0])
        if axes is None or out_rank is None:
            return _unsupported(a, node, "axes unknown")
        if op == "Squeeze":
            axes = [int(v) % rank for v in np.asarray(axes).reshape(-1)]
            if axis in axes or (stack in axes and len(parts) != 1):
                return _unsupported(a, node, "squeezes fused q/k/v channels")
            shift = lambda p: p - sum(v < p for v in axes)
            return put(node.output[0], None if stack in axes else shift(stack), shift(axis), parts)
        axes = {int(v) % out_rank for v in np.asarray(axes).reshape(-1)}
        keep = [p for p in range(out_rank) if p not in axes]
        return put(node.output[0], keep[stack], keep[axis], parts)
    if op in ("Gather", "Slice", "Split"):
        g = _attr(node, "axis", 0) % rank
        if op == "Gather" and g == stack and node.input[1] in a.tensors and a.tensors.shape(node.input[1]) == ():
            i = int(a.tensors.array(node.input[1])) % len(parts)
            return put(node.output[0], None, axis - (axis > stack), [parts[i]])
        if op == "Slice":
            starts, ends = _const(a, node.input[1]), _const(a, node.input[2])
            axes = _const(a, node.input[3]) if len(node.input) > 3 and node.input[3] else [0]
            if starts is not None and ends is not None and [int(v) % rank for v in axes] == [stack] and \
                    int(ends[0]) == int(starts[0]) + 1 and (len(node.input) < 5 or not node.input[4]):
                return put(node.output[0], stack, axis, [parts[int(starts[0])]])
        if op == "Split" and g == stack and len(node.output) == len(parts):
            sizes = _const(a, node.input[1]) if len(node.input) > 1 and node.input[1] else _attr(node, "split")
            if sizes is None or all(int(v) == 1 for v in np.asarray(sizes).reshape(-1)):
                for y, part in zip(node.output, parts):
                    put(y, stack, axis, [part])
                return
    if op in SHAPE_READERS:
        return
    _unsupported(a, node, "meets fused q/k/v channels it cannot follow")


def _rule_slice_other_axis(a, node):
    """A Slice whose (constant) axes leave the channel axis alone passes the channels on, whatever its bounds
    (T5 slices its position bias by a computed length); every other Slice follows _rule_slice."""
    x = node.input[0]
    axes = _const(a, node.input[3]) if len(node.input) > 3 and node.input[3] else None
    rank = _rank(a, x)
    if axes is not None and rank is not None and a.chan[x][0] not in [int(v) % rank for v in axes.reshape(-1)]:
        a.chan[node.output[0]] = a.chan[x]
        return
    return _rule_slice(a, node)


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
    if any(v in a.chan for v in node.input[1:]):
        return _unsupported(a, node, "pad sizes carry channels")
    tries = [pads]
    traced = _shape_elements(a, node.input[1]) if pads is None and len(node.input) > 1 else None
    if traced is not None and axis in (axes_list := [int(v) % rank for v in (axes if axes is not None else
                                                                              range(rank))]):
        j = axes_list.index(axis)           # traced pads (Swin's): only the channel axis' two entries matter
        if len(traced) == 2 * len(axes_list) and traced[j] == 0 and traced[len(axes_list) + j] == 0:
            a.chan[node.output[0]] = (axis, segs)
            return
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


@rule("Where")
def _rule_where(a, node):
    """Where(condition, x, y) (masks, e.g. the causal mask): x and y combine like Add; the condition must
    not vary along the channel axis."""
    cond = node.input[0]
    if cond in a.chan:          # e.g. Where(IsNaN(p), 0, p): element by element, the channels line up
        return _rule_binary(a, node)
    _rule_binary(a, helper.make_node("Where", node.input[1:], node.output, name=node.name))
    y = node.output[0]
    if y in a.chan:
        axis, segs = a.chan[y]
        shape = a.shapes.get(cond)
        c_axis = None if shape is None else axis - ((_rank(a, y) or 0) - len(shape))
        if shape is None or (c_axis is not None and c_axis >= 0 and shape[c_axis] != 1):
            _unsupported(a, node, f"condition '{cond}' may vary along the channel axis")


@rule("Reshape")
def _rule_reshape_heads(a, node):
    """Reshapes of a channel axis beyond _rule_reshape's: heads merged into the batch axis and back (the new
    exporter's attention), and reshapes that move only the leading axes while the channel axis stays last
    ([B*T, C] -> [B, T, C], window partitions, channel-independent patches)."""
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
            _record_target(a, node, k, segs)
            return
        return _unsupported(a, node, f"reshapes heads merged into the batch axis ({dims_in} -> {dims_out})")
    if _same_dims(dims_in[:axis + 1], dims_out[:axis + 1]):        # channel axis untouched (symbolic rest)
        a.chan[y] = (axis, segs)
        _record_target(a, node, axis, segs)
        return
    for k in range(1, len(dims_in) - axis if len(dims_out) > axis else 0):   # [.., H, r, T] -> [.., H*r, T]
        merged = dims_in[axis:axis + k + 1]
        if all(isinstance(d, int) for d in merged) and dims_out[axis] == prod(merged) and \
                _same_dims(dims_in[:axis], dims_out[:axis]) and _same_dims(dims_in[axis + k + 1:], dims_out[axis + 1:]):
            if any(s.inner != 1 for s in segs) and prod(merged[1:]) > 1:
                break
            new_segs = tuple(Seg(s.space, s.inner * prod(merged[1:])) for s in segs)
            a.chan[y] = (axis, new_segs)
            _record_target(a, node, axis, new_segs)
            return
    elements = _shape_elements(a, node.input[1])
    known = elements or [None] * len(dims_out)
    if axis >= 1 and axis == len(dims_in) - 1 and len(dims_out) == len(dims_in) == len(known) and len(segs) == 1 \
            and segs[0].inner == 1 and isinstance(dims_out[axis], int) and 1 < dims_out[axis] < size and \
            size % dims_out[axis] == 0 and _same_dims(dims_out[:axis - 1], dims_in[:axis - 1]) and \
            not isinstance(dims_out[axis - 1], int) and not isinstance(known[axis - 1], int):
        factor = None if elements is None or elements[axis - 1] == -1 else \
            _head_factor(a, node, axis - 1, size // dims_out[axis])
        if elements is None or (elements[axis - 1] != -1 and factor is None):
            return _unsupported(a, node, "merges heads into the batch axis with a size it cannot rewrite")
        a.regrain(segs[0].space, dims_out[axis])     # [T, B, H*D] -> [T, B*H, D]: heads into the batch axis
        head_segs = (Seg(a.chan[x][1][0].space),)
        a.chan[y] = (axis - 1, head_segs)
        a.batch_merged.add(y)
        if factor is not None:
            a.shape_consts.append(ShapeConst(factor[0], 0, head_segs, factor[1]))
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


def _channels_last(a, node, x, y, dims_in, dims_out) -> bool:
    """[..., C, d1, d2] -> [..., C*d1*d2] with any leading axes ([B*T, C] -> [B, T, C], [B, T, H, D] ->
    [B*T, H*D], window partitions): the last axis holds the channel axis and the static axes after it, in
    order; which leading axes there are does not matter."""
    axis, segs = a.chan[x]
    trailing = dims_in[axis + 1:]
    if not trailing and dims_in[axis] is not None and dims_out[-1] == dims_in[axis] and len(dims_out) != len(dims_in):
        a.chan[y] = (len(dims_out) - 1, segs)         # the same (symbolic) size: the channel axis stays last
        _record_target(a, node, len(dims_out) - 1, segs)
        return True
    if not all(isinstance(d, int) and d > 0 for d in trailing) or not isinstance(dims_in[axis], int) or \
            dims_out[-1] != prod(dims_in[axis:]) or _same_dims(dims_in[:axis + 1], dims_out[:axis + 1]):
        return False
    inner = prod(trailing)
    if inner > 1 and any(s.inner != 1 for s in segs):
        return False
    new_segs = tuple(Seg(s.space, s.inner * inner) for s in segs)
    a.chan[y] = (len(dims_out) - 1, new_segs)
    _record_target(a, node, len(dims_out) - 1, new_segs)
    return True


@rule("Flatten")
def _rule_flatten_last(a, node):
    """Flatten that keeps the channel axis (and what follows it) last, e.g. [B, T, C] -> [B*T, C]."""
    x = node.input[0]
    dims_in = a.shapes.get(x)
    f = _attr(node, "axis", 1)
    if dims_in is not None and f % len(dims_in) > 1 and a.chan[x][0] >= f % len(dims_in) and \
            _channels_last(a, node, x, node.output[0], dims_in, [None, _prod(dims_in[f % len(dims_in):])]):
        return
    return _rule_reshape(a, node)


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


def _is_lookup(a, node) -> bool:
    """Gather of rows of a constant float table by indices (an embedding lookup)."""
    return node.op_type == "Gather" and node.input[0] in a.tensors and node.input[0] not in a.chan and \
        len(a.tensors.shape(node.input[0])) == 2 and a.tensors.dtype(node.input[0]) in FLOAT_TYPES and \
        _attr(node, "axis", 0) == 0


@rule("Gather")
def _rule_gather_lookup(a, node):
    """An embedding lookup opens a channel space on the table's embedding axis, like a layer's output (the
    residual stream of a transformer starts here); other Gathers follow _rule_gather."""
    if node.input[0] in a.chan:
        return _rule_gather(a, node)
    table, idx = node.input
    idx_rank = _rank(a, idx) if idx not in a.tensors else len(a.tensors.shape(idx))
    if idx_rank is None:
        return _unsupported(a, node, "embedding lookup with indices of unknown rank")
    segs = _open_space(a, node, a.tensors.shape(table)[1], node.output[0], idx_rank)
    a.touches.append(Touch(table, 1, segs, "out", node.name))


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


RULES["Concat"] = _rule_concat_token      # registered after _rule_concat, which it falls back to
RULES["Slice"] = _rule_slice_other_axis   # likewise after _rule_slice
