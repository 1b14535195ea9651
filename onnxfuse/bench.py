"""Latency, throughput, file size and peak memory of ONNX models with onnxruntime (`onnxfuse bench`).

What is measured, per model and batch size:

- latency: wall time of one `session.run` (for an ensemble: one request = its N sessions run one after
  the other, then the mean of their float outputs, added in place), p50/p90/p99 and mean in ms;
  throughput = samples per second over all timed runs (batch size x runs / total time);
- inputs: random data matching the graph inputs (symbolic dimensions = the batch size; float inputs standard
  normal, integer and boolean inputs zeros), made once per model and batch size;
- sessions: `intra_op_num_threads` = `threads`, `inter_op_num_threads` = 1, sequential execution, default
  graph optimizations; the providers the session actually uses are reported (`session.get_providers()`);
- order: `warmup` runs of every model, then timing rounds that interleave the models (A B C, B C A, C A B,
  ...; each model runs for a slice of about 50 ms per round) until each had `seconds` of timing, so that
  machine noise hits all models alike;
- file size: the .onnx file plus the external data files its tensors point to (an ensemble: all members;
  a wide graph: the file `onnxfuse concat` writes);
- peak memory: a fresh interpreter per model and batch size imports numpy and onnxruntime, notes its
  resident size (idle), loads the session(s), runs each 3 times and reports its peak resident size minus
  idle (Linux: VmHWM, the peak of the fresh process's own address space; ru_maxrss would include the parent's
  peak, which Linux carries over exec). Host memory only: GPU memory is not counted.
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .api import fuse
from ._bench_probe import make_session, random_feeds
from .errors import InputError, OnnxFuseError
from .runtime import providers as provider_list

PROBE = Path(__file__).with_name("_bench_probe.py")
SLICE_S = 0.05          # time a model runs per interleaved round
MEMORY_RUNS = 3         # runs per session in the memory probe (onnxruntime's arenas grow on the first run)


@dataclass
class _Entry:
    """One thing that is timed: a model (one session), an ensemble (N sessions per request) or a wide graph."""
    name: str
    kind: str
    paths: list[str]
    file_bytes: int | None
    note: str | None = None
    sessions: list = field(default_factory=list)
    averaged: list[int] = field(default_factory=list)

    def request(self, feeds: list[dict]) -> list:
        if len(self.sessions) == 1:
            return self.sessions[0].run(None, feeds[0])
        outs = [s.run(None, f) for s, f in zip(self.sessions, feeds)]
        combined = outs[0]
        for i in self.averaged:         # the mean of the members' float outputs, in place (~1 us per member)
            mean = combined[i]
            for o in outs[1:]:
                mean += o[i]
            mean /= len(outs)
        return combined


def benchmark(models=(), ensemble=None, batch_sizes=(1, 32), provider: str = "cpu", threads: int = 1,
              warmup: int = 10, seconds: float = 2.0, memory: bool = True, wide: bool = True, seed: int = 0,
              log=None, data=None) -> list[dict]:
    """Time each of `models` and, given `ensemble` (2 or more files), the ensemble served as N sessions per
    request and (if the members can be concatenated) its wide graph, at every batch size.

    Returns one row per batch size and model: name, kind ('model' | 'ensemble' | 'wide'), sessions,
    batch_size, provider (requested), providers (used by the session), threads, p50_ms, p90_ms, p99_ms,
    mean_ms, throughput (samples/s), runs, file_bytes, peak_memory_bytes (None without `memory`),
    p50_vs_first (p50 / the first row's p50 at that batch size) and note. A wide graph that cannot be built
    gives a row with its reason in `note`, `skipped` True and no figures.
    Models are paths or onnx.ModelProto objects. With `data` (an .npz with labels), every row also has the
    entry's `accuracy` and `loss` on it (an ensemble: of the mean of its members' logits), so that float,
    int8 and fp16 versions can be compared side by side.
    """
    models = [models] if isinstance(models, (str, Path, onnx.ModelProto)) else list(models or ())
    ensemble = list(ensemble or ())
    batch_sizes = [int(b) for b in batch_sizes]
    if not models and not ensemble:
        raise OnnxFuseError("nothing to benchmark: give one or more models and/or --ensemble files")
    if ensemble and len(ensemble) < 2:
        raise OnnxFuseError(f"an ensemble needs at least 2 models, got {len(ensemble)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise OnnxFuseError(f"batch sizes must be positive integers, got {batch_sizes}")
    if threads < 1 or warmup < 0 or not seconds > 0:
        raise OnnxFuseError("--threads must be >= 1, --warmup >= 0 and --seconds > 0")
    used_providers = provider_list(provider)   # raises for cuda where onnxruntime has no CUDA provider
    log = log or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="onnxfuse-bench-") as tmp:
        tmp = Path(tmp)
        entries = [_entry(m, i, tmp) for i, m in enumerate(models)]
        skipped = None
        if ensemble:
            paths = [_as_path(m, len(models) + i, tmp) for i, m in enumerate(ensemble)]
            n = len(paths)
            entries.append(_Entry(f"ensemble of {n} ({n} sessions)", "ensemble", [str(p) for p in paths],
                                  sum(_file_bytes(p) for p in paths)))
            if wide:
                built = _wide_entry(ensemble, n, tmp, log)
                if isinstance(built, _Entry):
                    entries.append(built)
                else:
                    skipped = _skipped_row(f"wide graph of {n} (concat)", built, provider, threads)
        quality = _quality(entries, data) if data is not None else {}
        for e in entries:
            e.sessions = [_session(p, e.name, used_providers, threads, provider) for p in e.paths]
            e.averaged = [i for i, o in enumerate(e.sessions[0].get_outputs())
                          if o.type in ("tensor(float)", "tensor(double)", "tensor(float16)")]
        rows, timed = [], []
        for batch in batch_sizes:
            log(f"batch size {batch}: {warmup} warm-up runs, then {seconds:g} s of interleaved timing per model")
            feeds = [[_feeds(s, batch, seed, e.name) for s in e.sessions] for e in entries]
            latencies = _time_interleaved(entries, feeds, warmup, seconds)
            batch_rows = [{**_row(e, batch, ns, provider, threads), **quality.get(e.name, {})}
                          for e, ns in zip(entries, latencies)]
            timed.extend(zip(batch_rows, entries))
            if skipped is not None:
                batch_rows.append({**skipped, "batch_size": batch})
            first = batch_rows[0]["p50_ms"]
            for r in batch_rows:
                r["p50_vs_first"] = None if r["p50_ms"] is None or not first else round(r["p50_ms"] / first, 4)
            rows.extend(batch_rows)
        for e in entries:
            e.sessions = []
        if memory:
            for r, e in timed:
                log(f"peak memory of {e.name} at batch size {r['batch_size']} (fresh process)")
                r["peak_memory_bytes"], note = _peak_memory(e, used_providers, threads, r["batch_size"], seed)
                if note:
                    r["note"] = "; ".join(filter(None, [r["note"], note]))
    return rows


def environment(provider: str = "cpu", threads: int = 1) -> dict:
    """Machine and versions, for the header of a report."""
    import onnxruntime as ort
    from . import __version__
    return {"onnxfuse": __version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "processor": _cpu_name(), "cpus": os.cpu_count(), "available_providers": ort.get_available_providers(),
            "provider": provider, "threads": threads}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _as_path(source, index: int, tmp: Path) -> Path:
    if isinstance(source, onnx.ModelProto):
        path = tmp / f"model_{index}.onnx"
        onnx.save(source, str(path))
        return path
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    return path


def _entry(source, index: int, tmp: Path) -> _Entry:
    path = _as_path(source, index, tmp)
    name = (source.graph.name or f"model {index}") if isinstance(source, onnx.ModelProto) else path.name
    return _Entry(name, "model", [str(path)], _file_bytes(path))


def _wide_entry(ensemble, n: int, tmp: Path, log):
    """The ensemble's wide graph (`onnxfuse concat`) as an entry, or the reason it cannot be built."""
    log(f"building the wide graph of the {n} ensemble members (onnxfuse concat)")
    path = tmp / "wide.onnx"
    try:
        report = fuse(ensemble, "concat", output=path).report
    except OnnxFuseError as exc:
        return f"skipped, the members cannot be concatenated: {exc}"
    note = None
    if not report.exact:
        note = "not exactly the ensemble: " + "; ".join(v for v in report.outputs.values() if v.startswith("not exact"))
    return _Entry(f"wide graph of {n} (concat)", "wide", [str(path)], _file_bytes(path), note)


