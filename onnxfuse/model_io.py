"""Loading members, checking that they share one architecture, tensor access, atomic saving."""
from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import IncompatibleMembersError, InputError, OutputError

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul"}
# Protobuf cannot serialize a message over 2 GiB: larger outputs go to one external data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


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


def load_member(source, index: int = 0) -> Member:
    """Load a path or ModelProto, with external data, and refuse what onnxfuse cannot fuse."""
    if isinstance(source, onnx.ModelProto):
        name = source.graph.name or f"<model {index}>"
        data = source.SerializeToString(deterministic=True)
        digest = hashlib.sha256(data).hexdigest()
        model, tensors = parse_model(data, name)
        member = Member(name, model, tensors, digest)
    else:
        path = Path(source)
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if not path.is_file():
            raise InputError(f"{path}: not a regular file")
        with ThreadPoolExecutor(1) as pool:       # hashing releases the GIL: it overlaps with parsing
            digest = pool.submit(_sha256, path)
            model, tensors = parse_model(path, str(path), path.resolve().parent)
            member = Member(str(path), model, tensors, digest.result(), path)
    member.tensors = unshare_constants(member.model, member.tensors)
    _refuse_unsupported(member)
    return member


def unshare_constants(model: onnx.ModelProto, tensors: "TensorTable") -> "TensorTable":
    """Give every layer its own tensors: the legacy torch exporter stores initializers with equal values once
    and feeds the other users through `Identity` nodes (e.g. every zero bias of one width), so one stored tensor
    would stand for unrelated layers, fused or not. Each Identity of a constant becomes an initializer of its
    own (the same values; the array is shared, not copied) and the node goes; the new exporter reads such a
    tensor directly from several nodes, so a 1-D float initializer read more than once gets a copy per further
    use. Same result in every member, whichever of its tensors happen to be equal."""
    graph, constants = model.graph, {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in graph.output}
    kept, sources = [], set()
    for node in graph.node:
        source = node.input[0] if node.op_type == "Identity" and node.domain in ("", "ai.onnx") else None
        if source in constants and node.output[0] not in outputs and node.output[0] not in constants:
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
            if t is None or x in inputs or len(t.dims) != 1 or t.data_type not in FLOAT_TYPES:
                continue
            if x not in seen:
                seen.add(x)
                continue
            copy = graph.initializer.add()
            copy.CopyFrom(t)
            copy.name = _fresh(f"{x}__{node.name or node.output[0]}", constants)
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


def _fresh(name: str, taken) -> str:
    out, k = name, 1
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_model(source: bytes | Path, name: str, folder: Path | None = None) -> tuple[onnx.ModelProto, "TensorTable"]:
    """Parse serialized ONNX (bytes, or a file) without its float weight data, which is read into one numpy
    array per tensor: each weight is read once, and each can be freed on its own.

    External data is read from files inside `folder` only (never from elsewhere).
    """
    with (open(source, "rb") if isinstance(source, Path) else io.BytesIO(source)) as f:
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
                span = _external_span(t, name, folder)
            if span is None:
                continue
            offset, length = span[:2]
            data = _read(span[2] if len(span) > 2 else f, offset, length)
            if t.data_type not in FLOAT_TYPES:
                t.raw_data = data
                continue
            dtype = _little(np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)))
            if length != int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize:
                raise InputError(f"{name}: initializer '{t.name}' holds {length} bytes for shape {list(t.dims)}")
            arrays[t.name] = np.frombuffer(data, dtype=dtype).reshape(tuple(t.dims))
    return model, TensorTable(model.graph, arrays)


def _read(source, offset: int, length: int) -> bytes:
    if isinstance(source, Path):
        with open(source, "rb") as f:
            return _read(f, offset, length)
    source.seek(offset)
    data = source.read(length)
    if len(data) != length:
        raise InputError(f"truncated data: {length} bytes expected at offset {offset}, found {len(data)}")
    return data


def _external_span(t: TensorProto, name: str, folder: Path | None):
    """(offset, length, file) of an external tensor, refusing files outside the model's folder."""
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    if not isinstance(location, str):      # protobuf hands back bytes for invalid UTF-8
        raise InputError(f"{name}: tensor '{t.name}' has a malformed external data location")
    if folder is None:
        raise InputError(f"{name}: tensor '{t.name}' has external data; pass the model's path instead")
    target = (folder / location).resolve()
    if not location or os.path.isabs(location) or folder not in target.parents:
        raise InputError(f"{name}: tensor '{t.name}' points to external data '{location}' outside the model's "
                         f"folder; refused")
    if not target.is_file():
        raise InputError(f"{name}: external data file '{location}' of tensor '{t.name}' is missing")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else target.stat().st_size - offset
    except ValueError:
        raise InputError(f"{name}: tensor '{t.name}' has a malformed external data offset/length") from None
    if offset < 0 or length < 0 or offset + length > target.stat().st_size:
        raise InputError(f"{name}: external data of tensor '{t.name}' lies beyond the end of '{location}'")
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT
    return offset, length, target


