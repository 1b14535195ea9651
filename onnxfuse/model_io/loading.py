"""Loading members and models: the wire scan's weights as numpy arrays, external data confined to the model's
folder, every stored size checked before it is read, `TensorTable`, and the refusal of what cannot be fused."""
from __future__ import annotations

import hashlib
import io
import math
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import InputError
from .wire import _little, _little_endian, _strip_raw_data

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul"}


@dataclass
class Member:
    """One input model: its graph without weight data (`model`) and its weights as numpy arrays (`tensors`).

    Each weight is one numpy array read straight from the file: one copy of it, which can be freed on its own,
    and protobuf's arena (which keeps replaced tensor data alive until the whole message is freed) never
    holds it.
    """
    name: str
    model: onnx.ModelProto
    tensors: "TensorTable"
    sha256: str
    path: Path | None = None
    files: set = field(default_factory=set)     # every file it was read from (resolved): the .onnx, external data


def load_member(source, index: int = 0) -> Member:
    """Load a path or ModelProto, with external data, and refuse what onnxfuse cannot fuse."""
    if isinstance(source, onnx.ModelProto):
        name = source.graph.name or f"<model {index}>"
        data = source.SerializeToString(deterministic=True)
        digest = hashlib.sha256(data).hexdigest()
        model, tensors = parse_model(data, name)
        member = Member(name, model, tensors, digest)
    else:
        path = _model_path(source)
        files = {path.resolve()}
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:       # hashing releases the GIL: it overlaps with parsing
            digest = pool.submit(_sha256, path, stop)
            try:
                model, tensors = parse_model(path, str(path), path.resolve().parent, files)
            except BaseException:
                stop.set()                        # a refused file is not hashed to its end
                raise
            member = Member(str(path), model, tensors, digest.result(), path, files)
    member.tensors = unshare_constants(member.model, member.tensors)
    drop_identity_gathers(member.model, member.tensors)
    einsum_as_matmul(member.model)
    _refuse_unsupported(member)
    return member


def read_model(source, files: set | None = None) -> onnx.ModelProto:
    """A complete ModelProto (weights included) from a path, read with the same checks as load_member
    (external data confined to the model's folder, sizes bounded); a ModelProto is returned as it is.
    The files read are added to `files`."""
    if isinstance(source, onnx.ModelProto):
        return source
    path = _model_path(source)
    if files is not None:
        files.add(path.resolve())
    model, tensors = parse_model(path, str(path), path.resolve().parent, files)
    return tensors.materialize(model)


def _model_path(source) -> Path:
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"expected a model path or an onnx.ModelProto, got {type(source).__name__}"
                         + (" (load bytes with onnx.load_from_string first)" if isinstance(source, bytes) else ""))
    path = Path(source)
    try:
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if not path.is_file():
            raise InputError(f"{path}: not a regular file")
    except (OSError, ValueError) as exc:
        raise InputError(f"{str(path)[:200]!r}: not a usable path ({getattr(exc, 'strerror', None) or exc})") from None
    return path


