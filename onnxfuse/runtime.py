"""Run models with onnxruntime on a dataset: logits, accuracy, loss, and the ensemble of several models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .data import Dataset
from .errors import OnnxFuseError
from .graph_index import GraphIndex
from .model_io import read_model
from .sessions import session

SOFTMAXES = {"Softmax", "LogSoftmax"}
PASS_THROUGH = {"Identity", "Cast"}


def logits_output(model: onnx.ModelProto, requested: str | None = None) -> str:
    """The value to train and score on: the one float output (or `requested`), traced back through a final
    Softmax/LogSoftmax to the logits that feed it (classifiers such as skl2onnx's end in probabilities)."""
    producer = GraphIndex(model).producer
    if requested:
        if requested not in producer and requested not in {o.name for o in model.graph.output}:
            raise OnnxFuseError(f"no value named '{requested}' in the graph")
        return requested
    floats = [o.name for o in model.graph.output if o.type.tensor_type.elem_type in
              (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)]
    if len(floats) > 1:
        raise OnnxFuseError(f"the model has several float outputs {floats}: choose one with --target-output")
    if floats:
        name = floats[0]
    else:    # e.g. a ZipMap output: the last Softmax of the graph
        softmax = [n for n in model.graph.node if n.op_type in SOFTMAXES]
        if not softmax:
            raise OnnxFuseError("the model has no float output to train on: choose one with --target-output")
        name = softmax[-1].output[0]
    node = producer.get(name)
    while node is not None and node.op_type in PASS_THROUGH:
        name = node.input[0]
        node = producer.get(name)
    return node.input[0] if node is not None and node.op_type in SOFTMAXES else name


def providers(requested: str = "cpu") -> list[str]:
    available = ort.get_available_providers()
    if requested == "cuda":
        if _both_runtimes_installed():
            raise OnnxFuseError("both onnxruntime and onnxruntime-gpu are installed and shadow each other: "
                                "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
        if "CUDAExecutionProvider" not in available:
            raise OnnxFuseError("CUDA was asked for but onnxruntime has no CUDAExecutionProvider here "
                                "(install onnxfuse[gpu], i.e. onnxruntime-gpu instead of onnxruntime)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _both_runtimes_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, version
    found = 0
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            version(name)
            found += 1
        except PackageNotFoundError:
            pass
    return found == 2


class Runner:
    """An onnxruntime session that also returns the logits value."""

    def __init__(self, source, output: str | None = None, provider: str = "cpu", files: set | None = None,
                 threads: int = 1):
        model = read_model(source, files)
        self.name = str(source) if not isinstance(source, onnx.ModelProto) else (model.graph.name or "model")
        self.logits = logits_output(model, output)
        if self.logits not in {o.name for o in model.graph.output}:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            copy.graph.output.add(name=self.logits)
            model = copy
        session_providers = providers(provider)
        try:
            self.session = session(model, threads=threads, providers=session_providers)
        except Exception as exc:       # onnxruntime refuses what the checks before it let through
            raise OnnxFuseError(f"{self.name}: onnxruntime cannot load the model ({_first_line(exc)})") from None

    def __call__(self, data: Dataset, batch_size: int = 1024) -> np.ndarray:
        chunks = []
        for start in range(0, len(data), batch_size):
            feeds = {k: v[start:start + batch_size] for k, v in data.inputs.items()}
            try:
                chunks.append(self.session.run([self.logits], feeds)[0])
            except Exception as exc:   # e.g. data that fits the first model but not this one
                raise OnnxFuseError(f"{self.name}: onnxruntime cannot run it on {data.source} "
                                    f"({_first_line(exc)})") from None
        logits = np.concatenate(chunks).astype(np.float64)
        if data.y is not None and len(data.y) and not data.regression and (
                logits.ndim != 2 or data.y.min() < 0 or data.y.max() >= logits.shape[1]):
            raise OnnxFuseError(f"{data.source}: labels range over [{data.y.min()}, {data.y.max()}] but "
                                f"{Path(self.name).name}'s output '{self.logits}' has shape {list(logits.shape)}")
        return logits


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def scores(logits: np.ndarray, y: np.ndarray | None) -> dict:
    """Classification (integer labels): accuracy and cross-entropy. Regression (float targets of the output's
    shape): MSE and MAE, with `loss` = MSE."""
    if y is None:
        return {"accuracy": None, "loss": None}
    if np.issubdtype(y.dtype, np.floating):
        if logits.shape != y.shape:
            raise OnnxFuseError(f"regression targets have shape {list(y.shape)} but the model's output has shape "
                                f"{list(logits.shape)}")
        err = logits - y
        return {"mse": float((err ** 2).mean()), "mae": float(np.abs(err).mean()), "loss": float((err ** 2).mean())}
    if logits.ndim != 2 or y.max(initial=0) >= logits.shape[1] or y.min(initial=0) < 0:
        raise OnnxFuseError(f"labels range over [{y.min()}, {y.max()}] but the model's output has shape "
                            f"{list(logits.shape)}")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return {"accuracy": float((logits.argmax(1) == y).mean()),
            "loss": float(-log_probs[np.arange(len(y)), y].mean())}


def merit(score: dict) -> tuple:
    """Sort key of a score (larger is better): accuracy then lower loss; for regression, lower MSE."""
    if score.get("accuracy") is not None:
        return (score["accuracy"], -score["loss"])
    return (-score["loss"],) if score.get("loss") is not None else ()


def headline(score: dict) -> str:
    """The figure to show for a score: 'accuracy 0.9512' or 'MSE 0.0123'."""
    if score.get("accuracy") is not None:
        return f"accuracy {score['accuracy']:.4f}"
    return f"MSE {score['mse']:.4g}" if score.get("mse") is not None else "(no labels)"


def evaluate(models, data: Dataset, ensemble: bool = False, provider: str = "cpu", threads: int = 1) -> list[dict]:
    """Accuracy and cross-entropy (regression: MSE and MAE) of each model, and of their ensemble (mean of
    outputs) if asked."""
    rows, all_logits = [], []
    for source in models:
        runner = Runner(source, provider=provider, threads=threads)
        logits = runner(data)
        all_logits.append(logits)
        rows.append({"model": Path(runner.name).name, **scores(logits, data.y)})
    if ensemble:
        rows.append({"model": f"ensemble of {len(models)}", **scores(np.mean(all_logits, axis=0), data.y)})
    return rows


def random_feeds(model: onnx.ModelProto, batch: int = 16, seed: int = 0) -> dict[str, np.ndarray] | None:
    """Standard-normal inputs for every float graph input (symbolic dims = batch); None if an input is not float."""
    from .data import NP_FLOAT, graph_inputs
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in graph_inputs(model):
        tt = spec.type.tensor_type
        if tt.elem_type not in NP_FLOAT:
            return None
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        feeds[spec.name] = rng.normal(size=dims).astype(NP_FLOAT[tt.elem_type])
    return feeds


def output_deviation(wide: onnx.ModelProto, members: list, feeds: dict[str, np.ndarray]) -> dict:
    """How far the wide model's float outputs are from the mean of the members' outputs on `feeds`."""
    def outputs(source):
        sess = session(source, log_level=2)
        names = [o.name for o in sess.get_outputs() if o.type in ("tensor(float)", "tensor(double)",
                                                                   "tensor(float16)")]
        return dict(zip(names, sess.run(names, feeds)))
    got = outputs(wide)
    member_outputs = [outputs(m) for m in members]
    worst_abs, worst_rel = 0.0, 0.0
    for name, value in got.items():
        mean = np.mean([m[name].astype(np.float64) for m in member_outputs], axis=0)
        diff = float(np.abs(value - mean).max())
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(float(np.abs(mean).max()), 1e-12))
    return {"max_abs": worst_abs, "max_relative": worst_rel}


def guard_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch for every graph input: standard-normal floats, zeros for integers and booleans (valid token
    ids and indices), symbolic dims = 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for spec in model.graph.input:
        if spec.name in inits:
            continue
        tt = spec.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[spec.name] = (rng.normal(size=dims).astype(dtype) if np.issubdtype(dtype, np.floating)
                            else np.zeros(dims, dtype=dtype))
    return feeds


def _session_outputs(source, feeds, run: bool = True, optimize: bool = True):
    sess = session(source, log_level=4, optimize=optimize)
    return {o.name: v for o, v in zip(sess.get_outputs(), sess.run(None, feeds))} if run else {}


def check_runs(path, reference, label: str) -> None:
    """The last guard before a result is written: the file at `path` must load in onnxruntime and run one batch
    of random inputs of `reference`'s (member 0's) input shapes, and give outputs of the shapes `reference`
    gives on it. Otherwise one line naming the node onnxruntime names (UnsupportedGraphError). Where member 0
    itself cannot run on such inputs (every input dim symbolic, channels included), the result must load."""
    import re
    from .errors import UnsupportedGraphError
    ref = onnx.load(str(reference), load_external_data=False) if not isinstance(reference, onnx.ModelProto) \
        else reference
    feeds = guard_feeds(ref)
    try:
        want = _session_outputs(reference, feeds)
    except Exception:      # the member itself does not run on these inputs (e.g. every input dim symbolic,
        want, feeds = None, None    # channels included): the result must still load in onnxruntime
    def failure(exc: Exception) -> tuple[str | None, str]:
        """The node (name, op) onnxruntime names in its error, and the error's message."""
        text = " ".join(str(exc).split())
        node = re.search(r"running (\w+) node\. Name:'([^']*)'", text) or \
            re.search(r"Node \(([^)]*)\) Op \((\w+)\)", text)
        where = ((node.group(2), node.group(1)) if node and text[node.start():].startswith("running")
                 else (node.group(1), node.group(2)) if node else None)
        return where, text.split("Status Message: ")[-1] if "Status Message: " in text else text

    def outputs(optimize: bool = True):
        return _session_outputs(path, feeds, optimize=optimize) if feeds is not None else \
            _session_outputs(path, None, run=False, optimize=optimize)
    try:
        got = outputs()
    except Exception as exc:
        where, detail = failure(exc)
        written = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path), load_external_data=False)
        if where is not None and where[0] not in {n.name for n in written.graph.node}:
            try:                # a node of onnxruntime's own fusions: name the graph's node instead
                outputs(optimize=False)
            except Exception as plain:
                named = failure(plain)
                if named[0] is not None:
                    where, detail = named
        place = f"node '{where[0]}' ({where[1]})" if where else "the graph"
        raise UnsupportedGraphError(f"{label}: the result does not run in onnxruntime at {place}: "
                                    f"{detail[:200]}; nothing written") from None
    if want is None:
        return
    for name, value in want.items():         # tensors (a ZipMap's sequence of maps has no shape to compare)
        if name in got and isinstance(value, np.ndarray) and np.shape(got[name]) != value.shape:
            raise UnsupportedGraphError(f"{label}: output '{name}' of the result has shape {list(np.shape(got[name]))}"
                                        f", member 0's {list(value.shape)}; nothing written")
