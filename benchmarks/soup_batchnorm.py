#!/usr/bin/env python
"""Soups of BatchNorm nets: keep the average of the copies' running statistics, or re-estimate them?

Both torch exporters fold eval-mode BatchNorm into the layer before it, so most exports have no BN node; the
legacy exporter with `do_constant_folding=False` keeps them, and then fine-tuning updates their running
statistics (torch training mode) and a uniform soup averages them. The average of K copies' statistics is not
the statistics of the averaged weights; the soup papers re-estimate them on training data.

Members: `tests/test_architectures.py`'s ResNet- and MobileNetV3-like nets (BasicBlocks; inverted residuals
with squeeze-excitation and hardswish), seeds 0..N-1, trained here on scikit-learn's digits (1200 training /
597 held-out 8x8 images; Adam lr 3e-3, batch 64, 15 epochs), exported as above. For each set:
`onnxfuse.fuse(members, "nt", data=train, training={"epochs": 3}, soup=4, soup_epochs=2)` (default recipe),
then the soup's statistics re-estimated on the training images with `onnxfuse.batchnorm.reestimate`; both
scored on the held-out images, for two fine-tuning seeds.

    python benchmarks/soup_batchnorm.py            # about 10 minutes on 2 CPU cores
    python benchmarks/soup_batchnorm.py --quick    # one set, one seed, K = 2, 1 + 1 epochs

Writes benchmarks/results/soup_batchnorm.md and .json (or --out DIR) and prints the table.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ROOT, batchnorm_members, cli, digits_images_1200, md_table, stamp, write_results
import onnxfuse  # noqa: E402  (the checkout's: _common puts it first on sys.path)
from onnxfuse.batchnorm import reestimate  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    args = cli(__doc__, "one set, one seed, K = 2, 1 + 1 epochs").parse_args()
    import torch
    from graphs import run
    torch.set_num_threads(1)
    st, start = stamp(), time.perf_counter()
    xt, yt, xv, yv = digits_images_1200()
    acc = lambda m: 100 * float((run(m, xv).argmax(1) == yv).mean())     # noqa: E731
    sets = [("resnet", 2)] if args.quick else [("resnet", 2), ("resnet", 3), ("mobilenetv3", 2), ("mobilenetv3", 3)]
    k, epochs, soup_epochs = (2, 1, 1) if args.quick else (4, 3, 2)
    seeds = (0,) if args.quick else (0, 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.npz"
        np.savez(train, x=xt, y=yt)
        for name, n in sets:
            paths = batchnorm_members(name, range(n), xt, yt, Path(tmp), 1 if args.quick else 15)
            for seed in seeds:
                soup = onnxfuse.fuse(paths, "nt", data=str(train), soup=k, soup_epochs=soup_epochs,
                                     training={"epochs": epochs, "seed": seed})
                averaged = acc(soup.model)
                report = reestimate(soup.graph, soup.tensors, {"x": xt})
                row = {"net": name, "n": n, "seed": seed, "bn_nodes": report["batchnorm_nodes"],
                       "best_member": max(acc(p) for p in paths), "averaged_statistics": averaged,
                       "reestimated": acc(soup.tensors.materialize(soup.graph))}
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    gains = [r["reestimated"] - r["averaged_statistics"] for r in rows]
    lines = ["# Soups of BatchNorm nets: averaged running statistics or re-estimated ones", "",
             f"NT fine-tuned {epochs} epochs, then a uniform soup of K = {k} copies fine-tuned {soup_epochs} more "
             "epochs each (default recipe); re-estimated on the 1200 training images "
             "(`onnxfuse.batchnorm.reestimate`, i.e. `merge --soup-batchnorm reestimate`). Held-out accuracy (%, "
             f"597 images); {time.perf_counter() - start:.0f} s" + (" (--quick)" if args.quick else "") + ".", "",
             *md_table(["net", "N", "seed", "BN nodes", "best member", "soup, averaged statistics",
                        "soup, re-estimated", "gain"],
                       [[r["net"], r["n"], r["seed"], r["bn_nodes"], f"{r['best_member']:.2f}",
                         f"{r['averaged_statistics']:.2f}", f"{r['reestimated']:.2f}", f"{g:+.2f}"]
                        for r, g in zip(rows, gains)], "lrrrrrrr"),
             "", f"Re-estimation: mean gain {np.mean(gains):+.2f} pp, better in {sum(g > 0 for g in gains)}, "
             f"worse in {sum(g < 0 for g in gains)} of {len(gains)} runs."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, "soup_batchnorm", text, {"rows": rows}, st)


if __name__ == "__main__":
    main()
