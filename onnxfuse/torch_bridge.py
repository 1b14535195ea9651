"""ONNX graph -> trainable torch module, and the tuned values written back into the same graph.

The module interprets the graph's nodes in order with torch ops. Every float initializer (or Constant
tensor) of rank >= 1 is an nn.Parameter named after it; BatchNormalization running statistics are buffers
that follow train/eval mode. Only initializer values change on write-back: topology, names, opset and
metadata stay as they were (no torch.onnx.export round trip).
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper

from .errors import UnsupportedGraphError
from .model_io import FLOAT_TYPES, TensorTable

OPS: dict[str, callable] = {}


def op(*names):
    def register(fn):
        for name in names:
            OPS[name] = fn
        return fn
    return register


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


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
        nodes = _needed_nodes(model.graph, self.outputs)
        running = {n.input[i] for n in nodes if n.op_type == "BatchNormalization" for i in (3, 4)
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
            if node.op_type == "Constant":
                continue
            fn = OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if fn is None:
                raise UnsupportedGraphError(f"the torch bridge has no implementation of op {node.op_type} "
                                            f"(node '{node.name}')")
            self.steps.append((fn, list(node.input), list(node.output), _attrs(node), node))

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


def _needed_nodes(graph, outputs):
    producer = {o: n for n in graph.node for o in n.output}
    needed, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(x for x in node.input if x)
    return [n for n in graph.node if id(n) in needed]


# ----------------------------------------------------------------------------- op implementations

@op("Gemm")
def _gemm(m, at, a, b, c=None):
    alpha, beta = at.get("alpha", 1.0), at.get("beta", 1.0)
    a = a.t() if at.get("transA", 0) else a
    b = b.t() if at.get("transB", 0) else b
    if c is None:
        y = a @ b
        return y if alpha == 1.0 else y * alpha
    return torch.addmm(c, a, b, beta=beta, alpha=alpha)     # one fused op, as nn.Linear does


@op("MatMul")
def _matmul(m, at, a, b):
    return torch.matmul(a, b)


def _conv_padding(at, dims):
    if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedGraphError(f"auto_pad={at['auto_pad']} is not supported by the torch bridge")
    pads = at.get("pads", [0] * 2 * dims)
    begin, end = pads[:dims], pads[dims:]
    return begin, end


def _pad_if_asymmetric(x, begin, end, value=0.0):
    if list(begin) == list(end):
        return x, list(begin)
    flat = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return F.pad(x, flat, value=value), [0] * len(begin)


@op("Conv")
def _conv(m, at, x, w, b=None):
    dims = w.dim() - 2
    begin, end = _conv_padding(at, dims)
    x, padding = _pad_if_asymmetric(x, begin, end)
    fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    return fn(x, w, b, stride=at.get("strides", 1), padding=padding, dilation=at.get("dilations", 1),
              groups=at.get("group", 1))


@op("BatchNormalization")
def _batchnorm(m, at, x, scale, bias, mean, var):
    return F.batch_norm(x, mean, var, scale, bias, training=m.training,
                        momentum=1.0 - at.get("momentum", 0.9), eps=at.get("epsilon", 1e-5))


@op("InstanceNormalization")
def _instancenorm(m, at, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=at.get("epsilon", 1e-5))


@op("LayerNormalization")
def _layernorm(m, at, x, scale, bias=None):
    axis = at.get("axis", -1) % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, eps=at.get("epsilon", 1e-5))


def _pool(fn_name, m, at, x):
    dims = x.dim() - 2
    begin, end = _conv_padding(at, dims)
    kernel, stride = at["kernel_shape"], at.get("strides", [1] * dims)
    if fn_name == "max":
        x, padding = _pad_if_asymmetric(x, begin, end, value=float("-inf"))
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
        return fn(x, kernel, stride, padding, dilation=at.get("dilations", 1), ceil_mode=bool(at.get("ceil_mode", 0)))
    if list(begin) != list(end):
        raise UnsupportedGraphError("asymmetric AveragePool padding is not supported by the torch bridge")
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
    return fn(x, kernel, stride, list(begin), ceil_mode=bool(at.get("ceil_mode", 0)),
              count_include_pad=bool(at.get("count_include_pad", 0)))


@op("MaxPool")
def _maxpool(m, at, x):
    return _pool("max", m, at, x)


@op("AveragePool")
def _avgpool(m, at, x):
    return _pool("avg", m, at, x)


@op("GlobalAveragePool")
def _gap(m, at, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def _gmp(m, at, x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@op("Flatten")
def _flatten(m, at, x):
    axis = at.get("axis", 1) % max(x.dim(), 1) if at.get("axis", 1) < 0 else at.get("axis", 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@op("Reshape")
def _reshape(m, at, x, shape):
    target = [int(s) for s in shape.tolist()]
    if not at.get("allowzero", 0):
        target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
    return x.reshape(target)


@op("Transpose")
def _transpose(m, at, x):
    return x.permute(at.get("perm", list(reversed(range(x.dim())))))


def _axes(at, axes):
    if axes is not None:
        return [int(a) for a in axes.tolist()]
    return list(at["axes"]) if "axes" in at else None


@op("Squeeze")
def _squeeze(m, at, x, axes=None):
    axes = _axes(at, axes)
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


@op("Unsqueeze")
def _unsqueeze(m, at, x, axes=None):
    axes = sorted(a % (x.dim() + len(_axes(at, axes))) for a in _axes(at, axes))
    for a in axes:
        x = x.unsqueeze(a)
    return x


@op("Concat")
def _concat(m, at, *xs):
    return torch.cat(xs, dim=at["axis"])


@op("Split")
def _split(m, at, x, split=None):
    sizes = split.tolist() if split is not None else at.get("split")
    axis = at.get("axis", 0)
    if sizes is None:
        n = at["num_outputs"]
        sizes = [-(-x.shape[axis] // n)] * n
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    return tuple(torch.split(x, sizes, dim=axis))


@op("Slice")
def _slice(m, at, x, starts, ends, axes=None, steps=None):
    index = [slice(None)] * x.dim()
    axes = axes.tolist() if axes is not None else list(range(len(starts)))
    steps = steps.tolist() if steps is not None else [1] * len(axes)
    backwards = []
    for s, e, a, st in zip(starts.tolist(), ends.tolist(), axes, steps):
        size = x.shape[a]
        if st > 0:
            index[a] = slice(max(min(s, size), -size), max(min(e, size), -size - 1), st)
        else:              # torch has no negative steps: ONNX's bounds are Python's, so let range() pick them
            backwards.append((a, torch.tensor(list(range(size)[slice(s, e, st)]), dtype=torch.long)))
    x = x[tuple(index)]
    for a, picked in backwards:
        x = torch.index_select(x, a, picked.to(x.device))
    return x


@op("Gather")
def _gather(m, at, x, idx):
    axis = at.get("axis", 0) % x.dim()
    flat = idx.reshape(-1).long()
    flat = torch.where(flat < 0, flat + x.shape[axis], flat)       # ONNX counts negative indices from the end
    return torch.index_select(x, axis, flat).reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


@op("Shape")
def _shape(m, at, x):
    return torch.tensor(x.shape[at.get("start", 0):at.get("end", x.dim())], dtype=torch.int64)


@op("Softmax")
def _softmax(m, at, x):
    return torch.softmax(x, at.get("axis", -1))


@op("LogSoftmax")
def _logsoftmax(m, at, x):
    return torch.log_softmax(x, at.get("axis", -1))


@op("Dropout")
def _dropout(m, at, x, ratio=None, training_mode=None):
    p = float(ratio) if ratio is not None else at.get("ratio", 0.5)
    return F.dropout(x, p, training=m.training)


@op("Identity")
def _identity(m, at, x):
    return x


ONNX_TO_TORCH = {1: torch.float32, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16, 6: torch.int32,
                 7: torch.int64, 9: torch.bool}


@op("Cast")
def _cast(m, at, x):
    target = ONNX_TO_TORCH[at["to"]]
    # computation stays in float32 (float64 members stay float64) inside the bridge
    return x if x.is_floating_point() and target.is_floating_point else x.to(target)


@op("Clip")
def _clip(m, at, x, lo=None, hi=None):
    lo = lo if lo is not None else at.get("min")
    hi = hi if hi is not None else at.get("max")
    return torch.clamp(x, min=lo, max=hi)


@op("PRelu")
def _prelu(m, at, x, slope):
    return torch.where(x >= 0, x, x * slope)


def _reducer(fn):
    def reduce(m, at, x, axes=None):
        axes = _axes(at, axes)
        dims = tuple(range(x.dim())) if axes is None else tuple(axes)
        return fn(x, dim=dims, keepdim=bool(at.get("keepdims", 1)))
    return reduce


OPS.update({"ReduceMean": _reducer(torch.mean), "ReduceSum": _reducer(torch.sum),
            "ReduceMax": _reducer(torch.amax)})


def _binary(fn):
    return lambda m, at, a, b: fn(a, b)


def _div(a, b):
    """ONNX Div of integers (shape arithmetic) truncates; torch.div would return floats."""
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return torch.div(a, b)


def _unary(fn):
    return lambda m, at, x: fn(x)


OPS.update({
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(_div),
    "Pow": _binary(torch.pow), "Max": _binary(torch.maximum), "Min": _binary(torch.minimum),
    "Where": lambda m, at, c, a, b: torch.where(c, a, b), "Equal": _binary(torch.eq),
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Abs": _unary(torch.abs), "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt),
    "Erf": _unary(torch.erf), "Neg": _unary(torch.neg), "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Sign": _unary(torch.sign),
    "Softsign": _unary(F.softsign), "Mish": _unary(F.mish), "HardSwish": _unary(F.hardswish),
    "LeakyRelu": lambda m, at, x: F.leaky_relu(x, at.get("alpha", 0.01)),
    "Elu": lambda m, at, x: F.elu(x, at.get("alpha", 1.0)),
    "Celu": lambda m, at, x: F.celu(x, at.get("alpha", 1.0)),
    "Selu": lambda m, at, x: at.get("gamma", 1.0507009873554805) * torch.where(
        x > 0, x, at.get("alpha", 1.6732632423543772) * (torch.exp(x) - 1)),
    "Softplus": _unary(F.softplus),
    "Gelu": lambda m, at, x: F.gelu(x, approximate="tanh" if at.get("approximate", b"none") in (b"tanh", "tanh")
                                     else "none"),
    "HardSigmoid": lambda m, at, x: torch.clamp(at.get("alpha", 0.2) * x + at.get("beta", 0.5), 0, 1),
    "ThresholdedRelu": lambda m, at, x: torch.where(x > at.get("alpha", 1.0), x, torch.zeros_like(x)),
})


# ---- ops of exported transformers: masks, positions, pooling (torch.onnx both exporters, optimum)

def _shape_list(shape) -> list[int]:
    return [int(s) for s in shape.tolist()]


@op("Expand")
def _expand(m, at, x, shape):
    return torch.broadcast_to(x, torch.broadcast_shapes(tuple(x.shape), tuple(_shape_list(shape))))


@op("ConstantOfShape")
def _constant_of_shape(m, at, shape):
    value = onnx.numpy_helper.to_array(at["value"]).copy() if "value" in at else np.zeros(1, np.float32)
    return torch.full(_shape_list(shape), value.reshape(-1)[0].item(), dtype=torch.from_numpy(value).dtype)


@op("Range")
def _range(m, at, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@op("Mod")
def _mod(m, at, a, b):
    return torch.fmod(a, b) if at.get("fmod", 0) else torch.remainder(a, b)


@op("CumSum")
def _cumsum(m, at, x, axis):
    dim = int(axis.reshape(-1)[0])
    if at.get("reverse", 0):
        x = x.flip(dim)
    out = torch.cumsum(x, dim)
    if at.get("exclusive", 0):
        out = out - x
    return out.flip(dim) if at.get("reverse", 0) else out


@op("Pad")
def _pad(m, at, x, pads, value=None, axes=None):
    pads = _shape_list(pads)
    axes = list(range(x.dim())) if axes is None else [int(a) % x.dim() for a in axes.tolist()]
    half = len(pads) // 2
    full = [0] * (2 * x.dim())
    for i, a in enumerate(axes):
        full[a], full[x.dim() + a] = pads[i], pads[half + i]
    torch_pads = [p for a in reversed(range(x.dim())) for p in (full[a], full[x.dim() + a])]
    mode = at.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "constant":
        return F.pad(x, torch_pads, value=0.0 if value is None or value.numel() == 0 else value.item())
    return F.pad(x, torch_pads, mode={"edge": "replicate", "reflect": "reflect", "wrap": "circular"}[mode])


@op("GatherND")
def _gather_nd(m, at, data, idx):
    b = at.get("batch_dims", 0)
    k = idx.shape[-1]
    d = data.reshape(-1, *data.shape[b:])
    i = idx.reshape(d.shape[0], -1, k)
    batch = torch.arange(d.shape[0], device=data.device).view(-1, 1).expand(-1, i.shape[1])
    out = d[(batch, *[i[..., j] for j in range(k)])]
    return out.reshape(*idx.shape[:-1], *data.shape[b + k:])


@op("ArgMax")
def _argmax(m, at, x):
    dim = at.get("axis", 0)
    if at.get("select_last_index", 0):
        flipped = torch.argmax(x.flip(dim), dim, keepdim=bool(at.get("keepdims", 1)))
        return x.shape[dim] - 1 - flipped
    return torch.argmax(x, dim, keepdim=bool(at.get("keepdims", 1)))


OPS.update({
    "ReduceL2": lambda m, at, x, axes=None: torch.sqrt(_reducer(torch.sum)(m, at, x * x, axes)),
    "IsNaN": _unary(torch.isnan), "Not": _unary(torch.logical_not), "Cos": _unary(torch.cos),
    "Sin": _unary(torch.sin), "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or),
    "Less": _binary(torch.lt), "Greater": _binary(torch.gt), "LessOrEqual": _binary(torch.le),
    "GreaterOrEqual": _binary(torch.ge),
})
