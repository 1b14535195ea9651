"""The public Python API. Every function takes paths or onnx.ModelProto objects; inputs are never modified."""
from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass, fields, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .errors import IncompatibleMembersError, InputError, OnnxFuseError, UnsupportedGraphError
from .exactness import output_exactness
from .folding import fold_problem_inputs
from .groups import Analysis, analyze
from .model_io import (Member, TensorTable, check_compatible, check_output_path, light_model, load_member,
                       read_model, save_model)
from .methods import METHODS, Assembly, FusionMethod, Job
from .ops import check_trainable
from .options import FuseOptions, FusionReport
from .select import importance as importance_of
from .transplant import MemberTensors


@dataclass
class Fusion:
    """A fused (or wide, or pruned) model and what was done to make it.

    `graph` has no weight data; the weights are in `tensors`. `model` puts them together on first use
    (the CLI never does: it streams graph and weights into the file). `report` says what was done;
    `summary` is its dict (the `--json` output).
    """
    graph: onnx.ModelProto
    tensors: TensorTable
    report: FusionReport | None = None

    @cached_property
    def model(self) -> onnx.ModelProto:
        return self.tensors.materialize(self.graph)

    @property
    def summary(self) -> dict:
        return self.report.to_dict() if self.report is not None else {}


class Phases:
    """Wall seconds per phase of one call, for the report: import (a method's `imports`: POT for `ot`), load
    (read and check the members), fuse (analysis, selection or alignment, assembly, output check), reconstruct,
    deviation, tune (fine-tuning and scoring on `val`; `score` when nothing is fine-tuned), save. The fusion
    work alone can then be compared across methods without the file I/O and imports they share."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Charge the time since the previous mark to `phase`."""
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._last, 4)
        self._last = now


def _sources(sources) -> list:
    """One model or several (paths or ModelProtos) as a non-empty list; anything else is an InputError."""
    if isinstance(sources, (str, os.PathLike, onnx.ModelProto)):
        return [sources]
    if isinstance(sources, (bytes, bytearray)):
        raise InputError("expected model paths or onnx.ModelProto objects, got bytes (load them with "
                         "onnx.load_from_string first)")
    try:
        sources = list(sources)
    except TypeError:
        raise InputError(f"expected model paths or onnx.ModelProto objects, got {type(sources).__name__}") \
            from None
    if not sources:
        raise InputError("no models given")
    return sources


def load_members(sources) -> list[Member]:
    return [load_member(s, i) for i, s in enumerate(_sources(sources))]


def _analyze_members(members: list[Member]) -> tuple[Analysis, list[dict[str, str]]]:
    maps = check_compatible(members)
    a = _analysis(members)
    return a, (check_compatible(members) if a.folded else maps)


def _analysis(members: list[Member]) -> Analysis:
    """Member 0's analysis; parameters the graph computes from constants alone, which the analysis cannot cut,
    are folded into initializers in every member first (onnxfuse.folding)."""
    a = analyze(members[0].model, members[0].tensors, members[0].name)
    if a.problems:
        folded = fold_problem_inputs(members, a.problems)
        if folded:
            a = analyze(members[0].model, members[0].tensors, members[0].name)
            a.folded = folded
    return a


def _require_fusable(a: Analysis, source: str) -> None:
    if a.problems:
        raise UnsupportedGraphError(f"{source}: {a.problems[0]}"
                                    + (f" (and {len(a.problems) - 1} more; see `onnxfuse inspect`)"
                                       if len(a.problems) > 1 else ""))
    if not any(g.prunable for g in a.groups()):
        raise UnsupportedGraphError(f"{source}: no layer has channels that can be fused (every channel group "
                                    f"touches a graph input or output)")


