#!/usr/bin/env python
"""Model soups of the fused model: `merge --soup 4` against its ingredients and against equal compute.

For each member set, the members are transplanted (NT) and fine-tuned for E = 3 epochs (the start), then K = 4
copies of the start are fine-tuned for Es = 2 more epochs each with seeds seed+1..seed+4 (other batch orders), and
averaged uniformly: `onnxfuse.fuse(..., training={"epochs": 3}, soup=4, soup_epochs=2)`, with the default
fine-tuning recipe. Compared on held-out data:
  - the soup against its best and its mean ingredient (the sparse-model-soups claim: the average of copies
    retrained from one pruned start generalizes better than each);
  - the start fine-tuned on for K x Es more epochs as one model (E + K x Es = 11 epochs: the same compute).
Every figure is the mean over fine-tuning seeds 0, 1, 2 (SEEDS; the start, its copies and the long run follow
the seed), and the table shows the per-seed differences: one digits image is 0.19 pp.
A first version branched the copies straight from the transplanted model (K copies x E epochs): there the
soup lost to its mean ingredient on the digits MLPs (94.81 vs 95.05), the copies having drifted apart.

Member sets (none designed for onnxfuse):
  - digits MLPs, N = 2, and digits CNNs, N = 3 (sample_models/, Adam);
  - MNIST-1D MLPs 40-100-100-10, N = 2, and 1-D CNNs, N = 3, trained here with Adam (lr 1e-3, 15 epochs),
    exported with the legacy torch.onnx exporter; scored on 20000 generated held-out sequences
    (benchmarks/reconstruction.py's generator and helpers).

    python benchmarks/soup.py            # about 30 minutes on 2 CPU cores
    python benchmarks/soup.py --quick --out /tmp/q   # digits MLPs only, K = 2, E = Es = 1

Writes benchmarks/results/soup.md and soup.json.
"""
from __future__ import annotations

import datetime
import statistics
import tempfile
from pathlib import Path

from _common import AFTER, ENSEMBLE, SAMPLES, cli, md_table, mnist1d, mnist1d_heldout, pct, stamp, write_results
import onnxfuse  # noqa: E402  (the checkout's: _common puts it first on sys.path)

SEEDS = (0, 1, 2)       # fine-tuning seeds: every figure is their mean (the digits' held-out set is small)


def member_sets(quick: bool, work: Path) -> list[dict]:
    sets = [{"name": "digits MLP, N = 2", "members": [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)],
             "train": str(SAMPLES / "digits_train.npz"), "val": str(SAMPLES / "digits_val.npz")}]
    if quick:
        return sets
    sets.append({"name": "digits CNN, N = 3", "members": [str(SAMPLES / f"digits_cnn_{i}.onnx") for i in range(3)],
                 "train": str(SAMPLES / "digits_images_train.npz"), "val": str(SAMPLES / "digits_images_val.npz")})
    import numpy as np
    import reconstruction as r
    x, y, _, _ = mnist1d()
    xh, yh = mnist1d_heldout(r.HELDOUT, r.HELDOUT_SEED)
    for kind, n in (("mlp", 2), ("cnn", 3)):
        factory, shape = r.nets()[kind]
        train, val = work / f"mnist1d_{kind}_train.npz", work / f"mnist1d_{kind}_heldout.npz"
        np.savez(train, x=x.reshape(-1, *shape), y=y)
        np.savez(val, x=xh.reshape(-1, *shape), y=yh)
        members = [r.export_member(r.train_member(factory, shape, x, y, seed, 15), shape,
                                   work / f"m1d_{kind}_{seed}.onnx") for seed in range(n)]
        sets.append({"name": f"MNIST-1D {kind.upper()}, N = {n}", "members": members, "train": str(train),
                     "val": str(val)})
    return sets


def measure_seed(s: dict, k: int, epochs: int, soup_epochs: int, seed: int, log) -> dict:
    acc = lambda summary, key: summary["accuracy"][key]["accuracy"]
    summary = onnxfuse.fuse(s["members"], "nt", data=s["train"], val=s["val"],
                            training={"epochs": epochs, "seed": seed}, soup=k, soup_epochs=soup_epochs).summary
    ingredients = [acc(summary, f"copy {i} (+{soup_epochs} epochs, seed {seed + i + 1})") for i in range(k)]
    soup = acc(summary, f"uniform soup of {k}")
    total = epochs + k * soup_epochs
    long = onnxfuse.fuse(s["members"], "nt", data=s["train"], val=s["val"],
                         training={"epochs": total, "seed": seed}).summary
    members = [acc(summary, Path(m).name) for m in s["members"]]
    row = {"seed": seed, "members": members, "ensemble": acc(summary, ENSEMBLE),
           "start": acc(summary, AFTER), "ingredients": ingredients,
           "best ingredient": max(ingredients), "mean ingredient": statistics.fmean(ingredients), "soup": soup,
           "equal compute": acc(long, AFTER), "equal compute epochs": total}
    log(f"{s['name']}, seed {seed}: soup {soup:.4f}, ingredients {ingredients}, {total} epochs "
        f"{row['equal compute']:.4f}")
    return row


