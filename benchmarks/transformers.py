"""Transformers as the field exports them: a family x exporter table of what onnxfuse fuses.

Each family of tests/hf_zoo.py is built twice (seeds 0 and 1, random weights from a config), exported with
torch.onnx (legacy, dynamo=False), torch.onnx (new exporter, dynamo=True) and optimum, and run through
`inspect`, `concat`, `merge` and `prune --keep 0.5`. An operation is ok when it writes a model that passes
onnx's full checker and runs in onnxruntime at another batch size and sequence length than the export used
(merge: with a member's parameter count; concat: its outputs are the members' mean, or it says it is not
exact). The concat of a member with itself must reproduce the member even through LayerNorm/RMSNorm (the
normalization of [x, x] is that of x): its deviation is the last column, a check of the channel analysis. Otherwise the cell holds the first problem onnxfuse reports.

    python benchmarks/transformers.py [--families bert,gpt2] [--cache /tmp/hf-cache]
    python benchmarks/transformers.py --bert-base      # merge time of two 110 M-parameter BERTs vs the I/O floor
    python benchmarks/transformers.py --quick --out /tmp/q   # bert, legacy exporter, fresh cache

Writes benchmarks/results/transformers.md and .json (--bert-base: transformers_bert_base.md and .json).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# this file is named like the transformers package: its folder goes last on the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
from _common import ROOT, cli, md_table, stamp, write_results  # noqa: E402  (puts the checkout first on sys.path)

sys.path.insert(0, str(ROOT / "tests"))
import hf_zoo  # noqa: E402

OPS = ("inspect", "concat", "merge", "prune")


def feeds_for(model_path: str, kind: str, batch: int = 3, seq: int = 11) -> dict[str, np.ndarray]:
    """Inputs for every graph input of the exported model, at sizes other than the export's."""
    import onnx
    from onnxfuse.data import graph_inputs
    known = hf_zoo.example_inputs(kind, batch, seq, seed=1)
    model = onnx.load(model_path, load_external_data=False)
    feeds = {}
    rng = np.random.default_rng(2)
    for spec in graph_inputs(model):
        elem = spec.type.tensor_type.elem_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        if spec.name in known:
            feeds[spec.name] = known[spec.name].astype(dtype)
        elif len(graph_inputs(model)) == 1 and len(known) == 1:
            feeds[spec.name] = next(iter(known.values())).astype(dtype)
        else:       # e.g. token_type_ids: zeros of the ids' shape
            shape = next(iter(known.values())).shape
            feeds[spec.name] = (np.zeros(shape, dtype) if np.issubdtype(dtype, np.integer)
                                else rng.normal(size=shape).astype(dtype))
    return feeds


def run(path, feeds):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check_written(out: Path, feeds) -> list:
    import onnx
    onnx.checker.check_model(str(out), full_check=True)
    return run(out, feeds)


