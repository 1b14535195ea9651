"""Real torchvision and timm models (random init, a different seed per member, 32x32 inputs), as a new user
would fuse them; onnxruntime is the oracle. The whole zoo is benchmarks/zoo.py; this is a fast subset, exported
once per machine (graphs.export_cache)."""
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxfuse
from onnxfuse import api
from onnxfuse.methods import nt
from graphs import export_cache

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

# (source, name, exporter): grouped convs (regnet), shared zero biases (efficientnet, resnet legacy), SE blocks,
# hard-swish, concat of branches (googlenet), layer scale and channel-last LayerNorm (convnext), the new exporter
MODELS = [("torchvision", "resnet18", "legacy"), ("torchvision", "efficientnet_b0", "legacy"),
          ("torchvision", "mobilenet_v3_small", "legacy"), ("torchvision", "regnet_x_400mf", "legacy"),
          ("torchvision", "mnasnet0_5", "legacy"), ("torchvision", "googlenet", "legacy"),
          ("torchvision", "squeezenet1_1", "dynamo"), ("timm", "regnetx_002", "legacy"),
          ("timm", "mobilenetv3_small_100", "legacy"), ("timm", "convnext_atto", "legacy"),
          ("timm", "convnext_atto", "dynamo")]       # its head's as_strided: Reshape [-1] + Gather of every index
WEIGHT_MATCHING = {"efficientnet_b0", "convnext_atto"}
# the wide model is not the members' mean, and says why: a ReLU after the last conv (squeezenet), a LayerNorm
# over the members' channels together (convnext)
NOT_EXACT = {"squeezenet1_1": "Relu", "convnext_atto": "LayerNormalization"}
SIZE = 32


def build(source, name, seed):
    torch.manual_seed(seed)
    if source == "timm":
        return timm.create_model(name, pretrained=False, num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None, num_classes=10).eval()


