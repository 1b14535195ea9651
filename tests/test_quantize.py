"""Edge export: int8 (static QDQ / dynamic) and fp16 versions, checked against the float model in onnxruntime."""
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxfuse
from onnxfuse.cli import main
from graphs import SAMPLES, Builder, run

CNN, MLP = str(SAMPLES / "digits_cnn_0.onnx"), str(SAMPLES / "digits_mlp_0.onnx")
DATA = {CNN: "digits_images", MLP: "digits"}


def val(model):
    data = np.load(SAMPLES / f"{DATA[model]}_val.npz")
    return data["x"], data["y"]


def accuracy(model, x, y):
    return float((run(model, x).argmax(1) == y).mean())


def int8_weight_bytes(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8)


def test_static_int8_of_a_cnn_keeps_its_accuracy_and_stores_int8_weights():
    q = onnxfuse.quantize(CNN, calibrate=str(SAMPLES / "digits_images_train.npz"))
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    float_model = onnx.load(CNN)
    conv_weights = sum(int(np.prod(t.dims)) for t in float_model.graph.initializer if len(t.dims) == 4)
    assert int8_weight_bytes(q) >= conv_weights            # every conv filter is stored in int8
    x, y = val(CNN)
    assert abs(accuracy(q, x, y) - accuracy(float_model, x, y)) <= 0.02
    meta = {p.key: p.value for p in q.metadata_props}
    assert '"mode": "int8"' in meta["onnxfuse.quantization"]
    inits = {t.name: t for t in q.graph.initializer}
    zero_points = {inits[n.input[2]].data_type for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_points == {onnx.TensorProto.UINT8}                   # activations: the fast x86 path (U8S8)
    s8 = onnxfuse.quantize(CNN, calibrate=str(SAMPLES / "digits_images_train.npz"), activations="int8")
    inits = {t.name: t for t in s8.graph.initializer}
    assert {inits[n.input[2]].data_type for n in s8.graph.node if n.op_type == "QuantizeLinear"} == \
        {onnx.TensorProto.INT8}


def test_dynamic_int8_for_a_matmul_only_graph_and_refused_for_convolutions(tmp_path):
    q = onnxfuse.quantize(MLP)
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in q.graph.node)
    x, y = val(MLP)
    assert abs(accuracy(q, x, y) - accuracy(onnx.load(MLP), x, y)) <= 0.02
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["quantize", CNN, "-o", str(out)])
    assert result.exit_code == 2 and "needs calibration inputs (--calibrate" in result.output
    assert not out.exists()


def test_fp16_keeps_float32_io_and_the_outputs():
    q = onnxfuse.quantize(CNN, mode="fp16")
    assert q.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert q.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in q.graph.initializer)
    x, _ = val(CNN)
    np.testing.assert_allclose(run(q, x), run(onnx.load(CNN), x), atol=0.05)


def test_excluded_node_stays_float():
    last = [n for n in onnx.load(MLP).graph.node if n.op_type in ("Gemm", "MatMul")][-1].name
    q = onnxfuse.quantize(MLP, calibrate=str(SAMPLES / "digits_train.npz"), exclude=[last])
    node = next(n for n in q.graph.node if n.name == last)
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    inits = {t.name: t for t in q.graph.initializer}
    weight = node.input[1]
    assert producers.get(weight) != "DequantizeLinear" and inits[weight].data_type == onnx.TensorProto.FLOAT
    assert any(n.op_type == "DequantizeLinear" for n in q.graph.node)   # the other layers are quantized


def test_merge_writes_the_int8_fused_model_and_scores_it(tmp_path):
    out = tmp_path / "fused.int8.onnx"
    cnns = [str(SAMPLES / f"digits_cnn_{i}.onnx") for i in range(2)]
    fusion = onnxfuse.fuse(cnns, output=out, data=str(SAMPLES / "digits_images_train.npz"),
                           val=str(SAMPLES / "digits_images_val.npz"), training={"epochs": 1}, quantize="int8")
    acc = fusion.summary["accuracy"]
    assert abs(acc["result in int8"]["accuracy"] - acc["result after fine-tuning"]["accuracy"]) <= 0.02
    written = onnx.load(out)
    assert any(n.op_type == "QuantizeLinear" for n in written.graph.node)
    x, y = val(CNN)
    assert accuracy(written, x, y) == pytest.approx(acc["result in int8"]["accuracy"])
    rows = onnxfuse.evaluate([str(out), cnns[0]], str(SAMPLES / "digits_images_val.npz"))
    assert rows[0]["accuracy"] == pytest.approx(acc["result in int8"]["accuracy"])


def test_clear_refusals(tmp_path):
    runner = CliRunner()
    q = tmp_path / "q.onnx"
    assert runner.invoke(main, ["quantize", MLP, "-o", str(q)]).exit_code == 0
    again = runner.invoke(main, ["quantize", str(q), "-o", str(tmp_path / "qq.onnx")])
    assert again.exit_code == 2 and "quantized model" in again.output
    missing = runner.invoke(main, ["quantize", MLP, "-o", str(tmp_path / "e.onnx"), "--exclude", "nope"])
    assert missing.exit_code == 2 and "no node named 'nope'" in missing.output
    b = Builder(0)                                     # no Conv/MatMul/Gemm: nothing onnxruntime quantizes
    path = tmp_path / "relu.onnx"
    onnx.save(b.model(["batch", 4], b.op("Relu", [b.op("Add", ["x", b.weight([4])])]), ["batch", 4]), path)
    nothing = runner.invoke(main, ["quantize", str(path), "-o", str(tmp_path / "n.onnx")])
    assert nothing.exit_code == 2 and "nothing to quantize" in nothing.output
    wrong = runner.invoke(main, ["quantize", CNN, "-o", str(tmp_path / "w.onnx"), "--calibrate",
                                 str(SAMPLES / "digits_train.npz")])
    assert wrong.exit_code == 2 and "graph input 'x' expects" in wrong.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "relu.onnx"]


def test_edge_export_drops_the_exporters_per_node_debug_records():
    """The digits CNN comes from the new exporter, which records a namespace, class hierarchy and FX node per
    node: onnxruntime never reads them, and they were most of the int8 file."""
    assert any(n.metadata_props for n in onnx.load(CNN, load_external_data=False).graph.node)
    fusion = onnxfuse.api.quantize_with_report(CNN, calibrate=str(SAMPLES / "digits_images_train.npz"))
    assert not any(n.metadata_props or n.doc_string for n in fusion.model.graph.node)
    assert fusion.summary["quantization"]["debug_metadata_removed_bytes"] > 5000