def bridge_check(path: Path, feeds, expected) -> str:
    """The torch bridge (what fine-tuning trains) on the fused model in eval mode against onnxruntime: 'ok'
    within 1e-4 (relative to the largest output), else why not."""
    import onnx
    import torch
    from onnxfuse.torch_bridge import OnnxModule
    try:
        module = OnnxModule(onnx.load(str(path))).eval()
        with torch.no_grad():
            got = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
        got = (got[0] if isinstance(got, (list, tuple)) else got).numpy()
        dev = float(np.max(np.abs(got - expected)) / (np.max(np.abs(expected)) + 1e-12))
        return "ok" if dev <= 1e-4 else f"deviates by {dev:.1e}"
    except Exception as exc:
        return first_line(exc)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def sweep_pair(family: str, exporter: str, cache: Path, work: Path) -> dict:
    import onnxfuse
    row = {"family": family, "exporter": exporter}
    start = time.perf_counter()
    try:
        members = [hf_zoo.export(family, exporter, seed, cache) for seed in (0, 1)]
    except Exception as exc:        # the exporter's failure, not ours
        row["export"] = first_line(exc)
        return row
    row["export"] = "ok"
    row["export_seconds"] = round(time.perf_counter() - start, 1)
    kind = hf_zoo.build(family, 0)[1]
    feeds = feeds_for(members[0], kind)
    try:
        mean = [np.mean([run(m, feeds)[0] for m in members], axis=0)]
    except Exception as exc:        # the export itself does not run at other sizes
        row["export"] = "onnxruntime cannot run the export at batch 3 / sequence 11: " + first_line(exc)
        return row
    try:
        report = onnxfuse.inspect(members)
        row["inspect"] = "ok" if report["fusable"] else (report["problems"][:1] or
                                                        [report.get("incompatibility", "no prunable group")])[0]
        row["exact"] = report.get("exact")
    except Exception as exc:
        row["inspect"] = first_line(exc)
    for op in OPS[1:]:
        out = work / f"{family}.{exporter}.{op}.onnx"
        t0 = time.perf_counter()
        try:
            if op == "concat":
                summary = onnxfuse.fuse(members, "concat", output=out, force=True).summary
            elif op == "merge":
                summary = onnxfuse.fuse(members, "nt", output=out, force=True).summary
            else:
                summary = onnxfuse.fuse(members[:1], "prune", keep=0.5, output=out, force=True).summary
            got = check_written(out, feeds)
            row[f"{op}_seconds"] = round(time.perf_counter() - t0, 2)
            if op == "concat":       # a member beside itself: exact even through LayerNorm/RMSNorm
                twin = work / f"{family}.{exporter}.twin.onnx"
                onnxfuse.fuse([members[0], members[0]], "concat", output=twin, force=True)
                own = run(members[0], feeds)[0]
                row["self_concat_deviation"] = float(np.max(np.abs(run(twin, feeds)[0] - own)) /
                                                     (np.max(np.abs(own)) + 1e-12))
                twin.unlink()
                dev = float(np.max(np.abs(got[0] - mean[0])) / (np.max(np.abs(mean[0])) + 1e-12))
                row["concat_deviation"] = dev
                row["concat_exact_claim"] = summary.get("exact")
                if summary.get("exact") and dev > 1e-4:
                    raise AssertionError(f"concat claims exactness but deviates by {dev:.2e} (relative)")
            if op == "merge" and summary["parameters"]["output"] != summary["parameters"]["member"]:
                raise AssertionError(f"merge has {summary['parameters']['output']} parameters, a member "
                                     f"{summary['parameters']['member']}")
            if op == "merge":
                row["bridge"] = bridge_check(out, feeds, got[0])
            row[op] = "ok"
        except Exception as exc:
            row[op] = first_line(exc)
        out.unlink(missing_ok=True)
    return row


def table(rows: list[dict]) -> str:
    exported = [r for r in rows if r["export"] == "ok"]
    lines = ["# Transformers: family x exporter", "",
             "Produced by `python benchmarks/transformers.py`. Members: two seeds of a tiny config (hidden 64, "
             "2 layers, 4 heads) per family; `ok` = written, passes onnx's full checker, runs in onnxruntime at "
             "batch 3 / sequence 11 (export: batch 2 / sequence 8); merge keeps a member's parameter count; "
             "concat's deviation from the members' mean is measured (relative to the largest output).", "",
             f"Exported pairs: {len(exported)} of {len(rows)}. " +
             ", ".join(f"{op} ok: {sum(r.get(op) == 'ok' for r in exported)} of {len(exported)}" for op in OPS) +
             f"; the torch bridge equals onnxruntime (<= 1e-4, eval mode) on the merged model in "
             f"{sum(r.get('bridge') == 'ok' for r in exported)} of {sum('bridge' in r for r in exported)}.",
             "", "Before issue 14 (commit 7997dab, `transformers_before.json`) the same sweep fused 2 of 47 exported "
             "pairs (ELECTRA and TimeSeriesTransformer with the new exporter).",
             ""]
    table = []
    for r in rows:
        if r["export"] != "ok":
            table.append([r["family"], r["exporter"], f"exporter failed: {r['export'][:120]}", *[""] * 6])
            continue
        cells = [("ok" if r.get(op) == "ok" else f"refused: {str(r.get(op))[:160]}").replace("|", "/")
                 for op in OPS]
        dev = r.get("concat_deviation")
        devtext = "" if dev is None else f"{dev:.1e}" + (" (exact)" if r.get("concat_exact_claim") else
                                                         " (reported not exact)")
        twin = r.get("self_concat_deviation")
        table.append([r["family"], r["exporter"], *cells, devtext, "" if twin is None else f"{twin:.1e}",
                      str(r.get("bridge", ""))[:120]])
    lines += md_table(["family", "exporter", "inspect", "concat", "merge", "prune --keep 0.5", "concat deviation",
                       "member beside itself", "bridge"], table, "l" * 9)
    return "\n".join(lines) + "\n"


