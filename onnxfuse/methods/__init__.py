"""Fusion baselines that keep the original width: average the members' weights, after aligning their
channels (weight matching, OT fusion) or not (vanilla averaging). Each method only decides a permutation of
every prunable channel group per member, over the same analysis as Neuron Transplantation; `permute.averaged`
applies them and takes the mean.
"""
from __future__ import annotations

import numpy as np

from . import average, ot, weight_matching
from .permute import averaged

METHODS = {"average": average.permutations, "weight-matching": weight_matching.permutations,
           "ot": ot.permutations}
LABELS = {"average": "weight averaging (no alignment)",
          "weight-matching": "weight matching (Git Re-Basin) and averaging",
          "ot": "optimal-transport fusion (Singh & Jaggi) and averaging"}


def fuse_aligned(method: str, members, load, a):
    """(graph, tensors, moved): the averaged model, and per group how many channels of each member were moved."""
    perms = METHODS[method](a, load, len(members))
    graph, tensors = averaged(members, load, a, perms)
    moved = {root: [int(np.sum(p[root] != np.arange(len(p[root])))) for p in perms] for root in perms[0]}
    return graph, tensors, moved
