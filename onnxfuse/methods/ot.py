"""OT fusion (Singh & Jaggi, NeurIPS 2020): align every member to member 0 layer by layer, then average.

Groups are visited once, in graph order. A channel's feature vector is everything that produces it: its
rows of the producing layers' weights (input axes already aligned by the earlier groups' maps), its biases
and its normalization parameters (the reference code cannot use the last two). The transport map between
member 0's and member k's channels is the exact EMD (POT `ot.emd`) with uniform marginals on the Euclidean
distances of the features; for equal widths it is a permutation, and is used as one. A producer whose input
is not aligned yet (a residual stream fed back into itself) is left out of the features.
"""
from __future__ import annotations

import numpy as np

from .base import FusionMethod, register
from .permute import Perms, aligned, channel_rows, identity, permute, pinned, touches_by_group


def permutations(a, load, n: int) -> list[Perms]:
    widened = a.widened_touches()
    by_group = touches_by_group(a, widened)
    return [identity(a)] + [_transport(a, load, k, widened, by_group) for k in range(1, n)]


def graph_order(a, roots) -> list[int]:
    """Groups in the order in which their first producer appears in the graph (touches are recorded in order)."""
    order = dict.fromkeys(a.find(s.space) for t in a.touches if t.role == "out" for s in t.segs)
    return [r for r in order if r in roots] + [r for r in sorted(roots) if r not in order]


def _transport(a, load, k: int, widened, by_group) -> Perms:
    import ot as pot
    from scipy.optimize import linear_sum_assignment
    perm, done, fixed = identity(a), set(), pinned(a)
    for root in graph_order(a, perm):
        if root in fixed:
            done.add(root)
            continue
        mine, theirs = [], []
        for tensor, axis in by_group.get(root, []):
            axes = widened[tensor]
            inputs = {a.find(s.space) for other, t in axes.items() if other != axis for s in t.segs}
            if axes[axis].role == "in" or not inputs <= done:
                continue
            mine.append(channel_rows(a, axes[axis], root, load(tensor, 0)))
            theirs.append(channel_rows(a, axes[axis], root, permute(load(tensor, k), axes, a, perm, skip=axis)))
        done.add(root)
        if not mine:
            continue
        cost = pot.dist(np.hstack(mine), np.hstack(theirs), metric="euclidean")
        width = len(cost)
        # POT stops at 100000 simplex iterations by default, short of the optimum from width ~2048 on
        plan = pot.emd(np.full(width, 1 / width), np.full(width, 1 / width), cost, numItermax=10_000_000)
        cols = plan.argmax(axis=1)
        if len(set(cols.tolist())) != width:       # a degenerate plan: take the permutation closest to it
            cols = linear_sum_assignment(plan, maximize=True)[1]
        perm[root] = cols
    return perm


register(FusionMethod(
    "ot", label="optimal-transport fusion (Singh & Jaggi) and averaging", verb="averaged after OT alignment",
    help="channels aligned layer by layer by optimal transport (Singh & Jaggi), then averaged",
    reference="Model Fusion via Optimal Transport (Singh & Jaggi, NeurIPS 2020)",
    build=aligned(permutations), keep=False, imports=("ot",)))
