#!/usr/bin/env python
"""Model soups of the fused model: `merge --soup 4` against its ingredients and against equal compute.

For each member set, the members are transplanted once (NT) and K = 4 copies are fine-tuned for E = 3 epochs
with seeds 0..3 (other batch orders; the default SGD recipe, lr 0.05 decaying linearly), then averaged
uniformly (`onnxfuse.fuse(..., soup=4)`). Compared on held-out data:
  - the soup against its best and its mean ingredient (the sparse-model-soups claim: the average of copies
    retrained from one pruned start generalizes better than each);
  - one copy fine-tuned for K x E = 12 epochs (the same compute in one model).

Member sets (none designed for onnxfuse):
  - digits MLPs, N = 2, and digits CNNs, N = 3 (sample_models/, Adam);
  - MNIST-1D MLPs 40-100-100-10, N = 2, and 1-D CNNs, N = 3, trained here with Adam (lr 1e-3, 15 epochs),
    exported with the legacy torch.onnx exporter; scored on 20000 generated held-out sequences
    (benchmarks/reconstruction.py's generator and helpers).

    python benchmarks/soup.py            # about 30 minutes on 2 CPU cores
    python benchmarks/soup.py --quick    # digits MLPs only, K = 2, E = 1; prints, writes nothing

Writes benchmarks/results/soup.md and soup.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import onnxfuse  # noqa: E402
from _common import git_state  # noqa: E402

SAMPLES = ROOT / "sample_models"


def member_sets(quick: bool, work: Path) -> list[dict]:
    sets = [{"name": "digits MLP, N = 2", "members": [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)],
             "train": str(SAMPLES / "digits_train.npz"), "val": str(SAMPLES / "digits_val.npz")}]
    if quick:
        return sets
    sets.append({"name": "digits CNN, N = 3", "members": [str(SAMPLES / f"digits_cnn_{i}.onnx") for i in range(3)],
                 "train": str(SAMPLES / "digits_images_train.npz"), "val": str(SAMPLES / "digits_images_val.npz")})
    import numpy as np
    import reconstruction as r
    x, y, _, _ = r.dataset()
    xh, yh = r.heldout()
    for kind, n in (("mlp", 2), ("cnn", 3)):
        factory, shape = r.nets()[kind]
        train, val = work / f"mnist1d_{kind}_train.npz", work / f"mnist1d_{kind}_heldout.npz"
        np.savez(train, x=x.reshape(-1, *shape), y=y)
        np.savez(val, x=xh.reshape(-1, *shape), y=yh)
        members = [r.export(r.train_member(factory, shape, x, y, seed, 15), shape, work / f"m1d_{kind}_{seed}.onnx")
                   for seed in range(n)]
        sets.append({"name": f"MNIST-1D {kind.upper()}, N = {n}", "members": members, "train": str(train),
                     "val": str(val)})
    return sets


def measure(s: dict, k: int, epochs: int, log) -> dict:
    acc = lambda summary, key: summary["accuracy"][key]["accuracy"]
    summary = onnxfuse.fuse(s["members"], "nt", data=s["train"], val=s["val"], training={"epochs": epochs},
                            soup=k).summary
    ingredients = [acc(summary, f"copy {i} (seed {i})") for i in range(k)]
    soup = acc(summary, f"uniform soup of {k}")
    long = onnxfuse.fuse(s["members"], "nt", data=s["train"], val=s["val"], training={"epochs": k * epochs}).summary
    members = [acc(summary, Path(m).name) for m in s["members"]]
    row = {"name": s["name"], "members": members, "ensemble": acc(summary, "ensemble (mean of logits)"),
           "ingredients": ingredients, "best ingredient": max(ingredients),
           "mean ingredient": statistics.fmean(ingredients), "soup": soup,
           f"one copy, {k * epochs} epochs": acc(long, "result after fine-tuning")}
    log(f"{s['name']}: soup {soup:.4f}, ingredients {ingredients}, {k * epochs} epochs "
        f"{row[f'one copy, {k * epochs} epochs']:.4f}")
    return row


def markdown(rows: list[dict], k: int, epochs: int, commit: str) -> str:
    long = f"one copy, {k * epochs} epochs"
    lines = ["# Model soups of the fused model", "",
             f"`python benchmarks/soup.py`, commit {commit}, {datetime.date.today()}, 2 CPU cores. NT, then K = {k} "
             f"copies fine-tuned {epochs} epochs each (seeds 0..{k - 1}, default SGD recipe) and averaged uniformly "
             f"(`merge --soup {k}`); against one copy fine-tuned {k * epochs} epochs (equal compute). Held-out "
             "accuracy (%).", "",
             f"| member set | best member | ensemble | mean ingredient | best ingredient | soup | {long} | "
             "soup > mean | soup > best |", "|---|---:|---:|---:|---:|---:|---:|:-:|:-:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {100 * max(r['members']):.2f} | {100 * r['ensemble']:.2f} | "
                     f"{100 * r['mean ingredient']:.2f} | {100 * r['best ingredient']:.2f} | {100 * r['soup']:.2f} | "
                     f"{100 * r[long]:.2f} | {'yes' if r['soup'] > r['mean ingredient'] else 'no'} | "
                     f"{'yes' if r['soup'] > r['best ingredient'] else 'no'} |")
    beat_mean = sum(r["soup"] > r["mean ingredient"] for r in rows)
    beat_best = sum(r["soup"] > r["best ingredient"] for r in rows)
    equal = [r["name"] for r in rows if r[long] >= r["soup"]]
    lines += ["", f"The soup beats its mean ingredient in {beat_mean} of {len(rows)} sets (target: all) and its best "
              f"ingredient in {beat_best} of {len(rows)} (target: at least 3 of 4). "
              + (f"Equal compute on one model does as well or better in: {', '.join(equal)}." if equal else
                 "Equal compute on one model is behind the soup in every set."), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="digits MLPs only, K = 2, E = 1; writes nothing")
    args = parser.parse_args()
    k, epochs = (2, 1) if args.quick else (4, 3)
    commit = git_state()
    log = lambda m: print(m, flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxfuse-soup-") as tmp:
        rows = [measure(s, k, epochs, log) for s in member_sets(args.quick, Path(tmp))]
    text = markdown(rows, k, epochs, commit)
    print(text)
    if not args.quick:
        (HERE / "results" / "soup.md").write_text(text)
        (HERE / "results" / "soup.json").write_text(json.dumps({"commit": commit, "k": k, "epochs": epochs,
                                                                "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