def fuse(sources, options: FuseOptions | str = "nt", *args, **kwargs) -> Fusion:
    """Fuse N models of one architecture as `options` (a FuseOptions) say. For short, the method name and
    FuseOptions' other fields in their order: `fuse(models, "prune", 0.5, output="p.onnx")`.

    method: a registered FusionMethod (onnxfuse.methods.METHODS): 'nt' (transplant the top-k neurons), 'concat'
    (the wide ensemble model), 'prune' (N = 1 structured magnitude pruning; keep is required), a baseline that
    averages the members at the original width: 'average', 'weight-matching' (Git Re-Basin), 'ot' (OT fusion);
    or 'auto' (needs `data`): the method for where the members come from (see _auto_method; `report.auto` says
    what was chosen and why).

    With `data` (an .npz, arrays, a dict of arrays or a torch Dataset/DataLoader) and `training` options
    (TrainOptions fields, e.g. {"epochs": 3}), the result is fine-tuned before it is written (see
    onnxfuse.training: lr auto, best epoch kept); with `val`, members, ensemble and result are scored on it.
    The result is compared with the best member (`report.beats_best_member`); with
    `training={"require_gain": True}` a result below it raises NoGainError and nothing is written.

    With `calibrate` (an .npz of inputs; labels unused), 'nt' and 'prune' results are first reconstructed:
    every layer that consumes a pruned group is refitted by least squares to reproduce the wide model's
    pre-activations on `calib_samples` of its samples (see onnxfuse.reconstruct); no training.

    For experiments with the selection of 'nt' and 'prune': `importance` (a name in onnxfuse.select.IMPORTANCE,
    or a scoring function) and `kept` (the kept channels, instead of the top-k; see FuseOptions).
    """
    if not isinstance(options, FuseOptions):
        options = FuseOptions(options, *args, **kwargs)
    elif args or kwargs:
        raise TypeError("fuse takes FuseOptions or its fields, not both")
    o = options
    start = time.perf_counter()
    phases = Phases()
    sources = _sources(sources)
    if o.output is not None:
        check_output_path(o.output, [*sources, o.data, o.val, o.calibrate], o.force)
    training = _train_options(o.training)
    method = _method(o, len(sources))
    if method is not None and method.imports:    # POT (which imports torch when installed): not "fuse" work
        for module in method.imports:
            importlib.import_module(module)
        phases.mark("import")
    members = load_members(sources)
    if o.output is not None:       # and now with every file the members read (their external data)
        check_output_path(o.output, members, o.force)
    phases.mark("load")
    if o.data is not None and training is not None and training.epochs > 0:    # refused before fusing
        check_trainable(members[0].model, training.target_output)
    try:
        auto = None
        if method is None:
            method, auto = _auto_method(members, o, training)
        built = _build(members, method, o.keep, o.importance, o.kept, release=o.calibrate is None)
    except UnsupportedGraphError as exc:           # an analysis error that does not say which model
        message = str(exc)
        raise UnsupportedGraphError(message if members[0].name in message else f"{members[0].name}: {message}") \
            from None
    report = built.report
    report.auto = auto
    phases.mark("fuse")
    if o.calibrate is not None:
        _reconstruct(built, o.calibrate, o.calib_samples)
        phases.mark("reconstruct")
    fusion = Fusion(built.assembly.graph, built.assembly.tensors)
    if built.exactness is not None:
        report.exact = all(v is None for v in built.exactness.values())
        report.outputs = {k: ("mean of the members' outputs" if v is None else f"not exact: {v}")
                          for k, v in built.exactness.items()}
        if not report.exact:
            report.deviation = _measure_deviation(fusion.model, sources, o.data)
            phases.mark("deviation")
    if o.soup is not None:
        fusion = _souped(fusion.model, sources, o, training, report)
        phases.mark("tune")
    elif o.data is not None or o.val is not None:
        tuned = _tune_and_score(fusion.model, sources, o.data, o.val, training, report, o.progress)
        if tuned is not None:
            fusion = Fusion(*TensorTable.detach(tuned))
        phases.mark("tune" if tuned is not None else "score")     # nothing was tuned: only scored
    if o.quantize is not None:
        fusion = _quantized(fusion, o.quantize, o.quantize_exclude, o.calibrate or o.data, o.val, report)
        phases.mark("quantize")
    return _written(fusion, report, o.output, o.force, start, phases, sources[0])


