"""Fusion without retraining: layer-wise reconstruction of the wide model from unlabeled calibration data.

After transplantation every layer that consumes a pruned channel group sees only the kept neurons, and the
last layer still carries the wide model's 1/N averaging. Here each such *consumer* layer is refitted so that
the fused model reproduces the wide (ensemble) model's pre-activations on a calibration set, layer by layer
in graph order:

    min  || X_fused W' + b' - Y_wide ||^2  +  lambda || W' - W_0 ||^2

X_fused is the layer's input in the fused model, computed with every upstream layer already refitted (errors
are corrected where they arise, not compounded); Y_wide is the same layer's output in the wide model at the
kept output channels (all outputs for the last layer: the members' mean); W_0 is the transplanted weight,
towards which the ridge term pulls (so directions the calibration data does not determine keep their
transplanted value, and with every neuron kept the fit returns the wide model exactly); lambda is `ridge`
times the mean eigenvalue of the centred input Gram matrix, trace(X^T X) / d. The bias is fitted without
penalty. Convolutions are fitted on im2col patches of their input (kernel, strides, pads, dilations,
auto_pad). Only the normal equations are accumulated (d x d in float64), batch by batch, so memory does not
grow with the number of calibration samples.

Layers whose input does not depend on one another's refit (one *level*: e.g. a residual block's conv and
its shortcut) are fitted from the same pass of onnxruntime over the calibration data.

Not refitted (left as transplanted): the first layer (its input is the graph input: already exact), depthwise
convolutions (each output channel sees one input channel: nothing to mix in), weights shared by several
layers, and Gemm layers with a bias that is neither per-output nor a scalar. BatchNormalization after a
refitted layer keeps its parameters: the layer is fitted to the wide model's BN *input*, and the fused BN
holds the wide model's statistics of the kept channels, so the BN output follows (re-estimating the
statistics on the calibration data would move the model away from the ensemble it should reproduce: on digits
ResNet- / MobileNet-like pairs exported with their BatchNormalization nodes, re-estimating the BNs that follow
refitted layers took the reconstructed models from 92.5% to 92.3% and from 75.0% to 26.8%; see
benchmarks/bn_reestimation.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from math import ceil, prod

import numpy as np
import onnx

from .data import batches, load_data, pick_samples
from .errors import InputError, OnnxFuseError
from .graph_index import GraphIndex
from .groups import Analysis
from .model_io import TensorTable
from .ops import spec_of
from .ops.linear import Layout
from .sessions import session

DEFAULT_SAMPLES = 2048
DEFAULT_RIDGE = 1e-3
BATCH = 256


@dataclass
class Layer:
    """A Gemm / MatMul / Conv that consumes a fused channel group, and how to read and write it."""
    node: onnx.NodeProto
    layout: Layout
    x: str                      # its input activation
    target: str                 # the value to reproduce (the layer output, or the Add of a MatMul's bias)
    weight: str
    bias: str | None            # refitted bias tensor (None: no intercept)
    out_index: np.ndarray | None   # wide-model channels of `target` that the fused layer keeps (None: all)
    level: int = 0
    fixed_offset: float = 0.0   # a scalar bias that is not refitted (subtracted from the target)

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def op(self) -> str:
        return self.node.op_type


def wide_indices(a: Analysis, segs, kept: dict[int, np.ndarray], n: int) -> np.ndarray:
    """Indices into the wide model's axis laid out as `segs` of the fused model's entries on that axis."""
    out, offset = [], 0
    for seg in segs:
        root = a.find(seg.space)
        width = a.space_width[root]
        if root in kept:
            idx, size = np.asarray(kept[root]), n * width
        else:
            idx, size = np.arange(width), width
        out.append((offset + idx[:, None] * seg.inner + np.arange(seg.inner)).ravel())
        offset += size * seg.inner
    return np.concatenate(out)


def find_layers(model: onnx.ModelProto, tensors: TensorTable, a: Analysis, kept: dict[int, np.ndarray],
                n: int) -> tuple[list[Layer], list[str]]:
    """The layers to refit, in node order, with their levels; and why other consumers are left alone."""
    widened = a.widened_touches()
    index = GraphIndex(model)
    layers, skipped = [], []
    for node in index.nodes:
        spec = spec_of(node)
        if spec is None or spec.layout is None or len(node.input) < 2:
            continue
        layout = spec.layout(index, node)
        w = node.input[1]
        axes = widened.get(w, {})
        label = f"{node.op_type} '{node.name or node.output[0]}'"
        if layout.window is not None and layout.window["group"] != 1:
            if axes:
                skipped.append(f"{label}: grouped or depthwise convolution (each output sees its group's input "
                               f"channels only; kept as transplanted)")
            continue
        if w not in tensors or not any(t.role == "in" for t in axes.values()):
            continue
        if index.uses(w) > 1:
            skipped.append(f"{label}: its weight is shared with another layer")
            continue
        out_touch = axes.get(layout.out_axis)
        out_index = wide_indices(a, out_touch.segs, kept, n) if out_touch is not None else None
        layer = Layer(node, layout, node.input[0], node.output[0], w, None, out_index)
        out_features = tensors.shape(w)[layout.out_axis]
        if node.op_type == "Conv":
            if len(node.input) > 2 and node.input[2]:
                if index.uses(node.input[2]) > 1 or node.input[2] not in tensors:
                    skipped.append(f"{label}: its bias is shared with another node or not a constant")
                    continue
                layer.bias = node.input[2]
        elif node.op_type == "Gemm":
            c = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if c is not None and layout.beta != 0:
                if c not in tensors:
                    skipped.append(f"{label}: its bias is not a constant")
                    continue
                size = prod(tensors.shape(c))
                if size == out_features and index.uses(c) == 1:
                    layer.bias = c
                elif size == 1:
                    layer.fixed_offset = float(np.asarray(tensors.array(c), np.float64).reshape(-1)[0]) * layout.beta
                else:
                    skipped.append(f"{label}: its bias C of shape {list(tensors.shape(c))} is not per output")
                    continue
        else:   # MatMul: a following Add of a per-output constant is its bias
            after = index.consumers.get(node.output[0], [])
            if len(after) == 1 and after[0].op_type == "Add":
                other = [x for x in after[0].input if x != node.output[0]]
                if len(other) == 1 and other[0] in tensors and index.uses(other[0]) == 1 and \
                        tensors.shape(other[0])[-1:] == (out_features,) and \
                        prod(tensors.shape(other[0])) == out_features:
                    layer.bias, layer.target = other[0], after[0].output[0]
        layers.append(layer)
    _assign_levels(index.nodes, layers)
    return layers, skipped


def _assign_levels(nodes: list[onnx.NodeProto], layers: list[Layer]) -> None:
    """level = how many refitted layers lie on the longest path before the layer's input."""
    by_node = {id(layer.node): layer for layer in layers}
    depth: dict[str, int] = {}
    for node in nodes:
        d = max((depth.get(x, 0) for x in node.input if x), default=0)
        layer = by_node.get(id(node))
        if layer is not None:
            layer.level = depth.get(layer.x, 0)
            d = layer.level + 1
        for y in node.output:
            depth[y] = d


