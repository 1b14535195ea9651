"""The public Python API. Every function takes paths or onnx.ModelProto objects; inputs are never modified."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .errors import IncompatibleMembersError, OnnxFuseError, UnsupportedGraphError
from .groups import Analysis, analyze, output_exactness
from .model_io import (Member, TensorTable, check_compatible, check_output_path, light_model, load_member,
                       save_model)
from .select import channel_scores, select_kept
from .transplant import MemberTensors, transplant
from . import methods as alignment


@dataclass
class Fusion:
    """A fused (or wide, or pruned) model and what was done to make it.

    `graph` has no weight data; the weights are in `tensors`. `model` puts them together on first use
    (the CLI never does: it streams graph and weights into the file).
    """
    graph: onnx.ModelProto
    tensors: TensorTable
    summary: dict = field(default_factory=dict)

    @cached_property
    def model(self) -> onnx.ModelProto:
        return self.tensors.materialize(self.graph)


class Phases:
    """Wall seconds per phase of one call, for the summary: load (read and check the members), fuse (analysis,
    selection or alignment, assembly, output check), reconstruct, deviation, tune (fine-tuning and scoring on
    `val`), save. The fusion work alone can then be compared across methods without the file I/O they share."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Charge the time since the previous mark to `phase`."""
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._last, 4)
        self._last = now


def load_members(sources) -> list[Member]:
    if isinstance(sources, (str, Path, onnx.ModelProto)):
        sources = [sources]
    return [load_member(s, i) for i, s in enumerate(sources)]


def _analyze_members(members: list[Member]) -> tuple[Analysis, list[dict[str, str]]]:
    maps = check_compatible(members)
    a = analyze(members[0].model, members[0].tensors, members[0].name)
    return a, maps


def _require_fusable(a: Analysis, source: str) -> None:
    if a.problems:
        raise UnsupportedGraphError(f"{source}: {a.problems[0]}"
                                    + (f" (and {len(a.problems) - 1} more; see `onnxfuse inspect`)"
                                       if len(a.problems) > 1 else ""))
    if not any(g.prunable for g in a.groups()):
        raise UnsupportedGraphError(f"{source}: no layer has channels that can be fused (every channel group "
                                    f"touches a graph input or output)")


def fuse(sources, method: str = "nt", keep=None, output=None, force: bool = False, data=None, val=None,
         training: dict | None = None, progress: bool = False, calibrate=None, calib_samples: int = 2048) -> Fusion:
    """Fuse N models of one architecture. method: 'nt' (transplant the top-k neurons), 'concat' (the wide
    ensemble model), 'prune' (N = 1 structured magnitude pruning; keep is required), or a baseline that averages
    the members at the original width: 'average', 'weight-matching' (Git Re-Basin), 'ot' (OT fusion).

    With `data` (an .npz) and `training` options (TrainOptions fields, e.g. epochs=3), the result is
    fine-tuned before it is written; with `val`, members, ensemble and result are scored on it.

    With `calibrate` (an .npz of inputs; labels unused), 'nt' and 'prune' results are first reconstructed:
    every layer that consumes a pruned group is refitted by least squares to reproduce the wide model's
    pre-activations on `calib_samples` of its samples (see onnxfuse.reconstruct); no training.
    """
    start = time.perf_counter()
    phases = Phases()
    sources = [sources] if isinstance(sources, (str, Path, onnx.ModelProto)) else list(sources)
    if output is not None:
        check_output_path(output, sources, force)
    options = _train_options(training)
    _check_method(method, sources, keep, calibrate)
    members = load_members(sources)
    phases.mark("load")
    built = _build(members, method, keep)
    fusion, summary = Fusion(built.graph, built.tensors), built.summary
    phases.mark("fuse")
    if calibrate is not None:
        _reconstruct(built, sources, calibrate, calib_samples)
        fusion = Fusion(built.graph, built.tensors)
        phases.mark("reconstruct")
    if built.exactness is not None:
        summary["exact"] = all(v is None for v in built.exactness.values())
        summary["outputs"] = {k: ("mean of the members' outputs" if v is None else f"not exact: {v}")
                              for k, v in built.exactness.items()}
        if not summary["exact"]:
            summary["deviation"] = _measure_deviation(fusion.model, sources, data)
            phases.mark("deviation")
    if data is not None or val is not None:
        _tune_and_score(fusion.model, sources, data, val, options, summary, progress)
        tuned = summary.pop("_model", None)
        if tuned is not None:
            fusion = Fusion(*TensorTable.detach(tuned))
        phases.mark("tune")
    return _written(fusion, summary, output, force, start, phases, sources[0])