def _quality(entries: list[_Entry], data) -> dict[str, dict]:
    """Accuracy and loss of every entry on `data` (an ensemble: of its members' mean logits)."""
    from .data import load_data
    from .runtime import Runner, scores
    dataset = load_data(data, onnx.load(entries[0].paths[0], load_external_data=False))
    return {e.name: scores(np.mean([Runner(p)(dataset) for p in e.paths], axis=0), dataset.y) for e in entries}


def plot_accuracy_latency(rows: list[dict], path) -> Path:
    """One point per model (members, ensemble, wide graph, fused model and its int8/fp16 versions): accuracy
    against p50 latency, one panel per batch size."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'onnxfuse[bench]'") from None
    rows = [r for r in rows if r.get("accuracy") is not None and r["p50_ms"] is not None]
    if not rows:
        raise InputError("--plot needs --data with labels (accuracy against latency)")
    batches = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for r in (r for r in rows if r["batch_size"] == batch):
            ax.scatter(r["p50_ms"], 100 * r["accuracy"], s=36)
            ax.annotate(r["name"], (r["p50_ms"], 100 * r["accuracy"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("p50 latency (ms, log scale)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"batch size {batch}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _skipped_row(name: str, reason: str, provider: str, threads: int) -> dict:
    return {"name": name, "kind": "wide", "sessions": 1, "batch_size": None, "provider": provider,
            "providers": None, "threads": threads, "p50_ms": None, "p90_ms": None, "p99_ms": None,
            "mean_ms": None, "throughput": None, "runs": 0, "file_bytes": None, "peak_memory_bytes": None,
            "note": reason, "skipped": True}


def _file_bytes(path: Path) -> int:
    """Size of the model file plus the external data files its tensors point to (inside its folder only)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
    folder = path.resolve().parent
    files = set()
    for t in _tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in t.external_data}.get("location", "")
        target = (folder / location).resolve() if isinstance(location, str) and location else None
        if target is None or os.path.isabs(location) or folder not in target.parents:
            raise InputError(f"{path}: tensor '{t.name}' points to external data '{location}' outside the "
                             f"model's folder; refused")
        if not target.is_file():
            raise InputError(f"{path}: external data file '{location}' of tensor '{t.name}' is missing")
        files.add(target)
    return path.stat().st_size + sum(f.stat().st_size for f in files)


