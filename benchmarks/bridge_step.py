#!/usr/bin/env python
"""Training-step cost of the torch bridge (onnxfuse.torch_bridge.OnnxModule) vs. a hand-written nn.Module.

For each model, the bridge and a hand-written torch module of the same architecture are given identical
weights (the hand-written one loads the ONNX initializers), checked to produce the same logits (max abs
diff <= 1e-4) and the same gradients, and then timed on one training step each:

    opt.zero_grad(); loss = F.cross_entropy(module(x), y); loss.backward(); opt.step()

with torch.optim.SGD(lr=1e-3, momentum=0.9) on a fixed batch (the same tensors for both). Models:

  mlp    sample_models/digits_mlp_0.onnx   64 -> 64 -> 64 -> 10, ReLU, Gemm(transB=1)
  cnn    sample_models/digits_cnn_0.onnx   Conv(1->8,3x3,pad 1)-ReLU-MaxPool2-Conv(8->16)-ReLU-MaxPool2-
                                           Reshape(-1, 64)-Linear(64,32)-ReLU-Linear(32,10) (BN folded)
  big    784 -> 1024 -> 1024 -> 10 MLP built with onnx.helper (Gemm transB=1 + ReLU), so compute dominates

at batch sizes 64 and 256. torch.set_num_threads(1). After a warm-up, the two modules are timed in
alternation; each sample is a block of k consecutive steps (k chosen so that a block takes
about 20 ms) divided by k; the order within a pair alternates (A B, B A, ...). Reported: median per-step
wall time of each, the ratio bridge / hand as the median of the per-pair ratios (robust to drift from other
load on the machine) with its IQR, the ratio of the medians, and the same paired ratio from the thread's CPU
time (time.thread_time(), which leaves out time spent descheduled on a busy machine).

    python benchmarks/bridge_step.py                 # full table (about 75 s) -> benchmarks/results/bridge_step.md
    python benchmarks/bridge_step.py --seconds 2     # quicker, noisier
    python benchmarks/bridge_step.py --quick --out /tmp/q   # smoke run: batch 64, 0.1 s per row
    python benchmarks/bridge_step.py --profile cnn --batch 64   # cProfile of the bridge's forward only
"""
from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from _common import SAMPLES, cli, md_table, onnx_mlp, stamp, write_results
from onnxfuse.torch_bridge import OnnxModule  # noqa: E402  (the checkout's: _common puts it first on sys.path)

TARGET_RATIO = 1.25
BATCHES = (64, 256)
BLOCK_SECONDS = 0.02             # one timing sample is k steps taking about this long
LR, MOMENTUM = 1e-3, 0.9


# ============================================================================ models

def _weights(model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}


class HandMLP(torch.nn.Module):
    """Linear-ReLU-...-Linear; Gemm(transB=1) weights are [out, in], exactly nn.Linear's layout."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        w = _weights(model)
        gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
        self.layers = torch.nn.ModuleList()
        for node in gemms:
            weight, bias = w[node.input[1]], w[node.input[2]]
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                layer.weight.copy_(weight)
                layer.bias.copy_(bias)
            self.layers.append(layer)

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


class HandCNN(torch.nn.Module):
    """The digits CNN as exported (BatchNorm folded into the convolutions)."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        w = _weights(model)
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
        assert len(convs) == 2 and len(gemms) == 2
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = torch.nn.Linear(64, 32)
        self.fc2 = torch.nn.Linear(32, 10)
        with torch.no_grad():
            for layer, node in zip((self.conv1, self.conv2, self.fc1, self.fc2), convs + gemms):
                layer.weight.copy_(w[node.input[1]])
                layer.bias.copy_(w[node.input[2]])

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.reshape(-1, 64)
        return self.fc2(torch.relu(self.fc1(x)))


