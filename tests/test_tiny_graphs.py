"""concat / merge / prune on tiny graphs built in the test, checked by running them in onnxruntime."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxfuse
from graphs import (cnn, conv_concat, conv_split, dense_chunks, dense_chunks_by_shape, dense_chunks_refined,
                    dense_slices, gemm_mlp, matmul_mlp, mean_of, random_input, residual_mlp, run, to_float32)

ARCHITECTURES = {
    "gemm_transB1": lambda s: gemm_mlp(s, trans_b=1),
    "gemm_transB0": lambda s: gemm_mlp(s, trans_b=0),
    "gemm_alpha_beta": lambda s: gemm_mlp(s, alpha=0.7, beta=1.3, bias_shape="2d"),
    "gemm_leakyrelu": lambda s: gemm_mlp(s, act="LeakyRelu"),
    "gemm_prelu": lambda s: gemm_mlp(s, act="PRelu"),
    "gemm_sigmoid_5layers": lambda s: gemm_mlp(s, widths=(5, 9, 4, 7, 6, 2), act="Sigmoid"),
    "gemm_constant_nodes": lambda s: gemm_mlp(s, constants_as_nodes=True),
    "matmul_add": lambda s: matmul_mlp(s),
    "conv1d_bn_flatten": lambda s: cnn(s, dims=1),
    "conv2d_bn_flatten": lambda s: cnn(s, dims=2),
    "conv2d_reshape_avgpool": lambda s: cnn(s, dims=2, flatten="Reshape", pool="AveragePool", bn=False),
    "conv2d_global_pool": lambda s: cnn(s, dims=2, flatten="GlobalAveragePool"),
    "conv3d": lambda s: cnn(s, dims=3, size=4, channels=(1, 3, 2)),
    "residual_add": residual_mlp,
    "channel_concat": conv_concat,
    "channel_split": conv_split,
    "channel_slices": dense_slices,
    "channel_chunks": dense_chunks,
    "channel_chunks_refined": dense_chunks_refined,
    "channel_chunks_by_shape": dense_chunks_by_shape,
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("n", [2, 3])
def test_concat_is_mean_of_members(arch, n):
    members = [ARCHITECTURES[arch](seed) for seed in range(n)]
    wide = onnxfuse.concat(members)
    onnx.checker.check_model(wide, full_check=True)
    for seed in range(2):
        x = random_input(members[0], batch=7, seed=seed)
        np.testing.assert_allclose(run(wide, x), mean_of(members, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merge_keeps_member_shapes_and_runs(arch):
    members = [ARCHITECTURES[arch](seed) for seed in range(2)]
    fused = onnxfuse.merge(members)
    onnx.checker.check_model(fused, full_check=True)
    assert [tuple(t.dims) for t in fused.graph.initializer] == \
        [tuple(t.dims) for t in members[0].graph.initializer]
    assert fused.graph.input == members[0].graph.input and fused.graph.output == members[0].graph.output
    y = run(fused, random_input(members[0]))
    assert np.isfinite(y).all()


@pytest.mark.parametrize("arch", ["gemm_transB1", "matmul_add", "conv2d_bn_flatten"])
def test_merge_equals_pruning_the_wide_model(arch):
    """NT computed per member (no block-diagonal weights) equals pruning the materialized wide model."""
    members = [ARCHITECTURES[arch](seed) for seed in range(3)]
    fused = onnxfuse.merge(members)
    pruned = onnxfuse.prune(onnxfuse.concat(members), keep=1 / 3)
    for a, b in zip(fused.graph.initializer, pruned.graph.initializer):
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), atol=1e-6)


def test_merge_keeps_the_highest_magnitude_neurons():
    members = [gemm_mlp(seed, widths=(4, 6, 3)) for seed in range(2)]
    # make member 1's hidden neurons 0 and 3 dominant, and member 0's neuron 5
    w1 = numpy_helper.to_array(members[1].graph.initializer[0]).copy()
    w1[[0, 3]] *= 100
    members[1].graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, members[1].graph.initializer[0].name))
    w0 = numpy_helper.to_array(members[0].graph.initializer[0]).copy()
    w0[5] *= 100
    members[0].graph.initializer[0].CopyFrom(numpy_helper.from_array(w0, members[0].graph.initializer[0].name))
    fusion = onnxfuse.fuse(members, "nt", keep=0.25)      # keep 3 of 12
    fused_w = numpy_helper.to_array(fusion.model.graph.initializer[0])
    np.testing.assert_array_equal(fused_w, np.concatenate([w0[[5]], w1[[0, 3]]]))
    assert fusion.summary["groups"][0]["kept_per_member"] == [1, 2]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7])
def test_default_width_is_exact_for_every_n(n):
    """The reference truncates int(W * (1 - (1 - 1/N))) and gets W-1 for N = 3, 5, 6, 7."""
    members = [gemm_mlp(seed, widths=(6, 10, 7, 3)) for seed in range(n)]
    fusion = onnxfuse.fuse(members, "nt")
    assert [g["kept"] for g in fusion.summary["groups"]] == [10, 7]
    assert [tuple(t.dims) for t in fusion.model.graph.initializer] == \
        [tuple(t.dims) for t in members[0].graph.initializer]


@pytest.mark.parametrize("keep,width", [(0.5, 5), (0.3, 3), (0.25, 3), (0.01, 1), (1.0, 10)])
def test_prune_keeps_exact_requested_width(keep, width):
    model = cnn(0, channels=(2, 10, 10), hidden=10)
    pruned = onnxfuse.prune(model, keep=keep)
    onnx.checker.check_model(pruned, full_check=True)
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert [s[0] for s in shapes.values() if len(s) == 4] == [width, width]      # conv filters
    y = run(pruned, random_input(model))
    assert y.shape == (5, 3)


def test_prune_with_keep_one_is_identity():
    model = cnn(1)
    x = random_input(model)
    np.testing.assert_allclose(run(onnxfuse.prune(model, keep=1.0), x), run(model, x), atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_dtypes_kept_and_computed_right(dtype):
    members = [gemm_mlp(seed, dtype=dtype) for seed in range(2)]
    wide, fused = onnxfuse.concat(members), onnxfuse.merge(members)
    for model in (wide, fused):
        assert {t.data_type for t in model.graph.initializer} == {members[0].graph.initializer[0].data_type}
    x = random_input(members[0], dtype=dtype)
    tol = 2e-2 if dtype == np.float16 else 1e-9
    np.testing.assert_allclose(run(wide, x), mean_of(members, x), atol=tol, rtol=0)


def test_bfloat16_members():
    """onnxruntime's CPU has no bfloat16 kernels: compare upcast copies, and check the dtype is kept."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    members = []
    for seed in range(2):
        m = gemm_mlp(seed)
        for t in m.graph.initializer:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(ml_dtypes.bfloat16), t.name))
        m.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.BFLOAT16
        m.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.BFLOAT16
        members.append(m)
    wide = onnxfuse.concat(members)
    assert {t.data_type for t in wide.graph.initializer} == {onnx.TensorProto.BFLOAT16}
    x = random_input(members[0])
    expected = mean_of([to_float32(m) for m in members], x)
    np.testing.assert_allclose(run(to_float32(wide), x), expected, atol=5e-2)
    onnx.checker.check_model(onnxfuse.merge(members), full_check=True)


