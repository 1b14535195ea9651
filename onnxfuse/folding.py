"""Parameters the graph computes from other constants, folded into plain initializers where the analysis needs it.

Some exporters compute a per-channel parameter at run time from initializers alone: torchvision's Swin V2 zeroes
the key part of its q/k/v bias with a ScatterND and scales its attention by exp(clip(logit_scale)). Such a value
has no channel layout of its own, so the analysis cannot cut it. When a problem names one, and the value is no
larger than the parameters it is computed from (a table lookup that would grow the model is left alone), it is
computed once per member with onnxruntime and stored as an initializer of the same name in every member: the
graph computes the same function, with one plain parameter where it had a small constant subgraph.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph_index import GraphIndex
from .model_io import FLOAT_TYPES, Member, TensorTable, drop_unread
from .sessions import session


def constant_subgraph(model: onnx.ModelProto, tensors: TensorTable, value: str) -> list[onnx.NodeProto] | None:
    """The nodes that compute `value` from constants alone (in graph order), or None if one reads a graph input or
    holds a subgraph."""
    nodes = GraphIndex(model).needed_nodes([value])
    inputs = {i.name for i in model.graph.input} - set(tensors.names())
    if any(x in inputs for n in nodes for x in n.input) or \
            any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute):
        return None
    return nodes


def _leaves(nodes, tensors: TensorTable) -> list[str]:
    made = {o for n in nodes for o in n.output}
    return list(dict.fromkeys(x for n in nodes for x in n.input if x and x not in made and x in tensors))


def _evaluate(member: Member, nodes, value: str) -> np.ndarray:
    leaves = _leaves(nodes, member.tensors)
    graph = helper.make_graph(nodes, "fold", [], [helper.make_tensor_value_info(value, onnx.TensorProto.UNDEFINED,
                                                                                   None)],
                              [numpy_helper.from_array(np.asarray(member.tensors.array(x)), x) for x in leaves])
    model = helper.make_model(graph, opset_imports=list(member.model.opset_import), ir_version=member.model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(model)
    kind = next((v.type.tensor_type.elem_type for v in inferred.graph.value_info if v.name == value), 0) or \
        inferred.graph.output[0].type.tensor_type.elem_type
    model.graph.output[0].type.tensor_type.elem_type = kind or onnx.TensorProto.FLOAT
    return session(model, log_level=4).run(None, {})[0]


def fold_problem_inputs(members: list[Member], problems: list[str]) -> list[str]:
    """Fold, in every member, the channel-free values that the analysis's `problems` name and that are computed
    from initializers alone (see the module's docstring). Returns the folded value names."""
    model, tensors = members[0].model, members[0].tensors
    named = re.findall(r"input '([^']+)' has no channel layout", "\n".join(problems))
    folded = []
    for value in dict.fromkeys(named):
        if value in tensors:
            continue
        nodes = constant_subgraph(model, tensors, value)
        if not nodes:
            continue
        leaves = _leaves(nodes, tensors)
        source = sum(int(np.prod(tensors.shape(x))) for x in leaves if tensors.dtype(x) in FLOAT_TYPES)
        try:
            values = [_evaluate(m, nodes if i == 0 else constant_subgraph(m.model, m.tensors, value), value)
                      for i, m in enumerate(members)]
        except Exception:          # the subgraph does not run alone: leave the problem as it is
            continue
        if values[0].dtype.kind != "f" or values[0].size > source:
            continue
        for m, v in zip(members, values):
            _replace_by_initializer(m, value, v, leaves)
        folded.append(value)
    return folded


def _replace_by_initializer(member: Member, value: str, array: np.ndarray, leaves: list[str]) -> None:
    """`value` becomes an initializer; the nodes and the `leaves` that only served to compute it go."""
    graph = member.model.graph
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), value))
    keep = [n for n in graph.node if value not in n.output]
    del graph.node[:]
    graph.node.extend(keep)
    keep = GraphIndex(member.model).needed_nodes([o.name for o in graph.output])     # what only computed it goes
    del graph.node[:]
    graph.node.extend(keep)
    drop_unread(member.model, set(leaves), member.tensors.arrays)
    member.tensors = TensorTable(graph, member.tensors.arrays)