def unshare_constants(model: onnx.ModelProto, tensors: "TensorTable") -> "TensorTable":
    """Give every layer its own tensors: the legacy torch exporter stores initializers with equal values once
    and feeds the other users through `Identity` nodes (e.g. every zero bias of one width), so one stored tensor
    would stand for unrelated layers, fused or not. Each Identity of a constant becomes an initializer of its
    own (the same values; the array is shared, not copied) and the node goes; the new exporter reads such a
    tensor directly from several nodes, so a 1-D float initializer read more than once gets a copy per further
    use. Same result in every member, whichever of its tensors happen to be equal.

    Only tensors whose elements are all equal (zeros, ones: the fresh biases and normalization parameters that
    exporters deduplicate between unrelated layers) are copied. Any other tensor that several nodes read is a
    real tie (ALBERT's shared layers, a tied embedding): it stays one tensor, and the analysis cuts it the same
    way for every use."""
    graph, constants = model.graph, {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in graph.output}
    kept, sources = [], set()
    for node in graph.node:
        source = node.input[0] if node.op_type == "Identity" and node.domain in ("", "ai.onnx") else None
        if source in constants and node.output[0] not in outputs and node.output[0] not in constants \
                and _uniform(tensors, source):
            copy = graph.initializer.add()
            copy.CopyFrom(constants[source])
            copy.name = node.output[0]
            constants[copy.name] = copy
            sources.add(source)
            if source in tensors.arrays:
                tensors.arrays[copy.name] = tensors.arrays[source]
        else:
            kept.append(node)
    # the new exporter shares them directly: a 1-D float initializer (bias, normalization parameter) read more
    # than once gets a copy per further use (tied weight matrices stay tied)
    seen, inputs, copied = set(), {v.name for v in graph.input}, False
    for node in kept:
        for i, x in enumerate(node.input):
            t = constants.get(x)
            if t is None or x in inputs or len(t.dims) != 1 or t.data_type not in FLOAT_TYPES \
                    or not _uniform(tensors, x):
                continue
            if x not in seen:
                seen.add(x)
                continue
            copy = graph.initializer.add()
            copy.CopyFrom(t)
            copy.name = fresh_name(f"{x}__{node.name or node.output[0]}", constants)
            constants[copy.name] = copy
            if x in tensors.arrays:
                tensors.arrays[copy.name] = tensors.arrays[x]
            node.input[i] = copy.name
            copied = True
    if not sources and not copied:
        return tensors
    del graph.node[:]
    graph.node.extend(kept)
    used = {x for node in graph.node for x in node.input} | outputs | {v.name for v in graph.input}
    for i in reversed(range(len(graph.initializer))):      # a source only the Identity nodes read goes too
        name = graph.initializer[i].name
        if name in sources and name not in used:
            del graph.initializer[i]
            tensors.arrays.pop(name, None)
    return TensorTable(graph, tensors.arrays)


