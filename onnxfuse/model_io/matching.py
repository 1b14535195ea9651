"""Structural member matching: every member against member 0, node by node, then their opsets."""
from __future__ import annotations

import onnx
from onnx import helper

from ..errors import IncompatibleMembersError
from .loading import Member


def _describe(node: onnx.NodeProto, index: int, member: Member) -> str:
    return f"node {index} ({node.op_type} '{node.name}') in {member.name}"


def check_compatible(members: list[Member]) -> list[dict[str, str]]:
    """Match every member to member 0 by graph structure, not by names.

    Returns, per member, a map from member 0's constant-tensor names to that member's names.
    """
    ref = members[0]
    maps = []
    for member in members:
        maps.append(_match(ref, member))
    return maps


def _match(ref: Member, other: Member) -> dict[str, str]:
    g0, g1 = ref.model.graph, other.model.graph
    for kind in ("input", "output"):
        a = [v for v in getattr(g0, kind) if v.name not in ref.tensors]
        b = [v for v in getattr(g1, kind) if v.name not in other.tensors]
        if [v.type.tensor_type.elem_type for v in a] != [v.type.tensor_type.elem_type for v in b] or \
                [len(v.type.tensor_type.shape.dim) for v in a] != [len(v.type.tensor_type.shape.dim) for v in b]:
            raise IncompatibleMembersError(f"graph {kind}s differ between {ref.name} and {other.name}")
    if len(g0.node) != len(g1.node):
        raise IncompatibleMembersError(f"{ref.name} has {len(g0.node)} nodes, {other.name} has {len(g1.node)}: "
                                       f"not the same architecture")
    names: dict[str, str] = {}
    for v0, v1 in zip(g0.input, g1.input):
        names[v0.name] = v1.name
    for i, (n0, n1) in enumerate(zip(g0.node, g1.node)):
        where = f"{_describe(n0, i, ref)} vs {_describe(n1, i, other)}"
        if (n0.op_type, n0.domain) != (n1.op_type, n1.domain) or len(n0.input) != len(n1.input) \
                or len(n0.output) != len(n1.output):
            raise IncompatibleMembersError(f"members differ at {where}")
        if n0.op_type != "Constant" and _attrs(n0) != _attrs(n1):
            raise IncompatibleMembersError(f"members differ in attributes at {where}")
        for a, b in zip(n0.input, n1.input):
            if a in ref.tensors and b in other.tensors:
                s0, s1 = ref.tensors.shape(a), other.tensors.shape(b)
                if s0 != s1 or ref.tensors.dtype(a) != other.tensors.dtype(b):
                    raise IncompatibleMembersError(
                        f"tensor '{a}' of {_describe(n0, i, ref)} has shape {list(s0)} but '{b}' of "
                        f"{_describe(n1, i, other)} has shape {list(s1)}")
                names[a] = b
            elif (a in ref.tensors) != (b in other.tensors) or names.get(a, b) != b:
                raise IncompatibleMembersError(f"members are wired differently at {where} (input '{a}' vs '{b}')")
        for a, b in zip(n0.output, n1.output):
            names[a] = b
        if n0.op_type == "Constant":
            a, b = n0.output[0], n1.output[0]
            if ref.tensors.shape(a) != other.tensors.shape(b):
                raise IncompatibleMembersError(f"constant shapes differ at {where}")
    used = set(names.values())                  # initializers no node uses: matched in order, or refused
    u0 = [t for t in g0.initializer if t.name not in names]
    u1 = [t for t in g1.initializer if t.name not in used]
    if [(list(t.dims), t.data_type) for t in u0] != [(list(t.dims), t.data_type) for t in u1]:
        raise IncompatibleMembersError(f"initializers that no node uses differ: {[t.name for t in u0][:5]} in "
                                       f"{ref.name}, {[t.name for t in u1][:5]} in {other.name}")
    names.update({a.name: b.name for a, b in zip(u0, u1)})
    _check_opsets(ref, other)
    return names


def _check_opsets(ref: Member, other: Member) -> None:
    """Members of one architecture exported at different opsets fuse when every op they use means the same
    at both (the same schema version); the result keeps member 0's opsets."""
    a, b = _opsets(ref.model), _opsets(other.model)
    if a == b:
        return
    for node in ref.model.graph.node:
        domain = node.domain or "ai.onnx"
        if domain not in a or domain not in b:
            raise IncompatibleMembersError(f"opsets differ: {a} in {ref.name}, {b} in {other.name}")
        versions = [_since(node, a[domain]), _since(node, b[domain])]
        if versions[0] is None or versions[0] != versions[1]:
            raise IncompatibleMembersError(
                f"opsets differ: {a} in {ref.name}, {b} in {other.name}, and op {node.op_type} (node "
                f"'{node.name}') is not the same at both (versions {versions[0]} and {versions[1]})")


def _since(node: onnx.NodeProto, version: int) -> int | None:
    try:
        return onnx.defs.get_schema(node.op_type, version, node.domain).since_version
    except Exception:            # unknown op or domain
        return None


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {o.domain or "ai.onnx": o.version for o in model.opset_import}


def _attrs(node: onnx.NodeProto) -> list:
    return sorted((a.name, helper.get_attribute_value(a)) for a in node.attribute
                  if a.type != onnx.AttributeProto.TENSOR)