def _method(o: FuseOptions, n: int) -> FusionMethod | None:
    """The registered method `o.method`, checked against the member count and options before anything is
    loaded; None for 'auto', which chooses one once the members are loaded."""
    if o.method == "auto":
        if n < 2:
            raise OnnxFuseError(f"merge needs at least 2 models, got {n}")
        if o.data is None:
            raise OnnxFuseError("--method auto measures the members on --data: give --data, or name a --method")
        return None
    method = METHODS.get(o.method)
    if method is None:
        names = ["auto", *METHODS]
        raise OnnxFuseError(f"unknown method '{o.method}' ({', '.join(names[:-1])} or {names[-1]})")
    method.validate(n, o.keep, o.calibrate)
    return method


def _quantized(fusion: Fusion, mode: str, exclude, calibration, val, report: FusionReport) -> Fusion:
    """The int8/fp16 version of the result, calibrated on `calibration` (the --calibrate file, else --data);
    scored on `val` beside the float result."""
    from .data import load_data
    from .quantization import quantize as run_quantize
    model = fusion.model
    calib = load_data(calibration, model) if calibration is not None and mode == "int8" else None
    result, report.quantization = run_quantize(model, mode, calib, exclude, name=report.members[0])
    if val is not None and report.accuracy is not None:
        from .runtime import Runner, scores
        val_set = load_data(val, model)
        report.accuracy[f"result in {mode}"] = scores(Runner(result)(val_set), val_set.y)
    return Fusion(*TensorTable.detach(result))