def drop_identity_gathers(model: onnx.ModelProto, tensors: "TensorTable") -> None:
    """The new exporter lowers some `as_strided` views (ConvNeXt's head, after its mean) to Reshape(x, [-1]) and
    a Gather of every index in order, shaped like x: the same tensor. Such pairs go (their readers read x), so
    that the channel axis does not seem to be taken apart."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    pairs = []
    for node in graph.node:
        flat = producer.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if flat is None or flat.op_type != "Reshape" or node.output[0] in outputs or \
                node.input[1] not in tensors or flat.input[1] not in tensors or \
                tensors.array(flat.input[1]).tolist() != [-1] or dict(
                    (a.name, helper.get_attribute_value(a)) for a in node.attribute).get("axis", 0) != 0:
            continue
        idx = tensors.array(node.input[1])
        if idx.dtype.kind in "iu" and np.array_equal(idx.reshape(-1), np.arange(idx.size)):
            pairs.append((flat, node, tuple(idx.shape)))
    if not pairs:
        return
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in onnx.shape_inference.infer_shapes(light_model(model)).graph.value_info}
    renamed, gone = {}, set()
    for flat, gather, shape in pairs:
        if shapes.get(flat.input[0]) != list(shape):
            continue
        renamed[gather.output[0]] = flat.input[0]
        gone.add(id(gather))
        if sum(x == flat.output[0] for n in graph.node for x in n.input) == 1:
            gone.add(id(flat))
    if not renamed:
        return
    kept = [n for n in graph.node if id(n) not in gone]
    for node in kept:
        for i, x in enumerate(node.input):
            if x in renamed:
                node.input[i] = renamed[x]
    del graph.node[:]
    graph.node.extend(kept)
    drop_unread(model, {x for flat, gather, _ in pairs for x in (flat.input[1], gather.input[1])}, tensors.arrays)


def drop_unread(model: onnx.ModelProto, names: set[str], arrays: dict | None = None) -> None:
    """The initializers and Constant nodes among `names` that no node (and no graph output) reads any more go,
    and their arrays from `arrays`: what a rewrite left behind (shape targets, folded-away parameters)."""
    graph = model.graph
    unread = set(names) - {x for node in graph.node for x in node.input} - {o.name for o in graph.output}
    if not unread:
        return
    keep = [t for t in graph.initializer if t.name not in unread]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    for i in reversed(range(len(graph.node))):
        if graph.node[i].op_type == "Constant" and graph.node[i].output[0] in unread:
            del graph.node[i]
    for name in unread if arrays is not None else ():
        arrays.pop(name, None)


def einsum_as_matmul(model: onnx.ModelProto) -> None:
    """An Einsum that is a batched matrix product ("bhid,bhjd->bhij": q times k transposed; "bhij,bhjd->bhid")
    becomes the MatMul (after a Transpose of the second input's last two axes) that other exporters write:
    the same product, in ops the analysis and the torch bridge know (torchvision's MaxViT attention)."""
    graph = model.graph
    if not any(n.op_type == "Einsum" for n in graph.node):
        return
    nodes = []
    for node in graph.node:
        eq = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "equation"), b"")
        eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
        parts = eq.replace("->", ",").split(",")
        if node.op_type != "Einsum" or len(node.input) != 2 or "->" not in eq or len(parts) != 3 or "." in eq:
            nodes.append(node)
            continue
        x, y, out = parts
        batch = x[:-2]
        if len(x) < 2 or len(x) != len(y) or len(set(x)) != len(x) or y[:-2] != batch or out[:-2] != batch \
                or len(out) != len(x):
            nodes.append(node)
            continue
        (i, k), (y1, y2), (o1, o2) = x[-2:], y[-2:], out[-2:]
        if i == o1 and y1 == k and y2 == o2 and len({i, k, o2}) == 3:          # x @ y
            other = node.input[1]
        elif i == o1 and y2 == k and y1 == o2 and len({i, k, o2}) == 3:        # x @ y^T
            other = f"{node.output[0]}__onnxfuse_transposed"
            perm = list(range(len(y) - 2)) + [len(y) - 1, len(y) - 2]
            nodes.append(helper.make_node("Transpose", [node.input[1]], [other], name=f"{node.name}_transpose",
                                          perm=perm))
        else:
            nodes.append(node)
            continue
        nodes.append(helper.make_node("MatMul", [node.input[0], other], list(node.output), name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)


def _uniform(tensors: "TensorTable", name: str) -> bool:
    value = tensors.array(name)
    return value.size > 0 and bool(np.all(value == value.reshape(-1)[0]))


def fresh_name(name: str, taken) -> str:
    out, k = name, 1
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    return out


def _sha256(path: Path, stop: threading.Event | None = None) -> str | None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            if stop is not None and stop.is_set():
                return None
            digest.update(chunk)
    return digest.hexdigest()


def parse_model(source: bytes | Path, name: str, folder: Path | None = None,
                files: set | None = None) -> tuple[onnx.ModelProto, "TensorTable"]:
    """Parse serialized ONNX (bytes, or a file) without its float weight data, which is read into one numpy
    array per tensor: each weight is read once, and each can be freed on its own.

    External data is read from files inside `folder` only (never from elsewhere), for every tensor wherever it
    lives (initializers, Constant nodes, subgraphs), and never more bytes than the tensor's shape declares.
    The files read are added to `files`.
    """
    try:
        f = open(source, "rb") if isinstance(source, Path) else io.BytesIO(source)
    except OSError as exc:
        raise InputError(f"{name}: cannot read ({exc.strerror})") from None
    with f:
        try:
            stripped, spans = _strip_raw_data(f)
            model = onnx.ModelProto.FromString(stripped)
        except Exception as exc:  # malformed wire data, DecodeError, ...
            raise InputError(f"{name}: not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not model.graph.node:
            raise InputError(f"{name}: not an ONNX model (the graph has no nodes)")
        arrays = {}
        for t, span in zip(model.graph.initializer, spans):
            if t.data_location == TensorProto.EXTERNAL:
                span = _external_span(t, name, folder, files)
            if span is None:
                continue
            offset, length = span[:2]
            _check_length(t, length, name)
            data = _read(span[2] if len(span) > 2 else f, offset, length, name)
            if t.data_type not in FLOAT_TYPES:
                t.raw_data = data
                continue
            dtype = _little(np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)))
            arrays[t.name] = np.frombuffer(data, dtype=dtype).reshape(tuple(t.dims))
        for t in nested_tensors(model.graph, functions=model.functions):
            if t.data_location == TensorProto.EXTERNAL:
                offset, length, target = _external_span(t, name, folder, files)
                _check_length(t, length, name)
                t.raw_data = _read(target, offset, length, name)
    return model, TensorTable(model.graph, arrays)


