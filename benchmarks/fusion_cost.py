#!/usr/bin/env python
"""Fusion cost of Neuron Transplantation vs. the I/O floor (the paper's fusion-cost table).

Two MLPs 3072 -> w -> w -> 10 (ReLU; Gemm with transB=1, weights [out, in] float32 and biases, as torch's
legacy exporter writes them) are generated with onnx.helper + numpy for w = 32, 64, ..., 16384, and for
every width we measure, each in a FRESH subprocess so that the peak RSS belongs to one measurement:

  merge  wall time of onnxfuse.fuse([a, b], "nt", output=out, force=True) (load + fuse + save) and its
         peak RSS (getrusage(RUSAGE_SELF).ru_maxrss), minus the idle RSS of the same interpreter after
         importing numpy, onnx and onnxfuse;
  floor  onnx.load of both members + onnx.save of a model the size of the output (member a, to a new
         path): the least any file-to-file fusion has to do;
  bytes  input bytes (both members) + output bytes (file sizes, external data included).

Widths <= 2048 are measured 3 times (median); larger ones once. The parent process stays small (it never
imports onnx or numpy) so that nothing inflates the children's ru_maxrss: on Linux the high-water mark
survives fork/vfork + exec.

    python benchmarks/fusion_cost.py                 # full table, w = 32 .. 16384 (several minutes)
    python benchmarks/fusion_cost.py --quick         # smoke run, w <= 1024 (prints, writes nothing)
    python benchmarks/fusion_cost.py --widths 512 8192
    python benchmarks/fusion_cost.py --profile 8192  # cProfile + per-phase time/RSS of one merge
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IN_FEATURES, CLASSES = 3072, 10
SMALL = 2048                      # widths up to this are repeated
# The paper's CPU numbers for NT (time excludes file I/O; memory is the process's, units as printed there).
PAPER = {512: (0.056, None), 1024: (0.146, None), 8192: (4.91, "3.65 GB"), 16384: (18.43, "10.98 GB")}
TARGET_WIDTH, TARGET_TIME_RATIO, TARGET_RSS_RATIO = 8192, 2.0, 1.5
MB = 1e6


# ============================================================================ children (fresh interpreters)

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _files_bytes(path: Path) -> int:
    """A model file plus its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _child_generate(width: int, folder: Path) -> dict:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dims = [IN_FEATURES, width, width, CLASSES]
    paths = []
    for member, seed in (("a", 0), ("b", 1)):
        rng = np.random.default_rng(seed)
        inits, nodes, x = [], [], "x"
        for layer, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
            idx = 2 * layer                      # nn.Sequential(Linear, ReLU, Linear, ReLU, Linear) numbering
            w = rng.standard_normal((fan_out, fan_in), dtype=np.float32)
            w *= np.float32(1.0 / np.sqrt(fan_in))
            b = rng.standard_normal(fan_out, dtype=np.float32) * np.float32(1.0 / np.sqrt(fan_in))
            inits += [numpy_helper.from_array(w, f"{idx}.weight"), numpy_helper.from_array(b, f"{idx}.bias")]
            del w
            last = layer == len(dims) - 2
            y = "logits" if last else f"/{idx}/Gemm_output_0"
            nodes.append(helper.make_node("Gemm", [x, f"{idx}.weight", f"{idx}.bias"], [y], name=f"/{idx}/Gemm",
                                          alpha=1.0, beta=1.0, transB=1))
            if not last:
                x = f"/{idx + 1}/Relu_output_0"
                nodes.append(helper.make_node("Relu", [y], [x], name=f"/{idx + 1}/Relu"))
        graph = helper.make_graph(
            nodes, "main_graph",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN_FEATURES])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  producer_name="pytorch", producer_version="2.13.0")
        model.ir_version = 8
        path = folder / f"mlp{width}_{member}.onnx"
        onnx.save(model, str(path))
        del model, graph, inits
        paths.append(str(path))
    return {"paths": paths}