def _souped(model: onnx.ModelProto, sources, o: FuseOptions, options, report: FusionReport) -> Fusion:
    """Fine-tune `model` as usual, then `o.soup` copies of the result for `o.soup_epochs` more epochs each
    (seeds seed+1 .. seed+k: other batch orders and dropout; the start's learning rate), and return their soup
    (onnxfuse.soups): uniform, or greedy on `val` (else on the held-out slice of `data`). The copies branch from
    one fine-tuned model, as the sparse-model-soups recipe retrains copies of one good pruned model: branched
    straight from the transplanted model they drift into different basins and their average lost to each of
    them (benchmarks/soup.py)."""
    from .data import load_data
    from .runtime import Runner, scores
    from .soups import average, make_soup
    from .training import finetune
    k, data, val = o.soup, o.data, o.val
    if data is None or options is None or options.epochs < 1:
        raise OnnxFuseError("--soup needs --data and at least one epoch of fine-tuning")
    if k < 2:
        raise OnnxFuseError(f"--soup needs at least 2 copies, got {k}")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and world != k:
        raise OnnxFuseError(f"under torchrun, --soup {k} trains one copy per process: start {k} processes, "
                            f"not {world}")
    if world > 1:    # every process fine-tunes the start alike, then its own copy: no gradient all-reduce
        options = replace(options, independent=True, checkpoint_dir=None, resume=False)
    start = _tune_and_score(model, sources, data, val, options, report, o.progress)
    train_set = load_data(data, start)
    val_set = load_data(val, start) if val is not None else None
    teacher = (lambda d: _teacher_logits(sources, d, threads=options.threads)) if options.distill else None
    epochs = o.soup_epochs or options.epochs
    every = min(o.soup_average_every or epochs, epochs)
    lr = report.training["options"]["lr"]          # the start's rate (chosen once, if auto)

    def round_of_copies(begin: onnx.ModelProto, r: int) -> list[onnx.ModelProto]:
        """Every copy fine-tuned for round r's epochs from `begin` (round 0: seeds seed+1 .. seed+k)."""
        tuned = []
        for i in range(k):
            if world > 1 and i != rank:
                continue
            copy = replace(options, seed=options.seed + 1 + i + k * r, epochs=min(every, epochs - r * every),
                           lr=lr, checkpoint_dir=None, resume=False, require_gain=False, last_epoch=True)
            tuned.append(finetune(begin, train_set, copy, None, teacher, o.progress).model)
        if world > 1:                     # every process gets every copy (and computes the same soup)
            import torch.distributed as dist
            gathered = [None] * world
            dist.all_gather_object(gathered, tuned[0].SerializeToString(deterministic=True))
            tuned = [onnx.load_from_string(b) for b in gathered]
        return tuned

    rounds = -(-epochs // every)
    tuned = round_of_copies(start, 0)
    for r in range(1, rounds):           # periodic averaging: the copies continue from their average
        graph, tensors = average([load_member(t, i) for i, t in enumerate(tuned)])
        tuned = round_of_copies(tensors.materialize(graph), r)
    copies = [load_member(t, i) for i, t in enumerate(tuned)]
    seeds = [options.seed + 1 + i + k * (rounds - 1) for i in range(k)]      # the last round's
    for i, t in enumerate(tuned):
        if val_set is not None:
            report.accuracy[f"copy {i} (+{epochs} epochs, seed {seeds[i]})"] = scores(Runner(t)(val_set), val_set.y)
    from .training import split_holdout
    ranked_on = val if val is not None else split_holdout(train_set, options.holdout)[1]   # greedy: never trained on
    result = make_soup(copies, o.soup_mode, _held_out_score(ranked_on, copies[0]) if ranked_on is not None else None)
    result.report["ingredients"] = [f"copy {i} (seed {seeds[i]})" for i in range(k)]
    result.report.update(epochs_per_copy=epochs, processes=world, averaged_every=every, rounds=rounds)
    if o.soup_batchnorm == "reestimate":
        from .batchnorm import reestimate
        result.report["batchnorm"] = reestimate(result.graph, result.tensors, train_set.inputs)
    report.soup = result.report
    if val_set is not None:
        report.accuracy[f"{o.soup_mode} soup of {len(result.report['kept'])}"] = scores(
            Runner(result.tensors.materialize(result.graph))(val_set), val_set.y)
    return Fusion(result.graph, result.tensors)


def _auto_method(members: list[Member], o: FuseOptions, options) -> tuple[FusionMethod, dict]:
    """--method auto: the method for where the members come from (onnxfuse.similarity measures it on the
    held-out slice of `data`, never on `val`), and why (`report.auto`).

    - identical members or one basin (fine-tunes of one checkpoint): `average`, a soup of the members;
    - independently trained, with fine-tuning to follow: `nt` (it needs the fine-tuning, and after it is ahead
      of the averaging methods; benchmarks/auto_method.py);
    - independently trained, no fine-tuning: the best of `weight-matching`, `ot` and `average` on the held-out
      slice (NT before fine-tuning is far below them);
    - `keep`, `calibrate`, `kept` or another `importance`: `nt` (they apply to it only)."""
    from .data import load_data
    from .similarity import similarity
    from .training import split_holdout
    fraction = options.holdout if options is not None and options.holdout > 0 else 0.1
    train_set = load_data(o.data, members[0].model)
    holdout = split_holdout(train_set, fraction)[1] or train_set
    if holdout.y is None:
        raise OnnxFuseError("--method auto needs labels 'y' in --data to measure the members; name a --method")
    sim = similarity(members, holdout)
    tuned = options is not None and options.epochs > 0
    candidates = None
    if o.keep is not None or o.calibrate is not None or o.kept is not None or o.importance != "magnitude":
        method, why = "nt", "--keep and --calibrate apply to neuron transplantation"
    elif sim["regime"] in ("identical", "one basin"):
        method, why = "average", f"members are {sim['regime']}: {sim['why']}"
    elif tuned:
        method, why = "nt", (f"members are independent ({sim['why']}), and fine-tuning follows: neuron "
                             f"transplantation")
    else:
        from .runtime import Runner, scores
        candidates = {}
        for name in ("weight-matching", "ot", "average"):
            assembly = _build(members, METHODS[name], release=False).assembly
            candidates[name] = scores(Runner(assembly.tensors.materialize(assembly.graph))(holdout),
                                      holdout.y)["accuracy"]
        method = max(candidates, key=candidates.get)
        why = (f"members are independent and nothing is fine-tuned: the best of the averaging methods on "
               f"{holdout.source} ({candidates[method]:.4f})")
    return METHODS[method], {"method": method, "why": why, "regime": sim["regime"], "similarity": sim,
                             **({"candidates": candidates} if candidates else {})}


@dataclass
class _Built:
    """The assembled model and what later steps need to know about it: the job it was built from (the loaded
    members, their analysis: reconstruction builds the wide model from them), and for a method whose result is
    the wide model, per output, why it is not the members' mean (None: it is)."""
    job: Job
    assembly: Assembly
    exactness: dict | None
    report: FusionReport


def _build(members: list[Member], method: FusionMethod, keep=None, importance="magnitude", kept=None,
           release: bool = True) -> _Built:
    """Analyse the members, let `method` build the result (choose the kept channels, or align them), check it.
    With `release`, the members' tensors are dropped as they are used."""
    if not method.selects and (kept is not None or importance != "magnitude"):
        raise OnnxFuseError(f"importance and kept apply to the methods that select neurons, not to {method.name}")
    a, maps = _analyze_members(members)
    label = members[0].name
    _require_fusable(a, label)
    load = MemberTensors(members, maps)
    job = Job(members, load, a, [g for g in a.groups() if g.prunable], keep, importance_of(importance), kept,
              release)
    exactness = output_exactness(a, load.differing()) if method.wide else None
    member_params = _count_params(members[0].model)
    assembly = method.build(job)
    _verify_shapes(assembly.graph, label)
    _stamp(assembly.graph, method, keep, members)
    report = FusionReport(
        method=method.name, members=[m.name for m in members],
        keep=keep if keep is not None else (1.0 if method.wide else 1 / job.n),   # the effective fraction
        groups=assembly.groups,
        fixed_groups=[{"id": g.id, "width": g.width, "layers": g.layers, "why": g.frozen + g.blocked}
                      for g in a.groups() if not g.prunable],
        parameters={"member": member_params, "output": _count_params(assembly.graph)})
    return _Built(job, assembly, exactness, report)


def _reconstruct(built: _Built, calibrate, calib_samples) -> None:
    """Refit the layers after pruned groups on the calibration data (in place), and record the provenance. The
    wide model they are refitted to is built from the members already loaded (and now used up)."""
    from .reconstruct import reconstruct
    wide = METHODS["concat"].build(replace(built.job, release=True))
    graph, tensors = built.assembly.graph, built.assembly.tensors
    report = reconstruct(graph, tensors, wide.tensors.materialize(wide.graph), built.job.analysis,
                         built.assembly.kept, built.job.n, calibrate, calib_samples)
    built.report.reconstruction = report
    for prop in graph.metadata_props:       # provenance: the weights were refitted on this data
        if prop.key == "onnxfuse.options":
            prop.value = json.dumps({**json.loads(prop.value), "calibrate": Path(report["calibration"]).name,
                                     "calib_samples": report["samples"]}, sort_keys=True)


def is_main_process() -> bool:
    """Only rank 0 writes files and prints under torchrun (cheap: no torch or onnxruntime import)."""
    return int(os.environ.get("RANK", "0")) == 0


def _written(fusion: Fusion, report: FusionReport, output, force: bool, start: float, phases: Phases | None = None,
             reference=None) -> Fusion:
    """Save the result if asked (only rank 0 under torchrun), and complete its report. What is written must run:
    it is loaded in onnxruntime and run on one batch like `reference` (member 0) first, or refused unwritten."""
    if output is not None and is_main_process():
        from .runtime import check_runs
        label = reference.graph.name if isinstance(reference, onnx.ModelProto) else str(reference)
        save_model(fusion.graph, output, force, fusion.tensors,
                   check=None if reference is None else lambda path: check_runs(path, reference, label))
        report.output = str(output)
    report.seconds = round(time.perf_counter() - start, 3)
    if phases is not None:
        if output is not None:
            phases.mark("save")
        report.phases = phases.seconds
    fusion.report = report
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
    """Float initializers (weights); integer shape constants are not parameters."""
    from .model_io import FLOAT_TYPES
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer if t.data_type in FLOAT_TYPES))