def cases():
    """name -> (description, model, hand-module class, batch generator(batch) -> (x, y))."""
    mlp, cnn = (onnx.load(SAMPLES / f"digits_{f}_0.onnx") for f in ("mlp", "cnn"))
    flat = np.load(SAMPLES / "digits_train.npz")
    images = np.load(SAMPLES / "digits_images_train.npz")

    def from_data(data):
        def make(batch):
            idx = np.random.default_rng(batch).choice(len(data["y"]), batch, replace=False)
            return torch.from_numpy(data["x"][idx].copy()), torch.from_numpy(data["y"][idx].copy())
        return make

    def random_784(batch):
        g = torch.Generator().manual_seed(batch)
        return torch.rand(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)

    return {
        "mlp": ("digits_mlp_0 (64-64-64-10)", mlp, HandMLP, from_data(flat)),
        "cnn": ("digits_cnn_0 (2 conv + 2 linear, 8x8)", cnn, HandCNN, from_data(images)),
        "big": ("MLP 784-1024-1024-10 (onnx.helper)", onnx_mlp((784, 1024, 1024, 10), 0), HandMLP, random_784),
    }


# ============================================================================ measurement

def _step_fn(module, x, y):
    opt = torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
    return step


def check_equal(bridge, hand, x, y) -> tuple[float, float]:
    """Max abs diff of the logits (asserted <= 1e-4) and of the gradients (matched by shape, in order)."""
    bridge.eval(), hand.eval()
    with torch.no_grad():
        out_diff = (bridge(x) - hand(x)).abs().max().item()
    assert out_diff <= 1e-4, f"bridge and hand-written module disagree: max abs diff {out_diff:.3g}"
    grads = []
    for m in (bridge, hand):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        m.zero_grad()
    assert [g.shape for g in grads[0]] == [g.shape for g in grads[1]], "parameter lists differ"
    grad_diff = max((a - b).abs().max().item() for a, b in zip(*grads))
    assert grad_diff <= 1e-4, f"gradients disagree: max abs diff {grad_diff:.3g}"
    bridge.train(), hand.train()
    return out_diff, grad_diff


def _block(step, k):
    """(wall, CPU time of this thread) per step over k steps. With one intra-op thread the forward, the
    backward (CPU autograd runs on the calling thread) and the optimizer all run on this thread, so its CPU
    time is the step's cost without the time spent descheduled by other load on a shared machine."""
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(k):
        step()
    return (time.perf_counter() - t0) / k, (time.thread_time() - c0) / k


def measure(bridge, hand, x, y, seconds: float) -> dict:
    sb, sh = _step_fn(bridge, x, y), _step_fn(hand, x, y)
    for _ in range(3):                                   # warm-up (allocator, kernels, optimizer state)
        _block(sb, 5), _block(sh, 5)
    per_step = statistics.median(_block(s, 3)[0] for s in (sb, sh, sb, sh, sb, sh))
    k = max(1, int(BLOCK_SECONDS / per_step))
    tb, th = [], []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or len(tb) < 15:
        if i % 2 == 0:                                   # alternate which goes first within a pair
            tb.append(_block(sb, k)), th.append(_block(sh, k))
        else:
            th.append(_block(sh, k)), tb.append(_block(sb, k))
        i += 1
    b, h = statistics.median(w for w, _ in tb), statistics.median(w for w, _ in th)
    ratios = [x[0] / y[0] for x, y in zip(tb, th)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {"bridge": b, "hand": h, "of_medians": b / h, "ratio": statistics.median(ratios), "q1": q1, "q3": q3,
            "cpu_bridge": statistics.median(c for _, c in tb), "cpu_hand": statistics.median(c for _, c in th),
            "cpu_ratio": statistics.median(x[1] / y[1] for x, y in zip(tb, th)), "pairs": len(tb), "k": k}


def profile_forward(name: str, batch: int, n: int = 2000):
    desc, model, hand_cls, make = cases()[name]
    bridge = OnnxModule(model)
    x, y = make(batch)
    for _ in range(50):
        bridge(x)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        bridge(x)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(f"cProfile of {n} bridge forwards ({desc}, batch {batch}, grad enabled):")
    print(s.getvalue())


# ============================================================================ report

def _ms(t: float) -> str:
    return f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.2f}"


