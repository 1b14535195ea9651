#!/usr/bin/env python
"""Which soup recipe beats its best ingredient? The variants of `merge --soup 4` that benchmarks/soup.py does not run.

soup.py's recipe (NT fine-tuned E = 3 epochs, then K = 4 copies fine-tuned Es = 2 more epochs at the start's rate,
seeds seed+1 .. seed+4, averaged uniformly) beats its best ingredient on the MNIST-1D sets but not on the digits
sets. This script asks whether another recipe would, on the sets where it does not:
  - the copies' rate: 0.5x, 1x (shipped), 2x the start's, and a spread 0.5x / 1x / 2x / 4x (one rate per copy;
    the issue's "small spread of learning rates");
  - the copies' epochs Es = 1, 2 (shipped), 4;
  - a start fine-tuned longer (E = 8, near convergence: soups are usually made of converged ingredients).
The copies are made as `merge --soup` makes them (onnxfuse.training.finetune from the start, last epoch kept,
the start's options otherwise) and averaged with onnxfuse.soups.average; the shipped variant (E = 3, 1x, Es = 2)
reproduces soup.py's figures for the seeds both run.

Member sets: the digits MLPs (N = 2) and CNNs (N = 3) of sample_models/, fine-tuning seeds 0-5 (the digits'
held-out set is 540 images: one image = 0.19 pp, and the best of 4 ingredients is favoured by that noise); the
MNIST-1D 1-D CNNs (N = 3, soup.py's) at E = 3, seeds 0-2, for the rate variants, where soup.py's recipe wins.

    python benchmarks/soup_variants.py            # about 15 minutes on 2 CPU cores
    python benchmarks/soup_variants.py --quick --out /tmp/q   # digits MLPs, seed 0, two variants

Writes benchmarks/results/soup_variants.md and soup_variants.json.
"""
from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from _common import cli, log, md_table, stamp, write_results
import onnxfuse  # noqa: E402  (the checkout's: _common puts it first on sys.path)
from onnxfuse.data import load_data
from onnxfuse.model_io import load_member
from onnxfuse.runtime import Runner, scores
from onnxfuse.soups import average
from onnxfuse.training import TrainOptions, finetune

import soup as shipped

K = 4
RATES = {"1x": (1, 1, 1, 1), "0.5x": (0.5,) * K, "2x": (2,) * K, "spread 0.5-4x": (0.5, 1, 2, 4)}


def variants(quick: bool, longer_start: bool) -> list[dict]:
    """(start epochs, rate name, copy epochs); the shipped one first."""
    if quick:
        return [{"start": 1, "rate": "1x", "epochs": 1}, {"start": 1, "rate": "2x", "epochs": 1}]
    starts = (3, 8) if longer_start else (3,)
    out = []
    for e in starts:
        out += [{"start": e, "rate": r, "epochs": 2} for r in RATES]
        out += [{"start": e, "rate": "1x", "epochs": es} for es in (1, 4)]
    return out


def accuracy(model, data) -> float:
    return scores(Runner(model)(data), data.y)["accuracy"]


