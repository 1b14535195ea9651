"""Neuron Transplantation and the methods that share its assembly: every method here keeps some channels of
the wide model (all members side by side) and `transplant` builds the result from the members' tensors."""
from __future__ import annotations

import numpy as np

from ..errors import OnnxFuseError
from ..select import select_kept
from ..transplant import transplant
from .base import Assembly, FusionMethod, Job, register


def transplanted(job: Job, kept: dict[int, np.ndarray]) -> Assembly:
    """The model of the kept wide channels of every prunable group, and how many each member gave."""
    graph, tensors = transplant(job.members, job.load, job.analysis, kept, release=job.release)
    groups = [{"id": g.id, "width": g.width, "kept": int(len(kept[g.id])),
               "kept_per_member": np.bincount(kept[g.id] // g.width, minlength=job.n).tolist(),
               "layers": g.layers} for g in job.groups]
    return Assembly(graph, tensors, kept, groups)


def selected(job: Job) -> dict[int, np.ndarray]:
    """The most important channels of every group (job.importance), or the caller's choice (job.kept)."""
    a = job.analysis
    scores = job.importance(a, job.load, job.n, a.widened_touches())
    if job.kept is not None:
        return job.kept(a, scores, job.n)
    return select_kept(a, scores, job.groups, job.n, job.keep)


def every_channel(job: Job) -> dict[int, np.ndarray]:
    return {g.id: np.arange(job.n * g.width) for g in job.groups}


class _OneModel(FusionMethod):
    def validate(self, n: int, keep, calibrate) -> None:
        if n != 1 or keep is None:
            raise OnnxFuseError(f"{self.name} takes one model and a --keep fraction")


register(FusionMethod(
    "nt", label="neuron-transplantation", verb="fused by neuron transplantation",
    help="Neuron Transplantation: the members side by side, the most important neurons of every layer kept",
    reference="Neuron Transplantation (ECML-PKDD 2024, arXiv 2502.06849)",
    build=lambda job: transplanted(job, selected(job)), calibrate=True, selects=True))
register(FusionMethod(
    "concat", label="concatenation (wide ensemble)", verb="concatenated (wide ensemble)",
    help="the wide model: every member's neurons kept, the mean of the members' outputs",
    reference="the ensemble as one graph (the starting point of Neuron Transplantation)",
    build=lambda job: transplanted(job, every_channel(job)), min_members=1, wide=True))
register(_OneModel(
    "prune", label="structured magnitude pruning", verb="pruned",
    help="structured pruning of one model: the most important neurons of every layer kept",
    reference="Torch-Pruning's MagnitudeImportance (Fang et al., CVPR 2023, DepGraph)",
    build=lambda job: transplanted(job, selected(job)), min_members=1, calibrate=True, selects=True))
