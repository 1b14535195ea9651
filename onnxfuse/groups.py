"""Channel-group analysis: a union-find over the channel spaces of an ONNX graph.

Every Gemm/MatMul/Conv output channel axis opens a *space*. Ops that act channel by channel pass a
space through, ops that combine two activations element-wise unify their spaces, and Flatten/Reshape
turn a channel axis into runs of `inner` consecutive columns. A *group* is a set of unified spaces:
one neuron index of a group is one row of every producer, one column block of every consumer and one
entry of every per-channel parameter it touches. Each op's channel rule is in its spec (onnxfuse.ops); an op
without a rule that touches a channel axis blocks its group and is reported, never guessed at.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, shape_inference

from .errors import UnsupportedGraphError
from .graph_index import GraphIndex, value_shapes
from .model_io import TensorTable, light_model
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
    computed: np.ndarray | None = None      # the graph computes it (from some tensor's shape): its value now,
                                            # replaced at `use` by a constant of the kept width (segs () : kept)


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
class ChannelPermutation:
    """A fixed permutation of a channel axis (ShuffleNet's channel shuffle, Reshape -> Transpose -> Reshape, or a
    Gather of constant indices). Every input channel is a group of its own (`segs`: single channels, so that any
    kept channels can be permuted), and output segment k is input segment `order[k]`. Where the widths change,
    the nodes are replaced by one Gather whose indices follow the kept channels."""
    nodes: tuple[int, ...]         # positions of the nodes: the first reads the input, the last writes the output
    axis: int
    segs: tuple[Seg, ...]
    out_segs: tuple[Seg, ...]
    order: tuple[int, ...]


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



@dataclass
class Analysis:
    """The result of analysing one member graph; read by stack, select and slice."""
    model: onnx.ModelProto
    tensors: TensorTable
    shapes: dict[str, list]
    index: GraphIndex
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
    permutations: list[ChannelPermutation] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)    # unsupported ops touching channels
    mixing: dict[str, str] = field(default_factory=dict)  # node -> why it mixes channels of one axis
    retired: set[int] = field(default_factory=set)          # spaces replaced by their parts (refine)
    batch_merged: set[str] = field(default_factory=set)     # values whose channels are merged into axis 0
    stacked: dict = field(default_factory=dict)   # value -> (stack axis, [segs of part i]): fused q/k/v
    folded: list[str] = field(default_factory=list)      # values folded into initializers first (folding)
    _fixed: set[int] | None = field(default=None, repr=False)    # _fixed_roots, until the groups change

    # -- for the rules
    def attr(self, node, name: str, default=None):
        return self.index.attr(node, name, default)

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return len(shape) if shape is not None else None

    def const(self, name: str):
        return self.tensors.array(name) if name and name in self.tensors else None

    def unsupported(self, node, why: str) -> None:
        """Record a problem naming the node; the groups of its inputs are blocked."""
        label = f"node '{node.name}' ({node.op_type}): {why}"
        self.problems.append(label)
        for x in node.input:
            if x in self.chan:
                self.block(self.chan[x][1], label)

    def open_space(self, node, width: int, out: str, axis: int) -> tuple[Seg, ...]:
        segs = (Seg(self.new_space(width, node.name or node.output[0])),)
        self.chan[out] = (axis, segs)
        return segs

    def cut(self, x: str, axis: int, positions: list[int]) -> tuple[Seg, ...] | None:
        """Refine x's channel groups so that each index position in `positions` falls between channels."""
        for pos in positions:
            offset = 0
            for seg in self.chan[x][1]:
                size = self.width(seg.space) * seg.inner
                if offset < pos < offset + size:
                    if (pos - offset) % seg.inner:
                        return None
                    self.refine(seg.space, [(pos - offset) // seg.inner])
                    break
                offset += size
        return self.chan[x][1]

    def segs_between(self, segs, start: int, end: int) -> tuple[Seg, ...]:
        """The segments of an axis laid out as `segs` that lie inside index positions start .. end."""
        out, offset = [], 0
        for seg in segs:
            size = self.width(seg.space) * seg.inner
            if start <= offset and offset + size <= end:
                out.append(seg)
            offset += size
        return tuple(out)

    # -- union-find
    def new_space(self, width: int, layer: str) -> int:
        space = len(self.parent)
        self._fixed = None
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
        self._fixed = None

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

    def permute(self, x: str, y: str, nodes: list, order: tuple[int, ...]) -> bool:
        """y is x with its channel axis permuted (output index k is input index order[k]). Every group on x's axis
        is refined into one-channel groups, so that the permutation can follow any kept channels; y's layout is
        those channels in that order, and a ChannelPermutation records `nodes`. False (nothing recorded) if a
        segment covers several indices per channel."""
        axis, segs = self.chan[x]
        if any(s.inner != 1 for s in segs):
            return False
        for root in dict.fromkeys(self.find(s.space) for s in segs):
            if self.space_width[root] > 1:
                self.refine(root, list(range(1, self.space_width[root])))
        singles = self.chan[x][1]
        out_segs = tuple(singles[i] for i in order)
        self.chan[y] = (axis, out_segs)
        self.permutations.append(ChannelPermutation(tuple(self.index.index(n) for n in nodes), axis, singles,
                                                    out_segs, tuple(order)))
        return True

    def _rewrite(self, fn) -> None:
        for value, (axis, segs) in self.chan.items():
            self.chan[value] = (axis, fn(segs))
        for value, (axis, parts) in self.stacked.items():
            self.stacked[value] = (axis, [fn(p) for p in parts])
        for item in self.touches + self.shape_consts + self.attr_consts + self.equal_parts + self.derived_bounds:
            item.segs = fn(item.segs)
        for item in self.derived_bounds:
            item.axis_segs = fn(item.axis_segs)
        for item in self.grouped + self.permutations:
            item.segs, item.out_segs = fn(item.segs), fn(item.out_segs)

    def width(self, space: int) -> int:
        return self.space_width[self.find(space)]

    def freeze(self, segs, reason: str) -> None:
        self._fixed = None
        for seg in segs:
            self.frozen.setdefault(seg.space, []).append(reason)

    def block(self, segs, reason: str) -> None:
        self._fixed = None
        for seg in segs:
            self.blocked.setdefault(seg.space, []).append(reason)

    def is_widened(self, space: int) -> bool:
        return self.find(space) not in self._fixed_roots()

    def _fixed_roots(self) -> set[int]:
        """The roots of the groups that keep their width (frozen or blocked); new spaces, unions, freeze and block
        drop the cache (refine makes new spaces)."""
        if self._fixed is None:
            self._fixed = {self.find(s) for reasons in (self.frozen, self.blocked) for s, why in reasons.items()
                           if why and s not in self.retired}
        return self._fixed

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
        result, members = [], {}
        for s in self.parent:
            if s not in self.retired:
                members.setdefault(self.find(s), []).append(s)
        for root in roots:
            spaces = members[root]
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

# ----------------------------------------------------------------------------- the analysis

def symbolic_shapes(model: onnx.ModelProto) -> dict[str, list] | None:
    """Shapes from onnxruntime's symbolic shape inference, which follows computed shapes (Expand, Where,
    Reshape of a Concat of Shape pieces) where onnx's own inference gives up or invents new symbols."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        log = logging.getLogger(SymbolicShapeInference.__module__)     # it logs its guesses ("Unable to
        level = log.level                                               # determine if ...") as warnings
        log.setLevel(logging.ERROR)
        try:
            inferred = SymbolicShapeInference.infer_shapes(light_model(model), auto_merge=True)
        finally:
            log.setLevel(level)
    except Exception:
        return None
    if inferred is None:
        return None
    return value_shapes(inferred, model)


def analyze(model: onnx.ModelProto, tensors: TensorTable | None = None, source: str = "model") -> Analysis:
    """Find the channel groups of a graph. Ops must be in topological order (an ONNX requirement). Where onnx's
    shape inference leaves problems (computed shapes), the graph is analysed again with onnxruntime's
    symbolic shape inference, and the analysis with fewer problems is kept."""
    tensors = tensors or TensorTable(model.graph)
    index = GraphIndex(model)
    a = _analyze(index, tensors, index.shapes)
    if a.problems:          # first on the (small) subgraph that computes the problems' channel-free inputs
        shapes = _run_shapes(_problem_subgraph(a))
        if shapes is not None:
            b = _analyze(index, tensors, _merge_shapes(a.shapes, shapes))
            if not b.problems:
                return b
    if a.problems:
        shapes = symbolic_shapes(model)
        if shapes is not None:
            b = _analyze(index, tensors, _merge_shapes(a.shapes, shapes))
            if len(b.problems) < len(a.problems):
                return b
    return a


class _Aliased:
    """The constants of a graph plus values that are only an Identity or Transpose of one (the legacy exporter's
    Identity(initializer) of a shared weight, the new exporter's Transpose(initializer)): rules see them as
    constants; touches of them are moved onto the source tensor afterwards (_resolve_aliases)."""

    def __init__(self, table: TensorTable, index: GraphIndex):
        self.table, self.alias = table, {}
        for node in index.nodes:
            x = node.input[0] if node.input else None
            if node.op_type in ("Identity", "Transpose") and x and (x in table or x in self.alias):
                src, perm = self.alias.get(x, (x, list(range(len(table.shape(x))))))
                step = index.attr(node, "perm") or list(reversed(range(len(perm)))) if node.op_type == "Transpose" \
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
                a.unsupported(helper.make_node("Identity", [], [], name=other.node),
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
        node = a.index.producer.get(v)
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


def _analyze(index: GraphIndex, tensors: TensorTable, shapes: dict) -> Analysis:
    from . import ops           # the ops' rules import this module
    from .ops.attention import batch_merged_ok, stacked_rule
    model = index.model
    aliased = _Aliased(tensors, index)
    a = Analysis(model, aliased if aliased.alias else tensors, shapes, index)
    for node in index.nodes:
        if node.op_type == "Constant":
            continue
        if any(x in a.batch_merged for x in node.input) and not batch_merged_ok(a, node):
            continue
        if any(x in a.stacked for x in node.input):
            stacked_rule(a, node)
            continue
        spec = ops.spec_of(node)
        fn = spec.rule if spec else _rule_ml if node.domain == "ai.onnx.ml" else None
        opens = spec is not None and spec.opens_space is not None and spec.opens_space(a, node)
        if not opens and not any(x in a.chan for x in node.input):
            continue          # the op never sees a channel axis: nothing to do
        if fn is None:
            a.unsupported(node, f"op {node.op_type}{' (domain ' + node.domain + ')' if node.domain else ''} "
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
    for tensor in dict.fromkeys(c.tensor for c in a.shape_consts):
        count = len({(c.index, tuple(c.segs)) for c in a.shape_consts if c.tensor == tensor}) and \
            sum(1 for c in a.shape_consts if c.tensor == tensor)
        mine = [c for c in a.shape_consts if c.tensor == tensor]
        groups = {(c.index, tuple(a.find(g.space) for g in c.segs)) for c in mine}
        several = len(groups) > len({c.index for c in mine})      # one element, widths of different groups
        if (a.index.uses(tensor) > len({c.use for c in mine}) or several) and all(c.use is not None for c in mine) \
                and tensor not in getattr(a.tensors, "alias", {}):
            for c in mine:          # each rewritten use reads its own copy (transplant.private_shape_const)
                c.private = True
        elif a.index.uses(tensor) > count:
            a.problems.append(f"shape constant '{tensor}' holds a width to rewrite but is also used elsewhere "
                              f"({a.index.uses(tensor)} uses)")



def _rule_ml(a, node):
    """ai.onnx.ml ops (ZipMap, LabelEncoder, ...) after a classifier: their inputs keep their width."""
    for x in node.input:
        if x in a.chan:
            a.freeze(a.chan[x][1], f"{node.op_type} (ai.onnx.ml) at node '{node.name}'")

