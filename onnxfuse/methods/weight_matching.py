"""Weight matching (Git Re-Basin, Ainsworth et al. 2023): align every member to member 0, then average.

For each prunable group, member k's permutation P maximizes sum <W_0, P W_k Q^T> over every tensor axis the
group touches, the tensor's other widened axes (Q) being permuted by the current permutations of their groups.
Each group is one linear assignment problem on the cost summed over its tensors; coordinate descent visits the
groups in a seeded random order, at most `max_passes` times, until a whole pass changes nothing. A residual
stream is one group, so it gets one permutation.

Cost: member 0's channel rows are cut once (float32); a group is solved again only when a group its cost
depends on has moved since it was last solved (otherwise its assignment cannot change).
"""
from __future__ import annotations

import numpy as np

from .base import FusionMethod, register
from .permute import Perms, aligned, channel_rows, identity, permute, pinned, touches_by_group


def permutations(a, load, n: int, seed: int = 0, max_passes: int = 30) -> list[Perms]:
    widened = a.widened_touches()
    by_group = touches_by_group(a, widened)
    return [identity(a)] + [_match(a, load, k, widened, by_group, np.random.default_rng(seed), max_passes)
                            for k in range(1, n)]


def _rows(a, touch, root, arr) -> np.ndarray:
    return np.ascontiguousarray(channel_rows(a, touch, root, arr), dtype=np.float32)


def _match(a, load, k: int, widened, by_group, rng, max_passes: int) -> Perms:
    from scipy.optimize import linear_sum_assignment
    perm = identity(a)
    fixed = pinned(a)
    roots = [r for r in sorted(perm) if by_group.get(r) and r not in fixed]
    mine = {r: [_rows(a, widened[t][axis], r, load(t, 0)) for t, axis in by_group[r]] for r in roots}
    # the groups whose permutation a group's cost depends on: those of its tensors' other widened axes
    depends = {r: sorted({a.find(s.space) for t, axis in by_group[r] for other, touch in widened[t].items()
                          if other != axis for s in touch.segs} & set(perm)) for r in roots}
    static: dict[tuple, np.ndarray] = {}     # rows of a tensor with no other widened axis never change
    version = dict.fromkeys(perm, 0)
    solved: dict[int, tuple] = {}
    for _ in range(max_passes):
        changed = False
        for root in rng.permutation(roots).tolist():
            state = tuple(version[g] for g in depends[root])
            if solved.get(root) == state:
                continue
            sim = np.zeros((len(perm[root]),) * 2)
            for (tensor, axis), rows in zip(by_group[root], mine[root]):
                axes = widened[tensor]
                theirs = static.get((tensor, axis, root))
                if theirs is None:
                    theirs = _rows(a, axes[axis], root, permute(load(tensor, k), axes, a, perm, skip=axis))
                    if len(axes) == 1:
                        static[tensor, axis, root] = theirs
                sim += rows @ theirs.T
            rows_idx, cols = linear_sum_assignment(sim, maximize=True)
            old, new = sim[rows_idx, perm[root]].sum(), sim[rows_idx, cols].sum()
            if new > old + 1e-6 * abs(old):
                perm[root], changed = cols, True
                version[root] += 1
            solved[root] = tuple(version[g] for g in depends[root])
        if not changed:
            break
    return perm


register(FusionMethod(
    "weight-matching", label="weight matching (Git Re-Basin) and averaging", verb="averaged after weight matching",
    help="channels permuted to match member 0 first (Git Re-Basin), then averaged",
    reference="Git Re-Basin (Ainsworth et al., ICLR 2023), weight matching",
    build=aligned(permutations), keep=False))
