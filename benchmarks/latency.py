#!/usr/bin/env python
"""Serving cost of a fused model versus one member, the ensemble (N sessions) and the wide graph.

The deployment claim of Neuron Transplantation: the fused model costs what one member costs (p50 latency
<= 1.05 x the member's), while serving the ensemble costs about N times as much. For each set of members

  - the two sample digits CNNs (sample_models/digits_cnn_{0,1}.onnx, external data),
  - the two sample digits MLPs (sample_models/digits_mlp_{0,1}.onnx),
  - 2 and 4 MLPs 784 -> 1024 -> 1024 -> 10 (Gemm transB=1 + ReLU, float32, random normal / sqrt(fan_in)
    weights written with onnx.helper, one seed per member),

the members are fused with `onnxfuse.merge(members, output=...)` (no fine-tuning: weights do not change the
cost), and `onnxfuse.benchmark([member 0, fused], ensemble=members, batch_sizes=(1, 32), threads=1)` times
member 0, the fused model, the ensemble (its N sessions run one after the other per request, plus the mean of
their outputs) and the wide graph (`onnxfuse concat`, one session), interleaved, on the CPU with one
intra-op thread. See onnxfuse/bench.py for how latency, file size and peak memory are measured.

    python benchmarks/latency.py               # about 3 minutes on 2 CPU cores
    python benchmarks/latency.py --seconds 1   # shorter timing per model and batch size
    python benchmarks/latency.py --quick --out /tmp/q   # smoke run: sample MLPs and two small MLPs, 0.1 s

Writes benchmarks/results/latency.md, latency.json and (with matplotlib: pip install -e ".[bench]")
latency.png.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from _common import MB, SAMPLES, cli, md_table, onnx_mlp, stamp, write_results
import onnxfuse  # noqa: E402  (the checkout's: _common puts it first on sys.path)

BATCH_SIZES = (1, 32)
ROLES = ("member", "fused", "ensemble", "wide")
LABELS = {"member": "member", "fused": "fused (NT)", "ensemble": "ensemble (N sessions)",
          "wide": "wide graph (concat)"}


def member_sets(tmp: Path, quick: bool) -> list[dict]:
    """The sample CNNs and MLPs and 2 and 4 generated MLPs (--quick: the sample MLPs and 2 small MLPs)."""
    big = [784, 64, 64, 10] if quick else [784, 1024, 1024, 10]
    bigs = []
    for seed in range(2 if quick else 4):
        bigs.append(tmp / f"mlp{big[1]}_{seed}.onnx")
        onnx.save(onnx_mlp(big, seed), str(bigs[-1]))
    sets = [{"models": "digits CNN (sample)", "members": [SAMPLES / f"digits_cnn_{i}.onnx" for i in range(2)]},
            {"models": "digits MLP (sample)", "members": [SAMPLES / f"digits_mlp_{i}.onnx" for i in range(2)]},
            {"models": "MLP " + "-".join(map(str, big)), "members": bigs[:2]},
            {"models": "MLP " + "-".join(map(str, big)), "members": bigs}]
    return sets[1:3] if quick else sets


def measure(sets: list[dict], tmp: Path, seconds: float, warmup: int, memory: bool) -> list[dict]:
    results = []
    for k, s in enumerate(sets):
        n = len(s["members"])
        fused = tmp / f"fused_{k}.onnx"
        onnxfuse.merge([str(m) for m in s["members"]], output=str(fused))
        print(f"{s['models']}, N = {n}: timing member, fused, ensemble, wide graph", file=sys.stderr)
        rows = onnxfuse.benchmark([str(s["members"][0]), str(fused)], ensemble=[str(m) for m in s["members"]],
                                  batch_sizes=BATCH_SIZES, provider="cpu", threads=1, warmup=warmup,
                                  seconds=seconds, memory=memory)
        for batch in BATCH_SIZES:
            of_batch = [r for r in rows if r["batch_size"] == batch]
            assert [r["kind"] for r in of_batch] == ["model", "model", "ensemble", "wide"], of_batch
            results.append({"models": s["models"], "n": n, "batch_size": batch,
                            **{role: r for role, r in zip(ROLES, of_batch)}})
    return results


def ratio(result: dict, role: str) -> float | None:
    r = result[role]
    return None if r.get("skipped") else r["p50_ms"] / result["member"]["p50_ms"]


def fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render(results: list[dict], st: dict, started: datetime.datetime, elapsed: float, seconds: float,
           warmup: int, loads: tuple) -> str:
    lines = [
        "# Latency: fused model vs member, ensemble and wide graph (onnxruntime, CPU, 1 thread)",
        "",
        f"- Machine: {st['cpu']}, {st['cores']} CPUs, {st['platform']}; shared with other work "
        f"(1-minute load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end), so absolute times "
        "are indicative; the ratios are measured on interleaved runs and are less sensitive to that.",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M')} UTC; the benchmark took {elapsed:.0f} s.",
        "- Reproduce: `python benchmarks/latency.py` (or, for any models, `onnxfuse bench member.onnx "
        "fused.onnx --ensemble a.onnx b.onnx`).",
        "- What: for each set of N members, `onnxfuse.merge(members)` (no fine-tuning; weights do not change "
        "the cost), then `onnxfuse.benchmark([member 0, fused], ensemble=members, batch_sizes=(1, 32), "
        f"provider='cpu', threads=1, warmup={warmup}, seconds={seconds:g})`: onnxruntime "
        "CPUExecutionProvider, intra-op threads 1, inter-op threads 1, default graph optimizations; random "
        "inputs (symbolic dims = batch size); the four contenders' timing rounds are interleaved (about 50 ms "
        f"each per round) until each had {seconds:g} s. **ensemble**: one request = the N member sessions run "
        "one after the other plus the mean of their outputs; **wide graph**: `onnxfuse concat` of the members, "
        "one session.",
        "- p50/p90/p99: latency of one request in ms. samples/s: batch size x requests / time. File: the .onnx "
        "plus its external data (MB = 10^6 bytes). Peak memory: a fresh interpreter loads the session(s) and "
        "runs each 3 times at that batch size; peak resident size (Linux VmHWM) minus its resident size after "
        "importing numpy and onnxruntime.",
        "- MLP 784-1024-1024-10: float32 Gemm(transB=1) + ReLU, random weights, one seed per member "
        "(generated by the script).",
        "",
        "## p50 latency relative to one member",
        "",
    ]
    table = []
    for res in results:
        f, e, w = ratio(res, "fused"), ratio(res, "ensemble"), ratio(res, "wide")
        table.append([res["models"], res["n"], res["batch_size"], *(fmt(res[role]["p50_ms"], 4) for role in ROLES),
                      fmt(f), fmt(e, 2), fmt(e / res["n"], 2), fmt(w, 2), "yes" if f <= 1.05 else "**no**"])
    lines += md_table(["models", "N", "batch", "member p50 ms", "fused p50 ms", "ensemble p50 ms", "wide p50 ms",
                       "fused / member", "ensemble / member", "ensemble / (N x member)", "wide / member",
                       "fused <= 1.05 x member"], table, "lrrrrrrrrrrl")
    fused = [ratio(r, "fused") for r in results]
    per_n = {}
    for r in results:
        per_n.setdefault(r["n"], []).append(ratio(r, "ensemble"))
    lines += [
        "",
        "## Findings",
        "",
        f"- Fused / member p50: {sum(x <= 1.05 for x in fused)} of {len(fused)} cases within 1.05 "
        f"(range {min(fused):.3f} .. {max(fused):.3f}). The fused model has the member's graph and layer widths, "
        "so it runs the same kernels; the differences are noise.",
    ]
    for n, values in sorted(per_n.items()):
        lines.append(f"- Ensemble / member p50 for N = {n}: {min(values):.2f} .. {max(values):.2f} "
                     f"(ensemble / (N x member): {min(values) / n:.2f} .. {max(values) / n:.2f}).")
    lines.append("- Where the ensemble costs more than N x a member: a request also pays N x onnxruntime's per-call "
                 "overhead and the averaging of the outputs, which dominate for the tiny sample models (a member "
                 "runs in microseconds); and N members' weights compete for the CPU caches, while one member "
                 "timed alone keeps its weights cached." + _read_rates(results))
    wides = [(r["n"], r["batch_size"], ratio(r, "wide")) for r in results if r["models"].startswith("MLP 784")]
    if wides:
        lines.append("- Wide graph / member p50 on the 784-1024-1024-10 MLPs: "
                     + ", ".join(f"N = {n}, batch {b}: {fmt(x, 2)}" for n, b, x in wides)
                     + ". One session saves the per-call overheads, but `concat` stores each hidden-to-hidden "
                       "weight as a dense block-diagonal matrix (N^2 x a member's, N x the whole ensemble's), so "
                       "for wide hidden layers the wide graph is slower than the ensemble. It is the exact "
                       "ensemble in one file, not a way to serve it faster.")
    lines += [
        "",
        "## All rows",
        "",
    ]
    table = []
    for res in results:
        for role in ROLES:
            r, mem = res[role], res[role].get("peak_memory_bytes")
            table.append([res["models"], res["n"], res["batch_size"], LABELS[role],
                          *([r["note"], *[""] * 6] if r.get("skipped") else
                            [fmt(r["p50_ms"], 4), fmt(r["p90_ms"], 4), fmt(r["p99_ms"], 4), f"{r['throughput']:,.0f}",
                             r["runs"], f"{r['file_bytes'] / MB:.3f}", "-" if mem is None else f"{mem / MB:.1f}"])])
    lines += md_table(["models", "N", "batch", "what", "p50 ms", "p90 ms", "p99 ms", "samples/s", "runs", "file MB",
                       "peak memory MB"], table, "lrrlrrrrrrr")
    notes = sorted({f"{res['models']} (N = {res['n']}), {LABELS[role]}: {res[role]['note']}"
                    for res in results for role in ROLES if res[role]["note"] and not res[role].get("skipped")})
    if notes:
        lines += ["", *[f"- Note: {n}" for n in notes]]
    lines.append("")
    return "\n".join(lines)


def _read_rates(results: list[dict]) -> str:
    """Weight bytes per request / p50 at batch 1 for the largest MLP set: a cached rate vs a memory-bound one."""
    big = [r for r in results if r["models"].startswith("MLP 784") and r["batch_size"] == 1]
    if not big:
        return ""
    r = max(big, key=lambda r: r["n"])
    rate = {role: r[role]["file_bytes"] / (r[role]["p50_ms"] / 1e3) / 1e9 for role in ("member", "ensemble")}
    text = (f" At batch 1 (N = {r['n']}, 784-1024-1024-10), file bytes / p50 is {rate['member']:.0f} GB/s for "
            f"one member ({r['member']['file_bytes'] / MB:.1f} MB of weights) and {rate['ensemble']:.0f} GB/s for "
            f"the ensemble ({r['ensemble']['file_bytes'] / MB:.1f} MB per request)")
    if rate["member"] > 1.5 * rate["ensemble"]:
        text += (": one member's weights stay in the caches, the ensemble's are read at memory bandwidth, "
                 "so it costs more than N x a member")
    return text + "."


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e \".[bench]\"): no plot written", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(BATCH_SIZES), figsize=(6 * len(BATCH_SIZES), 4.5), sharey=True)
    colors = {"fused": "tab:green", "ensemble": "tab:red", "wide": "tab:blue"}
    for ax, batch in zip(np.atleast_1d(axes), BATCH_SIZES):
        of_batch = [r for r in results if r["batch_size"] == batch]
        x = np.arange(len(of_batch))
        for j, role in enumerate(("fused", "ensemble", "wide")):
            values = [ratio(r, role) or 0.0 for r in of_batch]
            bars = ax.bar(x + (j - 1) * 0.27, values, 0.27, color=colors[role], label=LABELS[role])
            ax.bar_label(bars, labels=[f"{v:.2f}" if v else "n/a" for v in values], fontsize=7, padding=1)
        ax.scatter(x, [r["n"] for r in of_batch], marker="_", s=400, color="black", zorder=3, label="N")
        ax.axhline(1.05, color="tab:green", linestyle="--", linewidth=0.8, label="1.05 x member")
        ax.axhline(1.0, color="gray", linewidth=0.6)
        ax.set_yscale("log")
        ax.set_xticks(x, [f"{r['models']}\nN = {r['n']}".replace(" (sample)", "") for r in of_batch], fontsize=7)
        ax.set_title(f"batch size {batch}")
    np.atleast_1d(axes)[0].set_ylabel("p50 latency / member's p50 (log scale)")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("onnxruntime CPU, 1 thread: fused model vs ensemble (N sessions) vs wide graph", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def main() -> None:
    p = cli(__doc__, "the sample MLPs and two MLPs 784-64-64-10, 0.1 s per model")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per model and batch size")
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args()
    if args.quick:
        args.seconds, args.warmup = 0.1, 3
    st, started = stamp(), datetime.datetime.now(datetime.timezone.utc)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="onnxfuse-latency-") as tmp:
        results = measure(member_sets(Path(tmp), args.quick), Path(tmp), args.seconds, args.warmup, memory=True)
    text = render(results, st, started, time.perf_counter() - start, args.seconds, args.warmup,
                  (load_start, os.getloadavg()[0]))
    args.out.mkdir(parents=True, exist_ok=True)
    if plot(results, args.out / "latency.png"):
        text = text.replace("## p50 latency relative to one member\n",
                            "## p50 latency relative to one member\n\n![latency](latency.png)\n", 1)
    print(text)
    write_results(args.out, "latency", text, {"results": results}, st)


if __name__ == "__main__":
    main()
