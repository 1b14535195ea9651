"""Sessions, random inputs and the peak-memory probe of `onnxfuse bench` (see bench.py).

This file imports only the standard library, numpy and onnxruntime, never onnx or onnxfuse: bench.py runs
its source in a fresh interpreter (`python -c`) to measure the memory of serving one model (or one ensemble)
with nothing else loaded, and imports it for the same session set-up and inputs in the timing process.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort

NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64, "tensor(uint32)": np.uint32, "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def make_session(path: str, providers: list[str], threads: int) -> ort.InferenceSession:
    """A session with fixed thread counts: `threads` intra-op threads, one inter-op thread, sequential."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=providers)


def random_feeds(session: ort.InferenceSession, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for every graph input: symbolic dimensions are `batch`; float inputs are standard normal,
    integer and boolean inputs zeros. Raises ValueError for other input types (strings, sequences, maps)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in session.get_inputs():
        dtype = NUMPY_TYPES.get(arg.type)
        if dtype is None:
            raise ValueError(f"input '{arg.name}' has type {arg.type}, for which no random data is made")
        shape = [d if isinstance(d, int) and d >= 0 else batch for d in arg.shape]
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[arg.name] = np.zeros(shape, dtype)
    return feeds


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def resident_bytes() -> int | None:
    """Current resident set size (Linux), else None."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_bytes() -> int | None:
    """Peak resident set size of this process.

    On Linux, VmHWM: the high-water mark of this process's own address space. (`ru_maxrss` would be wrong
    here: Linux carries the parent's high-water mark over fork/vfork + exec into the child's ru_maxrss.)
    Elsewhere ru_maxrss (bytes on macOS, KiB on other Unixes); None where neither exists.
    """
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def probe(spec: dict) -> dict:
    """Load the sessions of `spec["paths"]`, run each on every batch size `spec["runs"]` times, and return
    the idle resident size (after importing numpy and onnxruntime) and the peak resident size."""
    idle = resident_bytes()
    if idle is None:
        idle = peak_bytes()
    sessions = [make_session(p, spec["providers"], spec["threads"]) for p in spec["paths"]]
    for batch in spec["batch_sizes"]:
        feeds = [random_feeds(s, batch, spec.get("seed", 0)) for s in sessions]
        for _ in range(spec["runs"]):
            for session, feed in zip(sessions, feeds):
                session.run(None, feed)
    return {"idle_bytes": idle, "peak_bytes": peak_bytes()}


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