def _stamp(model: onnx.ModelProto, method: FusionMethod, keep, members: list[Member]) -> None:
    """Record provenance in metadata_props (no time stamps: same inputs give the same bytes)."""
    ours = {
        "onnxfuse.version": __version__,
        "onnxfuse.method": method.label,
        "onnxfuse.options": json.dumps({"keep": keep}, sort_keys=True),
        "onnxfuse.members": json.dumps([{"file": Path(m.name).name, "sha256": m.sha256} for m in members]),
    }
    kept = [p for p in model.metadata_props if p.key not in ours]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in ours.items():
        model.metadata_props.add(key=key, value=value)


_FUSE_FIELDS = {f.name for f in fields(FuseOptions)}


def merge(models, output=None, keep=None, force: bool = False, data=None, val=None, method: str = "nt",
          **options) -> onnx.ModelProto:
    """Neuron Transplantation: fuse N >= 2 models into one of the original width (or `keep` * N * width).
    method 'average', 'weight-matching' or 'ot' averages the (aligned) members instead.

    `options`: any other FuseOptions field, and the TrainOptions fields.
    Fine-tune with `data="train.npz", epochs=3` (and any TrainOptions field: lr, distill, schedule, ...).
    Reconstruct without training (before any fine-tuning) with `calibrate="calib.npz"`.
    `quantize="int8"` (calibrated on `calibrate`, else `data`) or `"fp16"` writes the edge version.
    `soup=K` fine-tunes the result, then K copies of it for `soup_epochs` (default: epochs) more epochs with
    other seeds, and writes their weight average (`soup_mode="greedy"` keeps a copy only if the soup's score on
    `val` does not drop).
    """
    fused = {k: options.pop(k) for k in list(options) if k in _FUSE_FIELDS}
    return fuse(models, FuseOptions(method, keep, output, force, data, val, options, **fused)).model


