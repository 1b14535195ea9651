"""The vision zoo: every torchvision classification model up to 40 M parameters (legacy and new exporter) and a
timm list, as a new user would fuse them (random init, a different seed per member, small inputs).

For each model and exporter, two members are exported (cached under --cache) and every operation is run in a
worker process (so one model cannot take the sweep down), each writing its result to a file:
inspect, concat (with its error against the members' mean, measured here with onnxruntime), merge (NT), prune
(--keep 0.5 of member 0), weight matching, OT. Each is

- ok: written, and the written file runs in onnxruntime with member 0's output shapes (and concat is within
  1e-4 of the members' mean, relative to its largest value, wherever onnxfuse says it is exact);
- refused: a one-line OnnxFuseError (the CLI's exit 2), nothing written;
- invalid: written, but the file does not run, or concat claims exact and is not;
- crash: any other exception.

Torch-Pruning (DepGraph, L2 magnitude importance, ratio 0.5, the classifier ignored) prunes the same torchvision
models as the peer row (ok: the pruned module runs; fail otherwise); --tp-path names a folder that holds
torch_pruning if this interpreter lacks it (it is appended to the worker's sys.path).

    python benchmarks/zoo.py --quick --out /tmp/q     # SqueezeNet 1.1 (both exporters), timm's RegNetX-002
    python benchmarks/zoo.py --models resnet18,timm:convnext_atto --exporters legacy,dynamo
    python benchmarks/zoo.py --budget 1200            # everything, until 20 minutes are spent

Writes benchmarks/results/zoo.md and zoo.json (--name: another name), stamped with the commit of every row;
models not run (budget, options) are listed there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import child_env, cli, export as torch_export, md_table, stamp, write_results

TORCHVISION = [   # <= 40 M parameters (torchvision's 1000-class counts)
    "resnet18", "resnet34", "resnet50", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small",
    "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "efficientnet_b4", "efficientnet_b5", "efficientnet_v2_s", "densenet121", "densenet161", "densenet169",
    "densenet201", "googlenet", "inception_v3", "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf", "regnet_y_400mf",
    "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf", "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0", "squeezenet1_1",
    "convnext_tiny", "swin_t", "swin_v2_t", "maxvit_t"]
TIMM = ["resnet18", "resnet50d", "efficientnet_b0", "mobilenetv3_small_100", "mobilenetv4_conv_small",
        "convnext_atto", "regnetx_002", "ghostnet_100", "repvgg_a0", "densenet121", "dla34", "hrnet_w18_small",
        "cspresnet50", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "levit_128s", "mixer_s16_224"]
FIRST = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny",
         "timm:convnext_atto", "timm:vit_tiny_patch16_224"]    # a second exporter runs these first
QUICK = ["squeezenet1_1", "timm:regnetx_002"]
SIZE = {"inception_v3": 96, "maxvit_t": 224, "levit_128s": 224, "mixer_s16_224": 64}
OPS = ["inspect", "concat", "merge", "prune", "weight-matching", "ot"]
TOLERANCE = 1e-4


def model_id(spec: str) -> tuple[str, str]:
    source, _, name = spec.rpartition(":")
    return source or "torchvision", name


def build(spec: str, seed: int):
    import torch
    source, name = model_id(spec)
    torch.manual_seed(seed)
    if source == "timm":
        import timm
        kwargs = {"img_size": SIZE.get(name, 64)} if any(k in name for k in ("vit", "deit", "mixer")) else {}
        net = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    else:
        import torchvision
        net = torchvision.models.get_model(name, weights=None, num_classes=10)
    return net.eval()


def export(spec: str, seed: int, exporter: str, cache: Path) -> Path:
    """Member `seed` of a model, exported once (cached): batch 1, 3 x SIZE x SIZE, input 'x', output 'y'."""
    import torch
    source, name = model_id(spec)
    size = SIZE.get(name, 64)
    path = cache / f"{source}_{name}_{exporter}_{size}_{seed}.onnx"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    dynamo = exporter == "dynamo"
    torch_export(build(spec, seed), torch.randn(1, 3, size, size), tmp, dynamo=dynamo, output="y", batch=False,
                 **({"external_data": False} if dynamo else {"opset": 17}))
    os.replace(tmp, path)
    return path


def _outputs(path, feeds):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 4
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_op(op: str, files: list[Path], out: Path) -> dict:
    """One operation on the exported members; the written file is checked here, independently of onnxfuse."""
    import numpy as np
    import onnxfuse
    from onnxfuse import api
    from onnxfuse.runtime import guard_feeds
    import onnx
    start = time.perf_counter()
    row = {}
    try:
        if op == "inspect":
            report = api.inspect([str(f) for f in files])
            row = {"status": "ok" if report["fusable"] else "refused", "seconds": time.perf_counter() - start}
            if not report["fusable"]:
                row["detail"] = (report["problems"] or [report.get("incompatibility", "no fusable group")])[0]
            return row
        if op == "prune":
            fusion = api.fuse([str(files[0])], "prune", 0.5, out)
        else:
            fusion = api.fuse([str(f) for f in files], {"merge": "nt"}.get(op, op), None, out)
        row = {"status": "ok", "seconds": round(time.perf_counter() - start, 2)}
    except onnxfuse.OnnxFuseError as exc:
        return {"status": "refused", "detail": str(exc)[:300], "seconds": round(time.perf_counter() - start, 2)}
    except Exception as exc:  # noqa: BLE001 -- a crash is what the sweep counts
        return {"status": "crash", "detail": f"{type(exc).__name__}: {str(exc)[:300]}",
                "seconds": round(time.perf_counter() - start, 2)}
    feeds = guard_feeds(onnx.load(str(files[0]), load_external_data=False), seed=1)
    try:
        got = _outputs(out, feeds)
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": "invalid", "detail": f"written file does not run: {str(exc)[:300]}"}
    want = [_outputs(f, feeds) for f in (files if op == "concat" else files[:1])]
    if [g.shape for g in got] != [w.shape for w in want[0]]:
        return {**row, "status": "invalid", "detail": "output shapes differ from member 0's"}
    if op == "concat":
        mean = np.mean([w[0].astype(np.float64) for w in want], axis=0)
        err = float(np.abs(got[0] - mean).max() / max(float(np.abs(mean).max()), 1e-30))
        row["error"] = err
        row["exact"] = fusion.summary.get("exact")
        if row["exact"] and err > TOLERANCE:
            row["status"] = "invalid"
            row["detail"] = f"claims exact, relative error {err:.1e}"
    return row


def worker(spec: str, exporter: str, cache: Path, ops: list[str]) -> dict:
    result = {"model": spec, "exporter": exporter, "ops": {}}
    try:
        files = [export(spec, seed, exporter, cache) for seed in (0, 1)]
    except Exception as exc:  # noqa: BLE001 -- the exporter's failure, not onnxfuse's
        result["export_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return result
    import onnx
    result["parameters"] = int(sum(int(__import__("numpy").prod(t.dims)) for t in
                                   onnx.load(str(files[0]), load_external_data=False).graph.initializer))
    with tempfile.TemporaryDirectory() as tmp:
        for op in ops:
            result["ops"][op] = run_op(op, files, Path(tmp) / f"{op}.onnx")
    return result


def tp_worker(spec: str) -> dict:
    """Torch-Pruning's DepGraph pruner on the same torchvision model (member 0), L2 magnitude, ratio 0.5."""
    import torch
    import torch_pruning as tp
    net = build(spec, 0)
    size = SIZE.get(model_id(spec)[1], 64)
    x = torch.randn(1, 3, size, size)
    start = time.perf_counter()
    try:
        last = [m for m in net.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 10 or
                isinstance(m, torch.nn.Conv2d) and m.out_channels == 10]     # the classifier (SqueezeNet: a conv)
        pruner = tp.pruner.MagnitudePruner(net, x, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=0.5, ignored_layers=last)
        pruner.step()
        with torch.no_grad():
            y = net(x)
        if tuple(y.shape) != (1, 10):
            raise RuntimeError(f"output shape {tuple(y.shape)}")
        return {"status": "ok", "seconds": round(time.perf_counter() - start, 2)}
    except Exception as exc:  # noqa: BLE001
        return {"status": "fail", "detail": f"{type(exc).__name__}: {str(exc)[:200]}",
                "seconds": round(time.perf_counter() - start, 2)}


