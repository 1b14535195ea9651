"""The torch bridge (oracle: onnxruntime) and the fine-tuning stage."""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxfuse
from graphs import SAMPLES, cli, cnn, gemm_mlp, random_input, run
from test_tiny_graphs import ARCHITECTURES

torch = pytest.importorskip("torch")
from onnxfuse.torch_bridge import OnnxModule  # noqa: E402

MLP = [str(SAMPLES / f"digits_mlp_{i}.onnx") for i in range(3)]
CNN = [str(SAMPLES / f"digits_cnn_{i}.onnx") for i in range(3)]
DATA = {"mlp": (SAMPLES / "digits_train.npz", SAMPLES / "digits_val.npz"),
        "cnn": (SAMPLES / "digits_images_train.npz", SAMPLES / "digits_images_val.npz")}


def torch_forward(model, x):
    module = OnnxModule(model).eval()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bridge_matches_onnxruntime_on_tiny_graphs(arch):
    for model in (ARCHITECTURES[arch](0), onnxfuse.merge([ARCHITECTURES[arch](s) for s in range(2)])):
        x = random_input(model, batch=6)
        np.testing.assert_allclose(torch_forward(model, x), run(model, x), atol=1e-4)


@pytest.mark.parametrize("path", MLP + CNN)
def test_bridge_matches_onnxruntime_on_samples(path):
    model = onnx.load(path)
    x = np.load(DATA["cnn" if "cnn" in path else "mlp"][1])["x"]
    np.testing.assert_allclose(torch_forward(model, x), run(model, x), atol=1e-4)


def test_parameters_are_named_after_initializers():
    model = onnx.load(MLP[0])
    module = OnnxModule(model)
    assert sorted(module.onnx_names.values()) == sorted(t.name for t in model.graph.initializer)
    assert all(p.requires_grad for p in module.params.values())


def test_batchnorm_statistics_follow_train_mode_and_are_written_back():
    model = cnn(0)
    module = OnnxModule(model)
    x = torch.from_numpy(random_input(model, batch=16) * 3 + 1)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    before = module.tensor(bn.input[3]).clone()
    module.eval()
    module(x)
    assert torch.equal(module.tensor(bn.input[3]), before)        # eval: statistics untouched
    module.train()
    module(x)
    after = module.tensor(bn.input[3]).clone()
    assert not torch.allclose(after, before)                       # train: running mean moved
    written = module.write_back()
    value = numpy_helper.to_array(next(t for t in written.graph.initializer if t.name == bn.input[3]))
    np.testing.assert_allclose(value, after.numpy(), rtol=1e-6)
    x_np = random_input(model)
    np.testing.assert_allclose(run(written, x_np), torch_forward(written, x_np), atol=1e-4)


def test_dropout_is_active_in_training_only():
    from graphs import Builder
    b = Builder(0)
    h = b.op("Gemm", ["x", b.weight((32, 4)), b.weight((32,))], transB=1)
    h = b.op("Dropout", [h, b.const(np.array(0.5, dtype=np.float32))])
    model = b.model(["batch", 4], b.op("Gemm", [h, b.weight((2, 32)), b.weight((2,))], transB=1), ["batch", 2])
    module = OnnxModule(model)
    x = torch.randn(8, 4)
    module.train()
    assert not torch.allclose(module(x), module(x))
    module.eval()
    assert torch.allclose(module(x), module(x))
    np.testing.assert_allclose(torch_forward(model, x.numpy()), run(model, x.numpy()), atol=1e-5)


def test_write_back_changes_only_initializer_values(tmp_path):
    out = tmp_path / "tuned.onnx"
    # no held-out slice: the last epoch is written (with one, an epoch that does not help is not kept)
    tuned = onnxfuse.finetune(CNN[0], DATA["cnn"][0], output=out, epochs=1, holdout=0, lr=0.05)
    ref = onnx.load(CNN[0])
    assert [n for n in tuned.graph.node] == [n for n in ref.graph.node]
    assert tuned.graph.input == ref.graph.input and tuned.graph.output == ref.graph.output
    assert tuned.opset_import == ref.opset_import and tuned.metadata_props == ref.metadata_props
    assert [(t.name, t.dims) for t in tuned.graph.initializer] == [(t.name, t.dims) for t in ref.graph.initializer]
    assert any(a.raw_data != b.raw_data for a, b in zip(tuned.graph.initializer, ref.graph.initializer))
    x = np.load(DATA["cnn"][1])["x"]
    np.testing.assert_allclose(run(onnx.load(out), x), torch_forward(tuned, x), atol=1e-4)


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_merge_with_finetuning_recovers_accuracy(family):
    paths = MLP[:2] if family == "mlp" else CNN[:2]
    fusion = onnxfuse.fuse(paths, "nt", data=DATA[family][0], val=DATA[family][1], training={"epochs": 5})
    acc = fusion.summary["accuracy"]
    assert acc["result after fine-tuning"]["accuracy"] > acc["result before fine-tuning"]["accuracy"] + 0.05
    assert acc["result after fine-tuning"]["accuracy"] > 0.9
    x, y = (np.load(DATA[family][1])[k] for k in ("x", "y"))
    assert (run(fusion.model, x).argmax(1) == y).mean() == pytest.approx(acc["result after fine-tuning"]["accuracy"])