def quantize(model, output=None, mode: str = "int8", calibrate=None, exclude=(), calib_samples: int = 512,
             force: bool = False, activations: str = "uint8") -> onnx.ModelProto:
    """The int8 (static QDQ with `calibrate` inputs, else dynamic for MatMul/Gemm-only graphs) or fp16 version
    of any float model, checked to run in onnxruntime (see onnxfuse.quantization)."""
    return quantize_with_report(model, output, mode, calibrate, exclude, calib_samples, force, activations).model


def quantize_with_report(model, output=None, mode: str = "int8", calibrate=None, exclude=(),
                         calib_samples: int = 512, force: bool = False, activations: str = "uint8") -> Fusion:
    from .data import load_data
    from .quantization import quantize as run_quantize
    start = time.perf_counter()
    if output is not None:
        check_output_path(output, [model], force)
    member = load_member(model)
    full = member.tensors.materialize(member.model)
    calib = load_data(calibrate, full) if calibrate is not None and mode == "int8" else None
    result, report = run_quantize(full, mode, calib, exclude, calib_samples, member.name, activations=activations)
    return _written(Fusion(*TensorTable.detach(result)),
                    FusionReport("quantize", [member.name], quantization=report), output, force, start,
                    reference=full)


def soup(models, output=None, mode: str = "uniform", val=None, force: bool = False) -> onnx.ModelProto:
    """The weight average of models that share one graph (a model soup; see onnxfuse.soups). mode 'greedy'
    adds models in order of their score on `val` and keeps each only if the soup's score does not drop."""
    return soup_with_report(models, output, mode, val, force).model


def soup_with_report(models, output=None, mode: str = "uniform", val=None, force: bool = False) -> Fusion:
    from .soups import make_soup
    start = time.perf_counter()
    sources = _sources(models)
    if output is not None:
        check_output_path(output, sources, force)
    members = load_members(sources)
    result = make_soup(members, mode, _held_out_score(val, members[0]) if val is not None else None)
    _stamp_soup(result.graph, members, result.report)
    return _written(Fusion(result.graph, result.tensors),
                    FusionReport("soup", [m.name for m in members], soup=result.report), output, force, start,
                    reference=sources[0])


def _held_out_score(val, member: Member):
    """score(model) -> accuracy on `val` (higher is better), or minus the loss where there are no labels."""
    from .data import load_data
    from .runtime import Runner, scores
    val_set = load_data(val, member.model)

    def score(model: onnx.ModelProto) -> float:
        s = scores(Runner(model)(val_set), val_set.y)
        if s["accuracy"] is None:
            raise OnnxFuseError(f"{val_set.source}: scoring the soup's ingredients needs labels 'y'")
        return round(float(s["accuracy"]), 6)
    return score