def nested_tensors(graph: onnx.GraphProto, top: bool = True, functions=()):
    """Every TensorProto of a graph but its own initializers: Constant values and other tensor attributes,
    sparse tensors, and everything inside subgraphs (their initializers included) and in `functions` (the
    model's FunctionProtos)."""
    if not top:
        yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)
    for function in functions:
        yield from _node_tensors(function.node)


def _node_tensors(nodes):
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            for sparse in attr.sparse_tensors:
                yield from (sparse.values, sparse.indices)
            if attr.HasField("g"):
                yield from nested_tensors(attr.g, False)
            for g in attr.graphs:
                yield from nested_tensors(g, False)


PACKED_4BIT = {TensorProto.INT4, TensorProto.UINT4, TensorProto.FLOAT4E2M1}
PACKED_2BIT = {getattr(TensorProto, n) for n in ("INT2", "UINT2") if hasattr(TensorProto, n)}


def tensor_nbytes(t: TensorProto) -> int | None:
    """Bytes of the tensor's raw data as its type and shape declare them (None for strings); exact Python
    integers, so absurd shapes cannot overflow into a plausible size."""
    if any(d < 0 for d in t.dims):
        raise ValueError(f"tensor '{t.name}' has negative dimensions {list(t.dims)}")
    count = math.prod(t.dims)
    if t.data_type == TensorProto.STRING:
        return None
    if t.data_type in PACKED_4BIT:
        return (count + 1) // 2
    if t.data_type in PACKED_2BIT:
        return (count + 3) // 4
    try:
        return count * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        raise ValueError(f"tensor '{t.name}' has an unknown data type {t.data_type}") from None


def _check_length(t: TensorProto, length: int, name: str) -> None:
    """Before reading: the stored bytes must be exactly what the tensor's type and shape declare."""
    try:
        expected = tensor_nbytes(t)
    except ValueError as exc:
        raise InputError(f"{name}: {exc}") from None
    if expected is None:
        raise InputError(f"{name}: string tensor '{t.name}' cannot hold raw or external data")
    if length != expected:
        raise InputError(f"{name}: tensor '{t.name}' holds {length} bytes for shape {list(t.dims)} "
                         f"({expected} expected)")


def _read(source, offset: int, length: int, name: str = "") -> bytes:
    if isinstance(source, Path):
        try:
            with open(source, "rb") as f:
                return _read(f, offset, length, name)
        except OSError as exc:
            raise InputError(f"{name}: cannot read external data file '{source.name}' ({exc.strerror})") from None
    source.seek(offset)
    data = source.read(length)
    if len(data) != length:
        raise InputError(f"{name}: truncated data: {length} bytes expected at offset {offset}, found {len(data)}")
    return data