def _tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def _session(path: str, name: str, providers: list[str], threads: int, requested: str):
    try:
        session = make_session(path, providers, threads)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OnnxFuseError(f"{name}: onnxruntime cannot load it: {first[:300]}") from None
    check_providers(name, requested, session.get_providers())
    return session


def check_providers(name: str, requested: str, used: list[str]) -> None:
    """onnxruntime falls back to the CPU silently when CUDA cannot be used: refuse to report such figures
    as CUDA figures."""
    if requested == "cuda" and "CUDAExecutionProvider" not in used:
        raise OnnxFuseError(f"{name}: CUDA was asked for but onnxruntime fell back to {', '.join(used)} "
                            f"(CUDAExecutionProvider is installed but could not be used: check the CUDA and "
                            f"cuDNN libraries)")


def _feeds(session, batch: int, seed: int, name: str) -> dict:
    try:
        return random_feeds(session, batch, seed)
    except ValueError as exc:
        raise OnnxFuseError(f"{name}: {exc}") from None


def _time_interleaved(entries: list[_Entry], feeds: list, warmup: int, seconds: float) -> list[list[int]]:
    """Latencies (ns) of every entry: warm-up, then rounds in which each entry runs for one time slice,
    the starting entry rotating from round to round, until each has had about `seconds` of runs."""
    for e, f in zip(entries, feeds):
        for _ in range(warmup):
            e.request(f)
    rounds = max(3, math.ceil(seconds / SLICE_S))
    slice_ns = int(seconds / rounds * 1e9)
    times = [[] for _ in entries]
    k = len(entries)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    clock = time.perf_counter_ns
    try:
        for r in range(rounds):
            for j in range(k):
                i = (r + j) % k
                request, feed, out = entries[i].request, feeds[i], times[i]
                end = clock() + slice_ns
                while True:
                    t0 = clock()
                    request(feed)
                    t1 = clock()
                    out.append(t1 - t0)
                    if t1 >= end:
                        break
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _row(e: _Entry, batch: int, ns: list[int], provider: str, threads: int) -> dict:
    ms = np.asarray(ns, dtype=np.float64) / 1e6
    p50, p90, p99 = (round(float(v), 6) for v in np.percentile(ms, [50, 90, 99]))
    return {"name": e.name, "kind": e.kind, "sessions": len(e.paths), "batch_size": batch, "provider": provider,
            "providers": e.sessions[0].get_providers(), "threads": threads,
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": round(float(ms.mean()), 6),
            "throughput": round(float(batch * len(ms) / (ms.sum() / 1e3)), 1), "runs": len(ms),
            "file_bytes": e.file_bytes, "peak_memory_bytes": None, "note": e.note}


def _peak_memory(e: _Entry, providers: list[str], threads: int, batch: int, seed: int):
    """(peak resident bytes above the idle interpreter, note) of serving `e` in a fresh process."""
    spec = {"paths": [str(Path(p).resolve()) for p in e.paths], "providers": providers, "threads": threads,
            "batch_sizes": [batch], "runs": MEMORY_RUNS, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="onnxfuse-probe-") as cwd:
        proc = subprocess.run([sys.executable, "-c", PROBE.read_text(), json.dumps(spec)], capture_output=True,
                              text=True, cwd=cwd)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return None, f"peak memory not measured ({why[:200]})"
    if result["peak_bytes"] is None or result["idle_bytes"] is None:
        return None, "peak memory not measured (no way to read it on this platform)"
    return max(0, result["peak_bytes"] - result["idle_bytes"]), None