# Protobuf wire format: split the weight bytes out of a serialized model without reading them.
def _read_varint(f) -> int:
    result = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise ValueError("truncated varint")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(f, start: int, end: int):
    """(field number, wire type, value start, value end, field start, field end) of each field in [start, end)."""
    pos = start
    while pos < end:
        f.seek(pos)
        key = _read_varint(f)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _read_varint(f)
            value_start = value_end = f.tell()
        elif wire in (1, 5):
            value_start = f.tell()
            value_end = value_start + (8 if wire == 1 else 4)
        elif wire == 2:
            length = _read_varint(f)
            value_start = f.tell()
            value_end = value_start + length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if value_end > end:
            raise ValueError("truncated message")
        yield number, wire, value_start, value_end, pos, value_end
        pos = value_end


def _copy(f, start: int, end: int) -> bytes:
    f.seek(start)
    return f.read(end - start)


def _strip_raw_data(f) -> tuple[bytes, list]:
    """The model's bytes without the raw_data of graph initializers, and each initializer's (offset, length)."""
    size = f.seek(0, io.SEEK_END)
    model, spans = bytearray(), []
    for number, wire, vs, ve, fs, fe in list(_fields(f, 0, size)):
        if number != 7 or wire != 2:                       # ModelProto.graph
            model += _copy(f, fs, fe)
            continue
        graph = bytearray()
        for g_number, g_wire, g_vs, g_ve, g_fs, g_fe in list(_fields(f, vs, ve)):
            if g_number != 5 or g_wire != 2:               # GraphProto.initializer
                graph += _copy(f, g_fs, g_fe)
                continue
            tensor, span = bytearray(), None
            for t_number, t_wire, t_vs, t_ve, t_fs, t_fe in list(_fields(f, g_vs, g_ve)):
                if t_number == 9 and t_wire == 2:          # TensorProto.raw_data
                    span = (t_vs, t_ve - t_vs)
                else:
                    tensor += _copy(f, t_fs, t_fe)
            spans.append(span)
            graph += _len_prefix(5, len(tensor)) + tensor
        model += _len_prefix(7, len(graph)) + graph
    return bytes(model), spans


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
    for t in model.graph.initializer:
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
        if t.data_type in FLOAT_TYPES and t.name not in member.tensors.arrays:
            held = len(t.float_data) + len(t.double_data) + len(t.int32_data)
            if held != int(np.prod(t.dims, dtype=np.int64)):
                raise ValueError(f"initializer '{t.name}' holds {held} values for shape {list(t.dims)}")
    for v in member.model.graph.value_info:
        if v.name in types and v.type.tensor_type.elem_type not in (0, types[v.name]):
            raise ValueError(f"value_info of '{v.name}' has element type {v.type.tensor_type.elem_type}, the "
                             f"initializer {types[v.name]}")
        if v.name in dims and v.type.tensor_type.HasField("shape"):
            annotated = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            if len(annotated) != len(dims[v.name]) or any(a not in (None, b) for a, b in zip(annotated, dims[v.name])):
                raise ValueError(f"value_info of '{v.name}' says {annotated}, the initializer has {dims[v.name]}")


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
        value = np.ascontiguousarray(array.astype(np_dtype, copy=False))
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


def _little(dtype: np.dtype) -> np.dtype:
    return dtype if dtype.byteorder in "<|" or (dtype.byteorder == "=" and sys.byteorder == "little") \
        else dtype.newbyteorder("<")


def _little_endian(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=_little(array.dtype))


