"""Datasets: `x` (or one array per graph input, by name) and optional targets `y` -- integer class labels, or
float targets of the output's shape (regression) -- from an .npz file, a numpy array (inputs only), a dict of
arrays, or a torch Dataset/DataLoader that yields `x` or `(x, y)`."""
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
    teacher: np.ndarray | None = None      # the members' mean outputs on these samples (distillation)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    @property
    def regression(self) -> bool:
        return self.y is not None and np.issubdtype(self.y.dtype, np.floating)

    def subset(self, index: np.ndarray, source: str) -> "Dataset":
        pick = (lambda a: None if a is None else a[index])
        return Dataset({k: v[index] for k, v in self.inputs.items()}, pick(self.y), source, pick(self.teacher))


def pick_samples(feeds: dict[str, np.ndarray], samples: int) -> dict[str, np.ndarray]:
    """`samples` of a calibration set: all of them, or a fixed random subset (in file order)."""
    total = len(next(iter(feeds.values())))
    if total <= samples:
        return feeds
    idx = np.sort(np.random.default_rng(0).choice(total, samples, replace=False))
    return {k: v[idx] for k, v in feeds.items()}


def batches(feeds: dict[str, np.ndarray], size: int):
    total = len(next(iter(feeds.values())))
    for start in range(0, total, size):
        yield {k: v[start:start + size] for k, v in feeds.items()}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    constants = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in constants]


def describe(source) -> str:
    """How a data source is named in messages and metadata: the file name, or the kind of object."""
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__}>"


def load_data(source, model: onnx.ModelProto) -> Dataset:
    """Read a dataset (see the module docstring) and check it against the model's graph inputs (names, shapes,
    dtypes).

    From an .npz, only the arrays the graph needs (and the targets 'y') are read, each after checking that the
    archive really holds the bytes its header declares: other arrays, however large, are never decompressed."""
    if isinstance(source, Dataset):
        return source
    inputs, path = graph_inputs(model), describe(source)
    if isinstance(source, (str, Path)):
        keys, arrays = _read_npz(Path(source), inputs)
    else:
        arrays = _arrays(source)
        keys = _keys(inputs, set(arrays), path)
    feeds = {spec.name: _fit(arrays[keys[spec.name]], spec, f"{path}: array '{keys[spec.name]}'") for spec in inputs}
    sizes = {len(v) for v in feeds.values()}
    if sizes == {0}:
        raise InputError(f"{path}: the data is empty")
    y = arrays.get("y")
    if y is not None:
        if np.issubdtype(y.dtype, np.floating) and y.ndim >= 1:
            y = y.astype(np.float32)        # regression targets, checked against the output's shape in training
        elif y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"{path}: labels 'y' must be a 1-D integer array (classes) or a float array of "
                             f"the output's shape (regression), got {y.dtype} {list(y.shape)}")
        elif y.dtype.kind == "u" and y.size and y.max() > np.iinfo(np.int64).max:
            raise InputError(f"{path}: label {y.max()} in 'y' is too large for a class index")
        else:
            y = y.astype(np.int64)
        sizes.add(len(y))
    if len(sizes) != 1:
        raise InputError(f"{path}: arrays have different numbers of samples {sorted(sizes)}")
    return Dataset(feeds, y, path)


def _keys(inputs, available: set, path: str) -> dict[str, str]:
    """Graph input -> the array that feeds it: the input's own name, or `x` for a single input."""
    keys = {}
    for spec in inputs:
        key = spec.name if spec.name in available else ("x" if len(inputs) == 1 and "x" in available else None)
        if key is None:
            names = "'x'" if spec.name == "x" else f"'x' or '{spec.name}'"
            raise InputError(f"{path}: no array for graph input '{spec.name}' (found {sorted(available)}; "
                             f"name it {names})")
        keys[spec.name] = key
    return keys


def _read_npz(path: Path, inputs) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    if not path.is_file():
        raise InputError(f"{path}: " + ("not a regular file" if path.exists() else "no such data file"))
    try:
        if not zipfile.is_zipfile(path):
            raise InputError(f"{path}: not an .npz file (not a zip archive; write it with numpy.savez)")
        with zipfile.ZipFile(path) as archive, np.load(path, allow_pickle=False) as npz:
            available = set(npz.files)
            keys = _keys(inputs, available, str(path))
            arrays = {k: _read(archive, npz, k, path) for k in {*keys.values(), *({"y"} & available)}}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    return keys, arrays


def _arrays(source) -> dict[str, np.ndarray]:
    """The named arrays of an in-memory data source: an array (x), a dict of arrays, a torch Dataset or
    DataLoader of `x` or `(x, y)` items (a dict item gives its keys)."""
    if isinstance(source, np.ndarray):
        return {"x": source}
    if isinstance(source, dict):
        return {k: np.asarray(v) for k, v in source.items()}
    if hasattr(source, "__iter__") or hasattr(source, "__getitem__"):
        return _from_torch(source)
    raise InputError(f"data must be an .npz path, a numpy array, a dict of arrays or a torch Dataset/DataLoader, "
                     f"got {type(source).__name__}")


def _from_torch(source) -> dict[str, np.ndarray]:
    """Collect a torch Dataset (items) or DataLoader (batches) into arrays."""
    try:
        from torch.utils.data import DataLoader
    except ImportError:
        raise InputError(f"{describe(source)}: reading a torch Dataset needs torch") from None
    batches = source if isinstance(source, DataLoader) else DataLoader(source, batch_size=256, shuffle=False)
    columns: dict[str, list] = {}
    for batch in batches:
        if isinstance(batch, dict):
            named = batch
        elif isinstance(batch, (tuple, list)):
            if len(batch) > 2:
                raise InputError(f"{describe(source)}: items must be x or (x, y), got {len(batch)} values")
            named = dict(zip(("x", "y"), batch))
        else:
            named = {"x": batch}
        for k, v in named.items():
            columns.setdefault(k, []).append(v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
    if not columns:
        raise InputError(f"{describe(source)}: the data is empty")
    return {k: np.concatenate(v) for k, v in columns.items()}


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