def _check_method(method: str, sources: list, keep, calibrate) -> None:
    if method not in ("nt", "concat", "prune", *alignment.METHODS):
        raise OnnxFuseError(f"unknown method '{method}' (nt, {', '.join(alignment.METHODS)}, concat or prune)")
    if (method == "nt" or method in alignment.METHODS) and len(sources) < 2:
        raise OnnxFuseError(f"merge needs at least 2 models, got {len(sources)}")
    if method in alignment.METHODS and keep is not None:
        raise OnnxFuseError(f"--keep applies to neuron transplantation only, not to --method {method}")
    if method == "prune" and (len(sources) != 1 or keep is None):
        raise OnnxFuseError("prune takes one model and a --keep fraction")
    if calibrate is not None and method not in ("nt", "prune"):
        raise OnnxFuseError(f"--calibrate applies to neuron transplantation (and prune), not to method {method}")


@dataclass
class _Built:
    """The assembled model (graph without weights + tensors) and what later steps need to know about it."""
    graph: onnx.ModelProto
    tensors: TensorTable
    analysis: Analysis
    kept: dict | None                  # group -> kept wide channels (None: an averaging method)
    n: int
    exactness: dict | None             # concat only: per output, why it is not the members' mean
    summary: dict


def _build(members: list[Member], method: str, keep) -> _Built:
    """Analyse the members, choose the kept channels (or align them), assemble and check the result."""
    a, maps = _analyze_members(members)
    label = members[0].name
    _require_fusable(a, label)
    n = len(members)
    load = MemberTensors(members, maps)
    groups = [g for g in a.groups() if g.prunable]
    if method == "concat":
        kept = {g.id: np.arange(n * g.width) for g in groups}
    elif method in alignment.METHODS:
        kept = None
    else:
        scores = channel_scores(a, load, n, a.widened_touches())
        kept = select_kept(a, scores, groups, n, keep)
    exactness = output_exactness(a, load.differing()) if method == "concat" else None
    member_params = _count_params(members[0].model)
    if kept is None:
        graph, tensors, moved = alignment.fuse_aligned(method, members, load, a)
        described = [{"id": g.id, "width": g.width, "moved_per_member": moved[g.id], "layers": g.layers}
                     for g in groups]
    else:
        graph, tensors = transplant(members, load, a, kept, release=True)
        described = [{"id": g.id, "width": g.width, "kept": int(len(kept[g.id])),
                      "kept_per_member": np.bincount(kept[g.id] // g.width, minlength=n).tolist(),
                      "layers": g.layers} for g in groups]
    _verify_shapes(graph, label)
    _stamp(graph, method, keep, members)
    summary = {
        "method": method, "members": [m.name for m in members], "keep": keep, "groups": described,
        "fixed_groups": [{"id": g.id, "width": g.width, "layers": g.layers, "why": g.frozen + g.blocked}
                         for g in a.groups() if not g.prunable],
        "parameters": {"member": member_params, "output": _count_params(graph)},
    }
    return _Built(graph, tensors, a, kept, n, exactness, summary)


def _reconstruct(built: _Built, sources, calibrate, calib_samples) -> None:
    """Refit the layers after pruned groups on the calibration data (in place), and record the provenance."""
    from .reconstruct import reconstruct
    wide = fuse(sources, "concat").model
    report = reconstruct(built.graph, built.tensors, wide, built.analysis, built.kept, built.n, calibrate,
                         calib_samples)
    built.summary["reconstruction"] = report
    for prop in built.graph.metadata_props:       # provenance: the weights were refitted on this data
        if prop.key == "onnxfuse.options":
            prop.value = json.dumps({**json.loads(prop.value), "calibrate": Path(str(calibrate)).name,
                                     "calib_samples": report["samples"]}, sort_keys=True)


def is_main_process() -> bool:
    """Only rank 0 writes files and prints under torchrun (cheap: no torch or onnxruntime import)."""
    return int(os.environ.get("RANK", "0")) == 0


def _written(fusion: Fusion, summary: dict, output, force: bool, start: float, phases: Phases | None = None,
             reference=None) -> Fusion:
    """Save the result if asked (only rank 0 under torchrun), and complete its summary. What is written must run:
    it is loaded in onnxruntime and run on one batch like `reference` (member 0) first, or refused unwritten."""
    if output is not None and is_main_process():
        from .runtime import check_runs
        label = reference.graph.name if isinstance(reference, onnx.ModelProto) else str(reference)
        save_model(fusion.graph, output, force, fusion.tensors,
                   check=None if reference is None else lambda path: check_runs(path, reference, label))
        summary["output"] = str(output)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    if phases is not None:
        if output is not None:
            phases.mark("save")
        summary["phases"] = phases.seconds
    fusion.summary = summary
    return fusion


def _verify_shapes(graph: onnx.ModelProto, source: str) -> None:
    """Last guard against a silently wrong model: the rewritten graph must pass the checker with shape
    inference (weights stand in as typed inputs, so this is cheap)."""
    try:
        onnx.checker.check_model(light_model(graph), full_check=True)
    except Exception as exc:
        raise UnsupportedGraphError(f"{source}: the rewritten graph fails shape inference; onnxfuse does not "
                                    f"handle this graph correctly yet ({str(exc).splitlines()[0][:300]})") from None


def _count_params(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer))