def export(net, path, exporter):
    x = torch.randn(1, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"], verbose=False)
        else:
            torch.onnx.export(net, x, str(path), dynamo=False, input_names=["x"], output_names=["y"], opset_version=17)
    return str(path)


def export_once(source, name, exporter, seed, root) -> str:
    return cached(root / f"{source}_{name}_{exporter}_{seed}.onnx",
                  lambda path: export(build(source, name, seed), path, exporter))


def cached(path: Path, write) -> str:
    """The export at `path`, made by write(path) when missing: in a temporary folder, then moved in with the
    .onnx last (a session that stops half-way, or runs beside another, leaves no partial export under the name)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".export", dir=path.parent))
        try:
            write(tmp / path.name)
            for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".onnx"):     # external data first
                os.replace(f, path.parent / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


@pytest.fixture(scope="session")
def cache_root():
    return export_cache("zoo", __file__, torch, torchvision, timm)


@pytest.fixture(scope="session")
def zoo(cache_root):
    return lambda source, name, exporter: [export_once(source, name, exporter, s, cache_root) for s in (0, 1)]


def outputs(model, x):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def ids(m):
    return f"{m[0]}-{m[1]}-{m[2]}"


X = np.random.default_rng(0).normal(size=(1, 3, SIZE, SIZE)).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS, ids=ids)
def test_concat_is_the_members_mean_and_every_result_runs(zoo, model, tmp_path):
    files = zoo(*model)
    wide = api.fuse(files, "concat", output=tmp_path / "wide.onnx")
    mean = np.mean([outputs(f, X).astype(np.float64) for f in files], axis=0)
    got = outputs(tmp_path / "wide.onnx", X)
    if model[1] in NOT_EXACT:
        assert not wide.summary["exact"] and NOT_EXACT[model[1]] in wide.summary["outputs"]["y"]
        assert got.shape == mean.shape and np.isfinite(got).all()
    else:
        assert wide.summary["exact"]
        assert np.abs(got - mean).max() <= 1e-4 * np.abs(mean).max()
    api.fuse(files, "nt", output=tmp_path / "nt.onnx")
    api.fuse(files[:1], "prune", 0.5, output=tmp_path / "pruned.onnx")
    for name in ("nt.onnx", "pruned.onnx"):
        y = outputs(tmp_path / name, X)
        assert y.shape == mean.shape and np.isfinite(y).all()
    if model[1] in WEIGHT_MATCHING:
        api.fuse(files, "weight-matching", output=tmp_path / "wm.onnx")
        assert outputs(tmp_path / "wm.onnx", X).shape == mean.shape


def _permuted_copy(path, seed):
    """Member 0 with the channels of every fused group shuffled: the same function, other weights."""
    from onnxfuse.methods.permute import averaged, identity, pinned
    from onnxfuse.model_io import check_compatible
    from onnxfuse.transplant import MemberTensors
    members = api.load_members([path])
    a = api.analyze(members[0].model, members[0].tensors)
    rng = np.random.default_rng(seed)
    perm = {root: (p if root in pinned(a) else rng.permutation(len(p))) for root, p in identity(a).items()}
    graph, tensors = averaged(members, MemberTensors(members, check_compatible(members)), a, [perm])
    return tensors.materialize(graph)


# weight matching's coordinate descent from the identity stops short on efficientnet_b0 (a local optimum, as
# before it was made faster); OT's layer-by-layer transport finds the permutation
@pytest.mark.slow
@pytest.mark.parametrize("model,methods", [(MODELS[0], ("weight-matching", "ot")), (MODELS[1], ("ot",)),
                                           (MODELS[3], ("weight-matching", "ot"))],
                         ids=["resnet18", "efficientnet_b0", "regnet_x_400mf"])
def test_weight_matching_and_ot_undo_a_permutation(zoo, model, methods):
    """A shuffled copy computes the same function; aligning it to the original and averaging gives it back."""
    first = zoo(*model)[0]
    shuffled = _permuted_copy(first, 3)
    want = outputs(first, X)
    assert np.allclose(outputs(shuffled, X), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    assert not np.allclose(outputs(api.merge([first, shuffled], method="average"), X), want, rtol=1e-3, atol=0)
    for method in methods:
        got = outputs(api.merge([first, shuffled], method=method), X)
        assert np.allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max()), method


@pytest.mark.slow
@pytest.mark.parametrize("shared", ["some", "all but one"])
def test_tensors_shared_across_members(tmp_path, shared):
    """Members that share the first layers' tensors (frozen layers), or all but the last layer's (sharing none
    is every other test here)."""
    nets = [build("torchvision", "resnet18", s) for s in (0, 1)]
    with torch.no_grad():
        for n0, n1 in zip(nets[0].named_modules(), nets[1].named_modules()):
            copy = shared == "some" and n0[0].startswith(("conv1", "bn1", "layer1")) or \
                shared == "all but one" and n0[0] != "fc"
            for p0, p1 in zip(n0[1].parameters(recurse=False), n1[1].parameters(recurse=False)):
                if copy:
                    p1.copy_(p0)
    files = [export(net, tmp_path / f"m{i}.onnx", "legacy") for i, net in enumerate(nets)]
    mean = np.mean([outputs(f, X).astype(np.float64) for f in files], axis=0)
    assert np.abs(outputs(api.concat(files), X) - mean).max() <= 1e-4 * np.abs(mean).max()
    for method in ("nt", "weight-matching", "ot"):
        assert outputs(api.merge(files, method=method), X).shape == mean.shape


def test_grouped_conv_keeps_channels_evenly_per_group(tmp_path):
    """conv (4 -> 8), grouped conv (8 -> 8, group 2), 1x1 conv (8 -> 3): the channels that are zero in the
    first layer (and feed nothing) differ between the two blocks, so pruning half of them is exact only if the
    grouped weight's input positions are cut block by block."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(8, 4, 3, 3)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    dead = [1, 2, 4, 7]
    w1[dead], b1[dead] = 0, -1       # relu(-1) = 0: dead channels
    w2 = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    w2[:4, [1, 2]] *= 1e-3           # and what they feed is small, so they score lowest
    w2[4:, [0, 3]] *= 1e-3
    w2[[0, 3, 5, 6]] *= 1e-3         # the grouped conv's weakest outputs, also block by block
    w3 = rng.normal(size=(3, 8, 1, 1)).astype(np.float32)
    w3[:, [0, 3, 5, 6]] = 0
    h = onnx.helper
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in (("w1", w1), ("b1", b1), ("w2", w2), ("w3", w3))]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4), h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4, group=2), h.make_node("Relu", ["c2"], ["r2"]),
             h.make_node("Conv", ["r2", "w3"], ["c3"]), h.make_node("GlobalAveragePool", ["c3"], ["y"])]
    graph = h.make_graph(nodes, "grouped", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 6, 6])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 1, 1])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    x = rng.normal(size=(1, 4, 6, 6)).astype(np.float32)
    pruned = api.fuse([model], "prune", 0.5, output=tmp_path / "p.onnx")
    group = [next(a.i for a in n.attribute if a.name == "group") for n in pruned.model.graph.node
             if n.op_type == "Conv" and any(a.name == "group" for a in n.attribute)]
    assert group == [2]
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "p.onnx")).run(None, {"x": x})[0]
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-6)
    wide = api.concat([model, model])
    assert [next(a.i for a in n.attribute if a.name == "group") for n in wide.graph.node
            if any(a.name == "group" for a in n.attribute)] == [4]
    assert np.allclose(ort.InferenceSession(wide.SerializeToString()).run(None, {"x": x})[0], ref, rtol=1e-5,
                       atol=1e-6)
    with pytest.raises(onnxfuse.OnnxFuseError, match="grouped convolution"):
        api.merge([model, model, model])        # 4 channels per group cannot be kept evenly by 3 members


