#!/usr/bin/env python
"""Edge deployment: member fp32 / fused fp32 / fused int8 / fused fp16, side by side.

For each member set, the members are fused by neuron transplantation and fine-tuned with onnxfuse's default
recipe (`onnxfuse.fuse(..., data=train, training={"epochs": E})`; E = 5, ResNet-18 6), then `onnxfuse.quantize` writes the int8
version (static QDQ, per-channel weights, activations calibrated on 512 training inputs) and the fp16 version
(float32 inputs and outputs kept). `onnxfuse.benchmark(..., data=val)` then scores and times member 0, the
fused model and its two edge versions, and the ensemble (N sessions), interleaved, with one intra-op thread,
at batch sizes 1 and 32, with file sizes and peak memory (a fresh process per model and batch size).

Member sets (none of them designed for onnxfuse):
  - the shipped sample digits MLPs and CNNs (sample_models/, trained with Adam);
  - two torchvision ResNet-18s (11.7 M parameters, `torchvision.models.resnet18(num_classes=10)`), trained
    here from different seeds with Adam for 2 epochs on scikit-learn's digits upsampled to 3x32x32, exported
    with the legacy torch.onnx exporter;
  - two transformer encoder classifiers (d=192, ff 768, 4 heads, 2 layers, separate q/k/v projections,
    LayerNorm, GELU) over the 8 rows of each digit as tokens, trained with Adam for 6 epochs, exported the
    same way.

Targets (issue 19): the fused int8 model's accuracy within 0.5 pp of the fused fp32 model; its file size
<= 0.3 x a member's; its p50 latency at batch 32 <= 0.7 x the member's fp32 latency where the model is large
enough for int8 kernels to matter.

    python benchmarks/edge.py                  # about 15 minutes on 2 CPU cores
    python benchmarks/edge.py --quick --out /tmp/q   # sample MLPs and a tiny transformer, 1 epoch, short timing

Writes benchmarks/results/edge.md, edge.json and edge.png (accuracy against latency, one panel per set).
"""
from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import numpy as np

from _common import SAMPLES, cli, digits, export, fit, md_table, pct, stamp, transformer, write_results
import onnxfuse  # noqa: E402  (the checkout's: _common puts it first on sys.path)

SMALL_MS = 1.0          # a member faster than this at batch 32 is too small for int8 kernels to matter
ROLES = ("member 0 fp32", "fused fp32", "fused int8", "fused fp16", "ensemble")


def upsampled(x):
    """Grey 8x8 digits as 3x32x32 images (nearest), the input a torchvision ResNet expects."""
    return np.repeat(np.repeat(x, 4, axis=2), 4, axis=3).repeat(3, axis=1)


def train_and_export(make, x, y, seed, epochs, lr, path: Path) -> str:
    import torch
    torch.manual_seed(seed)
    return export(fit(make(), x, y, epochs, lr, 64), torch.from_numpy(x[:1]), path)


def member_sets(quick: bool, work: Path) -> list[dict]:
    """The sample sets, a ResNet-18 pair and a transformer pair (--quick: the sample MLPs and a tiny
    transformer pair trained 1 epoch)."""
    sets = [{"name": "digits MLP (sample)", "members": [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)],
             "train": str(SAMPLES / "digits_train.npz"), "val": str(SAMPLES / "digits_val.npz"), "epochs": 5},
            {"name": "digits CNN (sample)", "members": [str(SAMPLES / f"digits_cnn_{i}.onnx") for i in range(2)],
             "train": str(SAMPLES / "digits_images_train.npz"), "val": str(SAMPLES / "digits_images_val.npz"),
             "epochs": 5}]
    import torch
    import torchvision
    torch.set_num_threads(1)
    if quick:
        sets = sets[:1]
        sets[0]["epochs"] = 1
    else:
        (xtr, ytr), (xva, yva) = digits((1, 8, 8))
        xtr, xva = upsampled(xtr), upsampled(xva)
        np.savez(work / "img_train.npz", x=xtr, y=ytr)
        np.savez(work / "img_val.npz", x=xva, y=yva)
        resnets = [train_and_export(lambda: torchvision.models.resnet18(num_classes=10), xtr, ytr, seed, 2, 1e-3,
                                    work / f"resnet18_{seed}.onnx") for seed in range(2)]
        sets.append({"name": "torchvision ResNet-18 (digits 3x32x32)", "members": resnets,
                     "train": str(work / "img_train.npz"), "val": str(work / "img_val.npz"), "epochs": 6})
    (ttr, ytr), (tva, yva) = digits((8, 8))
    np.savez(work / "tok_train.npz", x=ttr, y=ytr)
    np.savez(work / "tok_val.npz", x=tva, y=yva)
    d, ff, epochs = (16, 32, 1) if quick else (192, 768, 6)
    encoders = [train_and_export(lambda: transformer(d=d, ff=ff), ttr, ytr, seed, epochs, 1e-3,
                                 work / f"encoder_{seed}.onnx") for seed in range(2)]
    sets.append({"name": f"transformer encoder (8 tokens x 8, d = {d})", "members": encoders,
                 "train": str(work / "tok_train.npz"), "val": str(work / "tok_val.npz"), "epochs": 1 if quick else 5})
    return sets