def _stamp(model: onnx.ModelProto, method: str, keep, members: list[Member]) -> None:
    """Record provenance in metadata_props (no time stamps: same inputs give the same bytes)."""
    ours = {
        "onnxfuse.version": __version__,
        "onnxfuse.method": {"nt": "neuron-transplantation", "concat": "concatenation (wide ensemble)",
                            "prune": "structured magnitude pruning", **alignment.LABELS}[method],
        "onnxfuse.options": json.dumps({"keep": keep}, sort_keys=True),
        "onnxfuse.members": json.dumps([{"file": Path(m.name).name, "sha256": m.sha256} for m in members]),
    }
    kept = [p for p in model.metadata_props if p.key not in ours]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in ours.items():
        model.metadata_props.add(key=key, value=value)


def merge(models, output=None, keep=None, force: bool = False, data=None, val=None, method: str = "nt",
          calibrate=None, calib_samples: int = 2048, **training) -> onnx.ModelProto:
    """Neuron Transplantation: fuse N >= 2 models into one of the original width (or `keep` * N * width).
    method 'average', 'weight-matching' or 'ot' averages the (aligned) members instead.

    Fine-tune with `data="train.npz", epochs=3` (and any TrainOptions field: lr, distill, schedule, ...).
    Reconstruct without training (before any fine-tuning) with `calibrate="calib.npz"`.
    """
    return fuse(models, method, keep, output, force, data, val, training, calibrate=calibrate,
                calib_samples=calib_samples).model


def concat(models, output=None, force: bool = False) -> onnx.ModelProto:
    """The wide model: all members side by side; its output is the mean of the members' outputs."""
    return fuse(models, "concat", None, output, force).model


def prune(model, keep: float, output=None, force: bool = False) -> onnx.ModelProto:
    """Structured magnitude pruning of one model: keep round(keep * width) neurons of every group."""
    return fuse([model], "prune", keep, output, force).model


def inspect(models) -> dict:
    """The channel groups of the first model, and whether all the given models can be fused together."""
    members = load_members(models)
    report = {"models": [m.name for m in members]}
    a = analyze(members[0].model, members[0].tensors, members[0].name)
    report["groups"] = [{"id": g.id, "width": g.width, "layers": g.layers, "prunable": g.prunable,
                         "why_fixed": g.frozen + g.blocked} for g in a.groups()]
    report["problems"] = a.problems
    if len(members) > 1:
        try:
            maps = check_compatible(members)
            report["compatible"] = True
            exactness = output_exactness(a, MemberTensors(members, maps).differing())
            report["exact"] = all(v is None for v in exactness.values())
            report["outputs"] = {k: ("mean of the members' outputs" if v is None else f"not exact: {v}")
                                 for k, v in exactness.items()}
            if not report["exact"] and not a.problems:
                report["deviation"] = fuse(models, "concat").summary.get("deviation")
        except IncompatibleMembersError as exc:
            report["compatible"] = False
            report["incompatibility"] = str(exc)
    report["fusable"] = not a.problems and any(g["prunable"] for g in report["groups"]) and \
        report.get("compatible", True)
    return report


def _train_options(training: dict | None):
    if not training:
        return None
    from .training import TrainOptions
    unknown = set(training) - set(TrainOptions.__dataclass_fields__)
    if unknown:
        raise OnnxFuseError(f"unknown training options: {sorted(unknown)}")
    return TrainOptions(**training)


def _teacher_logits(teachers, data):
    from .runtime import Runner
    return np.mean([Runner(t)(data) for t in teachers], axis=0)


