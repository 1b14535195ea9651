"""BatchNorm re-estimation (for soups): the statistics onnxfuse measures with onnxruntime are the ones torch
computes in training mode over the same data, BN after BN."""
import io

import numpy as np
import onnx
import pytest
import torch

from onnxfuse.batchnorm import batchnorm_depths, reestimate
from onnxfuse.model_io import TensorTable
from graphs import run


def net():
    torch.manual_seed(0)
    layers = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    for m in layers:
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):    # statistics that fit no data
            m.running_mean.uniform_(-3, 3)
            m.running_var.uniform_(0.1, 5)
    return layers.eval()


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_reestimated_statistics_are_torchs_training_mode_statistics(dynamo):
    layers = net()
    x = np.random.default_rng(0).normal(size=(300, 1, 8, 8)).astype(np.float32)
    buffer = io.BytesIO()
    options = {"dynamo": True, "optimize": False} if dynamo else {"dynamo": False, "do_constant_folding": False,
                                                 "training": torch.onnx.TrainingMode.PRESERVE}
    torch.onnx.export(layers, (torch.from_numpy(x[:2]),), buffer, input_names=["x"],
                      dynamic_axes=None if dynamo else {"x": {0: "n"}},
                      dynamic_shapes=({0: torch.export.Dim("n")},) if dynamo else None, **options)
    model = onnx.load_from_string(buffer.getvalue())
    graph, tensors = TensorTable.detach(model)
    assert [len(v) for v in batchnorm_depths(graph.graph, tensors).values()] == [1, 1, 1]
    report = reestimate(graph, tensors, {"x": x}, batch_size=64)
    assert report == {"batchnorm_nodes": 3, "passes": 3, "samples": 300}

    for m in layers:         # torch: one training-mode batch of all the data, cumulative statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():      # training mode normalizes with the batch's population variance, as onnxfuse does
        expected = layers.train()(torch.from_numpy(x)).numpy()
    layers.eval()
    bns = [n for n in graph.graph.node if n.op_type == "BatchNormalization"]
    torch_bns = [m for m in layers if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for node, m, n in zip(bns, torch_bns, (300 * 36, 300 * 16, 300)):
        np.testing.assert_allclose(tensors.array(node.input[3]), m.running_mean.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(tensors.array(node.input[4]), m.running_var.numpy() * (n - 1) / n,
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(tensors.materialize(graph), x), expected, rtol=1e-3, atol=1e-4)
