#!/usr/bin/env python
"""lr auto at batch sizes other than 64: which candidate grid the probes should choose from.

`training.CANDIDATES` were measured at batch 64 (benchmarks/recipe.py). A smaller batch takes noisier steps at
the same rate, and a probe (a few percent of the run) is too short to show a rate that collapses later. The
shipped rule (`training.candidate_rates`) scales the SGD grid by sqrt(batch / 64) below 64 and leaves it
unscaled above, and leaves Adam's unscaled. This script compares, per batch size, lr auto with:
- "shipped": `candidate_rates` as it is;
- "unscaled": CANDIDATES as measured at 64;
- "sqrt": sqrt(batch / 64) at every batch size (Adam: also below 64); "linear": batch / 64 (SGD only);
against a grid of fixed rates (the best of it is the reference: regret = best fixed rate - lr auto).

Member sets (8): digits MLP adam / sgd-low, digits CNN adam / sgd-high, MNIST-1D MLP adam / sgd-high, MNIST-1D
CNN adam / sgd-low (benchmarks/recipe.py's members, seeds 0 and 1, N = 2); E = 8, fine-tuning seed 0, test-set
accuracy with onnxruntime. Cases: SGD at batch 8, 16 and 256, Adam at batch 8.

    python benchmarks/recipe_batch.py [--cache DIR]
    python benchmarks/recipe_batch.py --quick --out /tmp/q

Writes benchmarks/results/recipe_batch.md and .json (or --out DIR). One thread.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from _common import cli, md_table, stamp, write_results
import recipe as R
import onnxfuse  # noqa: E402
from onnxfuse import training  # noqa: E402

SETS = [("digits", "mlp", "adam"), ("digits", "mlp", "sgd-low"), ("digits", "cnn", "adam"),
        ("digits", "cnn", "sgd-high"), ("mnist1d", "mlp", "adam"), ("mnist1d", "mlp", "sgd-high"),
        ("mnist1d", "cnn", "adam"), ("mnist1d", "cnn", "sgd-low")]
CASES = [("sgd", 8), ("sgd", 16), ("sgd", 256), ("adam", 8)]
FIXED = {"sgd": (0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003), "adam": (3e-3, 1e-3, 3e-4, 1e-4, 3e-5)}
SHIPPED = training.candidate_rates


def rule(name: str):
    """candidate_rates under the rule `name`."""
    if name == "shipped":
        return SHIPPED
    def rates(optimizer, batch):
        ratio = batch / training.REFERENCE_BATCH
        scale = {"unscaled": 1.0, "sqrt": ratio ** 0.5, "linear": ratio}[name]
        return tuple(float(f"{lr * scale:.3g}") for lr in training.CANDIDATES[optimizer])
    return rates


def rules_of(optimizer):
    return ("shipped", "unscaled", "sqrt", "linear") if optimizer == "sgd" else ("shipped", "sqrt")


def main():
    ap = cli(__doc__, "digits MLP adam, SGD at batch 8, E = 1, two fixed rates")
    ap.add_argument("--cache", default=None, help="folder that keeps the trained members for reruns")
    ap.add_argument("--from-json", default=None, help="write the report again from an earlier run's .json")
    args = ap.parse_args()
    if args.from_json:
        import json
        earlier = json.loads(Path(args.from_json).read_text())
        return report(earlier["rows"], args, earlier.get("seconds", 0), earlier["stamp"])
    import torch
    torch.set_num_threads(1)
    sets, cases = (SETS[:1], CASES[:1]) if args.quick else (SETS, CASES)
    epochs = 1 if args.quick else 8
    data = R.datasets(None, sorted({s[0] for s in sets}))
    st, start = stamp(), time.perf_counter()
    rows = []
    for dataset, family, recipe in sets:
        d = data[dataset]
        members = [R.member(args.cache, dataset, family, recipe, s, d, 2 if args.quick else 30) for s in (0, 1)]
        (x, y), (xte, yte) = d["train"], d["test"]
        x, xte = R.feeds(d, family, x), R.feeds(d, family, xte)
        best_member = max(R.accuracy(m, xte, yte) for m in members)
        for optimizer, batch in cases:
            def run(**extra):
                f = onnxfuse.fuse(members, "nt", data={**x, "y": y},
                                  training=dict(epochs=epochs, batch_size=batch, optimizer=optimizer, **extra))
                return R.accuracy(f.model, xte, yte), f.summary["training"]["options"]["lr"]
            fixed = FIXED[optimizer][1:3] if args.quick else FIXED[optimizer]
            row = {"set": f"{dataset} {family} {recipe}", "optimizer": optimizer, "batch": batch,
                   "best_member": best_member, "fixed": {f"{lr:g}": run(lr=lr)[0] for lr in fixed}}
            for name in rules_of(optimizer):
                training.candidate_rates = rule(name)
                try:
                    row[name] = dict(zip(("test", "lr"), run()))
                finally:
                    training.candidate_rates = SHIPPED
            rows.append(row)
            best = max(row["fixed"].values())
            print(f"{row['set']:22} {optimizer} b{batch:<3} best fixed {best:.4f} | " + " ".join(
                f"{n} {row[n]['test']:.4f} ({row[n]['lr']:g})" for n in rules_of(optimizer)), flush=True)
    report(rows, args, time.perf_counter() - start, st)


def report(rows, args, seconds, st):
    md = ["# lr auto at other batch sizes: the candidate grid\n",
          f"1 thread, {seconds / 60:.1f} min{', --quick' if args.quick else ''}\n" if seconds else "1 thread\n",
          "Produced by `benchmarks/recipe_batch.py` (see its docstring). Regret: the best fixed rate's test accuracy "
          "minus lr auto's, pp (negative: lr auto above every fixed rate). Below: runs under the best member.\n",
          "## Summary\n"]
    summary = []
    for optimizer, batch in sorted({(r["optimizer"], r["batch"]) for r in rows}):
        case = [r for r in rows if (r["optimizer"], r["batch"]) == (optimizer, batch)]
        for name in rules_of(optimizer):
            regret = [100 * (max(r["fixed"].values()) - r[name]["test"]) for r in case]
            summary.append([optimizer, batch, name, f"{statistics.mean(regret):.2f}", f"{max(regret):.2f}",
                            sum(r[name]["test"] < r["best_member"] for r in case), len(case)])
    md += md_table(["optimizer", "batch", "grid", "mean regret pp", "worst regret pp", "below best member", "sets"],
                   summary, "lllrrrr")
    md += ["", "## Per set\n"]
    per = []
    for r in rows:
        best_name, best = max(r["fixed"].items(), key=lambda kv: kv[1])
        per.append([r["set"], r["optimizer"], r["batch"], f"{r['best_member']:.4f}", f"{best:.4f} ({best_name})",
                    *[f"{r[n]['test']:.4f} ({r[n]['lr']:g})" if n in r else "-"
                      for n in ("shipped", "unscaled", "sqrt", "linear")]])
    md += md_table(["set", "optimizer", "batch", "best member", "best fixed rate", "shipped", "unscaled", "sqrt",
                    "linear"], per, "lll" + "r" * 6)
    write_results(args.out, "recipe_batch", "\n".join(md) + "\n", {"seconds": seconds, "rows": rows}, st)


if __name__ == "__main__":
    main()
