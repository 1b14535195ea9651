"""Tiny ONNX graphs built with onnx.helper, and onnxruntime helpers: the tests' oracle."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}


class Builder:
    """Accumulates nodes and random initializers; `model()` returns a checked ModelProto."""

    def __init__(self, seed: int, dtype=np.float32, constants_as_nodes: bool = False):
        self.rng = np.random.default_rng(seed)
        self.dtype, self.const_nodes = dtype, constants_as_nodes
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, prefix):
        self.count += 1
        return f"{prefix}{self.count}"

    def weight(self, shape, scale=None, positive=False):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = self.rng.normal(0, scale or 1 / np.sqrt(fan_in), shape)
        if positive:
            value = np.abs(value) + 0.5
        return self.const(value.astype(self.dtype))

    def const(self, value: np.ndarray):
        name = self.name("w")
        tensor = numpy_helper.from_array(value, name)
        if self.const_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def op(self, op_type, inputs, **attrs):
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type + "_"), **attrs))
        return out

    def model(self, x_shape, out, out_shape, out_name="y", opset=17, in_dtype=None):
        elem = NP_TO_ONNX[self.dtype] if in_dtype is None else in_dtype
        self.nodes.append(helper.make_node("Identity", [out], [out_name], name="output"))
        graph = helper.make_graph(self.nodes, "tiny", [helper.make_tensor_value_info("x", elem, x_shape)],
                                  [helper.make_tensor_value_info(out_name, elem, out_shape)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
        onnx.checker.check_model(model, full_check=True)
        return model


# --------------------------------------------------------------------------- architectures

def gemm_mlp(seed, widths=(6, 8, 7, 3), trans_b=1, alpha=1.0, beta=1.0, act="Relu", dtype=np.float32,
             constants_as_nodes=False, bias_shape="1d"):
    b = Builder(seed, dtype, constants_as_nodes)
    h = "x"
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        w = b.weight((fan_out, fan_in) if trans_b else (fan_in, fan_out))
        bias = b.weight((fan_out,) if bias_shape == "1d" else (1, fan_out), scale=0.1)
        h = b.op("Gemm", [h, w, bias], transB=trans_b, alpha=alpha, beta=beta)
        if i < len(widths) - 2:
            h = b.op(act, [h]) if act != "PRelu" else b.op("PRelu", [h, b.weight((fan_out,), 0.2)])
    return b.model(["batch", widths[0]], h, ["batch", widths[-1]])


def matmul_mlp(seed, widths=(6, 8, 7, 3), act="Tanh", dtype=np.float32):
    """What skl2onnx and tf2onnx emit: MatMul by a [in, out] weight, then Add of the bias."""
    b = Builder(seed, dtype)
    h = "x"
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        h = b.op("Add", [b.op("MatMul", [h, b.weight((fan_in, fan_out))]), b.weight((fan_out,), 0.1)])
        if i < len(widths) - 2:
            h = b.op(act, [h])
    return b.model(["batch", widths[0]], h, ["batch", widths[-1]])


def cnn(seed, dims=2, channels=(2, 4, 5), size=8, classes=3, bn=True, flatten="Flatten", pool="MaxPool",
        dtype=np.float32, hidden=6):
    """Conv (+BN) + ReLU + pool blocks, then flatten and two dense layers."""
    b = Builder(seed, dtype)
    h, spatial = "x", size
    for c_in, c_out in zip(channels, channels[1:]):
        h = b.op("Conv", [h, b.weight((c_out, c_in) + (3,) * dims), b.weight((c_out,), 0.1)],
                 pads=[1] * 2 * dims)
        if bn:
            h = b.op("BatchNormalization", [h, b.weight((c_out,), positive=True), b.weight((c_out,), 0.1),
                                            b.weight((c_out,), 0.1), b.weight((c_out,), positive=True)])
        h = b.op("Relu", [h])
        h = b.op(pool, [h], kernel_shape=[2] * dims, strides=[2] * dims)
        spatial //= 2
    features = channels[-1] * spatial ** dims
    if flatten == "Flatten":
        h = b.op("Flatten", [h], axis=1)
    elif flatten == "Reshape":
        h = b.op("Reshape", [h, b.const(np.array([-1, features], dtype=np.int64))])
    elif flatten == "GlobalAveragePool":
        h = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
        features = channels[-1]
    h = b.op("Relu", [b.op("Gemm", [h, b.weight((hidden, features)), b.weight((hidden,), 0.1)], transB=1)])
    h = b.op("Gemm", [h, b.weight((classes, hidden)), b.weight((classes,), 0.1)], transB=1)
    return b.model(["batch", channels[0]] + [size] * dims, h, ["batch", classes])


def residual_mlp(seed, width=6):
    """x -> Gemm -> Relu -> (Gemm -> Relu) + skip -> (Gemm) + skip -> Gemm: one residual group."""
    b = Builder(seed)
    h = b.op("Relu", [b.op("Gemm", ["x", b.weight((width, 5)), b.weight((width,))], transB=1)])
    for _ in range(2):
        inner = b.op("Relu", [b.op("Gemm", [h, b.weight((4, width)), b.weight((4,))], transB=1)])
        h = b.op("Add", [h, b.op("Gemm", [inner, b.weight((width, 4)), b.weight((width,))], transB=1)])
    h = b.op("Gemm", [h, b.weight((3, width)), b.weight((3,))], transB=1)
    return b.model(["batch", 5], h, ["batch", 3])


def conv_concat(seed):
    """Two conv branches concatenated along channels (Inception / fire module style), then dense."""
    b = Builder(seed)
    stem = b.op("Relu", [b.op("Conv", ["x", b.weight((3, 2, 3, 3)), b.weight((3,))], pads=[1] * 4)])
    left = b.op("Relu", [b.op("Conv", [stem, b.weight((4, 3, 1, 1)), b.weight((4,))])])
    right = b.op("Relu", [b.op("Conv", [stem, b.weight((2, 3, 3, 3)), b.weight((2,))], pads=[1] * 4)])
    h = b.op("Flatten", [b.op("Concat", [left, right], axis=1)], axis=1)
    h = b.op("Gemm", [h, b.weight((3, 6 * 16)), b.weight((3,))], transB=1)
    return b.model(["batch", 2, 4, 4], h, ["batch", 3])


def conv_split(seed):
    """One conv's channels split into two branches (Split with sizes), each convolved, concatenated back."""
    b = Builder(seed)
    h = b.op("Relu", [b.op("Conv", ["x", b.weight((5, 2, 3, 3)), b.weight((5,))], pads=[1] * 4)])
    sizes = b.const(np.array([2, 3], dtype=np.int64))
    out = b.name("split")
    left, right = out + "_a", out + "_b"
    b.nodes.append(helper.make_node("Split", [h, sizes], [left, right], name=out, axis=1))
    left = b.op("Relu", [b.op("Conv", [left, b.weight((3, 2, 1, 1)), b.weight((3,))])])
    h = b.op("Flatten", [b.op("Concat", [left, right], axis=1)], axis=1)
    h = b.op("Gemm", [h, b.weight((4, 6 * 16)), b.weight((4,))], transB=1)
    return b.model(["batch", 2, 4, 4], h, ["batch", 4])