def _copy_field(target, fd, value) -> None:
    if fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED:
        getattr(target, fd.name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(target, fd.name).CopyFrom(value)
    else:
        setattr(target, fd.name, value)


# ----------------------------------------------------------------------------- compatibility

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
    if _opsets(ref.model) != _opsets(other.model):
        raise IncompatibleMembersError(f"opsets differ: {_opsets(ref.model)} in {ref.name}, "
                                       f"{_opsets(other.model)} in {other.name}")
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
    return names


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {o.domain or "ai.onnx": o.version for o in model.opset_import}


def _attrs(node: onnx.NodeProto) -> list:
    return sorted((a.name, helper.get_attribute_value(a)) for a in node.attribute
                  if a.type != onnx.AttributeProto.TENSOR)


# ----------------------------------------------------------------------------- output

def check_output_path(output, inputs=(), force: bool = False) -> Path:
    """Fail early, before any work, if the output cannot or must not be written."""
    out = Path(output)
    resolved = out.resolve()
    for source in inputs:
        if not isinstance(source, onnx.ModelProto) and Path(source).resolve() in (resolved, resolved.with_name(
                resolved.name + ".data")):
            raise OutputError(f"{out}: the output would overwrite the input {source}")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory")
    if not resolved.parent.is_dir():
        raise OutputError(f"{out}: folder {resolved.parent} does not exist")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (use --force to overwrite)")
    return out


def save_model(model: onnx.ModelProto, output, force: bool = False, tensors: TensorTable | None = None,
               check=None) -> Path:
    """Write atomically: into a temporary folder beside the output, then rename into place. `check(path)` is
    called on the complete temporary file before the rename (the runtime guard): if it raises, nothing is written.

    `tensors` holds detached weight data (see TensorTable.detach): it is streamed into the file, never
    assembled into one protobuf in memory. Outputs above EXTERNAL_DATA_THRESHOLD go to `<name>.data`
    beside the output (one file, relative location); smaller ones are one self-contained file.
    """
    out = Path(output)
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (use --force to overwrite)")
    tensors = tensors or TensorTable(model.graph)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
    try:
        if tensors.nbytes() + model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            model = _write_external(model, tensors, tmp / (out.name + ".data"), out.name + ".data")
            with open(tmp / out.name, "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
            if check is not None:
                check(tmp / out.name)
            os.replace(tmp / (out.name + ".data"), out.with_name(out.name + ".data"))
        else:
            with open(tmp / out.name, "wb") as f:
                _write_streaming(f, model, tensors)
            if check is not None:
                check(tmp / out.name)
        os.replace(tmp / out.name, out)
    finally:
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()
    return out


def _write_external(model, tensors: TensorTable, data_path: Path, location: str) -> onnx.ModelProto:
    """Every detached tensor into one data file (4 KiB aligned); returns the model pointing at it."""
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    offset = 0
    with open(data_path, "wb") as f:
        for t in model_copy.graph.initializer:
            if t.name not in tensors.arrays:
                continue
            data = memoryview(_little_endian(tensors.arrays[t.name])).cast("B")
            pad = -offset % 4096
            f.write(b"\0" * pad)
            offset += pad
            f.write(data)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                t.external_data.add(key=key, value=value)
            offset += len(data)
    return model_copy


# Protobuf wire format, for streaming tensors into the file in the order a serializer would write them.
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_prefix(field_number: int, length: int) -> bytes:
    return _varint(field_number << 3 | 2) + _varint(length)


def _split_fields(message, field_number: int) -> tuple[bytes, bytes]:
    """The message's fields numbered below and above `field_number`, serialized (fields in number order)."""
    before, after = type(message)(), type(message)()
    for fd, value in message.ListFields():
        if fd.number < field_number:
            _copy_field(before, fd, value)
        elif fd.number > field_number:
            _copy_field(after, fd, value)
    return before.SerializeToString(deterministic=True), after.SerializeToString(deterministic=True)


def _write_streaming(f, model: onnx.ModelProto, tensors: TensorTable) -> None:
    """Write exactly the bytes of tensors.materialize(model).SerializeToString(), one tensor at a time."""
    RAW_DATA, INITIALIZER, GRAPH = 9, 5, 7
    pieces, size = [], 0     # the initializer entries: bytes and arrays, in order
    for t in model.graph.initializer:
        array = tensors.arrays.get(t.name)
        if array is None or not array.size:       # an empty bytes field is not written at all
            body = [t.SerializeToString(deterministic=True)]
        else:
            head_before, head_after = _split_fields(t, RAW_DATA)
            data = memoryview(_little_endian(array)).cast("B")
            body = [head_before, _len_prefix(RAW_DATA, len(data)), data, head_after]
        length = sum(len(b) for b in body)
        pieces += [_len_prefix(INITIALIZER, length), *body]
        size += len(pieces[-len(body) - 1]) + length
    graph_before, graph_after = _split_fields(model.graph, INITIALIZER)
    graph_length = len(graph_before) + size + len(graph_after)
    model_before, model_after = _split_fields(model, GRAPH)
    for piece in (model_before, _len_prefix(GRAPH, graph_length), graph_before, *pieces, graph_after, model_after):
        f.write(piece)
