"""ONNX graph -> trainable torch module, and the tuned values written back into the same graph.

The module interprets the graph's nodes in order with the torch forwards of their specs (onnxfuse.ops).
Every float initializer (or Constant tensor) of rank >= 1 is an nn.Parameter named after it; BatchNormalization
running statistics are buffers that follow train/eval mode. Only initializer values change on write-back:
topology, names, opset and metadata stay as they were (no torch.onnx.export round trip).
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import torch

from .errors import UnsupportedGraphError
from .graph_index import GraphIndex
from .model_io import FLOAT_TYPES, TensorTable
from .ops import spec_of, untrainable_ops


def _key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


class OnnxModule(torch.nn.Module):
    """Runs `model` up to `output` (default: every graph output). Parameters are keyed by a sanitized form of
    their initializer name; `onnx_names` maps the keys back."""

    def __init__(self, model: onnx.ModelProto, outputs: list[str] | None = None):
        super().__init__()
        self.model = model
        self.tensors = TensorTable(model.graph)
        self.outputs = outputs or [o.name for o in model.graph.output]
        self.input_names = [i.name for i in model.graph.input if i.name not in self.tensors]
        index = GraphIndex(model)
        missing = untrainable_ops(index, self.outputs)
        if missing:
            raise UnsupportedGraphError(f"the torch bridge has no implementation of op {missing[0]}")
        nodes = index.needed_nodes(self.outputs)
        running = {n.input[i] for n in nodes if spec_of(n) is not None for i in spec_of(n).buffer_inputs
                   if len(n.input) > i}
        self.params = torch.nn.ParameterDict()
        self.onnx_names: dict[str, str] = {}
        self.constants: dict[str, torch.Tensor] = {}
        used = {x for n in nodes for x in n.input}
        for name in self.tensors.names():
            if name not in used:
                continue
            value = torch.from_numpy(np.asarray(self.tensors.array(name)).copy())
            if self.tensors.dtype(name) in FLOAT_TYPES:
                value = value.float() if value.dtype != torch.float64 else value
                key = _key(name)
                while key in self.onnx_names:
                    key += "_"
                if name in running:
                    self.register_buffer(key, value)
                    self.onnx_names[key] = name
                    continue
                if value.dim() >= 1:
                    self.params[key] = torch.nn.Parameter(value)
                    self.onnx_names[key] = name
                    continue
            self.constants[name] = value
        self._key_of = {v: k for k, v in self.onnx_names.items()}
        self.steps = []
        for node in nodes:
            if node.op_type != "Constant":
                self.steps.append((spec_of(node).forward, list(node.input), list(node.output), index.attrs(node),
                                   node))

    def tensor(self, name: str) -> torch.Tensor:
        key = self._key_of.get(name)
        if key is None:
            return self.constants[name]
        return self.params[key] if key in self.params else getattr(self, key)

    def forward(self, *inputs):
        env = dict(zip(self.input_names, inputs))
        params, buffers = self.params._parameters, self._buffers      # direct dicts: this runs every step
        for key, name in self.onnx_names.items():
            env[name] = params[key] if key in params else buffers[key]
        env.update(self.constants)
        for fn, ins, outs, attrs, node in self.steps:
            result = fn(self, attrs, *[env[x] if x else None for x in ins])
            if isinstance(result, tuple):
                for name, value in zip(outs, result):
                    env[name] = value
            else:
                env[outs[0]] = result
        values = [env[o] for o in self.outputs]
        return values[0] if len(values) == 1 else values

    def write_back(self, model: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """Copy of the model (or `model` in place) with the module's current values in its initializers."""
        if model is None:
            model = onnx.ModelProto()
            model.CopyFrom(self.model)
        table = TensorTable(model.graph)
        for key, name in self.onnx_names.items():
            table.set(name, self.tensor(name).detach().cpu().double().numpy())
        return model
