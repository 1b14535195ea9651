"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this folder is on sys.path)."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "onnxfuse"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + (" (onnxfuse/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def adam_epochs(net, x, y, epochs: int, lr: float, batch: int, params=None):
    """Train `net` (a torch module) on arrays (x, y) by cross-entropy with Adam, in shuffled minibatches drawn
    from torch's global generator (the caller seeds it); `params`: the tensors to train (default: all)."""
    import torch
    opt = torch.optim.Adam(list(net.parameters()) if params is None else params, lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(batch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()
