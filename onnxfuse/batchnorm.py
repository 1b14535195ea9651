"""BatchNorm statistics re-estimated on data, for weight averages.

The mean of K models' running statistics is not the statistics of their averaged weights: the averaged model's
activations have their own mean and variance (model soups and sparse model soups re-estimate them after
averaging). `reestimate` measures them with onnxruntime, BN by BN in dependency order: BatchNormalization nodes
at one depth (the number of BNs on the longest path to their input) are measured in one pass, with every
shallower BN already re-estimated.
"""
from __future__ import annotations

import numpy as np
import onnx

from .data import batches, pick_samples
from .model_io import TensorTable
from .sessions import session

DEFAULT_SAMPLES = 2048


def batchnorm_depths(graph: onnx.GraphProto, tensors: TensorTable) -> dict[int, list[onnx.NodeProto]]:
    """The inference-mode BatchNormalization nodes whose statistics are tensors, by depth."""
    depth: dict[str, int] = {}
    stages: dict[int, list[onnx.NodeProto]] = {}
    for node in graph.node:               # a valid graph lists its nodes in topological order
        d = max((depth.get(i, 0) for i in node.input if i), default=0)
        is_bn = node.op_type == "BatchNormalization" and len(node.output) == 1 and \
            all(name in tensors for name in node.input[3:5])
        if is_bn:
            stages.setdefault(depth.get(node.input[0], 0), []).append(node)
        for out in node.output:
            depth[out] = d + 1 if is_bn else d
    return dict(sorted(stages.items()))


def reestimate(graph: onnx.ModelProto, tensors: TensorTable, inputs: dict[str, np.ndarray],
               samples: int = DEFAULT_SAMPLES, batch_size: int = 256) -> dict:
    """Replace, in `tensors`, the running mean and variance of every BatchNormalization of `graph` by the mean
    and (population) variance of its input over `samples` of `inputs` (per channel: axis 1). Returns a report."""
    feeds = pick_samples(inputs, samples)
    stages = batchnorm_depths(graph.graph, tensors)
    for nodes in stages.values():
        values = [n.input[0] for n in nodes]
        sess = session(tensors.materialize(graph), threads=1, extra_outputs=values)
        sums = {v: 0.0 for v in values}
        squares = {v: 0.0 for v in values}
        count = {v: 0 for v in values}
        for batch in batches(feeds, batch_size):
            for v, x in zip(values, sess.run(values, batch)):
                x = np.moveaxis(x.astype(np.float64), 1, 0).reshape(x.shape[1], -1)
                sums[v] = sums[v] + x.sum(axis=1)
                squares[v] = squares[v] + (x * x).sum(axis=1)
                count[v] += x.shape[1]
        for node, v in zip(nodes, values):
            mean = sums[v] / count[v]
            tensors.set(node.input[3], mean)
            tensors.set(node.input[4], np.maximum(squares[v] / count[v] - mean * mean, 0.0))
    return {"batchnorm_nodes": sum(len(n) for n in stages.values()), "passes": len(stages),
            "samples": len(next(iter(feeds.values())))}
