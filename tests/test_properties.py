"""Property-based tests over random MLP and CNN graphs (hypothesis): the core contracts hold for any shape."""
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxfuse
from graphs import Builder, mean_of, random_input, run

ACTIVATIONS = ["Relu", "Tanh", "Sigmoid", "LeakyRelu", "Elu", "HardSwish", "Softplus"]


@st.composite
def mlps(draw):
    widths = [draw(st.integers(2, 6))] + draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)) + \
        [draw(st.integers(1, 4))]
    return {"kind": "mlp", "widths": widths, "act": draw(st.sampled_from(ACTIVATIONS)),
            "bias": draw(st.booleans()), "trans_b": draw(st.sampled_from([0, 1]))}


@st.composite
def cnns(draw):
    dims = draw(st.sampled_from([1, 2]))
    blocks = draw(st.lists(st.tuples(st.integers(1, 5), st.sampled_from([1, 3]), st.sampled_from([1, 2])),
                           min_size=1, max_size=2))
    return {"kind": "cnn", "dims": dims, "blocks": blocks, "in_channels": draw(st.integers(1, 3)),
            "bn": draw(st.booleans()), "bias": draw(st.booleans()), "act": draw(st.sampled_from(ACTIVATIONS)),
            "size": draw(st.sampled_from([4, 6])), "hidden": draw(st.integers(1, 6)), "classes": draw(st.integers(1, 4))}


def build(spec, seed):
    b = Builder(seed)
    if spec["kind"] == "mlp":
        h, w = "x", spec["widths"]
        for i, (fan_in, fan_out) in enumerate(zip(w, w[1:])):
            weight = b.weight((fan_out, fan_in) if spec["trans_b"] else (fan_in, fan_out))
            inputs = [h, weight] + ([b.weight((fan_out,), 0.1)] if spec["bias"] else [])
            h = b.op("Gemm", inputs, transB=spec["trans_b"])
            if i < len(w) - 2:
                h = b.op(spec["act"], [h])
        return b.model(["batch", w[0]], h, ["batch", w[-1]])
    dims, size, channels = spec["dims"], spec["size"], spec["in_channels"]
    h = "x"
    for c_out, kernel, stride in spec["blocks"]:
        pad = kernel // 2
        inputs = [h, b.weight((c_out, channels) + (kernel,) * dims)] + ([b.weight((c_out,), 0.1)] if spec["bias"] else [])
        h = b.op("Conv", inputs, pads=[pad] * 2 * dims, strides=[stride] * dims)
        size = (size + 2 * pad - kernel) // stride + 1
        if spec["bn"]:
            h = b.op("BatchNormalization", [h, b.weight((c_out,), positive=True), b.weight((c_out,), 0.1),
                                            b.weight((c_out,), 0.1), b.weight((c_out,), positive=True)])
        h = b.op(spec["act"], [h])
        channels = c_out
    h = b.op("Flatten", [h], axis=1)
    features = channels * size ** dims
    h = b.op("Relu", [b.op("Gemm", [h, b.weight((spec["hidden"], features)), b.weight((spec["hidden"],))], transB=1)])
    h = b.op("Gemm", [h, b.weight((spec["classes"], spec["hidden"])), b.weight((spec["classes"],))], transB=1)
    return b.model(["batch", spec["in_channels"]] + [spec["size"]] * dims, h, ["batch", spec["classes"]])


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(spec=st.one_of(mlps(), cnns()), n=st.integers(1, 5))
def test_concat_is_the_mean_of_members(spec, n):
    members = [build(spec, seed) for seed in range(n)]
    wide = onnxfuse.concat(members)
    x = random_input(members[0], batch=3)
    np.testing.assert_allclose(run(wide, x), mean_of(members, x), atol=1e-4, rtol=0)


@SETTINGS
@given(spec=st.one_of(mlps(), cnns()), n=st.integers(2, 5))
def test_merge_keeps_every_shape_and_passes_the_checker(spec, n):
    members = [build(spec, seed) for seed in range(n)]
    fused = onnxfuse.merge(members)
    onnx.checker.check_model(fused, full_check=True)
    assert [list(t.dims) for t in fused.graph.initializer] == [list(t.dims) for t in members[0].graph.initializer]
    assert run(fused, random_input(members[0], batch=2)).shape[1] == run(members[0], random_input(members[0])).shape[1]


@SETTINGS
@given(spec=st.one_of(mlps(), cnns()), keep=st.sampled_from([0.1, 0.25, 0.5, 0.75, 1.0]))
def test_prune_keeps_exactly_the_requested_width(spec, keep):
    model = build(spec, 0)
    fusion = onnxfuse.fuse([model], "prune", keep=keep)
    for g in fusion.summary["groups"]:
        assert g["kept"] == max(1, int(keep * g["width"] + 0.5))
    onnx.checker.check_model(fusion.model, full_check=True)


@SETTINGS
@given(spec=st.one_of(mlps(), cnns()), n=st.integers(1, 3))
def test_torch_bridge_equals_onnxruntime(spec, n):
    torch = pytest.importorskip("torch")
    from onnxfuse.torch_bridge import OnnxModule
    model = onnxfuse.merge([build(spec, seed) for seed in range(n)]) if n > 1 else build(spec, 0)
    x = random_input(model, batch=4)
    with torch.no_grad():
        got = OnnxModule(model).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, run(model, x), atol=1e-4, rtol=1e-4)