def _stamp_soup(model: onnx.ModelProto, members: list[Member], report: dict) -> None:
    kept = [p for p in model.metadata_props if not p.key.startswith("onnxfuse.soup")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key="onnxfuse.soup", value=json.dumps(
        {"mode": report["mode"], "ingredients": [{"file": Path(m.name).name, "sha256": m.sha256} for m in members],
         "kept": report["kept"]}, sort_keys=True))


def concat(models, output=None, force: bool = False) -> onnx.ModelProto:
    """The wide model: all members side by side; its output is the mean of the members' outputs."""
    return fuse(models, "concat", None, output, force).model


def prune(model, keep: float, output=None, force: bool = False) -> onnx.ModelProto:
    """Structured magnitude pruning of one model: keep round(keep * width) neurons of every group."""
    return fuse([model], "prune", keep, output, force).model


def inspect(models, data=None) -> dict:
    """The channel groups of the first model, and whether all the given models can be fused together; for
    several models also how alike they are (`similarity`: shared tensors, weight distance and, on `data`, the
    loss barrier between them) and which regime that puts them in (see onnxfuse.similarity)."""
    sources = _sources(models)
    members = load_members(sources)
    report = {"models": [m.name for m in members]}
    a = _analysis(members)
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
                wide = _build(members, METHODS["concat"], release=False).assembly     # similarity reads them next
                report["deviation"] = _measure_deviation(wide.tensors.materialize(wide.graph), sources, data)
            from .similarity import similarity
            from .data import load_data
            report["similarity"] = similarity(members, load_data(data, members[0].model) if data else None)
        except IncompatibleMembersError as exc:
            report["compatible"] = False
            report["incompatibility"] = str(exc)
    report["fusable"] = not a.problems and any(g["prunable"] for g in report["groups"]) and \
        report.get("compatible", True)
    return report


def _train_options(training):
    """TrainOptions from a dict of its fields (or TrainOptions); None for no training options."""
    if not training:
        return None
    from .training import TrainOptions, require_torch
    if not isinstance(training, TrainOptions):
        unknown = set(training) - set(TrainOptions.__dataclass_fields__)
        if unknown:
            raise OnnxFuseError(f"unknown training options: {sorted(unknown)}")
        training = TrainOptions(**training)
    if training.epochs > 0:
        require_torch()
    return training


def _teacher_logits(teachers, data, files: set | None = None, threads: int = 1):
    from .runtime import Runner
    return np.mean([Runner(t, files=files, threads=threads)(data) for t in teachers], axis=0)


class NoGainError(OnnxFuseError):
    """`require_gain`: the fused model ended below the best member; nothing was written (CLI exit code 3)."""

    exit_code = 3

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def _name(source, i: int) -> str:
    return Path(str(source)).name if not isinstance(source, onnx.ModelProto) else f"member {i}"


def _tune_and_score(model, sources, data, val, options, report: FusionReport, progress) -> onnx.ModelProto | None:
    """Fine-tune `model` on `data` (if epochs > 0), score members, ensemble and result on `val`, and compare the
    result with the best member on `val` (or, without it, on the held-out slice of `data`). Returns the
    fine-tuned model (None: nothing was fine-tuned)."""
    from .data import load_data
    from .runtime import Runner, scores
    threads = options.threads if options is not None else 1
    train_set = load_data(data, model) if data is not None else None
    val_set = load_data(val, model) if val is not None else None
    if val_set is not None:
        member_logits = [Runner(s, threads=threads)(val_set) for s in sources]
        report.accuracy = {_name(s, i): scores(l, val_set.y) for i, (s, l) in enumerate(zip(sources, member_logits))}
        if len(sources) > 1:
            report.accuracy["ensemble (mean of logits)"] = scores(np.mean(member_logits, 0), val_set.y)
        report.accuracy["result before fine-tuning"] = scores(Runner(model, threads=threads)(val_set), val_set.y)
    if train_set is None or options is None or options.epochs <= 0:
        return None
    from .training import finetune, split_holdout
    teacher = (lambda d: _teacher_logits(sources, d, threads=threads)) if options.distill else None
    result = finetune(model, train_set, options, val_set, teacher, progress)
    report.training = {"options": result.options, "history": result.history}
    if val_set is not None:
        report.accuracy["result after fine-tuning"] = scores(Runner(result.model, threads=threads)(val_set), val_set.y)
    on = val_set if val_set is not None else split_holdout(train_set, options.holdout)[1]
    if len(sources) > 1 and on is not None:
        report.beats_best_member, report.versus_best_member = _versus_best_member(
            result.model, sources, on, val_set is not None, threads)
        if options.require_gain and report.beats_best_member is False:
            v = report.versus_best_member
            raise NoGainError(f"--require-gain: the fused model ({v['result']:.4g}) is below the best member "
                              f"{v['best_member']} ({v['best_member_score']:.4g}) by {v['metric']} on "
                              f"{v['on']}; nothing was written", report.to_dict())
    return result.model