def _child_measure(kind: str, a: str, b: str, out: str) -> dict:
    import gc
    import resource
    import numpy  # noqa: F401
    import onnx
    import onnxfuse

    gc.collect()
    idle_rss = _rss_kib("VmRSS") * 1024
    before = resource.getrusage(resource.RUSAGE_SELF)
    idle_maxrss = before.ru_maxrss * 1024
    start = time.perf_counter()
    if kind == "merge":
        onnxfuse.fuse([a, b], "nt", output=out, force=True)
    else:                                              # the I/O floor
        ma = onnx.load(a)
        onnx.load(b)
        onnx.save(ma, out)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    peak = after.ru_maxrss * 1024
    return {"kind": kind, "seconds": seconds, "idle_rss": idle_rss, "idle_maxrss": idle_maxrss,
            "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
            "peak_rss": peak, "vm_hwm": _rss_kib("VmHWM") * 1024,
            "in_bytes": _files_bytes(Path(a)) + _files_bytes(Path(b)), "out_bytes": _files_bytes(Path(out))}


def _child_versions() -> dict:
    import numpy
    import onnx
    import onnxfuse
    try:
        import onnxruntime
        ort = onnxruntime.__version__
    except Exception:                                   # pragma: no cover
        ort = "not installed"
    from google.protobuf.internal import api_implementation
    import google.protobuf
    return {"onnx": onnx.__version__, "onnxruntime": ort, "numpy": numpy.__version__,
            "onnxfuse": onnxfuse.__version__, "protobuf": f"{google.protobuf.__version__} ({api_implementation.Type()})",
            "python": platform.python_version()}


