"""Models as torch.onnx writes them, with the legacy exporter and the new default one."""
import warnings

import numpy as np
import onnx
import pytest

import onnxfuse
from graphs import mean_of, run

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow       # both torch exporters, 24 exports
nn = torch.nn


def mlp():
    return nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 16), nn.Hardswish(),
                         nn.Linear(16, 4))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 2 * 2, 10), nn.ELU(),
                         nn.Linear(10, 5))


def cnn1d():
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.Tanh(), nn.MaxPool1d(2),
                         nn.Flatten(), nn.Linear(4 * 5, 3))


class Gated(nn.Module):
    """torch.chunk of a layer's channels (a gated linear unit): the new exporter writes a Split with
    num_outputs, the legacy one two Slices whose bounds it computes from the tensor's Shape."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 16), nn.Linear(8, 4)

    def forward(self, x):
        u, v = self.a(x).chunk(2, dim=-1)
        return self.b(u * torch.sigmoid(v))


NETS = {"mlp": (mlp, (12,)), "cnn": (cnn, (3, 8, 8)), "cnn1d": (cnn1d, (2, 10)), "gated": (Gated, (12,))}


def export(net, shape, path, dynamo):
    x = torch.randn(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        else:
            torch.onnx.export(net, x, str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    return str(path)


def trained_like(factory, seed):
    torch.manual_seed(seed)
    net = factory()
    for m in net.modules():      # non-trivial BatchNorm statistics, as after training
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    files = {}
    for name, (factory, shape) in NETS.items():
        for dynamo in (False, True):
            files[name, dynamo] = [export(trained_like(factory, s), shape, root / f"{name}_{dynamo}_{s}.onnx",
                                          dynamo) for s in range(3)]
    return files


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", NETS)
def test_concat_exact_on_torch_exports(exported, name, dynamo, tmp_path):
    paths = exported[name, dynamo]
    fusion = onnxfuse.fuse(paths, "concat", output=tmp_path / "wide.onnx")
    assert fusion.summary["exact"]
    onnx.checker.check_model(str(tmp_path / "wide.onnx"), full_check=True)
    x = np.random.default_rng(0).normal(size=(9, *NETS[name][1])).astype(np.float32)
    np.testing.assert_allclose(run(fusion.model, x), mean_of([onnx.load(p) for p in paths], x), atol=1e-4)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", NETS)
def test_merge_on_torch_exports(exported, name, dynamo, tmp_path):
    paths = exported[name, dynamo]
    out = tmp_path / "fused.onnx"
    onnxfuse.merge(paths, output=out)
    onnx.checker.check_model(str(out), full_check=True)
    fused, ref = onnx.load(out), onnx.load(paths[0])
    assert [list(t.dims) for t in fused.graph.initializer] == [list(t.dims) for t in ref.graph.initializer]
    assert fused.graph.input == ref.graph.input and fused.graph.output == ref.graph.output
    x = np.random.default_rng(0).normal(size=(4, *NETS[name][1])).astype(np.float32)
    assert np.isfinite(run(fused, x)).all()


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_chunked_channels_fuse_and_train(exported, dynamo, tmp_path):
    """torch.chunk: the fused model runs, and the torch bridge (fine-tuning) computes what onnxruntime does."""
    from onnxfuse.torch_bridge import OnnxModule
    fused = onnxfuse.merge(exported["gated", dynamo][:2])
    x = np.random.default_rng(1).normal(size=(6, 12)).astype(np.float32)
    with torch.no_grad():
        bridged = OnnxModule(fused).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bridged, run(fused, x), atol=1e-5)


def test_legacy_export_keeps_batchnorm_in_its_groups(exported):
    report = onnxfuse.inspect(exported["cnn", False][:2])
    assert report["compatible"] and report["fusable"] and report["exact"]
    assert sum(g["prunable"] for g in report["groups"]) == 3       # conv1, conv2, hidden dense