def _external_span(t: TensorProto, name: str, folder: Path | None, files: set | None = None):
    """(offset, length, file) of an external tensor, refusing files outside the model's folder."""
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    if not isinstance(location, str) or "\0" in location or len(location) > 4096:
        raise InputError(f"{name}: tensor '{t.name}' has a malformed external data location")
    if folder is None:
        raise InputError(f"{name}: tensor '{t.name}' has external data; pass the model's path instead")
    shown = location if len(location) <= 200 else location[:200] + "..."
    try:
        target = (folder / location).resolve()
        inside = location and not os.path.isabs(location) and folder in target.parents
        mode = target.stat().st_mode if inside else None
    except FileNotFoundError:
        raise InputError(f"{name}: external data file '{shown}' of tensor '{t.name}' is missing") from None
    except (OSError, RuntimeError) as exc:           # a symlink loop, a name too long, ...
        why = getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"{name}: external data '{shown}' of tensor '{t.name}' cannot be used ({why})") from None
    if not inside:
        raise InputError(f"{name}: tensor '{t.name}' points to external data '{shown}' outside the model's "
                         f"folder; refused")
    if not stat.S_ISREG(mode):
        raise InputError(f"{name}: external data '{shown}' of tensor '{t.name}' is not a regular file")
    size = target.stat().st_size
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else size - offset
    except ValueError:
        raise InputError(f"{name}: tensor '{t.name}' has a malformed external data offset/length") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise InputError(f"{name}: external data of tensor '{t.name}' lies beyond the end of '{shown}'")
    if files is not None:
        files.add(target)
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT
    return offset, length, target


