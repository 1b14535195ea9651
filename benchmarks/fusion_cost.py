#!/usr/bin/env python
"""Fusion cost of Neuron Transplantation vs. the I/O floor (the paper's fusion-cost table).

Two MLPs 3072 -> w -> w -> 10 (ReLU; Gemm with transB=1, weights [out, in] float32 and biases, as torch's
legacy exporter writes them) are generated with onnx.helper + numpy for w = 32, 64, ..., 16384, and for
every width we measure, each in a FRESH subprocess so that the peak RSS belongs to one measurement:

  merge  wall time of onnxfuse.fuse([a, b], "nt", output=out, force=True) (load + fuse + save) and its
         peak RSS (VmHWM, _common.peak_memory), minus the idle RSS of the same interpreter after importing
         numpy, onnx and onnxfuse;
  floor  onnx.load of both members + onnx.save of a model the size of the output (member a, to a new
         path): the least any file-to-file fusion has to do;
  bytes  input bytes (both members) + output bytes (file sizes, external data included).

Widths <= 2048 are measured 3 times (median); larger ones once.

    python benchmarks/fusion_cost.py                 # full table, w = 32 .. 16384 (several minutes)
    python benchmarks/fusion_cost.py --quick --out /tmp/q   # smoke run: w = 32 and 64, one run each
    python benchmarks/fusion_cost.py --widths 512 8192
    python benchmarks/fusion_cost.py --profile 8192  # cProfile + per-phase time/RSS of one merge
"""
from __future__ import annotations

import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (MB, child_result, cli, files_bytes, md_table, onnx_mlp, peak_memory, proc_status, run_child,
                     stamp, write_results)

IN_FEATURES, CLASSES = 3072, 10
SMALL = 2048                      # widths up to this are repeated
# The paper's CPU numbers for NT (time excludes file I/O; memory is the process's, units as printed there).
PAPER = {512: (0.056, None), 1024: (0.146, None), 8192: (4.91, "3.65 GB"), 16384: (18.43, "10.98 GB")}
TARGET_WIDTH, TARGET_TIME_RATIO, TARGET_RSS_RATIO = 8192, 2.0, 1.5


# ============================================================================ children (fresh interpreters)

def _child_generate(width: int, folder: Path) -> dict:
    import onnx
    paths = []
    for member, seed in (("a", 0), ("b", 1)):
        path = folder / f"mlp{width}_{member}.onnx"
        onnx.save(onnx_mlp([IN_FEATURES, width, width, CLASSES], seed), str(path))
        paths.append(str(path))
    return {"paths": paths}


def _child_measure(kind: str, a: str, b: str, out: str) -> dict:
    import gc
    import resource
    import numpy  # noqa: F401
    import onnx
    import onnxfuse

    gc.collect()
    idle_rss = proc_status("VmRSS")
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if kind == "merge":
        onnxfuse.fuse([a, b], "nt", output=out, force=True)
    else:                                              # the I/O floor
        ma = onnx.load(a)
        onnx.load(b)
        onnx.save(ma, out)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"kind": kind, "seconds": seconds, "idle_rss": idle_rss,
            "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
            "peak_rss": peak_memory(),
            "in_bytes": files_bytes(Path(a)) + files_bytes(Path(b)), "out_bytes": files_bytes(Path(out))}


