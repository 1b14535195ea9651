"""Real architectures as torch.onnx exports them: ResNet, MobileNetV3-like, SqueezeNet-like, transformer encoder.

torchvision does not install beside the CPU torch build here, so the definitions are written out in the
torchvision style, small enough to export and train in seconds on 8x8 digit images.
"""
import math

import numpy as np
import onnx
import pytest

import onnxfuse
from graphs import mean_of, run
from test_exporters import export

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow       # trains and exports every architecture with both exporters
nn = torch.nn
from sklearn.datasets import load_digits  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeezed):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        gate = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class InvertedResidual(nn.Module):
    def __init__(self, cin, expanded, cout, stride):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(cin, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.Hardswish(),
            nn.Conv2d(expanded, expanded, 3, stride, 1, groups=expanded, bias=False), nn.BatchNorm2d(expanded),
            nn.Hardswish(), SqueezeExcitation(expanded, 4),
            nn.Conv2d(expanded, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV3Like(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish(),
            InvertedResidual(8, 16, 8, 1), InvertedResidual(8, 24, 12, 2),
            nn.Conv2d(12, 32, 1, bias=False), nn.BatchNorm2d(32), nn.Hardswish())
        self.classifier = nn.Sequential(nn.Linear(32, 24), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(24, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1, self.expand3 = nn.Conv2d(squeeze, expand, 1), nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1(s)), torch.relu(self.expand3(s))], 1)


class SqueezeNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      Fire(8, 4, 8), Fire(16, 4, 8))
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Conv2d(16, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        for m in self.modules():       # positive biases: the ReLU before the pooled classifier starts alive
            if isinstance(m, nn.Conv2d):
                nn.init.constant_(m.bias, 0.1)

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class EncoderLayer(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, t, self.heads, self.dh).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.dh), dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.ff(self.ln2(x))


class TransformerClassifier(nn.Module):
    """Rows of the 8x8 digit as 8 tokens of 8 features."""
    def __init__(self, d=16, heads=4, ff=32, layers=2):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(8, d) * 0.1)
        self.layers = nn.Sequential(*(EncoderLayer(d, heads, ff) for _ in range(layers)))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x):
        h = self.layers(self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos)
        return self.head(self.norm(h).mean(dim=1))


NETS = {"resnet": ResNet, "mobilenetv3": MobileNetV3Like, "squeezenet": SqueezeNetLike,
        "transformer": TransformerClassifier}
EXACT = {"resnet": True, "mobilenetv3": True, "squeezenet": False, "transformer": False}


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32).reshape(-1, 1, 8, 8)
    return x[:1200], y[:1200], x[1200:], y[1200:]


def train_member(name, seed, digits):
    torch.manual_seed(seed)
    net = NETS[name]()
    x, y = torch.from_numpy(digits[0]), torch.from_numpy(digits[1])
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    epochs, batch = (10, 32) if name == "squeezenet" else (3, 64)     # SqueezeNet's ReLU head learns slowly
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("architectures")
    files = {}
    for name in NETS:
        nets = [train_member(name, seed, digits) for seed in range(2)]
        for dynamo in (False, True):
            files[name, dynamo] = [export(net, (1, 8, 8), root / f"{name}_{dynamo}_{i}.onnx", dynamo)
                                   for i, net in enumerate(nets)]
    return files


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", NETS)
def test_concat_is_exact_where_reported(exported, digits, name, dynamo, tmp_path):
    paths = exported[name, dynamo]
    fusion = onnxfuse.fuse(paths, "concat", output=tmp_path / "wide.onnx")
    onnx.checker.check_model(str(tmp_path / "wide.onnx"), full_check=True)
    assert fusion.summary["exact"] is EXACT[name], fusion.summary["outputs"]
    x = digits[2][:64]
    deviation = np.abs(run(fusion.model, x) - mean_of([onnx.load(p) for p in paths], x)).max()
    if EXACT[name]:
        assert deviation <= 1e-4
    else:
        assert "deviation" in fusion.summary and fusion.summary["deviation"]["max_abs"] > 0


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", NETS)
def test_merge_contract(exported, digits, name, dynamo, tmp_path):
    paths = exported[name, dynamo]
    out = tmp_path / "fused.onnx"
    onnxfuse.merge(paths, output=out)
    onnx.checker.check_model(str(out), full_check=True)
    fused, ref = onnx.load(out), onnx.load(paths[0])
    assert [list(t.dims) for t in fused.graph.initializer] == [list(t.dims) for t in ref.graph.initializer]
    assert fused.graph.input == ref.graph.input and fused.graph.output == ref.graph.output
    assert np.isfinite(run(fused, digits[2][:8])).all()


def test_groups_of_real_architectures(exported):
    def groups(name):
        return onnxfuse.inspect(exported[name, False][0])["groups"]
    resnet = groups("resnet")
    # stem + block 1's second conv form one residual group; the downsampling block's conv2 and 1x1 shortcut
    # open the 16-wide one, which block 3's conv2 joins
    residual = sorted((g["width"], len(g["layers"])) for g in resnet if g["prunable"] and len(g["layers"]) > 1)
    assert residual == [(8, 2), (16, 3)]
    heads = [g for g in groups("transformer") if g["prunable"] and g["width"] == 4]
    assert len(heads) == 2 and all(len(g["layers"]) == 3 for g in heads)   # q, k, v of each layer, per head
    mobile = groups("mobilenetv3")
    assert any(g["width"] == 4 and g["prunable"] for g in mobile)         # the SE squeeze width


@pytest.mark.parametrize("name", NETS)
def test_finetuning_improves_the_merged_model(exported, digits, name, tmp_path):
    train, val = tmp_path / "train.npz", tmp_path / "val.npz"
    np.savez(train, x=digits[0], y=digits[1])
    np.savez(val, x=digits[2], y=digits[3])
    fusion = onnxfuse.fuse(exported[name, True], "nt", data=train, val=val, training={"epochs": 2})
    acc = fusion.summary["accuracy"]
    assert acc["result after fine-tuning"]["accuracy"] > acc["result before fine-tuning"]["accuracy"]
    assert acc["result after fine-tuning"]["loss"] < acc["result before fine-tuning"]["loss"]


@pytest.mark.parametrize("name", NETS)
def test_prune_keeps_half_of_every_group(exported, digits, name):
    path = exported[name, False][0]
    fusion = onnxfuse.fuse([path], "prune", keep=0.5)
    onnx.checker.check_model(fusion.model, full_check=True)
    assert all(g["kept"] == -(-g["width"] // 2) or g["kept"] == g["width"] // 2 for g in fusion.summary["groups"])
    assert fusion.summary["parameters"]["output"] < fusion.summary["parameters"]["member"]
    assert np.isfinite(run(fusion.model, digits[2][:8])).all()
    if name == "transformer":      # whole heads go: 2 of 4 per layer remain
        assert sorted(g["kept"] for g in fusion.summary["groups"] if g["width"] == 4) == [2, 2]