def light_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with float initializers turned into typed graph inputs: cheap to check and to infer shapes on
    (the weights' own sizes are checked by _check_weights)."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    listed = {v.name for v in model.graph.input}      # IR < 4 lists initializers as graph inputs too
    for t in model.graph.initializer:
        if t.data_type in FLOAT_TYPES and t.name in listed:
            continue
        if t.data_type in FLOAT_TYPES:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            graph.initializer.add().CopyFrom(t)
    return light


def _refuse_unsupported(member: Member) -> None:
    try:
        onnx.checker.check_model(light_model(member.model), full_check=True)
        _check_weights(member)
    except Exception as exc:
        raise InputError(f"{member.name}: invalid ONNX model ({str(exc).splitlines()[0][:300]})") from None
    for node in member.model.graph.node:
        if node.op_type in QUANTIZED_OPS:
            raise InputError(f"{member.name}: quantized model (node '{node.name}', op {node.op_type}) is not "
                             f"supported; fuse the float model, then quantize the result")
    if not any(member.tensors.dtype(n) in FLOAT_TYPES for n in member.tensors.names()):
        raise InputError(f"{member.name}: the model has no floating-point weights; integer-only models "
                         f"cannot be fused")


def _check_weights(member: Member) -> None:
    """What the checker cannot see on the weight-less copy: every float weight has data of its shape, and
    shape annotations of weights agree with them."""
    dims, types = {}, {}
    for t in member.model.graph.initializer:
        dims[t.name], types[t.name] = list(t.dims), t.data_type
        if t.name not in member.tensors.arrays:
            _check_tensor(t)
    for t in nested_tensors(member.model.graph, functions=member.model.functions):
        _check_tensor(t)
    for v in member.model.graph.value_info:
        if v.name in types and v.type.tensor_type.elem_type not in (0, types[v.name]):
            raise ValueError(f"value_info of '{v.name}' has element type {v.type.tensor_type.elem_type}, the "
                             f"initializer {types[v.name]}")
        if v.name in dims and v.type.tensor_type.HasField("shape"):
            annotated = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            if len(annotated) != len(dims[v.name]) or any(a not in (None, b) for a, b in zip(annotated, dims[v.name])):
                raise ValueError(f"value_info of '{v.name}' says {annotated}, the initializer has {dims[v.name]}")


VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _check_tensor(t: TensorProto) -> None:
    """The tensor's values fill its shape exactly, in the one field its data type keeps them in."""
    nbytes = tensor_nbytes(t)                   # refuses negative dimensions and unknown types
    if t.HasField("raw_data"):
        if nbytes is not None and len(t.raw_data) != nbytes:
            raise ValueError(f"tensor '{t.name}' holds {len(t.raw_data)} bytes for shape {list(t.dims)}")
        return
    storage = helper.tensor_dtype_to_field(t.data_type)
    wrong = [f for f in VALUE_FIELDS if f != storage and len(getattr(t, f))]
    if wrong:
        raise ValueError(f"tensor '{t.name}' of type {helper.tensor_dtype_to_string(t.data_type)} holds its "
                         f"values in {wrong[0]} (expected {storage})")
    count, held = math.prod(t.dims), len(getattr(t, storage))
    if t.data_type in PACKED_4BIT | PACKED_2BIT:
        count = (count + 1) // 2 if t.data_type in PACKED_4BIT else (count + 3) // 4
    elif t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        count *= 2
    if held != count:
        raise ValueError(f"tensor '{t.name}' holds {held} values for shape {list(t.dims)}")


class TensorTable:
    """Every constant tensor of a graph by value name: initializers and outputs of Constant nodes.

    Float initializers stored as raw data may be *detached*: their values live in `arrays` and the graph's
    TensorProto keeps only name, type and shape; `materialize` and `save_model` put the data back.
    """

    def __init__(self, graph: onnx.GraphProto, arrays: dict[str, np.ndarray] | None = None):
        self._init = {t.name: t for t in graph.initializer}
        self._const = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
        self.arrays = dict(arrays or {})

    @classmethod
    def detach(cls, model: onnx.ModelProto) -> tuple[onnx.ModelProto, "TensorTable"]:
        """A copy of `model` without float weight data, and a table holding that data as arrays."""
        return parse_model(model.SerializeToString(deterministic=True), model.graph.name or "model")

    def names(self):
        return list(self._init) + list(self._const)

    def __contains__(self, name: str) -> bool:
        return name in self._init or name in self._const

    def proto(self, name: str) -> TensorProto | None:
        if name in self._init:
            return self._init[name]
        attr = self._const[name].attribute[0]
        return attr.t if attr.name == "value" else None

    def dtype(self, name: str) -> int:
        proto = self.proto(name)
        if proto is not None:
            return proto.data_type
        attr = self._const[name].attribute[0]
        return TensorProto.FLOAT if attr.name.startswith("value_float") else TensorProto.INT64

    def shape(self, name: str) -> tuple[int, ...]:
        proto = self.proto(name)
        return tuple(proto.dims) if proto is not None else self.array(name).shape

    def array(self, name: str) -> np.ndarray:
        """The tensor's value (read-only: never modify it in place)."""
        if name in self.arrays:
            return self.arrays[name]
        proto = self.proto(name)
        if proto is not None:
            return numpy_helper.to_array(proto)
        return np.asarray(helper.get_attribute_value(self._const[name].attribute[0]))

    def set(self, name: str, array: np.ndarray) -> None:
        """Replace a tensor's value, keeping its name and data type."""
        proto = self.proto(name)
        if proto is None:  # Constant with value_ints / value_floats
            attr = self._const[name].attribute[0]
            values = array.reshape(-1).tolist()
            if attr.name in ("value_int", "value_float"):
                setattr(attr, attr.name[6:], values[0])
            else:
                field_name = attr.name[6:]
                del getattr(attr, field_name)[:]
                getattr(attr, field_name).extend(values)
            return
        np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(proto.data_type))
        value = np.ascontiguousarray(array.astype(np_dtype, copy=False)).reshape(np.shape(array))  # 0-d stays 0-d
        if name in self.arrays:
            self.arrays[name] = value
            del proto.dims[:]
            proto.dims.extend(value.shape)
        else:
            proto.CopyFrom(numpy_helper.from_array(value, proto.name))

    def materialize(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A complete copy of `model` (whose tensors this table describes) with the weight data put back."""
        full = onnx.ModelProto()
        full.CopyFrom(model)
        for t in full.graph.initializer:
            if t.name in self.arrays:
                t.raw_data = _little_endian(self.arrays[t.name]).tobytes()
        return full

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())
