"""Shape values the graph computes (Reshape targets, Slice bounds, pads): traced element by element, or compiled
into a small graph that onnx's reference evaluator recomputes for a given input shape."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper


def shape_elements(a, name: str, depth: int = 0):
    """The elements of a 1-D int64 value computed from constants and Shape ops (how exporters write a Reshape
    target): each an int, a dimension `("dim", value, index)` of a value, or None (unknown); None if the
    length is unknown."""
    if name in a.tensors:
        return [int(v) for v in np.asarray(a.tensors.array(name)).reshape(-1)]
    producer = a.index.producer.get(name)
    if producer is None or depth > 12:
        return None
    op, ins = producer.op_type, producer.input
    if op == "Shape":
        rank = a.rank(ins[0])
        if rank is None:
            return None
        start, end = a.attr(producer, "start", 0), a.attr(producer, "end", rank)
        return [("dim", ins[0], j) for j in range(rank)[start:end]]
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze") or (op == "Reshape" and a.rank(ins[0]) == 1):
        return shape_elements(a, ins[0], depth + 1)
    if op == "Where" and ins[0] in a.index.producer and a.index.producer[ins[0]].op_type == "Equal" and \
            ins[2] in a.index.producer[ins[0]].input:    # the legacy exporter's expand(-1): Where(Equal(s, -1), 1, s)
        source = shape_elements(a, ins[2], depth + 1)
        return None if source is None else [1 if e == -1 else e for e in source]
    if op == "Concat":
        parts = [shape_elements(a, x, depth + 1) for x in ins]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if op in ("Gather", "Slice"):
        source = shape_elements(a, ins[0], depth + 1)
        if source is not None and op == "Gather" and ins[1] in a.tensors:
            return [source[int(i)] for i in np.asarray(a.tensors.array(ins[1])).reshape(-1)]
        consts = [a.const(x) for x in ins[1:]]
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
        node = a.index.producer.get(v)
        if node is None or node.domain not in ("", "ai.onnx") or any(x in a.chan for x in node.input
                                                                         if node.op_type != "Shape"):
            return None
        if node.op_type == "Shape":
            dims = a.shapes.get(node.input[0])
            if dims is None or any(d is None for d in dims):
                return None
            start, end = a.attr(node, "start", 0), a.attr(node, "end", len(dims))
            leaves[v] = dims[start:end]
        else:
            nodes.append(node)
            todo.extend(node.input)
        if len(nodes) > 200:
            return None
    nodes.sort(key=a.index.index)
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


def dim_value(a, element, x):
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


def shape_function(a, value: str, x: str):
    """If `value` is computed from constants and Shape(x) alone (how the legacy exporter writes torch.chunk's
    bounds), a function of x's shape that recomputes it with onnx's reference evaluator; else None. The
    unknown (symbolic) dims of x must not matter: the result is checked to be the same for two guesses."""
    from onnx.reference import ReferenceEvaluator

    from .ops import spec_of        # the ops import this module
    producer = {out: (a.index.index(node), node) for out, node in a.index.producer.items()}
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
        elif spec_of(node) is None or not spec_of(node).shape_arithmetic:
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
