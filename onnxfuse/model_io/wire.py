"""The protobuf wire format, read and written by hand: weights are cut out of a serialized model without being
parsed (each becomes one numpy array), and written back in the byte order protobuf itself would use."""
from __future__ import annotations

import io
import sys

import numpy as np

# A bound on any one repeated field of a graph (nodes, value_info, initializers, ...) and on a model's top-level
# fields: the largest real graphs have some 10^5 nodes; a file of millions of tiny fields is refused before
# protobuf allocates a message for each (about 500 bytes apiece).
MAX_ENTRIES = 1_000_000


class _Window:
    """Bytes of a file read through a 64 KiB window: walking many small fields costs no system call each."""

    def __init__(self, f):
        self.f, self.base, self.buf = f, 0, b""

    def varint(self, pos: int) -> tuple[int, int]:
        """(value, position after it) of the varint at `pos`."""
        i = pos - self.base
        if 0 <= i < len(self.buf) and self.buf[i] < 0x80:      # the common case: one byte in the window
            return self.buf[i], pos + 1
        result = shift = 0
        while True:
            i = pos - self.base
            if not 0 <= i < len(self.buf):
                self.f.seek(pos)
                self.base, self.buf, i = pos, self.f.read(1 << 16), 0
                if not self.buf:
                    raise ValueError("truncated varint")
            byte = self.buf[i]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result, pos
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")


def _fields(f, start: int, end: int):
    """(field number, wire type, value start, value end, field start, field end) of each field in [start, end)."""
    window = _Window(f)
    pos = start
    while pos < end:
        key, value_start = window.varint(pos)
        number, wire = key >> 3, key & 7
        if number == 0:                    # never valid protobuf (e.g. a file of zero bytes): stop at once
            raise ValueError(f"field number 0 at byte {pos}")
        if wire == 0:
            _, value_start = window.varint(value_start)
            value_end = value_start
        elif wire in (1, 5):
            value_end = value_start + (8 if wire == 1 else 4)
        elif wire == 2:
            length, value_start = window.varint(value_start)
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
    """The model's bytes without the raw_data of graph initializers, and each initializer's (offset, length).

    Fields kept as they are are copied in runs (one read per run of fields, not one per field)."""
    size = f.seek(0, io.SEEK_END)
    model, spans, run = bytearray(), [], 0
    for count, (number, wire, vs, ve, fs, fe) in enumerate(_fields(f, 0, size)):
        if count > MAX_ENTRIES:
            raise ValueError(f"more than {MAX_ENTRIES} top-level fields")
        if number != 7 or wire != 2:                       # ModelProto.graph
            continue
        model += _copy(f, run, fs)
        graph, g_run, entries = bytearray(), vs, {}
        for g_number, g_wire, g_vs, g_ve, g_fs, g_fe in _fields(f, vs, ve):
            entries[g_number] = entries.get(g_number, 0) + 1
            entries[0] = entries.get(0, 0) + 1             # (field 0 never occurs: the total)
            if entries[g_number] > MAX_ENTRIES or entries[0] > 3 * MAX_ENTRIES:   # before protobuf parses them
                raise ValueError(f"the graph has more than {MAX_ENTRIES} entries of field {g_number} (or "
                                 f"{3 * MAX_ENTRIES} in all)")
            if g_number != 5 or g_wire != 2:               # GraphProto.initializer
                continue
            graph += _copy(f, g_run, g_fs)
            tensor, span, t_run = bytearray(), None, g_vs
            for t_number, t_wire, t_vs, t_ve, t_fs, t_fe in _fields(f, g_vs, g_ve):
                if t_number == 9 and t_wire == 2:          # TensorProto.raw_data
                    tensor += _copy(f, t_run, t_fs)
                    span, t_run = (t_vs, t_ve - t_vs), t_fe
            tensor += _copy(f, t_run, g_ve)
            spans.append(span)
            graph += _len_prefix(5, len(tensor)) + tensor
            g_run = g_fe
        graph += _copy(f, g_run, ve)
        model += _len_prefix(7, len(graph)) + graph
        run = fe
    model += _copy(f, run, size)
    return bytes(model), spans


# Writing: the pieces a serializer would write, so that tensors can be streamed into a file one at a time.
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


def _copy_field(target, fd, value) -> None:
    if fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED:
        getattr(target, fd.name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(target, fd.name).CopyFrom(value)
    else:
        setattr(target, fd.name, value)


# raw_data is little-endian whatever the machine's byte order.
def _little(dtype: np.dtype) -> np.dtype:
    return dtype if dtype.byteorder in "<|" or (dtype.byteorder == "=" and sys.byteorder == "little") \
        else dtype.newbyteorder("<")


def _little_endian(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=_little(array.dtype))
