"""scikit-learn classifiers converted by skl2onnx: MatMul+Add layers, Softmax, ArgMax and ai.onnx.ml ops."""
import warnings

import numpy as np
import onnx
import pytest

import onnxfuse
from graphs import run, session

skl2onnx = pytest.importorskip("skl2onnx")
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return (x / 16).astype(np.float32), y


def convert(seed, digits, zipmap):
    x, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier((24, 16), max_iter=40, random_state=seed).fit(x[:1200], y[:1200])
        return skl2onnx.to_onnx(clf, x[:1], options={id(clf): {"zipmap": zipmap}}, target_opset=17)


@pytest.mark.parametrize("zipmap", [False, True])
def test_skl2onnx_classifiers_fuse(digits, zipmap, tmp_path):
    members = [convert(seed, digits, zipmap) for seed in range(2)]
    out = tmp_path / "fused.onnx"
    onnxfuse.merge(members, output=out)
    onnx.checker.check_model(str(out), full_check=True)
    fused = onnx.load(out)
    assert fused.graph.output == members[0].graph.output
    x, _ = digits
    labels = session(fused).run(None, {"X": x[1200:]})[0]
    assert labels.shape == (len(x) - 1200,)


def test_skl2onnx_wide_model_averages_logits(digits):
    """The wide model's probabilities are softmax(mean of logits): reported as not exact, and checked."""
    members = [convert(seed, digits, False) for seed in range(3)]
    fusion = onnxfuse.fuse(members, "concat")
    assert fusion.summary["exact"] is False
    assert all("not exact" in v for v in fusion.summary["outputs"].values())
    x = digits[0][1200:]
    probs = [run(m, x, output=1) for m in members]
    logits = [np.log(p) for p in probs]           # softmax is shift invariant: log p = logits + const
    mean_logits = np.mean(logits, axis=0)
    expected = np.exp(mean_logits) / np.exp(mean_logits).sum(1, keepdims=True)
    np.testing.assert_allclose(run(fusion.model, x, output=1), expected, atol=1e-4)
    labels = run(fusion.model, x, output=0)
    np.testing.assert_array_equal(labels, expected.argmax(1))
