#!/usr/bin/env python
"""The transplantation sweep (NT paper, METHOD.md 1.4): how many neurons should come from each member?

Two MLP members A and B of one architecture, on two datasets that need no download:

  digits   the shipped `sample_models/digits_mlp_{0,1}.onnx` (64 -> 64 -> 64 -> 10, ReLU; W = 64) on the sample
           split of scikit-learn's digits (1257 training / 540 validation images);
  mnist1d  MLPs 40 -> 100 -> 100 -> 10 (ReLU; W = 100), seeds 0 and 1, trained here with
           `benchmarks/reconstruction.py`'s recipe (Adam lr 1e-3, batch 100, 50 epochs) on MNIST-1D generated
           locally by the `mnist1d` package (default arguments: 4000 training sequences), scored on 20000
           held-out sequences from the same generator with another seed (reconstruction.heldout()).
  mnist1d-converged  the same MLPs trained to convergence with reconstruction.py's "converged" recipe (SGD,
           momentum 0.9, lr 0.05 decaying linearly to 0, batch 64, 60 epochs), so that 3 more epochs of
           fine-tuning no longer help a member by themselves.

For r = 0, 0.1, ..., 1, in every prunable channel group (every hidden layer) of width W we keep the
round((1 - r) W) highest-importance neurons of member A and the W - round((1 - r) W) highest of member B
(importance: onnxfuse's Torch-Pruning magnitude score, `onnxfuse.select.channel_scores`, over the wide model;
A's channels are wide indices 0..W-1, B's W..2W-1), transplant them with `onnxfuse.transplant.transplant` (the
same code path as `onnxfuse.fuse(..., "nt")`, with our own kept indices instead of the global top-W), and
measure the validation accuracy with onnxruntime

  - without fine-tuning, and
  - after 3 epochs of fine-tuning (`onnxfuse.training.finetune`, onnxfuse's defaults: SGD, momentum 0.9,
    lr 0.05 decaying linearly to 0, batch 64, cross-entropy) with seeds 0, 1, 2 (batch order): mean +- std.

The paper's finding (SVHN, two width-512 depth-4 MLPs, r from A to B): without fine-tuning the accuracy dips
at r = 0.5 (~77 % from ~83 %); after 3 epochs it peaks at r = 0.5 (~84.0 %), above both members (83.0 / 82.4).
Note: at r = 0 the model is member A's neurons with the wide model's output layer, i.e. A's last-layer weights
halved and the members' mean bias (not exactly member A); likewise member B at r = 1. NT itself (global top-W of
the union) is shown as a reference point at the fraction of B's neurons it keeps.

    python benchmarks/transplant_sweep.py            # about a minute on 2 CPU cores
    python benchmarks/transplant_sweep.py --quick --out /tmp/q   # smoke run (see --help)

Writes benchmarks/results/transplant_sweep.md, .json and .png (or --out DIR) and prints the table.
"""
from __future__ import annotations

import datetime
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from _common import BEFORE, SAMPLES, cli, log, md_table, mean_std, pct, stamp, write_results
import onnxfuse  # noqa: E402  (the checkout's: _common puts it first on sys.path)
from onnxfuse.data import load_data  # noqa: E402
from onnxfuse.groups import analyze  # noqa: E402
from onnxfuse.model_io import check_compatible, load_member  # noqa: E402
from onnxfuse.runtime import Runner, scores  # noqa: E402
from onnxfuse.select import channel_scores, kept_count, top_k  # noqa: E402
from onnxfuse.training import TrainOptions, finetune  # noqa: E402
from onnxfuse.transplant import MemberTensors, transplant  # noqa: E402

EPOCHS = 3
PAPER = {"members": (83.0, 82.4), "dip_at_half": 77.0, "ends": 83.0, "peak_at_half": 84.0}


# ============================================================================ members

def digits_members(folder: Path, member_epochs: int, log, heldout: int):
    return ([str(SAMPLES / "digits_mlp_0.onnx"), str(SAMPLES / "digits_mlp_1.onnx")],
            str(SAMPLES / "digits_train.npz"), str(SAMPLES / "digits_val.npz"), {})


def mnist1d_members(folder: Path, member_epochs: int, log, heldout: int, recipe: str = "adam"):
    import reconstruction as rec                       # benchmarks/reconstruction.py
    return rec.mlp_members(folder, (0, 1), member_epochs, recipe, log, heldout)


def mnist1d_converged_members(folder: Path, member_epochs: int, log, heldout: int):
    return mnist1d_members(folder, CONVERGED_EPOCHS if member_epochs > 5 else member_epochs, log, heldout, "sgd")


