#!/usr/bin/env python
"""Should reconstruction re-estimate BatchNorm statistics? Measured on graphs that keep their BN nodes.

Both torch exporters fold eval-mode BatchNorm into the Conv before it, so torch exports usually have no BN
node left; `do_constant_folding=False` (legacy exporter) keeps them. Members: the ResNet- and MobileNetV3-like
nets of `tests/test_architectures.py`, seeds 0 and 1, trained here on scikit-learn's digits (1200 training /
597 validation images, 8x8; Adam, lr 3e-3, batch 64, 15 epochs). For each pair, on the validation images:

  members, ensemble (mean of logits), NT, NT + reconstruction (`calibrate` = the training images), and the
  reconstructed model with the running mean / variance of every BatchNormalization that directly follows a
  refitted layer re-estimated on the same calibration images (in graph order, each from the model with the
  earlier ones already re-estimated).

onnxfuse keeps the members' statistics (onnxfuse/reconstruct.py explains why); this benchmark is the evidence.

    python benchmarks/bn_reestimation.py        # about a minute on 2 CPU cores
    python benchmarks/bn_reestimation.py --quick --out /tmp/q   # the ResNet-like pair, 1 epoch

Writes benchmarks/results/bn_reestimation.md and .json (or --out DIR) and prints the table.
"""
from __future__ import annotations

import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ROOT, batchnorm_members, cli, digits_images_1200, md_table, pct, stamp, write_results
import onnxfuse  # noqa: E402  (the checkout's: _common puts it first on sys.path)

sys.path.insert(0, str(ROOT / "tests"))


def reestimated(model, x, nodes):
    """A copy of `model` with the BN `nodes`' running statistics measured on `x`."""
    import onnx
    from onnx import numpy_helper
    from onnxfuse.reconstruct import _session
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type == "BatchNormalization" and node.name in nodes:
            v = _session(out, [node.input[0]]).run([node.input[0]], {"x": x})[0]
            axes = (0, *range(2, v.ndim))
            for name, value in ((node.input[3], v.mean(axes)), (node.input[4], v.var(axes))):
                inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return out


def main() -> None:
    args = cli(__doc__, "the ResNet-like pair, 1 epoch").parse_args()
    import onnx
    import torch
    from graphs import run
    torch.set_num_threads(1)
    st, start = stamp(), time.perf_counter()
    xt, yt, xv, yv = digits_images_1200()
    acc = lambda m: float((run(m, xv).argmax(1) == yv).mean())     # noqa: E731
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "train.npz"
        np.savez(calib, x=xt, y=yt)
        for name in ("resnet",) if args.quick else ("resnet", "mobilenetv3"):
            paths = batchnorm_members(name, (0, 1), xt, yt, Path(tmp), 1 if args.quick else 15)
            models = [onnx.load(p) for p in paths]
            rec = onnxfuse.fuse(paths, "nt", calibrate=calib)
            refitted = {layer["layer"] for layer in rec.summary["reconstruction"]["layers"]}
            producer = {o: n for n in rec.model.graph.node for o in n.output}
            after_refit = {n.name for n in rec.model.graph.node if n.op_type == "BatchNormalization"
                           and n.input[0] in producer and producer[n.input[0]].name in refitted}
            rows[name] = {
                "members": [acc(m) for m in models],
                "ensemble": float((np.mean([run(m, xv) for m in models], 0).argmax(1) == yv).mean()),
                "bn_nodes": sum(n.op_type == "BatchNormalization" for n in models[0].graph.node),
                "bn_after_refitted": len(after_refit),
                "NT": acc(onnxfuse.fuse(paths, "nt").model),
                "NT + reconstruction": acc(rec.model),
                "NT + reconstruction, BN re-estimated": acc(reestimated(rec.model, xt, after_refit)),
            }
            print(name, rows[name], file=sys.stderr, flush=True)
    lines = ["# BatchNorm statistics after reconstruction: keep the members' or re-estimate them?", "",
             "- Members: `tests/test_architectures.py`'s ResNet- and MobileNetV3-like nets, seeds 0 and 1, trained "
             "here on scikit-learn's digits (1200 / 597, Adam lr 3e-3, batch 64, 15 epochs), exported with the "
             "legacy exporter and `do_constant_folding=False` so that the BatchNormalization nodes stay.",
             "- Reconstruction: `onnxfuse.fuse(paths, \"nt\", calibrate=train.npz)` (the 1200 training images). "
             "Re-estimated: the running mean / variance of every BN that directly follows a refitted layer, "
             "measured on the same images, in graph order. Accuracies in %, on the 597 validation images.",
             f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"{time.perf_counter() - start:.0f} s" + (" (--quick: 1 epoch)" if args.quick else "")
             + ". Reproduce: `python benchmarks/bn_reestimation.py`.", "",
             *md_table(["net", "BN nodes (after a refitted layer)", "members", "ensemble", "NT", "NT + reconstruction",
                        "NT + reconstruction, BN re-estimated"],
                       [[name, f"{r['bn_nodes']} ({r['bn_after_refitted']})", " / ".join(pct(a) for a in r["members"]),
                         pct(r["ensemble"]), pct(r["NT"]), pct(r["NT + reconstruction"]),
                         pct(r["NT + reconstruction, BN re-estimated"])] for name, r in rows.items()], "lllrrrr")]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, "bn_reestimation", text, {"rows": rows}, st)


if __name__ == "__main__":
    main()