def test_inputs_are_never_modified():
    members = [cnn(seed) for seed in range(2)]
    before = [m.SerializeToString() for m in members]
    onnxfuse.merge(members)
    onnxfuse.concat(members)
    assert [m.SerializeToString() for m in members] == before


def test_softmax_output_is_reported_not_exact():
    """Softmax after the last layer: the wide model averages logits, not probabilities, and says so."""
    from graphs import Builder
    members = []
    for seed in range(2):
        b = Builder(seed)
        h = b.op("Relu", [b.op("Gemm", ["x", b.weight((5, 4)), b.weight((5,))], transB=1)])
        h = b.op("Softmax", [b.op("Gemm", [h, b.weight((3, 5)), b.weight((3,))], transB=1)], axis=-1)
        members.append(b.model(["batch", 4], h, ["batch", 3]))
    fusion = onnxfuse.fuse(members, "concat")
    assert fusion.summary["exact"] is False
    assert "Softmax" in fusion.summary["outputs"]["y"]
    assert onnxfuse.inspect(members)["exact"] is False


def test_residual_and_concat_groups():
    groups = onnxfuse.inspect(residual_mlp(0))["groups"]
    residual = [g for g in groups if len(g["layers"]) == 3]
    assert len(residual) == 1 and residual[0]["prunable"]        # stem + both skip branches: one group
    fusion = onnxfuse.fuse([conv_concat(s) for s in range(2)], "nt")
    assert [g["width"] for g in fusion.summary["groups"]] == [3, 4, 2]