CONVERGED_EPOCHS = 60
DATASETS = {"digits": digits_members, "mnist1d": mnist1d_members, "mnist1d-converged": mnist1d_converged_members}
NAMES = {"digits": "digits (sklearn), W = 64", "mnist1d": "MNIST-1D, W = 100",
         "mnist1d-converged": "MNIST-1D, converged members, W = 100"}


# ============================================================================ the sweep

class Pair:
    """Two members, analysed once; `model(r)` transplants the sweep's kept indices at ratio r."""

    def __init__(self, paths):
        self.members = [load_member(p, i) for i, p in enumerate(paths)]
        maps = check_compatible(self.members)
        m0 = self.members[0]
        self.a = analyze(m0.model, m0.tensors, m0.name)
        self.load = MemberTensors(self.members, maps)
        self.groups = [g for g in self.a.groups() if g.prunable]
        self.scores = channel_scores(self.a, self.load, 2, self.a.widened_touches())

    def kept(self, r: float) -> dict:
        out = {}
        for g in self.groups:
            w = g.width
            from_a = int(round((1 - r) * w))
            s = self.scores[g.id]
            out[g.id] = np.sort(np.concatenate([top_k(s[:w], from_a), w + top_k(s[w:], w - from_a)]))
        return out

    def nt_kept(self) -> dict:
        """What NT itself keeps: the global top-W of the union (onnxfuse.fuse(..., "nt"))."""
        return {g.id: top_k(self.scores[g.id], kept_count(g.width, 2, None)) for g in self.groups}

    def model(self, kept: dict):
        graph, tensors = transplant(self.members, self.load, self.a, kept)   # release=False: members stay
        return tensors.materialize(graph)


def accuracy(model, val) -> float:
    return scores(Runner(model)(val), val.y)["accuracy"]


def sweep(paths, train_path, val_path, ratios, seeds, log) -> dict:
    pair = Pair(paths)
    first = onnx.load(paths[0])
    val, train = load_data(val_path, first), load_data(train_path, first)
    member_logits = [Runner(p)(val) for p in paths]
    out = {"members": [scores(l, val.y)["accuracy"] for l in member_logits],
           "ensemble": scores(np.mean(member_logits, 0), val.y)["accuracy"],
           "widths": {str(g.id): g.width for g in pair.groups}, "layers": {str(g.id): g.layers for g in pair.groups},
           "points": []}
    out["best_member"] = max(out["members"])
    # the sanity anchor: r-sweep machinery with NT's own kept indices must equal onnxfuse.fuse(paths, "nt")
    nt_kept = pair.nt_kept()
    nt_model = pair.model(nt_kept)
    api_acc = onnxfuse.fuse(paths, "nt", val=val_path).summary["accuracy"][BEFORE]["accuracy"]
    if accuracy(nt_model, val) != api_acc:
        raise RuntimeError("transplanting NT's kept indices here does not reproduce onnxfuse.fuse(paths, 'nt')")

    def point(label, kept, r):
        model = pair.model(kept)
        before = accuracy(model, val)
        runs = []
        for seed in seeds:
            tuned = finetune(model, train, TrainOptions(epochs=EPOCHS, seed=seed)).model
            runs.append(accuracy(tuned, val))
        m, sd = mean_std(runs)
        frac_b = statistics.fmean(float(np.mean(kept[g.id] >= g.width)) for g in pair.groups)
        row = {"label": label, "r": r, "fraction_from_b": frac_b, "before": before, "after_mean": m, "after_std": sd,
               "after_runs": runs,
               "from_b_per_group": {str(g.id): int(np.sum(kept[g.id] >= g.width)) for g in pair.groups}}
        log(f"    {label:>6s}: before {100 * before:.2f}, after {EPOCHS} epochs {100 * m:.2f} ± {100 * sd:.2f}")
        return row

    for r in ratios:
        out["points"].append(point(f"r={r:.1f}", pair.kept(r), r))
    out["nt"] = point("NT", nt_kept, None)
    return out


def verdicts(res: dict) -> dict:
    pts = res["points"]
    by_r = {round(p["r"], 1): p for p in pts}
    out = {}
    if 0.0 in by_r and 1.0 in by_r and 0.5 in by_r:
        ends_before = min(by_r[0.0]["before"], by_r[1.0]["before"])
        argmin = min(pts, key=lambda p: p["before"])
        argmax = max(pts, key=lambda p: p["after_mean"])
        out = {
            "dip_at_half_without_finetuning": by_r[0.5]["before"] < ends_before,
            "dip_depth_pp": 100 * (ends_before - by_r[0.5]["before"]),
            "lowest_before_at_r": argmin["r"],
            "peak_after_at_r": argmax["r"], "peak_after": argmax["after_mean"],
            "peak_near_half": abs(argmax["r"] - 0.5) <= 0.2 + 1e-9,
            "half_after": by_r[0.5]["after_mean"],
            "half_after_above_both_members": by_r[0.5]["after_mean"] > res["best_member"],
            "peak_above_both_members": argmax["after_mean"] > res["best_member"],
            "half_after_above_both_ends_after": by_r[0.5]["after_mean"] > max(by_r[0.0]["after_mean"],
                                                                              by_r[1.0]["after_mean"]),
            "ends_after": (by_r[0.0]["after_mean"], by_r[1.0]["after_mean"]),
        }
    return out