def measure(s: dict, work: Path, seconds: float, memory: bool) -> dict:
    tag = s["name"].split()[0].lower() + str(abs(hash(s["name"])) % 1000)
    fused = work / f"{tag}_fused.onnx"
    fusion = onnxfuse.fuse(s["members"], "nt", output=fused, force=True, data=s["train"], val=s["val"],
                           training={"epochs": s["epochs"]})
    int8, fp16 = work / f"{tag}_fused.int8.onnx", work / f"{tag}_fused.fp16.onnx"
    onnxfuse.quantize(fused, int8, calibrate=s["train"], force=True)
    onnxfuse.quantize(fused, fp16, mode="fp16", force=True)
    rows = onnxfuse.benchmark([s["members"][0], fused, int8, fp16], ensemble=s["members"], batch_sizes=(1, 32),
                              seconds=seconds, memory=memory, wide=False, data=s["val"])
    names = {Path(s["members"][0]).name: ROLES[0], fused.name: ROLES[1], int8.name: ROLES[2], fp16.name: ROLES[3],
             f"ensemble of {len(s['members'])} ({len(s['members'])} sessions)": ROLES[4]}
    table = {}
    for r in rows:
        role = names[r["name"]]
        entry = table.setdefault(role, {"accuracy": r["accuracy"], "file_bytes": r["file_bytes"]})
        entry[f"p50_ms_b{r['batch_size']}"] = r["p50_ms"]
        entry[f"p99_ms_b{r['batch_size']}"] = r["p99_ms"]
        entry[f"peak_memory_b{r['batch_size']}"] = r["peak_memory_bytes"]
    member, f32, i8 = table[ROLES[0]], table[ROLES[1]], table[ROLES[2]]
    return {"name": s["name"], "members": [Path(m).name for m in s["members"]], "epochs": s["epochs"],
            "parameters": fusion.summary["parameters"]["member"], "table": table, "rows": rows,
            "checks": {"int8_accuracy_drop_pp": round(100 * (f32["accuracy"] - i8["accuracy"]), 2),
                       "int8_size_vs_member": round(i8["file_bytes"] / member["file_bytes"], 3),
                       "int8_b32_latency_vs_member": round(i8["p50_ms_b32"] / member["p50_ms_b32"], 3)}}


def markdown(results: list[dict]) -> str:
    lines = ["# Edge deployment: fused int8 and fp16 beside the fp32 member and the ensemble", "",
             f"`python benchmarks/edge.py`, {datetime.date.today()}, 1 intra-op thread. Accuracy on the held-out "
             f"split; p50/p99 in ms; peak memory is resident memory above an idle interpreter (fresh process).", "",
             "Targets: int8 accuracy within 0.5 pp of fused fp32; int8 file <= 0.3 x a member's; int8 p50 at "
             "batch 32 <= 0.7 x the member's fp32 where int8 kernels matter.", ""]
    for r in results:
        lines += [f"## {r['name']}", "",
                  f"{r['parameters']:,} parameters per member; fused by NT and fine-tuned {r['epochs']} epochs "
                  f"(default recipe).", ""]
        lines += md_table(["model", "accuracy", "file", "p50 b1", "p99 b1", "p50 b32", "p99 b32", "peak mem b32"],
                          [[role, pct(t["accuracy"]), f"{t['file_bytes'] / 1e3:,.1f} KB",
                            *(f"{t[k]:.3f}" for k in ("p50_ms_b1", "p99_ms_b1", "p50_ms_b32", "p99_ms_b32")),
                            "-" if t["peak_memory_b32"] is None else f"{t['peak_memory_b32'] / 1e6:.1f} MB"]
                           for role, t in ((role, r["table"][role]) for role in ROLES)])
        c = r["checks"]
        small = r["table"][ROLES[0]]["p50_ms_b32"] < SMALL_MS
        latency = (f"{c['int8_b32_latency_vs_member']:.3f} x the member's fp32 ("
                   + (f"not a target here: the member runs a batch of 32 in under {SMALL_MS:g} ms, where the "
                      f"quantize/dequantize steps cost more than int8 kernels save)" if small else
                      ("met)" if c['int8_b32_latency_vs_member'] <= 0.7 else "NOT met)")))
        lines += ["", f"int8 vs fused fp32: {-c['int8_accuracy_drop_pp']:+.2f} pp "
                      f"({'met' if c['int8_accuracy_drop_pp'] <= 0.5 else 'NOT met'}); int8 file "
                      f"{c['int8_size_vs_member']:.3f} x a member "
                      f"({'met' if c['int8_size_vs_member'] <= 0.3 else 'NOT met'}"
                      f"{'; the graph, not the weights, is most of so small a file' if small else ''}); "
                      f"int8 p50 at batch 32 {latency}.", ""]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4.8 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        for role in ROLES:
            t = r["table"][role]
            ax.scatter(t["p50_ms_b32"], 100 * t["accuracy"], s=40, label=role)
        ax.set_xscale("log")
        ax.set_xlabel("p50 latency at batch 32 (ms, log)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(r["name"], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = cli(__doc__, "the sample MLPs and a tiny transformer pair, 1 epoch, 0.1 s timing")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per model and batch size")
    args = parser.parse_args()
    seconds = 0.1 if args.quick else args.seconds
    st = stamp()                 # the code that runs, read before it runs
    with tempfile.TemporaryDirectory(prefix="onnxfuse-edge-") as tmp:
        work = Path(tmp)
        results = [measure(s, work, seconds, memory=not args.quick) for s in member_sets(args.quick, work)]
    text = markdown(results)
    print(text)
    write_results(args.out, "edge", text, {"results": results}, st)
    plot(results, args.out / "edge.png")


if __name__ == "__main__":
    main()