# ----------------------------------------------------------------------------- rows of the regression

def layer_rows(layer: Layer, x: np.ndarray, tensors: TensorTable) -> np.ndarray:
    """The layer's input as the rows of a linear regression (one row per output position)."""
    return layer.layout.rows(x, tensors.shape(layer.weight))


def target_rows(layer: Layer, y: np.ndarray) -> np.ndarray:
    """The wide model's output of the layer as rows, at the channels the fused layer keeps."""
    y = layer.layout.target_rows(y)
    if layer.out_index is not None:
        y = y[:, layer.out_index]
    return y - layer.fixed_offset if layer.fixed_offset else y


# ----------------------------------------------------------------------------- weights as x @ W

def get_linear(layer: Layer, tensors: TensorTable) -> tuple[np.ndarray, np.ndarray | None]:
    """The layer as Y = X W + b (X rows from layer_rows)."""
    b = np.asarray(tensors.array(layer.bias), np.float64).reshape(-1) if layer.bias else None
    return layer.layout.matrix(tensors.array(layer.weight)), (b * layer.layout.beta if b is not None else None)


def set_linear(layer: Layer, tensors: TensorTable, w: np.ndarray, b: np.ndarray | None) -> None:
    tensors.set(layer.weight, layer.layout.weight(w, tensors.shape(layer.weight)))
    if layer.bias is not None and b is not None:
        tensors.set(layer.bias, (b / layer.layout.beta).reshape(tensors.shape(layer.bias)))


