#!/usr/bin/env python
"""Accuracy of Neuron Transplantation (NT) on the sample models, before and after fine-tuning.

For each sample family (digits MLP, digits CNN) and for 2 members (0, 1) and 3 members (0, 1, 2) we report
the validation accuracy of

  - each member, their ensemble (mean of logits) and the NT model before fine-tuning;
  - the NT model after E = 1..5 epochs of fine-tuning, one separate run per E (the default learning-rate
    schedule decays linearly to 0 over the whole run, so "E epochs" is not a prefix of a longer run), for
    four training settings:
        ours-ce    onnxfuse defaults: SGD, momentum 0.9, lr 0.05, linear decay to 0, batch 64, cross-entropy
        ours-kd    the same, distill=True (KL to the members' mean logits, T = 2)
        paper-ce   the NT paper's settings: SGD, momentum 0.9, lr 0.01, constant, batch 64, cross-entropy
        paper-kd   the same, distill=True
    each run repeated with TrainOptions.seed = 0, 1, 2 (batch order), reported as mean +- std over seeds.

Every fine-tuning run goes through the public API, `onnxfuse.fuse(paths, "nt", data=train, val=val,
training={...})`, and every number is taken from `Fusion.summary["accuracy"]`, i.e. onnxruntime running the
written ONNX graph on the validation set (the torch-side validation accuracy that the training loop logs is
only used as a cross-check and reported as such).

Verdicts, per family and N:
  - the first E at which ours-ce (mean over seeds) is strictly above the best member; if E = 1..5 do not
    reach it, ours-ce is also run for E = 6..8 (that search only);
  - whether ours beats paper (same loss, strictly higher mean over seeds) at every E = 1..5.

    python benchmarks/accuracy.py            # full run (a minute or two on 2 CPU cores)
    python benchmarks/accuracy.py --quick --out /tmp/q   # smoke run: N = 2, E = 1, seed 0, no extension

Writes benchmarks/results/accuracy.md and benchmarks/results/accuracy.json (or --out DIR) and prints the table.
"""
from __future__ import annotations

import datetime
import time
from pathlib import Path

from _common import (AFTER, BEFORE, ENSEMBLE, SAMPLES, cli, log, md_table, mean_std, pct, stamp,
                     write_results)

FAMILIES = {
    "mlp": {"models": "digits_mlp_{}.onnx", "train": "digits_train.npz", "val": "digits_val.npz"},
    "cnn": {"models": "digits_cnn_{}.onnx", "train": "digits_images_train.npz", "val": "digits_images_val.npz"},
}
MEMBER_SETS = {2: [0, 1], 3: [0, 1, 2]}
# Training options passed to onnxfuse (TrainOptions fields). "ours" leaves everything at the library's
# defaults on purpose, so that the benchmark follows them if they change; the resolved options are recorded.
SETTINGS = {
    "ours-ce": {},
    "ours-kd": {"distill": True},
    "paper-ce": {"lr": 0.01, "schedule": "constant", "momentum": 0.9, "batch_size": 64, "optimizer": "sgd"},
    "paper-kd": {"lr": 0.01, "schedule": "constant", "momentum": 0.9, "batch_size": 64, "optimizer": "sgd",
                 "distill": True},
}
LABELS = {"ours-ce": "ours, cross-entropy", "ours-kd": "ours, distillation",
          "paper-ce": "paper, cross-entropy", "paper-kd": "paper, distillation"}
PAIRS = [("ours-ce", "paper-ce"), ("ours-kd", "paper-kd")]
SEARCH_SETTING, SEARCH_MAX = "ours-ce", 8