def test_even_split_keeps_equal_parts_or_refuses():
    """Split with num_outputs (torch.chunk, new exporter) needs parts of equal width in the fused model too."""
    groups = onnxfuse.fuse([dense_chunks(s) for s in range(2)], "nt").summary["groups"]
    assert [g["kept"] for g in groups] == [4]            # gate and value are multiplied: one group of 4
    members = [dense_chunks_refined(s) for s in range(2)]
    # the first part is split again (3 + 5): kept counts are rounded per group, 2 + 3 against 8 -> 4
    with pytest.raises(onnxfuse.UnsupportedGraphError, match=r"equal parts .* would be \[5, 4\]"):
        onnxfuse.fuse(members, "nt", keep=0.25)
    with pytest.raises(onnxfuse.UnsupportedGraphError, match=r"equal parts .* would be \[5, 4\]"):
        onnxfuse.prune(members[0], keep=0.5)


def test_slice_bounds_computed_from_shape_follow_the_kept_width():
    """The legacy exporter's torch.chunk: bounds (C + 1) // 2 * i recomputed by the graph at run time."""
    members = [dense_chunks_by_shape(s) for s in range(2)]
    x = random_input(members[0])
    assert onnxfuse.fuse(members, "concat").summary["exact"]
    fused = onnxfuse.merge(members)                         # parts keep 8 + 8: the bounds land on them
    assert run(fused, x).shape == (5, 3)
    # keep 0.25: the second half (3 + 5 -> 2 + 3 = 5) outgrows the first (8 -> 4): the graph would cut at
    # (9 + 1) // 2 = 5, not at 4
    with pytest.raises(onnxfuse.UnsupportedGraphError, match=r"would cut at 5, not at 4"):
        onnxfuse.fuse(members, "nt", keep=0.25)
    other = [dense_chunks_by_shape(s, refine="first") for s in range(2)]
    wide = onnxfuse.concat(other)
    narrow = onnxfuse.fuse(other, "nt", keep=0.25).model   # 5 + 4: cut at 5, end 10 clamped to 9
    np.testing.assert_allclose(run(wide, x), mean_of(other, x), atol=1e-5)
    assert np.isfinite(run(narrow, x)).all()


def test_split_and_slice_make_one_group_per_part():
    groups = onnxfuse.fuse([conv_split(s) for s in range(2)], "nt").summary["groups"]
    assert sorted(g["width"] for g in groups) == [2, 3, 3]
    groups = onnxfuse.fuse([dense_slices(s) for s in range(2)], "nt").summary["groups"]
    assert sorted(g["width"] for g in groups) == [4, 5]


def _heads_by_shape(seed):
    """x [2, 5, 6] -> MatMul (2 heads of 4) -> Reshape to [B, T, 2, C // 2] with C = h.size(-1) computed at run
    time (as torchvision's Swin writes its head size) -> Relu -> Reshape back [B, T, -1] -> MatMul -> y."""
    h = onnx.helper
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in (("w1", (6, 8)),
                                                                                          ("w2", (8, 3)))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("i0", 0), ("i1", 1), ("i2", 2), ("heads", [2]), ("two", 2), ("axes", [0]), ("back", [0, 0, -1]))]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["m"]), h.make_node("Shape", ["m"], ["s"])]
    for i in range(3):
        nodes.append(h.make_node("Gather", ["s", f"i{i}"], [f"d{i}"], axis=0))
    nodes += [h.make_node("Div", ["d2", "two"], ["hd"]),
              h.make_node("Unsqueeze", ["d0", "axes"], ["u0"]), h.make_node("Unsqueeze", ["d1", "axes"], ["u1"]),
              h.make_node("Unsqueeze", ["hd", "axes"], ["u3"]),
              h.make_node("Concat", ["u0", "u1", "heads", "u3"], ["target"], axis=0),
              h.make_node("Reshape", ["m", "target"], ["r"]), h.make_node("Relu", ["r"], ["a"]),
              h.make_node("Reshape", ["a", "back"], ["b"]), h.make_node("MatMul", ["b", "w2"], ["y"])]
    graph = h.make_graph(nodes, "heads", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 5, 6])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5, 3])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_a_head_size_computed_from_the_shape_stays_the_head_size():
    """In the wide model h is 16 wide: the graph would compute 16 // 2 = 8 as the head size; the head count is
    rewritten to 4 and the head size pinned to 4, so concat is the members' mean; merge writes nothing new."""
    members = [_heads_by_shape(s) for s in (0, 1)]
    x = np.random.default_rng(3).normal(size=(2, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(run(onnxfuse.concat(members), x), mean_of(members, x), rtol=1e-5, atol=1e-5)
    assert run(onnxfuse.prune(members[0], 0.5), x).shape == (2, 5, 3)
    merged = onnxfuse.merge(members)
    assert [t.name for t in merged.graph.initializer] == [t.name for t in members[0].graph.initializer]