@pytest.mark.slow
def test_a_result_that_does_not_run_is_refused_and_not_written(zoo, tmp_path, monkeypatch):
    files = zoo("torchvision", "resnet18", "legacy")
    real = nt.transplant

    def broken(*args, **kwargs):         # a rewrite that passes the checker but fails in onnxruntime
        graph, tensors = real(*args, **kwargs)
        gemm = next(n for n in graph.graph.node if n.op_type == "Gemm")
        tensors.set(gemm.input[2], np.zeros(3, np.float32))
        return graph, tensors
    monkeypatch.setattr(nt, "transplant", broken)
    with pytest.raises(onnxfuse.UnsupportedGraphError, match=r"does not run in onnxruntime at node '.*fc.*' \(Gemm\)"):
        api.fuse(files, "nt", output=tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def _channel_last(seed, channel_pad=0):
    """conv -> Pad of H and W -> channels last -> Reshape [B, H*W, C] (windows regroup only the leading axes) ->
    MatMul -> mean over positions."""
    rng = np.random.default_rng(seed)
    h = onnx.helper
    inits = [onnx.numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in
             (("w1", (6, 3, 3, 3)), ("b1", (6,)), ("w2", (6, 5)))]
    inits += [onnx.numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("pads", [0, channel_pad, 1, 1, 0, 0, 1, 1]), ("shape", [1, 36, 6]), ("axes", [1]))]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c"]), h.make_node("Pad", ["c", "pads"], ["p"]),
             h.make_node("Transpose", ["p"], ["t"], perm=[0, 2, 3, 1]),
             h.make_node("Reshape", ["t", "shape"], ["r"]), h.make_node("MatMul", ["r", "w2"], ["m"]),
             h.make_node("ReduceMean", ["m", "axes"], ["y"], keepdims=0)]
    graph = h.make_graph(nodes, "channel_last", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 6, 6])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


def test_pad_and_channel_last_reshape():
    members = [_channel_last(s) for s in (0, 1)]
    x = np.random.default_rng(5).normal(size=(1, 3, 6, 6)).astype(np.float32)
    wide = api.fuse(members, "concat")
    assert wide.summary["exact"]
    mean = np.mean([outputs(m, x) for m in members], axis=0)
    assert np.allclose(outputs(wide.model, x), mean, rtol=1e-5, atol=1e-6)
    assert outputs(api.merge(members), x).shape == (1, 5)
    report = api.inspect([_channel_last(0, channel_pad=1)])
    assert not report["fusable"] and "pads the channel axis" in report["problems"][0]