class Bench:
    def __init__(self, epochs: list[int], seeds: list[int], extend: bool, log):
        self.epochs, self.seeds, self.extend, self.log = epochs, seeds, extend, log
        self.cross_check = []          # |torch-side val accuracy - onnxruntime val accuracy| per run

    def tune(self, paths, family: dict, setting: str, epochs: int, seed: int, base: dict) -> dict:
        import onnxfuse
        training = {**SETTINGS[setting], "epochs": epochs, "seed": seed}
        t = time.perf_counter()
        fusion = onnxfuse.fuse(paths, "nt", data=SAMPLES / family["train"], val=SAMPLES / family["val"],
                               training=training)
        acc = fusion.summary["accuracy"]
        if acc[BEFORE]["accuracy"] != base[BEFORE]["accuracy"]:
            raise RuntimeError(f"NT before fine-tuning changed between calls: {acc[BEFORE]} vs {base[BEFORE]}")
        torch_side = fusion.summary["training"]["history"][-1]["accuracy"]
        self.cross_check.append(abs(torch_side - acc[AFTER]["accuracy"]))
        return {"seed": seed, "accuracy": acc[AFTER]["accuracy"], "loss": acc[AFTER]["loss"],
                "torch_val_accuracy": torch_side, "seconds": round(time.perf_counter() - t, 3),
                "options": fusion.summary["training"]["options"]}

    def cell(self, paths, family, setting, epochs, base) -> dict:
        runs = [self.tune(paths, family, setting, epochs, s, base) for s in self.seeds]
        m, sd = mean_std([r["accuracy"] for r in runs])
        options = {k: v for k, v in runs[0]["options"].items() if k != "seed"}   # the same for every seed
        for r in runs:
            del r["options"]
        return {"epochs": epochs, "mean": m, "std": sd, "options": options, "runs": runs}

    def family_n(self, name: str, n: int) -> dict:
        import onnxfuse
        family = FAMILIES[name]
        paths = [str(SAMPLES / family["models"].format(i)) for i in MEMBER_SETS[n]]
        base = onnxfuse.fuse(paths, "nt", val=SAMPLES / family["val"]).summary["accuracy"]
        members = {Path(p).name: base[Path(p).name]["accuracy"] for p in paths}
        best = max(members.values())
        out = {"family": name, "n": n, "members": members, "best_member": best,
               "ensemble": base[ENSEMBLE]["accuracy"], "nt_before": base[BEFORE]["accuracy"], "settings": {}}
        for setting in SETTINGS:
            cells = []
            for e in self.epochs:
                cells.append(self.cell(paths, family, setting, e, base))
                c = cells[-1]
                self.log(f"  {name} N={n} {setting:8s} E={e}: {100 * c['mean']:.2f} +- {100 * c['std']:.2f}")
            out["settings"][setting] = cells
        # first E at which ours-ce (mean over seeds) beats the best member; extend up to E = 8 if needed
        search = {c["epochs"]: c for c in out["settings"][SEARCH_SETTING]}
        first = next((e for e in sorted(search) if search[e]["mean"] > best), None)
        extension = []
        if first is None and self.extend:
            for e in range(max(self.epochs) + 1, SEARCH_MAX + 1):
                c = self.cell(paths, family, SEARCH_SETTING, e, base)
                extension.append(c)
                self.log(f"  {name} N={n} {SEARCH_SETTING:8s} E={e}: {100 * c['mean']:.2f} +- "
                         f"{100 * c['std']:.2f} (search extension)")
                if c["mean"] > best:
                    first = e
                    break
        out["search_extension"] = extension
        out["first_epoch_beating_best_member"] = first
        out["searched_up_to"] = max([*self.epochs, *(c["epochs"] for c in extension)])
        # the same question for every setting, within the main grid only (informational)
        out["first_epoch_beating_best_member_by_setting"] = {
            s: next((c["epochs"] for c in cells if c["mean"] > best), None) for s, cells in out["settings"].items()}
        out["ours_vs_paper"] = {}
        for ours, paper in PAIRS:
            diffs = {c["epochs"]: c["mean"] - p["mean"] for c, p in zip(out["settings"][ours], out["settings"][paper])}
            out["ours_vs_paper"][f"{ours} > {paper}"] = {
                "every_epoch": all(d > 0 for d in diffs.values()),
                "failing_epochs": [e for e, d in diffs.items() if d <= 0],
                "difference_by_epoch": diffs}
        return out


def pm(c: dict, seeds: int) -> str:
    return f"{100 * c['mean']:.2f} ± {100 * c['std']:.2f}" if seeds > 1 else f"{100 * c['mean']:.2f}"