def main(argv=None):
    parser = cli(__doc__, "every model at batch 64, 0.1 s per row")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per (model, batch) row")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "big"], choices=["mlp", "cnn", "big"])
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--profile", choices=["mlp", "cnn", "big"], help="only profile the bridge's forward")
    parser.add_argument("--batch", type=int, default=64, help="batch for --profile")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.batches = 0.1, [64]

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.profile:
        profile_forward(args.profile, args.batch)
        return 0

    st, start = stamp(), time.perf_counter()
    all_cases = cases()
    rows = []
    for name in args.models:
        desc, model, hand_cls, make = all_cases[name]
        for batch in args.batches:
            bridge, hand = OnnxModule(model), hand_cls(model)
            x, y = make(batch)
            out_diff, grad_diff = check_equal(bridge, hand, x, y)
            r = measure(bridge, hand, x, y, args.seconds)
            rows.append((desc, batch, r, out_diff, grad_diff))
            print(f"{name:4s} batch {batch:4d}: bridge {_ms(r['bridge'])} ms  hand {_ms(r['hand'])} ms  "
                  f"ratio {r['ratio']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]  of medians {r['of_medians']:.3f}  "
                  f"CPU {_ms(r['cpu_bridge'])} / {_ms(r['cpu_hand'])} ms ratio {r['cpu_ratio']:.3f}  "
                  f"({r['pairs']} pairs x {r['k']} steps)",
                  file=sys.stderr, flush=True)
    took = time.perf_counter() - start

    worst = max(r["ratio"] for _, _, r, _, _ in rows)
    worst_cpu = max(r["cpu_ratio"] for _, _, r, _, _ in rows)
    lines = [
        "# Torch bridge: one training step, OnnxModule vs. a hand-written nn.Module",
        "",
        f"- torch.set_num_threads(1); the benchmark took {took:.0f} s",
        "- Measured: one training step `opt.zero_grad(); F.cross_entropy(module(x), y).backward(); opt.step()` "
        f"with `torch.optim.SGD(lr={LR}, momentum={MOMENTUM})` on a fixed batch, for the bridge "
        "(`onnxfuse.torch_bridge.OnnxModule`) and for a hand-written nn.Module of the same architecture "
        "holding the same weights (loaded from the ONNX initializers; logits and gradients checked equal to "
        "<= 1e-4 first).",
        "- Method: warm-up, then the two alternate (A B, B A, A B, ...) for about "
        f"{args.seconds:g} s per row; each sample is a block of k steps (about {BLOCK_SECONDS * 1e3:g} ms) / k. "
        "**ms**: median per-step time. **ratio**: bridge / hand, the median over pairs of the ratio of the "
        "two adjacent samples (robust to slow drift in the load of the shared machine), with its interquartile "
        "range. **of medians**: bridge ms / hand ms, more exposed to load changes. **CPU ratio**: the same "
        "paired median computed from the thread's CPU time (`time.thread_time()`; with one intra-op thread "
        "the forward, backward and optimizer step all run on the calling thread), which leaves out time spent "
        "descheduled. The machine is shared with other work: a wide IQR or wall and CPU ratios that disagree "
        "mean it was busy; the CPU ratio is then the better estimate.",
        "- Reproduce: `python benchmarks/bridge_step.py`",
        "",
        *md_table(["model", "batch", "bridge ms", "hand ms", "ratio", "ratio IQR", "of medians",
                   "CPU ms bridge / hand", "CPU ratio", "pairs x k", "max abs diff logits / grads"],
                  [[desc, batch, _ms(r["bridge"]), _ms(r["hand"]), f"**{r['ratio']:.3f}**",
                    f"{r['q1']:.3f} - {r['q3']:.3f}", f"{r['of_medians']:.3f}",
                    f"{_ms(r['cpu_bridge'])} / {_ms(r['cpu_hand'])}", f"{r['cpu_ratio']:.3f}",
                    f"{r['pairs']} x {r['k']}", f"{od:.1e} / {gd:.1e}"] for desc, batch, r, od, gd in rows]),
    ]
    lines += ["", f"Target (issue): bridge/hand <= {TARGET_RATIO} everywhere: worst wall ratio {worst:.3f} -> "
                  + ("**met**" if worst <= TARGET_RATIO else "**NOT met**")
              + f"; worst CPU ratio {worst_cpu:.3f} -> " + ("**met**" if worst_cpu <= TARGET_RATIO else "**NOT met**")]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(args.out, "bridge_step", text, {"rows": [dict(model=d, batch=b, out_diff=od, grad_diff=gd, **r)
                                                           for d, b, r, od, gd in rows]}, st)
    return 0


if __name__ == "__main__":
    sys.exit(main())