def measure_set(s: dict, seeds, todo: list[dict]) -> list[dict]:
    rows = []
    for seed in seeds:
        for e in sorted({v["start"] for v in todo}):
            fusion = onnxfuse.fuse(s["members"], "nt", data=s["train"], training={"epochs": e, "seed": seed})
            start, chosen = fusion.model, fusion.summary["training"]["options"]
            options = TrainOptions(**{k: v for k, v in chosen.items() if k in TrainOptions.__dataclass_fields__})
            train, val = load_data(s["train"], start), load_data(s["val"], start)
            for v in (v for v in todo if v["start"] == e):
                copies, failed = [], None
                for i, factor in enumerate(RATES[v["rate"]]):
                    copy = replace(options, seed=seed + 1 + i, epochs=v["epochs"], lr=options.lr * factor,
                                   last_epoch=True, require_gain=False)
                    try:
                        copies.append(finetune(start, train, copy).model)
                    except onnxfuse.OnnxFuseError as err:       # a copy diverged: the recipe fails
                        failed = str(err)
                        break
                row = {"set": s["name"], "seed": seed, **v, "lr": options.lr}
                if failed:
                    row["failed"] = failed
                else:
                    ingredients = [accuracy(c, val) for c in copies]
                    graph, tensors = average([load_member(c, i) for i, c in enumerate(copies)])
                    row.update(ingredients=ingredients, soup=accuracy(tensors.materialize(graph), val),
                               best=max(ingredients), mean=statistics.fmean(ingredients))
                rows.append(row)
                log(f"{s['name']}, seed {seed}, E {e}, {v['rate']}, Es {v['epochs']}: "
                    + (f"failed: {failed}" if failed else
                       f"soup {row['soup']:.4f}, best {row['best']:.4f}, mean {row['mean']:.4f}"))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["# Soup recipes against their best ingredient", "",
             f"`python benchmarks/soup_variants.py`: K = {K} copies of the start (NT fine-tuned E epochs, default "
             "recipe), each fine-tuned Es more epochs at a multiple of the start's rate, averaged uniformly. "
             "Held-out accuracy (%), means over the fine-tuning seeds; wins / ties / losses: seeds where the "
             "soup is above / equal to / below its best ingredient. The shipped recipe is E = 3, 1x, Es = 2.", ""]
    table = []
    keys = []
    for r in rows:
        key = (r["set"], r["start"], r["rate"], r["epochs"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        runs = [r for r in rows if (r["set"], r["start"], r["rate"], r["epochs"]) == key]
        ok = [r for r in runs if "failed" not in r]
        if not ok:
            table.append([*map(str, key), str(len(runs)), "-", "-", "-", "-", "-", "-", f"{len(runs)} diverged"])
            continue
        mean = lambda k: statistics.fmean(r[k] for r in ok)  # noqa: E731
        wins = sum(r["soup"] > r["best"] for r in ok)
        ties = sum(r["soup"] == r["best"] for r in ok)
        table.append([*map(str, key), str(len(runs)), f"{100 * mean('mean'):.2f}", f"{100 * mean('best'):.2f}",
                      f"{100 * mean('soup'):.2f}", f"{100 * (mean('soup') - mean('best')):+.2f}",
                      f"{100 * (mean('soup') - mean('mean')):+.2f}", f"{wins} / {ties} / {len(ok) - wins - ties}",
                      f"{len(runs) - len(ok)} diverged" if len(ok) < len(runs) else ""])
    lines += md_table(["member set", "E", "copies' rate", "Es", "seeds", "mean ingredient", "best ingredient",
                       "soup", "soup - best (pp)", "soup - mean (pp)", "vs best: W / T / L", "note"], table,
                      "lrlrrrrrrrcl")
    return "\n".join(lines) + "\n"


def main():
    args = cli(__doc__, "digits MLPs, seed 0, start and copies 1 epoch, rates 1x and 2x").parse_args()
    st = stamp()
    with tempfile.TemporaryDirectory(prefix="onnxfuse-soup-variants-") as tmp:
        sets = shipped.member_sets(True, Path(tmp)) if args.quick else shipped.member_sets(False, Path(tmp))
        rows = []
        for s in sets:
            digits = s["name"].startswith("digits")
            if args.quick:
                rows += measure_set(s, (0,), variants(True, False))
            elif digits:
                rows += measure_set(s, range(6), variants(False, True))
            elif s["name"] == "MNIST-1D CNN, N = 3":
                rows += measure_set(s, range(3), [v for v in variants(False, False) if v["epochs"] == 2])
    text = markdown(rows)
    print(text)
    write_results(args.out, "soup_variants", text, {"k": K, "rates": RATES, "rows": rows}, st)


if __name__ == "__main__":
    main()
