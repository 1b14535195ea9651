"""The benchmarks' shared harness: command line, stamp, results writer, markdown tables, peak memory, child
processes, the torch -> ONNX export, and the datasets, models and training loop that several scripts use.

Scripts run as `python benchmarks/NAME.py` (so this folder is on sys.path); importing this module puts the
checkout first on sys.path, so the scripts measure the onnxfuse next to them. Every script:

    args = cli(__doc__, "what --quick runs").parse_args()
    st = stamp()                                   # before measuring: the code that produced the numbers
    ...
    write_results(args.out, "name", markdown, {"rows": ...}, st)

Only the standard library is imported at module level: fusion_cost.py and methods_cost.py keep their parent
process small while their children measure.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SAMPLES = ROOT / "sample_models"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
MB = 1e6
# The keys of Fusion.summary["accuracy"] beside the members' file names.
ENSEMBLE, BEFORE, AFTER = "ensemble (mean of logits)", "result before fine-tuning", "result after fine-tuning"


# ============================================================================ command line, stamp, results

def cli(doc: str, quick: str) -> argparse.ArgumentParser:
    """The parser every script starts from: --quick (`quick` says what it runs) and --out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smoke run of the whole code path, seconds: {quick}")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: benchmarks/results)")
    return p


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def git_state() -> dict:
    """HEAD and the state of the WHOLE working tree (untracked files included). Changes under
    benchmarks/results/ (the outputs of earlier runs) are told apart from changes to code; a tree whose state
    cannot be read is never called clean."""
    try:
        commit = _git("rev-parse", "--short=12", "HEAD").strip()
        changed = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=all").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "tree": "unknown (not a git checkout?)", "clean": False, "changed": []}
    code = [p for p in changed if not p.startswith("benchmarks/results/")]
    tree = ("clean" if not changed else "clean apart from benchmarks/results/" if not code else
            f"UNCOMMITTED CHANGES in {len(code)} paths: " + ", ".join(code[:8]) + (" ..." if len(code) > 8 else ""))
    return {"commit": commit, "tree": tree, "clean": not code, "changed": code}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def stamp(commit: str | None = None) -> dict:
    """Commit and tree state, versions, machine, load and date, for every results file. `commit`: the commit
    of an exported copy (git archive), which has no git metadata to check."""
    git = git_state() if commit is None else {"commit": commit, "tree": "exported copy, not checked",
                                              "clean": False, "changed": []}
    return {**git, "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(),
            **{p: _version(p) for p in ("onnxfuse", "torch", "onnxruntime", "onnx", "numpy")},
            "cpu": _cpu_model(), "cores": os.cpu_count(), "nproc": len(os.sched_getaffinity(0)),
            "load": [round(x, 2) for x in os.getloadavg()], "platform": f"{platform.system()} {platform.release()}"}


def stamp_line(st: dict) -> str:
    return (f"Stamp: onnxfuse commit {st['commit']} ({st['tree']}); {st['date']}; `{st['command']}`; Python "
            f"{st['python']}, torch {st['torch']}, onnxruntime {st['onnxruntime']}, onnx {st['onnx']}, numpy "
            f"{st['numpy']}; {st['cpu']}, {st['cores']} cores (nproc {st['nproc']}), load "
            f"{' / '.join(map(str, st['load']))} at the start; {st['platform']}.")


