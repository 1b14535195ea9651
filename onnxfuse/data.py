"""Datasets from .npz files: `x` (or one array per graph input, by name) and optional integer labels `y`."""
from __future__ import annotations

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
    """Read an .npz and check it against the model's graph inputs (names, shapes, dtypes)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such data file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    inputs = graph_inputs(model)
    feeds = {}
    for i, spec in enumerate(inputs):
        key = spec.name if spec.name in arrays else ("x" if len(inputs) == 1 and "x" in arrays else None)
        if key is None:
            raise InputError(f"{path}: no array for graph input '{spec.name}' (found {sorted(arrays)}; name it "
                             f"'x' or '{spec.name}')")
        feeds[spec.name] = _fit(arrays[key], spec, f"{path}: array '{key}'")
    sizes = {len(v) for v in feeds.values()}
    if sizes == {0}:
        raise InputError(f"{path}: the data is empty")
    y = arrays.get("y")
    if y is not None:
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"{path}: labels 'y' must be a 1-D integer array, got {y.dtype} {list(y.shape)}")
        sizes.add(len(y))
        y = y.astype(np.int64)
    if len(sizes) != 1:
        raise InputError(f"{path}: arrays have different numbers of samples {sorted(sizes)}")
    return Dataset(feeds, y, str(path))


def _fit(array: np.ndarray, spec: onnx.ValueInfoProto, what: str) -> np.ndarray:
    tt = spec.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    want = NP_FLOAT.get(tt.elem_type)
    expected = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
    if want is not None and np.issubdtype(array.dtype, np.floating):
        array = array.astype(want, copy=False)
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
