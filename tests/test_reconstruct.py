"""Layer-wise reconstruction (merge --calibrate): the fused model refitted to reproduce the wide model on
unlabeled calibration data, with onnxruntime as the oracle."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxfuse
from graphs import SAMPLES, cnn, conv_concat, conv_split, dense_slices, gemm_mlp, matmul_mlp, mean_of, \
    random_input, residual_mlp, run
from onnxfuse.ops.linear import conv_pads, im2col
from test_cli import expect_error, onnxfuse as cli

MLP = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(3)]
CNN = [str(SAMPLES / f"digits_cnn_{i}.onnx") for i in range(3)]
DATA = {"mlp": (MLP, SAMPLES / "digits_train.npz", SAMPLES / "digits_val.npz"),
        "cnn": (CNN, SAMPLES / "digits_images_train.npz", SAMPLES / "digits_images_val.npz")}


def accuracy(model, val) -> float:
    data = np.load(val)
    return float((run(model, data["x"]).argmax(1) == data["y"]).mean())


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("family", DATA)
def test_reconstruction_beats_plain_transplantation(family, n):
    members, train, val = DATA[family]
    plain = onnxfuse.fuse(members[:n], "nt").model
    fusion = onnxfuse.fuse(members[:n], "nt", calibrate=train)
    report = fusion.summary["reconstruction"]
    assert report["samples"] == len(np.load(train)["x"]) and report["layers"] and not report["skipped"]
    assert all(l["relative_error_after"] < l["relative_error_before"] for l in report["layers"])
    assert accuracy(fusion.model, val) > accuracy(plain, val) + 0.05
    # closer to the ensemble's logits on held-out data, too
    x = np.load(val)["x"]
    ensemble = mean_of([onnx.load(m) for m in members[:n]], x)
    assert np.abs(run(fusion.model, x) - ensemble).mean() < 0.5 * np.abs(run(plain, x) - ensemble).mean()
    onnx.checker.check_model(fusion.model, full_check=True)


@pytest.mark.parametrize("family", DATA)
def test_everything_kept_reproduces_the_wide_model(family):
    members, train, val = DATA[family]
    fusion = onnxfuse.fuse(members[:2], "nt", keep=1.0, calibrate=train)
    wide = onnxfuse.fuse(members[:2], "concat").model
    x = np.load(val)["x"]
    expected = run(wide, x)
    assert np.abs(run(fusion.model, x) - expected).max() <= 1e-4 * np.abs(expected).max()


TINY = {
    "gemm": gemm_mlp,
    "gemm_alpha_beta_no_transB": lambda s: gemm_mlp(s, trans_b=0, alpha=0.5, beta=2.0),
    "gemm_2d_bias_constant_nodes": lambda s: gemm_mlp(s, bias_shape="2d", constants_as_nodes=True),
    "matmul_add": matmul_mlp,
    "conv_bn": cnn,
    "conv1d": lambda s: cnn(s, dims=1),
    "conv3d": lambda s: cnn(s, dims=3, size=4),
    "conv_gap": lambda s: cnn(s, flatten="GlobalAveragePool"),
    "residual": residual_mlp,
    "conv_concat": conv_concat,
    "conv_split": conv_split,
    "dense_slices": dense_slices,
    "float64": lambda s: gemm_mlp(s, dtype=np.float64),
}


@pytest.mark.parametrize("name", TINY)
def test_tiny_graphs(name, tmp_path):
    """Every consumer of a pruned group is refitted: closer to the wide model than plain NT; exact when
    everything is kept (BatchNorm after a refitted conv, residual groups, Concat/Split/Slice included)."""
    members = [TINY[name](seed) for seed in range(2)]
    dtype = np.float64 if name == "float64" else np.float32
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=random_input(members[0], batch=400, seed=1, dtype=dtype))
    x = random_input(members[0], batch=200, seed=2, dtype=dtype)
    wide = mean_of(members, x)
    error = lambda m: np.abs(run(m, x) - wide).mean() / np.abs(wide).mean()
    plain = onnxfuse.fuse(members, "nt").model
    fusion = onnxfuse.fuse(members, "nt", calibrate=calib)
    assert error(fusion.model) < 0.8 * error(plain)
    full = onnxfuse.fuse(members, "nt", keep=1.0, calibrate=calib)
    assert error(full.model) < 1e-5
    assert len(full.summary["reconstruction"]["layers"]) >= 2


@pytest.mark.parametrize("dims,kernel,strides,dilations,auto_pad,pads", [
    (2, [3, 3], [1, 1], [1, 1], "NOTSET", [1, 1, 1, 1]),
    (2, [3, 2], [2, 1], [1, 2], "NOTSET", [0, 1, 2, 0]),
    (2, [3, 3], [2, 2], [1, 1], "SAME_UPPER", None),
    (2, [2, 2], [2, 3], [1, 1], "SAME_LOWER", None),
    (1, [3], [2], [2], "VALID", None),
    (3, [2, 3, 1], [1, 2, 1], [1, 1, 1], "NOTSET", [0, 1, 0, 1, 0, 0]),
])
def test_im2col_matches_onnxruntime_conv(dims, kernel, strides, dilations, auto_pad, pads):
    rng = np.random.default_rng(0)
    x = rng.normal(size=[2, 3] + [7] * dims).astype(np.float32)
    w = rng.normal(size=[4, 3] + kernel).astype(np.float32)
    attrs = {"strides": strides, "dilations": dilations, "auto_pad": auto_pad}
    if pads is not None:
        attrs["pads"] = pads
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    expected = run(model, x)
    rows = im2col(x, kernel, strides, conv_pads(attrs, x.shape[2:], kernel, strides, dilations), dilations)
    got = (rows @ w.reshape(4, -1).T).reshape([2, *expected.shape[2:], 4])
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), expected, rtol=1e-4, atol=1e-4)


def test_prune_with_calibration_recovers_the_original(tmp_path):
    members, train, val = DATA["cnn"]
    plain = onnxfuse.fuse([members[0]], "prune", keep=0.5).model
    fusion = onnxfuse.fuse([members[0]], "prune", keep=0.5, calibrate=train)
    x = np.load(val)["x"]
    original = run(onnx.load(members[0]), x)
    assert np.abs(run(fusion.model, x) - original).mean() < 0.5 * np.abs(run(plain, x) - original).mean()


def test_api_merge_samples_and_determinism(tmp_path):
    members, train, val = DATA["mlp"]
    a = onnxfuse.merge(members[:2], output=tmp_path / "a.onnx", calibrate=train, calib_samples=500)
    onnxfuse.merge(members[:2], output=tmp_path / "b.onnx", calibrate=train, calib_samples=500)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    options = json.loads({p.key: p.value for p in a.metadata_props}["onnxfuse.options"])
    assert options["calibrate"] == "digits_train.npz" and options["calib_samples"] == 500
    other = onnxfuse.merge(members[:2], calibrate=train, calib_samples=600)
    assert not np.array_equal(run(a, np.load(val)["x"]), run(other, np.load(val)["x"]))


def test_cli_calibrate_then_finetune(tmp_path):
    members, train, val = DATA["cnn"]
    out = tmp_path / "fused.onnx"
    result = cli("merge", *members[:2], "-o", out, "--calibrate", train, "--data", train, "--val", val,
                 "--epochs", "1", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [l["op"] for l in summary["reconstruction"]["layers"]] == ["Conv", "Gemm", "Gemm"]
    assert summary["training"]["options"]["epochs"] == 1
    assert summary["training"]["options"]["lr_choice"]["how"] == "auto"   # the plain default, after calibration too
    assert list(summary["phases"]) == ["load", "fuse", "reconstruct", "tune", "save"]
    assert sum(summary["phases"].values()) <= summary["seconds"] + 1e-3
    acc = summary["accuracy"]
    # "before fine-tuning" is the reconstructed model: already about as good as the best member
    best = max(acc[f"digits_cnn_{i}.onnx"]["accuracy"] for i in range(2))
    assert acc["result before fine-tuning"]["accuracy"] >= best - 0.02
    text = cli("merge", *members[:2], "-o", tmp_path / "again.onnx", "--calibrate", train).stdout
    assert "reconstructed 3 layers on 1257 calibration samples" in text


def test_lr_after_calibration_is_the_default_or_the_given_one():
    members, train, _ = DATA["mlp"]
    summary = onnxfuse.fuse(members[:2], "nt", data=train, calibrate=train, calib_samples=500,
                            training={"epochs": 1, "lr": 0.005}).summary
    assert summary["training"]["options"]["lr"] == 0.005
    adam = onnxfuse.fuse(members[:2], "nt", data=train, calibrate=train, calib_samples=500,
                         training={"epochs": 1, "optimizer": "adam"}).summary
    from onnxfuse.training import CANDIDATES
    assert adam["training"]["options"]["lr"] in CANDIDATES["adam"]
    assert adam["training"]["options"]["lr_choice"]["how"] == "auto"


def test_cli_errors(tmp_path):
    mlp, mlp_train, _ = DATA["mlp"]
    cnn_members, cnn_train, _ = DATA["cnn"]
    expect_error(tmp_path, "merge", *cnn_members[:2], "--calibrate", mlp_train, says="graph input 'x' expects")
    expect_error(tmp_path, "merge", *mlp[:2], "--calibrate", tmp_path / "missing.npz", says="no such data file")
    few = tmp_path / "few.npz"
    np.savez(few, x=np.load(mlp_train)["x"][:64])
    line = expect_error(tmp_path, "merge", *mlp[:2], "--calibrate", few, says="64 calibration samples are too few")
    assert "64 kept inputs" in line and "at least 65 samples" in line
    line = expect_error(tmp_path, "merge", *mlp[:2], "--calibrate", mlp_train, "--calib-samples", "10",
                        says="raise --calib-samples")
    few_images = tmp_path / "few_images.npz"
    np.savez(few_images, x=np.load(cnn_train)["x"][:4])
    line = expect_error(tmp_path, "merge", *cnn_members[:2], "--calibrate", few_images, says="too few")
    assert "8 kept input channels x 3x3 kernel" in line and "ceil(73/16) = 5 samples" in line
    expect_error(tmp_path, "merge", *mlp[:2], "--calibrate", mlp_train, "--method", "average",
                 says="--calibrate applies to neuron transplantation")
    nan = tmp_path / "nan.npz"
    x = np.load(mlp_train)["x"].copy()
    x[3, 5] = np.nan
    np.savez(nan, x=x)
    expect_error(tmp_path, "merge", *mlp[:2], "--calibrate", nan, says="NaN")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet", "mobilenetv3"])
def test_real_architectures(name, tmp_path):
    """ResNet (residual groups: each consumer refitted after the group's selection) and MobileNetV3-like
    (depthwise convolutions left as transplanted, squeeze-excitation gates) as the legacy exporter writes them."""
    pytest.importorskip("torch")
    from test_architectures import train_member
    from test_exporters import export
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32).reshape(-1, 1, 8, 8)
    digits = (x[:1200], y[:1200], x[1200:], y[1200:])
    paths = [export(train_member(name, seed, digits), (1, 8, 8), tmp_path / f"{seed}.onnx", False)
             for seed in range(2)]
    calib, val = tmp_path / "calib.npz", tmp_path / "val.npz"
    np.savez(calib, x=digits[0])
    np.savez(val, x=digits[2], y=digits[3])
    plain = onnxfuse.fuse(paths, "nt").model
    fusion = onnxfuse.fuse(paths, "nt", calibrate=calib)
    report = fusion.summary["reconstruction"]
    assert len({l["level"] for l in report["layers"]}) > 3
    if name == "mobilenetv3":
        assert any("depthwise" in why for why in report["skipped"])
    assert accuracy(fusion.model, val) > accuracy(plain, val) + 0.2
    wide = run(onnxfuse.fuse(paths, "concat").model, digits[2])
    full = run(onnxfuse.fuse(paths, "nt", keep=1.0, calibrate=calib).model, digits[2])
    assert np.abs(full - wide).max() <= 1e-4 * np.abs(wide).max()
