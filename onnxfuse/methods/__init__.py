"""Fusion methods, one registry (`METHODS`) that onnxfuse.fuse and the CLI read: validation, build, the
provenance label, the CLI's choices, help and verb.

Built in: Neuron Transplantation and the methods that share its assembly (`nt`, `concat`, `prune`: nt.py), and
baselines that keep the original width by averaging the members' weights, after aligning their channels
(`weight-matching`, `ot`) or not (`average`). An alignment method only decides a permutation of every prunable
channel group per member; `permute.aligned` turns that into a method's build. Adding a method is one module
here that calls `register`, imported below.
"""
from .base import METHODS, Assembly, FusionMethod, Job, merge_methods, register
from . import nt, average, weight_matching, ot  # noqa: F401,E402  (they register themselves, in this order)

__all__ = ["METHODS", "Assembly", "FusionMethod", "Job", "merge_methods", "register"]