def _child_profile(a: str, b: str, out: str, top: int) -> None:
    """cProfile of one merge, plus wall time and RSS (current and high-water) around each phase."""
    import cProfile
    import gc
    import io
    import pstats
    import onnxfuse
    import onnxfuse.api as api

    gc.collect()
    idle = proc_status("VmRSS") / 2 ** 20
    phases = []

    def timed(name, fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases.append((name, time.perf_counter() - t, proc_status("VmRSS") / 2 ** 20, peak_memory() / 2 ** 20))
        return run

    from onnxfuse import select
    from onnxfuse.methods import nt
    for name in ("load_members", "_analyze_members", "output_exactness", "save_model", "_count_params"):
        setattr(api, name, timed(name, getattr(api, name)))
    nt.transplant = timed("transplant", nt.transplant)
    select.IMPORTANCE["magnitude"] = timed("channel_scores", select.IMPORTANCE["magnitude"])
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
        child_result(_child_generate(int(argv[1]), Path(argv[2])))
    elif kind in ("merge", "floor"):
        child_result(_child_measure(kind, *argv[1:4]))
    elif kind == "profile":
        _child_profile(argv[1], argv[2], argv[3], int(argv[4]))
    else:
        raise SystemExit(f"unknown child task {kind}")


# ============================================================================ parent

def child(*args) -> dict:
    return run_child(__file__, *args)


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def measure_width(width: int, folder: Path, repeats: int, log) -> dict:
    t = time.perf_counter()
    a, b = child("generate", width, folder)["paths"]
    log(f"w={width}: members written ({(Path(a).stat().st_size + Path(b).stat().st_size) / MB:.1f} MB, "
        f"{time.perf_counter() - t:.1f} s)")
    runs = {"merge": [], "floor": []}
    try:
        for r in range(repeats):
            for kind in ("floor", "merge"):          # alternate, so page-cache state is alike for both
                out = folder / f"{kind}{width}.onnx"
                try:
                    res = child(kind, a, b, out)
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


def render(rows: list[dict], started: datetime.datetime, elapsed: float,
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
        "- Members: Gemm(transB=1) + ReLU, float32 weights [out, in] + biases, random normal / sqrt(fan_in), "
        "seeds 0 and 1, one .onnx file each (written by `benchmarks/fusion_cost.py`).",
        "- **merge s**: wall time of `onnxfuse.fuse([a, b], \"nt\", output=out, force=True)` (load + check + "
        "fuse + save) in a fresh interpreter, imports excluded. **floor s**: `onnx.load(a)`, `onnx.load(b)`, "
        "`onnx.save(a, new path)` in a fresh interpreter: the file I/O any fusion has to do.",
        "- **RSS above idle**: the peak resident size (VmHWM) after the work minus the RSS of the same "
        "interpreter after importing numpy, onnx and onnxfuse. MB = 10^6 bytes. **in+out**: the file sizes of "
        "both members plus the output.",
        "- Widths <= 2048: median of 3 runs (each in its own process); larger widths: 1 run. Files are "
        "in the page cache (just written), for merge and floor alike.",
        "- Paper: the paper's CPU numbers for NT, for reference only; its time excludes file I/O, ours includes it.",
        "",
    ]
    table = []
    for r in rows:
        io_bytes = r["in_bytes"] + r["out_bytes"]
        paper_s, paper_mem = PAPER.get(r["width"], (None, None))
        table.append([r["width"], _fmt_s(r["merge_s"]), _fmt_s(r["floor_s"]), f"{r['merge_s'] / r['floor_s']:.2f}",
                      _fmt_s(r["merge_cpu"]), _fmt_s(r["floor_cpu"]), f"{r['merge_cpu'] / r['floor_cpu']:.2f}",
                      f"{r['merge_rss_above_idle'] / MB:.0f}", f"{r['floor_rss_above_idle'] / MB:.0f}",
                      f"{io_bytes / MB:.1f}", f"{r['merge_rss_above_idle'] / io_bytes:.2f}",
                      "" if paper_s is None else paper_s, paper_mem or ""])
    lines += md_table(["w", "merge s", "floor s", "merge/floor", "merge CPU s", "floor CPU s", "CPU merge/floor",
                       "merge RSS above idle MB", "floor RSS above idle MB", "in+out MB", "merge RSS/(in+out)",
                       "paper NT s", "paper NT memory"], table, "r" * 13)
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
    p = cli(__doc__, "widths 32 and 64, one run each")
    p.add_argument("--widths", type=int, nargs="+", help="widths to measure (default: 32, 64, ..., 16384)")
    p.add_argument("--max-width", type=int, default=16384, help="largest width of the default list")
    p.add_argument("--repeats", type=int, default=3, help=f"runs per width for widths <= {SMALL} (median)")
    p.add_argument("--tmpdir", default=None, help="folder for the temporary models (default: system temp)")
    p.add_argument("--profile", type=int, metavar="W",
                   help="instead of the table: cProfile and per-phase RSS of one merge at width W")
    p.add_argument("--top", type=int, default=25, help="cProfile entries to show with --profile")
    args = p.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="onnxfuse-fusion-cost-", dir=args.tmpdir))
    try:
        if args.profile:
            a, b = child("generate", args.profile, folder)["paths"]
            subprocess.run([sys.executable, __file__, "--child", "profile", a, b, folder / "out.onnx", str(args.top)],
                           check=True)
            return
        widths = args.widths or [w for w in (2 ** k for k in range(5, 15)) if w <= args.max_width]
        repeats = args.repeats
        if args.quick:
            widths, repeats = [32, 64], 1
        st, started, t0, load0 = stamp(), datetime.datetime.now(), time.perf_counter(), os.getloadavg()[0]
        rows = []
        for w in widths:
            rows.append(measure_width(w, folder, repeats if w <= SMALL else 1,
                                      lambda msg: print(msg, file=sys.stderr, flush=True)))
        table = render(rows, started, time.perf_counter() - t0, (load0, os.getloadavg()[0]))
        print(table)
        write_results(args.out, "fusion_cost", table, {"quick": args.quick, "rows": rows}, st)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