UNFAIR_SLICE = ("the members were probably trained on these samples, which favours them: --val (data no model "
                "was trained on) gives a fair comparison")


def _versus_best_member(model, sources, on, is_val: bool, threads: int) -> tuple[bool | None, dict]:
    """Whether the result is at least as good as the best member on `on` (onnxruntime): accuracy, or MSE for
    regression (None when `on` has no labels), and the scores compared."""
    from .runtime import Runner, merit, scores
    where = "--val" if is_val else on.source
    if on.y is None:
        return None, {"on": where, "note": "no labels: not compared"}
    metric = "mse" if on.regression else "accuracy"
    members = [(scores(Runner(s, threads=threads)(on), on.y), _name(s, i)) for i, s in enumerate(sources)]
    best, name = max(members, key=lambda m: merit(m[0]))
    mine = scores(Runner(model, threads=threads)(on), on.y)
    verdict = {"on": where, "metric": metric, "result": mine[metric], "best_member": name,
               "best_member_score": best[metric]}
    if not is_val:      # measured: on such slices this verdict disagreed with the test set (benchmarks/recipe.py)
        verdict["caveat"] = UNFAIR_SLICE
    return merit(mine)[:1] >= merit(best)[:1], verdict


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
        check_output_path(output, [model, *(teachers or []), data, val], force)
    member = load_member(model)
    if output is not None:
        check_output_path(output, [member], force)
    full = member.tensors.materialize(member.model)
    options = _train_options(training) or _train_options({"epochs": 3})
    train_set = load_data(data, full)
    val_set = load_data(val, full) if val is not None else None
    if options.distill and teachers and output is not None:    # the teachers' external data may not be overwritten
        read = set()
        for t in teachers:
            read_model(t, read)
        check_output_path(output, sorted(read), force)
    teacher = (lambda d: _teacher_logits(teachers, d, threads=options.threads)) if options.distill and teachers \
        else None
    result = run_finetune(full, train_set, options, val_set, teacher, progress)
    report = FusionReport("finetune", [member.name], training={"options": result.options, "history": result.history})
    if val_set is not None:
        report.accuracy = {"before": scores(Runner(full, threads=options.threads)(val_set), val_set.y),
                           "after": scores(Runner(result.model, threads=options.threads)(val_set), val_set.y)}
    return _written(Fusion(*TensorTable.detach(result.model)), report, output, force, start, reference=model)


def evaluate(models, data, ensemble: bool = False, provider: str = "cpu", threads: int = 1) -> list[dict]:
    """Accuracy and loss of each model on data (.npz or arrays; regression: MSE and MAE), and of their ensemble
    (mean of outputs)."""
    from .data import load_data
    from .runtime import evaluate as run_evaluate
    models = _sources(models)
    return run_evaluate(models, load_data(data, read_model(models[0])), ensemble, provider, threads)


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
    try:
        return {"on": on, **output_deviation(wide, sources, feeds)}
    except Exception as exc:        # random inputs of a guessed shape (symbolic image sizes, ...) may not fit
        return {"on": None, "note": f"not measured on {on} ({type(exc).__name__}); pass --data"}
