"""Read-only lookups of one graph, built once per model and shared by the modules that read it."""
from __future__ import annotations

from functools import cache, cached_property
from types import MappingProxyType

import onnx
from onnx import helper, shape_inference

from .model_io import light_model

STANDARD = ("", "ai.onnx")


class GraphIndex:
    """Producers, consumers and positions of the nodes of `model`'s main graph, attributes with the defaults of
    the op schema for the model's opset, and value shapes. The graph must not change while the index is used."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}     # one entry per use: a node reading x twice twice
        for node in self.nodes:
            for x in node.input:
                self.consumers.setdefault(x, []).append(node)
        self.position = {id(n): i for i, n in enumerate(self.nodes)}
        self.opsets = {("" if o.domain in STANDARD else o.domain): o.version for o in model.opset_import}

    def index(self, node: onnx.NodeProto) -> int:
        return self.position[id(node)]

    def uses(self, value: str) -> int:
        return len(self.consumers.get(value, ()))

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        """The node's attribute, else the schema's default for the model's opset, else `default`."""
        for at in node.attribute:
            if at.name == name:
                return helper.get_attribute_value(at)
        return self._defaults(node).get(name, default)

    def attrs(self, node: onnx.NodeProto) -> dict:
        """Every attribute of the node, with the schema's defaults for those it does not set."""
        return {**self._defaults(node), **{at.name: helper.get_attribute_value(at) for at in node.attribute}}

    def _defaults(self, node: onnx.NodeProto) -> MappingProxyType:
        domain = "" if node.domain in STANDARD else node.domain
        return _schema_defaults(node.op_type, domain, self.opsets.get(domain))

    def needed_nodes(self, outputs: list[str]) -> list[onnx.NodeProto]:
        """The nodes that `outputs` depend on, in graph order."""
        needed, stack = set(), list(outputs)
        while stack:
            node = self.producer.get(stack.pop())
            if node is not None and id(node) not in needed:
                needed.add(id(node))
                stack.extend(x for x in node.input if x)
        return [n for n in self.nodes if id(n) in needed]

    @cached_property
    def shapes(self) -> dict[str, list]:
        """Shapes of every value (ints, or None/str for unknown/symbolic dims) from onnx's shape inference."""
        light = light_model(self.model)
        try:
            inferred = shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
        except Exception:
            inferred = light
        return value_shapes(inferred, self.model)


@cache
def _schema_defaults(op_type: str, domain: str, version: int | None) -> MappingProxyType:
    """name -> default of the attributes of the op's schema at opset `version` that have a default."""
    try:
        schema = onnx.defs.get_schema(op_type, version or 0, domain)
    except onnx.defs.SchemaError:      # no version yet at that opset (or no opset given): the newest
        try:
            schema = onnx.defs.get_schema(op_type, domain=domain)
        except onnx.defs.SchemaError:
            return MappingProxyType({})
    return MappingProxyType({name: helper.get_attribute_value(at.default_value) for name, at in
                             schema.attributes.items() if at.default_value.type != onnx.AttributeProto.UNDEFINED})


def value_shapes(inferred: onnx.ModelProto, model: onnx.ModelProto) -> dict[str, list]:
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
