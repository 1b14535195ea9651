"""Edge export: int8 and fp16 versions of a (fused) model, with onnxruntime's own tools.

- int8, static: QDQ format, per-channel int8 weights, uint8 activations calibrated (min/max) on inputs the
  user gives (`onnxruntime.quantization.quantize_static` with a CalibrationDataReader over them), after
  onnxruntime's pre-processing (shape inference, graph optimization).
- int8, dynamic: no calibration data; weights of MatMul/Gemm in int8, activations quantized at run time
  (`quantize_dynamic`). Only for graphs whose weight layers are all MatMul/Gemm: dynamic Conv is slow or
  unsupported on the CPU provider, so a Conv graph needs calibration data instead.
- fp16: float16 weights and compute (`onnxruntime.transformers.float16`), graph inputs and outputs kept in
  float32 so callers feed and read the same arrays.

Activations are uint8 by default: onnxruntime's x86 kernels for uint8 activations and int8 weights (U8S8) are
fast, while int8 activations (S8S8) ran ResNet-18 2.5x slower than float32 on a VNNI Xeon (uint8: 0.5x);
`activations="int8"` is there for hardware where S8S8 is the fast path (many ARM CPUs).

Every result is run once in onnxruntime before it is returned: a model that does not run is refused.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .data import batches, pick_samples
from .errors import InputError, UnsupportedGraphError

MODES = ("int8", "fp16")
ACTIVATIONS = ("uint8", "int8")
WEIGHT_LAYERS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
DYNAMIC_LAYERS = {"MatMul", "Gemm"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
           "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


def quantize(model: onnx.ModelProto, mode: str = "int8", calibration=None, exclude=(), calib_samples: int = 512,
             name: str = "model", activations: str = "uint8") -> tuple[onnx.ModelProto, dict]:
    """The `mode` version of `model` (a complete ModelProto with its weights) and a report of what was done.

    calibration: a data.Dataset of the model's inputs (int8 static); None gives dynamic int8 where the graph
    allows it. exclude: node names to keep in float (e.g. the last layer)."""
    if mode not in MODES:
        raise InputError(f"unknown quantization '{mode}' (choose {' or '.join(MODES)})")
    if activations not in ACTIVATIONS:
        raise InputError(f"unknown activation type '{activations}' (choose {' or '.join(ACTIVATIONS)})")
    _refuse_quantized(model, name)
    nodes = {n.name for n in model.graph.node}
    missing = [e for e in exclude if e not in nodes]
    if missing:
        raise InputError(f"{name}: no node named {missing[0]!r} to exclude from quantization (node names are "
                         f"listed by `onnxfuse inspect`)")
    if mode == "fp16":
        if exclude:
            raise InputError("--quantize-exclude applies to int8 quantization only")
        result, report = _fp16(model), {"mode": "fp16", "io": "float32 inputs and outputs kept"}
    else:
        layers = {n.op_type for n in model.graph.node if n.op_type in WEIGHT_LAYERS and n.name not in exclude}
        if not layers:
            raise UnsupportedGraphError(f"{name}: nothing to quantize: onnxruntime quantizes Conv, MatMul and "
                                        f"Gemm layers, and this graph has none (outside --quantize-exclude)")
        if calibration is None:
            if not layers <= DYNAMIC_LAYERS:
                op = sorted(layers - DYNAMIC_LAYERS)[0]
                raise InputError(f"{name}: int8 quantization of a graph with {op} layers needs calibration "
                                 f"inputs (--calibrate CALIB.npz); dynamic quantization without them covers "
                                 f"MatMul/Gemm-only graphs")
            result, report = _dynamic(model, exclude, name), {"mode": "int8", "kind": "dynamic"}
        else:
            feeds = pick_samples(calibration.inputs, calib_samples)
            result = _static(model, feeds, exclude, name, activations)
            report = {"mode": "int8", "kind": f"static (QDQ, per-channel int8 weights, {activations} activations)",
                      "calibration_samples": len(next(iter(feeds.values())))}
        quantized = sum(n.op_type in QDQ_OPS for n in result.graph.node)
        if not quantized:
            raise UnsupportedGraphError(f"{name}: onnxruntime quantized no layer of this graph (its weight layers: "
                                        f"{', '.join(sorted(layers))})")
        report["excluded"] = list(exclude)
    report["debug_metadata_removed_bytes"] = _strip_debug_metadata(result)
    from .runtime import check_runs
    check_runs(result, model, name)          # the result runs, with the float model's output shapes
    result.metadata_props.add(key="onnxfuse.quantization", value=json.dumps(report, sort_keys=True))
    return result, report


def _strip_debug_metadata(model: onnx.ModelProto) -> int:
    """Drop the exporter's per-node debug records (torch.onnx's namespace, class hierarchy and FX node of every
    node) from an edge export: onnxruntime never reads them, and on a small model they are most of the file
    (the digits CNN: 9 of its 13 KB of graph). Returns the bytes removed."""
    removed = 0
    for node in model.graph.node:
        removed += sum(p.ByteSize() for p in node.metadata_props) + len(node.doc_string)
        del node.metadata_props[:]
        node.doc_string = ""
    return removed


def _refuse_quantized(model: onnx.ModelProto, name: str) -> None:
    for node in model.graph.node:
        if node.op_type in QDQ_OPS:
            raise InputError(f"{name}: already quantized (node '{node.name}', op {node.op_type}); quantize the "
                             f"float model")


@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime's quantization tools log advice through the root logger; the report says what was done."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _static(model: onnx.ModelProto, feeds: dict[str, np.ndarray], exclude, name: str,
            activations: str) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = batches(feeds, 64)

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="onnxfuse-quantize-") as tmp:
        source, pre, out = Path(tmp) / "in.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, source)
        try:
            with _quiet_logging():
                quant_pre_process(str(source), str(pre), skip_optimization=bool(exclude), skip_symbolic_shape=True)
        except Exception:        # an optimization (which would rename nodes to --exclude): go on without it
            pre = source
        try:
            with _quiet_logging():
                quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                                weight_type=QuantType.QInt8,
                                nodes_to_exclude=list(exclude) or None)
        except Exception as exc:
            raise UnsupportedGraphError(f"{name}: onnxruntime could not quantize this graph "
                                        f"({_first_line(exc)})") from None
        return onnx.load(str(out))


def _dynamic(model: onnx.ModelProto, exclude, name: str) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    with tempfile.TemporaryDirectory(prefix="onnxfuse-quantize-") as tmp:
        source, out = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, source)
        try:
            with _quiet_logging():
                quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8,
                                 nodes_to_exclude=list(exclude) or None)
        except Exception as exc:
            raise UnsupportedGraphError(f"{name}: onnxruntime could not quantize this graph "
                                        f"({_first_line(exc)})") from None
        return onnx.load(str(out))


def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    return convert_float_to_float16(model, keep_io_types=True)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
