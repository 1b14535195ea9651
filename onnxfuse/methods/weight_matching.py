"""Weight matching (Git Re-Basin, Ainsworth et al. 2023): align every member to member 0, then average.

For each prunable group, member k's permutation P maximizes sum <W_0, P W_k Q^T> over every tensor axis the
group touches, the tensor's other widened axes (Q) being permuted by the current permutations of their groups.
Each group is one linear assignment problem; coordinate descent visits the groups in a seeded random order
until a whole pass changes nothing. A residual stream is one group, so it gets one permutation.
"""
from __future__ import annotations

import numpy as np

from .permute import Perms, channel_rows, identity, permute, touches_by_group


def permutations(a, load, n: int, seed: int = 0, max_passes: int = 100) -> list[Perms]:
    widened = a.widened_touches()
    by_group = touches_by_group(a, widened)
    return [identity(a)] + [_match(a, load, k, widened, by_group, np.random.default_rng(seed), max_passes)
                            for k in range(1, n)]


def _match(a, load, k: int, widened, by_group, rng, max_passes: int) -> Perms:
    from scipy.optimize import linear_sum_assignment
    perm = identity(a)
    roots = [r for r in sorted(perm) if by_group.get(r)]
    for _ in range(max_passes):
        changed = False
        for root in rng.permutation(roots).tolist():
            sim = np.zeros((len(perm[root]),) * 2)
            for tensor, axis in by_group[root]:
                axes = widened[tensor]
                mine = channel_rows(a, axes[axis], root, load(tensor, 0))
                theirs = channel_rows(a, axes[axis], root, permute(load(tensor, k), axes, a, perm, skip=axis))
                sim += mine @ theirs.T
            rows, cols = linear_sum_assignment(sim, maximize=True)
            old, new = sim[rows, perm[root]].sum(), sim[rows, cols].sum()
            if new > old + 1e-12 * max(1.0, abs(old)):
                perm[root], changed = cols, True
        if not changed:
            break
    return perm