def _in_process(args: list[str], timeout: float) -> dict:
    env = {**child_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    if not lines:
        return {"worker_error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def write(results: list[dict], skipped: list[str], args, st: dict, command: str | None = None,
          note: str = "") -> None:
    """The table of `results` (rows may come from earlier runs, each with its commit)."""
    command = command or st["command"]
    counts = {op: {} for op in OPS + ["torch-pruning"]}
    commits = sorted({r.get("commit", st["commit"]) for r in results})
    lines = [f"# The vision zoo\n\ncommit {', '.join(commits)}, {st['date']}: `{command}`\n",
             "Random init, a different seed per member (2 members), batch 1, 64x64 inputs (inception_v3 96, "
             "maxvit_t / levit 224). ok = written and runs in onnxruntime (concat: within 1e-4 of the members' mean "
             "where exact is claimed); ref = refused with one line; INVALID = written but does not run / not exact; "
             "CRASH = other exception. concat column: relative max error vs the members' mean. "
             "TP = Torch-Pruning DepGraph L2 ratio 0.5. Seconds are wall time of one worker on a 2-core machine "
             "shared with other jobs.\n" + (f"\n{note}\n" if note else "")]
    table, notes = [], []
    for r in results:
        cells = []
        if "export_error" in r or "timeout" in r or "worker_error" in r:
            why = r.get("export_error") or r.get("worker_error") or f"timed out after {r.get('timeout')} s"
            notes.append(f"- {r['model']} ({r['exporter']}): not swept: {why}")
            cells = ["-"] * len(OPS)
        for op in OPS if not cells else []:
            o = r["ops"].get(op, {})
            status = o.get("status", "-")
            counts[op][status] = counts[op].get(status, 0) + 1
            cell = {"ok": "ok", "refused": "ref", "invalid": "INVALID", "crash": "CRASH"}.get(status, status)
            if op == "concat" and "error" in o:
                cell += f" {o['error']:.0e}" + ("" if o.get("exact") else " (not exact)")
            if op in ("weight-matching", "ot") and status == "ok":
                cell += f" {o['seconds']:.0f}s"
            cells.append(cell)
            if status != "ok" and o.get("detail"):
                notes.append(f"- {r['model']} ({r['exporter']}) {op}: {status}: {o['detail'][:240]}")
        tp = r.get("tp", {}).get("status", "timeout" if "timeout" in r.get("tp", {}) else "-")
        if "tp" in r:
            counts["torch-pruning"][tp] = counts["torch-pruning"].get(tp, 0) + 1
            if tp != "ok":
                notes.append(f"- {r['model']} Torch-Pruning: {r['tp'].get('detail', '')[:240]}")
        params = f"{r['parameters'] / 1e6:.1f}M" if "parameters" in r else "-"
        table.append([r["model"], r["exporter"], params, *cells, tp])
    lines += md_table(["model", "exporter", "params", *OPS, "TP"], table, "l" * (len(OPS) + 4))
    share = lambda c: f"{100 * c.get('ok', 0) / max(sum(c.values()), 1):.1f}%"
    lines += ["", "## Counts per operation", "", *md_table(
        ["operation", "ok", "refused", "invalid", "crash", "ok share"],
        [[op, c.get("ok", 0), f"fail {c.get('fail', 0)}, timeout {c.get('timeout', 0)}", "-", "-", share(c)]
         if op == "torch-pruning" else [op, *(c.get(s, 0) for s in ("ok", "refused", "invalid", "crash")), share(c)]
         for op, c in counts.items()], "llllll")]
    lines += ["", "## Why not ok", ""] + (notes or ["(every operation ok)"])
    swept = {(r["model"], r["exporter"]) for r in results}
    listed = {s.rsplit("): ", 1)[0] + ")" for s in skipped}
    rest = [f"{spec} ({e})" for e in ("legacy", "dynamo") for spec in TORCHVISION + [f"timm:{n}" for n in TIMM]
            if (spec, e) not in swept and f"{spec} ({e})" not in listed]
    lines += ["", "## Not run", ""] + ([f"- {s}" for s in skipped] or ["(nothing over the budget)"])
    if rest:
        lines += ["", f"Not in this sweep ({len(rest)} of {2 * (len(TORCHVISION) + len(TIMM))} model x exporter "
                  f"pairs; options or time): " + ", ".join(rest)]
    write_results(args.out, args.name, "\n".join(lines), {"command": command, "note": note, "results": results,
                                                         "not_run": skipped}, st)


def main() -> None:
    p = cli(__doc__, f"{' and '.join(QUICK)} (the second exporter: the first only), a fresh cache")
    p.add_argument("--name", default="zoo", help="results file name (default zoo)")
    p.add_argument("--models", help="comma-separated: torchvision names, or timm:NAME")
    p.add_argument("--exporters", default="legacy,dynamo")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--budget", type=float, default=1200, help="seconds for the whole sweep; the rest is listed")
    p.add_argument("--timeout", type=float, default=420, help="seconds per model and exporter")
    p.add_argument("--cache", default="/tmp/zoo-cache", help="exported members, reused (not with --quick)")
    p.add_argument("--tp-path", default="", help="a site-packages folder holding torch_pruning")
    p.add_argument("--no-tp", action="store_true", help="skip the Torch-Pruning row")
    p.add_argument("--report", action="store_true", help="only rewrite the table from the json in --out")
    p.add_argument("--resume", action="store_true", help="keep the results already in --out, run the rest")
    p.add_argument("--commit", help="the commit to stamp, when run from an exported copy of it (git archive)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--tp-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec, exporter = args.worker.rsplit("@", 1)
        print(json.dumps(worker(spec, exporter, Path(args.cache), args.ops.split(","))))
        return
    if args.tp_worker:
        if args.tp_path:
            sys.path.append(args.tp_path)
        print(json.dumps(tp_worker(args.tp_worker)))
        return
    st = stamp(args.commit)
    previous, earlier = args.out / f"{args.name}.json", []
    if args.report or args.resume and previous.exists():   # rows of an earlier (interrupted or budgeted) run
        old = json.loads(previous.read_text())
        commit = old.get("stamp", old)["commit"]             # files written before the harness: a top-level commit
        earlier = [{"commit": commit, **r} for r in old["results"]]
        if args.report:
            write(earlier, old.get("not_run", []), args, st, old["command"], old.get("note", ""))
            return
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) if args.quick else Path(args.cache)
        cache.mkdir(parents=True, exist_ok=True)
        sweep(args, st, cache, earlier)


def sweep(args, st: dict, cache: Path, results: list[dict]) -> None:
    specs = (QUICK if args.quick else args.models.split(",") if args.models else
             TORCHVISION + [f"timm:{n}" for n in TIMM])
    quick_first = sorted(specs, key=lambda s: s not in FIRST)      # a second exporter: the first set first
    jobs = [(s, e) for i, e in enumerate(args.exporters.split(","))
            for s in (specs if i == 0 else quick_first[:1] if args.quick else quick_first)]
    done = {(r["model"], r["exporter"]) for r in results}
    jobs = [j for j in jobs if j not in done]
    skipped, start = [], time.perf_counter()
    for spec, exporter in jobs:
        if time.perf_counter() - start > args.budget:
            skipped.append(f"{spec} ({exporter}): over the --budget of {args.budget:.0f} s")
            continue
        row = {"model": spec, "exporter": exporter,
               **_in_process(["--worker", f"{spec}@{exporter}", "--ops", args.ops, "--cache", str(cache)],
                             args.timeout)}
        row.setdefault("ops", {})
        row["commit"] = st["commit"]
        if exporter == args.exporters.split(",")[0] and model_id(spec)[0] == "torchvision" and not args.no_tp:
            row["tp"] = _in_process(["--tp-worker", spec, "--tp-path", args.tp_path], args.timeout)
        results.append(row)
        print(spec, exporter, {op: o.get("status") for op, o in row["ops"].items()}, row.get("tp", {}).get("status"),
              flush=True)
        write(results, skipped, args, st)
    write(results, skipped, args, st)


if __name__ == "__main__":
    main()