def _child_profile(a: str, b: str, out: str, top: int) -> None:
    """cProfile of one merge, plus wall time and RSS (current and high-water) around each phase."""
    import cProfile
    import gc
    import io
    import pstats
    import resource
    import onnxfuse
    import onnxfuse.api as api

    gc.collect()
    idle = _rss_kib("VmRSS") / 1024
    phases = []

    def wrap(module, name):
        fn = getattr(module, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases.append((name, time.perf_counter() - t, _rss_kib("VmRSS") / 1024,
                               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
        setattr(module, name, timed)

    for name in ("load_members", "_analyze_members", "channel_scores", "output_exactness", "transplant",
                 "save_model", "_count_params"):
        wrap(api, name)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    onnxfuse.fuse([a, b], "nt", output=out, force=True)
    prof.disable()
    total = time.perf_counter() - t
    print(f"merge of {Path(a).name} + {Path(b).name}: {total:.2f} s under cProfile; idle RSS {idle:.0f} MiB")
    print(f"{'phase (onnxfuse.api calls, in order)':40s} {'s':>7s} {'RSS after MiB':>14s} {'peak so far MiB':>16s}")
    for name, s, rss, hwm in phases:
        print(f"{name:40s} {s:7.2f} {rss:14.0f} {hwm:16.0f}")
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(top)
        print(f"\n--- cProfile, top {top} by {key} ---")
        print("\n".join(line for line in buf.getvalue().splitlines()
                        if line.strip() and not line.lstrip().startswith(("Ordered by", "List reduced"))))


def child_main(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "generate":
        result = _child_generate(int(argv[1]), Path(argv[2]))
    elif kind in ("merge", "floor"):
        result = _child_measure(kind, *argv[1:4])
    elif kind == "versions":
        result = _child_versions()
    elif kind == "profile":
        _child_profile(argv[1], argv[2], argv[3], int(argv[4]))
        return
    else:
        raise SystemExit(f"unknown child task {kind}")
    print("RESULT " + json.dumps(result), flush=True)


# ============================================================================ parent

def run_child(*args, capture: bool = True) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *map(str, args)]
    if not capture:
        subprocess.run(cmd, check=True)
        return None
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(map(str, args))} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def measure_width(width: int, folder: Path, repeats: int, log) -> dict:
    t = time.perf_counter()
    a, b = run_child("generate", width, folder)["paths"]
    log(f"w={width}: members written ({(Path(a).stat().st_size + Path(b).stat().st_size) / MB:.1f} MB, "
        f"{time.perf_counter() - t:.1f} s)")
    runs = {"merge": [], "floor": []}
    try:
        for r in range(repeats):
            for kind in ("floor", "merge"):          # alternate, so page-cache state is alike for both
                out = folder / f"{kind}{width}.onnx"
                try:
                    res = run_child(kind, a, b, out)
                finally:
                    _remove(out)
                runs[kind].append(res)
                log(f"w={width} {kind} #{r + 1}: {res['seconds']:.3f} s (user {res['user_s']:.2f} + sys "
                    f"{res['sys_s']:.2f}), load {os.getloadavg()[0]:.1f}, peak RSS "
                    f"{res['peak_rss'] / MB:.0f} MB (idle {res['idle_rss'] / MB:.0f} MB)")
    finally:
        _remove(Path(a))
        _remove(Path(b))

    def med(kind, key):
        return statistics.median(x[key] for x in runs[kind])

    def above(kind):
        return statistics.median(x["peak_rss"] - x["idle_rss"] for x in runs[kind])

    def cpu(kind):
        return statistics.median(x["user_s"] + x["sys_s"] for x in runs[kind])

    merge = runs["merge"][0]
    return {"width": width, "repeats": repeats,
            "merge_s": med("merge", "seconds"), "floor_s": med("floor", "seconds"),
            "merge_cpu": cpu("merge"), "floor_cpu": cpu("floor"),
            "merge_rss_above_idle": above("merge"), "floor_rss_above_idle": above("floor"),
            "idle_rss": med("merge", "idle_rss"),
            "in_bytes": merge["in_bytes"], "out_bytes": merge["out_bytes"], "runs": runs}


def _fmt_s(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.2f}"


def render(rows: list[dict], versions: dict, started: datetime.datetime, elapsed: float,
           loads: tuple[float, float]) -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    lines = [
        "# Fusion cost: Neuron Transplantation of two MLPs 3072 -> w -> w -> 10",
        "",
        f"- Machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {mem_gib:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}, {platform.processor() or platform.machine()}",
        f"- Date: {started:%Y-%m-%d %H:%M} (benchmark took {elapsed:.0f} s); 1-minute load average "
        f"{loads[0]:.1f} at the start, {loads[1]:.1f} at the end (other processes on the machine inflate wall "
        f"times; the CPU columns, user + sys of the child, are less sensitive to that)",
        f"- Versions: onnx {versions['onnx']}, onnxruntime {versions['onnxruntime']}, numpy {versions['numpy']}, "
        f"protobuf {versions['protobuf']}, onnxfuse {versions['onnxfuse']}, Python {versions['python']}",
        "- Members: Gemm(transB=1) + ReLU, float32 weights [out, in] + biases, random normal / sqrt(fan_in), "
        "seeds 0 and 1, one .onnx file each (written by `benchmarks/fusion_cost.py`).",
        "- **merge s**: wall time of `onnxfuse.fuse([a, b], \"nt\", output=out, force=True)` (load + check + "
        "fuse + save) in a fresh interpreter, imports excluded. **floor s**: `onnx.load(a)`, `onnx.load(b)`, "
        "`onnx.save(a, new path)` in a fresh interpreter: the file I/O any fusion has to do.",
        "- **RSS above idle**: `getrusage(RUSAGE_SELF).ru_maxrss` after the work minus the RSS of the same "
        "interpreter after importing numpy, onnx and onnxfuse. MB = 10^6 bytes. **in+out**: the file sizes of "
        "both members plus the output.",
        "- Widths <= 2048: median of 3 runs (each in its own process); larger widths: 1 run. Files are "
        "in the page cache (just written), for merge and floor alike.",
        "- Paper: the paper's CPU numbers for NT, for reference only; its time excludes file I/O, ours includes it.",
        "",
        "| w | merge s | floor s | merge/floor | merge CPU s | floor CPU s | CPU merge/floor "
        "| merge RSS above idle MB | floor RSS above idle MB | in+out MB | merge RSS/(in+out) "
        "| paper NT s | paper NT memory |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        io_bytes = r["in_bytes"] + r["out_bytes"]
        paper_s, paper_mem = PAPER.get(r["width"], (None, None))
        lines.append(
            f"| {r['width']} | {_fmt_s(r['merge_s'])} | {_fmt_s(r['floor_s'])} | {r['merge_s'] / r['floor_s']:.2f} "
            f"| {_fmt_s(r['merge_cpu'])} | {_fmt_s(r['floor_cpu'])} | {r['merge_cpu'] / r['floor_cpu']:.2f} "
            f"| {r['merge_rss_above_idle'] / MB:.0f} | {r['floor_rss_above_idle'] / MB:.0f} | {io_bytes / MB:.1f} "
            f"| {r['merge_rss_above_idle'] / io_bytes:.2f} | {paper_s if paper_s is not None else ''} "
            f"| {paper_mem or ''} |")
    if rows:
        lines.append("")
        lines.append(f"Idle interpreter RSS (numpy + onnx + onnxfuse imported): "
                     f"{statistics.median(r['idle_rss'] for r in rows) / MB:.0f} MB.")
    target = next((r for r in rows if r["width"] == TARGET_WIDTH), None)
    lines.append("")
    if target is None:
        lines.append(f"Targets (w={TARGET_WIDTH}): not measured in this run.")
    else:
        t_ratio = target["merge_s"] / target["floor_s"]
        c_ratio = target["merge_cpu"] / target["floor_cpu"]
        m_ratio = target["merge_rss_above_idle"] / (target["in_bytes"] + target["out_bytes"])
        lines += [
            f"Targets at w={TARGET_WIDTH}:",
            f"- merge <= {TARGET_TIME_RATIO:g}x the I/O floor: {t_ratio:.2f}x -> "
            f"**{'met' if t_ratio <= TARGET_TIME_RATIO else 'NOT met'}** (CPU time: {c_ratio:.2f}x)",
            f"- peak RSS above idle <= {TARGET_RSS_RATIO:g}x (input + output bytes): {m_ratio:.2f}x -> "
            f"**{'met' if m_ratio <= TARGET_RSS_RATIO else 'NOT met'}**",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", help="widths to measure (default: 32, 64, ..., 16384)")
    p.add_argument("--max-width", type=int, default=16384, help="largest width of the default list")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: widths up to 1024; prints only, unless --output is given")
    p.add_argument("--repeats", type=int, default=3, help=f"runs per width for widths <= {SMALL} (median)")
    p.add_argument("--output", type=Path, default=None,
                   help="markdown table (default: benchmarks/results/fusion_cost.md; none with --quick)")
    p.add_argument("--no-write", action="store_true", help="print only, do not write the markdown file")
    p.add_argument("--tmpdir", default=None, help="folder for the temporary models (default: system temp)")
    p.add_argument("--profile", type=int, metavar="W",
                   help="instead of the table: cProfile and per-phase RSS of one merge at width W")
    p.add_argument("--top", type=int, default=25, help="cProfile entries to show with --profile")
    args = p.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="onnxfuse-fusion-cost-", dir=args.tmpdir))
    try:
        if args.profile:
            a, b = run_child("generate", args.profile, folder)["paths"]
            run_child("profile", a, b, folder / "out.onnx", args.top, capture=False)
            return
        max_width = min(args.max_width, 1024) if args.quick else args.max_width
        widths = args.widths or [w for w in (2 ** k for k in range(5, 15)) if w <= max_width]
        if args.quick and args.widths:
            widths = [w for w in widths if w <= 1024]
        started, t0, load0 = datetime.datetime.now(), time.perf_counter(), os.getloadavg()[0]
        versions = run_child("versions")
        rows = []
        for w in widths:
            rows.append(measure_width(w, folder, args.repeats if w <= SMALL else 1,
                                      lambda msg: print(msg, file=sys.stderr, flush=True)))
        table = render(rows, versions, started, time.perf_counter() - t0, (load0, os.getloadavg()[0]))
        print(table)
        output = args.output or (None if args.quick else HERE / "results" / "fusion_cost.md")
        if output is not None and not args.no_write:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(table)
            print(f"written to {output}", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
