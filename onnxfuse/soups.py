"""Model soups: the weight average of models that share one graph.

Models fine-tuned from one starting point (the transplanted model, with different seeds and batch orders)
share their connectivity, so their weights can be averaged tensor by tensor (sparse model soups, Zimmer et
al., ICLR 2024; model soups, Wortsman et al., 2022). Unlike the fusion methods this needs no channel-group
analysis: any graph works, as long as every model has it (matched by structure, as members are).

- uniform: the mean of every float tensor of all models;
- greedy: the models in order of held-out score, each added to the soup only if the soup's held-out score
  does not drop (Wortsman et al.'s greedy soup).
Integer tensors (shape constants, indices) must be equal in every model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import IncompatibleMembersError, InputError
from .model_io import FLOAT_TYPES, Member, TensorTable, check_compatible
from .transplant import MemberTensors

MODES = ("uniform", "greedy")


def average(members: list[Member], picked: list[int] | None = None, coefficients: list[float] | None = None,
            load: MemberTensors | None = None) -> tuple[onnx.ModelProto, TensorTable]:
    """Member 0's graph with every float tensor the mean of the picked members' tensors (or their combination
    with `coefficients`, one per picked member: a point on the path between models). Computed in float64, and
    tensors equal in every picked member are kept bit for bit. Raises IncompatibleMembersError, naming the
    first difference, when the models do not share one graph. `load`: the members' matched tensors, when the
    caller has matched them already."""
    picked = list(range(len(members))) if picked is None else picked
    coefficients = [1 / len(picked)] * len(picked) if coefficients is None else coefficients
    load = load or MemberTensors(members, check_compatible(members))
    model = onnx.ModelProto()
    model.CopyFrom(members[0].model)
    tensors = TensorTable(model.graph, dict(members[0].tensors.arrays))
    for name in members[0].tensors.names():
        if members[0].tensors.dtype(name) in FLOAT_TYPES:
            arrays = [load(name, m) for m in picked]
            if all(np.array_equal(arrays[0], a) for a in arrays[1:]):
                value = arrays[0]
            else:
                value = sum(c * a.astype(np.float64) for c, a in zip(coefficients, arrays))
            if not np.array_equal(value, load(name, 0)):
                tensors.set(name, value)
        else:
            for m in range(1, len(members)):
                if not np.array_equal(load(name, 0), load(name, m)):
                    raise IncompatibleMembersError(
                        f"non-float tensor '{name}' differs between {members[0].name} and {members[m].name}: "
                        f"the models do not share one graph")
    return model, tensors


@dataclass
class Soup:
    graph: onnx.ModelProto
    tensors: TensorTable
    report: dict


def make_soup(members: list[Member], mode: str = "uniform", score=None) -> Soup:
    """The soup of `members`. `score(model) -> float` (higher is better, on held-out data) is required for
    greedy and, when given, reports every ingredient's score and the soup's."""
    if mode not in MODES:
        raise InputError(f"unknown soup mode '{mode}' (choose {' or '.join(MODES)})")
    if len(members) < 2:
        raise InputError(f"a soup needs at least 2 models, got {len(members)}")
    if mode == "greedy" and score is None:
        raise InputError("a greedy soup needs held-out data to rank its ingredients (--val)")
    load = MemberTensors(members, check_compatible(members))      # matched once, for every average below
    report: dict = {"mode": mode, "ingredients": [m.name for m in members]}
    if score is None:
        graph, tensors = average(members, load=load)
        report["kept"] = list(range(len(members)))
        return Soup(graph, tensors, report)
    scores = [score(m.tensors.materialize(m.model)) for m in members]
    report["ingredient_scores"] = scores
    if mode == "uniform":
        kept = list(range(len(members)))
        graph, tensors = average(members, load=load)
        best = score(tensors.materialize(graph))
    else:
        order = sorted(range(len(members)), key=lambda i: -scores[i])
        kept, best = [order[0]], scores[order[0]]
        for i in order[1:]:
            graph, tensors = average(members, kept + [i], load=load)
            value = score(tensors.materialize(graph))
            if value >= best:
                kept, best = kept + [i], value
        graph, tensors = average(members, sorted(kept), load=load)
    report.update(kept=sorted(kept), soup_score=best)
    return Soup(graph, tensors, report)