def measure(s: dict, k: int, epochs: int, soup_epochs: int, seeds, log) -> dict:
    """One row per member set: the figures of every fine-tuning seed (the start, its copies and the long run
    all follow it) and their means, which the verdicts use."""
    runs = [measure_seed(s, k, epochs, soup_epochs, seed, log) for seed in seeds]
    row = {"name": s["name"], "runs": runs, "members": runs[0]["members"], "ensemble": runs[0]["ensemble"]}
    for key in ("start", "best ingredient", "mean ingredient", "soup", "equal compute"):
        row[key] = statistics.fmean(r[key] for r in runs)
    row["soup - mean ingredient"] = [r["soup"] - r["mean ingredient"] for r in runs]
    row["soup - best ingredient"] = [r["soup"] - r["best ingredient"] for r in runs]
    return row


def markdown(rows: list[dict], k: int, epochs: int, soup_epochs: int, seeds) -> str:
    long = f"one model, {epochs + k * soup_epochs} epochs"
    seeds_text = ", ".join(map(str, seeds))
    lines = ["# Model soups of the fused model", "",
             f"`python benchmarks/soup.py`, {datetime.date.today()}. NT fine-tuned "
             f"{epochs} epochs (the start), then K = {k} copies of the start fine-tuned {soup_epochs} more epochs "
             f"each (seeds seed+1 .. seed+{k}) and averaged uniformly (`merge --epochs {epochs} --soup {k} --soup-epochs "
             f"{soup_epochs}`), default fine-tuning recipe; against the start fine-tuned on as one model for the "
             f"same total ({long}). Held-out accuracy (%), the mean over fine-tuning seeds {seeds_text} (the "
             f"start, its copies and the long run follow the seed; the digits' held-out set is 540 images, one "
             f"image = 0.19 pp); the verdicts compare these means.", ""]
    per_seed = lambda values: " / ".join(f"{100 * v:+.2f}" for v in values)  # noqa: E731
    lines += md_table(["member set", "best member", "ensemble", "start", "mean ingredient", "best ingredient", "soup",
                       long, "soup - mean, per seed (pp)", "soup - best, per seed (pp)", "soup > mean",
                       "soup > best"],
                      [[r["name"], pct(max(r["members"])), pct(r["ensemble"]), pct(r["start"]),
                        pct(r["mean ingredient"]), pct(r["best ingredient"]), pct(r["soup"]), pct(r["equal compute"]),
                        per_seed(r["soup - mean ingredient"]), per_seed(r["soup - best ingredient"]),
                        "yes" if r["soup"] > r["mean ingredient"] else "no",
                        "yes" if r["soup"] > r["best ingredient"] else "no"] for r in rows], "lrrrrrrrllcc")
    beat_mean = sum(r["soup"] > r["mean ingredient"] for r in rows)
    beat_best = sum(r["soup"] > r["best ingredient"] for r in rows)
    equal = [r["name"] for r in rows if r["equal compute"] >= r["soup"]]
    lines += ["", f"The soup beats its mean ingredient in {beat_mean} of {len(rows)} sets (target: all) and its best "
              f"ingredient in {beat_best} of {len(rows)} (target: at least 3 of 4). "
              + (f"Equal compute on one model does as well or better in: {', '.join(equal)}." if equal else
                 "Equal compute on one model is behind the soup in every set."), ""]
    return "\n".join(lines)


def main():
    args = cli(__doc__, "digits MLPs only, K = 2, E = Es = 1").parse_args()
    k, epochs, soup_epochs = (2, 1, 1) if args.quick else (4, 3, 2)
    seeds = (0,) if args.quick else SEEDS
    st = stamp()
    log = lambda m: print(m, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="onnxfuse-soup-") as tmp:
        rows = [measure(s, k, epochs, soup_epochs, seeds, log) for s in member_sets(args.quick, Path(tmp))]
    text = markdown(rows, k, epochs, soup_epochs, seeds)
    print(text)
    write_results(args.out, "soup", text, {"k": k, "epochs": epochs, "soup_epochs": soup_epochs, "seeds": seeds,
                                          "rows": rows}, st)


if __name__ == "__main__":
    main()
