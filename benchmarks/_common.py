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
