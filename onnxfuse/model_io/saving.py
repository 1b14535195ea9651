"""Writing a result: output path checks (never an input's file) and the atomic, streaming save."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto

from ..errors import OutputError
from .loading import Member, TensorTable
from .wire import _len_prefix, _little_endian, _split_fields

# Protobuf cannot serialize a message over 2 GiB: larger outputs go to one external data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def check_output_path(output, inputs=(), force: bool = False) -> Path:
    """Fail early, before any work, if the output cannot or must not be written. `inputs` are paths, Members
    (whose external data files count too) or ModelProtos: the output (and its `.data` file) may never be, or
    be a link to, a file an input reads."""
    out = Path(output)
    try:
        written = [out, out.with_name(out.name + ".data")]
        for source in inputs:
            if isinstance(source, Member):
                read, label = source.files, source.name
            elif isinstance(source, (str, os.PathLike)):
                read, label = {Path(source)}, str(source)
            else:
                continue
            for target in written:
                hit = next((r for r in read if _same_file(target, r)), None)
                if hit is not None:
                    what = "the input" if _same_file(hit, label) else f"'{hit}', which the input reads:"
                    raise OutputError(f"{out}: the output would overwrite {what} {label}")
        if out.is_dir():
            raise OutputError(f"{out}: is a directory")
        folder = out.absolute().parent
        if not folder.is_dir():
            raise OutputError(f"{out}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise OutputError(f"{out}: folder {folder} is not writable")
        if (out.exists() or out.is_symlink()) and not force:
            raise OutputError(f"{out}: already exists (use --force to overwrite)")
    except (OSError, ValueError) as exc:          # a name too long, a NUL byte, ...
        raise OutputError(f"{out}: not a usable output path ({getattr(exc, 'strerror', None) or exc})") from None
    return out


def _same_file(a, b) -> bool:
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)             # hard links
    except OSError:
        return False


def save_model(model: onnx.ModelProto, output, force: bool = False, tensors: TensorTable | None = None,
               check=None) -> Path:
    """Write atomically: into a temporary folder beside the output, then link (or, with `force`, rename) it
    into place, so that two runs racing on one new output cannot both succeed. `check(path)` is called on the
    complete temporary file first (the runtime guard): if it raises, nothing is written.

    `tensors` holds detached weight data (see TensorTable.detach): it is streamed into the file, never
    assembled into one protobuf in memory. Outputs above EXTERNAL_DATA_THRESHOLD go to `<name>.data`
    beside the output (one file, relative location); smaller ones are one self-contained file. An existing
    `.onnx` is removed before its `.data` is replaced, so an interruption never leaves a mismatched pair.
    """
    out = Path(output)
    data_out = out.with_name(out.name + ".data")
    tensors = tensors or TensorTable(model.graph)
    external = tensors.nbytes() + model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    for target in (out, data_out) if external else (out,):
        if (target.exists() or target.is_symlink()) and not force:
            raise OutputError(f"{target}: already exists (use --force to overwrite)")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:64]}.", dir=out.absolute().parent))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write into {out.absolute().parent} ({exc.strerror})") from None
    try:
        if external:
            # the data file keeps its final name in the temporary folder too: the guard loads the model from there
            model = _write_external(model, tensors, tmp / data_out.name, data_out.name)
            with open(tmp / "model", "wb") as f:
                f.write(model.SerializeToString(deterministic=True))
            if check is not None:
                check(tmp / "model")
            if force and (out.exists() or out.is_symlink()):
                out.unlink()
            _place(tmp / data_out.name, data_out, force)
        else:
            with open(tmp / "model", "wb") as f:
                _write_streaming(f, model, tensors)
            if check is not None:
                check(tmp / "model")
        _place(tmp / "model", out, force)
    except OSError as exc:
        raise OutputError(f"{out}: could not be written ({exc.strerror or exc}); nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _place(source: Path, target: Path, force: bool) -> None:
    """Move a finished file into place: replacing `target` only with `force`, else never (a hard link fails
    if the name exists, where checking first and renaming would race)."""
    if force:
        os.replace(source, target)
        return
    try:
        os.link(source, target)
    except FileExistsError:
        raise OutputError(f"{target}: already exists (use --force to overwrite)") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        if target.exists() or target.is_symlink():     # no hard links on this file system
            raise OutputError(f"{target}: already exists (use --force to overwrite)") from None
        os.replace(source, target)


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
