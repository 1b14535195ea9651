"""The one place onnxfuse opens an onnxruntime session (imported lazily: `inspect` works without onnxruntime).

`_bench_probe.py` keeps its own: it runs in a fresh process that must import nothing but numpy and onnxruntime."""
from __future__ import annotations

import onnx


def session(source, threads: int | None = None, providers=("CPUExecutionProvider",), log_level: int = 3,
            extra_outputs=(), optimize: bool = True):
    """An InferenceSession of `source` (a ModelProto, a path or serialized bytes). `threads`: intra-op threads
    (inter-op 1), None for onnxruntime's default; `log_level` 3 shows errors only, 4 nothing;
    `extra_outputs`: intermediate values to return as well (added to a copy of the graph); `optimize=False`:
    the graph as written, without onnxruntime's fusions (whose nodes an error message would name)."""
    import onnxruntime as ort
    if extra_outputs:
        copy = onnx.ModelProto()
        copy.CopyFrom(source)
        have = {o.name for o in copy.graph.output}
        for name in extra_outputs:
            if name not in have:
                copy.graph.output.add(name=name)
                have.add(name)
        source = copy
    options = ort.SessionOptions()
    options.log_severity_level = log_level
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    data = source.SerializeToString() if isinstance(source, onnx.ModelProto) else \
        source if isinstance(source, bytes) else str(source)
    return ort.InferenceSession(data, options, providers=list(providers))