def bert_base_merge(cache: Path) -> dict:
    """Merge time of two BERT-base-size members (110 M parameters, random init, optimum export) against the I/O
    floor: reading both member files and writing one file of a member's size."""
    import os
    import onnxfuse
    import torch
    import transformers
    members = []
    for seed in (0, 1):
        path = cache / f"bert-base.optimum.{seed}.onnx"
        if not path.exists():
            torch.manual_seed(seed)
            model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3)).eval()
            with torch.no_grad():      # as after training: no two biases alike (exporters dedupe equal ones)
                for p in model.parameters():
                    if bool((p == p.reshape(-1)[0]).all()):
                        p.add_(torch.empty_like(p).uniform_(-0.1, 0.1))
            from optimum.exporters.onnx import onnx_export_from_model
            tmp = cache / f".bert-base.{seed}"
            onnx_export_from_model(model, tmp, task="text-classification", do_validation=False)
            import onnx
            onnx.save(onnx.load(str(tmp / "model.onnx")), str(path))
        members.append(path)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        t0 = time.perf_counter()
        data = [Path(m).read_bytes() for m in members]
        with open(Path(work) / "floor.bin", "wb") as f:
            f.write(data[0])
            f.flush()
            os.fsync(f.fileno())
        floor = time.perf_counter() - t0
        del data
        out = Path(work) / "merged.onnx"
        t0 = time.perf_counter()
        summary = onnxfuse.fuse([str(m) for m in members], "nt", output=out).summary
        seconds = time.perf_counter() - t0
    return {"parameters": summary["parameters"]["member"], "merge_seconds": round(seconds, 2),
            "io_floor_seconds": round(floor, 2), "ratio": round(seconds / floor, 2), "phases": summary["phases"],
            "member_bytes": Path(members[0]).stat().st_size}


def main():
    parser = cli(__doc__, "bert with the legacy exporter, in a fresh cache")
    parser.add_argument("--families", default=",".join(hf_zoo.FAMILIES))
    parser.add_argument("--exporters", default=",".join(hf_zoo.EXPORTERS))
    parser.add_argument("--cache", default="/tmp/hf-cache", help="exported members, reused (not with --quick)")
    parser.add_argument("--bert-base", action="store_true", help="only time the merge of two BERT-base members")
    args = parser.parse_args()
    st = stamp()
    if args.bert_base:
        result = bert_base_merge(Path(args.cache))
        print(result)
        write_results(args.out, "transformers_bert_base", "# Merging two BERT-base members\n\n```\n"
                      + json.dumps(result, indent=1) + "\n```\n", result, st)
        return
    families, exporters = (["bert"], ["legacy"]) if args.quick else (args.families.split(","),
                                                                      args.exporters.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        cache = Path(work) / "cache" if args.quick else Path(args.cache)
        for family in families:
            for exporter in exporters:
                if exporter == "optimum" and family not in hf_zoo.HF:
                    continue
                t0 = time.perf_counter()
                rows.append(sweep_pair(family, exporter, cache, Path(work)))
                print(f"{family:24s} {exporter:8s} {time.perf_counter() - t0:6.1f}s  " +
                      "  ".join(f"{k}={str(rows[-1].get(k))[:70]}" for k in ("export", *OPS)), flush=True)
                write_results(args.out, "transformers", table(rows), {"rows": rows}, st)
    print(table(rows))


if __name__ == "__main__":
    main()