def dense_slices(seed):
    """A fused projection sliced into two parts (as a fused QKV projection is), each with its own consumer."""
    b = Builder(seed)
    h = b.op("Gemm", ["x", b.weight((9, 5)), b.weight((9,))], transB=1)
    const = lambda v: b.const(np.array(v, dtype=np.int64))
    first = b.op("Relu", [b.op("Slice", [h, const([0]), const([4]), const([1])])])
    second = b.op("Tanh", [b.op("Slice", [h, const([4]), const([9]), const([1])])])
    h = b.op("Add", [b.op("Gemm", [first, b.weight((3, 4)), b.weight((3,))], transB=1),
                     b.op("Gemm", [second, b.weight((3, 5)), b.weight((3,))], transB=1)])
    return b.model(["batch", 5], h, ["batch", 3])


def dense_chunks(seed):
    """torch.chunk as the new exporter writes it (opset 18 Split with num_outputs): a gated unit."""
    b = Builder(seed)
    h = b.op("Gemm", ["x", b.weight((8, 5)), b.weight((8,))], transB=1)
    out = b.name("split")
    b.nodes.append(helper.make_node("Split", [h], [out + "_a", out + "_b"], name=out, axis=1, num_outputs=2))
    h = b.op("Mul", [out + "_a", b.op("Sigmoid", [out + "_b"])])
    h = b.op("Gemm", [h, b.weight((3, 4)), b.weight((3,))], transB=1)
    return b.model(["batch", 5], h, ["batch", 3], opset=18)