def test_distillation_needs_no_labels(tmp_path):
    train = np.load(DATA["mlp"][0])
    unlabeled = tmp_path / "unlabeled.npz"
    np.savez(unlabeled, x=train["x"])
    fusion = onnxfuse.fuse(MLP[:2], "nt", data=unlabeled, val=DATA["mlp"][1], training={"epochs": 3, "distill": True})
    acc = fusion.summary["accuracy"]
    assert acc["result after fine-tuning"]["accuracy"] > acc["result before fine-tuning"]["accuracy"]
    with pytest.raises(onnxfuse.OnnxFuseError, match="no labels"):
        onnxfuse.fuse(MLP[:2], "nt", data=unlabeled, training={"epochs": 1})


def test_bias_norm_trains_only_biases():
    tuned = onnxfuse.finetune(MLP[0], DATA["mlp"][0], epochs=1, train_only="bias-norm")
    ref = {t.name: numpy_helper.to_array(t) for t in onnx.load(MLP[0]).graph.initializer}
    for t in tuned.graph.initializer:
        changed = not np.array_equal(numpy_helper.to_array(t), ref[t.name])
        assert changed == t.name.endswith("bias"), t.name


def test_fine_tuning_is_deterministic():
    a = onnxfuse.merge(CNN[:2], data=DATA["cnn"][0], epochs=1, seed=3)
    b = onnxfuse.merge(CNN[:2], data=DATA["cnn"][0], epochs=1, seed=3)
    assert a.SerializeToString() == b.SerializeToString()


def test_skl2onnx_classifier_is_trained_on_its_logits():
    pytest.importorskip("skl2onnx")
    from test_skl2onnx import convert
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    digits = ((x / 16).astype(np.float32), y)
    members = [convert(seed, digits, False) for seed in range(2)]
    from onnxfuse.runtime import logits_output
    softmax_input = next(n for n in members[0].graph.node if n.op_type == "Softmax").input[0]
    assert logits_output(members[0]) == softmax_input


# --------------------------------------------------------------------------- CLI and bad input

def test_eval_command_table_and_json():
    text = cli("eval", *CNN[:2], "--data", DATA["cnn"][1], "--ensemble")
    assert text.returncode == 0 and "ensemble of 2" in text.stdout
    rows = json.loads(cli("eval", *MLP, "--data", DATA["mlp"][1], "--ensemble", "--json").stdout)
    assert len(rows) == 4 and all(0.8 < r["accuracy"] <= 1 for r in rows)


def test_merge_cli_with_finetuning(tmp_path):
    result = cli("merge", *MLP[:2], "-o", tmp_path / "f.onnx", "--data", DATA["mlp"][0], "--val", DATA["mlp"][1],
                 "--epochs", "2", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [h["epoch"] for h in summary["training"]["history"]] == [0, 1, 2]


@pytest.mark.parametrize("case,says", [
    ("wrong_shape", "has shape [10, 63], graph input 'x' expects ['batch', 64]"),
    ("wrong_dtype", "has dtype int64, graph input 'x' expects float32"),
    ("labels_out_of_range", "labels range over [3, 12] but the model has 10 outputs"),
    ("empty", "empty"),
    ("nan", "diverged"),
])
def test_bad_training_input(tmp_path, case, says):
    x = np.load(DATA["mlp"][0])["x"][:10]
    y = np.arange(10) % 10
    data = tmp_path / "data.npz"
    lr = []
    if case == "wrong_shape":
        np.savez(data, x=x[:, :63], y=y)
    elif case == "wrong_dtype":
        np.savez(data, x=(x * 16).astype(np.int64), y=y)
    elif case == "labels_out_of_range":
        np.savez(data, x=x, y=y + 3)
    elif case == "empty":
        np.savez(data, x=x[:0], y=y[:0])
    else:
        np.savez(data, x=x * 1e6, y=y)
        lr = ["--lr", "1e6"]
    out = tmp_path / "out.onnx"
    result = cli("merge", *MLP[:2], "-o", out, "--data", data, *lr)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_bridge_names_a_missing_op():
    model = gemm_mlp(0)
    model.graph.node[1].op_type = "Mystery"
    model.graph.node[1].domain = "custom.domain"
    with pytest.raises(onnxfuse.UnsupportedGraphError, match="no implementation of op Mystery"):
        OnnxModule(model)


@pytest.mark.parametrize("starts,ends,steps", [([-1], [-2**63], [-1]), ([5], [1], [-2]), ([2**62], [0], [-1]),
                                               ([1], [7], [2]), ([-3], [-9], [-3])])
def test_bridge_slice_with_any_step_equals_onnxruntime(starts, ends, steps):
    """Negative steps (torch.roll and flips as exporters write them, e.g. Swin's shifted windows)."""
    import torch
    from onnx import TensorProto, helper, numpy_helper
    from onnxfuse.torch_bridge import OnnxModule
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for v, n in ((starts, "s"), (ends, "e"), ([1], "a"),
                                                                             (steps, "t"))]
    graph = helper.make_graph([helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    got = OnnxModule(model).eval()(torch.from_numpy(x))
    got = got[0] if isinstance(got, (list, tuple)) else got
    np.testing.assert_array_equal(got.numpy(), run(model, x))
