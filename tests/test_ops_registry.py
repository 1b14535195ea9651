"""The op registry (onnxfuse.ops): one spec per op, consistent between the analysis and the torch bridge; adding
a pass-through op is one spec."""
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxfuse
from graphs import gemm_mlp, random_input, run
from onnxfuse import ops
from onnxfuse.graph_index import GraphIndex
from onnxfuse.groups import analyze
from onnxfuse.ops.elementwise import unary


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for the test to add to; the real one is left as it was."""
    monkeypatch.setattr(ops, "REGISTRY", dict(ops.REGISTRY))
    return ops.REGISTRY


def test_every_op_has_a_torch_forward_or_says_it_is_not_trainable():
    for op_type, spec in ops.REGISTRY.items():
        assert spec.op_type == op_type
        assert spec.forward is not None or not spec.trainable, op_type


def test_ops_the_analysis_accepts_are_the_ones_with_rules():
    ruled = {op for op, spec in ops.REGISTRY.items() if spec.rule is not None}
    assert {"Gemm", "Conv", "MatMul", "Relu", "Add", "Reshape", "Concat", "Slice", "Softmax"} <= ruled
    not_trainable = sorted(op for op in ruled if ops.REGISTRY[op].forward is None)
    assert "Hardmax" in not_trainable and "Relu" not in not_trainable


def test_registering_an_op_twice_raises(registry):
    with pytest.raises(ValueError, match="registered twice"):
        ops.register(unary("Relu", "relu"))


def test_an_op_without_a_forward_must_say_it_is_not_trainable(registry):
    with pytest.raises(ValueError, match="trainable=False"):
        ops.register(unary("Atan"))
    ops.register(unary("Atan", trainable=False))
    model = gemm_mlp(0, act="Atan")
    missing = ops.untrainable_ops(GraphIndex(model), [model.graph.output[0].name])
    assert len(missing) == 2 and all(m.startswith("Atan (node '") for m in missing)


def test_attribute_defaults_come_from_the_schema_of_the_models_opset():
    def softmax(opset):
        node = helper.make_node("Softmax", ["x"], ["y"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        return GraphIndex(model).attr(node, "axis")
    assert softmax(11) == 1 and softmax(13) == -1
    index = GraphIndex(gemm_mlp(0))
    gemm = index.nodes[0]
    assert index.attr(gemm, "transB") == 1 and index.attrs(gemm)["alpha"] == 1.0


def test_graph_index_lookups():
    model = gemm_mlp(0)
    index = GraphIndex(model)
    first, second = index.nodes[0], index.nodes[1]
    assert index.producer[first.output[0]] is first and index.consumers[first.output[0]] == [second]
    assert index.index(second) == 1 and index.uses(first.output[0]) == 1
    assert index.needed_nodes([first.output[0]]) == [first]


def test_merge_with_data_refuses_an_untrainable_op_before_fusing(monkeypatch, tmp_path):
    members = [gemm_mlp(s, act="Shrink") for s in range(2)]      # Shrink: a channel rule, no torch forward
    x = random_input(members[0], batch=32)
    data = tmp_path / "train.npz"
    np.savez(data, x=x, y=np.arange(32) % 3)
    assert not analyze(members[0]).problems

    def build(*args, **kwargs):
        raise AssertionError("fused before the refusal")
    monkeypatch.setattr(onnxfuse.api, "_build", build)
    with pytest.raises(onnxfuse.UnsupportedGraphError, match=r"cannot fine-tune: .*op Shrink \(node '"):
        onnxfuse.merge(members, data=str(data), epochs=1)
    paths = [tmp_path / f"m{i}.onnx" for i in range(2)]
    for model, path in zip(members, paths):
        onnx.save(model, path)
    out = tmp_path / "out.onnx"
    result = subprocess.run([sys.executable, "-m", "onnxfuse", "merge", *map(str, paths), "-o", str(out), "--data",
                             str(data), "--epochs", "1"], capture_output=True, text=True)
    assert result.returncode == 2 and "Shrink" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_new_pass_through_op_is_one_spec(registry, tmp_path):
    """Atan is unknown to onnxfuse: with one spec it is analysed, fused exactly, bridged and fine-tuned."""
    pytest.importorskip("torch")
    from onnxfuse.torch_bridge import OnnxModule
    import torch
    members = [gemm_mlp(s, act="Atan") for s in range(2)]
    assert analyze(members[0]).problems                     # no rule yet: the group is blocked
    ops.register(unary("Atan", "atan"))
    assert not analyze(members[0]).problems
    x = random_input(members[0], batch=32)
    wide = onnxfuse.concat(members)
    np.testing.assert_allclose(run(wide, x), np.mean([run(m, x) for m in members], axis=0), atol=1e-5)
    with torch.no_grad():
        bridged = OnnxModule(wide).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bridged, run(wide, x), atol=1e-5)
    data = tmp_path / "train.npz"
    np.savez(data, x=x, y=np.arange(32) % 3)
    tuned = onnxfuse.merge(members, data=str(data), epochs=1, lr=0.01)
    onnx.checker.check_model(tuned)
    assert run(tuned, x).shape == (32, 3)


@pytest.mark.parametrize("op", ["Conv", "MaxPool", "AveragePool"])
@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_bridge_pads_convolutions_and_pools_as_onnxruntime(op, auto_pad):
    """The bridge pads with the Layout's conv_pads (the reconstruction's), auto_pad included."""
    torch = pytest.importorskip("torch")
    from onnx import numpy_helper
    from onnxfuse.torch_bridge import OnnxModule
    w = np.random.default_rng(0).normal(size=[4, 3, 3, 3]).astype(np.float32)
    inputs, attrs = (["x", "w"], {}) if op == "Conv" else (["x"], {"kernel_shape": [3, 3]})
    node = helper.make_node(op, inputs, ["y"], strides=[2, 2], auto_pad=auto_pad, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 7, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")] if op == "Conv" else [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.random.default_rng(1).normal(size=[2, 3, 7, 7]).astype(np.float32)
    with torch.no_grad():
        got = OnnxModule(model).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run(model, x), rtol=1e-5, atol=1e-5)


RESIZES = [({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, "scales"),
           ({"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, "scales"),
           ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, "sizes"),
           ({"mode": "cubic", "coordinate_transformation_mode": "half_pixel"}, "scales")]


@pytest.mark.parametrize("attrs,by", RESIZES, ids=[f"{a['mode']}-{a['coordinate_transformation_mode']}-{b}"
                                                  for a, b in RESIZES])
def test_resize_of_the_spatial_axes_fuses_exactly_and_bridges_as_onnxruntime(attrs, by):
    """conv -> Resize x2 (HRNet's upsampling) -> conv -> global pool: the channels pass through the Resize;
    by sizes, the channel element of the sizes is rewritten with the wide width."""
    torch = pytest.importorskip("torch")
    from onnx import numpy_helper
    from onnxfuse.torch_bridge import OnnxModule

    def member(seed):
        rng = np.random.default_rng(seed)
        inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
                 for n, s in (("w1", (4, 3, 3, 3)), ("w2", (2, 4, 3, 3)))]
        inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales") if by == "scales" else
                     numpy_helper.from_array(np.array([2, 4, 10, 10], np.int64), "sizes"))
        resize_in = ["c1", "", "scales"] if by == "scales" else ["c1", "", "", "sizes"]
        nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"]), helper.make_node("Resize", resize_in, ["r"], **attrs),
                 helper.make_node("Conv", ["r", "w2"], ["c2"]), helper.make_node("GlobalAveragePool", ["c2"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 7, 7])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 1, 1])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    members = [member(s) for s in (0, 1)]
    x = np.random.default_rng(2).normal(size=[2, 3, 7, 7]).astype(np.float32)
    wide = onnxfuse.api.fuse(members, "concat")
    assert wide.summary["exact"]
    np.testing.assert_allclose(run(wide.model, x), np.mean([run(m, x) for m in members], axis=0), atol=1e-5)
    with torch.no_grad():
        got = OnnxModule(wide.model).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run(wide.model, x), rtol=1e-4, atol=1e-5)
    assert run(onnxfuse.prune(members[0], 0.5), x).shape == (2, 2, 1, 1)
