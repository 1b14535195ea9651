"""Datasets from .npz files: `x` (or one array per graph input, by name) and optional integer labels `y`."""
from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import InputError

NP_FLOAT = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
            onnx.TensorProto.FLOAT16: np.float16}


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    y: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    constants = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in constants]


def load_data(path, model: onnx.ModelProto) -> Dataset:
    """Read an .npz and check it against the model's graph inputs (names, shapes, dtypes).

    Only the arrays the graph needs (and the labels 'y') are read, each after checking that the archive
    really holds the bytes its header declares: other arrays, however large, are never decompressed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: " + ("not a regular file" if path.exists() else "no such data file"))
    inputs = graph_inputs(model)
    try:
        if not zipfile.is_zipfile(path):
            raise InputError(f"{path}: not an .npz file (not a zip archive; write it with numpy.savez)")
        with zipfile.ZipFile(path) as archive, np.load(path, allow_pickle=False) as npz:
            available = set(npz.files)
            keys = {}
            for spec in inputs:
                key = spec.name if spec.name in available else \
                    ("x" if len(inputs) == 1 and "x" in available else None)
                if key is None:
                    names = "'x'" if spec.name == "x" else f"'x' or '{spec.name}'"
                    raise InputError(f"{path}: no array for graph input '{spec.name}' (found {sorted(available)}; "
                                     f"name it {names})")
                keys[spec.name] = key
            arrays = {k: _read(archive, npz, k, path) for k in {*keys.values(), *({"y"} & available)}}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    feeds = {spec.name: _fit(arrays[keys[spec.name]], spec, f"{path}: array '{keys[spec.name]}'") for spec in inputs}
    sizes = {len(v) for v in feeds.values()}
    if sizes == {0}:
        raise InputError(f"{path}: the data is empty")
    y = arrays.get("y")
    if y is not None:
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"{path}: labels 'y' must be a 1-D integer array, got {y.dtype} {list(y.shape)}")
        if y.dtype.kind == "u" and y.size and y.max() > np.iinfo(np.int64).max:
            raise InputError(f"{path}: label {y.max()} in 'y' is too large for a class index")
        sizes.add(len(y))
        y = y.astype(np.int64)
    if len(sizes) != 1:
        raise InputError(f"{path}: arrays have different numbers of samples {sorted(sizes)}")
    return Dataset(feeds, y, str(path))


def _read(archive: zipfile.ZipFile, npz, key: str, path: Path) -> np.ndarray:
    """One array of the archive, refused before decompression if its header declares more bytes than the
    archive says the entry holds (a zip bomb or a damaged file), or pickled objects."""
    info = archive.getinfo(key + ".npy") if key + ".npy" in archive.namelist() else archive.getinfo(key)
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        header = {(1, 0): np.lib.format.read_array_header_1_0,
                  (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if header is None:
            raise InputError(f"{path}: array '{key}' has an unsupported .npy format version {version}")
        shape, _, dtype = header(f)
        if dtype.hasobject:
            raise InputError(f"{path}: array '{key}' holds Python objects (pickled data), which are not loaded")
        declared = math.prod(shape) * dtype.itemsize
        if declared > info.file_size:
            raise InputError(f"{path}: array '{key}' declares shape {list(shape)} ({declared} bytes) but its "
                             f"entry holds {info.file_size} bytes")
    return npz[key]


def _fit(array: np.ndarray, spec: onnx.ValueInfoProto, what: str) -> np.ndarray:
    tt = spec.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    want = NP_FLOAT.get(tt.elem_type)
    expected = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
    if want is not None and np.issubdtype(array.dtype, np.floating):
        array = array.astype(want, copy=False)
        if not np.isfinite(array).all():
            raise InputError(f"{what} has NaN or infinite values")
    elif want is None and np.issubdtype(expected, np.integer) and np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < np.iinfo(expected).min or array.max() > np.iinfo(expected).max):
            raise InputError(f"{what} has values outside the range of {expected} (graph input '{spec.name}')")
        array = array.astype(expected, copy=False)  # token ids: any integer array of the right range
    elif array.dtype != expected:
        raise InputError(f"{what} has dtype {array.dtype}, graph input '{spec.name}' expects {expected}")
    if array.ndim != len(dims) or any(isinstance(d, int) and d > 0 and d != s
                                      for d, s in zip(dims[1:], array.shape[1:])):
        raise InputError(f"{what} has shape {list(array.shape)}, graph input '{spec.name}' expects {dims}")
    return array