def dense_chunks_refined(seed):
    """Equal parts (num_outputs) of which one is split again: a --keep can make the parts unequal."""
    b = Builder(seed)
    h = b.op("Gemm", ["x", b.weight((16, 5)), b.weight((16,))], transB=1)
    out, sub = b.name("split"), b.name("split")
    b.nodes.append(helper.make_node("Split", [h], [out + "_a", out + "_b"], name=out, axis=1, num_outputs=2))
    b.nodes.append(helper.make_node("Split", [out + "_a", b.const(np.array([3, 5], dtype=np.int64))],
                                    [sub + "_a", sub + "_b"], name=sub, axis=1))
    gemm = lambda v, width: b.op("Gemm", [v, b.weight((3, width)), b.weight((3,))], transB=1)
    h = b.op("Add", [gemm(b.op("Relu", [sub + "_a"]), 3), gemm(b.op("Tanh", [sub + "_b"]), 5)])
    h = b.op("Add", [h, gemm(b.op("Sigmoid", [out + "_b"]), 8)])
    return b.model(["batch", 5], h, ["batch", 3], opset=18)


def dense_chunks_by_shape(seed, refine="second"):
    """torch.chunk as the legacy exporter writes it: Slice bounds computed from the tensor's Shape
    ((C + 1) // 2 and twice that). One of the two halves is split again, so a --keep can make them unequal."""
    b = Builder(seed)
    const = lambda v: b.const(np.array(v, dtype=np.int64))
    h = b.op("Gemm", ["x", b.weight((16, 5)), b.weight((16,))], transB=1)
    half = b.op("Div", [b.op("Add", [b.op("Gather", [b.op("Shape", [h]), const([-1])], axis=0), const([1])]),
                        const([2])])
    first = b.op("Slice", [h, const([0]), b.op("Mul", [half, const([1])]), const([-1])])
    second = b.op("Slice", [h, b.op("Mul", [half, const([1])]), b.op("Mul", [half, const([2])]), const([-1])])
    cut, whole = (second, first) if refine == "second" else (first, second)
    out = b.name("split")
    b.nodes.append(helper.make_node("Split", [cut, const([3, 5])], [out + "_a", out + "_b"], name=out, axis=1))
    gemm = lambda v, width: b.op("Gemm", [v, b.weight((3, width)), b.weight((3,))], transB=1)
    h = b.op("Add", [gemm(b.op("Relu", [out + "_a"]), 3), gemm(b.op("Tanh", [out + "_b"]), 5)])
    h = b.op("Add", [h, gemm(b.op("Sigmoid", [whole]), 8)])
    return b.model(["batch", 5], h, ["batch", 3])


# --------------------------------------------------------------------------- running

def export_cache(name: str, source, *modules) -> Path:
    """A folder for exports kept between sessions in ONNXFUSE_TEST_CACHE (default: the system's temp folder),
    keyed by the exporting test file and the versions of `modules` (torch, the model libraries), so that slow
    exports run once per machine."""
    import hashlib
    key = hashlib.sha256(open(source, "rb").read() + "".join(m.__version__ for m in modules).encode())
    base = os.environ.get("ONNXFUSE_TEST_CACHE") or os.path.join(tempfile.gettempdir(), f"onnxfuse-{name}-tests")
    return Path(base) / key.hexdigest()[:12]


def cli(*args) -> subprocess.CompletedProcess:
    """`python -m onnxfuse ARGS` run in this process by click's test runner, without a Python start-up per call:
    the exit code, and stdout and stderr as a terminal would show them: what native code (onnxruntime's logger)
    writes to the file descriptors, Python warnings under the interpreter's default filters, and the traceback
    of an uncaught exception. Tests of the process itself (entry points, signals, imports) start one."""
    from click.testing import CliRunner
    from onnxfuse.cli import main
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, warnings.catch_warnings():
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        saved = [os.dup(1), os.dup(2)]
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            result = CliRunner().invoke(main, [str(a) for a in args], prog_name="onnxfuse")
        finally:
            for fd, copy in enumerate(saved, 1):
                os.dup2(copy, fd)
                os.close(copy)
        native = [f.seek(0) or f.read().decode(errors="replace") for f in (out, err)]
    stderr = result.stderr + native[1]
    if result.exc_info and not issubclass(result.exc_info[0], SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout + native[0], stderr)


def session(model) -> ort.InferenceSession:
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    if not isinstance(data, bytes):
        data = str(data)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def run(model, x: np.ndarray, output: int = 0) -> np.ndarray:
    sess = session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x})[output]


def random_input(model: onnx.ModelProto, batch=5, seed=0, dtype=np.float32) -> np.ndarray:
    dims = [d.dim_value if d.HasField("dim_value") else batch
            for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).normal(size=dims).astype(dtype)


def mean_of(models, x, output=0) -> np.ndarray:
    return np.mean([run(m, x, output).astype(np.float64) for m in models], axis=0)


def to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """Upcast every float tensor and type annotation (to run bfloat16 models, which onnxruntime's CPU lacks)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    floats = (TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    for t in model.graph.initializer:
        if t.data_type in floats:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if v.type.tensor_type.elem_type in floats:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    return model