def _tune_and_score(model, sources, data, val, options, summary, progress) -> None:
    """Fine-tune `model` on `data` (if epochs > 0) and score members, ensemble and result on `val`."""
    from .data import load_data
    from .runtime import Runner, scores
    train_set = load_data(data, model) if data is not None else None
    val_set = load_data(val, model) if val is not None else None
    if val_set is not None:
        member_logits = [Runner(s)(val_set) for s in sources]
        summary["accuracy"] = {Path(str(s)).name if not isinstance(s, onnx.ModelProto) else f"member {i}":
                               scores(l, val_set.y) for i, (s, l) in enumerate(zip(sources, member_logits))}
        if len(sources) > 1:
            summary["accuracy"]["ensemble (mean of logits)"] = scores(np.mean(member_logits, 0), val_set.y)
        summary["accuracy"]["result before fine-tuning"] = scores(Runner(model)(val_set), val_set.y)
    if train_set is not None and options is not None and options.epochs > 0:
        from .training import finetune
        teacher = _teacher_logits(sources, train_set) if options.distill else None
        result = finetune(model, train_set, options, val_set, teacher, progress)
        summary["training"] = {"options": result.options, "history": result.history}
        summary["_model"] = result.model
        if val_set is not None:
            summary["accuracy"]["result after fine-tuning"] = scores(Runner(result.model)(val_set), val_set.y)


def finetune(model, data, output=None, teachers=None, val=None, force: bool = False, progress: bool = False,
             **training) -> onnx.ModelProto:
    """Fine-tune any ONNX model on an .npz (labels, or distillation from `teachers`' mean logits)."""
    return finetune_with_report(model, data, output, teachers, val, force, progress, **training).model


def finetune_with_report(model, data, output=None, teachers=None, val=None, force: bool = False,
                         progress: bool = False, **training) -> Fusion:
    from .data import load_data
    from .runtime import Runner, scores
    from .training import finetune as run_finetune
    start = time.perf_counter()
    if output is not None:
        check_output_path(output, [model, *(teachers or [])], force)
    member = load_member(model)
    full = member.tensors.materialize(member.model)
    options = _train_options(training) or _train_options({"epochs": 3})
    train_set = load_data(data, full)
    val_set = load_data(val, full) if val is not None else None
    teacher = _teacher_logits(teachers, train_set) if options.distill and teachers else None
    result = run_finetune(full, train_set, options, val_set, teacher, progress)
    summary = {"method": "finetune", "members": [member.name], "training": {"options": result.options,
                                                                         "history": result.history}}
    if val_set is not None:
        summary["accuracy"] = {"before": scores(Runner(full)(val_set), val_set.y),
                               "after": scores(Runner(result.model)(val_set), val_set.y)}
    fusion = Fusion(*TensorTable.detach(result.model))
    return _written(fusion, summary, output, force, start, reference=model)


def evaluate(models, data, ensemble: bool = False, provider: str = "cpu") -> list[dict]:
    """Accuracy and loss of each model on an .npz, and of their ensemble (mean of logits)."""
    from .data import load_data
    from .runtime import evaluate as run_evaluate
    models = [models] if isinstance(models, (str, Path, onnx.ModelProto)) else list(models)
    first = load_member(models[0])
    return run_evaluate(models, load_data(data, first.model), ensemble, provider)


def benchmark(models=(), ensemble=None, batch_sizes=(1, 32), provider: str = "cpu", threads: int = 1,
              **options) -> list[dict]:
    """Latency (p50/p90/p99 ms), throughput, file size and peak memory of each model with onnxruntime, and
    of `ensemble` served as N sessions per request and as its wide graph; one row per model and batch size.
    Options: warmup=10, seconds=2.0, memory=True, wide=True, seed=0 (see onnxfuse.bench.benchmark)."""
    from .bench import benchmark as run_benchmark
    return run_benchmark(models, ensemble, batch_sizes, provider, threads, **options)


def _measure_deviation(wide: onnx.ModelProto, sources, data) -> dict | None:
    """Measure, never hide, how far a wide model that is not exactly the ensemble is from it."""
    from .runtime import output_deviation, random_feeds
    if data is not None:
        from .data import load_data
        feeds, on = load_data(data, wide).inputs, str(data)
        feeds = {k: v[:256] for k, v in feeds.items()}
    else:
        feeds, on = random_feeds(wide), "16 random standard-normal inputs"
    if feeds is None:
        return {"on": None, "note": "not measured: the model has non-float inputs; pass --data"}
    return {"on": on, **output_deviation(wide, sources, feeds)}