def _shared_bn(seed, via_identity):
    """Two conv + BatchNorm layers whose BN parameters are one stored tensor (as the exporters deduplicate the
    ones and zeros of a random init): read directly by both nodes, or through Identity (the legacy exporter)."""
    rng = np.random.default_rng(seed)
    h = onnx.helper
    inits = [onnx.numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in
             (("w1", (4, 3, 3, 3)), ("w2", (4, 4, 3, 3)), ("w3", (2, 4)))]
    inits += [onnx.numpy_helper.from_array(np.ones(4, np.float32), "one"),
              onnx.numpy_helper.from_array(np.zeros(4, np.float32), "zero")]
    nodes = [h.make_node("Identity", ["one"], ["one2"]), h.make_node("Identity", ["zero"], ["zero2"])] \
        if via_identity else []
    second = ("one2", "zero2") if via_identity else ("one", "zero")
    nodes += [h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4),
              h.make_node("BatchNormalization", ["c1", "one", "zero", "zero", "one"], ["n1"]),
              h.make_node("Relu", ["n1"], ["r1"]), h.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4),
              h.make_node("BatchNormalization", ["c2", second[0], second[1], second[1], second[0]], ["n2"]),
              h.make_node("Relu", ["n2"], ["r2"]), h.make_node("GlobalAveragePool", ["r2"], ["g"]),
              h.make_node("Flatten", ["g"], ["f"]), h.make_node("Gemm", ["f", "w3"], ["y"], transB=1)]
    graph = h.make_graph(nodes, "shared", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 5, 5])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("via_identity", [False, True], ids=["direct", "identity"])
def test_one_stored_tensor_for_several_layers(via_identity):
    members = [_shared_bn(s, via_identity) for s in (0, 1)]
    x = np.random.default_rng(2).normal(size=(1, 3, 5, 5)).astype(np.float32)
    mean = np.mean([outputs(m, x) for m in members], axis=0)
    assert np.allclose(outputs(api.concat(members), x), mean, rtol=1e-5, atol=1e-6)
    for method in ("nt", "weight-matching", "ot"):
        assert outputs(api.merge(members, method=method), x).shape == (1, 2)
    assert outputs(api.prune(members[0], 0.5), x).shape == (1, 2)


def _legacy(net, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.from_numpy(x), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          opset_version=17)


@pytest.mark.slow
@pytest.mark.parametrize("version,exporter", [(1, "legacy"), (2, "legacy"), (1, "dynamo")])
def test_swin_window_attention_computes_its_head_size_from_the_stream(cache_root, tmp_path, version, exporter,
                                                                     caplog):
    """torchvision's shifted-window attention reshapes qkv to [B, N, 3, heads, C // heads] and its output back
    to [B, N, C] with C = x.size(-1) of the residual stream, computed at run time: in the wide and the pruned
    model those sizes come from the kept widths (heads and head size of the attention groups), not from the
    stream's width, which another group decides. Swin V2 also computes parameters from constants (its q/k/v
    bias with the key part zeroed by a ScatterND, exp(clip(logit_scale))): they are folded (onnxfuse.folding)."""
    from torchvision.models import swin_transformer as st

    def swin(seed):
        torch.manual_seed(seed)
        v2 = {"block": st.SwinTransformerBlockV2, "downsample_layer": st.PatchMergingV2} if version == 2 else {}
        return st.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                  window_size=[2, 2], num_classes=10, **v2).eval()
    name = ("swin_small" if version == 1 else "swin_v2_small") + ("" if exporter == "legacy" else "_dynamo")
    files = [cached(cache_root / f"{name}_{s}.onnx", lambda p, s=s: _legacy(swin(s), X, p) if exporter == "legacy"
                    else export(swin(s), p, exporter)) for s in (0, 1)]
    if version == 2:
        from onnxfuse.groups import analyze
        from onnxfuse.model_io import load_member
        member = load_member(files[0])
        assert analyze(member.model, member.tensors).problems          # as exported: not analysable
    mean = np.mean([outputs(f, X).astype(np.float64) for f in files], axis=0)
    wide = api.fuse(files, "concat", output=tmp_path / "wide.onnx")
    assert not wide.summary["exact"] and "LayerNormalization" in wide.summary["outputs"]["y"]
    runs = (("nt", files, None), ("prune", files[:1], 0.5), ("prune", files[:1], 0.75))
    for method, sources, keep in runs if (version, exporter) == (1, "legacy") else runs[:2]:
        out = tmp_path / f"{method}{keep}.onnx"
        api.fuse(sources, method, keep, output=out)
        y = outputs(out, X)
        assert y.shape == mean.shape and np.isfinite(y).all()
    assert "Unable to determine" not in caplog.text       # onnxruntime's symbolic shape guesses are not logged