def verdicts(blocks: list[dict], epochs: list[int], extend: bool) -> dict:
    two = [b for b in blocks if b["n"] == 2]
    t1 = all(b["first_epoch_beating_best_member"] is not None and b["first_epoch_beating_best_member"] <= SEARCH_MAX
             for b in two)
    fails = [f"{b['family']} N={b['n']} {k} at E={b['ours_vs_paper'][k]['failing_epochs']}"
             for b in blocks for k in b["ours_vs_paper"] if not b["ours_vs_paper"][k]["every_epoch"]]
    ce_fails = [f for f in fails if "ours-ce" in f]
    return {
        "nt_beats_best_member_with_2_members_within_8_epochs": {
            "met": t1, "per_family": {b["family"]: b["first_epoch_beating_best_member"] for b in two},
            "complete": extend or t1,
            "note": "ours-ce, mean over seeds, strictly above the best member's validation accuracy"},
        "ours_beats_paper_at_every_epoch": {
            "met": not fails, "met_cross_entropy_only": not ce_fails, "failures": fails,
            "epochs": epochs, "note": "strictly higher mean over seeds, same loss, every family, N and E"},
    }


def render(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    seeds = len(cfg["seeds"])
    blocks = result["results"]
    lines = [
        "# Accuracy: Neuron Transplantation on the sample models, before and after fine-tuning",
        "",
        f"- What: `onnxfuse.fuse(paths, \"nt\", data=train, val=val, training={{...}})` on the sample digits "
        f"families (MLP: `digits_mlp_*.onnx` on `digits_train/val.npz`; CNN: `digits_cnn_*.onnx` on "
        f"`digits_images_train/val.npz`; 1257 training / 540 validation samples), members 0,1 (N=2) and 0,1,2 "
        f"(N=3). Fine-tuned for E = {', '.join(map(str, cfg['epochs']))} epochs, one separate run per E, "
        f"seeds {', '.join(map(str, cfg['seeds']))} (TrainOptions.seed: batch order)"
        + (" — QUICK smoke run" if cfg["quick"] else "") + ".",
        "- Numbers: validation accuracy in %, from `Fusion.summary[\"accuracy\"]` (onnxruntime on the written "
        "ONNX graph). Fine-tuned cells: mean ± sample std over seeds. One validation sample = 0.185 %.",
        "- Settings: **ours** = onnxfuse defaults (SGD, momentum 0.9, lr 0.05, linear decay to 0 over the run, "
        "batch 64); **paper** = SGD, momentum 0.9, lr 0.01, constant, batch 64. **ce** = cross-entropy on labels, "
        "**kd** = distillation (`distill=True`, KL to the members' mean logits, T = 2).",
        f"- Torch threads {env['torch_threads']} (`--torch-threads`); the machine is shared with other work, so "
        "timings are indicative only.",
        f"- Date: {env['date']}; the benchmark took {result['wall_seconds']:.0f} s "
        f"({result['fine_tuning_runs']} fine-tuning runs).",
        f"- Reproduce: `python benchmarks/accuracy.py` (smoke run: `python benchmarks/accuracy.py --quick`). "
        f"Fine-tuning is deterministic on CPU for a given seed.",
        "",
        "## Members, ensemble and NT before fine-tuning",
        "",
        *md_table(["family", "N", "member 0", "member 1", "member 2", "best member", "ensemble (mean of logits)",
                   "NT before fine-tuning"],
                  [[b["family"], b["n"], *(pct(x, "") for x in [*b["members"].values(), None, None][:3]),
                    pct(b["best_member"]), pct(b["ensemble"]), pct(b["nt_before"])] for b in blocks]),
    ]
    lines += ["", "## NT after E epochs of fine-tuning", "",
              "Bold: mean above the best member. Extra columns (ours-ce only) are the search for the first E "
              "that beats the best member, run only where E = 1..5 did not reach it.", ""]
    extra = sorted({c["epochs"] for b in blocks for c in b["search_extension"]})
    head = [f"E={e}" for e in cfg["epochs"]] + [f"E={e}" for e in extra]
    table = []
    for b in blocks:
        for s, cells in b["settings"].items():
            row = cells + (b["search_extension"] if s == SEARCH_SETTING else [])
            by_e = {c["epochs"]: c for c in row}
            vals = []
            for e in [*cfg["epochs"], *extra]:
                c = by_e.get(e)
                vals.append("" if c is None else (f"**{pm(c, seeds)}**" if c["mean"] > b["best_member"]
                                                  else pm(c, seeds)))
            table.append([b["family"], b["n"], pct(b["best_member"]), s, *vals])
    lines += md_table(["family", "N", "best member", "setting", *head], table, "lrrl" + "r" * len(head))
    table = []
    for b in blocks:
        first = b["first_epoch_beating_best_member"]
        first_s = f"E = {first}" if first is not None else f"not reached (searched E <= {b['searched_up_to']})"
        per = " / ".join(str(v) if v is not None else "–" for v in b["first_epoch_beating_best_member_by_setting"].values())
        cmp = []
        for k, v in b["ours_vs_paper"].items():
            diffs = ", ".join(f"{100 * d:+.2f}" for d in v["difference_by_epoch"].values())
            cmp.append(("yes" if v["every_epoch"] else f"**no** (fails at E = {v['failing_epochs']})")
                       + f"; diff by E (pp): {diffs}")
        table.append([b["family"], b["n"], first_s, per, *cmp])
    lines += ["", "## Per family and N", "",
              *md_table(["family", "N", "first E where ours-ce beats the best member",
                         "first E (1..5) per setting: ours-ce / ours-kd / paper-ce / paper-kd",
                         "ours-ce > paper-ce at every E", "ours-kd > paper-kd at every E"], table, "lrllll")]
    v = result["verdicts"]
    t1, t2 = v["nt_beats_best_member_with_2_members_within_8_epochs"], v["ours_beats_paper_at_every_epoch"]
    per = ", ".join(f"{f}: {'E = ' + str(e) if e is not None else 'not reached'}" for f, e in t1["per_family"].items())
    lines += ["", "## Targets (from the issue)", "",
              f"- With 2 members, NT (ours-ce, mean over seeds) beats the best member on both families within "
              f"{SEARCH_MAX} epochs: **{'met' if t1['met'] else 'NOT met'}** ({per})"
              + ("" if t1["complete"] else " — search not extended past the quick grid") + ".",
              f"- Our defaults beat the paper's settings (SGD 0.01 constant, same loss) at every epoch count "
              f"E = {', '.join(map(str, cfg['epochs']))}, both families, N = 2 and 3: "
              f"**{'met' if t2['met'] else 'NOT met'}**"
              + ("" if t2["met"] else f" (cross-entropy only: {'met' if t2['met_cross_entropy_only'] else 'NOT met'}; "
                 f"failing: {'; '.join(t2['failures'])})") + ".",
              "",
              f"Cross-check: the largest gap between the training loop's torch-side validation accuracy after "
              f"the last epoch and onnxruntime's on the written graph was {100 * result['max_torch_ort_gap']:.3f} pp "
              f"over all runs.", ""]
    return "\n".join(lines)


def main() -> None:
    p = cli(__doc__, "N = 2, E = 1, seed 0, no search extension")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads (default 1: these models are tiny, and with more threads a "
                        "shared CPU makes each run several times slower)")
    args = p.parse_args()
    import torch
    torch.set_num_threads(args.torch_threads)
    epochs, seeds = ([1], [0]) if args.quick else ([1, 2, 3, 4, 5], [0, 1, 2])
    member_sets = {2: MEMBER_SETS[2]} if args.quick else MEMBER_SETS
    st, started = stamp(), datetime.datetime.now().astimezone()
    t0 = time.perf_counter()
    bench = Bench(epochs, seeds, extend=not args.quick, log=log)
    blocks = []
    for name in FAMILIES:
        for n in member_sets:
            log(f"{name}, N={n}")
            blocks.append(bench.family_n(name, n))
    result = {
        "config": {"epochs": epochs, "seeds": seeds, "quick": args.quick, "settings": SETTINGS,
                   "families": FAMILIES, "member_sets": member_sets, "search": {"setting": SEARCH_SETTING,
                                                                              "max_epochs": SEARCH_MAX}},
        "environment": {"torch_threads": torch.get_num_threads(), "date": started.strftime("%Y-%m-%d %H:%M %Z")},
        "results": blocks,
        "fine_tuning_runs": len(bench.cross_check),
        "max_torch_ort_gap": max(bench.cross_check, default=0.0),
    }
    result["verdicts"] = verdicts(blocks, epochs, not args.quick)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    md = render(result)
    print(md)
    write_results(args.out, "accuracy", md, result, st)


if __name__ == "__main__":
    main()