class NormalEquations:
    """Sums over the calibration rows from which the least-squares fit and its error follow."""

    def __init__(self, d: int, o: int):
        self.xtx, self.xty = np.zeros((d, d)), np.zeros((d, o))
        self.sx, self.sy, self.yty, self.n = np.zeros(d), np.zeros(o), 0.0, 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = x.astype(np.float64, copy=False), y.astype(np.float64, copy=False)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.yty += float(np.einsum("ij,ij->", y, y))
        self.n += len(x)

    def solve(self, w0: np.ndarray, intercept: bool, ridge: float) -> tuple[np.ndarray, np.ndarray | None]:
        d = len(self.sx)
        if intercept:
            mx, my = self.sx / self.n, self.sy / self.n
            g = self.xtx - self.n * np.outer(mx, mx)
            r = self.xty - self.n * np.outer(mx, my)
        else:
            g, r = self.xtx, self.xty
        lam = ridge * np.trace(g) / d
        if not lam > 0:
            lam = 1e-12
        a = g + lam * np.eye(d)
        try:
            w = np.linalg.solve(a, r + lam * w0)
        except np.linalg.LinAlgError:
            w = np.linalg.lstsq(a, r + lam * w0, rcond=None)[0]
        return w, (my - mx @ w if intercept else None)

    def relative_error(self, w: np.ndarray, b: np.ndarray | None) -> float:
        """||X W + b - Y||^2 / ||Y - mean(Y)||^2 over the calibration rows."""
        b = np.zeros(w.shape[1]) if b is None else b
        rss = (self.yty - 2 * (np.sum(w * self.xty) + b @ self.sy) + np.sum(w * (self.xtx @ w))
               + 2 * self.sx @ w @ b + self.n * b @ b)
        tss = self.yty - self.sy @ self.sy / self.n
        return float(max(rss, 0.0) / tss) if tss > 0 else 0.0


# ----------------------------------------------------------------------------- onnxruntime

def _session(model: onnx.ModelProto, outputs: list[str]):
    """A session of `model` that also returns the intermediate values `outputs`."""
    return session(model, threads=1, extra_outputs=outputs)


# ----------------------------------------------------------------------------- the driver