# timm models with patterns of their own: GhostNet adds a shortcut to the concat of a conv and its depthwise
# copy; HRNet upsamples its branches with Resize; LeViT adds per-head attention biases read through a Gather
# and averages two heads (a Div by 2 of the mean: linear, still exact)
# (the new exporter: LeViT's biases are a GatherND of the transposed table, then a Transpose, and its q/k/v
# Reshape adds the batch axis while it splits heads: [N, H*D] -> [1, N, H, D])
TIMM_PATTERNS = [("ghostnet_050", {}, 32, "legacy"), ("hrnet_w18_small", {}, 32, "legacy"),
                 ("levit_128s", {"img_size": 64}, 64, "legacy"), ("levit_128s", {"img_size": 64}, 64, "dynamo")]


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,size,exporter", TIMM_PATTERNS, ids=[f"{m[0]}-{m[3]}" for m in TIMM_PATTERNS])
def test_timm_patterns(cache_root, tmp_path, name, kwargs, size, exporter):
    x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)

    def net(seed):
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()

    def write(path, seed):
        if exporter == "legacy":
            return _legacy(net(seed), x, path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net(seed), (torch.from_numpy(x),), str(path), dynamo=True, input_names=["x"],
                              output_names=["y"], verbose=False)
    tag = "" if exporter == "legacy" else "_dynamo"
    files = [cached(cache_root / f"timm_{name}_{size}{tag}_{s}.onnx", lambda p, s=s: write(p, s)) for s in (0, 1)]
    mean = np.mean([outputs(f, x).astype(np.float64) for f in files], axis=0)
    wide = api.fuse(files, "concat", output=tmp_path / "wide.onnx")
    assert wide.summary["exact"], wide.summary["outputs"]
    assert np.abs(outputs(tmp_path / "wide.onnx", x) - mean).max() <= 1e-4 * np.abs(mean).max()
    for method, sources, keep in (("nt", files, None), ("prune", files[:1], 0.5)):
        out = tmp_path / f"{method}.onnx"
        api.fuse(sources, method, keep, output=out)
        assert outputs(out, x).shape == mean.shape


def _shufflenet(seed):
    from torchvision.models.shufflenetv2 import ShuffleNetV2
    torch.manual_seed(seed)
    return ShuffleNetV2([2, 3, 2], [8, 16, 24, 40, 64], num_classes=10).eval()


def _params(path):
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