# ============================================================================ output

def render(result: dict) -> str:
    env, cfg, meta = result["environment"], result["config"], result["datasets"]
    names = NAMES
    yes = lambda b: "**yes**" if b else "**no**"  # noqa: E731
    lines = [
        "# Transplantation sweep: r of every hidden layer's neurons from member B, 1 - r from member A",
        "",
        "- Members: **digits** = the shipped `digits_mlp_0/1.onnx` (64-64-64-10 ReLU) on the sample split of "
        "scikit-learn's digits (1257 / 540); **MNIST-1D** = MLPs 40-100-100-10 ReLU, seeds 0 and 1, "
        f"`benchmarks/reconstruction.py`'s recipe ({meta.get('mnist1d', {}).get('member_epochs', '-')} epochs), on "
        "MNIST-1D generated locally by `mnist1d` (default arguments, 4000 training sequences; scored on 20000 "
        "held-out sequences generated with another seed, as the standard 1000 are too few); **MNIST-1D, converged "
        "members** = the same MLPs trained with reconstruction.py's \"converged\" recipe (SGD, momentum 0.9, lr "
        f"0.05 decaying linearly to 0, batch 64, {meta.get('mnist1d-converged', {}).get('member_epochs', '-')} "
        "epochs). Accuracies in %, on the validation / held-out samples.",
        "- Each point: in every hidden layer (prunable channel group) of width W, the round((1 - r) W) "
        "highest-importance neurons of A and the rest (≈ r W) highest of B (`select.channel_scores`, wide "
        "numbering), transplanted by `transplant.transplant` as in `onnxfuse.fuse(..., \"nt\")`. The output layer "
        "is the wide model's (each member's block halved, mean bias), so r = 0 is *not* exactly member A.",
        f"- Fine-tuning: `training.finetune`, onnxfuse defaults (SGD, momentum 0.9, lr 0.05 linearly to 0, batch 64, "
        f"cross-entropy), {EPOCHS} epochs, seeds {', '.join(map(str, cfg['seeds']))}: mean ± sample std.",
        "- **NT** row: what `onnxfuse.fuse(paths, \"nt\")` keeps (global top-W of both members, per layer); its "
        "'from B' is the mean fraction of B's neurons over the hidden layers. Checked: our transplant of NT's kept "
        "indices gives exactly `fuse(paths, \"nt\")`'s accuracy.",
        f"- Torch threads 1; mnist1d {env['mnist1d']}.",
        f"- Date: {env['date']}; the benchmark took {result['wall_seconds']:.0f} s. Reproduce: "
        "`pip install mnist1d && python benchmarks/transplant_sweep.py`"
        + (" (this was a --quick smoke run)" if cfg["quick"] else "") + ".",
    ]
    for ds, res in result["results"].items():
        lines += ["", f"## {names[ds]}", "",
                  f"Members A / B: {pct(res['members'][0])} / {pct(res['members'][1])}; ensemble (mean of logits) "
                  f"{pct(res['ensemble'])}.", ""]
        table = []
        for p in res["points"] + [res["nt"]]:
            after = f"{pct(p['after_mean'])} ± {100 * p['after_std']:.2f}"
            if p["after_mean"] > res["best_member"]:
                after = f"**{after}**"
            table.append([p["label"] if p["r"] is None else f"{p['r']:.1f}", f"{p['fraction_from_b']:.2f}",
                          pct(p["before"]), after])
        lines += md_table(["r", "from B (mean over layers)", "before fine-tuning", f"after {EPOCHS} epochs"], table)
        lines += ["", "Bold: above both members."]
    lines += ["", "## Compared with the paper", "",
              f"Paper (SVHN, width-512 depth-4 MLPs): members {PAPER['members'][0]} / {PAPER['members'][1]}; without "
              f"fine-tuning ~{PAPER['ends']} at the ends, dipping to ~{PAPER['dip_at_half']} at r = 0.5; after 3 epochs "
              f"peak ~{PAPER['peak_at_half']} at r = 0.5, above both members.", ""]
    table = []
    for ds, v in result["verdicts"].items():
        if not v:
            table.append([names[ds], "not measured", *[""] * 6])
            continue
        best = result["results"][ds]["best_member"]
        table.append([names[ds], f"{yes(v['dip_at_half_without_finetuning'])} ({v['dip_depth_pp']:+.2f} pp)",
                      f"r = {v['lowest_before_at_r']:.1f}", f"{pct(v['peak_after'])} (r = {v['peak_after_at_r']:.1f})",
                      yes(v["peak_near_half"]),
                      f"{yes(v['half_after_above_both_members'])} ({pct(v['half_after'])} vs {pct(best)})",
                      yes(v["peak_above_both_members"]),
                      f"{yes(v['half_after_above_both_ends_after'])} ({pct(v['half_after'])} vs "
                      f"{pct(v['ends_after'][0])} / {pct(v['ends_after'][1])})"])
    lines += md_table(["dataset", "dip at r = 0.5 without fine-tuning (depth below the lower end)",
                       "lowest point before", "peak after 3 epochs (r)", "peak within 0.2 of r = 0.5",
                       "r = 0.5 after 3 epochs above both members", "peak above both members",
                       "r = 0.5 after 3 epochs above both ends (r = 0, 1) after 3 epochs"], table, "llrrllll")
    lines += ["", "The last column asks what the paper's peak implies: does mixing both members' neurons beat keeping "
              "one member's neurons (r = 0 or 1: one member, its output layer halved, with the same 3 epochs of "
              "fine-tuning)? Where the fine-tuned ends are already above both members, beating the members is "
              "mostly the extra training, not the transplant.", "", "![accuracy vs r](transplant_sweep.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = NAMES
    ds_list = list(result["results"])
    fig, axes = plt.subplots(1, len(ds_list), figsize=(6.2 * len(ds_list), 5.2), squeeze=False)
    for ax, ds in zip(axes[0], ds_list):
        res = result["results"][ds]
        pts = res["points"]
        rs = [p["r"] for p in pts]
        ax.plot(rs, [100 * p["before"] for p in pts], "o--", color="C1", label="no fine-tuning")
        ax.errorbar(rs, [100 * p["after_mean"] for p in pts], yerr=[100 * p["after_std"] for p in pts],
                    fmt="o-", color="C0", capsize=3, label=f"after {EPOCHS} epochs (mean ± std)")
        nt = res["nt"]
        ax.plot([nt["fraction_from_b"]], [100 * nt["before"]], "*", color="C1", ms=12, mec="k",
                label="NT (global top-W), no fine-tuning")
        ax.errorbar([nt["fraction_from_b"]], [100 * nt["after_mean"]], yerr=[100 * nt["after_std"]], fmt="*",
                    color="C0", ms=12, mec="k", label=f"NT, after {EPOCHS} epochs")
        ax.axhline(100 * res["members"][0], color="gray", ls="-", lw=1, label="member A")
        ax.axhline(100 * res["members"][1], color="gray", ls="-.", lw=1, label="member B")
        ax.axhline(100 * res["ensemble"], color="black", ls=":", lw=1, label="ensemble")
        ax.set_xlabel("r: fraction of each hidden layer's neurons taken from member B")
        ax.set_ylabel("validation accuracy, %")
        ax.set_title(names[ds])
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = cli(__doc__, "digits and MNIST-1D (2000 held-out sequences), r = 0, 0.5, 1, seed 0, 1 member epoch")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), help="default: all (--quick: digits, mnist1d)")
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)
    from importlib.metadata import version

    from reconstruction import HELDOUT
    st, started, t0 = stamp(), datetime.datetime.now().astimezone(), time.perf_counter()
    ratios, seeds, member_epochs = ([0.0, 0.5, 1.0], [0], 1) if args.quick else \
        ([round(0.1 * i, 1) for i in range(11)], [0, 1, 2], 50)
    datasets = args.datasets or (["digits", "mnist1d"] if args.quick else list(DATASETS))
    results, meta = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for ds in datasets:
            log(ds)
            paths, train, val, meta[ds] = DATASETS[ds](Path(tmp), member_epochs, log, 2000 if args.quick else HELDOUT)
            results[ds] = sweep(paths, train, val, ratios, seeds, log)
    result = {
        "config": {"ratios": ratios, "seeds": seeds, "epochs": EPOCHS, "quick": args.quick},
        "environment": {"mnist1d": version("mnist1d"), "date": started.strftime("%Y-%m-%d %H:%M %Z")},
        "datasets": meta, "results": results, "paper": PAPER,
        "verdicts": {ds: verdicts(res) for ds, res in results.items()},
    }
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    md = render(result)
    print(md)
    write_results(args.out, "transplant_sweep", md, result, st)
    plot(result, args.out / "transplant_sweep.png")


if __name__ == "__main__":
    main()
