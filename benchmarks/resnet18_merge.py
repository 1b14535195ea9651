#!/usr/bin/env python
"""Wall time of merging two ResNet-18 members (11.7 M parameters each) from files, with both torch exporters.

The members are torchvision's ResNet-18, randomly initialised with different seeds, with non-trivial BatchNorm
statistics, and exported to ONNX. Each measurement runs `onnxfuse merge a.onnx b.onnx -o fused.onnx` in a fresh
process and takes the time reported by the API (load + analysis + fusion + save, interpreter start-up and
imports excluded), plus the whole command's wall time. Target (issue 3): <= 3 s.

    python benchmarks/resnet18_merge.py [--repeats 3]
    python benchmarks/resnet18_merge.py --quick --out /tmp/q   # one block per stage, one run

Writes benchmarks/results/resnet18_merge.md and .json.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import child_env, cli, export, md_table, stamp, write_results


def member(seed: int, blocks: int):
    """torchvision's ResNet (`blocks` BasicBlocks per stage; 2: ResNet-18) with non-trivial BatchNorm."""
    import torch
    from torchvision.models.resnet import BasicBlock, ResNet
    torch.manual_seed(seed)
    net = ResNet(BasicBlock, [blocks] * 4)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def merge_once(a: Path, b: Path, out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "onnxfuse", "merge", str(a), str(b), "-o", str(out), "--force",
                             "--json"], capture_output=True, text=True, check=True, env=child_env())
    command = time.perf_counter() - start
    return json.loads(result.stdout)["seconds"], command


def main() -> None:
    p = cli(__doc__, "a ResNet with one block per stage, one run")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import torch
    blocks, repeats = (1, 1) if args.quick else (2, args.repeats)
    st, rows = stamp(), []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nets = [member(0, blocks), member(1, blocks)]
        params = sum(p.numel() for p in nets[0].parameters())
        for dynamo in (False, True):
            paths = [tmp / f"m{i}_{dynamo}.onnx" for i in range(2)]
            for net, path in zip(nets, paths):
                export(net, torch.randn(1, 3, 64, 64), path, dynamo=dynamo, output="y", opset=None if dynamo else 17)
            size = sum(f.stat().st_size for f in tmp.glob(f"m0_{dynamo}.onnx*"))
            runs = [merge_once(paths[0], paths[1], tmp / "fused.onnx") for _ in range(repeats)]
            api = statistics.median(r[0] for r in runs)
            command = statistics.median(r[1] for r in runs)
            rows.append((("new (dynamo)" if dynamo else "legacy"), size / 1e6, api, command))
    lines = [
        "# Merging two ResNet-18 members from files",
        "",
        f"- Members: torchvision's ResNet-18{' (--quick: one block per stage)' if args.quick else ''}, "
        f"{params / 1e6:.1f} M parameters each, exported by both torch "
        f"exporters (the new one folds BatchNorm into the convolutions).",
        "- **merge s**: the time `onnxfuse merge a.onnx b.onnx -o fused.onnx` reports (load, analysis, scoring, "
        "transplant, save); **command s**: the whole command, interpreter start-up and imports included. "
        f"Median of {repeats} runs, each in a fresh process.",
        "- Reproduce: `python benchmarks/resnet18_merge.py`. Target (issue 3): <= 3 s.",
        "",
        *md_table(["exporter", "member file MB", "merge s", "command s", "target met"],
                  [[name, f"{size:.1f}", f"{api:.2f}", f"{command:.2f}", "yes" if command <= 3 else "NO"]
                   for name, size, api, command in rows], "lrrrl"),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, "resnet18_merge", text, {"parameters": params, "repeats": repeats, "rows": [
        dict(zip(("exporter", "member_mb", "merge_s", "command_s"), r)) for r in rows]}, st)


if __name__ == "__main__":
    main()