def _unread(path):
    """Initializers and Constant nodes of a written model that no node reads (left behind by a rewrite)."""
    graph = onnx.load(str(path)).graph
    read = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    return [t.name for t in graph.initializer if t.name not in read] + \
        [n.output[0] for n in graph.node if n.op_type == "Constant" and n.output[0] not in read]


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_shufflenet_channel_shuffle_is_a_permutation(cache_root, tmp_path, exporter):
    """torchvision's ShuffleNetV2 interleaves the two halves of its channels (Reshape [B, 2, C/2, H, W],
    Transpose, Reshape back) and splits them again in the next block: each channel on that path is its own group,
    and where the widths change the shuffle is written as one Gather of the kept channels."""
    from onnxfuse.torch_bridge import OnnxModule
    files = [cached(cache_root / f"shufflenet_small_{exporter}_{s}.onnx",
                    lambda p, s=s: export(_shufflenet(s), p, exporter)) for s in (0, 1)]
    mean = np.mean([outputs(f, X).astype(np.float64) for f in files], axis=0)
    wide = api.fuse(files, "concat", output=tmp_path / "wide.onnx")
    assert wide.summary["exact"], wide.summary["outputs"]
    assert np.abs(outputs(tmp_path / "wide.onnx", X) - mean).max() <= 1e-4 * np.abs(mean).max()
    ops = [n.op_type for n in onnx.load(str(tmp_path / "wide.onnx")).graph.node]
    member_ops = [n.op_type for n in onnx.load(files[0]).graph.node]
    assert "Transpose" not in ops and ops.count("Gather") == member_ops.count("Gather") + 7
    api.fuse(files, "nt", output=tmp_path / "nt.onnx")          # the members' widths: the shuffle as exported
    nt_ops = [n.op_type for n in onnx.load(str(tmp_path / "nt.onnx")).graph.node]
    assert nt_ops.count("Transpose") == 7 and nt_ops.count("Gather") == member_ops.count("Gather")
    assert outputs(tmp_path / "nt.onnx", X).shape == mean.shape
    api.fuse(files[:1], "prune", 0.5, output=tmp_path / "pruned.onnx")
    assert _params(tmp_path / "pruned.onnx") < 0.75 * _params(files[0])
    assert _unread(tmp_path / "wide.onnx") == _unread(tmp_path / "pruned.onnx") == []   # the shuffles' targets go
    again = tmp_path / "pruned_again.onnx"      # the Gathers it wrote are permutations it reads back
    api.fuse([tmp_path / "pruned.onnx"], "prune", 0.5, output=again)
    assert _params(again) < _params(tmp_path / "pruned.onnx")
    y = outputs(again, X)
    module = OnnxModule(onnx.load(str(again))).eval()
    with torch.no_grad():
        got = module(torch.from_numpy(X))
    got = got[0] if isinstance(got, (list, tuple)) else got
    assert np.abs(got.numpy() - y).max() <= 1e-4 * max(np.abs(y).max(), 1e-6)
    api.fuse(files, "weight-matching", output=tmp_path / "wm.onnx")
    assert outputs(tmp_path / "wm.onnx", X).shape == mean.shape


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_maxvit_einsum_attention(cache_root, tmp_path, exporter):
    """torchvision's MaxViT writes its attention products as Einsum ("B G H I D, B G H J D -> B G H I J" and
    back): they are loaded as the MatMul (and Transpose) other exporters write, the same function."""
    from torchvision.models.maxvit import MaxVit
    from onnxfuse.model_io import load_member

    def net(seed):
        torch.manual_seed(seed)
        return MaxVit(input_size=(SIZE, SIZE), stem_channels=8, partition_size=2, block_channels=[16, 32],
                      block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()
    files = [cached(cache_root / f"maxvit_small_{exporter}_{s}.onnx", lambda p, s=s: export(net(s), p, exporter))
             for s in (0, 1)]
    assert "Einsum" in [n.op_type for n in onnx.load(files[0]).graph.node]
    member = load_member(files[0])
    assert "Einsum" not in [n.op_type for n in member.model.graph.node]
    loaded = outputs(member.tensors.materialize(member.model), X)
    assert np.abs(loaded - outputs(files[0], X)).max() <= 1e-5 * np.abs(loaded).max()
    mean = np.mean([outputs(f, X).astype(np.float64) for f in files], axis=0)
    for method, sources, keep in (("concat", files, None), ("nt", files, None), ("prune", files[:1], 0.5)):
        out = tmp_path / f"{method}.onnx"
        api.fuse(sources, method, keep, output=out)
        y = outputs(out, X)
        assert y.shape == mean.shape and np.isfinite(y).all()
    assert _params(tmp_path / "prune.onnx") < 0.75 * _params(files[0])
