"""Vanilla averaging: the element-wise mean of every float tensor of the members, without alignment."""
from __future__ import annotations

from .base import FusionMethod, register
from .permute import Perms, aligned, identity


def permutations(a, load, n: int) -> list[Perms]:
    return [identity(a) for _ in range(n)]


register(FusionMethod(
    "average", label="weight averaging (no alignment)", verb="averaged",
    help="the members' weights averaged at the original width, without alignment",
    reference="vanilla weight averaging (model soups, Wortsman et al., ICML 2022)",
    build=aligned(permutations), keep=False))