def reconstruct(graph: onnx.ModelProto, tensors: TensorTable, wide: onnx.ModelProto, a: Analysis,
                kept: dict[int, np.ndarray], n: int, calibrate, samples: int = DEFAULT_SAMPLES,
                ridge: float = DEFAULT_RIDGE) -> dict:
    """Refit, in place in `tensors`, every layer of the fused model (`graph` + `tensors`) that consumes a
    fused channel group, so that it reproduces the wide model `wide` on the calibration data `calibrate` (an
    .npz checked against the graph inputs; labels are not used). Returns a report for the summary."""
    start = time.perf_counter()
    if not isinstance(samples, (int, np.integer)) or isinstance(samples, bool) or samples < 1:
        raise OnnxFuseError(f"--calib-samples must be a positive integer, got {samples!r}")
    if not ridge >= 0:
        raise OnnxFuseError(f"the reconstruction ridge must be >= 0, got {ridge}")
    model = tensors.materialize(graph)
    data = load_data(calibrate, model)
    calibrate = data.source          # a file name, or the kind of in-memory data
    feeds = pick_samples(data.inputs, int(samples))
    for name, value in feeds.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise InputError(f"{calibrate}: the calibration array for input '{name}' has NaN or infinite values")
    count = len(next(iter(feeds.values())))
    layers, skipped = find_layers(graph, tensors, a, kept, n)
    if not layers:
        return {"calibration": str(calibrate), "samples": count, "layers": [], "skipped": skipped,
                "seconds": round(time.perf_counter() - start, 3)}
    _check_enough(layers, model, tensors, feeds, count, len(data), calibrate)
    wide_session = _session(wide, [layer.target for layer in layers])
    report = []
    for level in sorted({layer.level for layer in layers}):
        todo = [layer for layer in layers if layer.level == level]
        fused_session = _session(tensors.materialize(graph), [layer.x for layer in todo])
        sums: dict[int, NormalEquations] = {}
        for batch in batches(feeds, BATCH):
            xs = fused_session.run([layer.x for layer in todo], batch)
            ys = wide_session.run([layer.target for layer in todo], batch)
            for i, (layer, x, y) in enumerate(zip(todo, xs, ys)):
                rows_x, rows_y = layer_rows(layer, x, tensors), target_rows(layer, y)
                if len(rows_x) != len(rows_y):
                    raise OnnxFuseError(f"internal: {layer.op} '{layer.name}' has {len(rows_x)} input rows "
                                        f"but {len(rows_y)} output rows")
                if i not in sums:
                    sums[i] = NormalEquations(rows_x.shape[1], rows_y.shape[1])
                sums[i].add(rows_x, rows_y)
        for i, layer in enumerate(todo):
            w0, b0 = get_linear(layer, tensors)
            eq = sums[i]
            w, b = eq.solve(w0, layer.bias is not None, ridge)
            before = eq.relative_error(w0, b0)
            after = eq.relative_error(w, b)
            if not np.isfinite(w).all() or (b is not None and not np.isfinite(b).all()):
                raise OnnxFuseError(f"reconstruction of {layer.op} '{layer.name}' did not converge (non-finite "
                                    f"weights): check the calibration data for NaN or infinite values")
            set_linear(layer, tensors, w, b)
            report.append({"layer": layer.name, "op": layer.op, "level": level, "inputs": int(w.shape[0]),
                           "outputs": int(w.shape[1]), "rows": int(eq.n),
                           "relative_error_before": round(before, 6), "relative_error_after": round(after, 6)})
    return {"calibration": str(calibrate), "samples": count, "ridge": ridge, "layers": report,
            "skipped": skipped, "seconds": round(time.perf_counter() - start, 3)}


def _check_enough(layers: list[Layer], model: onnx.ModelProto, tensors: TensorTable, feeds, count: int,
                  available: int, source) -> None:
    """Each layer needs at least as many regression rows as it has unknowns per output (weights + bias)."""
    one = {k: v[:1] for k, v in feeds.items()}
    names = sorted({layer.x for layer in layers} | {layer.node.output[0] for layer in layers})
    values = dict(zip(names, _session(model, names).run(names, one)))
    for layer in layers:
        x, y = values[layer.x], values[layer.node.output[0]]
        d = layer_rows(layer, x, tensors).shape[1]
        unknowns = d + (layer.bias is not None)
        per = layer.layout.rows_per_sample(x, y)
        need = ceil(unknowns / per)
        if count < need:
            if layer.op == "Conv":
                k = tensors.shape(layer.weight)
                what = (f"Conv '{layer.name}' has {k[1]} kept input channels x {'x'.join(map(str, k[2:]))} "
                        f"kernel = {d} weights per output (+{unknowns - d} bias) and {per} output positions per "
                        f"image: it needs at least ceil({unknowns}/{per}) = {need} samples")
            else:
                what = (f"{layer.op} '{layer.name}' has {d} kept inputs (+{unknowns - d} bias)"
                        + (f" and {per} rows per sample" if per > 1 else "")
                        + f": it needs at least {need} samples")
            more = f" (the file has {available}: raise --calib-samples)" if available >= need else ""
            raise InputError(f"{source}: {count} calibration samples are too few to reconstruct the fused "
                             f"model; {what}{more}")
