"""Neuron importance and top-k. Criteria are pluggable (`IMPORTANCE`, FuseOptions.importance): `magnitude`
is Torch-Pruning's MagnitudeImportance (p=2, mean over a group's terms)."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .errors import OnnxFuseError
from .groups import Analysis


def channel_scores(a: Analysis, load, n: int, widened: dict) -> dict[int, np.ndarray]:
    """Score of every channel of every widened group, in wide numbering (member m, channel c -> m*W + c).

    `load(tensor, m)` returns member m's tensor in the compute dtype. The wide model's block-diagonal
    weights are never built: cross-member blocks are zero and add nothing to a channel's score.
    """
    scores: dict[int, np.ndarray] = {}
    terms: dict[int, int] = {}
    for tensor, axes in widened.items():
        scale = tensor_scale(axes, n)
        for axis, touch in axes.items():
            if touch.role == "param":
                continue
            for m in range(n):
                per_index = sum_of_squares(load(tensor, m), axis) * scale ** 2
                offset = 0
                for seg in touch.segs:
                    root = a.find(seg.space)
                    width = a.space_width[root]
                    chunk = per_index[offset:offset + width * seg.inner].reshape(width, seg.inner).sum(axis=1)
                    scores.setdefault(root, np.zeros(n * width))[m * width:(m + 1) * width] += chunk
                    terms[root] = terms.get(root, 0) + (m == 0)
                    offset += width * seg.inner
    for conv in a.grouped:      # a grouped Conv's input slice of channel c: its block's rows, c's position
        root = a.find(conv.segs[0].space)
        if not a.is_widened(root):
            continue
        width, blocks = a.space_width[root], conv.groups
        for m in range(n):
            w = load(conv.tensor, m)
            per = sum_of_squares(w.reshape(w.shape[0] * w.shape[1], -1), 0).reshape(w.shape[:2])
            per = per.reshape(blocks, -1, per.shape[1]).sum(axis=1).reshape(-1)    # [out, in] -> block by block
            scores.setdefault(root, np.zeros(n * width))[m * width:(m + 1) * width] += per
        terms[root] = terms.get(root, 0) + 1
    return {root: s / terms[root] for root, s in scores.items()}


IMPORTANCE = {"magnitude": channel_scores}    # name -> (analysis, load, n, widened touches) -> channel scores


def importance(criterion):
    """The scoring function of `criterion`: a name in IMPORTANCE, or such a function itself."""
    if callable(criterion):
        return criterion
    if criterion not in IMPORTANCE:
        raise OnnxFuseError(f"unknown importance '{criterion}' ({', '.join(IMPORTANCE)})")
    return IMPORTANCE[criterion]


def select_kept(a: Analysis, scores: dict, groups, n: int, keep) -> dict[int, np.ndarray]:
    """The kept channels of every group: the top-k, or where a grouped Conv cuts the group into blocks, the
    same number of top channels in every block (k rounded to a multiple of the block count)."""
    blocks = a.blocks()
    kept = {}
    for g in groups:
        k = kept_count(g.width, n, keep)
        count, node = blocks.get(g.id, (1, None))
        if count == 1:
            kept[g.id] = top_k(scores[g.id], k)
            continue
        total = count * n
        per = max(1, int(Fraction(k, total) + Fraction(1, 2)))
        if keep is None and per * total != k:
            raise OnnxFuseError(f"grouped convolution '{node}' has {count} groups of {g.width // count} channels: "
                                f"{n} members cannot keep {k} channels evenly in its {total} groups; pass a --keep "
                                f"that keeps a multiple of {total}")
        size = g.width // count
        kept[g.id] = np.concatenate([b * size + top_k(scores[g.id][b * size:(b + 1) * size], per)
                                     for b in range(total)])
    return kept


def sum_of_squares(arr: np.ndarray, axis: int) -> np.ndarray:
    """Sum of squares over every axis but `axis`, without a squared temporary (einsum streams it)."""
    letters = "abcdefghijklmnop"[:arr.ndim]
    return np.einsum(f"{letters},{letters}->{letters[axis]}", arr, arr).astype(np.float64)


def tensor_scale(axes: dict, n: int) -> float:
    """A tensor that only consumes widened channels (the last layer) is divided by N: the wide output is then
    the mean of the members' outputs."""
    return 1.0 / n if {t.role for t in axes.values()} == {"in"} else 1.0


def kept_count(width: int, n: int, keep) -> int:
    """How many of a group's N*width channels to keep: the original width by default, else round(keep*N*W)."""
    if keep is None:
        return width
    if not isinstance(keep, (int, float, Fraction)) or not math.isfinite(keep) or not 0 < keep <= 1:
        raise OnnxFuseError(f"--keep must be a fraction in (0, 1], got {keep}")
    keep = Fraction(str(keep))
    return max(1, min(n * width, int(keep * n * width + Fraction(1, 2))))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, ascending (members stay in blocks); ties go to the lower index."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:k])
