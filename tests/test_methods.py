"""The averaging baselines (merge --method average | weight-matching | ot) over the channel groups.

The oracle for the alignment methods: a copy of a model whose hidden channels are permuted consistently
computes the same function (checked with onnxruntime); aligning it back to the original and averaging must
return the original exactly.
"""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxfuse
from graphs import (SAMPLES, cli, cnn, conv_concat, conv_split, dense_slices, gemm_mlp, matmul_mlp, random_input,
                    residual_mlp, run)
from onnxfuse.groups import analyze
from onnxfuse.methods import METHODS as REGISTRY
from onnxfuse.methods.permute import permute

ALIGNING = ["weight-matching", "ot"]
METHODS = ["average", *ALIGNING]
# Weight matching is coordinate descent: on layers a few channels wide it can stop in a local optimum (2 of 20
# random 9-8 wide MLPs do), from 16 channels on it recovered every permutation tried.
GRAPHS = {
    "mlp": lambda: gemm_mlp(0, widths=(6, 16, 16, 3)),
    "matmul_mlp": lambda: matmul_mlp(1, widths=(6, 16, 16, 3)),
    "cnn_bn_flatten": lambda: cnn(2, channels=(2, 6, 7)),
    "cnn_reshape": lambda: cnn(3, channels=(2, 6, 7), flatten="Reshape"),
    "residual_mlp": lambda: residual_mlp(4, width=7),
    "conv_concat": lambda: conv_concat(5),
    "conv_split": lambda: conv_split(6),
    "dense_slices": lambda: dense_slices(7),
}


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def permuted_copy(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """`model` with every prunable group's channels shuffled by a random permutation (heads as units)."""
    a = analyze(model)
    rng = np.random.default_rng(seed)
    perms = {g.id: rng.permutation(g.width) for g in a.groups() if g.prunable}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name, axes in a.widened_touches().items():
        tensor = next(t for t in out.graph.initializer if t.name == name)
        tensor.CopyFrom(numpy_helper.from_array(permute(numpy_helper.to_array(tensor), axes, a, perms), name))
    return out


def hand_permuted_mlp(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """gemm_mlp (transB=1) with hidden neurons permuted by hand, independently of the analysis."""
    rng = np.random.default_rng(seed)
    w = weights(model)
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    for first, second in zip(gemms, gemms[1:]):
        p = rng.permutation(w[first.input[1]].shape[0])
        w[first.input[1]], w[first.input[2]] = w[first.input[1]][p], w[first.input[2]][p]
        w[second.input[1]] = w[second.input[1]][:, p]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(w[t.name], t.name))
    return out


def assert_same_function(a, b):
    x = random_input(a, batch=6)
    np.testing.assert_allclose(run(a, x), run(b, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_a_model_fused_with_itself_is_itself(method):
    model = cnn(0, channels=(2, 6, 7))
    fused = onnxfuse.merge([model, model, model], method=method)
    for name, value in weights(model).items():
        np.testing.assert_array_equal(weights(fused)[name], value)


def test_average_is_the_elementwise_mean():
    models = [gemm_mlp(seed) for seed in range(3)]
    fused = weights(onnxfuse.merge(models, method="average"))
    for name in fused:
        np.testing.assert_allclose(fused[name], np.mean([weights(m)[name] for m in models], axis=0), rtol=1e-6)


@pytest.mark.parametrize("method", ALIGNING)
@pytest.mark.parametrize("graph", GRAPHS)
def test_alignment_recovers_a_permuted_copy(method, graph):
    model = GRAPHS[graph]()
    shuffled = permuted_copy(model, seed=1)
    assert_same_function(model, shuffled)
    assert any(not np.array_equal(weights(shuffled)[k], v) for k, v in weights(model).items())
    fusion = onnxfuse.fuse([model, shuffled], method)
    assert any(sum(g["moved_per_member"]) for g in fusion.summary["groups"])
    for name, value in weights(model).items():
        np.testing.assert_allclose(weights(fusion.model)[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    assert_same_function(model, fusion.model)


@pytest.mark.parametrize("method", ALIGNING)
def test_alignment_recovers_hand_permuted_copies_for_n_3(method):
    model = gemm_mlp(0, widths=(6, 12, 10, 3))
    copies = [hand_permuted_mlp(model, seed) for seed in (1, 2)]
    for copy in copies:
        assert_same_function(model, copy)
    fused = onnxfuse.merge([model, *copies], method=method)
    for name, value in weights(model).items():
        np.testing.assert_allclose(weights(fused)[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ALIGNING)
def test_alignment_recovers_permuted_attention_heads(method, tmp_path):
    torch = pytest.importorskip("torch")
    from test_architectures import TransformerClassifier
    from test_exporters import export
    torch.manual_seed(0)
    model = onnx.load(export(TransformerClassifier().eval(), (1, 8, 8), tmp_path / "t.onnx", False))
    shuffled = permuted_copy(model, seed=3)
    assert_same_function(model, shuffled)
    fusion = onnxfuse.fuse([model, shuffled], method)
    heads = [g for g in fusion.summary["groups"] if g["width"] == 4]
    assert heads and any(g["moved_per_member"][1] for g in heads)
    for name, value in weights(model).items():
        np.testing.assert_allclose(weights(fusion.model)[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_samples_keep_member_shapes_and_pass_the_checker(method, family, tmp_path):
    paths = [str(SAMPLES / f"digits_{family}_{i}.onnx") for i in range(3)]
    out = tmp_path / "fused.onnx"
    fusion = onnxfuse.fuse(paths, method, output=out)
    onnx.checker.check_model(fusion.model, full_check=True)
    onnx.checker.check_model(str(out), full_check=True)
    ref = onnx.load(paths[0])
    fused = onnx.load(out)
    assert [(t.name, list(t.dims), t.data_type) for t in fused.graph.initializer] == \
        [(t.name, list(t.dims), t.data_type) for t in ref.graph.initializer]
    meta = {p.key: p.value for p in fused.metadata_props}
    assert meta["onnxfuse.method"] == REGISTRY[method].label
    x = np.load(SAMPLES / ("digits_val.npz" if family == "mlp" else "digits_images_val.npz"))["x"][:16]
    assert np.isfinite(run(fused, x)).all()


def test_keep_is_refused_for_averaging_methods():
    with pytest.raises(onnxfuse.OnnxFuseError, match="--keep"):
        onnxfuse.fuse([gemm_mlp(0), gemm_mlp(1)], "weight-matching", keep=0.5)


def test_aligned_model_can_be_finetuned(tmp_path):
    pytest.importorskip("torch")
    paths = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)]
    fusion = onnxfuse.fuse(paths, "weight-matching", data=SAMPLES / "digits_train.npz",
                           val=SAMPLES / "digits_val.npz", training={"epochs": 1}, output=tmp_path / "f.onnx")
    acc = fusion.summary["accuracy"]
    assert "result after fine-tuning" in acc and fusion.summary["training"]["options"]["epochs"] == 1
    onnx.checker.check_model(str(tmp_path / "f.onnx"), full_check=True)


def test_cli_merge_method(tmp_path):
    paths = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(2)]
    result = cli("merge", *paths, "-o", tmp_path / "out.onnx", "--method", "weight-matching")
    assert result.returncode == 0, result.stderr
    assert "weight matching" in result.stdout and "moved" in result.stdout
    meta = {p.key: p.value for p in onnx.load(tmp_path / "out.onnx").metadata_props}
    assert "Git Re-Basin" in meta["onnxfuse.method"]
    result = cli("merge", *paths, "-o", tmp_path / "o.onnx", "--method", "ot", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["method"] == "ot"
    helptext = cli("merge", "--help").stdout
    assert all(m in helptext for m in ["--method", "average", "weight-matching", "ot"])
