#!/usr/bin/env python
"""Wall time of merging two ResNet-18 members (11.7 M parameters each) from files, with both torch exporters.

The members are torchvision's ResNet-18 written out (torchvision does not install beside the CPU torch build
here), randomly initialised with different seeds, with non-trivial BatchNorm statistics, and exported to
ONNX. Each measurement runs `onnxfuse merge a.onnx b.onnx -o fused.onnx` in a fresh process and takes the
time reported by the API (load + analysis + fusion + save, interpreter start-up and imports excluded), plus
the whole command's wall time. Target (issue 3): <= 3 s.

    python benchmarks/resnet18_merge.py [--repeats 3]

Writes benchmarks/results/resnet18_merge.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(x), 1), 1))


def member(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = ResNet18()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def export(net, path: Path, dynamo: bool) -> None:
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        else:
            torch.onnx.export(net, x, str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)


def merge_once(a: Path, b: Path, out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "onnxfuse", "merge", str(a), str(b), "-o", str(out), "--force",
                             "--json"], capture_output=True, text=True, check=True)
    command = time.perf_counter() - start
    return json.loads(result.stdout)["seconds"], command


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "resnet18_merge.md")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nets = [member(0), member(1)]
        params = sum(p.numel() for p in nets[0].parameters())
        for dynamo in (False, True):
            paths = [tmp / f"m{i}_{dynamo}.onnx" for i in range(2)]
            for net, path in zip(nets, paths):
                export(net, path, dynamo)
            size = sum(f.stat().st_size for f in tmp.glob(f"m0_{dynamo}.onnx*"))
            runs = [merge_once(paths[0], paths[1], tmp / "fused.onnx") for _ in range(args.repeats)]
            api = statistics.median(r[0] for r in runs)
            command = statistics.median(r[1] for r in runs)
            rows.append((("new (dynamo)" if dynamo else "legacy"), size / 1e6, api, command))
    lines = [
        "# Merging two ResNet-18 members from files",
        "",
        f"- Machine: nproc {os.cpu_count()}; torch {torch.__version__}; date "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- Members: torchvision-style ResNet-18, {params / 1e6:.1f} M parameters each, exported by both torch "
        f"exporters (the new one folds BatchNorm into the convolutions).",
        "- **merge s**: the time `onnxfuse merge a.onnx b.onnx -o fused.onnx` reports (load, analysis, scoring, "
        "transplant, save); **command s**: the whole command, interpreter start-up and imports included. "
        f"Median of {args.repeats} runs, each in a fresh process.",
        "- Reproduce: `python benchmarks/resnet18_merge.py`. Target (issue 3): <= 3 s.",
        "",
        "| exporter | member file MB | merge s | command s | target met |",
        "|---|---:|---:|---:|---|",
    ]
    for name, size, api, command in rows:
        lines.append(f"| {name} | {size:.1f} | {api:.2f} | {command:.2f} | {'yes' if command <= 3 else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
