"""How alike are the members? The regime decides which fusion method works.

- Fine-tunes of one checkpoint share their neurons' order and sit in one loss basin: the straight line between
  their weights has no loss barrier, so plain weight averaging (a model soup) works.
- Independently trained networks do not: neurons are permuted between them, the midpoint of the line is far
  worse than either end (a barrier), and averaging fails without alignment; Neuron Transplantation (or
  alignment first) is needed.
- Identical members: fusing them gives nothing (the NT paper's stated limit).

Measured per member against member 0: the share of float tensors that are identical (frozen layers), the
relative L2 distance of the weights, and, given data, the loss and accuracy along the linear path (alpha =
0, 0.25, 0.5, 0.75, 1) with its barrier: max over alpha of loss(alpha) - ((1 - alpha) loss(0) + alpha loss(1)).
"""
from __future__ import annotations

import numpy as np

from .model_io import FLOAT_TYPES, Member, check_compatible
from .transplant import MemberTensors

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
BARRIER = 0.1          # a barrier above this fraction of the ends' mean loss: different basins
DISTANCE = 0.5         # without data: a relative weight distance below this suggests one basin


def similarity(members: list[Member], data=None) -> dict:
    """The per-pair measurements and the regime, in one line (`regime`, `why`). `data`: a data.Dataset with
    labels, for the loss barrier (without it the regime is guessed from the weight distance)."""
    load = MemberTensors(members, check_compatible(members))
    floats = [n for n in members[0].tensors.names() if members[0].tensors.dtype(n) in FLOAT_TYPES]
    pairs = [_pair(members, load, floats, m, data) for m in range(1, len(members))]
    return {"pairs": pairs, **_regime(pairs, data is not None)}


def _pair(members, load, floats, m: int, data) -> dict:
    shared = [np.array_equal(load(n, 0), load(n, m)) for n in floats]
    sizes = [load(n, 0).size for n in floats]
    diff = norm = 0.0
    for n in floats:            # finite entries only: masks hold -inf, equal in every member
        a, b = load(n, 0).astype(np.float64), load(n, m).astype(np.float64)
        d = np.where(a == b, 0.0, a - b)
        diff += float(np.sum(np.where(np.isfinite(d), d, 0.0) ** 2))
        norm += float(np.sum(np.where(np.isfinite(a), a, 0.0) ** 2))
    pair = {"member": members[m].name, "shared_tensors": int(sum(shared)), "tensors": len(floats),
            "shared_weights": round(sum(s for s, k in zip(sizes, shared) if k) / max(sum(sizes), 1), 4),
            "relative_distance": round(float(np.sqrt(diff / max(norm, 1e-30))), 4)}
    if data is not None and not all(shared):
        pair["path"] = _path(members, load, m, data)
        ends = pair["path"]["loss"][0], pair["path"]["loss"][-1]
        pair["barrier"] = round(max(loss - ((1 - a) * ends[0] + a * ends[1])
                                    for a, loss in zip(ALPHAS, pair["path"]["loss"])), 4)
        pair["relative_barrier"] = round(pair["barrier"] / max(np.mean(ends), 1e-12), 4)
    return pair


def _path(members, load, m: int, data) -> dict:
    """Loss and accuracy of (1 - alpha) * member 0 + alpha * member m on `data`."""
    from .runtime import Runner, scores
    from .soups import average
    losses, accuracies = [], []
    for alpha in ALPHAS:
        graph, tensors = average(members, [0, m], [1 - alpha, alpha], load)
        s = scores(Runner(tensors.materialize(graph))(data), data.y)
        losses.append(round(s["loss"], 4))
        accuracies.append(round(s["accuracy"], 4))
    return {"alpha": list(ALPHAS), "loss": losses, "accuracy": accuracies}


def _regime(pairs: list[dict], measured: bool) -> dict:
    if all(p["shared_tensors"] == p["tensors"] for p in pairs):
        return {"regime": "identical", "why": "every member has member 0's weights: fusing them gives nothing"}
    if measured:
        worst = max(pairs, key=lambda p: p.get("relative_barrier", 0.0))
        barrier = worst.get("relative_barrier", 0.0)
        if barrier <= BARRIER:
            return {"regime": "one basin", "why": f"no loss barrier between the members (at most {barrier:.1%} of "
                                                  f"their loss along the straight line): fine-tunes of one "
                                                  f"checkpoint; weight averaging works"}
        return {"regime": "independent", "why": f"a loss barrier of {barrier:.0%} of the members' loss on the "
                                                f"straight line between member 0 and {worst['member']}: "
                                                f"independently trained; averaging fails without alignment"}
    far = max(p["relative_distance"] for p in pairs)
    if far < DISTANCE:
        return {"regime": "one basin", "why": f"weights within {far:.2f} of member 0's (relative L2; no data "
                                              f"to measure the loss barrier): likely fine-tunes of one checkpoint"}
    return {"regime": "independent", "why": f"weights {far:.2f} apart (relative L2; no data to measure the "
                                            f"loss barrier): likely independently trained"}