def write_results(out: Path, name: str, text: str, data: dict, st: dict) -> None:
    """`out`/name.md (the text, then the stamp) and `out`/name.json (the stamp, then `data`)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text.rstrip("\n") + "\n\n" + stamp_line(st) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"stamp": st, **data}, indent=1, default=str) + "\n")
    print(f"wrote {out / name}.md and .json", file=sys.stderr)


def log(message: str) -> None:
    """Progress, on stderr (stdout carries the results)."""
    print(message, file=sys.stderr, flush=True)


def pct(x: float | None, none: str = "-") -> str:
    """A fraction as a percentage with two decimals; `none` for a missing value."""
    return none if x is None else f"{100 * x:.2f}"


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def md_table(header: list[str], rows: list[list], align: str = "") -> list[str]:
    """A markdown table as lines; `align` has one letter per column, l, r or c (default: first l, others r)."""
    rule = {"l": "---|", "r": "---:|", "c": ":-:|"}
    return ["| " + " | ".join(header) + " |", "|" + "".join(rule[a] for a in align or "l" + "r" * (len(header) - 1)),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


# ============================================================================ peak memory, child processes

def proc_status(field: str, pid: int | str = "self") -> int:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM, ...) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_memory(pid: int | str = "self") -> int:
    """Peak resident memory of a process: VmHWM, the high-water mark of its own address space. (ru_maxrss is
    not used: Linux carries the parent's high-water mark over fork + exec into a child's.) A process reads its
    own before it exits: once it has exited its status has no memory fields, so measuring children report it."""
    return proc_status("VmHWM", pid)


def child_env() -> dict:
    """The environment for a child interpreter that must import this checkout's onnxfuse."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


class Killed(Exception):
    """A child that ran past its timeout (and was killed)."""


def run_child(script: str, *args, timeout: float | None = None) -> dict:
    """Run `script --child ARGS` in a fresh interpreter; its result is the last line `RESULT {json}` it printed
    (child_result)."""
    cmd = [sys.executable, script, "--child", *map(str, args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        raise Killed from None
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(map(str, args))} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


def child_result(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def files_bytes(path: Path) -> int:
    """A model file plus its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


# ============================================================================ models

def onnx_mlp(dims, seed: int):
    """An MLP as torch's legacy exporter writes nn.Sequential(Linear, ReLU, ..., Linear): Gemm(transB=1)
    weights [out, in] + biases, random normal / sqrt(fan_in), float32; input x [batch, dims[0]], output logits."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for layer, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        idx, scale = 2 * layer, np.float32(1.0 / np.sqrt(fan_in))
        w = rng.standard_normal((fan_out, fan_in), dtype=np.float32)
        w *= scale
        b = rng.standard_normal(fan_out, dtype=np.float32) * scale
        inits += [numpy_helper.from_array(w, f"{idx}.weight"), numpy_helper.from_array(b, f"{idx}.bias")]
        del w
        last = layer == len(dims) - 2
        y = "logits" if last else f"/{idx}/Gemm_output_0"
        nodes.append(helper.make_node("Gemm", [x, f"{idx}.weight", f"{idx}.bias"], [y], name=f"/{idx}/Gemm",
                                      alpha=1.0, beta=1.0, transB=1))
        if not last:
            x = f"/{idx + 1}/Relu_output_0"
            nodes.append(helper.make_node("Relu", [y], [x], name=f"/{idx + 1}/Relu"))
    graph = helper.make_graph(nodes, "main_graph",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dims[0]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", dims[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch",
                              producer_version="2.13.0")
    model.ir_version = 8
    return model


def mlp(*dims: int):
    """nn.Sequential(Linear, ReLU, ..., Linear) through `dims`."""
    from torch import nn
    layers = [m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*layers[:-1])


def cnn1d():
    """The MNIST-1D CNN: Conv1d 1-32-32 (ReLU, max-pool 2) + Linear 320-64-10, input [batch, 1, 40]."""
    from torch import nn
    return nn.Sequential(nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(32, 32, 3, padding=1),
                         nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(320, 64), nn.ReLU(), nn.Linear(64, 10))


def transformer(d=64, heads=4, ff=128, layers=2):
    """A transformer encoder classifier over 8 tokens of 8 features (the rows of a digit): separate q/k/v
    projections, pre-LayerNorm, GELU, mean pooling."""
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

        def forward(self, x):
            b, t, _ = x.shape
            h = self.ln1(x)
            q, k, v = (p(h).view(b, t, heads, d // heads).transpose(1, 2) for p in (self.q, self.k, self.v))
            att = torch.softmax(q @ k.transpose(-2, -1) / (d // heads) ** 0.5, dim=-1)
            x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.ff(self.ln2(x))

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, d)
            self.pos = nn.Parameter(torch.randn(8, d) * 0.1)
            self.layers = nn.Sequential(*(Layer() for _ in range(layers)))
            self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

        def forward(self, x):
            return self.head(self.norm(self.layers(self.embed(x) + self.pos)).mean(dim=1))

    return Classifier()


def export(net, example, path, dynamo: bool = False, output: str = "logits", batch: bool = True,
           opset: int | None = None, **options) -> str:
    """torch -> ONNX, input "x" and one output, with the legacy (default) or the new (dynamo) exporter;
    `batch`: a symbolic batch axis; `opset`: None for the exporter's default; `path` may be a file object."""
    import torch
    target = path if hasattr(path, "write") else str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net, (example,), target, dynamo=True, input_names=["x"], output_names=[output],
                              dynamic_shapes=({0: torch.export.Dim("batch")},) if batch else None, verbose=False,
                              **options)
        else:
            torch.onnx.export(net, (example,), target, dynamo=False, input_names=["x"], output_names=[output],
                              dynamic_axes={"x": {0: "batch"}, output: {0: "batch"}} if batch else None,
                              **({} if opset is None else {"opset_version": opset}), **options)
    return target


# ============================================================================ data and training

def digits(shape=None):
    """scikit-learn's digits / 16 as float32, split 70/30 stratified (seed 0): [(x_train, y_train), (x_val,
    y_val)], x reshaped to (-1, *shape) if given, y int64."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    return [(a.reshape(-1, *shape) if shape else a, b.astype(np.int64)) for a, b in ((xtr, ytr), (xva, yva))]


def digits_images_1200():
    """scikit-learn's digits as 1x8x8 images / 16, the first 1200 for training and the other 597 held out (the
    BatchNorm benchmarks' split): x_train, y_train, x_val, y_val."""
    import numpy as np
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32).reshape(-1, 1, 8, 8)
    return x[:1200], y[:1200], x[1200:], y[1200:]


def batchnorm_members(name: str, seeds, x, y, work: Path, epochs: int) -> list[str]:
    """tests/test_architectures.py's net `name` trained with Adam (lr 3e-3, batch 64) from each seed, exported
    with the legacy exporter and do_constant_folding=False so that its BatchNormalization nodes stay."""
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    import test_architectures as arch
    paths = []
    for seed in seeds:
        torch.manual_seed(seed)
        net = fit(arch.NETS[name](), x, y, epochs, 3e-3, 64)
        paths.append(export(net.eval(), torch.zeros(2, 1, 8, 8), work / f"{name}_{len(seeds)}_{seed}.onnx",
                            output="y", opset=17, do_constant_folding=False))
    return paths


def mnist1d():
    """MNIST-1D with the package's default arguments, generated locally (nothing is downloaded):
    x_train, y_train, x_test, y_test."""
    import mnist1d.data
    import numpy as np
    data = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    return (data["x"].astype(np.float32), data["y"].astype(np.int64),
            data["x_test"].astype(np.float32), data["y_test"].astype(np.int64))


def mnist1d_heldout(count: int, seed: int = 7):
    """`count` fresh MNIST-1D sequences from the same generator with another seed: a large test set."""
    import mnist1d.data
    import numpy as np
    args = mnist1d.data.get_dataset_args()
    args.num_samples, args.train_split, args.seed = count, 0.0, seed
    data = mnist1d.data.make_dataset(args)
    return data["x_test"].astype(np.float32), data["y_test"].astype(np.int64)


def fit(net, x, y, epochs: int, lr: float, batch: int, momentum: float | None = None, decay: bool = False,
        params=None):
    """Train `net` (a torch module) on arrays (x, y) by cross-entropy in shuffled minibatches drawn from torch's
    global generator (the caller seeds it): Adam, or SGD with `momentum` if given; `decay`: the rate falls
    linearly to 0 over the run; `params`: the tensors to train (default: all)."""
    import torch
    params = list(net.parameters()) if params is None else params
    opt = torch.optim.Adam(params, lr) if momentum is None else torch.optim.SGD(params, lr, momentum=momentum)
    steps = epochs * -(-len(x) // batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps if decay else 1.0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(batch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
            schedule.step()
    return net.eval()
